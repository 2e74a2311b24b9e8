"""One open transaction of the job store: row reads, guarded updates and the events they emit.

Every state change goes through `Tx.set_story` / `Tx.set_shot`, which write the row and append the
matching `story_state` / `shot_state` event in the same transaction, so the event log never
disagrees with the tables. Shared by the store's attempt bookkeeping and its user controls.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from typing import Any, Sequence

from storyfarm.daemon.store_records import FINAL, NotFound, ShotRecord, StateError
from storyfarm.daemon.store_views import _SHOT_SELECT, _shot_record


def shot_by_id(db: sqlite3.Connection, shot_id: str) -> ShotRecord | None:
    row = db.execute(_SHOT_SELECT + " WHERE s.id = ?", (shot_id,)).fetchone()
    return None if row is None else _shot_record(row)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


# --- one open transaction -------------------------------------------------------------------

class Tx:
    """The writes every transition shares: a row changes state and its event is appended with it.
    Rows are plain dicts, updated in place, so later steps of one transaction see earlier ones."""

    def __init__(self, db: sqlite3.Connection, now: float):
        self.db, self.now = db, now

    def one(self, sql: str, params: Sequence = ()) -> dict | None:
        row = self.db.execute(sql, params).fetchone()
        return None if row is None else dict(row)

    def story(self, story_id: str) -> dict:
        story = self.one("SELECT * FROM stories WHERE id = ?", (story_id,))
        if story is None:
            raise NotFound(f"no story {story_id}")
        return story

    def shot(self, shot_id: str) -> dict:
        shot = self.one("SELECT * FROM shots WHERE id = ?", (shot_id,))
        if shot is None:
            raise NotFound(f"no shot {shot_id}")
        return shot

    def shots(self, story_id: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM shots WHERE story_id = ? ORDER BY idx", (story_id,))]

    def emit(self, story_id: str, kind: str, **payload: Any) -> None:
        self.db.execute("INSERT INTO events (story_id, time, kind, payload) VALUES (?, ?, ?, ?)",
                        (story_id, self.now, kind, json.dumps(payload, sort_keys=True)))

    def _update(self, table: str, row: dict, columns: dict) -> None:
        columns["updated_at"] = self.now
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.db.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*columns.values(), row["id"]))
        row.update(columns)

    def set_story(self, story: dict, state: str, *, reason: str | None = None, **columns: Any) -> None:
        old = story["state"]
        if state != old:
            columns.setdefault("finished_at", self.now if state in FINAL else None)
            if old == "paused":  # the request is answered once the story leaves `paused`, however
                columns.setdefault("pause_requested_at", None)
        self._update("stories", story, {"state": state, **columns})
        if state != old:
            self.emit(story["id"], "story_state", **{"from": old, "to": state, "reason": reason})

    def set_shot(self, shot: dict, state: str, *, reason: str | None = None, attempt: dict | None = None,
                 **columns: Any) -> None:
        """`attempt` (number, worker) is named in the event when the change comes from one."""
        old = shot["state"]
        self._update("shots", shot, {"state": state, **columns})
        if state != old:
            extra = {"attempt": attempt["number"], "worker": attempt["worker"]} if attempt else {}
            self.emit(shot["story_id"], "shot_state", index=shot["idx"], shot_id=shot["id"],
                      **{"from": old, "to": state, "reason": reason}, **extra)


def ready_state(story: dict) -> str:
    """The state a shot enters once it may run: held while its story is paused."""
    return "paused" if story["state"] == "paused" else "queued"


def has_started(tx: Tx, story_id: str) -> bool:
    return tx.one("SELECT 1 FROM attempts WHERE story_id = ? LIMIT 1", (story_id,)) is not None


def require(story: dict, op: str, allowed: Sequence[str], hint: str = "") -> None:
    """Refuse `op` unless the story is in an `allowed` state; `hint` says what to do instead."""
    if story["state"] not in allowed:
        listed = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise StateError(f"story {story['id']} is {story['state']}; {op} is allowed when it is {listed}{hint}")


# --- the store ------------------------------------------------------------------------------
