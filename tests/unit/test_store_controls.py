"""The job store's controls: cancel, pause, resume, retry of a shot, and priority, with the work
order they leave behind. Every test works on a real SQLite file (WAL only exists on disk)."""

from __future__ import annotations

import pytest

from helpers.job_store import artifact, run, shot_id, states, submit, tick
from storyfarm.daemon.store import JobStore, NotFound, StateError


# --- control --------------------------------------------------------------------------------

def test_cancel_a_queued_story_and_refusals(store):
    story_id = submit(store, 3)
    record = store.request_cancel(story_id, now=tick())
    assert (record.state, [s.state for s in record.shots]) == ("cancelled", ["cancelled"] * 3)
    assert record.cancel_requested_at is not None and record.finished_at is not None
    assert store.request_cancel(story_id).state == "cancelled"  # a repeat is a no-op
    assert store.runnable_shots(10) == []
    with pytest.raises(NotFound, match="no story st_missing"):
        store.request_cancel("st_missing")
    done = submit(store, 1)
    run(store, done, 0)
    allowed = "queued, running, paused or cancelled"
    with pytest.raises(StateError, match=f"is succeeded; cancel is allowed when it is {allowed}"):
        store.request_cancel(done)
    for op in (store.request_pause, store.resume, lambda sid: store.set_priority(sid, 3)):
        with pytest.raises(StateError, match="is succeeded"):
            op(done)


@pytest.mark.parametrize("outcome, shot_state", [("succeeded", "succeeded"), ("cancelled", "cancelled"),
                                                 ("failed", "cancelled"), ("lost", "cancelled")])
def test_cancel_flags_the_running_shot_and_keeps_what_it_finishes(store, outcome, shot_state):
    story_id = submit(store, 3)
    run(store, story_id, 0)
    attempt = store.start_attempt(shot_id(store, story_id, 1), "gpu0", now=tick())
    assert not store.cancel_requested(shot_id(store, story_id, 1))
    record = store.request_cancel(story_id, now=tick())
    assert (record.state, [s.state for s in record.shots]) == ("cancelled", ["succeeded", "running", "cancelled"])
    assert store.cancel_requested(shot_id(store, story_id, 1))
    kw = {"artifacts": [artifact("late.mp4")]} if outcome == "succeeded" else {}
    store.finish_attempt(attempt, outcome, now=tick(), **kw)
    record = store.get_story(story_id)
    assert (record.state, [s.state for s in record.shots]) == ("cancelled", ["succeeded", shot_state, "cancelled"])
    assert ("late.mp4" in [a.name for a in record.artifacts]) == (outcome == "succeeded")
    with pytest.raises(NotFound):
        store.cancel_requested("sh_missing")


def test_a_last_shot_finishing_after_cancel_leaves_the_story_cancelled(store):
    story_id = submit(store, 1)
    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    store.request_cancel(story_id, now=tick())
    store.finish_attempt(attempt, "succeeded", artifacts=[artifact("kept.mp4")], now=tick())
    record = store.get_story(story_id)
    assert (record.state, record.shots[0].state, record.artifacts[0].name) == ("cancelled", "succeeded", "kept.mp4")


def test_a_worker_cancelling_its_shot_cancels_the_story(store):
    story_id = submit(store, 2)
    run(store, story_id, 0, "cancelled")
    record = store.get_story(story_id)
    assert (record.state, [s.state for s in record.shots]) == ("cancelled", ["cancelled", "cancelled"])
    assert "cancelled by its worker" in record.error


def test_pause_holds_unstarted_shots_and_resume_releases_them(store):
    story_id = submit(store, 3)
    record = store.request_pause(story_id, now=tick())
    assert (record.state, [s.state for s in record.shots]) == ("paused", ["paused"] * 3)
    assert record.pause_requested_at is not None
    assert store.request_pause(story_id).state == "paused"  # a repeat is a no-op
    with pytest.raises(StateError, match="is paused"):
        store.start_attempt(shot_id(store, story_id, 0), "gpu0")
    record = store.resume(story_id, now=tick())
    assert (record.state, [s.state for s in record.shots]) == ("queued", ["queued", "waiting", "waiting"])
    assert record.pause_requested_at is None

    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    assert states(store, story_id) == ("running", ["running", "waiting", "waiting"])
    assert store.request_pause(story_id, now=tick()).state == "paused"
    assert states(store, story_id) == ("paused", ["running", "paused", "paused"])  # the running shot finishes
    assert not store.cancel_requested(shot_id(store, story_id, 0))
    store.finish_attempt(attempt, "succeeded", now=tick())
    assert states(store, story_id) == ("paused", ["succeeded", "paused", "paused"])
    assert store.runnable_shots(10) == []
    assert store.resume(story_id, now=tick()).state == "running"
    assert states(store, story_id) == ("running", ["succeeded", "queued", "waiting"])
    assert store.resume(story_id).state == "running"  # resuming a story that runs is a no-op


