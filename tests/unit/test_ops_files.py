"""The files of ops/ checked with the tools that consume them (promtool, amtool, systemd-analyze,
the daemon's own config loader) and against each other: every query names a metric of the catalog
and follows the dashboard's $instance, every metric is on the dashboard or in an alert, every alert
has a runbook entry, an absolute runbook link to it, a test and a route to a receiver, and the
compose file, provisioning, scrape config and Alertmanager agree on names, paths and ports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from storyfarm.daemon.cli import main
from storyfarm.daemon.cli_ops import DEFAULT_RUNBOOK_BASE
from storyfarm.daemon.config import load_config
from storyfarm.daemon.metrics import CATALOG, SPECS

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
DASHBOARD = OPS / "grafana" / "dashboards" / "storyfarm.json"
ROWS = ("Fleet now", "Latency", "Throughput", "GPUs", "Memory residency", "Failures", "Overnight batches", "Build")
REQUIRED_ALERTS = ("StoryfarmDaemonDown", "StoryfarmWorkerDown", "StoryfarmWorkerRestarting", "StoryfarmQueueStalled",
                   "StoryfarmShotFailureRatioHigh", "StoryfarmOutOfMemory", "StoryfarmGPUOutOfService",
                   "StoryfarmBatchETAPastDeadline")
TEST_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


ALERTMANAGER = OPS / "alertmanager" / "alertmanager.yml"
PACKAGES = {"promtool": "prometheus", "amtool": "prometheus-alertmanager", "systemd-analyze": "systemd"}


def tool(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()), None)
    if found is None:
        pytest.skip(f"{name} not found (Debian package {PACKAGES[name]}; .ci/run installs prometheus and prometheus-alertmanager)")
    return found


@pytest.fixture()
def production(monkeypatch):
    """configs/production.yaml as a farm node reads it, with only the required variable set."""
    for name in ("STORYFARM_LISTEN", "STORYFARM_METRICS_LISTEN", "STORYFARM_DATA_DIR", "STORYFARM_PRESET", "STORYFARM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORYFARM_ADMIN_TOKEN_SHA256", "a" * 64)
    return load_config("production")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression with the dashboard variables filled in) for every query."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name, value in TEST_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"\bstoryfarm_[a-z_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", token)
        names.add(base if base in SPECS and SPECS[base].kind == "histogram" else token)
    return names


def test_promtool_checks_the_scrape_config_the_rules_and_the_rule_tests():
    promtool = tool("promtool")
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")):
        result = run(promtool, *args, cwd=OPS / "prometheus")
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule: a typo fails here, before any Prometheus runs."""
    promtool = tool("promtool")
    targets = dashboard_targets()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, (_, e) in enumerate(targets)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", str(tmp_path / "queries.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(targets)} rules found" in result.stdout


