"""Nobody reads or writes what they should not: every RPC against every kind of caller.

On the shared production-profile daemon (tokens required, reflection off, as configs/production.yaml
ships): every RenderService method, read from the service descriptor so a new RPC is covered the
day it is added, is refused without a token and with every malformed or foreign credential
(UNAUTHENTICATED), with a role below the one README promises (PERMISSION_DENIED), and across
projects (a film story is invisible to the ads submitter). A refused call changes nothing. The
role table here is written from README, independently of the daemon's own table, so a change to
either shows up. Health answers without a token; reflection is not served.
"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from farm_profile import TOKENS, bearer
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]
READ = {"GetStory", "ListStories", "WatchStory", "ListArtifacts", "DownloadArtifact", "GetPool", "GetBatch", "WatchBatch"}
WRITE = {"SubmitStory", "CancelStory", "PauseStory", "ResumeStory", "SetPriority", "RetryShot", "RerenderShot", "SubmitBatch",
         "CancelBatch"}
ADMIN = {"Drain"}
NEEDS = {**dict.fromkeys(READ, "viewer"), **dict.fromkeys(WRITE, "submitter"), **dict.fromkeys(ADMIN, "admin")}
RANK = {"viewer": 0, "submitter": 1, "admin": 2}
STORY = json.dumps({"resolution": "64x32", "frames": 5, "steps": 2, "shots": [{"prompt": "a quiet pier"}]})
REFUSED_AUTH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

BAD_CREDENTIALS = {
    "no token": [],
    "unknown token": [("authorization", "Bearer sft_not-a-token")],
    "admin token, one character short": [("authorization", f"Bearer {TOKENS['admin'][0][:-1]}")],
    "admin token, Basic scheme": [("authorization", f"Basic {TOKENS['admin'][0]}")],
    "admin token without a scheme": [("authorization", TOKENS["admin"][0])],
    "empty bearer": [("authorization", "Bearer ")],
    "two authorization headers": [("authorization", f"Bearer {TOKENS['viewer'][0]}"),
                                  ("authorization", f"Bearer {TOKENS['admin'][0]}")],
    "the token's sha256 instead of the token": [("authorization", "Bearer " + __import__("hashlib").sha256(
        TOKENS["admin"][0].encode()).hexdigest())],
    "token in another header": [("x-api-key", TOKENS["admin"][0])],
}


def request_for(rpc: str, ids: dict, role: str | None = None):
    """A request for `rpc` naming real film objects (a finished story, a batch)."""
    story_id, batch_id = ids["story"], ids["batch"]
    return {
        "GetStory": pb.GetStoryRequest(story_id=story_id), "WatchStory": pb.WatchStoryRequest(story_id=story_id),
        "ListStories": pb.ListStoriesRequest(project="film"),
        "ListArtifacts": pb.ListArtifactsRequest(story_id=story_id),
        "DownloadArtifact": pb.DownloadArtifactRequest(story_id=story_id, name="manifest.json"),
        "GetPool": pb.GetPoolRequest(), "GetBatch": pb.GetBatchRequest(batch_id=batch_id),
        "WatchBatch": pb.WatchBatchRequest(batch_id=batch_id),
        "SubmitStory": pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY, project="film", validate_only=True),
        "CancelStory": pb.CancelStoryRequest(story_id=story_id), "PauseStory": pb.PauseStoryRequest(story_id=story_id),
        "ResumeStory": pb.ResumeStoryRequest(story_id=story_id),
        "SetPriority": pb.SetPriorityRequest(story_id=story_id, priority=7),
        "RetryShot": pb.RetryShotRequest(story_id=story_id, shot_index=99),  # admitted ones fail after auth, harmlessly
        "RerenderShot": pb.RerenderShotRequest(story_id=story_id, shot_index=99, request_id=uuid.uuid4().hex),
        "SubmitBatch": pb.SubmitBatchRequest(batch_id=batch_id, project="film", validate_only=True, stories=[
            pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)]),
        "CancelBatch": pb.CancelBatchRequest(batch_id=batch_id),
        "Drain": pb.DrainRequest(undrain=role == "admin"),  # a refused drain would stop the farm if it went through
    }[rpc]


def code_of(channel, rpc: str, request, metadata) -> grpc.StatusCode:
    method = getattr(render_pb2_grpc.RenderServiceStub(channel), rpc)
    try:
        result = method(request, metadata=metadata, timeout=20)
        if rpc.startswith(("Watch", "Download")):
            for _ in result:  # watches of a finished story end; the first item is enough otherwise
                break
            result.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def snapshot(daemon, ids) -> tuple:
    story = daemon.store.get_story(ids["story"])
    return (story.state, story.priority, sum(daemon.store.count_stories_by_state().values()),
            daemon.dispatcher.draining, daemon.store.batch_summary(ids["batch"]).counts)


@pytest.fixture(scope="module")
def film(production_daemon):
    """A finished story of project film (with artifacts) and a cancelled film batch."""
    stub, metadata = production_daemon.stub, bearer("submitter")
    story_id = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY), metadata=metadata).story_id
    deadline = time.monotonic() + 120
    while stub.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=metadata).state != pb.STORY_STATE_SUCCEEDED:
        assert time.monotonic() < deadline, "the film story did not finish"
        time.sleep(0.1)
    batch_id = f"film-{uuid.uuid4().hex[:8]}"
    stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=batch_id, stories=[
        pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)]), metadata=metadata)
    stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch_id), metadata=metadata)
    return {"story": story_id, "batch": batch_id}


def test_the_role_table_covers_every_rpc():
    assert set(SERVICE.methods_by_name) == READ | WRITE | ADMIN, \
        f"classify the new RPCs in this test: {set(SERVICE.methods_by_name) ^ (READ | WRITE | ADMIN)}"


@pytest.mark.parametrize("credential", list(BAD_CREDENTIALS))
def test_every_rpc_refuses_missing_and_malformed_credentials(production_daemon, film, credential, figures):
    d = production_daemon
    before = snapshot(d.daemon, film)
    for method in SERVICE.methods:
        code = code_of(d.channel, method.name, request_for(method.name, film), BAD_CREDENTIALS[credential])
        assert code == grpc.StatusCode.UNAUTHENTICATED, (credential, method.name, code)
    assert snapshot(d.daemon, film) == before
    tally = figures.setdefault("auth", {})
    tally["unauthenticated calls refused"] = tally.get("unauthenticated calls refused", 0) + len(SERVICE.methods)


def test_every_rpc_refuses_a_role_below_its_own(production_daemon, film, figures):
    d, refused, admitted = production_daemon, 0, 0
    before = snapshot(d.daemon, film)
    for method in SERVICE.methods:
        for role in ("viewer", "submitter", "admin"):
            code = code_of(d.channel, method.name, request_for(method.name, film, role), bearer(role))
            if RANK[role] < RANK[NEEDS[method.name]]:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method.name, code)
                refused += 1
            else:  # admitted: whatever the outcome, it is not an auth refusal
                assert code not in REFUSED_AUTH, (role, method.name, code)
                admitted += 1
    after = snapshot(d.daemon, film)
    assert after[2:] == before[2:], (before, after)  # no story created by a refusal, no drain, batch intact
    figures.setdefault("auth", {}).update({"role refusals": refused, "role admissions": admitted})


STORY_SCOPED = ["GetStory", "WatchStory", "ListArtifacts", "DownloadArtifact", "CancelStory", "PauseStory", "ResumeStory",
                "SetPriority", "RetryShot", "RerenderShot", "GetBatch", "WatchBatch", "CancelBatch", "ListStories", "SubmitStory"]


def test_another_projects_submitter_can_neither_read_nor_change_film(production_daemon, film, figures):
    d = production_daemon
    before = snapshot(d.daemon, film)
    for rpc in STORY_SCOPED:  # ids of another project read as unknown (ids never leak); naming it is denied
        code = code_of(d.channel, rpc, request_for(rpc, film), bearer("other"))
        named = rpc in ("ListStories", "SubmitStory")
        assert code == (grpc.StatusCode.PERMISSION_DENIED if named else grpc.StatusCode.NOT_FOUND), (rpc, code)
    stub = d.stub  # its own listing shows only its own project, and a film batch id is not its to fill
    listed = stub.ListStories(pb.ListStoriesRequest(page_size=100), metadata=bearer("other"), timeout=10).stories
    assert all(s.project == "ads" for s in listed), [s.project for s in listed]
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=film["batch"], stories=[
            pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)]), metadata=bearer("other"), timeout=10)
    assert err.value.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED)
    assert snapshot(d.daemon, film) == before
    figures.setdefault("auth", {})["cross-project calls refused"] = len(STORY_SCOPED) + 1


def test_health_needs_no_token_and_reflection_is_off(production_daemon):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = production_daemon.channel
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    for metadata in (None, bearer("admin")):  # off for everyone, not merely refused to strangers
        with pytest.raises(grpc.RpcError) as err:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert production_daemon.daemon.config.reflection is False
