"""The `mp` executor: spawned render processes on this host, one per device group.

The parent never imports torch: it spawns workers (the `spawn` start method, so no CUDA state is
ever forked), hands each one task at a time through its own queue, and cancels through a
per-worker Event the worker checks at every step. Each worker answers on a pipe of its own, never
on a queue shared with the others: a worker SIGKILLed in the middle of a write would otherwise die
holding the shared queue's lock and silence every other worker. A pipe has one writer; a torn
message ends in EOF for that worker alone. Supervision (heartbeats, replacement, out of service)
is the Executor's. The spawn target is worker_loop.worker_main, which imports what
`worker_factory` names only in the child, so this module pulls no model code into the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from storyfarm.scheduler.gpu_pool.executor import DeviceGroup, Executor, WorkerHandle
from storyfarm.scheduler.gpu_pool.messages import ShotTask
from storyfarm.scheduler.gpu_pool.worker_loop import worker_main


@dataclass
class _Process:
    process: object
    inbox: object
    cancel: object
    replies: object  # the read end of the worker's own pipe


class ProcessExecutor(Executor):
    kind = "mp"

    def __init__(self, preset: str, groups: list[DeviceGroup] | list[str], **kwargs):
        groups = [g if isinstance(g, DeviceGroup) else DeviceGroup(f"{g}#{n}", g) for n, g in enumerate(groups)]
        super().__init__(preset, groups, **kwargs)
        self.threads = self.threads or max(1, (os.cpu_count() or 1) // len(groups))
        self._ctx = mp.get_context("spawn")

    def _launch(self, handle: WorkerHandle) -> None:
        inbox, cancel = self._ctx.Queue(), self._ctx.Event()
        replies, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=worker_main, name=f"storyfarm-worker-{handle.id}",
            args=(handle.id, self.preset, handle.group.device, inbox, writer, cancel, self.threads,
                  self.expert_placement, handle.group.visible, self.worker_factory),
            daemon=True,
        )
        process.start()
        writer.close()  # the worker holds the only write end: its death reads as EOF here
        handle.runtime = _Process(process, inbox, cancel, replies)

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
        handle.runtime.replies.close()  # whatever it had half-written goes with it
        return not process.is_alive()

    def _exit_info(self, handle: WorkerHandle) -> str:
        process = handle.runtime.process
        return f" (pid {process.pid}, exit code {process.exitcode})"

    def _receive(self, timeout: float) -> list:
        pipes = {h.runtime.replies: h for h in self.workers.values()
                 if h.runtime is not None and not h.runtime.replies.closed}
        out = []
        for pipe in wait(list(pipes), timeout=timeout) if pipes else ():
            try:
                while pipe.poll():
                    out.append(pipe.recv())
            except (EOFError, OSError):  # the worker died (mid-message, maybe): supervise() replaces it
                pipe.close()
        if not pipes:
            time.sleep(timeout)
        return out
