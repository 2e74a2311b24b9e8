"""The dashboard and the alert rules against a real Prometheus scraping a real daemon.

A daemon (tiny preset, one CPU worker, real sockets) and Prometheus (Debian's package) scraping it
every second with ops/prometheus/alerts.yml loaded. One story renders; an overnight batch stays
open (paused) so the batch panels have a deadline and an ETA. Then every dashboard query and every
alert expression goes through Prometheus' HTTP API: all must parse, the core panels must return
finite data, no alert may be pending on this healthy farm, and once the daemon stops the
daemon-down alert must go pending. The core panels are drawn into dashboard.png for a person.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from storyfarm.daemon.cli_ops import DEFAULT_RUNBOOK_BASE
from storyfarm.daemon.config import load_config
from storyfarm.daemon.server import Daemon
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
# Panels that a CPU farm that rendered one story and holds one open batch must fill. The rest need
# GPUs (NVML, DCGM) or failures; their queries must still parse.
CORE = {
    "Daemons up", "Workers up", "GPUs out of service", "Running shots", "Queued shots", "Oldest queued shot",
    "Queue depth by state and priority class", "Open stories by state", "Project quota use (running shots vs guaranteed and burst)",
    "Draining", "Shot duration (succeeded attempts)", "Queue wait by priority class", "Story duration (submit to final state)",
    "Stage duration p90", "Denoising step duration", "Realtime factor (render seconds per video second)",
    "Shots finished per hour by state", "Stories submitted and finished per hour", "Shots submitted per hour by project",
    "Frames generated per second by worker", "Video generated (seconds per hour)",
    "Placements on the worker holding the story's memory", "Workers up and running shots",
    "Latent pool resident bytes by worker", "Stories resident per worker", "Latent pool hit share and evictions",
    "Batches: deadline, ETA, slack, remaining stories", "Batch ETA minus deadline (positive: late)",
    "Remaining stories per batch", "Build info", "Scrape health",
}


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        pytest.skip("prometheus binary not found on PATH or in /usr/bin (Debian package `prometheus`; .ci/run installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def story(name: str, shots: int) -> str:
    return json.dumps({"name": name, "seed": 3, "resolution": "64x32", "frames": 9, "steps": 2,
                       "shots": [{"prompt": f"{name}: shot {i} in the lighthouse"} for i in range(shots)]})


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def wait_ready(self, process, log: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"prometheus exited {process.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus never became ready:\n{log.read_text()}"
            time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, **params) -> list:
        return self.api("query", query=expr, **params)["result"]

    def wait_for(self, expr: str, what: str, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"Prometheus never saw {what} ({expr})"
            time.sleep(0.5)
        return result


def queries() -> list[tuple[str, str, str]]:
    """(panel title, expression with the variables filled in, legend) of every dashboard query."""
    board = json.loads((OPS / "grafana" / "dashboards" / "storyfarm.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr, target.get("legendFormat", "")))
    return out


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    config = load_config(None, {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "data_dir": str(tmp / "data"),
                                "preset": "tiny", "workers": 1, "device": "cpu", "grace_seconds": 5})
    daemon = Daemon(config)
    daemon.start()
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OPS / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "storyfarm",
                            "static_configs": [{"targets": [f"127.0.0.1:{daemon.metrics_server.port}"]}]}]}))
    log = open(tmp / "prometheus.log", "w")
    process = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log)
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        prom.wait_ready(process, tmp / "prometheus.log")
        prom.wait_for('up{job="storyfarm"} == 1', "the daemon's /metrics")
        deadline = time.monotonic() + 120
        while not daemon.executor.ready:
            assert time.monotonic() < deadline, "the worker never loaded its model"
            time.sleep(0.2)
        yield daemon, render_pb2_grpc.RenderServiceStub(channel), prom, tmp
    finally:
        daemon.shutdown()
        channel.close()
        process.terminate()
        process.wait(timeout=30)
        log.close()


def finite(result: list) -> bool:
    values = [s["value"][1] for s in result] if result and "value" in result[0] else [v[1] for s in result for v in s["values"]]
    return any(math.isfinite(float(v)) for v in values)


def test_dashboard_queries_and_alert_expressions_through_prometheus(farm):
    daemon, stub, prom, tmp = farm
    started = time.time()
    request = pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story("keeper", 2), project="demo")
    story_id = stub.SubmitStory(request).story_id
    assert not stub.SubmitStory(request).created  # an idempotent repeat is not new work
    deadline = Timestamp()
    deadline.FromSeconds(int(time.time()) + 3600)
    batch = stub.SubmitBatch(pb.SubmitBatchRequest(batch_id="overnight-test", project="nightly", deadline_time=deadline,
                                                   stories=[pb.SubmitStoryRequest(request_id=uuid.uuid4().hex,
                                                                                  story_json=story("tide", 3))]))
    stub.PauseStory(pb.PauseStoryRequest(story_id=batch.stories[0].story_id))  # the batch stays open
    wait_until = time.monotonic() + 180
    while stub.GetStory(pb.GetStoryRequest(story_id=story_id)).state != pb.STORY_STATE_SUCCEEDED:
        assert time.monotonic() < wait_until, "the story did not render"
        time.sleep(0.3)
    prom.wait_for('sum(storyfarm_shots_finished_total{state="succeeded"}) >= 2', "both shots finished")
    prom.wait_for('storyfarm_stories_finished_total{state="succeeded"}', "the story finished")
    prom.wait_for('storyfarm_batch_eta_timestamp_seconds{batch="overnight-test"}', "the batch ETA")
    time.sleep(2)  # a couple more scrapes, so every rate window holds the whole render

    results: dict[str, list] = {}
    for title, expr, _ in queries():
        results.setdefault(title, []).append(prom.query(expr))  # raises unless Prometheus parsed and evaluated it
    assert set(results) >= CORE
    empty = sorted(t for t in CORE if not any(results[t]))  # a panel shows data when one of its queries has some
    assert not empty, f"core panels without data: {empty}"
    not_finite = sorted(t for t in CORE if not any(finite(r) for r in results[t] if r))
    assert not not_finite, f"core panels with only NaN/Inf: {not_finite}"

    rules = prom.api("rules")["groups"]
    names = [r["name"] for g in rules for r in g["rules"]]
    assert len(names) == 9 and all(r["health"] == "ok" and not r.get("lastError") for g in rules for r in g["rules"])
    for rule in (r for g in rules for r in g["rules"]):
        prom.query(rule["query"])  # every alert expression evaluates
    assert prom.api("alerts")["alerts"] == [], "alerts pending or firing on a healthy farm"

    submitted = {s["metric"]["project"]: float(s["value"][1]) for s in prom.query("storyfarm_stories_submitted_total")}
    shots = {s["metric"]["project"]: float(s["value"][1]) for s in prom.query("storyfarm_shots_submitted_total")}
    assert submitted == {"demo": 1, "nightly": 1} and shots == {"demo": 2, "nightly": 3}
    ids = {s["metric"]["batch"] for s in prom.query("storyfarm_batch_remaining_stories")}
    assert ids == {"overnight-test"}
    build = prom.query("storyfarm_build_info")[0]["metric"]
    assert build["preset"] == "tiny" and build["version"]
    draw_dashboard(prom, started, tmp / "dashboard.png")


def test_a_story_cancelled_while_paused_is_counted_and_closes_its_batch(farm):
    daemon, stub, prom, _ = farm
    paused = stub.ListStories(pb.ListStoriesRequest(batch_id="overnight-test")).stories[0].story_id
    stub.CancelStory(pb.CancelStoryRequest(story_id=paused))
    prom.wait_for('absent(storyfarm_batch_remaining_stories{batch="overnight-test"})', "the batch closing", 30)
    # no attempt ran: the dispatcher must still report the story's end to its observers
    prom.wait_for('storyfarm_stories_finished_total{project="nightly", state="cancelled"}', "the cancelled story", 15)


def test_daemon_down_alert_goes_pending(farm):
    daemon, stub, prom, _ = farm
    daemon.shutdown()
    prom.wait_for('up{job="storyfarm"} == 0', "the daemon going down", 30)
    deadline = time.monotonic() + 30
    while not (down := [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "StoryfarmDaemonDown"]):
        assert time.monotonic() < deadline, "StoryfarmDaemonDown never went pending"
        time.sleep(0.5)
    # the link Alertmanager and Grafana will show: absolute, on the rules' base, at the alert's section
    assert down[0]["annotations"]["runbook_url"] == f"{DEFAULT_RUNBOOK_BASE}#storyfarmdaemondown"


def draw_dashboard(prom: Prometheus, start: float, path: Path) -> None:
    """The core panels' series over the test, one small chart each, into a PNG a person can open."""
    from PIL import Image, ImageDraw

    panels: dict[str, list] = {}  # title -> [(legend, series)] over all of the panel's queries
    for title, expr, legend in queries():
        if title in CORE:
            result = prom.api("query_range", query=expr, start=start - 5, end=time.time(), step=1)["result"]
            panels.setdefault(title, []).extend((legend, s) for s in result)
    cols, w, h = 4, 420, 210
    image = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h), "white")
    draw = ImageDraw.Draw(image)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    for n, (title, series) in enumerate(panels.items()):
        x0, y0 = (n % cols) * w + 8, (n // cols) * h + 4
        draw.text((x0, y0), title[:60], fill="black")
        box = (x0 + 30, y0 + 18, x0 + w - 16, y0 + h - 40)
        draw.rectangle(box, outline="#888888")
        points = [(float(t), float(v)) for _, s in series for t, v in s["values"] if math.isfinite(float(v))]
        if not points:
            draw.text((box[0] + 8, box[1] + 8), "no data", fill="#888888")
            continue
        t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
        v0, v1 = min(p[1] for p in points), max(p[1] for p in points)
        span_t, span_v = (t1 - t0) or 1.0, (v1 - v0) or 1.0
        draw.text((x0, box[1]), f"{v1:.3g}", fill="#444444")
        draw.text((x0, box[3] - 10), f"{v0:.3g}", fill="#444444")
        for k, (legend, s) in enumerate(series[:len(colours)]):
            xy = [(box[0] + (float(t) - t0) / span_t * (box[2] - box[0]), box[3] - (float(v) - v0) / span_v * (box[3] - box[1]))
                  for t, v in s["values"] if math.isfinite(float(v))]
            if len(xy) > 1:
                draw.line(xy, fill=colours[k], width=2)
            label = legend if legend not in ("", "__auto") else ",".join(
                f"{k}={v}" for k, v in s["metric"].items() if k not in ("instance", "job"))
            for key, value in s["metric"].items():
                label = label.replace("{{" + key + "}}", value)
            draw.text((x0 + 30 + (k % 3) * 130, box[3] + 4 + (k // 3) * 12), label[:22] or "series", fill=colours[k])
    image.save(path)
    print(f"\ndashboard panels drawn: {path}")
    if os.environ.get("STORYFARM_OPS_PNG"):
        shutil.copy(path, os.environ["STORYFARM_OPS_PNG"])
    assert Image.open(path).size[0] == cols * w
