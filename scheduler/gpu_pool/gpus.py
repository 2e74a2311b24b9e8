"""GPU discovery through NVML, without CUDA: the daemon parent must never create a CUDA context.

NVML (nvidia-ml-py) reports each GPU's name, memory and utilisation, and Xid errors (the driver's
codes for GPU faults: 48 double-bit ECC, 79 fallen off the bus, ...) through its event API. Without
NVML or without GPUs the farm runs CPU workers and says so. GPUs are split into device groups of
`gpus_per_worker` (one worker process per group; CUDA_VISIBLE_DEVICES is its group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storyfarm.scheduler.gpu_pool.executor import DeviceGroup

log = logging.getLogger(__name__)

# Xids that mean the GPU itself is unhealthy (not an application bug such as Xid 13/31/43).
CRITICAL_XIDS = {48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilisation_percent: int


def _nvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, no GPU: a CPU machine
        log.info("NVML unavailable: %s", exc)
        return None
    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(nvml=None) -> list[GpuInfo]:
    """The GPUs NVML sees; [] without NVML or GPUs. `nvml` replaces the module (tests)."""
    nvml = nvml or _nvml()
    if nvml is None:
        return []
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - not supported on every GPU (e.g. MIG)
            util = 0
        gpus.append(GpuInfo(i, _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle)),
                            int(memory.total), int(memory.used), util))
    return gpus


def device_groups(device: str, workers: int, gpus_per_worker: int = 1, nvml=None) -> list[DeviceGroup]:
    """Device groups for the workers. `device`: auto (GPUs when NVML finds them, else CPU), cuda
    (GPUs or an error), cpu. On CPU, `workers` processes; on GPUs one per group of
    `gpus_per_worker` GPUs (leftover GPUs are unused and logged)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be at least 1, got {gpus_per_worker}")
    gpus = discover(nvml) if device != "cpu" else []
    if not gpus:
        if device == "cuda":
            raise RuntimeError("device: cuda asked for, but NVML finds no GPU")
        if device == "auto":
            log.warning("no GPU found through NVML: running %d CPU worker(s)", workers)
        return [DeviceGroup(f"cpu{n}", "cpu") for n in range(workers)]
    groups = []
    for start in range(0, len(gpus) - gpus_per_worker + 1, gpus_per_worker):
        indices = tuple(g.index for g in gpus[start:start + gpus_per_worker])
        groups.append(DeviceGroup("gpu" + "-".join(map(str, indices)), "cuda:0",
                                  ",".join(map(str, indices)), indices))
    unused = len(gpus) - len(groups) * gpus_per_worker
    if unused:
        log.warning("%d GPU(s) left unused: %d GPUs do not split into groups of %d", unused, len(gpus), gpus_per_worker)
    for g in gpus:
        log.info("GPU %d: %s, %.1f GiB", g.index, g.name, g.memory_total_bytes / 2**30)
    return groups


class XidWatcher:
    """Polls NVML for critical Xid events without blocking; `poll()` -> [(gpu index, xid)]."""

    def __init__(self, nvml=None):
        self.nvml = nvml or _nvml()
        self._set = None
        if self.nvml is None:
            return
        try:
            self._set = self.nvml.nvmlEventSetCreate()
            for i in range(self.nvml.nvmlDeviceGetCount()):
                handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
                self.nvml.nvmlDeviceRegisterEvents(handle, self.nvml.nvmlEventTypeXidCriticalError, self._set)
        except Exception as exc:  # noqa: BLE001 - Xid events are not offered everywhere (containers, MIG)
            log.info("NVML Xid events unavailable: %s", exc)
            self._set = None

    @property
    def available(self) -> bool:
        return self._set is not None

    def poll(self) -> list[tuple[int, int]]:
        events = []
        while self._set is not None:
            try:
                data = self.nvml.nvmlEventSetWait_v2(self._set, 0)
            except Exception:  # noqa: BLE001 - NVML_ERROR_TIMEOUT: nothing pending
                break
            xid = int(data.eventData)
            index = self.nvml.nvmlDeviceGetIndex(data.device)
            if xid in CRITICAL_XIDS:
                events.append((int(index), xid))
        return events
