"""Read-only views of the job store for the scheduler and the metrics: the queue as the placement
policy needs it, and the counts the gauges read at scrape time.

Kept apart from store.py (the transitions) because nothing here writes: each view is one read
snapshot, safe from any thread, and the dispatcher and the scrape handler call them often.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Sequence

from storyfarm.daemon.store_records import FINAL, SHOT_STATES, STORY_STATES, ShotRecord

_SHOT_SELECT = """
    SELECT s.*, (SELECT COUNT(*) FROM attempts a WHERE a.shot_id = s.id) AS attempt_count,
           (SELECT worker FROM attempts a WHERE a.shot_id = s.id ORDER BY number DESC LIMIT 1) AS last_worker
    FROM shots s"""


def _shot_record(row: sqlite3.Row) -> ShotRecord:
    return ShotRecord(
        id=row["id"], story_id=row["story_id"], index=row["idx"], scene=row["scene"], shot=row["shot"],
        prompt=row["prompt"], settings=row["settings"], state=row["state"], attempts=row["attempt_count"],
        worker=row["last_worker"], error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]),
        cancel_requested=row["cancel_requested_at"] is not None, updated_at=row["updated_at"],
        take=row["take"], edit=None if row["edit"] is None else json.loads(row["edit"]), strength=row["strength"],
        low_memory=row["oom_failures"] > 0)


def _marks(values: Sequence) -> str:
    return ", ".join("?" * len(values))


class QueueViews:
    """Mixed into JobStore (which provides `_read()`)."""

    def runnable_shots(self, limit: int = 100) -> list[ShotRecord]:
        """Queued shots, most urgent first: story priority (higher first), story age, shot index."""
        with self._read() as tx:
            rows = tx.db.execute(
                _SHOT_SELECT + " JOIN stories t ON t.id = s.story_id"
                " WHERE s.state = 'queued' AND t.state NOT IN ('paused', 'cancelled')"
                " ORDER BY t.priority DESC, t.created_at, t.id, s.idx LIMIT ?", (limit,)).fetchall()
        return [_shot_record(r) for r in rows]

    def unfinished_work(self) -> list[dict]:
        """Every story not yet final, as the scheduler sees it: rank inputs (project, priority,
        deadline, batch, created_at), its shot count, how many succeeded, the shot now queued
        (id, index, when it was queued) and the index of the one running, if any."""
        with self._read() as tx:
            rows = tx.db.execute(
                "SELECT t.id, t.project, t.priority, t.deadline, t.batch_id, t.created_at, t.state,"
                " COUNT(s.id) AS total, SUM(s.state = 'succeeded') AS done,"
                " MIN(CASE WHEN s.state = 'queued' THEN s.idx END) AS queued_index,"
                " MIN(CASE WHEN s.state = 'running' THEN s.idx END) AS running_index"
                " FROM stories t JOIN shots s ON s.story_id = t.id"
                " WHERE t.state IN ('queued', 'running', 'paused') GROUP BY t.id ORDER BY t.created_at, t.id").fetchall()
            work = [dict(r) for r in rows]
            queued = {r["story_id"]: r for r in tx.db.execute(
                "SELECT story_id, id, updated_at FROM shots WHERE state = 'queued' ORDER BY idx DESC").fetchall()}  # lowest index wins
        for w in work:
            q = queued.get(w["id"])
            w["queued_shot_id"], w["queued_at"] = (q["id"], q["updated_at"]) if q else (None, None)
        return work

    def count_stories_by_state(self) -> dict[str, int]:
        """Every story state with its count, zeros included (the pool view and the metrics gauge)."""
        with self._read() as tx:
            rows = tx.db.execute("SELECT state, COUNT(*) AS n FROM stories GROUP BY state").fetchall()
        return {**dict.fromkeys(STORY_STATES, 0), **{r["state"]: r["n"] for r in rows}}

    def count_shots_by_state(self) -> dict[str, int]:
        """Every shot state with its count, zeros included (queue depth for the pool view)."""
        with self._read() as tx:
            rows = tx.db.execute("SELECT state, COUNT(*) AS n FROM shots GROUP BY state").fetchall()
        return {**dict.fromkeys(SHOT_STATES, 0), **{r["state"]: r["n"] for r in rows}}

    def queue_depth(self) -> dict[str, Any]:
        """Unfinished work, read in one snapshot for the metrics gauges: `shots` and `stories` as
        (story priority, state, count) rows of stories not yet final, `oldest_queued_at` (when the
        longest-waiting runnable shot was queued; None when none is) and `running_by_project` (every
        project with unfinished work or a running shot, zeros included)."""
        final = _marks(sorted(FINAL))
        with self._read() as tx:
            shots = tx.db.execute(
                "SELECT t.priority, s.state, COUNT(*) AS n FROM shots s JOIN stories t ON t.id = s.story_id"
                f" WHERE t.state NOT IN ({final}) GROUP BY t.priority, s.state", sorted(FINAL)).fetchall()
            stories = tx.db.execute(f"SELECT priority, state, COUNT(*) AS n FROM stories WHERE state NOT IN ({final})"
                                    " GROUP BY priority, state", sorted(FINAL)).fetchall()
            oldest = tx.db.execute(
                "SELECT MIN(s.updated_at) AS t FROM shots s JOIN stories t ON t.id = s.story_id"
                " WHERE s.state = 'queued' AND t.state NOT IN ('paused', 'cancelled')").fetchone()["t"]
            running = tx.db.execute(
                "SELECT t.project, SUM(s.state = 'running') AS n FROM shots s JOIN stories t ON t.id = s.story_id"
                f" WHERE t.state NOT IN ({final}) OR s.state = 'running' GROUP BY t.project", sorted(FINAL)).fetchall()
        return {"shots": [tuple(r) for r in shots], "stories": [tuple(r) for r in stories], "oldest_queued_at": oldest,
                "running_by_project": {r["project"]: r["n"] for r in running}}

    def rerender_requested_at(self, story_id: str, before: float) -> float | None:
        """When the latest re-render of the story requested at or before `before` was requested;
        None when there was none. A re-render needs a finished story, so a story that ends at
        `before` after one ends that re-render, not its first render (the metrics keep them apart)."""
        with self._read() as tx:
            return tx.db.execute("SELECT MAX(created_at) AS t FROM rerenders WHERE story_id = ? AND created_at <= ?",
                                 (story_id, before)).fetchone()["t"]

    def open_batches(self) -> list[tuple[str, int, float | None]]:
        """(batch id, unfinished stories, deadline) of every batch with a story not yet final."""
        final = _marks(sorted(FINAL))
        with self._read() as tx:
            rows = tx.db.execute(
                f"SELECT batch_id, SUM(state NOT IN ({final})) AS open, MIN(deadline) AS deadline FROM stories"
                " WHERE batch_id IS NOT NULL GROUP BY batch_id HAVING open > 0 ORDER BY batch_id", sorted(FINAL)).fetchall()
        return [(r["batch_id"], r["open"], r["deadline"]) for r in rows]
