"""The durable job store: stories, their shots, attempts, artifacts and events in one SQLite file.

It is the daemon's memory across crashes: a submit is acknowledged only after its transaction is on
disk, and a restarted daemon rebuilds its queue from here alone. Every write is one BEGIN IMMEDIATE
transaction that changes the rows and appends the matching events together, so a crash or an
exception mid-way leaves nothing half-written and watchers never see a state the tables do not hold.
Invariants (kept by the transitions below, checked by the tests):
- shots of a story run strictly in index order: a shot is `queued` only when the shot before it has
  succeeded (the first shot starts `queued`), else `waiting`; a story has at most one running shot;
- a succeeded shot never changes state again and is never handed out again, not even by recovery,
  except through `rerender_shot` (RerenderShot): a new take of a shot of a finished story, queued
  again with its edit, the later shots waiting again only with `cascade`; the new take's artifacts
  replace the old ones under the same names when it succeeds (until then the old ones stay);
- attempts are rows of their own (who ran it, when, how it ended); the shot keeps only its state,
  its result and its retry budget. `lost` attempts (a dead worker or daemon) never spend the budget;
- cancel and pause are recorded with their time in the same transaction that applies them; a
  running shot is not interrupted by the store: cancel sets a flag its worker polls, pause lets it
  finish. A shot that succeeds after its story was cancelled keeps its result and artifacts;
  shots are `paused` only in a paused story and `failed` only in a failed one (which then has no
  paused shots: the ones after the failure wait for a retry);
- idempotency: one story per (project, request_id); a repeat with another payload is refused.
Threading: one connection guarded by one lock, shared by all threads (a gRPC pool). Writes are
milliseconds against shots that take minutes, so serialising them costs nothing and rules out
SQLITE_BUSY inside the process; other processes opening the same file wait on busy_timeout.
Per-step progress is not stored (too chatty): the daemon streams it from memory. The records and
input checks live in store_records, the file's settings and migrations in store_schema, one open
transaction's helpers in store_tx, the user's controls (cancel, pause, retry, re-render) in
store_controls and the scheduler's read views in store_views.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

from storyfarm.daemon import store_schema
from storyfarm.story.lifecycle import OOM_RETRIES
from storyfarm.story.numbering import shot_label
from storyfarm.daemon.store_records import (
    MAX_PAGE_SIZE, OUTCOMES, SHOT_STATES, STORY_STATES, ArtifactIn, ArtifactRecord, AttemptRecord,
    BatchSummary, Event, IdempotencyConflict, NotFound, ShotIn, ShotRecord, StateError, StoreError,
    StoryRecord, SubmitResult, check_artifact, check_states, check_submit, decode_token, encode_token,
)
from storyfarm.daemon.store_schema import SchemaTooNew
from storyfarm.daemon.store_controls import StoryControls, batch_summary
from storyfarm.daemon.store_tx import Tx, new_id, ready_state, shot_by_id
from storyfarm.daemon.store_views import _SHOT_SELECT, QueueViews, _marks, _shot_record
from storyfarm.scheduler.gpu_pool.faults import crash_point

__all__ = [
    "JobStore", "ShotIn", "ArtifactIn", "SubmitResult", "StoryRecord", "ShotRecord", "AttemptRecord",
    "ArtifactRecord", "Event", "BatchSummary", "StoreError", "NotFound", "StateError",
    "IdempotencyConflict", "SchemaTooNew", "STORY_STATES", "SHOT_STATES", "OUTCOMES",
]

class JobStore(QueueViews, StoryControls):
    """Open with JobStore.open(path); every method is safe to call from any thread."""

    def __init__(self, db: sqlite3.Connection, path: str, *, max_attempts: int):
        self._db: sqlite3.Connection | None = db
        self._lock = threading.Lock()
        self.path = path
        self.max_attempts = max_attempts

    @classmethod
    def open(cls, path, *, max_attempts: int = 3, busy_timeout_s: float = 5.0) -> JobStore:
        """Open (creating or migrating) the store; raises SchemaTooNew for a file from a newer release."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        db = store_schema.connect(str(path), busy_timeout_s=busy_timeout_s)
        try:
            store_schema.migrate(db)
        except BaseException:
            db.close()
            raise
        db.row_factory = sqlite3.Row
        return cls(db, str(path), max_attempts=max_attempts)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self, begin: str, now: float | None) -> Iterator[Tx]:
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"job store {self.path} is closed")
            db.execute(begin)
            try:
                yield Tx(db, time.time() if now is None else now)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _write(self, now: float | None = None):
        return self._transaction("BEGIN IMMEDIATE", now)

    def _read(self):
        return self._transaction("BEGIN", None)  # one snapshot for multi-query reads

    # --- submit ---------------------------------------------------------------------------

    def submit_story(self, request_id: str, project: str, payload_sha256: str, name: str,
                     story_document: str, shots: Sequence[ShotIn], *, priority: int = 0,
                     labels: Mapping[str, str] | None = None, deadline: float | None = None,
                     batch_id: str | None = None, request_sha256: str | None = None,
                     now: float | None = None) -> SubmitResult:
        """Persist a story and all its shots, or return the story this (project, request_id) made.
        The same request id with another payload, or (when both have one) another request
        fingerprint, is an IdempotencyConflict."""
        labels = dict(labels or {})
        check_submit(request_id, project, payload_sha256, name, shots, labels)
        with self._write(now) as tx:
            existing = tx.one("SELECT id, payload_sha256, request_sha256 FROM stories WHERE project = ? AND request_id = ?",
                              (project, request_id))
            if existing is not None:
                other_request = (request_sha256 is not None and existing["request_sha256"] is not None
                                 and existing["request_sha256"] != request_sha256)
                if existing["payload_sha256"] != payload_sha256 or other_request:
                    raise IdempotencyConflict(project, request_id, existing["id"])
                return SubmitResult(existing["id"], created=False)
            story_id = new_id("st_")
            tx.db.execute(
                "INSERT INTO stories (id, project, request_id, payload_sha256, name, document, state, priority,"
                " deadline, batch_id, created_at, updated_at, request_sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (story_id, project, request_id, payload_sha256, name, story_document, int(priority), deadline,
                 batch_id, tx.now, tx.now, request_sha256))
            tx.db.executemany("INSERT INTO story_labels (story_id, key, value) VALUES (?, ?, ?)",
                              [(story_id, k, v) for k, v in labels.items()])
            tx.db.executemany(
                "INSERT INTO shots (id, story_id, idx, scene, shot, prompt, settings, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(new_id("sh_"), story_id, s.index, s.scene, s.shot, s.prompt, s.settings,
                  "queued" if s.index == 0 else "waiting", tx.now) for s in shots])
            tx.emit(story_id, "story_state", **{"from": None, "to": "queued", "reason": "submitted",
                                                 "shots": len(shots)})
            return SubmitResult(story_id, created=True)

    # --- reads ----------------------------------------------------------------------------

    def get_story(self, story_id: str) -> StoryRecord | None:
        with self._read() as tx:
            records = self._records(tx, tx.db.execute("SELECT * FROM stories WHERE id = ?", (story_id,)).fetchall())
        return records[0] if records else None

    def story_document(self, story_id: str) -> str:
        with self._read() as tx:
            return tx.story(story_id)["document"]

    def list_stories(self, *, project: str | None = None, states: Iterable[str] | None = None,
                     batch_id: str | None = None, label: tuple[str, str] | None = None,
                     page_size: int = 50, page_token: str | None = None) -> tuple[list[StoryRecord], str | None]:
        """Stories in creation order (id breaks ties); the token resumes after the last one returned,
        so stories submitted while paging never shift a page."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        where, params = [], []
        for column, value in (("project", project), ("batch_id", batch_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if states is not None:
            states = check_states(states, STORY_STATES)
            where.append(f"state IN ({_marks(states)})")
            params += states
        if label is not None:
            where.append("id IN (SELECT story_id FROM story_labels WHERE key = ? AND value = ?)")
            params += list(label)
        if page_token:
            created, last_id = decode_token(page_token)
            where.append("(created_at > ? OR (created_at = ? AND id > ?))")
            params += [created, created, last_id]
        sql = ("SELECT * FROM stories" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at, id LIMIT ?")
        with self._read() as tx:
            rows = tx.db.execute(sql, (*params, page_size + 1)).fetchall()
            records = self._records(tx, rows[:page_size])
        token = encode_token(records[-1]) if len(rows) > page_size else None
        return records, token

    def shot(self, shot_id: str) -> ShotRecord | None:
        with self._read() as tx:
            return shot_by_id(tx.db, shot_id)

    def attempts(self, shot_id: str) -> list[AttemptRecord]:
        with self._read() as tx:
            rows = tx.db.execute("SELECT * FROM attempts WHERE shot_id = ? ORDER BY number", (shot_id,)).fetchall()
        return [AttemptRecord(id=r["id"], shot_id=r["shot_id"], story_id=r["story_id"], number=r["number"],
                              worker=r["worker"], started_at=r["started_at"], finished_at=r["finished_at"],
                              outcome=r["outcome"], error=r["error"],
                              retryable=None if r["retryable"] is None else bool(r["retryable"]), reason=r["reason"])
                for r in rows]

    def cancel_requested(self, shot_id: str) -> bool:
        """Polled by the worker running the shot (once per denoising step): stop when True."""
        with self._read() as tx:
            return tx.shot(shot_id)["cancel_requested_at"] is not None

    def last_event_seq(self, story_id: str | None = None) -> int:
        """The newest event's seq (of one story, or of all with None); 0 when there is none."""
        sql, params = "SELECT MAX(seq) AS seq FROM events", ()
        if story_id is not None:
            sql, params = sql + " WHERE story_id = ?", (story_id,)
        with self._read() as tx:
            return tx.db.execute(sql, params).fetchone()["seq"] or 0

    def events_since(self, story_id: str | None, after_seq: int = 0, limit: int = 500) -> list[Event]:
        """Events after `after_seq`, oldest first; story_id None reads every story's (batch watchers)."""
        sql, params = "SELECT * FROM events WHERE seq > ?", [after_seq]
        if story_id is not None:
            sql, params = sql + " AND story_id = ?", params + [story_id]
        with self._read() as tx:
            rows = tx.db.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        return [Event(r["seq"], r["story_id"], r["time"], r["kind"], json.loads(r["payload"])) for r in rows]

    def batch_summary(self, batch_id: str) -> BatchSummary:
        with self._read() as tx:
            return batch_summary(tx, batch_id)

    def pragmas(self) -> dict[str, Any]:
        """The connection's durability settings, for the start-up log and the tests."""
        names = ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "user_version")
        with self._lock:
            if self._db is None:
                raise StoreError(f"job store {self.path} is closed")
            values = {n: self._db.execute(f"PRAGMA {n}").fetchone()[0] for n in names}
        values["synchronous"] = {0: "off", 1: "normal", 2: "full", 3: "extra"}[values["synchronous"]]
        return values

    def integrity_check(self) -> bool:
        with self._read() as tx:
            ok = [r[0] for r in tx.db.execute("PRAGMA integrity_check")] == ["ok"]
            return ok and not tx.db.execute("PRAGMA foreign_key_check").fetchall()

    def _records(self, tx: Tx, rows: Sequence[sqlite3.Row]) -> list[StoryRecord]:
        """Whole StoryRecords for story rows, with three queries however many stories there are."""
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        labels: dict[str, dict[str, str]] = {i: {} for i in ids}
        shots: dict[str, list[ShotRecord]] = {i: [] for i in ids}
        artifacts: dict[str, list[ArtifactRecord]] = {i: [] for i in ids}
        for r in tx.db.execute(f"SELECT * FROM story_labels WHERE story_id IN ({_marks(ids)})", ids):
            labels[r["story_id"]][r["key"]] = r["value"]
        for r in tx.db.execute(_SHOT_SELECT + f" WHERE s.story_id IN ({_marks(ids)}) ORDER BY s.idx", ids):
            shots[r["story_id"]].append(_shot_record(r))
        for r in tx.db.execute(f"SELECT * FROM artifacts WHERE story_id IN ({_marks(ids)}) "
                               "ORDER BY created_at, name", ids):
            artifacts[r["story_id"]].append(ArtifactRecord(
                story_id=r["story_id"], shot_index=r["shot_index"], name=r["name"], kind=r["kind"],
                path=r["path"], size=r["size"], sha256=r["sha256"], created_at=r["created_at"]))
        return [StoryRecord(
            id=r["id"], project=r["project"], request_id=r["request_id"], payload_sha256=r["payload_sha256"],
            name=r["name"], state=r["state"], priority=r["priority"], labels=labels[r["id"]],
            deadline=r["deadline"], batch_id=r["batch_id"], error=r["error"], created_at=r["created_at"],
            updated_at=r["updated_at"], finished_at=r["finished_at"],
            cancel_requested_at=r["cancel_requested_at"], pause_requested_at=r["pause_requested_at"],
            shots=tuple(shots[r["id"]]), artifacts=tuple(artifacts[r["id"]])) for r in rows]

    def _record(self, tx: Tx, story_id: str) -> StoryRecord:
        return self._records(tx, tx.db.execute("SELECT * FROM stories WHERE id = ?", (story_id,)).fetchall())[0]

    # --- attempts -------------------------------------------------------------------------

    def start_attempt(self, shot_id: str, worker: str, *, now: float | None = None) -> str:
        """Hand a queued shot to `worker`; returns the attempt id the worker reports back with."""
        with self._write(now) as tx:
            shot = tx.shot(shot_id)
            story = tx.story(shot["story_id"])
            if shot["state"] != "queued" or story["state"] in ("paused", "cancelled"):
                raise StateError(f"{shot_label(shot['idx'])} of story {story['id']} is {shot['state']} (story "
                                 f"{story['state']}); an attempt starts only from a queued shot")
            number = 1 + tx.one("SELECT COUNT(*) AS n FROM attempts WHERE shot_id = ?", (shot_id,))["n"]
            attempt_id = new_id("at_")
            tx.db.execute("INSERT INTO attempts (id, shot_id, story_id, number, worker, started_at)"
                          " VALUES (?, ?, ?, ?, ?, ?)", (attempt_id, shot_id, story["id"], number, worker, tx.now))
            tx.emit(story["id"], "attempt_started", index=shot["idx"], attempt_id=attempt_id, worker=worker,
                    number=number)
            tx.set_shot(shot, "running", attempt={"number": number, "worker": worker})
            if story["state"] == "queued":
                tx.set_story(story, "running")
            return attempt_id

    def finish_attempt(self, attempt_id: str, outcome: str, *, error: str | None = None,
                       retryable: bool = True, artifacts: Sequence[ArtifactIn] = (),
                       result: dict | None = None, reason: str | None = None, now: float | None = None) -> ShotRecord:
        """Record how an attempt ended and move its shot and story on; returns the shot as it is now.
        `reason` is why it failed or was lost (`out_of_memory` spends the shot's out-of-memory
        allowance, lifecycle.OOM_RETRIES, before its retry budget)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        if (artifacts or result is not None) and outcome != "succeeded":
            raise ValueError("artifacts and a result are recorded only for a succeeded attempt")
        for artifact in artifacts:
            check_artifact(artifact)
        with self._write(now) as tx:
            attempt = tx.one("SELECT * FROM attempts WHERE id = ?", (attempt_id,))
            if attempt is None:
                raise NotFound(f"no attempt {attempt_id}")
            if attempt["outcome"] is not None:
                raise StateError(f"attempt {attempt_id} already finished as {attempt['outcome']}")
            self._finish(tx, attempt, outcome, error, retryable, artifacts, result, reason)
            return shot_by_id(tx.db, attempt["shot_id"])

    def recover(self, *, now: float | None = None) -> int:
        """At start-up: every attempt still open belongs to a worker or daemon that is gone. Each is
        recorded `lost` and its shot re-queued (the retry budget untouched); returns how many."""
        with self._write(now) as tx:
            open_attempts = [dict(r) for r in tx.db.execute(
                "SELECT * FROM attempts WHERE finished_at IS NULL ORDER BY started_at")]
            for attempt in open_attempts:
                self._finish(tx, attempt, "lost", "its worker or daemon went away; re-queued at start-up",
                             True, (), None, "recovered")
                crash_point("during_recovery")  # reliability suite: the transaction is still open
            return len(open_attempts)

    def _finish(self, tx: Tx, attempt: dict, outcome: str, error: str | None, retryable: bool,
                artifacts: Sequence[ArtifactIn], result: dict | None, reason: str | None) -> None:
        tx.db.execute("UPDATE attempts SET finished_at = ?, outcome = ?, error = ?, retryable = ?, reason = ?"
                      " WHERE id = ?", (tx.now, outcome, error, int(retryable), reason, attempt["id"]))
        shot, story = tx.shot(attempt["shot_id"]), tx.story(attempt["story_id"])
        index = shot["idx"]
        shot_no = shot_label(index)  # messages name the shot as people count (story/numbering.py)
        tx.emit(story["id"], "attempt_finished", index=index, attempt_id=attempt["id"], outcome=outcome,
                error=error)
        if outcome == "succeeded":
            tx.set_shot(shot, "succeeded", attempt=attempt, error=None, strength=None,
                        result=None if result is None else json.dumps(result))
            self._record_artifacts(tx, story["id"], index, attempt["id"], artifacts, replace=shot["take"] > 1)
            if story["state"] == "cancelled":
                return  # kept, but the story stays cancelled
            shots = tx.shots(story["id"])
            pending = [s for s in shots if s["state"] != "succeeded"]
            if not pending:
                tx.set_story(story, "succeeded", reason=f"{shot_no} was the last")
            elif pending[0]["state"] == "waiting" and pending[0]["idx"] > 0 and shots[pending[0]["idx"] - 1]["state"] == "succeeded":
                tx.set_shot(pending[0], ready_state(story), reason=f"{shot_no} succeeded")
            elif pending[0]["state"] == "failed":  # a re-render before a failed shot that was not cascaded
                failed = shot_label(pending[0]["idx"])
                tx.set_story(story, "failed", error=f"{failed} failed: {pending[0]['error']}",
                             reason=f"{failed} is still failed")
        elif story["state"] == "cancelled":
            tx.set_shot(shot, "cancelled", attempt=attempt, error=error, reason="story cancelled")
        elif outcome == "cancelled":
            tx.set_shot(shot, "cancelled", attempt=attempt, error=error, reason="cancelled by its worker")
            self._cancel(tx, story, f"{shot_no} was cancelled by its worker")
        elif outcome == "lost":
            tx.set_shot(shot, ready_state(story), attempt=attempt, error=error, reason="attempt lost")
        elif reason == "out_of_memory" and retryable and shot["oom_failures"] < OOM_RETRIES:
            tx.set_shot(shot, ready_state(story), attempt=attempt, oom_failures=shot["oom_failures"] + 1, error=error,
                        reason="out of memory: retrying in low-memory mode")
        else:
            if reason == "out_of_memory":  # its allowance is spent: the shot fails, whatever its budget
                retryable = False
            failures = shot["failures"] + 1
            if retryable and failures < self.max_attempts:
                tx.set_shot(shot, ready_state(story), attempt=attempt, failures=failures, error=error,
                            reason=f"failed attempt {failures} of {self.max_attempts}")
            else:
                why = (f"not retryable: {error}" if not retryable
                       else f"failed {failures} times, last error: {error}")
                tx.set_shot(shot, "failed", attempt=attempt, failures=failures, error=error, reason=why)
                tx.set_story(story, "failed", error=f"{shot_no} {why}", reason=f"{shot_no} failed")
                for later in tx.shots(story["id"])[index + 1:]:  # held by a pause: now they wait for a retry
                    if later["state"] == "paused":
                        tx.set_shot(later, "waiting", reason="story failed")

    def _record_artifacts(self, tx: Tx, story_id: str, index: int, attempt_id: str,
                          artifacts: Sequence[ArtifactIn], *, replace: bool = False) -> None:
        """`replace` (a re-rendered shot): same-named artifacts are republished, and when the story is
        assembled again, keyframes no longer in its memory are withdrawn."""
        if replace:
            tx.db.executemany("DELETE FROM artifacts WHERE story_id = ? AND name = ?", [(story_id, a.name) for a in artifacts])
            if any(a.kind == "story_video" for a in artifacts):
                keep = [a.name for a in artifacts]
                tx.db.execute(f"DELETE FROM artifacts WHERE story_id = ? AND kind = 'keyframe' AND name NOT IN ({_marks(keep)})",
                              (story_id, *keep))
        for a in artifacts:
            try:
                tx.db.execute(
                    "INSERT INTO artifacts (story_id, shot_index, name, kind, path, size, sha256, attempt_id,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (story_id, None if a.story_level else index, a.name, a.kind, a.path, a.size, a.sha256,
                     attempt_id, tx.now))
            except sqlite3.IntegrityError:
                raise StateError(f"story {story_id} already has an artifact named {a.name!r}") from None
            tx.emit(story_id, "artifact_published", name=a.name, artifact_kind=a.kind, size=a.size, sha256=a.sha256,
                    shot_index=None if a.story_level else index, created_at=tx.now)
