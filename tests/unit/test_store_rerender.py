"""The job store's re-render transition (RerenderShot): a new take of one shot of a finished story,
its edit kept with the shot, the later shots waiting only with a cascade, artifacts republished
under their names (stale keyframes withdrawn), idempotent by request id, and the v1 -> v2 migration."""

from __future__ import annotations

import sqlite3

import pytest

from helpers.job_store import artifact, run, sha, states, submit, tick
from storyfarm.daemon import store_schema
from storyfarm.daemon.store import ArtifactIn, IdempotencyConflict, JobStore, NotFound, StateError


@pytest.fixture
def store(tmp_path):
    with JobStore.open(tmp_path / "jobs.db") as opened:
        yield opened


def finished(store, n=3) -> str:
    sid = submit(store, n)
    for i in range(n):
        finish = i == n - 1
        extra = [ArtifactIn("story.mp4", "story_video", "stories/x/story.mp4", 5, sha(f"story{i}"), story_level=True),
                 ArtifactIn("keyframes/s000f001.png", "keyframe", "stories/x/k.png", 5, sha("k1"), story_level=True)] if finish else []
        run(store, sid, i, artifacts=[artifact(f"shot_{i:03d}.mp4"), *extra])
    assert states(store, sid) == ("succeeded", ["succeeded"] * n)
    return sid


def test_a_rerender_queues_one_take_and_keeps_the_others(store):
    sid = finished(store)
    record = store.rerender_shot(sid, 1, prompt="a storm", strength=0.5, now=tick())
    assert (record.state, [s.state for s in record.shots]) == ("running", ["succeeded", "queued", "succeeded"])
    shot = record.shots[1]
    assert (shot.take, shot.prompt, shot.edit, shot.strength) == (2, "a storm", {"prompt": "a storm"}, 0.5)
    assert shot.render_edit() == {"prompt": "a storm", "strength": 0.5}
    assert record.finished_at is None and record.error is None
    # the new take republishes under the same names; the story is assembled again; stale keyframes go
    new_story = ArtifactIn("story.mp4", "story_video", "stories/x/story.mp4", 7, sha("story-new"), story_level=True)
    new_key = ArtifactIn("keyframes/s001f004.png", "keyframe", "stories/x/k4.png", 5, sha("k4"), story_level=True)
    shot = run(store, sid, 1, artifacts=[ArtifactIn("shot_001.mp4", "shot_video", "stories/x/1.mp4", 9, sha("take2")),
                                          new_story, new_key])
    assert shot.strength is None and shot.render_edit() == {"prompt": "a storm"}  # the strength was for that take
    record = store.get_story(sid)
    assert record.state == "succeeded"
    by_name = {a.name: a.sha256 for a in record.artifacts}
    assert by_name["shot_001.mp4"] == sha("take2") and by_name["story.mp4"] == sha("story-new")
    assert by_name["shot_000.mp4"] == sha("shot_000.mp4") and by_name["shot_002.mp4"] == sha("shot_002.mp4")
    assert "keyframes/s000f001.png" not in by_name and "keyframes/s001f004.png" in by_name
    kinds = [e.kind for e in store.events_since(sid)]
    assert "rerender_requested" in kinds


def test_a_cascade_makes_the_later_shots_wait_and_the_last_one_finishes(store):
    sid = finished(store, 4)
    record = store.rerender_shot(sid, 1, seed=5, cascade=True, now=tick())
    assert [s.state for s in record.shots] == ["succeeded", "queued", "waiting", "waiting"]
    assert [s.take for s in record.shots] == [1, 2, 2, 2] and record.shots[1].edit == {"seed": 5}
    for i in (1, 2, 3):
        run(store, sid, i)
        expected = "succeeded" if i == 3 else "running"
        assert states(store, sid)[0] == expected
    # an earlier edit stays with its shot through a later cascade
    store.rerender_shot(sid, 3, prompt="gulls", now=tick())
    run(store, sid, 3)
    record = store.rerender_shot(sid, 2, cascade=True, now=tick())
    assert record.shots[3].render_edit() == {"prompt": "gulls"} and record.shots[3].prompt == "gulls"


def test_refusals_and_idempotency(store):
    sid = finished(store)
    with pytest.raises(NotFound, match=r"has no shot_index 3 \(shot 4\)"):
        store.rerender_shot(sid, 3)
    first = store.rerender_shot(sid, 0, prompt="x", request_id="r1", now=tick())
    assert store.rerender_shot(sid, 0, prompt="x", request_id="r1").shots[0].take == first.shots[0].take == 2
    with pytest.raises(IdempotencyConflict):
        store.rerender_shot(sid, 0, prompt="y", request_id="r1")
    with pytest.raises(StateError, match="is running; a re-render is allowed when it is succeeded or failed"):
        store.rerender_shot(sid, 2)
    store.request_cancel(sid, now=tick())  # a story cancelled while its new take waited
    with pytest.raises(StateError, match="is cancelled"):
        store.rerender_shot(sid, 0)
    # a failed story: re-rendering a shot before the failure without a cascade leaves it failed
    failed = submit(store, 3)
    run(store, failed, 0)
    run(store, failed, 1, outcome="failed", retryable=False, error="bad")
    assert states(store, failed) == ("failed", ["succeeded", "failed", "waiting"])
    with pytest.raises(StateError, match="shot 2 .* is failed; a re-render is allowed when it is succeeded"):
        store.rerender_shot(failed, 1)
    store.rerender_shot(failed, 0, now=tick())
    run(store, failed, 0)
    assert states(store, failed) == ("failed", ["succeeded", "failed", "waiting"])


def test_a_version_1_file_migrates(tmp_path):
    path = tmp_path / "old.db"
    db = store_schema.connect(str(path), busy_timeout_s=1)
    store_schema.migrate(db, store_schema.MIGRATIONS[:1])
    db.execute("INSERT INTO stories (id, project, request_id, payload_sha256, name, document, state, created_at, updated_at)"
               " VALUES ('st_1', 'p', 'r', ?, 'n', '{}', 'succeeded', 1, 1)", (sha("x"),))
    db.execute("INSERT INTO shots (id, story_id, idx, scene, shot, prompt, settings, state, updated_at)"
               " VALUES ('sh_1', 'st_1', 0, 1, 1, 'a', '{}', 'succeeded', 1)")
    db.close()
    with JobStore.open(path) as store:
        assert store.pragmas()["user_version"] == len(store_schema.MIGRATIONS)
        shot = store.get_story("st_1").shots[0]
        assert (shot.take, shot.edit, shot.strength) == (1, None, None)
        assert store.rerender_shot("st_1", 0, prompt="b").shots[0].take == 2
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM rerenders").fetchone()[0] == 1
