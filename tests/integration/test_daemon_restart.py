"""`storyfarm serve` as a real process: SIGKILLed in the middle of a story and started again, it
finishes that story without rendering its succeeded shots again; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from helpers.daemon_proc import DaemonProcess
from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb

STORY = json.dumps({"seed": 3, "resolution": "64x32", "frames": 9, "steps": 12,
                    "shots": [{"prompt": f"shot {i}: boats leave the harbour", **({"cut": False} if i % 2 else {})} for i in range(4)]})


@pytest.mark.slow
def test_sigkill_mid_story_then_restart_finishes_without_rerendering(tmp_path):
    data = tmp_path / "data"
    daemon = DaemonProcess(data).start()
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
    daemon.kill(signal.SIGKILL)  # the daemon and its workers
    daemon.stop()

    daemon = DaemonProcess(data).start()  # a new port: the data dir is what carries the story over
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
        assert daemon.kill(signal.SIGTERM) == 0  # SIGTERM: graceful stop, exit 0
    finally:
        daemon.stop()


def test_workers_do_not_outlive_a_killed_daemon(tmp_path):
    """SIGKILL to the daemon alone: its workers notice they are orphaned and exit (a worker left
    behind would hold its GPU memory). Group signals do not reach into them: they ignore SIGTERM."""
    psutil = pytest.importorskip("psutil", reason="psutil lists the daemon's worker processes")
    daemon = DaemonProcess(tmp_path / "data").start()
    try:
        workers = psutil.Process(daemon.pid).children(recursive=True)
        renderers = [p for p in workers if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
        assert renderers, [p.cmdline() for p in workers]
        for p in renderers:
            os.kill(p.pid, signal.SIGTERM)  # ignored: stopping workers is the daemon's job
        time.sleep(0.5)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in renderers)
        daemon.kill(signal.SIGKILL, group=False, timeout=10)
        gone, alive = psutil.wait_procs(renderers, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        daemon.stop()