def test_dashboard_has_its_rows_and_queries_only_known_metrics():
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == list(ROWS)
    assert len({p["id"] for p in panels}) == len(panels)
    assert board["uid"] and {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    used = set()
    for title, expr in dashboard_targets():
        unknown = {n for n in metric_names(expr) if n not in SPECS}
        assert not unknown, f"panel {title!r} queries metrics the catalog does not list: {unknown}"
        used |= metric_names(expr)
    exprs = " ".join(e for _, e in dashboard_targets())
    assert "histogram_quantile(0.99" in exprs and "DCGM_FI_DEV_GPU_UTIL" in exprs and "gpu_uuid" in exprs
    for rule in alert_rules():
        unknown = {n for n in metric_names(rule["expr"]) if n not in SPECS}
        assert not unknown, f"alert {rule['alert']} uses metrics the catalog does not list: {unknown}"
        used |= metric_names(rule["expr"])
    missing = {s.name for s in CATALOG} - used
    assert not missing, f"metrics on no panel and in no alert: {sorted(missing)}"


def test_every_query_follows_the_instance_variable():
    """Picking daemons in `$instance` narrows every panel. DCGM series carry the exporter's instance,
    not the daemon's, so a DCGM query is narrowed through its join: the storyfarm_worker_info side
    keeps only the picked daemons' GPUs."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", ())]
    dcgm = [(title, expr) for title, expr in queries if "DCGM_FI_" in expr]
    assert len(dcgm) >= 5, "the GPU row's DCGM panels are missing"
    for title, expr in queries:
        for metric, selector in re.findall(r"\b(storyfarm_[a-z_]+|up|scrape_duration_seconds)\b(\{[^}]*\})?", expr):
            assert 'instance=~"$instance"' in selector, f"panel {title!r}: {metric} is not filtered by $instance in {expr}"
    for title, expr in dcgm:
        assert re.search(r'storyfarm_worker_info\{[^}]*instance=~"\$instance"', expr), \
            f"DCGM panel {title!r} ignores $instance: {expr}"


def test_every_alert_has_a_runbook_entry_a_severity_and_a_rule_test():
    runbook = (OPS / "RUNBOOK.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    tests = (OPS / "prometheus" / "alerts_test.yml").read_text()
    names = [r["alert"] for r in alert_rules()]
    assert set(REQUIRED_ALERTS) <= set(names) and len(set(names)) == len(names)
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert name.lower() in headings, f"RUNBOOK.md has no section '## {name}'"
        assert f"alertname: {name}\n" in tests, f"alerts_test.yml does not test {name}"


def runbook_anchors() -> set[str]:
    """The anchors git hosts and Markdown renderers give RUNBOOK.md's headings (GitHub's slugs)."""
    headings = re.findall(r"^#+ (.+)$", (OPS / "RUNBOOK.md").read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def assert_runbook_links(rules_text: str, base: str) -> None:
    rules = [r for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"]]
    anchors = runbook_anchors()
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        parts = urlsplit(url)
        assert parts.scheme in ("http", "https") and parts.netloc, f"{rule['alert']}: runbook_url {url!r} is not absolute"
        assert url == f"{base}#{rule['alert'].lower()}", rule["alert"]
        assert parts.fragment in anchors, f"{rule['alert']}: RUNBOOK.md has no heading with anchor #{parts.fragment}"


def test_every_runbook_link_is_absolute_and_opens_its_runbook_section():
    assert_runbook_links((OPS / "prometheus" / "alerts.yml").read_text(), DEFAULT_RUNBOOK_BASE)
    tests = (OPS / "prometheus" / "alerts_test.yml").read_text()
    assert "runbook_url" in tests and set(re.findall(r'runbook_url: "([^"#]*)#', tests)) == {DEFAULT_RUNBOOK_BASE}


def test_render_alerts_puts_the_runbook_links_on_this_sites_base(tmp_path, capsys):
    """The rules and their tests rendered on another base: only the links change, and promtool
    still checks the rules and passes their tests."""
    promtool = tool("promtool")
    base = "https://wiki.farm.internal/ops/storyfarm/RUNBOOK.md"
    for name in ("alerts.yml", "alerts_test.yml"):
        source = OPS / "prometheus" / name
        assert main(["ops", "render-alerts", "--runbook-base", base, "--rules", str(source), "--out", str(tmp_path / name)]) == 0
        before, after = source.read_text().splitlines(), (tmp_path / name).read_text().splitlines()
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and changed and all("runbook_url" in a for a, _ in changed), name
    assert_runbook_links((tmp_path / "alerts.yml").read_text(), base)
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")):
        result = run(promtool, *args, cwd=tmp_path)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    capsys.readouterr()
    assert main(["ops", "render-alerts", "--runbook-base", base, "--rules", str(OPS / "prometheus" / "alerts.yml")]) == 0
    assert capsys.readouterr().out == (tmp_path / "alerts.yml").read_text()  # stdout by default
    for bad in ("ops/RUNBOOK.md", "https://wiki/RUNBOOK.md#top", "ftp://wiki/RUNBOOK.md", 'https://wiki/"x"'):
        assert main(["ops", "render-alerts", "--runbook-base", bad, "--out", str(tmp_path / "x.yml")]) == 2
        assert "argument --runbook-base:" in capsys.readouterr().err and not (tmp_path / "x.yml").exists()


def test_grafana_provisioning_compose_and_scrape_config_agree(production):
    compose = yaml.safe_load((OPS / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"storyfarm", "prometheus", "alertmanager", "grafana", "dcgm-exporter"}
    for name, service in services.items():  # every bind mount of a repository path exists
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (OPS / "compose" / source).resolve().exists(), f"{name}: {source} does not exist"
    provider = yaml.safe_load((OPS / "grafana" / "provisioning" / "dashboards" / "storyfarm.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["../grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in scrape["scrape_configs"]}
    port = production.metrics_listen.rsplit(":", 1)[1]
    assert jobs["storyfarm"] == [f"storyfarm:{port}"] and jobs["dcgm"] == ["dcgm-exporter:9400"]
    assert {r["expr"].split('job="')[1].split('"')[0] for r in alert_rules() if 'job="' in r["expr"]} == {"storyfarm"}
    # Prometheus sends alerts to the compose file's Alertmanager, which reads ops/alertmanager/
    [managers] = scrape["alerting"]["alertmanagers"]
    assert managers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    manager = services["alertmanager"]
    assert manager["image"].startswith("prom/alertmanager:") and "127.0.0.1:9093:9093" in manager["ports"]
    mounts = dict(v.split(":")[:2] for v in manager["volumes"])
    config_file = next(a.split("=", 1)[1] for a in manager["command"] if a.startswith("--config.file="))
    assert config_file == f"{mounts['../alertmanager']}/{ALERTMANAGER.name}"
    grace = int(services["storyfarm"]["stop_grace_period"].rstrip("m")) * 60
    assert grace > production.grace_seconds
    dockerfile = (OPS / "compose" / "Dockerfile").read_text()
    for folder in re.findall(r"^COPY (\w+) ", dockerfile, flags=re.M):
        assert (REPO / folder).is_dir(), f"Dockerfile copies {folder}/, which the repository does not have"


def test_alertmanager_config_checks_and_routes_every_alert_to_a_receiver():
    amtool = tool("amtool")
    result = run(amtool, "check-config", str(ALERTMANAGER))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    config = yaml.safe_load(ALERTMANAGER.read_text())
    assert set(config["route"]["group_by"]) == {"alertname", "severity"}
    receivers = {r["name"] for r in config["receivers"]}
    assert any(r.get("webhook_configs") for r in config["receivers"])  # the example receiver
    for rule in alert_rules():
        result = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                     f"alertname={rule['alert']}", f"severity={rule['labels']['severity']}", "instance=farm1:9400")
        routed = set(result.stdout.strip().split(","))
        assert result.returncode == 0 and routed and routed <= receivers, \
            f"{rule['alert']}: {result.stdout}{result.stderr}"


def test_systemd_unit_verifies_and_outlives_the_grace_period(tmp_path, production):
    unit = (OPS / "systemd" / "storyfarm.service").read_text()
    assert "ExecStart=/opt/storyfarm/venv/bin/storyfarm serve --config production" in unit
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, flags=re.M).group(1))
    assert stop > production.grace_seconds and "KillMode=mixed" in unit
    env = dict(line.split("=", 1) for line in (OPS / "systemd" / "storyfarm.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert re.fullmatch(r"[0-9a-f]{64}", env["STORYFARM_ADMIN_TOKEN_SHA256"])
    analyze = tool("systemd-analyze")
    storyfarm = REPO / ".venv" / "bin" / "storyfarm"
    if not storyfarm.exists():
        pytest.skip(f"{storyfarm} not built: systemd-analyze verify needs an existing ExecStart binary")
    local = (unit.replace("/opt/storyfarm/venv/bin/storyfarm", str(storyfarm))
             .replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/"))
    (tmp_path / "storyfarm.service").write_text(local)
    result = run(analyze, "verify", str(tmp_path / "storyfarm.service"))
    assert result.returncode == 0 and "storyfarm.service" not in result.stderr, result.stderr


def test_ray_example_loads_as_a_daemon_config(monkeypatch):
    monkeypatch.setenv("STORYFARM_ADMIN_TOKEN_SHA256", "b" * 64)
    config = load_config(str(OPS / "ray" / "storyfarm-ray.yaml"))
    assert config.scheduler.executor == "ray" and config.scheduler.ray.address == "auto" and config.log_format == "json"
    cluster = yaml.safe_load((OPS / "ray" / "cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local" and cluster["provider"]["head_ip"] and cluster["provider"]["worker_ips"]
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])


def test_ci_installs_prometheus_and_runs_the_whole_suite():
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script and script.rstrip().endswith("make test")
    assert "apt-get install" in script and "prometheus" in script
    assert "prometheus-alertmanager" in script and "command -v amtool" in script  # amtool check-config above
    assert run("bash", "-n", str(REPO / ".ci" / "run")).returncode == 0
