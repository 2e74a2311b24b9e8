"""The daemon killed at its worst moments and at random ones: every acknowledged story finishes
exactly once.

Two scenarios on real `storyfarm serve` processes sharing one data dir across their lives:
- named crash points, one life each (scheduler/gpu_pool/faults.py): SIGKILL right after a submit commits
  (the client has no answer: its retry with the same request id must find the story), in the
  middle of a worker's atomic write (a half-written temporary, never a half-written clip), after a
  shot's files are published but before the store records them (the shot re-runs and is recorded
  once), and in the middle of start-up recovery (its transaction rolls back; the next start
  recovers each attempt once);
- random SIGKILLs: N stories submitted across the lives of the daemon, the daemon killed K times
  at random moments (alternately with its workers, and alone so its workers are orphaned), then
  started once more to finish.
Each ends with helpers.audit: all stories succeeded, one final record and one published artifact
per shot whose sha256 matches the file, SQLite integrity, no temporary left; attempts per shot
go to the figures.
"""

from __future__ import annotations

import json
import random
import signal
import time
import uuid

import grpc
import pytest

from helpers.audit import audit, leftovers, summary
from helpers.daemon_proc import DaemonProcess
from storyfarm.daemon.client import RetryPolicy, StoryfarmClient
from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb

pytestmark = pytest.mark.slow


def story_text(name: str, shots: int = 2) -> str:
    return json.dumps({"name": name, "seed": 7, "resolution": "64x32", "frames": 5, "steps": 2,
                       "shots": [{"prompt": f"{name}: shot {i} of the harbour", **({"cut": False} if i % 2 else {})}
                                 for i in range(shots)]})


def wait_finished(daemon: DaemonProcess, story_ids, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    pending = set(story_ids)
    while pending:
        for story_id in list(pending):
            story = daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id, view=pb.STORY_VIEW_BASIC), timeout=10)
            assert story.state not in (pb.STORY_STATE_FAILED, pb.STORY_STATE_CANCELLED), story
            if story.state == pb.STORY_STATE_SUCCEEDED:
                pending.discard(story_id)
        assert time.monotonic() < deadline, f"stories still unfinished: {pending}; {daemon.tail()}"
        time.sleep(0.2)


def open_attempts(data) -> list[tuple[str, int]]:
    with JobStore.open(data / "storyfarm.db") as store:
        out = []
        for story in store.list_stories(page_size=100)[0]:
            for shot in story.shots:
                out += [(story.id, shot.index) for a in store.attempts(shot.id) if a.finished_at is None]
        return out


def story_by_request(data, request_id: str):
    with JobStore.open(data / "storyfarm.db") as store:
        return next((s for s in store.list_stories(page_size=100)[0] if s.request_id == request_id), None)


