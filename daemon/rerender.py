"""RerenderShot (and RetryShot with `rerender`): a new take of one shot of a finished story.

Why a module: the request carries an edit that must be validated like story text (field paths,
nothing coerced), and the refusals are specific (which shot, which story state), so the servicer's
handler stays a translation. The store does the transition in one transaction; the dispatcher
renders the take with the shot's edit and, when it is the last shot left, re-assembles the story.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from storyfarm.daemon.errors import RpcError, invalid, precondition
from storyfarm.daemon.store import JobStore
from storyfarm.daemon.store_records import IdempotencyConflict, StateError, StoryRecord
from storyfarm.story.lifecycle import OPEN_STORY_STATES
from storyfarm.story.presets import Preset
from storyfarm.story.format import check_against_model, parse_story
from storyfarm.story.fields import StoryValidationError
from storyfarm.story.modes import ShotEdit, read_edit, renders_fifo
from storyfarm.story.numbering import wire_shot

BUSY = OPEN_STORY_STATES  # a re-render waits until the story has finished
MAX_REQUEST_ID = 128


def check_edit(prompt: str | None, strength: float | None, seed: int | None, max_prompt_chars: int) -> ShotEdit:
    """The request's edit, or INVALID_ARGUMENT (INVALID_EDIT) naming every bad field."""
    raw = {"prompt": prompt, "strength": strength, "seed": seed}
    problems = []
    try:
        edit = read_edit(raw, path="")
    except StoryValidationError as exc:
        problems = [(e.path.lstrip("."), e.message) for e in exc.errors]
        edit = None
    if prompt is not None and len(prompt) > max_prompt_chars and not any(f == "prompt" for f, _ in problems):
        problems.append(("prompt", f"{len(prompt)} characters; at most {max_prompt_chars}"))
    if problems:
        raise invalid("the re-render's edit is refused", "INVALID_EDIT", problems)
    return edit


def check_strength(store: JobStore, record: StoryRecord, index: int, edit: ShotEdit, preset: Preset,
                   references_dir: Path) -> None:
    """A strength starts from the previous take, which a FIFO (long) shot cannot: refuse it here
    rather than let the worker fail the take."""
    if edit.strength is None or edit.strength >= 1 or not 0 <= index < len(record.shots):
        return
    story = parse_story(store.story_document(record.id), source=f"story {record.id}", base_dir=references_dir)
    shot = check_against_model(story, preset.model_limits()).shots[index]
    if renders_fifo(shot.mode, shot.frames or preset.render.frames, preset.render.frames):
        raise invalid("a FIFO shot always starts from noise", "INVALID_EDIT",
                      [("strength", "not available for FIFO (long) shots; leave it unset or 1")])


def check_shot_index(record: StoryRecord, index: int) -> None:
    """NOT_FOUND (SHOT_NOT_FOUND, naming `shot_index` and its range) for an index the story lacks;
    the text gives shot numbers too (from 1, as people count: story/numbering.py)."""
    if not 0 <= index < len(record.shots):
        count = len(record.shots)
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"story {record.id} has no {wire_shot(index)}; its shots are 1 to {count}",
                       "SHOT_NOT_FOUND", fields=[("shot_index", f"0 to {count - 1} (shots 1 to {count})")],
                       resource=("storyfarm.v1.Shot", f"{record.id}/{index}"))


def rerender(store: JobStore, record: StoryRecord, index: int, edit: ShotEdit, *, cascade: bool = False,
             request_id: str = "") -> StoryRecord:
    """Queue the take, or refuse with the reason a client can act on."""
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise invalid("bad request id", "INVALID_EDIT", [("request_id", f"up to {MAX_REQUEST_ID} printable characters")])
    check_shot_index(record, index)
    try:
        return store.rerender_shot(record.id, index, prompt=edit.prompt, strength=edit.strength, seed=edit.seed,
                                   cascade=cascade, request_id=request_id or None)
    except IdempotencyConflict as exc:
        raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc), "IDEMPOTENCY_CONFLICT",
                       fields=[("request_id", "already used for another re-render of this story")]) from None
    except StateError as exc:  # read again inside the store's transaction: say which rule failed
        current = store.get_story(record.id)
        if current.state in BUSY:
            raise precondition(f"{exc}; wait until the story has succeeded or failed", "STORY_BUSY") from None
        if current.state == "cancelled":
            raise precondition(str(exc), "STORY_FINISHED") from None
        raise precondition(str(exc), "SHOT_NOT_RETRYABLE") from None