def test_a_shot_retried_while_paused_stays_held(store):
    story_id = submit(store, 2)
    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    store.request_pause(story_id, now=tick())
    assert store.finish_attempt(attempt, "failed", error="flaky", now=tick()).state == "paused"
    assert store.runnable_shots(10) == []
    assert states(store, store.resume(story_id).id) == ("running", ["queued", "waiting"])


def test_a_story_failing_while_paused_leaves_its_later_shots_waiting_for_a_retry(store):
    story_id = submit(store, 3)
    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    store.request_pause(story_id, now=tick())
    store.finish_attempt(attempt, "failed", error="bad prompt", retryable=False, now=tick())
    assert states(store, story_id) == ("failed", ["failed", "waiting", "waiting"])
    assert store.get_story(story_id).pause_requested_at is None
    with pytest.raises(StateError, match="is failed; resume is allowed when it is paused, cancelled, queued or running"):
        store.resume(story_id)
    assert states(store, store.retry_shot(story_id, 0).id) == ("running", ["queued", "waiting", "waiting"])


def test_runnable_shots_order_by_priority_then_age_and_follow_priority_changes(store):
    old, mid, new = submit(store, 2), submit(store, 2), submit(store, 2)
    urgent = submit(store, 2, priority=5)
    paused = submit(store, 1, priority=9)
    store.request_pause(paused)
    assert [s.story_id for s in store.runnable_shots(10)] == [urgent, old, mid, new]
    assert [s.story_id for s in store.runnable_shots(2)] == [urgent, old]
    record = store.set_priority(new, 7, now=tick())
    assert record.priority == 7
    assert [s.story_id for s in store.runnable_shots(10)] == [new, urgent, old, mid]
    assert store.events_since(new)[-1].payload == {"from": 0, "to": 7}


def test_the_out_of_memory_retry_is_its_own_allowance_not_the_retry_budget(db_path):
    """With max_attempts 1, one out-of-memory failure still re-queues the shot in low-memory mode;
    a second one fails it (the store decides, whatever the budget); a user retry starts afresh."""
    with JobStore.open(db_path, max_attempts=1) as store:
        story_id = submit(store, 2)
        shot = run(store, story_id, 0, "failed", error="out_of_memory in denoise", reason="out_of_memory")
        assert (shot.state, shot.low_memory) == ("queued", True)
        assert [a.reason for a in store.attempts(shot.id)] == ["out_of_memory"]
        shot = run(store, story_id, 0, "failed", error="out_of_memory in denoise", reason="out_of_memory")
        assert shot.state == "failed" and states(store, story_id)[0] == "failed"
        store.retry_shot(story_id, 0, now=tick())
        assert store.shot(shot.id).low_memory is False
        content = run(store, story_id, 0, "failed", error="boom", reason="content")
        assert content.state == "failed"  # the ordinary budget: one attempt, spent
        store.retry_shot(story_id, 0, now=tick())
        assert run(store, story_id, 0, "lost", error="worker died", reason="worker_died").state == "queued"
        assert [a.reason for a in store.attempts(shot.id)][-1] == "worker_died"


def test_the_v4_upgrade_keeps_a_pending_low_memory_retry(db_path):
    """Before v4 the dispatcher read the low-memory retry from the attempt's error text."""
    import sqlite3

    from storyfarm.daemon.store_schema import MIGRATIONS, connect, migrate

    db = connect(str(db_path), busy_timeout_s=1.0)
    migrate(db, MIGRATIONS[:3])
    db.execute("INSERT INTO stories (id, project, request_id, payload_sha256, name, document, state, created_at,"
               " updated_at) VALUES ('st_1', 'p', 'r', 'x', 'n', '{}', 'running', 1, 1)")
    db.execute("INSERT INTO shots (id, story_id, idx, scene, shot, prompt, settings, state, updated_at)"
               " VALUES ('sh_1', 'st_1', 0, 1, 1, 'a', '{}', 'queued', 1)")
    db.execute("INSERT INTO attempts (id, shot_id, story_id, number, worker, started_at, finished_at, outcome, error,"
               " retryable) VALUES ('at_1', 'sh_1', 'st_1', 1, 'w0', 1, 2, 'failed',"
               " 'out_of_memory in denoise (retrying once with low-memory settings): CUDA out of memory', 1)")
    db.close()
    with JobStore.open(db_path) as store:
        shot = store.shot("sh_1")
        assert shot.low_memory and [a.reason for a in store.attempts("sh_1")] == ["out_of_memory"]
