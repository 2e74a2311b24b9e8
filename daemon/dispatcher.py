"""The dispatcher: the daemon's one thread that moves shots between the store and the workers.

Each turn it (1) hands back to the queue the shots of workers that died (outcome `lost`: no retry
budget spent), (2) records what workers report (progress to the hub, results and artifacts to the
store in one transaction each), (3) forwards cancel requests to the worker running that shot, and
(4) gives runnable shots to idle workers. Placement is first come, first served by priority here;
the scheduler's policy (affinity, quotas, deadlines) plugs in at `_pick`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.events import EventHub
from storyfarm.daemon.observers import Observers
from storyfarm.daemon.store import JobStore
from storyfarm.daemon.store_records import ArtifactIn, StateError
from storyfarm.m2v.video import sha256_file
from storyfarm.scheduler.messages import Done, Failed, Progress, ShotTask
from storyfarm.scheduler.pool import WorkerPool

log = logging.getLogger(__name__)

STORY_LEVEL = {"story.mp4": "story_video", "contact_sheet.png": "contact_sheet", "manifest.json": "manifest"}


def artifact_kind(name: str) -> str:
    if name in STORY_LEVEL:
        return STORY_LEVEL[name]
    return "keyframe" if name.startswith("keyframes/") else "shot_video"


class Dispatcher(threading.Thread):
    def __init__(self, store: JobStore, pool: WorkerPool, artifacts: ArtifactStore, hub: EventHub, poll_s: float = 0.1,
                 observers: Observers | None = None):
        super().__init__(name="storyfarm-dispatcher", daemon=True)
        self.store, self.pool, self.artifacts, self.hub = store, pool, artifacts, hub
        self.observers = observers or Observers()
        self.poll_s = poll_s
        self.draining = False
        self._halt = threading.Event()
        self._tasks: dict[str, ShotTask] = {}  # in flight, by attempt id

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.turn()
            except Exception:  # noqa: BLE001 - the loop must survive a bad turn; the store is consistent
                log.exception("dispatcher turn failed")
                self._halt.wait(1.0)

    def turn(self) -> None:
        changed = False
        for task in self.pool.reap():
            self._finish(task.attempt_id, "lost", error="worker process died")
            changed = True
        for msg in self.pool.poll(self.poll_s):
            if isinstance(msg, Progress):
                task = self._tasks.get(msg.attempt_id)
                if task is not None:
                    self.hub.progress(task.story_id, msg.shot_index, msg.stage, msg.step, msg.total, msg.worker_id)
            elif isinstance(msg, Done):
                self._record_done(msg)
                changed = True
            elif isinstance(msg, Failed) and msg.attempt_id is not None:
                outcome = "cancelled" if msg.cancelled else ("lost" if msg.fatal else "failed")
                self._finish(msg.attempt_id, outcome, error=msg.error, retryable=msg.retryable)
                changed = True
        for worker in self.pool.workers.values():
            if worker.task is not None and self.store.cancel_requested(worker.task.shot_id):
                self.pool.cancel(worker.task.attempt_id)
        if not self.draining:
            changed |= self._assign()
        if changed:
            self.hub.changed()

    def cancel_running(self, story_id: str) -> None:
        """Tell the worker running a shot of `story_id` to stop at its next denoising step now,
        rather than at the dispatcher's next turn."""
        for worker in list(self.pool.workers.values()):
            task = worker.task
            if task is not None and task.story_id == story_id:
                self.pool.cancel(task.attempt_id)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _finish(self, attempt_id: str, outcome: str, **kw) -> None:
        task = self._tasks.pop(attempt_id, None)
        try:
            self.store.finish_attempt(attempt_id, outcome, **kw)
        except StateError as exc:  # already recorded (a late duplicate report)
            log.info("ignoring report for attempt %s: %s", attempt_id, exc)
        if task is not None:
            self.hub.clear(task.story_id)

    def _record_done(self, msg: Done) -> None:
        task = self._tasks.get(msg.attempt_id)
        if task is None:
            return
        story_dir = Path(task.story_dir)
        records = []
        for name in msg.files:
            path = story_dir / name
            records.append(ArtifactIn(
                name=name, kind=artifact_kind(name), path=str(path.relative_to(self.artifacts.data_dir)),
                size=path.stat().st_size, sha256=msg.entry["sha256"] if name == msg.entry["file"] else sha256_file(path),
                story_level=name in STORY_LEVEL or name.startswith("keyframes/"),
            ))
        self._finish(msg.attempt_id, "succeeded", artifacts=records, result=msg.entry)

    def _task_for(self, shot, story, attempt_id: str) -> ShotTask:
        """The ShotTask a worker renders for `shot` (one place builds it: assignment and re-renders)."""
        return ShotTask(
            attempt_id=attempt_id, story_id=shot.story_id, shot_id=shot.id, shot_index=shot.index,
            story_document=self.store.story_document(shot.story_id),
            story_dir=str(self.artifacts.story_dir(shot.story_id)),
            references_dir=str(self.artifacts.data_dir / "references" / story.payload_sha256),
            finish_story=shot.index == len(story.shots) - 1,
            entries=tuple(s.result for s in story.shots if s.index < shot.index and s.result is not None),
        )

    def _assign(self) -> bool:
        idle = self.pool.idle()
        assigned = False
        for shot in self.store.runnable_shots(limit=len(idle)) if idle else ():
            story = self.store.get_story(shot.story_id)
            worker = idle[0]
            try:
                attempt_id = self.store.start_attempt(shot.id, worker.id)
            except StateError:  # paused or cancelled since the query
                continue
            task = self._task_for(shot, story, attempt_id)
            self._tasks[attempt_id] = task
            self.pool.assign(idle.pop(0), task)
            assigned = True
            if not idle:
                break
        return assigned
