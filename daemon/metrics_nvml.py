"""GPU memory per worker process and GPU UUIDs, read through NVML from the CUDA-free daemon.

Why here and not in the workers: a worker that is stuck or dying cannot report, and the daemon
must never create a CUDA context. NVML (nvidia-ml-py, the `gpu` extra) reads the driver's view
without one: per device, the compute processes and the memory each uses. The daemon matches them
to its workers by pid. Absent module, absent driver or any NVML error: `available` is False and
every read returns nothing, so CPU machines and CI simply export no GPU series.

PIDs are the driver's (the host's) pids: in a container, run the daemon with the host's pid
namespace (compose: `pid: host`) or the match finds nothing. Device indices are NVML's (PCI bus
order); CUDA orders by speed unless CUDA_DEVICE_ORDER=PCI_BUS_ID, which the systemd unit and the
compose file set so `cuda:N` and NVML index N are the same GPU.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Nvml:
    def __init__(self, module=None):
        """`module`: an NVML binding with pynvml's API (tests pass a fake); None imports pynvml."""
        self._nv = None
        try:
            if module is None:
                import pynvml as module
            module.nvmlInit()
            self._nv = module
        except Exception as exc:  # noqa: BLE001 - no binding, no driver, no GPU: no GPU metrics
            log.debug("NVML unavailable (%s): no per-worker GPU memory", exc)

    @property
    def available(self) -> bool:
        return self._nv is not None

    def process_memory(self) -> dict[int, int]:
        """GPU memory used per pid, summed over devices; {} without NVML or on an NVML error."""
        nv, out = self._nv, {}
        if nv is None:
            return out
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    if used is not None:
                        out[proc.pid] = out.get(proc.pid, 0) + int(used)
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus must not break the scrape
            log.warning("NVML process query failed: %s", exc)
            return {}
        return out

    def uuid(self, device: str) -> str:
        """The GPU UUID of `cuda:N` (DCGM exporter's `UUID` label); '' for CPU or without NVML."""
        if self._nv is None or not device.startswith("cuda"):
            return ""
        try:
            index = int(device.partition(":")[2] or 0)
            value = self._nv.nvmlDeviceGetUUID(self._nv.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # noqa: BLE001 - an index NVML does not know
            return ""
        return value.decode() if isinstance(value, bytes) else str(value)
