"""The job store across failures: crash recovery, an acknowledged submit surviving SIGKILL, the
durability settings, schema migrations, atomicity under an injected failure, and threads sharing
the store. Every test works on a real SQLite file (WAL only exists on disk)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers.job_store import artifact, run, sha, shot_id, shots_in, states, submit, tick
from storyfarm.daemon import store_tx
from storyfarm.daemon import store_schema
from storyfarm.daemon.store import JobStore, SchemaTooNew, StateError


# --- crashes, durability, schema ------------------------------------------------------------

def test_recovery_requeues_shots_of_a_dead_daemon_without_spending_their_budget(db_path):
    old = JobStore.open(db_path, max_attempts=2)
    story_id = submit(old, 3)
    run(old, story_id, 0)
    stale = old.start_attempt(shot_id(old, story_id, 1), "gpu0", now=tick())
    with JobStore.open(db_path, max_attempts=2) as new:  # the restarted daemon, while the old one still holds the file
        assert new.recover(now=tick()) == 1
        assert states(new, story_id) == ("running", ["succeeded", "queued", "waiting"])
        assert [s.index for s in new.runnable_shots(10)] == [1]  # the succeeded shot is not run again
        assert [a.outcome for a in new.attempts(shot_id(new, story_id, 1))] == ["lost"]
        with pytest.raises(StateError, match="already finished as lost"):
            old.finish_attempt(stale, "succeeded")  # a late report from the old daemon's worker
        assert new.recover() == 0
        assert run(new, story_id, 1, "failed").state == "queued"  # 1 failure of 2: lost did not count
        run(new, story_id, 1)
        run(new, story_id, 2)
        assert new.get_story(story_id).state == "succeeded" and new.integrity_check()
    old.close()


def test_an_acknowledged_submit_survives_sigkill_and_the_store_never_imports_torch(db_path):
    script = f"""
import os, signal, sys
from storyfarm.daemon.store import JobStore, ShotIn
store = JobStore.open({str(db_path)!r})
result = store.submit_story("r", "p", "{sha('x')}", "n", "{{}}", [ShotIn(0, 1, 1, "p")])
print(result.story_id, "torch" in sys.modules, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    story_id, torch_loaded = done.stdout.split()
    assert torch_loaded == "False"
    with JobStore.open(db_path) as store:
        assert store.get_story(story_id).state == "queued" and store.integrity_check()


def test_the_store_runs_wal_with_full_sync_and_a_busy_timeout(db_path):
    with JobStore.open(db_path, busy_timeout_s=2.5) as store:
        assert store.pragmas() == {"journal_mode": "wal", "synchronous": "full", "busy_timeout": 2500,
                                   "foreign_keys": 1, "user_version": len(store_schema.MIGRATIONS)}
    with JobStore.open(db_path):
        assert Path(str(db_path) + "-wal").exists()


def _add_story_notes(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE stories ADD COLUMN notes TEXT NOT NULL DEFAULT ''")


def test_an_older_database_is_migrated_forward_with_its_data(db_path, monkeypatch):
    with JobStore.open(db_path) as store:
        story_id = submit(store, 2)
        run(store, story_id, 0)
    version = len(store_schema.MIGRATIONS)
    monkeypatch.setattr(store_schema, "MIGRATIONS", [*store_schema.MIGRATIONS, _add_story_notes])
    with JobStore.open(db_path) as store:
        assert store.pragmas()["user_version"] == version + 1
        assert states(store, story_id) == ("running", ["succeeded", "queued"])
        run(store, story_id, 1)
        assert store.get_story(story_id).state == "succeeded"
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT notes FROM stories").fetchall() == [("",)]


def test_a_failed_migration_leaves_the_old_version_untouched(db_path, monkeypatch):
    JobStore.open(db_path).close()
    version = len(store_schema.MIGRATIONS)

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")
    monkeypatch.setattr(store_schema, "MIGRATIONS", [*store_schema.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        JobStore.open(db_path)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == version
        assert raw.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall() == []


def test_a_database_newer_than_the_code_is_refused(db_path):
    JobStore.open(db_path).close()
    newer = len(store_schema.MIGRATIONS) + 1
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaTooNew, match=f"version {newer} is newer"):
        JobStore.open(db_path)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == newer


def _fail_on(monkeypatch, kind: str, to: str | None = None) -> None:
    """Make the event write for one transition raise, after the transaction has written other rows."""
    emit = store_tx.Tx.emit

    def failing(self, story_id, event_kind, **payload):
        if event_kind == kind and (to is None or payload.get("to") == to):
            raise OSError("injected failure")
        emit(self, story_id, event_kind, **payload)
    monkeypatch.setattr(store_tx.Tx, "emit", failing)


def test_a_failure_mid_transaction_leaves_nothing_half_written(store, monkeypatch):
    story_id = submit(store, 2)
    run(store, story_id, 0)
    attempt = store.start_attempt(shot_id(store, story_id, 1), "gpu0", now=tick())
    before = store.get_story(story_id), store.events_since(None)
    _fail_on(monkeypatch, "story_state", to="succeeded")  # after the attempt, shot and artifact rows
    with pytest.raises(OSError, match="injected"):
        store.finish_attempt(attempt, "succeeded", artifacts=[artifact("last.mp4")], now=tick())
    _fail_on(monkeypatch, "story_state", to="queued")  # after the story and shot rows
    with pytest.raises(OSError, match="injected"):
        store.submit_story("atomic", "p", sha("z"), "n", "{}", shots_in(3), now=tick())
    assert (store.get_story(story_id), store.events_since(None)) == before
    assert [a.outcome for a in store.attempts(shot_id(store, story_id, 1))] == [None]
    assert store.list_stories(project="p", page_size=1000)[0] == [before[0]]
    monkeypatch.undo()
    assert store.finish_attempt(attempt, "succeeded", now=tick()).state == "succeeded"
    assert store.submit_story("atomic", "p", sha("z"), "n", "{}", shots_in(3)).created


def test_threads_and_a_second_connection_share_the_store(db_path):
    stores = [JobStore.open(db_path), JobStore.open(db_path)]
    errors: list[BaseException] = []

    def client(n: int) -> None:
        store = stores[n % 2]
        try:
            mine = [store.submit_story(f"r{n}-{k}", "p", sha("s"), "n", "{}", shots_in(3)).story_id for k in range(2)]
            mine.append(store.submit_story("shared", "p", sha("s"), "n", "{}", shots_in(3)).story_id)
            while any(store.get_story(s).state != "succeeded" for s in mine):
                for shot in store.runnable_shots(4):
                    try:
                        attempt = store.start_attempt(shot.id, f"w{n}")
                    except StateError:
                        continue  # another thread took it first
                    store.finish_attempt(attempt, "succeeded")
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    records, _ = stores[0].list_stories(page_size=1000)
    assert len(records) == 13  # 6 x 2 own stories + one shared request id
    assert all(r.state == "succeeded" and [s.attempts for s in r.shots] == [1, 1, 1] for r in records)
    assert stores[1].integrity_check()
    for store in stores:
        store.close()
