"""Load on loopback while stories render, then SIGTERM in the middle of it: nothing acknowledged
is lost.

A real `storyfarm serve` process takes the load generator (tests/reliability/loadgen.py: half the
clients submitting one-shot stories with fresh request ids, half polling GetStory, one thread
checking health every 50 ms) while its worker renders. The figures (accepted submits per second,
GetStory and health latency, each also as a ratio to the idle daemon) go to the report; the test
itself only holds the daemon to what it promises: no error but the documented ones, health always
SERVING and answering well under a second. Then SIGTERM lands with the load still running: health
says NOT_SERVING within a second, new submits are refused with UNAVAILABLE, the daemon exits 0
within its grace. The store must hold every story whose submit was acknowledged, and no story
nobody sent; after a restart the interrupted work finishes exactly once (the rest of the queue is
cancelled, so the test does not render hundreds of stories).
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.audit import audit, summary
from helpers.daemon_proc import NOT_SERVING, DaemonProcess, violations
from loadgen import TINY_STORY, LoadGenerator, finished_story
from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb

pytestmark = pytest.mark.slow
GRACE = 6.0
HEALTH_BUDGET_MS = 1000  # "health checks stay fast": a load balancer's probe timeout


def all_stories(store: JobStore) -> list:
    out, token = [], None
    while True:
        page, token = store.list_stories(page_size=500, page_token=token)
        out += page
        if not token:
            return out


def test_load_then_sigterm_under_load_loses_nothing(tmp_path, scale, figures):
    data = tmp_path / "data"
    daemon = DaemonProcess(data, grace=GRACE).start()
    address = f"127.0.0.1:{daemon.port}"
    generator = LoadGenerator(address, clients=scale.load_clients)
    try:
        known = finished_story(address)
        idle = generator.idle_baseline(1.5, known_story=known)
        generator.start()
        time.sleep(scale.load_seconds)
        load = generator.report(idle)
        assert load["accepted_submits"] > 0 and load["get_story"]["n"] > 0, load
        assert not load["errors"], f"errors under load: {load['errors']}"
        assert set(load["health_states"]) == {"SERVING"}, load["health_states"]
        assert load["health"]["max_ms"] < HEALTH_BUDGET_MS, load["health"]

        # SIGTERM with the load still running.
        probe = health_pb2_grpc.HealthStub(daemon.channel)
        os.kill(daemon.pid, signal.SIGTERM)  # the daemon only: its workers are the daemon's to stop
        signalled, not_serving_after, seen = time.monotonic(), None, []
        while not_serving_after is None and time.monotonic() - signalled < 1.0:
            try:
                status = probe.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                seen.append(status)
                if status == NOT_SERVING:
                    not_serving_after, not_serving_wall = time.monotonic() - signalled, time.time()
            except grpc.RpcError as exc:
                seen.append(exc.code().name)
            time.sleep(0.01)
        assert not_serving_after is not None, f"not NOT_SERVING within 1 s of SIGTERM: {seen}; {daemon.tail()}"
        with pytest.raises(grpc.RpcError) as err:
            daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=TINY_STORY), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and violations(err.value)[1] in ("SHUTTING_DOWN", None)
        code = daemon.proc.wait(timeout=GRACE + 15)
        exited_after = time.monotonic() - signalled
        assert code == 0, daemon.tail()
        assert exited_after < GRACE + 10, exited_after
    finally:
        generator.stop()
        daemon.stop()

    acknowledged = generator.acknowledged
    with JobStore.open(data / "storyfarm.db") as store:
        assert store.integrity_check()
        stored = {s.id: s for s in all_stories(store)}
    lost = set(acknowledged.values()) - set(stored)
    assert not lost, f"{len(lost)} acknowledged stories are not in the store"
    strangers = [s.id for s in stored.values() if s.id != known and s.request_id not in generator.sent]
    assert not strangers, strangers
    late = [r for r in acknowledged if generator.sent[r] > not_serving_wall]
    assert not late, f"{len(late)} submits sent after health said NOT_SERVING were accepted"

    # Restart: the interrupted work resumes; the rest of the queue is cancelled to keep this short.
    started = {s.id for s in stored.values() if s.state == "running"}  # cut off by the end of the grace
    queued = sorted((s for s in stored.values() if s.state == "queued"), key=lambda s: s.created_at)
    keep = started | {s.id for s in queued[:2]}
    daemon = DaemonProcess(data, grace=GRACE).start()
    try:
        for story in stored.values():
            if story.id not in keep and story.state not in ("succeeded", "cancelled"):
                daemon.stub.CancelStory(pb.CancelStoryRequest(story_id=story.id), timeout=10)
        deadline = time.monotonic() + 180
        while any(daemon.stub.GetStory(pb.GetStoryRequest(story_id=i, view=pb.STORY_VIEW_BASIC), timeout=10).state
                  != pb.STORY_STATE_SUCCEEDED for i in keep):
            assert time.monotonic() < deadline, "the kept stories did not finish after the restart"
            time.sleep(0.2)
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.proc.wait(timeout=GRACE + 15) == 0
    finally:
        daemon.stop()
    expect = {i: "succeeded" if (i in keep or stored[i].state == "succeeded") else "cancelled" for i in stored}
    report = audit(data, stored, expect=expect)
    figures["load"] = load
    figures["sigterm under load"] = {
        "not_serving_after_s": round(not_serving_after, 3), "exited_after_s": round(exited_after, 2), "grace_s": GRACE,
        "acknowledged": len(acknowledged), "stored": len(stored), "acknowledged but lost": len(lost),
        "finished after restart": len(keep), **summary(report)}
