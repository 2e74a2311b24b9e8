"""The user's controls over stored stories: cancel, pause, resume, priority, retry and re-render of
a shot, batch cancel. A mixin of JobStore (it uses the store's `_write` and `_record`): each control
is one transaction that checks the story's state, applies the change and emits its events.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from storyfarm.daemon.store_records import (
    FINAL, STORY_STATES, BatchSummary, IdempotencyConflict, NotFound, StateError, StoryRecord,
)
from storyfarm.daemon.store_tx import Tx, has_started, require
from storyfarm.story.numbering import shot_label, wire_shot


RERENDER_HINT = "; a succeeded shot renders again as a new take: `storyfarm retry-shot --rerender` or `storyfarm rerender`"


class StoryControls:

    def _control(self, story_id: str, op: str, allowed: Sequence[str], now: float | None,
                 apply: Callable[[Tx, dict], None], hint: str = "") -> StoryRecord:
        with self._write(now) as tx:
            story = tx.story(story_id)
            require(story, op, allowed, hint)
            apply(tx, story)
            return self._record(tx, story_id)

    def request_cancel(self, story_id: str, *, reason: str | None = None, now: float | None = None) -> StoryRecord:
        """Cancel the story and its shots now; a running shot is flagged for its worker; `reason`
        becomes the story's error. Repeats are no-ops."""
        return self._control(story_id, "cancel", ("queued", "running", "paused", "cancelled"), now,
                             lambda tx, story: self._request_cancel(tx, story, reason))

    def request_pause(self, story_id: str, *, now: float | None = None) -> StoryRecord:
        """Hold the story's shots that have not started; a running shot finishes. Repeats are no-ops."""
        def pause(tx: Tx, story: dict) -> None:
            if story["state"] == "paused":
                return
            tx.emit(story["id"], "pause_requested")
            tx.set_story(story, "paused", pause_requested_at=tx.now, reason="pause requested")
            for shot in tx.shots(story["id"]):
                if shot["state"] in ("queued", "waiting"):
                    tx.set_shot(shot, "paused", reason="story paused")
        return self._control(story_id, "pause", ("queued", "running", "paused"), now, pause)

    def resume(self, story_id: str, *, now: float | None = None) -> StoryRecord:
        """Release a paused story (its next shot queues again), or bring a cancelled one back from
        its last succeeded shot (those keep their files and the story's memory). A story neither
        paused nor cancelled is left as it is."""
        def release(tx: Tx, story: dict) -> None:
            if story["state"] not in ("paused", "cancelled"):
                return
            shots = tx.shots(story["id"])
            if story["state"] == "cancelled" and any(s["state"] == "running" for s in shots):  # not yet stopped
                raise StateError(f"story {story_id} is cancelled and its running shot has not stopped yet; "
                                 "resume it in a moment")
            tx.emit(story["id"], "resume_requested")
            if all(s["state"] == "succeeded" for s in shots):  # cancelled as its last shot finished
                tx.set_story(story, "succeeded", reason="resumed: every shot had succeeded", error=None)
                return
            tx.set_story(story, "running" if has_started(tx, story["id"]) else "queued", reason="resumed",
                         error=None, cancel_requested_at=None)
            for shot in shots:
                if shot["state"] in ("paused", "cancelled"):
                    ready = shot["idx"] == 0 or shots[shot["idx"] - 1]["state"] == "succeeded"
                    tx.set_shot(shot, "queued" if ready else "waiting", reason="story resumed",
                                cancel_requested_at=None, error=None)
        return self._control(story_id, "resume", ("paused", "cancelled", "queued", "running"), now, release)

    def set_priority(self, story_id: str, priority: int, *, now: float | None = None) -> StoryRecord:
        def change(tx: Tx, story: dict) -> None:
            tx.emit(story["id"], "priority_changed", **{"from": story["priority"], "to": int(priority)})
            tx.set_story(story, story["state"], priority=int(priority))
        return self._control(story_id, "a priority change", ("queued", "running", "paused"), now, change)

    def retry_shot(self, story_id: str, index: int, *, now: float | None = None) -> StoryRecord:
        """Queue a failed shot again with a fresh retry budget; its story runs again, later shots wait."""
        def retry(tx: Tx, story: dict) -> None:
            shots = tx.shots(story_id)
            if not 0 <= index < len(shots):
                raise NotFound(f"story {story_id} has no {wire_shot(index)}; its shots are 1 to {len(shots)}")
            shot = shots[index]
            if shot["state"] != "failed":
                raise StateError(f"{shot_label(index)} of story {story_id} is {shot['state']}; "
                                 f"retry is allowed when it is failed{RERENDER_HINT if shot['state'] == 'succeeded' else ''}")
            tx.emit(story_id, "retry_requested", index=index)
            tx.set_story(story, "running", error=None, reason=f"{shot_label(index)} retried")
            tx.set_shot(shot, "queued", failures=0, oom_failures=0, error=None, reason="retry requested")
        return self._control(story_id, "retry", ("failed",), now, retry, RERENDER_HINT)

    def rerender_shot(self, story_id: str, index: int, *, prompt: str | None = None, strength: float | None = None,
                      seed: int | None = None, cascade: bool = False, request_id: str | None = None,
                      now: float | None = None) -> StoryRecord:
        """Queue a new take of a succeeded shot of a finished story (RerenderShot). The edit (prompt,
        seed) stays with the shot for every later take; `strength` applies to this take only. With
        `cascade` the later shots wait to be rendered again after it. Idempotent by `request_id`:
        a repeat returns the story as it is; the same id with another request is refused."""
        request = {"shot_index": index, "prompt": prompt, "strength": strength, "seed": seed, "cascade": bool(cascade)}
        with self._write(now) as tx:
            story = tx.story(story_id)
            if request_id:
                prior = tx.one("SELECT * FROM rerenders WHERE story_id = ? AND request_id = ?", (story_id, request_id))
                if prior is not None:
                    if {k: prior[k] for k in request} != {**request, "cascade": int(cascade)}:
                        raise IdempotencyConflict(story["project"], request_id, story_id)
                    return self._record(tx, story_id)
            require(story, "a re-render", ("succeeded", "failed"))
            shots = tx.shots(story_id)
            if not 0 <= index < len(shots):
                raise NotFound(f"story {story_id} has no {wire_shot(index)}; its shots are 1 to {len(shots)}")
            shot = shots[index]
            if shot["state"] != "succeeded":
                raise StateError(f"{shot_label(index)} of story {story_id} is {shot['state']}; "
                                 "a re-render is allowed when it is succeeded")
            edit = json.loads(shot["edit"]) if shot["edit"] else {}
            edit.update({k: v for k, v in (("prompt", prompt), ("seed", seed)) if v is not None})
            take = shot["take"] + 1
            tx.db.execute("INSERT INTO rerenders (story_id, request_id, shot_index, take, prompt, strength, seed, cascade,"
                          " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (story_id, request_id or None, index, take, prompt, strength, seed, int(cascade), tx.now))
            tx.emit(story_id, "rerender_requested", index=index, take=take, prompt=prompt, strength=strength, seed=seed,
                    cascade=bool(cascade), request_id=request_id or None)
            tx.set_story(story, "running", error=None, reason=f"{shot_label(index)} re-rendered")
            tx.set_shot(shot, "queued", failures=0, oom_failures=0, error=None, take=take, strength=strength,
                        edit=json.dumps(edit, sort_keys=True) if edit else None, prompt=edit.get("prompt", shot["prompt"]),
                        reason=f"re-render requested (take {take})")
            if cascade:
                for later in shots[index + 1:]:
                    tx.set_shot(later, "waiting", failures=0, oom_failures=0, error=None, take=later["take"] + 1, strength=None,
                                reason=f"re-render of {shot_label(index)} cascades")
            return self._record(tx, story_id)

    def cancel_batch(self, batch_id: str, *, reason: str | None = None, now: float | None = None) -> BatchSummary:
        """Cancel every story of the batch that has not finished, in one transaction; `reason` becomes
        each one's error."""
        with self._write(now) as tx:
            stories = [dict(r) for r in tx.db.execute("SELECT * FROM stories WHERE batch_id = ?", (batch_id,))]
            for story in stories:
                if story["state"] not in FINAL:
                    self._request_cancel(tx, story, reason)
            return batch_summary(tx, batch_id)

    def _request_cancel(self, tx: Tx, story: dict, reason: str | None = None) -> None:
        if story["state"] != "cancelled":
            tx.emit(story["id"], "cancel_requested", **({"reason": reason} if reason else {}))
            self._cancel(tx, story, reason or None)

    def _cancel(self, tx: Tx, story: dict, error: str | None) -> None:
        tx.set_story(story, "cancelled", cancel_requested_at=tx.now, error=error,
                     reason=error or "cancel requested")
        for shot in tx.shots(story["id"]):
            if shot["state"] == "running":
                tx.set_shot(shot, "running", cancel_requested_at=tx.now)
            elif shot["state"] not in FINAL:
                tx.set_shot(shot, "cancelled", reason="story cancelled")


def batch_summary(tx: Tx, batch_id: str) -> BatchSummary:
    counts = dict.fromkeys(STORY_STATES, 0)
    rows = tx.db.execute("SELECT state, COUNT(*) AS n, MIN(deadline) AS deadline FROM stories "
                         "WHERE batch_id = ? GROUP BY state", (batch_id,)).fetchall()
    if not rows:
        raise NotFound(f"no stories in batch {batch_id!r}")
    for r in rows:
        counts[r["state"]] = r["n"]
    deadlines = [r["deadline"] for r in rows if r["deadline"] is not None]
    return BatchSummary(batch_id, counts, sum(counts.values()), min(deadlines) if deadlines else None)
