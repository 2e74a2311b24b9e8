"""Alerts reach a receiver: a real Prometheus with the `alerting:` section of
ops/prometheus/prometheus.yml sends a firing alert to a real Alertmanager running
ops/alertmanager/alertmanager.yml, which posts it to the example webhook receiver (its URL pointed
at this test) grouped by alert name and severity, with the runbook link among the annotations.
Skips when Debian's `prometheus` or `prometheus-alertmanager` is not installed (.ci/run installs both)."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from helpers.daemon_proc import free_port

pytestmark = pytest.mark.slow
OPS = Path(__file__).resolve().parents[2] / "ops"


def binary(*names: str) -> str:
    for name in names:
        if found := shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None):
            return found
    pytest.skip(f"{' or '.join(names)} not found (Debian packages prometheus, prometheus-alertmanager; .ci/run installs them)")


@pytest.fixture()
def webhook():
    """A local webhook receiver: (its URL, a queue of the JSON bodies posted to it)."""
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/storyfarm", received
    server.shutdown()


def test_a_firing_alert_reaches_the_webhook_receiver(tmp_path, webhook):
    prometheus, alertmanager = binary("prometheus"), binary("alertmanager", "prometheus-alertmanager")
    url, received = webhook
    config = yaml.safe_load((OPS / "alertmanager" / "alertmanager.yml").read_text())
    [receiver] = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    receiver["webhook_configs"][0]["url"] = url  # the one change: this test is the receiver
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    am_port, prom_port = free_port(), free_port()
    scrape = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    scrape["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{am_port}"]}]
    scrape.update({"global": {"evaluation_interval": "1s"}, "scrape_configs": [], "rule_files": [str(tmp_path / "firing.yml")]})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    (tmp_path / "firing.yml").write_text(yaml.safe_dump({"groups": [{"name": "test", "rules": [{
        "alert": "StoryfarmTestFiring", "expr": "vector(1)", "labels": {"severity": "critical"},
        "annotations": {"summary": "always firing", "runbook_url": "https://runbooks.example.com/RUNBOOK.md#x"}}]}]}))
    log = open(tmp_path / "processes.log", "w")
    processes = [
        subprocess.Popen([alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
                          f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=warn"],
                         stdout=log, stderr=log),
        subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
                          # Alertmanager is discovered a few seconds after the first evaluation: resend then, not in a minute
                          "--rules.alert.resend-delay=1s"], stdout=log, stderr=log),
    ]
    try:
        try:
            body = received.get(timeout=60)  # the critical route waits 10 s for more of the group
        except queue.Empty:
            pytest.fail(f"no notification reached the webhook in 60 s:\n{(tmp_path / 'processes.log').read_text()}")
        assert body["receiver"] == config["route"]["receiver"] and body["status"] == "firing"
        assert body["groupLabels"] == {"alertname": "StoryfarmTestFiring", "severity": "critical"}
        [alert] = body["alerts"]
        assert alert["annotations"]["runbook_url"] == "https://runbooks.example.com/RUNBOOK.md#x"
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        log.close()
