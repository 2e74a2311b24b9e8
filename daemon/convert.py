"""Store records and live progress -> storyfarm.v1 messages. Translation only, no decisions."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from storyfarm.daemon.events import LiveProgress
from storyfarm.daemon.store_records import ArtifactRecord, Event, StoryRecord
from storyfarm.story import lifecycle
from storyfarm.v1 import render_pb2 as pb

STORY_STATES = {s: getattr(pb, f"STORY_STATE_{s.upper()}") for s in lifecycle.STORY_STATES}
SHOT_STATES = {s: getattr(pb, f"SHOT_STATE_{s.upper()}") for s in lifecycle.SHOT_STATES}
STAGES = {s: getattr(pb, f"RENDER_STAGE_{s.upper()}") for s in lifecycle.RENDER_STAGES}
KINDS = {k: getattr(pb, f"ARTIFACT_KIND_{k.upper()}") for k in ("shot_video", "story_video", "keyframe", "contact_sheet", "manifest")}
SHOWS_WORKER = ("running", *lifecycle.FINAL_STATES)  # a shot waiting to run again has no worker yet
CONTENT_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".json": "application/json"}
STORY_STATE_NAMES = {v: k for k, v in STORY_STATES.items()}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def set_eta(field, eta: float | None, now: float | None = None) -> None:
    """An expected finish (unix time) as a Duration from `now`; left unset when unknown."""
    if eta is not None:
        field.FromMilliseconds(max(0, int((eta - (time.time() if now is None else now)) * 1000)))


def content_type(name: str) -> str:
    return next((t for ext, t in CONTENT_TYPES.items() if name.endswith(ext)), "application/octet-stream")


def artifact(a: ArtifactRecord) -> pb.Artifact:
    msg = pb.Artifact(name=a.name, kind=KINDS.get(a.kind, pb.ARTIFACT_KIND_UNSPECIFIED), size=a.size, sha256=a.sha256,
                      content_type=content_type(a.name), create_time=timestamp(a.created_at))
    if a.shot_index is not None:
        msg.shot_index = a.shot_index
    return msg


def progress(p: LiveProgress) -> pb.ShotProgress:
    return pb.ShotProgress(stage=STAGES.get(p.stage, pb.RENDER_STAGE_UNSPECIFIED), step=p.step, total_steps=p.total)


def story(r: StoryRecord, live: LiveProgress | None = None, full: bool = True, preset: str = "") -> pb.Story:
    msg = pb.Story(
        story_id=r.id, name=r.name, project=r.project, state=STORY_STATES[r.state], priority=r.priority,
        labels=r.labels, batch_id=r.batch_id or "", request_id=r.request_id, preset=preset,
        create_time=timestamp(r.created_at), update_time=timestamp(r.updated_at),
        finish_time=timestamp(r.finished_at), deadline_time=timestamp(r.deadline), error=r.error or "",
        shot_count=len(r.shots), succeeded_shot_count=sum(s.state == "succeeded" for s in r.shots),
    )
    if not full:
        return msg
    for s in r.shots:
        shot = msg.shots.add(index=s.index, scene=s.scene, shot=s.shot, prompt=s.prompt, state=SHOT_STATES[s.state],
                             attempts=s.attempts, worker=(s.worker or "") if s.state in SHOWS_WORKER else "",
                             error=s.error or "", take=s.take)
        if s.result is not None:
            shot.seed = int(s.result.get("seed", 0))
            shot.cut = bool(s.result.get("cut", False))
        if live is not None and live.shot_index == s.index and s.state == "running":
            shot.progress.CopyFrom(progress(live))
    msg.artifacts.extend(artifact(a) for a in r.artifacts)
    return msg


def event(e: Event) -> pb.StoryEvent | None:
    """A durable store event as a watch event; None for kinds watchers do not see."""
    msg = pb.StoryEvent(seq=e.seq, time=timestamp(e.time), story_id=e.story_id)
    p = e.payload
    if e.kind == "story_state":
        msg.story_state_changed.CopyFrom(pb.StoryStateChanged(
            old_state=STORY_STATES.get(p.get("from") or "", pb.STORY_STATE_UNSPECIFIED),
            new_state=STORY_STATES[p["to"]], reason=p.get("reason") or ""))
    elif e.kind == "shot_state":
        msg.shot_state_changed.CopyFrom(pb.ShotStateChanged(
            shot_index=p["index"], old_state=SHOT_STATES.get(p.get("from") or "", pb.SHOT_STATE_UNSPECIFIED),
            new_state=SHOT_STATES[p["to"]], reason=p.get("reason") or "", attempt=p.get("attempt") or 0,
            worker=p.get("worker") or ""))
    elif e.kind == "artifact_published":
        msg.artifact_published.CopyFrom(pb.ArtifactPublished(artifact=artifact(ArtifactRecord(
            story_id=e.story_id, shot_index=p.get("shot_index"), name=p["name"], kind=p["artifact_kind"], path="",
            size=p["size"], sha256=p["sha256"], created_at=p.get("created_at") or e.time))))
    else:
        return None
    return msg
