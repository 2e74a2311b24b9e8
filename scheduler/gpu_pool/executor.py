"""Executors: where workers run (processes on this host, or Ray actors), behind one interface.

The daemon talks to an Executor: start workers, hand a worker a task, cancel, release a story's
memory, poll messages, supervise, stop. What differs between `mp` and `ray` is only how a worker
is launched, messaged, checked and killed; everything about supervision lives here once:

- a worker that sends nothing (no progress, no heartbeat) for `heartbeat_timeout_s` while it holds
  a shot is killed, confirmed dead, and replaced; its shot comes back as lost (`heartbeat_timeout`);
- a worker that dies comes back the same way (`worker_died`); one that reports a CUDA error is
  replaced, never reused; one that takes longer than `start_timeout_s` to load is replaced;
- every such failure counts against the worker's device group; a group that fails
  `failure_limit` times within `failure_window_s` is taken out of service (no more respawns) and
  the scheduler stops placing work there;
- replacements of a failing group back off (1 s, 2 s, 4 s ... up to a minute).
What a worker runs is `worker_factory`, a dotted path imported only inside the worker (worker_loop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from storyfarm.scheduler.gpu_pool.messages import Done, Failed, StageUpdate, Ready, Release, ShotTask
from storyfarm.scheduler.gpu_pool.worker_loop import DEFAULT_WORKER_FACTORY, check_factory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceGroup:
    """What one worker owns: its main device ("cuda:0", "cpu") and, for GPUs, the
    CUDA_VISIBLE_DEVICES it runs with (its whole group)."""

    name: str
    device: str = "cpu"
    visible: str | None = None
    gpu_indices: tuple[int, ...] = ()

    @property
    def devices(self) -> list[str]:
        return [f"cuda:{i}" for i in self.gpu_indices] or [self.device]


@dataclass(frozen=True)
class SupervisionConfig:
    heartbeat_timeout_s: float = 300.0
    start_timeout_s: float = 900.0
    failure_limit: int = 3
    failure_window_s: float = 3600.0
    max_backoff_s: float = 60.0


@dataclass
class WorkerHandle:
    id: str
    group: DeviceGroup
    state: str = "starting"  # starting | idle | busy | dead | out_of_service
    task: ShotTask | None = None
    resident_stories: int = 0
    generation: int = 0
    started_at: float = 0.0
    last_seen: float = 0.0  # monotonic time of its last message (the heartbeat)
    restarts: int = 0
    error: str = ""
    gpu_memory_bytes: int = 0
    runtime: object = None  # executor-specific: process and queues, or Ray actor

    @property
    def device(self) -> str:
        return self.group.device

    def snapshot(self) -> dict:
        return {
            "id": self.id, "device": self.device, "devices": self.group.devices, "state": self.state,
            "pid": getattr(getattr(self.runtime, "process", None), "pid", None),
            "story_id": self.task.story_id if self.task else None,
            "shot_index": self.task.shot_index if self.task else None,
            "resident_stories": self.resident_stories, "restarts": self.restarts,
            "generation": self.generation, "out_of_service": self.state == "out_of_service",
            "gpu_memory_bytes": self.gpu_memory_bytes, "error": self.error,
        }


class Executor:
    """Supervision shared by every executor; subclasses launch, message, check and kill."""

    kind = "abstract"

    def __init__(self, preset: str, groups: list[DeviceGroup], *, threads: int | None = None,
                 expert_placement: str = "both", supervision: SupervisionConfig | None = None,
                 on_event=None, clock=time.monotonic, worker_factory: str = DEFAULT_WORKER_FACTORY):
        if not groups:
            raise ValueError("an executor needs at least one device group")
        self.preset, self.groups, self.threads = preset, groups, threads
        self.expert_placement = expert_placement
        self.worker_factory = check_factory(worker_factory)  # imported by the worker, never here
        self.supervision = supervision or SupervisionConfig()
        self.on_event = on_event or (lambda *a, **k: None)
        self.clock = clock
        self.workers: dict[str, WorkerHandle] = {}
        self.restarts = 0
        self.stopping = False  # once stopping, dead workers are not replaced
        self._failures: dict[str, list[float]] = {}  # group name -> failure times
        self._respawn_at: dict[str, float] = {}  # worker id -> when to respawn it

    # -- subclass hooks ------------------------------------------------------------------------
    def _launch(self, handle: WorkerHandle) -> None:
        raise NotImplementedError

    def _send(self, handle: WorkerHandle, message) -> None:
        raise NotImplementedError

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        raise NotImplementedError

    def _alive(self, handle: WorkerHandle) -> bool:
        raise NotImplementedError

    def _kill(self, handle: WorkerHandle) -> bool:
        """Kill and wait until it is confirmed dead; True once it is."""
        raise NotImplementedError

    def _receive(self, timeout: float) -> list:
        raise NotImplementedError

    def _exit_info(self, handle: WorkerHandle) -> str:
        return ""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        for n, group in enumerate(self.groups):
            self._spawn(WorkerHandle(f"w{n}", group))

    def _spawn(self, handle: WorkerHandle) -> None:
        handle.state, handle.task, handle.error = "starting", None, ""
        handle.started_at = handle.last_seen = self.clock()
        self.workers[handle.id] = handle
        self._launch(handle)
        log.info("worker %s starting on %s (%s executor, generation %d, pid %s)", handle.id, handle.group.name,
                 self.kind, handle.generation, handle.snapshot()["pid"])
        self.on_event(handle.id, device=handle.device, event="started")

    @property
    def ready(self) -> bool:
        return any(w.state in ("idle", "busy") for w in self.workers.values())

    def idle(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state == "idle"]

    def assign(self, worker: WorkerHandle, task: ShotTask) -> None:
        if worker.state != "idle":
            raise RuntimeError(f"worker {worker.id} is {worker.state}, not idle")
        worker.state, worker.task, worker.last_seen = "busy", task, self.clock()
        self._send(worker, task)

    def cancel(self, attempt_id: str) -> bool:
        for w in self.workers.values():
            if w.task is not None and w.task.attempt_id == attempt_id:
                self._signal_cancel(w)
                return True
        return False

    def release(self, story_dir: str) -> None:
        """A story ended: every live worker drops its memory latents (a no-op where it has none)."""
        for w in self.workers.values():
            if w.state in ("idle", "busy"):
                self._send(w, Release(story_dir))

    def poll(self, timeout: float = 0.1) -> list:
        """Messages from workers; updates worker states. Messages for tasks a worker no longer
        holds (it was replaced, or the attempt ended) are dropped."""
        out = []
        for msg in self._receive(timeout):
            worker = self.workers.get(msg.worker_id)
            if worker is None or worker.state in ("dead", "out_of_service"):
                continue
            worker.last_seen = self.clock()
            if isinstance(msg, Ready):
                worker.state = "idle"
                log.info("worker %s ready on %s (%.1fs, attention %s)", msg.worker_id, msg.device, msg.load_seconds,
                         msg.attention_backend or "unknown")
                self.on_event(worker.id, device=worker.device, event="ready")
            elif isinstance(msg, (Done, Failed)):
                if msg.attempt_id is None:  # failed to start
                    worker.error = msg.error
                    self._replace(worker, "start_failed")
                    continue
                if worker.task is None or worker.task.attempt_id != msg.attempt_id:
                    continue
                worker.task, worker.state = None, "idle"
                if isinstance(msg, Done):
                    worker.resident_stories = msg.resident_stories
                    worker.gpu_memory_bytes = int(msg.stats.get("gpu_memory_bytes", worker.gpu_memory_bytes))
                if isinstance(msg, Failed) and msg.fatal:
                    worker.error = msg.error.splitlines()[0][:200]
                    self._replace(worker, msg.reason or "cuda_error")
            elif not isinstance(msg, StageUpdate) or worker.task is None or msg.attempt_id != worker.task.attempt_id:
                continue
            out.append(msg)
        return out

    def supervise(self) -> list[tuple[ShotTask, str]]:
        """Find dead, frozen and stuck-starting workers; replace them (or take their group out of
        service); return the tasks they held with the reason, to re-queue as lost."""
        lost = []
        now = self.clock()
        for worker in list(self.workers.values()):
            if worker.state in ("dead", "out_of_service"):
                continue
            reason = None
            if not self._alive(worker):
                reason = "worker_died"
                log.warning("worker %s died%s", worker.id, self._exit_info(worker))
            elif worker.state == "busy" and now - worker.last_seen > self.supervision.heartbeat_timeout_s:
                reason = "heartbeat_timeout"
                log.warning("worker %s sent nothing for %.0f s while rendering: killing it", worker.id,
                            now - worker.last_seen)
            elif worker.state == "starting" and now - worker.started_at > self.supervision.start_timeout_s:
                reason = "start_timeout"
                log.warning("worker %s did not get ready within %.0f s: replacing it", worker.id,
                            self.supervision.start_timeout_s)
            if reason is None:
                continue
            task = worker.task
            self._replace(worker, reason)  # confirmed dead before its shot is handed back
            if task is not None:
                lost.append((task, reason))
        for worker_id, due in list(self._respawn_at.items()):
            if now >= due and not self.stopping:
                del self._respawn_at[worker_id]
                old = self.workers[worker_id]
                self._spawn(WorkerHandle(old.id, old.group, generation=old.generation + 1, restarts=old.restarts))
        return lost

    def _replace(self, worker: WorkerHandle, reason: str) -> None:
        worker.task = None
        if not self._kill(worker):
            log.error("worker %s could not be confirmed dead", worker.id)
        worker.state = "dead"
        worker.error = worker.error or reason
        if self.stopping:
            return
        now = self.clock()
        failures = [t for t in self._failures.get(worker.group.name, []) if now - t < self.supervision.failure_window_s]
        failures.append(now)
        self._failures[worker.group.name] = failures
        if len(failures) >= self.supervision.failure_limit:
            worker.state = "out_of_service"
            log.error("device group %s failed %d times within %.0f s: taken out of service", worker.group.name,
                      len(failures), self.supervision.failure_window_s)
            self.on_event(worker.id, device=worker.device, event="out_of_service", reason=reason)
            return
        self.restarts += 1
        worker.restarts += 1
        self.on_event(worker.id, device=worker.device, event="replaced", reason=reason)
        backoff = 0.0 if len(failures) <= 1 else min(self.supervision.max_backoff_s, 2.0 ** (len(failures) - 2))
        if backoff:
            self._respawn_at[worker.id] = now + backoff
        else:
            self._spawn(WorkerHandle(worker.id, worker.group, generation=worker.generation + 1, restarts=worker.restarts))

    def gpu_fault(self, gpu_index: int, xid: int) -> list[tuple[ShotTask, str]]:
        """NVML reported a critical Xid on a GPU: its worker is replaced (a failure of its group,
        toward out of service); returns the task it held, to re-queue as lost."""
        lost = []
        for worker in list(self.workers.values()):
            if gpu_index in worker.group.gpu_indices and worker.state not in ("dead", "out_of_service"):
                task = worker.task
                worker.error = f"GPU {gpu_index} reported Xid {xid}"
                self._replace(worker, f"xid_{xid}")
                if task is not None:
                    lost.append((task, f"xid_{xid}"))
        return lost

    def return_to_service(self, worker_id: str) -> None:
        """An operator cleared a group taken out of service: start its worker again."""
        worker = self.workers[worker_id]
        if worker.state != "out_of_service":
            raise ValueError(f"worker {worker_id} is {worker.state}, not out of service")
        self._failures.pop(worker.group.name, None)
        self._spawn(WorkerHandle(worker.id, worker.group, generation=worker.generation + 1, restarts=worker.restarts))

    def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        self._respawn_at.clear()
        for w in self.workers.values():
            if w.state not in ("dead", "out_of_service") and self._alive(w):
                try:
                    self._send(w, None)
                except Exception:  # noqa: BLE001 - a worker that cannot be told is killed below
                    pass
        self._stop_wait(grace)
        for w in self.workers.values():
            if w.state != "out_of_service":
                w.state = "dead"

    def _stop_wait(self, grace: float) -> None:
        deadline = self.clock() + grace
        for w in self.workers.values():
            while self._alive(w) and self.clock() < deadline:
                time.sleep(0.05)
            if self._alive(w):
                self._kill(w)

    def snapshot(self) -> list[dict]:
        return [w.snapshot() for w in self.workers.values()]
