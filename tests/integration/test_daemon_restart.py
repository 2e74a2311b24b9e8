"""`storyfarm serve` as a real process: SIGKILLed in the middle of a story and started again, it
finishes that story without rendering its succeeded shots again; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

CLI = str(Path(sys.executable).with_name("storyfarm"))
STORY = json.dumps({"seed": 3, "resolution": "64x32", "frames": 9, "steps": 12,
                    "shots": [{"prompt": f"shot {i}: boats leave the harbour", **({"cut": False} if i % 2 else {})} for i in range(4)]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data: Path, port: int | None = None) -> subprocess.Popen:
    """A serving daemon on `port` (a free one when None; retried if another process takes it first)."""
    for _ in range(3):
        try:
            return _start(data, port or free_port())
        except PortTaken:
            if port is not None:
                raise
    raise AssertionError("no free port after 3 tries")


class PortTaken(Exception):
    pass


def _start(data: Path, port: int) -> subprocess.Popen:
    log = open(data.parent / f"daemon-{port}-{time.time_ns()}.log", "w")
    proc = subprocess.Popen([CLI, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--device", "cpu",
                             "--grace-seconds", "5"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            text = Path(log.name).read_text()
            if "cannot bind" in text:
                raise PortTaken(text[-500:])
            raise AssertionError(f"daemon exited {proc.returncode}: {text[-2000:]}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "daemon never SERVING"
        time.sleep(0.2)
    proc.stub = render_pb2_grpc.RenderServiceStub(channel)
    proc.channel = channel
    return proc


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(proc.pid, sig)  # the daemon and its workers
    proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_mid_story_then_restart_finishes_without_rerendering(tmp_path):
    data = tmp_path / "data"
    daemon = start(data)
    story_id = daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)).story_id
    deadline = time.monotonic() + 120
    while True:  # kill once two shots are done and the third is running
        story = daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id))
        done = [s for s in story.shots if s.state == pb.SHOT_STATE_SUCCEEDED]
        if len(done) >= 2 and story.shots[2].state == pb.SHOT_STATE_RUNNING:
            break
        assert time.monotonic() < deadline and story.state != pb.STORY_STATE_SUCCEEDED, "could not catch the story mid-way"
        time.sleep(0.02)
    before = {a.name: a.sha256 for a in story.artifacts}
    kill_group(daemon, signal.SIGKILL)

    daemon = start(data)  # a new port: the data dir is what carries the story over
    try:
        deadline = time.monotonic() + 180
        while (story := daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id))).state != pb.STORY_STATE_SUCCEEDED:
            assert story.state in (pb.STORY_STATE_RUNNING, pb.STORY_STATE_QUEUED), story
            assert time.monotonic() < deadline
            time.sleep(0.2)
        after = {a.name: a.sha256 for a in story.artifacts}
        assert all(after[name] == sha for name, sha in before.items())  # published shots untouched
        assert [s.state for s in story.shots] == [pb.SHOT_STATE_SUCCEEDED] * 4
        with JobStore.open(data / "storyfarm.db") as store:
            assert store.integrity_check()
            attempts = {s.index: store.attempts(s.id) for s in store.get_story(story_id).shots}
        assert [len(attempts[i]) for i in (0, 1)] == [1, 1]  # succeeded shots never ran again
        assert [a.outcome for a in attempts[2]] == ["lost", "succeeded"]  # the interrupted one re-ran, budget intact
        leftovers = [p for p in data.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
        assert leftovers == []
    finally:
        kill_group(daemon, signal.SIGTERM)
    assert daemon.returncode == 0  # SIGTERM: graceful stop, exit 0


def test_workers_do_not_outlive_a_killed_daemon(tmp_path):
    """SIGKILL to the daemon alone: its workers notice they are orphaned and exit (a worker left
    behind would hold its GPU memory). Group signals do not reach into them: they ignore SIGTERM."""
    psutil = pytest.importorskip("psutil", reason="psutil lists the daemon's worker processes")
    daemon = start(tmp_path / "data")
    workers = psutil.Process(daemon.pid).children(recursive=True)
    renderers = [p for p in workers if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    assert renderers, [p.cmdline() for p in workers]
    for p in renderers:
        os.kill(p.pid, signal.SIGTERM)  # ignored: stopping workers is the daemon's job
    time.sleep(0.5)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in renderers)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(timeout=10)
    gone, alive = psutil.wait_procs(renderers, timeout=10)
    assert not alive, [p.pid for p in alive]
