"""storyfarm.v1.RenderService: translates messages to store, artifact and pool calls.

No scheduling or rendering happens here. Each handler checks the caller's project against the
principal the auth interceptor set, calls one store operation (one transaction), and converts the
result; every refusal is a rich status from daemon.errors. Watches replay durable events from the
store's log (resumable by seq) and add live per-step progress and heartbeats from the event hub.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import re
import time
from pathlib import Path

import grpc

from storyfarm.daemon import convert
from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.auth import PermissionDenied, current_principal
from storyfarm.daemon.config import DaemonConfig
from storyfarm.daemon.downloads import artifact_chunks
from storyfarm.daemon.errors import RpcError, invalid, not_found, precondition
from storyfarm.daemon.events import EventHub
from storyfarm.daemon.rerender import check_edit, check_shot_index, check_strength, rerender
from storyfarm.daemon.store import JobStore
from storyfarm.daemon.pool_view import add_workers
from storyfarm.daemon.previews import keyframe_previews
from storyfarm.daemon.store_records import IdempotencyConflict, NotFound, StateError
from storyfarm.daemon.submit import check_submit, store_references
from storyfarm.story.lifecycle import FINAL_STATES as FINAL
from storyfarm.story.presets import Preset
from storyfarm.scheduler.gpu_pool.faults import crash_point
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "default"
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # as auth.tokens[].project
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
MAX_LABELS, MAX_LABEL_VALUE, PRIORITY = 64, 63, (-100, 100)


def check_labels(labels, prefix: str = "") -> None:
    """The label rules of SubmitStoryRequest.labels, with the field path of the first label broken."""
    if len(labels) > MAX_LABELS:
        raise invalid("too many labels", "INVALID_LABEL", [(f"{prefix}labels", f"{len(labels)} labels; at most {MAX_LABELS}")])
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise invalid("bad label", "INVALID_LABEL", [(f'{prefix}labels["{key}"]', "keys: 1-63 lower-case letters, digits, "
                                                          f"'_', '-', starting with a letter; values: up to {MAX_LABEL_VALUE} printable characters")])


def check_priority(priority: int, field: str = "priority") -> None:
    if not PRIORITY[0] <= priority <= PRIORITY[1]:
        raise invalid(f"priority {priority} is out of range", "INVALID_ARGUMENT", [(field, f"{PRIORITY[0]} to {PRIORITY[1]}")])


def check_cancel_reason(reason: str) -> str | None:
    """A cancel's reason (recorded as the story's error): one line of at most 200 characters."""
    reason = reason.strip()
    if len(reason) > 200 or "\n" in reason:
        raise invalid("the cancel reason is one line of at most 200 characters", "INVALID_ARGUMENT",
                      [("reason", f"{len(reason)} characters; one line of at most 200")])
    return reason or None


def _rpc(handler):
    """Run a unary or streaming handler, turning RpcError and store errors into rich statuses."""

    def translate(exc) -> RpcError:
        if isinstance(exc, RpcError):
            return exc
        if isinstance(exc, NotFound):
            return RpcError(grpc.StatusCode.NOT_FOUND, str(exc), "STORY_NOT_FOUND")
        if isinstance(exc, StateError):
            return precondition(str(exc), "STORY_FINISHED")
        if isinstance(exc, PermissionDenied):
            return RpcError(grpc.StatusCode.PERMISSION_DENIED, str(exc), "PROJECT_FORBIDDEN")
        raise exc

    @functools.wraps(handler)
    def unary(self, request, context):
        try:
            return handler(self, request, context)
        except (RpcError, NotFound, StateError, PermissionDenied) as exc:
            context.abort_with_status(translate(exc).status())

    @functools.wraps(handler)
    def stream(self, request, context):
        try:
            yield from handler(self, request, context)
        except (RpcError, NotFound, StateError, PermissionDenied) as exc:
            context.abort_with_status(translate(exc).status())

    return stream if inspect.isgeneratorfunction(handler) else unary


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, config: DaemonConfig, preset: Preset, store: JobStore, artifacts: ArtifactStore,
                 hub: EventHub, dispatcher=None, heartbeat_s: float = 5.0, metrics=None):
        self.config, self.preset, self.store, self.artifacts, self.hub = config, preset, store, artifacts, hub
        self.dispatcher = dispatcher
        self.metrics = metrics  # DaemonMetrics: counts accepted stories (idempotent repeats are not new work)
        self.heartbeat_s = heartbeat_s
        self.accepting = True

    # -- helpers -------------------------------------------------------------------------------
    def _project_for(self, requested: str) -> str:
        principal = current_principal()
        project = requested or (principal.project if principal and principal.project not in ("*", None) else DEFAULT_PROJECT)
        if principal is not None and not principal.covers(project):
            raise PermissionDenied(f"token {principal.name!r} may not act on project {project!r}")
        return project

    def _story(self, story_id: str):
        if not story_id:
            raise invalid("story_id is required", "STORY_NOT_FOUND", [("story_id", "a story id such as st_0123456789abcdef")])
        record = self.store.get_story(story_id)
        if record is None or not self._may_see(record.project):  # another project's id reads as unknown
            raise not_found("story", story_id, "STORY_NOT_FOUND")
        return record

    @staticmethod
    def _may_see(project: str) -> bool:
        principal = current_principal()
        return principal is None or principal.covers(project)

    def _story_message(self, record, full=True) -> pb.Story:
        msg = convert.story(record, self.hub.latest(record.id), full=full, preset=self.preset.name)
        if self.dispatcher is None or record.state in FINAL:
            return msg
        if not any(s.state == "running" for s in record.shots):
            msg.waiting_reason = "paused" if record.state == "paused" else self.dispatcher.wait_reason(record.id) or ""
        if record.state != "paused":  # a paused story has no ETA
            now, (story_eta, shot_eta) = time.time(), self.dispatcher.etas(record.id)
            convert.set_eta(msg.eta, story_eta, now)
            running = next((s for s in msg.shots if s.HasField("progress")), None)
            if running is not None:
                convert.set_eta(running.progress.eta, shot_eta, now)
        return msg

    # -- submit --------------------------------------------------------------------------------
    def _check(self, request, project: str, prefix: str = ""):
        """Validate one SubmitStoryRequest; field paths get `prefix` (e.g. `stories[2].`)."""
        if not request.request_id or len(request.request_id) > 128:
            raise invalid("request_id is required", "INVALID_STORY", [(f"{prefix}request_id", "1 to 128 characters, chosen by the client")])
        if request.preset and request.preset != self.preset.name:
            raise invalid(f"preset {request.preset!r} is not served here", "UNKNOWN_PRESET", [(f"{prefix}preset", f"this daemon serves {self.preset.name}")])
        if not PROJECT.fullmatch(project):
            raise invalid("bad project name", "INVALID_STORY", [("project", "1-64 letters, digits, '.', '_', '-', starting with a letter or digit")])
        check_labels(request.labels, prefix)
        check_priority(request.priority, f"{prefix}priority")
        try:
            return check_submit(request, self.preset, self.config.limits)
        except RpcError as exc:
            exc.fields = [(prefix + f, d) for f, d in exc.fields]
            raise

    def _commit(self, request, checked, project: str, *, batch_id=None, deadline=None, labels=None) -> pb.SubmitStoryResponse:
        store_references(checked, Path(self.config.data_dir))
        if deadline is None and request.HasField("deadline_time"):
            deadline = request.deadline_time.ToNanoseconds() / 1e9
        labels = {**(labels or {}), **request.labels}
        fingerprint = hashlib.sha256(json.dumps(
            [checked.payload_sha256, request.priority, sorted(labels.items()), deadline, batch_id, self.preset.name]
        ).encode()).hexdigest()
        try:
            result = self.store.submit_story(
                request.request_id, project, checked.payload_sha256, checked.story.name or "story", checked.document,
                checked.shots, priority=request.priority, labels=labels, deadline=deadline,
                batch_id=batch_id, request_sha256=fingerprint,
            )
        except IdempotencyConflict as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc), "IDEMPOTENCY_CONFLICT",
                           fields=[("request_id", f"already used for story {exc.story_id} with another story, "
                                                  "images, priority, labels, deadline or preset")]) from None
        crash_point("after_submit_commit")  # reliability suite: committed, not yet acknowledged
        if result.created and self.metrics is not None:
            self.metrics.story_submitted(project, len(checked.shots))
        return pb.SubmitStoryResponse(story_id=result.story_id, created=result.created, shot_count=len(checked.shots),
                                      warnings=list(checked.story.warnings))

    def _refuse_when_stopping(self):
        if not self.accepting:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down", "SHUTTING_DOWN", retry_after=5.0)

    @_rpc
    def SubmitStory(self, request, context):
        self._refuse_when_stopping()
        project = self._project_for(request.project)
        checked = self._check(request, project)
        if request.validate_only:
            return pb.SubmitStoryResponse(shot_count=len(checked.shots), warnings=list(checked.story.warnings))
        response = self._commit(request, checked, project)
        self.hub.changed()
        return response

    # -- batches -------------------------------------------------------------------------------
    def _batch(self, batch_id: str) -> pb.Batch:
        try:
            summary = self.store.batch_summary(batch_id)
        except NotFound:
            raise not_found("batch", batch_id, "BATCH_NOT_FOUND") from None
        if summary.total == 0:
            raise not_found("batch", batch_id, "BATCH_NOT_FOUND")
        first = self.store.list_stories(batch_id=batch_id, page_size=1)[0][0]
        if not self._may_see(first.project):
            raise not_found("batch", batch_id, "BATCH_NOT_FOUND")
        batch = pb.Batch(batch_id=batch_id, project=first.project, deadline_time=convert.timestamp(summary.deadline),
                         create_time=convert.timestamp(first.created_at), story_count=summary.total,
                         done=all(summary.counts.get(state, 0) == 0 for state in summary.counts if state not in FINAL))
        for state, count in summary.counts.items():
            if count:
                batch.stories_by_state.add(state=convert.STORY_STATES[state], count=count)
        if self.dispatcher is not None and not batch.done:
            convert.set_eta(batch.eta, self.dispatcher.batch_eta(batch_id))
        return batch

    @_rpc
    def SubmitBatch(self, request, context):
        self._refuse_when_stopping()
        if not BATCH_ID.fullmatch(request.batch_id):
            raise invalid("bad batch id", "INVALID_BATCH_ID", [("batch_id", "1-100 letters, digits, '.', '_', '-'")])
        if not request.stories:
            raise invalid("empty batch", "INVALID_STORY", [("stories", "at least one story")])
        check_labels(request.labels)
        project = self._project_for(request.project)
        existing = self.store.list_stories(batch_id=request.batch_id, page_size=1)[0]
        if existing and existing[0].project != project:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"batch {request.batch_id} belongs to project {existing[0].project}",
                           "BATCH_CONFLICT", fields=[("batch_id", "already used by another project")])
        deadline = request.deadline_time.ToNanoseconds() / 1e9 if request.HasField("deadline_time") else None
        checked = [self._check(story, project, f"stories[{i}].") for i, story in enumerate(request.stories)]  # all or nothing
        response = pb.SubmitBatchResponse()
        if request.validate_only:
            response.stories.extend(pb.SubmitStoryResponse(shot_count=len(c.shots)) for c in checked)
            return response
        for story, check in zip(request.stories, checked):
            response.stories.append(self._commit(story, check, project, batch_id=request.batch_id, deadline=deadline,
                                                 labels=dict(request.labels)))
        self.hub.changed()
        response.batch.CopyFrom(self._batch(request.batch_id))
        return response

    @_rpc
    def GetBatch(self, request, context):
        return self._batch(request.batch_id)

    @_rpc
    def CancelBatch(self, request, context):
        self._batch(request.batch_id)  # exists, and the caller may act on its project
        self.store.cancel_batch(request.batch_id, reason=check_cancel_reason(request.reason))
        if self.dispatcher is not None:
            for story in self._batch_stories(request.batch_id):
                self.dispatcher.cancel_running(story)
        self.hub.changed()
        return self._batch(request.batch_id)

    def _batch_stories(self, batch_id: str) -> set[str]:
        ids, token = set(), None
        while True:
            records, token = self.store.list_stories(batch_id=batch_id, page_size=500, page_token=token)
            ids.update(r.id for r in records)
            if not token:
                return ids

    @_rpc
    def WatchBatch(self, request, context):
        seq = request.after_seq or self.store.last_event_seq()  # a new watch starts now, not at history's start
        batch = self._batch(request.batch_id)
        stories = self._batch_stories(request.batch_id)
        yield pb.StoryEvent(seq=seq, time=convert.timestamp(time.time()), batch_snapshot=batch)
        version = self.hub.version
        while context.is_active():
            for e in self.store.events_since(None, seq):
                seq = e.seq
                msg = convert.event(e) if e.story_id in stories else None
                if msg is not None:
                    yield msg
            batch = self._batch(request.batch_id)
            if batch.done:
                yield pb.StoryEvent(seq=seq, time=convert.timestamp(time.time()), batch_snapshot=batch)
                return
            version = self.hub.wait(version, timeout=min(1.0, self.heartbeat_s))

    # -- reading -------------------------------------------------------------------------------
    @_rpc
    def GetStory(self, request, context):
        return self._story_message(self._story(request.story_id), full=request.view != pb.STORY_VIEW_BASIC)

    @_rpc
    def ListStories(self, request, context):
        principal = current_principal()
        project = request.project or (None if principal is None or principal.project == "*" else principal.project)
        if project is not None:
            self._project_for(project)
        states = [convert.STORY_STATE_NAMES[s] for s in request.states if s in convert.STORY_STATE_NAMES] or None
        labels = list(request.labels.items())
        try:
            records, token = self.store.list_stories(
                project=project, states=states, batch_id=request.batch_id or None, label=labels[0] if labels else None,
                page_size=request.page_size or 50, page_token=request.page_token or None)
        except ValueError as exc:
            raise invalid(str(exc), "INVALID_PAGE_TOKEN", [("page_token", str(exc))]) from None
        records = [r for r in records if all(r.labels.get(k) == v for k, v in labels[1:])]
        full = request.view == pb.STORY_VIEW_FULL
        return pb.ListStoriesResponse(stories=[self._story_message(r, full) for r in records], next_page_token=token or "")

    @_rpc
    def ListArtifacts(self, request, context):
        record = self._story(request.story_id)
        kinds = set(request.kinds)
        out = [convert.artifact(a) for a in record.artifacts
               if (not request.HasField("shot_index") or a.shot_index == request.shot_index)
               and (not kinds or convert.KINDS.get(a.kind) in kinds)]
        return pb.ListArtifactsResponse(artifacts=out)

    @_rpc
    def DownloadArtifact(self, request, context):
        yield from artifact_chunks(self.artifacts, self._story(request.story_id), request)

    # -- control -------------------------------------------------------------------------------
    def _control(self, story_id: str, operation) -> pb.Story:
        self._story(story_id)
        record = operation(story_id)
        self.hub.changed()
        return self._story_message(record)

    @_rpc
    def CancelStory(self, request, context):
        reason = check_cancel_reason(request.reason)
        story = self._control(request.story_id, lambda sid: self.store.request_cancel(sid, reason=reason))
        if self.dispatcher is not None:
            self.dispatcher.cancel_running(request.story_id)
        return story

    @_rpc
    def PauseStory(self, request, context):
        return self._control(request.story_id, self.store.request_pause)

    @_rpc
    def ResumeStory(self, request, context):
        return self._control(request.story_id, self.store.resume)

    @_rpc
    def SetPriority(self, request, context):
        check_priority(request.priority)
        return self._control(request.story_id, lambda sid: self.store.set_priority(sid, request.priority))

    @_rpc
    def RetryShot(self, request, context):
        if request.rerender:  # the same path as RerenderShot, with the seed as its only change
            seed = request.seed if request.HasField("seed") else None
            return self._rerender(request.story_id, request.shot_index, check_edit(None, None, seed, self.config.limits.max_prompt_chars))
        if request.HasField("seed"):
            raise invalid("a seed is for a re-render", "INVALID_EDIT", [("seed", "set rerender to render a succeeded shot with another seed")])
        check_shot_index(self._story(request.story_id), request.shot_index)
        return self._control(request.story_id, lambda sid: self.store.retry_shot(sid, request.shot_index))

    @_rpc
    def RerenderShot(self, request, context):
        edit = check_edit(request.prompt if request.HasField("prompt") else None,
                          request.strength if request.HasField("strength") else None,
                          request.seed if request.HasField("seed") else None, self.config.limits.max_prompt_chars)
        return self._rerender(request.story_id, request.shot_index, edit, cascade=request.cascade,
                              request_id=request.request_id)

    def _rerender(self, story_id: str, index: int, edit, *, cascade: bool = False, request_id: str = "") -> pb.Story:
        record = self._story(story_id)
        check_strength(self.store, record, index, edit, self.preset,
                       Path(self.config.data_dir) / "references" / record.payload_sha256)
        record = rerender(self.store, record, index, edit, cascade=cascade, request_id=request_id)
        self.hub.changed()
        return self._story_message(record)

    # -- watching ------------------------------------------------------------------------------
    @_rpc
    def WatchStory(self, request, context):
        record = self._story(request.story_id)
        seq = request.after_seq
        if seq == 0:
            # seq first, then the snapshot: anything after seq is replayed, so nothing falls between
            seq = self.store.last_event_seq(record.id)
            record = self.store.get_story(record.id)
            yield pb.StoryEvent(seq=seq, time=convert.timestamp(time.time()), story_id=record.id,
                                snapshot=pb.Snapshot(story=self._story_message(record)))
        updates = self.hub.subscribe(record.id)
        try:
            yield from self._watch_loop(record.id, seq, updates, context, previews=request.include_previews)
        finally:
            self.hub.unsubscribe(record.id, updates)

    def _watch_loop(self, story_id: str, seq: int, updates, context, previews: bool = False):
        version, last_sent = self.hub.version, time.monotonic()
        while context.is_active():
            record = self.store.get_story(story_id)
            for e in self.store.events_since(story_id, seq):
                seq = e.seq
                msg = convert.event(e)
                if msg is None:
                    continue
                yield msg
                last_sent = time.monotonic()
                if previews and e.kind == "shot_state" and e.payload["to"] == "succeeded":
                    for preview in keyframe_previews(self.artifacts.story_dir(story_id), record, e.payload["index"]):
                        yield pb.StoryEvent(seq=seq, time=msg.time, story_id=story_id, keyframe_preview=preview)
            while updates:
                live = updates.popleft()
                progress = pb.Progress(shot_index=live.shot_index, stage=convert.STAGES.get(live.stage, 0),
                                       step=live.step, total_steps=live.total)
                if self.dispatcher is not None:  # the dispatcher's ETAs, the same GetStory reports
                    now, (story_eta, shot_eta) = time.time(), self.dispatcher.etas(story_id)
                    convert.set_eta(progress.shot_eta, shot_eta, now)
                    convert.set_eta(progress.eta, story_eta, now)
                yield pb.StoryEvent(seq=seq, time=convert.timestamp(live.time), story_id=story_id, progress=progress)
                last_sent = time.monotonic()
            if record.state in FINAL and not self.store.events_since(story_id, seq, limit=1):
                return
            if time.monotonic() - last_sent >= self.heartbeat_s:
                yield pb.StoryEvent(seq=seq, time=convert.timestamp(time.time()), story_id=story_id,
                                    heartbeat=pb.Heartbeat(server_time=convert.timestamp(time.time())))
                last_sent = time.monotonic()
            version = self.hub.wait(version, timeout=min(1.0, self.heartbeat_s))

    # -- pool ----------------------------------------------------------------------------------
    @_rpc
    def GetPool(self, request, context):
        response = pb.GetPoolResponse(draining=bool(self.dispatcher and self.dispatcher.draining))
        if self.dispatcher is not None:
            add_workers(response.workers, self.dispatcher, self.hub, self.preset.name)
        for state, count in self.store.count_stories_by_state().items():
            if count and state not in FINAL:  # the queue as it is now, not history
                response.stories_by_state.add(state=convert.STORY_STATES[state], count=count)
        for state, count in self.store.count_shots_by_state().items():
            if count and state not in FINAL:
                response.shots_by_state.add(state=convert.SHOT_STATES[state], count=count)
        return response

    @_rpc
    def Drain(self, request, context):
        """Drain (or undrain) the daemon or named workers; with `wait`, reply once no drained worker
        renders (the drain stays in effect when the caller's deadline passes first)."""
        if self.dispatcher is None:
            raise precondition("no worker pool", "WORKER_NOT_FOUND")
        known = set(self.dispatcher.executor.workers)
        unknown = [(f"worker_ids[{i}]", f"no worker {w!r}; workers: {', '.join(sorted(known))}")
                   for i, w in enumerate(request.worker_ids) if w not in known]
        if unknown:
            bad = [w for w in request.worker_ids if w not in known]
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no worker {', '.join(bad)}", "WORKER_NOT_FOUND",
                           fields=unknown, resource=("worker", bad[0]))
        if request.worker_ids:
            change = self.dispatcher.drained.difference_update if request.undrain else self.dispatcher.drained.update
            change(request.worker_ids)
        else:
            self.dispatcher.draining = not request.undrain
            if request.undrain:
                self.dispatcher.drained.clear()
        self.hub.changed()
        version, turn = self.hub.version, self.dispatcher.turns
        while request.wait and self.dispatcher.turns <= turn + 1 and context.is_active():
            time.sleep(0.02)  # a turn that began before the drain may still start a shot: let it end
        while request.wait and self.dispatcher.drained_busy() and context.is_active():
            version = self.hub.wait(version, timeout=1.0)  # past the deadline the caller gets DEADLINE_EXCEEDED
        response = pb.DrainResponse(draining=self.dispatcher.draining,
                                    running_shot_count=len(self.dispatcher.drained_busy()))
        add_workers(response.workers, self.dispatcher, self.hub, self.preset.name)
        return response
