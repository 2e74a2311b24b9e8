"""Drain as the runbook uses it, against a real daemon whose workers are real processes running the
fake worker (slow shots, no model): `--worker` drains one worker only, `--wait` returns once the
drained workers' shots have finished (and not before), a wait that outlives the caller's deadline
leaves the drain in effect and the CLI says so (exit 1), and `pool` shows each running shot's stage,
step and ETA."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from helpers.daemon_inproc import running_daemon, submit, wait_for
from storyfarm.daemon import cli
from storyfarm.daemon.client import StoryfarmClient, StoryfarmError
from storyfarm.v1 import render_pb2 as pb


def slow_story(name: str, shots: int = 3, step_s: float = 0.4) -> str:
    return json.dumps({"name": name, "resolution": "64x32", "frames": 9, "steps": 4,
                       "shots": [{"prompt": f"{name} shot {i} fake:slow={step_s}"} for i in range(shots)]})


@pytest.fixture
def farm(tmp_path):
    with running_daemon(tmp_path / "data", workers=2, ready_workers=2, **{"scheduler.worker": "fake"}) as (d, stub):
        with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
            yield d, stub, client


def busy(client) -> list[dict]:
    return [w for w in client.pool()["workers"] if w["state"] == "busy"]


def test_draining_one_worker_waits_for_its_shot_and_moves_the_story(farm):
    d, stub, client = farm
    story_id = submit(stub, slow_story("keeper")).story_id
    worker = wait_for(lambda: busy(client), "a busy worker")[0]
    progress = wait_for(lambda: (busy(client) or [{}])[0].get("progress"), "progress in pool")
    assert progress["stage"] and "eta" in progress  # the PROGRESS column has something to show
    shot = worker["current_shot"]["shot_index"]
    started = time.monotonic()
    reply = client.drain([worker["worker_id"]], wait=True, timeout=60)
    assert time.monotonic() - started > 0.3  # it waited for the running shot (4 steps of 0.4 s)
    assert reply["running_shot_count"] == 0 and not reply["draining"]
    states = {w["worker_id"]: w["state"] for w in reply["workers"]}
    assert states[worker["worker_id"]] == "stopped"
    record = stub.GetStory(pb.GetStoryRequest(story_id=story_id))
    assert record.shots[shot].state == pb.SHOT_STATE_SUCCEEDED
    nxt = wait_for(lambda: next((s for s in stub.GetStory(pb.GetStoryRequest(story_id=story_id)).shots
                                 if s.index == shot + 1 and s.worker), None), "the next shot placed")
    assert nxt.worker != worker["worker_id"]  # the drained worker starts nothing new
    client.drain([worker["worker_id"]], undrain=True)
    assert {w["state"] for w in client.pool()["workers"]} <= {"idle", "busy"}


def test_a_wait_past_the_deadline_keeps_the_drain_and_the_cli_says_so(farm, capsys):
    d, stub, client = farm
    submit(stub, slow_story("storm", shots=2, step_s=1.0))
    wait_for(lambda: busy(client), "a busy worker")
    code = cli.main(["drain", "--wait", "--timeout", "0.5", "--server", f"127.0.0.1:{d.port}"])
    assert code == 1
    assert "the drain is in effect" in capsys.readouterr().err
    assert client.pool()["draining"] is True
    with pytest.raises(StoryfarmError) as exc:
        client.drain(["w9"])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and exc.value.reason == "WORKER_NOT_FOUND"
    assert exc.value.field_violations[0][0] == "worker_ids[0]"
    reply = client.drain(wait=True, timeout=60)  # the whole daemon: returns once the shot is done
    assert reply["draining"] and reply["running_shot_count"] == 0
    assert {w["state"] for w in reply["workers"]} == {"stopped"}
    client.drain(undrain=True)
