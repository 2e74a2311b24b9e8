"""The dispatcher: the daemon's one thread that moves shots between the store and the workers.

Each turn it (1) lets the executor supervise its workers and hands back to the queue the shots of
workers that died, froze or hit a CUDA error (outcome `lost`: no retry budget spent), (2) records
what workers report (progress to the hub, results and artifacts to the store in one transaction
each), (3) forwards cancel requests to the worker running that shot, and (4) asks the scheduler's
policy where the runnable shots go. The store is the truth: the policy's view is rebuilt from it
every turn, plus what only this thread knows (which worker holds which story's memory, what each
running shot was estimated to take). An out-of-memory failure is retried in low-memory mode
(experts swapped, VAE tiled) on the shot's own allowance (lifecycle.OOM_RETRIES, kept by the store,
not taken from `max_attempts`) and then fails the shot with that reason.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.events import EventHub
from storyfarm.daemon.observers import Observers
from storyfarm.daemon.store import JobStore
from storyfarm.daemon.store_records import FINAL, ArtifactIn, StateError
from storyfarm.story.files import sha256_file
from storyfarm.story.lifecycle import RENDER_STAGES
from storyfarm.story.numbering import shot_label
from storyfarm.scheduler.gpu_pool.executor import Executor
from storyfarm.scheduler.gpu_pool.faults import crash_point
from storyfarm.scheduler.gpu_pool.messages import Done, Failed, StageUpdate, ShotTask
from storyfarm.scheduler.policy import CostModel, PolicyConfig, Scheduler, StoryWork, remaining_shot_s
from storyfarm.scheduler.simulate import project_finish

log = logging.getLogger(__name__)

STORY_LEVEL = {"story.mp4": "story_video", "contact_sheet.png": "contact_sheet", "manifest.json": "manifest"}
POST_DENOISE = RENDER_STAGES[RENDER_STAGES.index("denoise") + 1:]
ETA_EVERY_S = 10.0  # the projection runs this often, and sooner (at most once a second) when a
ETA_SOONEST_S = 1.0  # story without an ETA starts or is asked about


def artifact_kind(name: str) -> str:
    if name in STORY_LEVEL:
        return STORY_LEVEL[name]
    return "keyframe" if name.startswith("keyframes/") else "shot_video"


class Dispatcher(threading.Thread):
    def __init__(self, store: JobStore, executor: Executor, artifacts: ArtifactStore, hub: EventHub, poll_s: float = 0.1,
                 observers: Observers | None = None, policy: PolicyConfig | None = None, cost: CostModel | None = None,
                 xid_watcher=None):
        super().__init__(name="storyfarm-dispatcher", daemon=True)
        self.store, self.executor, self.artifacts, self.hub = store, executor, artifacts, hub
        self.poll_s = poll_s
        self.observers = observers or Observers()
        self.policy = policy or PolicyConfig()
        self.cost = cost or CostModel()
        self.xid_watcher = xid_watcher
        self.executor.on_event = self.observers.worker_event
        self.draining = False  # the whole daemon: no shot starts anywhere
        self.drained: set[str] = set()  # single workers drained (a GPU taken out): no shot starts there
        self.turns = 0  # turns completed: a drain is complete once a turn has seen it and no drained worker is busy
        self._halt = threading.Event()
        self._tasks: dict[str, ShotTask] = {}  # in flight, by attempt id
        self._running: dict[str, dict] = {}  # attempt id -> project, priority, started, estimate, worker
        self._holders: dict[str, tuple[str, int]] = {}  # story id -> (worker id, generation) holding its memory
        self._etas: dict[str, float] = {}  # story id -> expected finish (unix time)
        self._batch_etas: dict[str, float] = {}  # batch id -> its latest story's expected finish
        self._waits: dict[str, str] = {}  # story id -> why its next shot gets no worker (at the projection)
        self._eta_at = 0.0
        self._eta_stale = False  # a story lacks an ETA: project at the next turn allowed
        self._seq = store.last_event_seq()  # story ends after this are followed (not history)
        self._lock = threading.Lock()  # guards what farm_snapshot reads from other threads

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
        for task, reason in self.executor.supervise():
            self._finish(task.attempt_id, "lost", reason, error=f"{reason.replace('_', ' ')}: worker replaced")
            changed = True
        if self.xid_watcher is not None:
            for gpu, xid in self.xid_watcher.poll():
                log.error("GPU %d reported Xid %d: replacing its worker", gpu, xid)
                for task, reason in self.executor.gpu_fault(gpu, xid):
                    self._finish(task.attempt_id, "lost", reason, error=f"GPU {gpu} reported Xid {xid}")
                changed = True
        for msg in self.executor.poll(self.poll_s):
            if isinstance(msg, StageUpdate):
                task = self._tasks.get(msg.attempt_id)
                if task is not None:
                    self.hub.progress(task.story_id, msg.shot_index, msg.stage, msg.step, msg.total, msg.worker_id)
                    self._note_stage(msg)
            elif isinstance(msg, Done):
                self._record_done(msg)
                changed = True
            elif isinstance(msg, Failed) and msg.attempt_id is not None:
                self._record_failed(msg)
                changed = True
        for worker in list(self.executor.workers.values()):
            if worker.task is not None and self.store.cancel_requested(worker.task.shot_id):
                self.executor.cancel(worker.task.attempt_id)
        if not self.draining:
            changed |= self._assign()
        self._follow_story_ends()
        now = time.time()
        if now - self._eta_at > (ETA_SOONEST_S if self._eta_stale else ETA_EVERY_S):
            self._project_etas(now)
        self.turns += 1
        if changed:
            self.hub.changed()

    def cancel_running(self, story_id: str) -> None:
        """Tell the worker running a shot of `story_id` to stop at its next denoising step now,
        rather than at the dispatcher's next turn."""
        for worker in list(self.executor.workers.values()):
            task = worker.task
            if task is not None and task.story_id == story_id:
                self.executor.cancel(task.attempt_id)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _finish(self, attempt_id: str, outcome: str, reason: str, report: Done | Failed | None = None, **kw) -> None:
        task = self._tasks.pop(attempt_id, None)
        with self._lock:
            meta = self._running.pop(attempt_id, None)
        try:
            shot = self.store.finish_attempt(attempt_id, outcome, reason=None if outcome == "succeeded" else reason, **kw)
        except StateError as exc:  # already recorded (a late duplicate report)
            log.info("ignoring report for attempt %s: %s", attempt_id, exc)
            return
        if task is None:
            return
        self.hub.clear(task.story_id)
        project = meta["project"] if meta else ""
        worker_id = meta["worker"] if meta else ""
        self.observers.attempt_finished(task, worker_id=worker_id, project=project, outcome=outcome, reason=reason,
                                        report=report, shot_state=shot.state)
        if outcome == "lost":
            self._holders.pop(task.story_id, None)  # its worker is gone, and its memory with it

    def _story_ended(self, story, state: str, ended: float) -> None:
        """`state` and `ended`: the final state and its time as the event recorded them (the story
        may have moved on since: a re-render can be requested before this turn reads it)."""
        self._holders.pop(story.id, None)
        self._etas.pop(story.id, None)
        self._eta_stale = True  # its batch's ETA no longer counts it
        self.executor.release(str(self.artifacts.story_dir(story.id)))
        reason = "ok" if state == "succeeded" else (story.error or state).split(":")[0][:60]
        rerendered_at = self.store.rerender_requested_at(story.id, ended)
        if rerendered_at is None:
            self.observers.story_finished(story.id, project=story.project, state=state, reason=reason,
                                          seconds=ended - story.created_at)
        else:  # a new take of a finished story: not a story finished again, and timed from its request
            self.observers.rerender_finished(story.id, project=story.project, state=state, reason=reason,
                                             seconds=ended - rerendered_at)

    def _follow_story_ends(self) -> None:
        """Every story that reached a final state since the last turn, however it got there (its
        last shot, a failure, a cancel while queued or paused, a batch cancel): free its memory on
        the workers and tell the observers, once."""
        while True:
            events = self.store.events_since(None, self._seq, limit=500)
            for event in events:
                self._seq = event.seq
                if event.kind == "story_state" and event.payload.get("to") in FINAL:
                    story = self.store.get_story(event.story_id)
                    if story is not None:
                        self._story_ended(story, event.payload["to"], event.time)
            if len(events) < 500:
                return

    def _record_done(self, msg: Done) -> None:
        crash_point("after_publish_before_commit")
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
        worker = self.executor.workers.get(msg.worker_id)
        if worker is not None:
            self._holders[task.story_id] = (worker.id, worker.generation)
        memory_frames = int(msg.stats.get("memory_frames", len(msg.entry.get("memory_keyframes", []))))
        if msg.seconds > 0:
            self.cost = self.cost.learned(memory_frames, msg.seconds)
        self._finish(msg.attempt_id, "succeeded", "ok", msg, artifacts=records, result=msg.entry)

    def _record_failed(self, msg: Failed) -> None:
        task = self._tasks.get(msg.attempt_id)
        if msg.cancelled:
            self._finish(msg.attempt_id, "cancelled", "cancelled", msg, error=msg.error, retryable=False)
        elif msg.fatal:  # the worker is being replaced: an infrastructure failure
            self._finish(msg.attempt_id, "lost", msg.reason or "cuda_error", msg, error=msg.error)
        elif msg.reason == "out_of_memory":  # the store decides: a low-memory retry, or the shot fails
            mode = " with low-memory settings" if task is not None and task.low_memory else ""
            self._finish(msg.attempt_id, "failed", "out_of_memory", msg, retryable=True,
                         error=f"out_of_memory in {msg.stage or 'unknown stage'}{mode}: {msg.error}")
        else:
            self._finish(msg.attempt_id, "failed", msg.reason or "content", msg, error=msg.error, retryable=msg.retryable)

    # -- placement -------------------------------------------------------------------------------
    def _task_for(self, shot, story, attempt_id: str) -> ShotTask:
        """The ShotTask a worker renders for `shot` (one place builds it: assignment and re-renders)."""
        return ShotTask(
            attempt_id=attempt_id, story_id=shot.story_id, shot_id=shot.id, shot_index=shot.index,
            story_document=self.store.story_document(shot.story_id),
            story_dir=str(self.artifacts.story_dir(shot.story_id)),
            references_dir=str(self.artifacts.data_dir / "references" / story.payload_sha256),
            # the last shot left to render assembles the story: the last shot of a first render, a
            # re-rendered shot (or the end of its cascade) whose other shots have all succeeded
            finish_story=all(s.state == "succeeded" for s in story.shots if s.index != shot.index),
            entries=tuple(s.result for s in story.shots if s.index != shot.index and s.result is not None),
            edit=shot.render_edit(),
            low_memory=shot.low_memory,
            story_name=story.name,
        )

    def _scheduler(self, work: list[dict], now: float) -> Scheduler:
        """The policy's view of the farm right now, rebuilt from the store and this thread's state."""
        sched = Scheduler(self.policy, self.cost)
        # a drained worker takes no new shot, but the shot it finishes is still running; a drain of
        # the whole daemon is maintenance: projected as if it ended now (placement is off meanwhile)
        workers = {w.id: w for w in self.executor.workers.values()
                   if w.state == "busy" or (w.state == "idle" and w.id not in self.drained)}
        running_story = {w.task.story_id: w for w in workers.values() if w.task is not None}
        for row in work:
            holder = self._holders.get(row["id"])
            if holder is not None and (holder[0] not in workers or workers[holder[0]].generation != holder[1]):
                holder = None  # the worker that held it was replaced: the memory is on disk only
            running = running_story.get(row["id"])
            next_index = (running.task.shot_index if running is not None
                          else row["queued_index"] if row["queued_index"] is not None else row["done"] or 0)
            runnable = row["queued_index"] is not None or running is not None
            sched.add_story(StoryWork(
                row["id"], project=row["project"], priority=row["priority"], deadline=row["deadline"],
                submitted_at=row["created_at"], total_shots=row["total"], next_index=min(next_index, row["total"]),
                holder=holder[0] if holder else None, started=row["state"] != "queued" or bool(row["done"]),
                held=row["state"] == "paused" or not runnable,
            ))
        with self._lock:
            meta = {m["worker"]: m for m in self._running.values()}
        known = set(sched.story_ids())
        for worker_id in sorted(workers):
            worker = workers[worker_id]
            busy = worker.task.story_id if worker.task is not None else None
            if busy is not None and busy not in known:
                continue  # finishing a shot of a story that has ended: not available for placement
            m = meta.get(worker_id)
            until = now + 1.0 if m is None else now + self._shot_remaining(m, now)
            sched.add_worker(worker_id, busy_with=busy, busy_until=until)
        return sched

    def is_drained(self, worker_id: str) -> bool:
        return self.draining or worker_id in self.drained

    def drained_busy(self) -> list[str]:
        """Workers that are drained and still rendering a shot (a drain is complete when empty)."""
        return [w.id for w in self.executor.workers.values() if w.state == "busy" and self.is_drained(w.id)]

    def _assign(self) -> bool:
        if not any(w.id not in self.drained for w in self.executor.idle()):
            return False
        now = time.time()
        work = self.store.unfinished_work()
        if not any(row["queued_shot_id"] for row in work):
            return False
        by_id = {row["id"]: row for row in work}
        decision = self._scheduler(work, now).schedule(now)
        for p in decision.preemptions:
            log.info("story %s waits: worker %s holding its memory went to higher-ranked story %s",
                     p.story_id, p.worker_id, p.by_story_id)
        assigned = False
        for a in decision.assignments:
            row = by_id[a.story_id]
            worker = self.executor.workers[a.worker_id]
            if worker.state != "idle" or self.is_drained(worker.id) or row["queued_shot_id"] is None:
                continue  # a Drain may have landed since the policy decided
            try:
                attempt_id = self.store.start_attempt(row["queued_shot_id"], worker.id)
            except StateError:  # paused or cancelled since the query
                continue
            story = self.store.get_story(a.story_id)
            shot = next(s for s in story.shots if s.id == row["queued_shot_id"])
            task = self._task_for(shot, story, attempt_id)
            self._tasks[attempt_id] = task
            with self._lock:
                self._running[attempt_id] = {"project": row["project"], "priority": row["priority"], "started": now,
                                             "estimate": a.estimated_s, "worker": worker.id, "story": a.story_id}
            self.executor.assign(worker, task)
            self._eta_stale |= a.story_id not in self._etas
            self.observers.attempt_started(task, worker_id=worker.id, project=row["project"], priority=row["priority"],
                                           queue_wait_s=max(0.0, now - (row["queued_at"] or now)), placement=a.placement)
            assigned = True
        return assigned

    def _project_etas(self, now: float) -> None:
        """Expected finish of every unfinished story (growth of cost with memory included), played
        forward by the policy itself; batches report the latest of their stories."""
        self._eta_at, self._eta_stale = now, False
        work = self.store.unfinished_work()
        if not work:
            self._etas, self._batch_etas, self._waits = {}, {}, {}
            return
        sched = self._scheduler(work, now)
        self._waits = {row["id"]: reason for row in work if (reason := self._wait_reason(sched, row, now))}
        for row in work:  # paused stories still count toward their batch, as if resumed now
            if row["state"] == "paused":
                sched.hold(row["id"], False)
        etas = project_finish(sched, self.cost, self.policy.expert_placement == "pipeline", now)
        batches: dict[str, float] = {}
        for row in work:
            if row["batch_id"] and row["id"] in etas:
                batches[row["batch_id"]] = max(batches.get(row["batch_id"], 0.0), etas[row["id"]])
        self._etas, self._batch_etas = etas, batches

    def _wait_reason(self, sched: Scheduler, row: dict, now: float) -> str | None:
        """The policy's reason, with "held" made specific from the store's view."""
        reason = sched.wait_reason(row["id"], now)
        if reason != "held":
            return reason
        if row["state"] == "paused":
            return "paused"
        return f"{shot_label(row['done'] or 0)} waits for the shot before it"

    # -- views -----------------------------------------------------------------------------------
    def wait_reason(self, story_id: str) -> str | None:
        """Why an unfinished story's next shot is not running (as of the last projection), or None."""
        return self._waits.get(story_id)

    def etas(self, story_id: str) -> tuple[float | None, float | None]:
        """(story, running shot) expected finishes of an unfinished story (unix time), from one
        reading: the story's is the projection, never before the end of its running shot (which
        steps refine between projections); None until the next projection, which a miss brings
        forward (at most one a second, however often asked). The shot's is None when none runs."""
        projected, shot = self._known(self._etas.get(story_id)), self.shot_eta(story_id)
        return (projected if shot is None or projected is None else max(projected, shot)), shot

    def shot_eta(self, story_id: str) -> float | None:
        """Expected finish (unix time) of the shot of `story_id` running now; None when none runs."""
        now = time.time()
        with self._lock:
            meta = next((dict(m) for m in self._running.values() if m["story"] == story_id), None)
        return None if meta is None else now + self._shot_remaining(meta, now)

    def _note_stage(self, msg: StageUpdate) -> None:
        """Keep the attempt's denoising pace: its last step, or all its steps once past denoising."""
        with self._lock:
            meta = self._running.get(msg.attempt_id)
            if meta is None:
                return
            if msg.stage == "denoise" and msg.total:
                meta["steps"] = (msg.step, msg.total)
            elif msg.stage in POST_DENOISE and meta.get("steps"):
                meta["steps"] = (meta["steps"][1], meta["steps"][1])

    def _shot_remaining(self, meta: dict, now: float) -> float:
        """Seconds left in a running attempt: its estimate, refined by its denoising steps so far."""
        step, total = meta.get("steps") or (0, 0)
        return remaining_shot_s(meta["estimate"], now - meta["started"], step, total)

    def batch_eta(self, batch_id: str) -> float | None:
        """Expected finish of a batch's last unfinished story (unix time), as for `eta`."""
        return self._known(self._batch_etas.get(batch_id))

    def _known(self, eta: float | None) -> float | None:
        if eta is None:
            self._eta_stale = True
        return eta

    def farm_snapshot(self) -> dict:
        """What the metrics and GetPool read from other threads: workers, quota use, batch ETAs."""
        with self._lock:
            running = [dict(m) for m in self._running.values()]
        used: dict[str, int] = {}
        for m in running:
            used[m["project"]] = used.get(m["project"], 0) + 1
        projects = {}
        for name in sorted(set(used) | set(self.policy.projects)):
            quota = self.policy.quota(name)
            projects[name] = {"running": used.get(name, 0), "guaranteed": quota.guaranteed, "burst": quota.burst}
        etas = self._batch_etas
        batches = [{"batch_id": batch_id, "deadline": deadline, "eta": etas.get(batch_id)}
                   for batch_id, _open, deadline in self.store.open_batches()]
        return {"workers": self.executor.snapshot(), "projects": projects, "batches": batches,
                "cost_base_s": self.cost.base_s}
