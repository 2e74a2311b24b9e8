"""The job store's SQLite file: connection settings and the versioned schema.

Durability is set here, per connection, before anything else runs: WAL journal (readers never block
the writer), synchronous=FULL (a commit is on disk when COMMIT returns, so an acknowledged submit
survives power loss), foreign keys on, and a busy timeout so two connections wait for each other
instead of failing.
Invariants:
- the schema version is PRAGMA user_version and equals the number of migrations applied;
- migrations are forward-only and frozen: once shipped, a migration's text never changes (write a
  new one instead), which is why the DDL below spells out its state lists rather than importing them;
- all pending migrations run in one BEGIN IMMEDIATE transaction together with the version bump, so a
  failed upgrade leaves the file at its old version, untouched;
- a file newer than this code is refused (SchemaTooNew), never downgraded or written to.
Stdlib only: the daemon process stays free of torch.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Sequence

__all__ = ["SchemaTooNew", "MIGRATIONS", "connect", "migrate", "schema_version"]


class SchemaTooNew(RuntimeError):
    """The database was written by a newer storyfarm; this one does not know its schema."""


_V1 = (
    """CREATE TABLE stories (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        request_id TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        name TEXT NOT NULL,
        document TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'paused')),
        priority INTEGER NOT NULL DEFAULT 0,
        deadline REAL,
        batch_id TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        cancel_requested_at REAL,
        pause_requested_at REAL,
        UNIQUE (project, request_id))""",
    "CREATE INDEX stories_created ON stories (created_at, id)",
    "CREATE INDEX stories_batch ON stories (batch_id, created_at, id) WHERE batch_id IS NOT NULL",
    "CREATE INDEX stories_state ON stories (state)",
    """CREATE TABLE story_labels (
        story_id TEXT NOT NULL REFERENCES stories (id),
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (story_id, key))""",
    "CREATE INDEX story_labels_kv ON story_labels (key, value)",
    # failures: non-lost failed attempts since the shot was last (re)queued by a user; the retry budget.
    """CREATE TABLE shots (
        id TEXT PRIMARY KEY,
        story_id TEXT NOT NULL REFERENCES stories (id),
        idx INTEGER NOT NULL,
        scene INTEGER NOT NULL,
        shot INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        settings TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'waiting', 'running', 'succeeded', 'failed', 'cancelled', 'paused')),
        failures INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        result TEXT,
        cancel_requested_at REAL,
        updated_at REAL NOT NULL,
        UNIQUE (story_id, idx))""",
    "CREATE INDEX shots_state ON shots (state)",
    """CREATE TABLE attempts (
        id TEXT PRIMARY KEY,
        shot_id TEXT NOT NULL REFERENCES shots (id),
        story_id TEXT NOT NULL REFERENCES stories (id),
        number INTEGER NOT NULL,
        worker TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT CHECK (outcome IN ('succeeded', 'failed', 'cancelled', 'lost')),
        error TEXT,
        retryable INTEGER,
        UNIQUE (shot_id, number))""",
    "CREATE INDEX attempts_story ON attempts (story_id)",
    "CREATE INDEX attempts_open ON attempts (started_at) WHERE finished_at IS NULL",
    """CREATE TABLE artifacts (
        story_id TEXT NOT NULL REFERENCES stories (id),
        shot_index INTEGER,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL CHECK (size >= 0),
        sha256 TEXT NOT NULL,
        attempt_id TEXT REFERENCES attempts (id),
        created_at REAL NOT NULL,
        PRIMARY KEY (story_id, name))""",
    # AUTOINCREMENT: a watcher resumes from the last seq it saw, so seqs are never reused.
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        story_id TEXT NOT NULL,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL)""",
    "CREATE INDEX events_story ON events (story_id, seq)",
)


def _v1(db: sqlite3.Connection) -> None:
    for statement in _V1:
        db.execute(statement)


# Version 2: shot re-renders (RerenderShot). A shot keeps the edit its re-renders made (prompt and
# seed, applied to every later take), the strength its pending take starts with (cleared once the
# take succeeds) and its take number; every request is kept, idempotent by (story, request id).
_V2 = (
    "ALTER TABLE shots ADD COLUMN edit TEXT",
    "ALTER TABLE shots ADD COLUMN strength REAL",
    "ALTER TABLE shots ADD COLUMN take INTEGER NOT NULL DEFAULT 1",
    """CREATE TABLE rerenders (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        story_id TEXT NOT NULL REFERENCES stories (id),
        request_id TEXT,
        shot_index INTEGER NOT NULL,
        take INTEGER NOT NULL,
        prompt TEXT,
        strength REAL,
        seed INTEGER,
        cascade INTEGER NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (story_id, request_id))""",
)


def _v2(db: sqlite3.Connection) -> None:
    for statement in _V2:
        db.execute(statement)


def _v3(db: sqlite3.Connection) -> None:
    """Version 3: the fingerprint of the whole submit request (payload plus priority, labels,
    deadline, batch and preset), so a reused request id with other settings is a conflict too.
    Stories written before have none and are compared by payload alone."""
    db.execute("ALTER TABLE stories ADD COLUMN request_sha256 TEXT")


def _v4(db: sqlite3.Connection) -> None:
    """Version 4: the out-of-memory retry is an allowance of its own, not the retry budget. A shot
    counts its out-of-memory failures since it was last (re)queued by a user (its next attempt
    renders in low-memory mode once there is one), and every attempt keeps the reason it failed
    for (content, out_of_memory, ...), so nothing re-derives it from the error text."""
    db.execute("ALTER TABLE shots ADD COLUMN oom_failures INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE attempts ADD COLUMN reason TEXT")
    # Before, the dispatcher read the low-memory retry from the error text: a shot waiting for that
    # retry at the upgrade keeps it.
    db.execute("""UPDATE shots SET oom_failures = 1 WHERE state IN ('queued', 'waiting', 'paused') AND EXISTS (
        SELECT 1 FROM attempts a WHERE a.shot_id = shots.id AND a.outcome = 'failed' AND a.error LIKE 'out_of_memory%')""")
    db.execute("UPDATE attempts SET reason = 'out_of_memory' WHERE outcome = 'failed' AND error LIKE 'out_of_memory%'")


# Migration n (1-based) brings a file from version n-1 to n. Append only.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4]


def connect(path: str, *, busy_timeout_s: float) -> sqlite3.Connection:
    """Open `path` with the store's durability settings; transactions are explicit (autocommit mode)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(
                f"{path}: SQLite refused WAL mode (got {mode!r}); put the data directory on a local disk")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection, migrations: Sequence[Callable[[sqlite3.Connection], None]] | None = None) -> int:
    """Bring the file up to the newest schema in one transaction; returns the version reached."""
    migrations = MIGRATIONS if migrations is None else migrations
    target = len(migrations)
    db.execute("BEGIN IMMEDIATE")  # taken before reading the version: two daemons cannot both migrate
    try:
        version = schema_version(db)
        if version > target:
            raise SchemaTooNew(
                f"database schema version {version} is newer than this storyfarm supports ({target}); "
                "run the storyfarm release that wrote it, or restore a backup")
        for migration in migrations[version:]:
            migration(db)
        if version != target:
            db.execute(f"PRAGMA user_version = {target}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return target
