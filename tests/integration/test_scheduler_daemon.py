"""The daemon with two CPU worker processes: concurrent stories stay on the worker holding their
memory, and a worker killed mid-shot costs that shot one lost attempt, re-run on the other
worker with the story intact (byte-identical to an undisturbed render of the same story)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from helpers.daemon_inproc import running_daemon, wait_final
from helpers.daemon_inproc import submit as submit_story
from storyfarm.daemon.server import Daemon
from storyfarm.v1 import render_pb2 as pb

pytestmark = pytest.mark.slow


def story(name: str, shots: int = 3, steps: int = 2, seed: int = 5) -> str:
    return json.dumps({"name": name, "seed": seed, "resolution": "64x32", "frames": 9, "steps": steps,
                       "shots": [{"prompt": f"{name}: shot {i} at the harbour", **({"cut": False} if i == 1 else {})}
                                 for i in range(shots)]})


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("farm"), workers=2, ready_workers=2) as (d, stub):
        yield d, stub


def submit(stub, text: str) -> str:
    return submit_story(stub, text).story_id


def attempts(d: Daemon, story_id: str) -> list[list[tuple[str, str]]]:
    record = d.store.get_story(story_id)
    return [[(a.worker, a.outcome) for a in d.store.attempts(shot.id)] for shot in record.shots]


def shas(d: Daemon, story_id: str) -> list[str]:
    return [shot.result["sha256"] for shot in d.store.get_story(story_id).shots]


def test_four_concurrent_stories_each_stay_on_one_worker(farm):
    d, stub = farm
    ids = [submit(stub, story(f"story{i}", seed=10 + i)) for i in range(4)]
    for story_id in ids:
        assert wait_final(stub, story_id).state == pb.STORY_STATE_SUCCEEDED
    used = set()
    for story_id in ids:
        per_shot = attempts(d, story_id)
        assert all(len(a) == 1 and a[0][1] == "succeeded" for a in per_shot), per_shot
        workers = {a[0][0] for a in per_shot}
        assert len(workers) == 1, f"story {story_id} moved between workers: {per_shot}"
        used |= workers
    assert used == {"w0", "w1"}  # both workers rendered
    assert d.executor.restarts == 0


def test_a_worker_killed_mid_shot_reruns_that_shot_elsewhere_with_the_story_intact(farm):
    d, stub = farm
    text = story("killed", shots=3, steps=40, seed=77)
    story_id = submit(stub, text)
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:
        for w in list(d.executor.workers.values()):
            if w.task is not None and w.task.story_id == story_id and w.task.shot_index == 1:
                victim = w
                break
        assert time.monotonic() < deadline, "shot 1 never started"
        time.sleep(0.01)
    victim_id, pid = victim.id, victim.runtime.process.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_final(stub, story_id).state == pb.STORY_STATE_SUCCEEDED
    per_shot = attempts(d, story_id)
    assert per_shot[1][0] == (victim_id, "lost")
    assert per_shot[1][1][1] == "succeeded" and per_shot[1][1][0] != victim_id  # re-run on the other worker
    assert d.store.get_story(story_id).shots[1].attempts == 2
    assert d.store.shot(d.store.get_story(story_id).shots[1].id).error is None
    assert d.executor.restarts >= 1
    # the same story rendered undisturbed gives the same shots, byte for byte
    control = submit(stub, text)
    assert wait_final(stub, control).state == pb.STORY_STATE_SUCCEEDED
    assert shas(d, story_id) == shas(d, control)


def test_batch_and_story_etas_grow_with_queued_work_and_priority_reorders(farm):
    d, stub = farm
    d.dispatcher.draining = True  # hold placement so the queue stands still while we read the ETAs
    try:
        batch_id = f"night-{uuid.uuid4().hex[:6]}"
        deadline = pb.SubmitBatchRequest().deadline_time.__class__()
        deadline.FromSeconds(int(time.time()) + 3600)
        stories = [pb.SubmitStoryRequest(request_id=f"{batch_id}-{i}", story_json=story(f"night{i}", shots=2 + 2 * i, seed=i))
                   for i in range(3)]
        response = stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=batch_id, stories=stories, deadline_time=deadline))
        ids = [s.story_id for s in response.stories]
        deadline_t = time.monotonic() + 30
        while not all(stub.GetStory(pb.GetStoryRequest(story_id=i)).HasField("eta") for i in ids):
            assert time.monotonic() < deadline_t, "no ETA within 30 s of submission"
            time.sleep(0.2)
        etas = [stub.GetStory(pb.GetStoryRequest(story_id=i)).eta.ToMilliseconds() for i in ids]
        batch = stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id))
        assert batch.HasField("eta") and abs(batch.eta.ToMilliseconds() - max(etas)) < 2000  # read a moment later
        assert etas[0] < etas[1] < etas[2]  # more shots (and more memory per shot) take longer
        snapshot = d.dispatcher.farm_snapshot()
        assert [b for b in snapshot["batches"] if b["batch_id"] == batch_id][0]["deadline"] is not None
        # a priority change reorders the projection: the longest story now goes first
        stub.SetPriority(pb.SetPriorityRequest(story_id=ids[2], priority=50))
        d.dispatcher._eta_at = 0.0
        deadline_t = time.monotonic() + 30
        while stub.GetStory(pb.GetStoryRequest(story_id=ids[2])).eta.ToMilliseconds() >= etas[2] - 1:
            assert time.monotonic() < deadline_t, "the ETA did not follow the priority change"
            time.sleep(0.2)
    finally:
        d.dispatcher.draining = False
    for story_id in ids:
        assert wait_final(stub, story_id).state == pb.STORY_STATE_SUCCEEDED
