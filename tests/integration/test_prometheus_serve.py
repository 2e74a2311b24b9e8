"""`storyfarm serve` as ops run it: JSON log lines on stderr, /metrics on metrics_listen from the
daemon process, a clean SIGTERM exit; and a metrics address Prometheus could never scrape refused
before anything starts."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
STORYFARM = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "storyfarm"


def storyfarm() -> str:
    if not STORYFARM.exists():
        pytest.skip(f"{STORYFARM} not built (make test builds it)")
    return str(STORYFARM)


def test_serve_logs_json_lines_and_serves_metrics(tmp_path):
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
                                      "preset": "tiny", "device": "cpu", "workers": 1, "grace_seconds": 2, "log_format": "json"}))
    process = subprocess.Popen([storyfarm(), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    seen, port = [], None
    try:
        deadline = time.monotonic() + 120
        while not any("SERVING" in r.get("message", "") for r in seen):
            assert time.monotonic() < deadline and process.poll() is None, f"daemon never became SERVING: {seen}"
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(json.loads(line))  # every line is one JSON object
            found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", seen[-1]["message"])
            port = int(found.group(1)) if found else port
        assert port, f"no metrics address logged: {seen}"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert re.search(r'storyfarm_worker_up\{device="cpu",worker="w0"\} 1\.0', body)
        assert 'storyfarm_build_info{preset="tiny"' in body
        promtool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
        if promtool:  # the naming linter on the live exposition (test_metrics.py skips with the reason when absent)
            lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
            assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=10)
    while not lines.empty():
        seen.append(json.loads(lines.get()))
    assert code == 0
    ready = [r for r in seen if r.get("logger") == "storyfarm.farm" and r.get("worker") == "w0"]
    assert ready and {"time", "level", "message", "device"} <= set(ready[0]), seen
    assert any(r["message"] == "storyfarm stopped" for r in seen)


def test_serve_refuses_a_unix_socket_metrics_address(tmp_path):
    result = subprocess.run([storyfarm(), "serve", "--data-dir", str(tmp_path), "--metrics-listen", "unix:/tmp/storyfarm.sock"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "metrics_listen: 'unix:/tmp/storyfarm.sock' is a unix socket" in result.stdout
    assert not (tmp_path / "storyfarm.db").exists()  # refused before anything started
