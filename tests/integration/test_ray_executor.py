"""The `ray` executor against a local Ray instance on CPU: the daemon drives Ray actors (one per
device group, each in its own STRICT_PACK placement group), renders a story through them, and
replaces an actor killed mid-shot, re-running its shot."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest

ray = pytest.importorskip("ray", reason="the ray executor needs Ray (pip install 'storyfarm[cluster]'; CI installs it)")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from storyfarm.daemon.config import load_config  # noqa: E402
from storyfarm.daemon.server import Daemon  # noqa: E402
from storyfarm.v1 import render_pb2 as pb  # noqa: E402
from storyfarm.v1 import render_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.slow


def story(name: str, steps: int = 2) -> str:
    return json.dumps({"name": name, "seed": 9, "resolution": "64x32", "frames": 9, "steps": steps,
                       "shots": [{"prompt": f"{name}: shot {i}, lanterns on the pier"} for i in range(3)]})


def wait(predicate, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_daemon_renders_through_ray_actors_and_replaces_a_killed_one(tmp_path):
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"), "preset": "tiny",
                                "workers": 2, "device": "cpu", "grace_seconds": 5})
    config = config.model_copy(update={"scheduler": config.scheduler.model_copy(
        update={"executor": "ray", "ray": config.scheduler.ray.model_copy(update={"num_cpus": 2})})})
    d = Daemon(config)
    try:
        d.start()
        assert d.executor.kind == "ray"
        stub = render_pb2_grpc.RenderServiceStub(grpc.insecure_channel(f"127.0.0.1:{d.port}"))
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{d.port}"))
        wait(lambda: sum(w["state"] == "idle" for w in d.executor.snapshot()) == 2, "two ray workers never got ready")
        # health turns SERVING from the daemon's own watcher (every 0.1 s), a moment after the workers are idle
        wait(lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING,
             "health never SERVING with two ready ray workers")
        from ray.util import placement_group_table

        groups = [g for g in placement_group_table().values() if g["name"].startswith("storyfarm-")]
        assert len(groups) == 2 and all(g["strategy"] == "STRICT_PACK" for g in groups)

        story_id = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story("ray", steps=30))).story_id
        victim = wait(lambda: next((w for w in d.executor.workers.values()
                                    if w.task is not None and w.task.story_id == story_id and w.task.shot_index == 1), None),
                      "shot 1 never started on a ray worker")
        ray.kill(victim.runtime.actor, no_restart=True)
        final = wait(lambda: (s := stub.GetStory(pb.GetStoryRequest(story_id=story_id))).state in (
            pb.STORY_STATE_SUCCEEDED, pb.STORY_STATE_FAILED) and s, "story never finished")
        assert final.state == pb.STORY_STATE_SUCCEEDED
        shot = d.store.get_story(story_id).shots[1]
        outcomes = [(a.worker, a.outcome) for a in d.store.attempts(shot.id)]
        assert outcomes[0] == (victim.id, "lost") and outcomes[-1][1] == "succeeded"
        assert d.executor.restarts >= 1
        files = {a.name for a in d.store.get_story(story_id).artifacts}
        assert {"story.mp4", "manifest.json"} <= files
    finally:
        d.shutdown()
        ray.shutdown()
