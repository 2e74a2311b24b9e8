"""What goes into the job store and what comes out: input shapes, records, states and refusals.

Records are frozen snapshots read in one transaction; they never write back. Inputs are checked here,
before a transaction opens, so a refusal names the field and costs no lock. Stdlib only; the state
lists come from `storyfarm.story.lifecycle`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable, Sequence

from storyfarm.story.lifecycle import FINAL_STATES as FINAL, OUTCOMES, SHOT_STATES, STORY_STATES  # noqa: F401

MAX_PAGE_SIZE = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreError(Exception):
    """Base of the store's refusals."""


class NotFound(StoreError, LookupError):
    pass


class StateError(StoreError):
    """The operation is not allowed in the current state; the message says which states allow it."""


class IdempotencyConflict(StoreError):
    def __init__(self, project: str, request_id: str, story_id: str):
        super().__init__(f"request id {request_id!r} of project {project!r} was already used for story "
                         f"{story_id} with a different payload; use a new request id")
        self.story_id = story_id


# --- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShotIn:
    index: int              # 0-based over the whole story
    scene: int
    shot: int               # 1-based within its scene
    prompt: str
    settings: str = "{}"    # a JSON object: the render settings the shot sets


@dataclass(frozen=True)
class ArtifactIn:
    name: str               # unique within the story
    kind: str               # "shot_video", "keyframe", "story_video", "manifest", ...
    path: str               # relative to the data directory, made by the daemon
    size: int
    sha256: str
    story_level: bool = False  # recorded with no shot index (the assembled story, its manifest)


@dataclass(frozen=True)
class SubmitResult:
    story_id: str
    created: bool


@dataclass(frozen=True)
class ShotRecord:
    id: str
    story_id: str
    index: int
    scene: int
    shot: int
    prompt: str
    settings: str
    state: str
    attempts: int           # every attempt, lost ones included
    worker: str | None      # the worker of the last attempt
    error: str | None
    result: dict | None     # the render manifest entry, once succeeded
    cancel_requested: bool
    updated_at: float
    take: int = 1           # 1 for the first render, one more per RerenderShot
    edit: dict | None = None  # what re-renders changed ({"prompt", "seed"}), applied to every later take
    strength: float | None = None  # the pending take starts from the previous one (cleared once it succeeds)
    low_memory: bool = False  # an attempt ran out of memory since the shot was (re)queued: render in low-memory mode

    def render_edit(self) -> dict | None:
        """The edit a worker renders this shot with ({"prompt", "seed", "strength"}), or None."""
        edit = {**(self.edit or {}), **({"strength": self.strength} if self.strength is not None else {})}
        return edit or None


@dataclass(frozen=True)
class ArtifactRecord:
    story_id: str
    shot_index: int | None
    name: str
    kind: str
    path: str
    size: int
    sha256: str
    created_at: float


@dataclass(frozen=True)
class StoryRecord:
    id: str
    project: str
    request_id: str
    payload_sha256: str
    name: str
    state: str
    priority: int
    labels: dict[str, str]
    deadline: float | None
    batch_id: str | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    cancel_requested_at: float | None
    pause_requested_at: float | None
    shots: tuple[ShotRecord, ...]
    artifacts: tuple[ArtifactRecord, ...]


@dataclass(frozen=True)
class AttemptRecord:
    id: str
    shot_id: str
    story_id: str
    number: int             # 1-based per shot
    worker: str
    started_at: float
    finished_at: float | None
    outcome: str | None     # None while running
    error: str | None
    retryable: bool | None
    reason: str | None = None  # why it failed (lifecycle.FAILURE_REASONS) or was lost; None if unknown


@dataclass(frozen=True)
class Event:
    seq: int
    story_id: str
    time: float
    kind: str               # story_state, shot_state, attempt_started, attempt_finished, *_requested, ...
    payload: dict


@dataclass(frozen=True)
class BatchSummary:
    batch_id: str
    counts: dict[str, int]  # every story state, zeros included
    total: int
    deadline: float | None  # the earliest deadline among the batch's stories



def check_states(states: Iterable[str], known: Sequence[str]) -> list[str]:
    states = list(states)
    unknown = [s for s in states if s not in known]
    if unknown or not states:
        raise ValueError(f"states must be some of {', '.join(known)}, got {states!r}")
    return states


def check_submit(request_id: str, project: str, payload_sha256: str, name: str,
                  shots: Sequence[ShotIn], labels: dict) -> None:
    for what, value in (("request_id", request_id), ("project", project), ("name", name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty string")
    if not isinstance(payload_sha256, str) or not _SHA256.fullmatch(payload_sha256):
        raise ValueError("payload_sha256 must be 64 lower-case hex characters")
    if not shots:
        raise ValueError("a story needs at least one shot")
    if [s.index for s in shots] != list(range(len(shots))):
        raise ValueError("shot indices must be 0, 1, 2, ... in order")
    for s in shots:
        try:
            ok = isinstance(json.loads(s.settings), dict)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"shots[{s.index}].settings must be a JSON object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("labels must map strings to strings")


def check_artifact(a: ArtifactIn) -> None:
    parts = PurePosixPath(a.path).parts
    if not a.path or "\\" in a.path or PurePosixPath(a.path).is_absolute() or ".." in parts:
        raise ValueError(f"artifact {a.name!r}: path must be relative to the data directory, got {a.path!r}")
    if not a.name or not isinstance(a.size, int) or a.size < 0 or not _SHA256.fullmatch(a.sha256):
        raise ValueError(f"artifact {a.name!r}: needs a name, a size >= 0 and a lower-case hex sha256")


def encode_token(record: StoryRecord) -> str:
    raw = json.dumps([record.created_at, record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[float, str]:
    try:
        created, story_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if isinstance(created, (int, float)) and isinstance(story_id, str):
            return float(created), story_id
    except (ValueError, TypeError, binascii.Error):
        pass
    raise ValueError(f"invalid page token {token!r}")
