"""`storyfarm serve` that cannot start: a listen address another daemon holds, a data dir another
daemon holds, a store from a newer release. Each exits 2 with one line naming the address or the
folder and the holder (no traceback), changes nothing of the running daemon's (its lock file still
names it, its store still takes work), and the running daemon keeps answering and rendering. A
busy `metrics_listen` alone is not a refusal: that daemon renders without /metrics, as documented.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import yaml

from helpers.daemon_inproc import wait_final
from helpers.daemon_proc import CLI, DaemonProcess, free_port, wait_serving
from storyfarm.v1 import render_pb2 as pb

STORY = json.dumps({"name": "quay", "resolution": "64x32", "frames": 9, "steps": 2,
                    "shots": [{"prompt": "a crane lifts a crate"}, {"prompt": "the crate lands on the quay"}]})


def serve(tmp_path: Path, *, listen: str, data_dir: Path) -> subprocess.CompletedProcess:
    config = tmp_path / f"second-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "scheduler": {"worker": "fake"}, "listen": listen,
                                      "metrics_listen": f"127.0.0.1:{free_port()}", "data_dir": str(data_dir)}))
    return subprocess.run([CLI, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120)


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused start (checked: exit 2, no traceback, nothing else wrong)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or line.startswith("E")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_second_serve_on_a_held_port_or_data_dir_exits_2_and_leaves_the_first_alone(tmp_path):
    first = DaemonProcess(tmp_path / "first", config={"scheduler": {"worker": "fake"}}).start()
    try:
        lock = first.data / "daemon.lock"
        assert lock.read_text().strip() == str(first.pid)  # the holder records itself

        # the same listen address, another data dir
        other = tmp_path / "other"
        line = refusal(serve(tmp_path, listen=f"127.0.0.1:{first.port}", data_dir=other))
        assert f"listen: cannot bind 127.0.0.1:{first.port}: address already in use" in line
        assert f"pid {first.pid} (" in line and "storyfarm serve" in line  # the holder, from /proc

        # the same data dir, another listen address
        line = refusal(serve(tmp_path, listen=f"127.0.0.1:{free_port()}", data_dir=first.data))
        assert f"data_dir: {first.data} is in use by another storyfarm daemon (pid {first.pid} holds {lock})" in line
        assert lock.read_text().strip() == str(first.pid)  # read, never rewritten, by the refused start

        # the same metrics address only: that one starts, rendering without /metrics (ops/README.md, Ports)
        metrics_port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", first.tail(100_000)).group(1))
        third_log = tmp_path / "third.log"
        config = tmp_path / "third.yaml"
        config.write_text(yaml.safe_dump({"device": "cpu", "scheduler": {"worker": "fake"}, "listen": f"127.0.0.1:{free_port()}",
                                          "metrics_listen": f"127.0.0.1:{metrics_port}", "data_dir": str(tmp_path / "third")}))
        with open(third_log, "w") as out:
            third = subprocess.Popen([CLI, "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "workers ready: SERVING" not in third_log.read_text():
                assert third.poll() is None and time.monotonic() < deadline, third_log.read_text()
                time.sleep(0.1)
        finally:
            third.send_signal(signal.SIGTERM)
            assert third.wait(timeout=60) == 0
        text = third_log.read_text()
        assert f"metrics_listen: cannot bind 127.0.0.1:{metrics_port}" in text and "serving without /metrics" in text
        assert "Traceback" not in text

        # the first daemon still serves, and its store still takes and finishes work
        wait_serving(first.channel, timeout=10, what="the first daemon")
        sid = first.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)).story_id
        assert wait_final(first.stub, sid, timeout=60).state == pb.STORY_STATE_SUCCEEDED
        assert first.proc.poll() is None
        assert "Traceback" not in first.tail(100_000)
    finally:
        first.stop()


def test_a_store_from_a_newer_release_exits_2_naming_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "storyfarm.db") as db:
        db.execute("PRAGMA user_version = 999")
    line = refusal(serve(tmp_path, listen=f"127.0.0.1:{free_port()}", data_dir=data))
    assert f"data_dir: {data / 'storyfarm.db'}: database schema version 999 is newer" in line
    with sqlite3.connect(data / "storyfarm.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 999  # untouched
