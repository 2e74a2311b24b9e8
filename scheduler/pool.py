"""The `mp` executor: spawned render processes on this host, one per device group.

The parent never imports torch: it spawns workers (the `spawn` start method, so no CUDA state is
ever forked), hands each one task at a time through its own queue, reads every worker's messages
from one shared queue, and cancels through a per-worker Event the worker checks at every step.
Supervision (heartbeats, replacement, out of service) is the Executor's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from dataclasses import dataclass

from storyfarm.scheduler.executor import DeviceGroup, Executor, WorkerHandle
from storyfarm.scheduler.messages import ShotTask
from storyfarm.scheduler.worker import worker_main


@dataclass
class _Process:
    process: object
    inbox: object
    cancel: object


class WorkerPool(Executor):
    kind = "mp"

    def __init__(self, preset: str, groups: list[DeviceGroup] | list[str], **kwargs):
        groups = [g if isinstance(g, DeviceGroup) else DeviceGroup(f"{g}#{n}", g) for n, g in enumerate(groups)]
        super().__init__(preset, groups, **kwargs)
        self.threads = self.threads or max(1, (os.cpu_count() or 1) // len(groups))
        self._ctx = mp.get_context("spawn")
        self.outbox = self._ctx.Queue()

    def _launch(self, handle: WorkerHandle) -> None:
        inbox, cancel = self._ctx.Queue(), self._ctx.Event()
        process = self._ctx.Process(
            target=worker_main, name=f"storyfarm-worker-{handle.id}",
            args=(handle.id, self.preset, handle.group.device, inbox, self.outbox, cancel, self.threads,
                  self.expert_placement, handle.group.visible),
            daemon=True,
        )
        process.start()
        handle.runtime = _Process(process, inbox, cancel)

    def _send(self, handle: WorkerHandle, message) -> None:
        if isinstance(message, ShotTask):  # a fresh task starts uncancelled
            handle.runtime.cancel.clear()
        handle.runtime.inbox.put(message)

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        handle.runtime.cancel.set()

    def _alive(self, handle: WorkerHandle) -> bool:
        return handle.runtime is not None and handle.runtime.process.is_alive()

    def _kill(self, handle: WorkerHandle) -> bool:
        process = handle.runtime.process
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
        return not process.is_alive()

    def _exit_info(self, handle: WorkerHandle) -> str:
        process = handle.runtime.process
        return f" (pid {process.pid}, exit code {process.exitcode})"

    def _receive(self, timeout: float) -> list:
        out = []
        try:
            out.append(self.outbox.get(timeout=timeout))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out
