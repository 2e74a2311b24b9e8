"""Fixtures of the reliability suite: fast or long mode, the figures it reports, and one shared
in-process daemon built from the packaged production profile.

Fast mode (the default, for CI) keeps every scenario but with few stories, kills and seconds; the
long mode (`pytest tests/reliability --reliability-long`, or STORYFARM_RELIABILITY_LONG=1) scales
them up. Each test adds what it measured to `figures`; they are printed at the end of the run and
written as JSON to $STORYFARM_RELIABILITY_REPORT when set (RELIABILITY.md quotes such a run).

The shared daemon is `configs/production.yaml` with only what a test machine needs changed
(loopback, a free port, a temporary data dir, the tiny preset on CPU, four tokens, small limits):
reflection stays off and every call needs a token, as on a farm node. The bad-input, auth,
property and client-retry tests all talk to it, so the suite starts its worker once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from helpers.daemon_proc import CHANNEL_OPTIONS, free_port, wait_serving
from farm_profile import LIMITS, TOKENS

FIGURES: dict[str, dict] = {}


@dataclass(frozen=True)
class Scale:
    long: bool
    crash_stories: int  # stories in flight while the daemon is SIGKILLed
    crash_kills: int  # random SIGKILLs
    kill_after_s: tuple[float, float]  # each SIGKILL lands this long (uniform) after the daemon serves
    load_seconds: float  # load generator run while stories render
    load_clients: int  # submitting and polling threads
    retry_clients: int  # concurrent submitters whose replies time out after the commit
    examples: int  # hypothesis examples per property
    machine_steps: int  # steps per lifecycle state-machine run


@pytest.fixture(scope="session")
def scale(request) -> Scale:
    long = request.config.getoption("--reliability-long") or os.environ.get("STORYFARM_RELIABILITY_LONG") == "1"
    if long:
        return Scale(True, crash_stories=12, crash_kills=10, kill_after_s=(0.5, 10.0), load_seconds=60, load_clients=16,
                     retry_clients=16, examples=400, machine_steps=60)
    return Scale(False, crash_stories=3, crash_kills=2, kill_after_s=(0.2, 3.0), load_seconds=6, load_clients=6,
                 retry_clients=4, examples=40, machine_steps=25)


@pytest.fixture(scope="session")
def figures():
    """Add what a test measured: figures[name] = {...}."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, values in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(values, sort_keys=True)}")
    target = os.environ.get("STORYFARM_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "figures": FIGURES}, indent=2, sort_keys=True))


# -- the shared production-profile daemon ------------------------------------------------------

@dataclass
class SharedDaemon:
    daemon: object  # storyfarm.daemon.server.Daemon
    channel: grpc.Channel
    data: Path

    @property
    def stub(self):
        from storyfarm.v1 import render_pb2_grpc

        return render_pb2_grpc.RenderServiceStub(self.channel)

    def quiesce(self, timeout: float = 120) -> None:
        """Wait until no shot runs and every worker is idle: what earlier tests started has
        finished writing (a test that checks "nothing written" must not see their files)."""
        deadline = time.monotonic() + timeout
        while (self.daemon.store.count_shots_by_state().get("running")
               or any(w["state"] != "idle" for w in self.daemon.dispatcher.executor.snapshot())
               or self.daemon.store.count_shots_by_state().get("queued")):
            assert time.monotonic() < deadline, "the shared daemon did not settle"
            time.sleep(0.1)


@pytest.fixture(scope="session")
def production_daemon(tmp_path_factory):
    from storyfarm.daemon.auth import hash_token
    from storyfarm.daemon.config import load_config
    from storyfarm.daemon.server import Daemon

    data = tmp_path_factory.mktemp("production-data")
    tokens = [{"name": name, "project": project, "role": role, "sha256": hash_token(token)}
              for name, (token, project, role) in TOKENS.items()]
    saved = os.environ.get("STORYFARM_ADMIN_TOKEN_SHA256")
    os.environ["STORYFARM_ADMIN_TOKEN_SHA256"] = hash_token(TOKENS["admin"][0])  # the file names it
    try:
        config = load_config("production", {
            "listen": "127.0.0.1:0", "metrics_listen": f"127.0.0.1:{free_port()}", "data_dir": str(data),
            "preset": "tiny", "device": "cpu", "workers": 1, "grace_seconds": 2,
            "auth": {"require": True, "tokens": tokens}, "limits": LIMITS})
    finally:
        if saved is None:
            os.environ.pop("STORYFARM_ADMIN_TOKEN_SHA256", None)
        else:
            os.environ["STORYFARM_ADMIN_TOKEN_SHA256"] = saved
    assert config.reflection is False and config.auth.require  # from production.yaml, not overridden here
    daemon = Daemon(config)
    daemon.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}", options=CHANNEL_OPTIONS)
    try:
        wait_serving(channel, what="production-profile daemon")
        yield SharedDaemon(daemon, channel, data)
    finally:
        channel.close()
        daemon.shutdown()
