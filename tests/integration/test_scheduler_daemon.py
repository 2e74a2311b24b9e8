"""The daemon with two CPU worker processes: concurrent stories stay on the worker holding their
memory, and a worker killed mid-shot costs that shot one lost attempt, re-run on the other
worker with the story intact (byte-identical to an undisturbed render of the same story)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.daemon.config import load_config
from storyfarm.daemon.server import Daemon
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

pytestmark = pytest.mark.slow


def story(name: str, shots: int = 3, steps: int = 2, seed: int = 5) -> str:
    return json.dumps({"name": name, "seed": seed, "resolution": "64x32", "frames": 9, "steps": steps,
                       "shots": [{"prompt": f"{name}: shot {i} at the harbour", **({"cut": False} if i == 1 else {})}
                                 for i in range(shots)]})


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    data = tmp_path_factory.mktemp("farm")
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": str(data), "preset": "tiny", "workers": 2,
                                "device": "cpu", "grace_seconds": 5})
    d = Daemon(config)
    d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{d.port}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = render_pb2_grpc.RenderServiceStub(channel)
    deadline = time.monotonic() + 180
    while True:
        try:
            serving = health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False
        idle = sum(w["state"] == "idle" for w in d.pool.snapshot())
        if serving and idle == 2:
            break
        assert time.monotonic() < deadline, "two idle workers never came up"
        time.sleep(0.2)
    yield d, stub
    d.shutdown()
    channel.close()


def submit(stub, text: str) -> str:
    return stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=text)).story_id


def wait_final(stub, story_id: str, timeout: float = 300) -> pb.Story:
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetStory(pb.GetStoryRequest(story_id=story_id))
        if s.state in (pb.STORY_STATE_SUCCEEDED, pb.STORY_STATE_FAILED, pb.STORY_STATE_CANCELLED):
            return s
        assert time.monotonic() < deadline, f"story {story_id} still {s.state}"
        time.sleep(0.2)


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
    assert d.pool.restarts == 0


def test_a_worker_killed_mid_shot_reruns_that_shot_elsewhere_with_the_story_intact(farm):
    d, stub = farm
    text = story("killed", shots=3, steps=40, seed=77)
    story_id = submit(stub, text)
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:
        for w in list(d.pool.workers.values()):
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
    assert d.pool.restarts >= 1
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