def test_named_crash_points_lose_nothing_and_publish_nothing_twice(tmp_path, figures):
    data = tmp_path / "data"
    request_a, request_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    lives = []

    def life(crash_at: str | None) -> DaemonProcess:
        d = DaemonProcess(data, env={"STORYFARM_CRASH_AT": crash_at} if crash_at else {})
        lives.append(d)
        return d

    try:
        # 1. A first story is acknowledged; the second submit's transaction commits, then SIGKILL
        #    before the reply.
        d = life("after_submit_commit:2").start()
        story_b = d.stub.SubmitStory(pb.SubmitStoryRequest(request_id=request_b, story_json=story_text("bravo")),
                                     timeout=30).story_id
        with pytest.raises(grpc.RpcError) as err:
            d.stub.SubmitStory(pb.SubmitStoryRequest(request_id=request_a, story_json=story_text("alpha")), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert d.proc.wait(timeout=30) == -signal.SIGKILL
        committed = story_by_request(data, request_a)
        assert committed is not None and committed.state == "queued", "the commit before the crash was lost"

        # 2. The host dies in the middle of a worker's first atomic write (often before its health
        #    check says SERVING: the queued story starts as soon as the worker is ready).
        d = life("mid_artifact_write:1").start(wait=False)
        assert d.proc.wait(timeout=120) == -signal.SIGKILL, d.tail()
        half_written = leftovers(data)
        assert half_written, "the crash point did not leave its temporary: it was not mid-write"

        # 3. Restart: the temporary is swept; the first shot to finish is published, then the
        #    daemon dies before recording it.
        d = life("after_publish_before_commit:1").start(wait=False)
        assert d.proc.wait(timeout=120) == -signal.SIGKILL, d.tail()
        assert not set(half_written) & set(leftovers(data)), "start-up left the crash's temporary in place"
        unrecorded = open_attempts(data)
        assert len(unrecorded) == 1, unrecorded
        story_id, index = unrecorded[0]
        with JobStore.open(data / "storyfarm.db") as store:
            record = store.get_story(story_id)
        assert not [a for a in record.artifacts if a.shot_index == index and a.kind == "shot_video"]
        assert list((data / "stories" / story_id / "shots").glob(f"{index + 1:03d}_*.mp4")), "its clip was not published"

        # 4. SIGKILL in the middle of recovery: its transaction rolls back, the attempt stays open.
        assert life("during_recovery:1").start_expecting_death() == -signal.SIGKILL
        assert open_attempts(data) == unrecorded

        # 5. A clean start: the client that never got its answer retries with the same request id
        #    and finds the story the first life committed; both stories finish.
        d = life(None).start()
        with StoryfarmClient(f"127.0.0.1:{d.port}", timeout=30, retry=RetryPolicy(initial=0.05)) as client:
            again = client.submit(story_text("alpha"), request_id=request_a)
        assert again["story_id"] == committed.id and again["created"] is False
        wait_finished(d, [committed.id, story_b])
    finally:
        for d in lives:
            d.stop()
    report = audit(data, [committed.id, story_b])
    outcomes = report["attempts"][story_id][index]
    assert outcomes.count("lost") >= 1 and outcomes[-1] == "succeeded" and "failed" not in outcomes, outcomes
    figures["crash points"] = {"points": ["after_submit_commit", "mid_artifact_write", "after_publish_before_commit",
                                          "during_recovery"], "daemon lives": len(lives), **summary(report)}


def test_random_sigkills_finish_every_acknowledged_story_exactly_once(tmp_path, scale, figures):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    data = tmp_path / "data"
    n, kills = scale.crash_stories, scale.crash_kills
    requests = {f"story-{i}-{uuid.uuid4().hex[:8]}": story_text(f"s{i}", shots=2 + i % 2) for i in range(n)}
    acknowledged: dict[str, str] = {}  # request id -> story id
    per_life = -(-n // (kills + 1))
    lives, styles = [], []
    try:
        for kill in range(kills + 1):
            d = DaemonProcess(data).start()
            lives.append(d)
            with StoryfarmClient(f"127.0.0.1:{d.port}", timeout=10, retry=RetryPolicy(attempts=2, initial=0.05)) as client:
                todo = [r for r in requests if r not in acknowledged][:per_life]
                for request_id in [*todo, *acknowledged][: len(todo) + 1]:  # new ones, and one repeat
                    result = client.submit(requests[request_id], request_id=request_id)
                    assert acknowledged.setdefault(request_id, result["story_id"]) == result["story_id"]
            if kill == kills:
                break
            time.sleep(rng.uniform(*scale.kill_after_s))
            group = kill % 2 == 0  # a host crash (daemon and workers), or the daemon alone
            styles.append("daemon and workers" if group else "daemon alone")
            d.kill(signal.SIGKILL, group=group)
        assert len(acknowledged) == n
        wait_finished(lives[-1], acknowledged.values())
    finally:
        for d in lives:
            d.stop()
    report = audit(data, acknowledged.values())
    with JobStore.open(data / "storyfarm.db") as store:
        stored = sum(store.count_stories_by_state().values())
    assert stored == n, f"{stored} stories stored for {n} request ids: a retried submit made a duplicate"
    figures["random kills"] = {"seed": seed, "kills": kills, "kill styles": styles, "stories stored": stored,
                               **summary(report)}
