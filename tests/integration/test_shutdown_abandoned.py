"""SIGTERM with a short `grace_seconds` while a slow shot renders: the daemon still exits 0, and its
log says which shot it abandoned (a WARNING naming the story, the shot, the worker and the grace),
so an operator can tell a shot cut off by a restart from one that failed."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid

from helpers.daemon_proc import DaemonProcess
from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb

GRACE_S = 1.0
STORY = json.dumps({"name": "tide", "resolution": "64x32", "frames": 9, "steps": 4,
                    "shots": [{"prompt": "the tide comes in fake:slow=5"}]})  # 4 steps of 5 s: far beyond the grace


def test_a_shot_cut_off_by_the_grace_is_logged_as_abandoned(tmp_path):
    daemon = DaemonProcess(tmp_path / "data", config={"scheduler": {"worker": "fake"}}, grace=GRACE_S).start()
    try:
        sid = daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)).story_id
        deadline = time.monotonic() + 60
        while (story := daemon.stub.GetStory(pb.GetStoryRequest(story_id=sid))).shots[0].state != pb.SHOT_STATE_RUNNING:
            assert time.monotonic() < deadline, story
            time.sleep(0.05)
        assert daemon.kill(signal.SIGTERM, group=False, timeout=60) == 0  # as systemd stops it: the daemon only
        log = daemon.tail(200_000)
    finally:
        daemon.stop()
    with JobStore.open(tmp_path / "data" / "storyfarm.db") as store:
        shot = store.get_story(sid).shots[0]
    assert shot.state == "running"  # left as it was: the next start records the attempt lost and re-runs it
    warnings = [line for line in log.splitlines() if " WARNING " in line and "abandoned" in line]
    assert len(warnings) == 1, log[-4000:]
    line = warnings[0]
    assert re.search(rf"shot 1 of story {sid} abandoned on worker w0: still rendering when the {GRACE_S:g} s SIGTERM grace", line), line
    assert f"shot_id={shot.id}" in line and "worker=w0" in line, line  # the context a log search needs
    assert "storyfarm stopped" in log and "Traceback" not in log
