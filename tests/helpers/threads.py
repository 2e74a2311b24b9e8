"""An in-process executor: each worker a thread running the real worker loop (worker_loop.serve)
with the fake worker, so dispatcher tests place, fail, lose and time out shots in milliseconds.

Only for runtimes built with `in_process=True` (the fake): a thread cannot be killed, so `_kill`
asks the runtime to end (`kill()`; its hang and its next step notice) and drops whatever the
thread still sends, as a dead process sends nothing. The executor's clock is injectable, so a
heartbeat timeout is a clock step, not a wait.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from storyfarm.scheduler.gpu_pool.executor import Executor, WorkerHandle
from storyfarm.scheduler.gpu_pool.fake import WorkerDied
from storyfarm.scheduler.gpu_pool.messages import ShotTask
from storyfarm.scheduler.gpu_pool.worker_loop import WORKER_FACTORIES, resolve_factory


class Clock:
    """A monotonic clock that moves only when told (`advance`)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class _Thread:
    thread: threading.Thread
    inbox: queue.Queue
    cancel: threading.Event
    dead: threading.Event = field(default_factory=threading.Event)  # killed: its messages are dropped
    runtime: object = None


class ThreadExecutor(Executor):
    kind = "threads"

    def __init__(self, groups, *, preset: str = "tiny", worker_factory: str = WORKER_FACTORIES["fake"], **kwargs):
        super().__init__(preset, groups, worker_factory=worker_factory, **kwargs)
        self.outbox: queue.Queue = queue.Queue()
        self.assigned: list[ShotTask] = []

    def _launch(self, handle: WorkerHandle) -> None:
        slot = _Thread(None, queue.Queue(), threading.Event())

        def send(message) -> None:
            if not slot.dead.is_set():
                self.outbox.put(message)

        def build():
            slot.runtime = resolve_factory(self.worker_factory)(
                handle.id, self.preset, handle.group.device, send, threads=1,
                expert_placement=self.expert_placement, in_process=True)
            return slot.runtime

        def body() -> None:
            from storyfarm.scheduler.gpu_pool.worker_loop import serve

            try:
                serve(handle.id, build, send, slot.inbox.get, slot.cancel)
            except WorkerDied:
                pass  # the fake "died" (or was killed): the thread ends, nothing more is sent

        slot.thread = threading.Thread(target=body, name=f"fake-worker-{handle.id}-{handle.generation}", daemon=True)
        handle.runtime = slot
        slot.thread.start()

    def assign(self, worker: WorkerHandle, task: ShotTask) -> None:
        super().assign(worker, task)
        self.assigned.append(task)  # what the dispatcher handed out (tests read low_memory, attempts)

    def _send(self, handle: WorkerHandle, message) -> None:
        if isinstance(message, ShotTask):
            handle.runtime.cancel.clear()
        handle.runtime.inbox.put(message)

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        handle.runtime.cancel.set()

    def _alive(self, handle: WorkerHandle) -> bool:
        slot = handle.runtime
        return slot is not None and not slot.dead.is_set() and slot.thread.is_alive()

    def _kill(self, handle: WorkerHandle) -> bool:
        slot = handle.runtime
        slot.dead.set()
        slot.cancel.set()  # wakes a slow step; the runtime's next check sees it was killed
        if slot.runtime is not None:
            slot.runtime.kill()
        slot.inbox.put(None)  # an idle loop ends too
        slot.thread.join(timeout=5)
        return not slot.thread.is_alive()

    def _receive(self, timeout: float) -> list:
        out = []
        try:
            out.append(self.outbox.get(timeout=timeout))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def _stop_wait(self, grace: float) -> None:
        for w in self.workers.values():
            if w.runtime is not None and w.runtime.thread.is_alive():
                self._kill(w)
