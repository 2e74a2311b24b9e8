"""Client retries against a daemon whose replies arrive too late: zero duplicates, zero losses.

The shared production-profile daemon is made to stall right after a submit's transaction commits
(STORYFARM_STALL_AT, scheduler/gpu_pool/faults.py), longer than the clients' deadline: the story is on disk
but the client sees DEADLINE_EXCEEDED. Several clients at once submit stories through the Python
client library, which retries with the same request id. Afterwards the store holds exactly one
story per request id, the one each client was finally told about; a reused id with another
payload is refused with the documented error, and the same id in another project is another story.
"""

from __future__ import annotations

import json
import random
import threading
import uuid

import grpc
import pytest

from farm_profile import TOKENS
from storyfarm.daemon.client import RetryPolicy, StoryfarmClient, StoryfarmError
from storyfarm.scheduler.gpu_pool import faults

STALL_S, DEADLINE_S = 0.6, 0.25


def story(n: int) -> str:
    return json.dumps({"name": f"retry-{n}", "resolution": "64x32", "frames": 5, "steps": 2,
                       "shots": [{"prompt": f"take {n}: rain on the harbour"}]})


@pytest.fixture
def drained(production_daemon):
    """No rendering while the test runs (its stories are cancelled afterwards): CPU for the calls."""
    dispatcher = production_daemon.daemon.dispatcher
    dispatcher.draining = True
    yield production_daemon
    for record in production_daemon.daemon.store.list_stories(states=["queued", "paused"], page_size=500)[0]:
        production_daemon.daemon.store.request_cancel(record.id)
    dispatcher.draining = False


def test_submits_that_time_out_after_the_commit_are_retried_without_duplicates(drained, monkeypatch, scale, figures):
    address = f"127.0.0.1:{drained.daemon.port}"
    clients, per_client = scale.retry_clients, 3
    stalls = clients * per_client // 2 + 1  # about half the submits answer too late
    spec = f"after_submit_commit:{STALL_S + random.random() / 1000:.6f}:{stalls}"  # a fresh count for this run
    monkeypatch.setenv("STORYFARM_STALL_AT", spec)
    wanted = {uuid.uuid4().hex: n for n in range(clients * per_client)}
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(request_ids: list[str]) -> None:
        policy = RetryPolicy(attempts=12, initial=0.05, maximum=0.4)
        try:
            with StoryfarmClient(address, TOKENS["submitter"][0], timeout=DEADLINE_S, retry=policy) as client:
                for request_id in request_ids:
                    result = client.submit(story(wanted[request_id]), request_id=request_id)
                    with lock:
                        results[request_id] = result
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ids = list(wanted)
    threads = [threading.Thread(target=client_thread, args=(ids[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    monkeypatch.delenv("STORYFARM_STALL_AT")
    assert not errors, errors
    assert faults.stalls.get(spec) == stalls, "the daemon did not stall as often as asked: nothing was tested"

    store = drained.daemon.store
    stored = [s for s in store.list_stories(project="film", page_size=500)[0] if s.request_id in wanted]
    by_request = {s.request_id: s.id for s in stored}
    assert len(stored) == len(wanted) == len(by_request), f"{len(stored)} stories for {len(wanted)} request ids"
    assert all(results[r]["story_id"] == by_request[r] for r in wanted), "a client was told another story's id"
    replayed = sum(not r["created"] for r in results.values())
    assert replayed >= 1, "no retry ever found its committed story"

    # The same id with another story: the documented refusal. In another project: another story.
    first = ids[0]
    with StoryfarmClient(address, TOKENS["submitter"][0], timeout=10) as client:
        with pytest.raises(StoryfarmError) as err:
            client.submit(story(999), request_id=first)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == "IDEMPOTENCY_CONFLICT"
    assert "request_id" in dict(err.value.field_violations)
    with StoryfarmClient(address, TOKENS["submitter"][0], timeout=10) as client:  # same story, other settings
        for settings in ({"priority": 7}, {"labels": {"shift": "night"}}):
            with pytest.raises(StoryfarmError) as err:
                client.submit(story(wanted[first]), request_id=first, **settings)
            assert err.value.reason == "IDEMPOTENCY_CONFLICT", settings
    with StoryfarmClient(address, TOKENS["other"][0], timeout=10) as client:
        other = client.submit(story(wanted[first]), request_id=first)
    assert other["created"] and other["story_id"] != by_request[first]
    figures["client retries"] = {"clients": clients, "request ids": len(wanted), "late replies": stalls,
                                 "retries that found their story": replayed, "stories stored": len(stored),
                                 "duplicates": len(stored) - len(by_request), "lost": len(set(wanted) - set(by_request))}
