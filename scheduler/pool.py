"""The worker pool: spawned render processes, one per device group, supervised from the parent.

The parent never imports torch: it spawns workers (the `spawn` start method, so no CUDA state is
ever forked), hands each one task at a time, reads their messages from one shared queue, and
notices deaths. Only workers that said Ready get work. A worker that died or hit a fatal error is
replaced by a new process, never reused; the task it held is handed back to the caller as lost
(an infrastructure failure, which does not spend the shot's retry budget).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass

from storyfarm.scheduler.messages import Done, Failed, Ready, ShotTask
from storyfarm.scheduler.worker import worker_main

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    id: str
    device: str
    process: object
    inbox: object
    cancel: object
    state: str = "starting"  # starting | idle | busy | dead
    task: ShotTask | None = None
    resident_stories: int = 0
    generation: int = 0
    started_at: float = 0.0

    def snapshot(self) -> dict:
        return {
            "id": self.id, "device": self.device, "state": self.state, "pid": self.process.pid,
            "story_id": self.task.story_id if self.task else None,
            "shot_index": self.task.shot_index if self.task else None,
            "resident_stories": self.resident_stories,
        }


class WorkerPool:
    def __init__(self, preset: str, devices: list[str], threads: int | None = None):
        if not devices:
            raise ValueError("a worker pool needs at least one device")
        self.preset = preset
        self.devices = devices
        self.threads = threads or max(1, (os.cpu_count() or 1) // len(devices))
        self._ctx = mp.get_context("spawn")
        self.outbox = self._ctx.Queue()
        self.workers: dict[str, WorkerHandle] = {}
        self.restarts = 0
        self.stopping = False  # once stopping, dead workers are not replaced

    def start(self) -> None:
        for n, device in enumerate(self.devices):
            self._spawn(f"w{n}", device, 0)

    def _spawn(self, worker_id: str, device: str, generation: int) -> WorkerHandle:
        inbox, cancel = self._ctx.Queue(), self._ctx.Event()
        process = self._ctx.Process(
            target=worker_main, name=f"storyfarm-worker-{worker_id}",
            args=(worker_id, self.preset, device, inbox, self.outbox, cancel, self.threads), daemon=True,
        )
        process.start()
        handle = WorkerHandle(worker_id, device, process, inbox, cancel, generation=generation, started_at=time.time())
        self.workers[worker_id] = handle
        log.info("worker %s starting on %s (pid %s)", worker_id, device, process.pid)
        return handle

    @property
    def ready(self) -> bool:
        return any(w.state in ("idle", "busy") for w in self.workers.values())

    def idle(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state == "idle"]

    def assign(self, worker: WorkerHandle, task: ShotTask) -> None:
        if worker.state != "idle":
            raise RuntimeError(f"worker {worker.id} is {worker.state}, not idle")
        worker.cancel.clear()
        worker.state, worker.task = "busy", task
        worker.inbox.put(task)

    def cancel(self, attempt_id: str) -> bool:
        for w in self.workers.values():
            if w.task is not None and w.task.attempt_id == attempt_id:
                w.cancel.set()
                return True
        return False

    def poll(self, timeout: float = 0.1) -> list:
        """Messages from workers; updates worker states. Messages for tasks a worker no longer
        holds (it was replaced) are dropped."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.outbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            worker = self.workers.get(msg.worker_id)
            if worker is None or worker.state == "dead":
                continue
            if isinstance(msg, Ready):
                worker.state = "idle"
                log.info("worker %s ready on %s (%.1fs)", msg.worker_id, msg.device, msg.load_seconds)
            elif isinstance(msg, (Done, Failed)):
                if msg.attempt_id is not None and (worker.task is None or worker.task.attempt_id != msg.attempt_id):
                    continue
                worker.task = None
                worker.state = "idle"
                if isinstance(msg, Done):
                    worker.resident_stories = msg.resident_stories
                if isinstance(msg, Failed) and msg.fatal:
                    self._replace(worker)
            elif worker.task is None or getattr(msg, "attempt_id", None) != worker.task.attempt_id:
                continue
            out.append(msg)
            if time.monotonic() >= deadline:
                break
        return out

    def reap(self) -> list[ShotTask]:
        """Replace workers whose process died; return the tasks they held (lost, to re-queue)."""
        lost = []
        for worker in list(self.workers.values()):
            if worker.state != "dead" and not worker.process.is_alive():
                log.warning("worker %s (pid %s) died with exit code %s", worker.id, worker.process.pid, worker.process.exitcode)
                if worker.task is not None:
                    lost.append(worker.task)
                self._replace(worker)
        return lost

    def _replace(self, worker: WorkerHandle) -> None:
        worker.state, worker.task = "dead", None
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        if self.stopping:
            return
        self.restarts += 1
        self._spawn(worker.id, worker.device, worker.generation + 1)

    def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        for w in self.workers.values():
            if w.process.is_alive():
                w.inbox.put(None)
        deadline = time.monotonic() + grace
        for w in self.workers.values():
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.state = "dead"

    def snapshot(self) -> list[dict]:
        return [w.snapshot() for w in self.workers.values()]
