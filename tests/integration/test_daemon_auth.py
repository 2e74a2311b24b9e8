"""Auth on the real daemon: every RPC refused without a token, with a wrong one, or with a role or
project that does not cover it; health needs no token; reflection is off in the production config."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.daemon.auth import hash_token
from storyfarm.daemon.config import load_config
from storyfarm.daemon.server import Daemon
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

TOKENS = {"viewer": "view-token-aaaa", "submitter": "submit-token-bbbb", "admin": "admin-token-cccc", "other": "other-token-dddd"}
STORY = json.dumps({"resolution": "64x32", "frames": 9, "steps": 2, "shots": [{"prompt": "a quiet pier"}]})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tokens = [
        {"name": "viewer", "project": "film", "role": "viewer", "sha256": hash_token(TOKENS["viewer"])},
        {"name": "submitter", "project": "film", "role": "submitter", "sha256": hash_token(TOKENS["submitter"])},
        {"name": "admin", "project": "*", "role": "admin", "sha256": hash_token(TOKENS["admin"])},
        {"name": "other", "project": "ads", "role": "submitter", "sha256": hash_token(TOKENS["other"])},
    ]
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": str(tmp_path_factory.mktemp("data")), "device": "cpu",
                                "auth": {"require": True, "tokens": tokens}, "reflection": False, "grace_seconds": 2})
    d = Daemon(config)
    d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{d.port}")
    yield d, channel
    d.shutdown()
    channel.close()


def call(channel, method, request, token=None):
    stub = render_pb2_grpc.RenderServiceStub(channel)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    result = getattr(stub, method)(request, metadata=metadata, timeout=30)
    return list(result) if hasattr(result, "__iter__") and not hasattr(result, "ListFields") else result


def code_of(channel, method, request, token=None):
    try:
        call(channel, method, request, token)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_every_rpc_needs_a_valid_token(daemon):
    _, channel = daemon
    for method in pb.DESCRIPTOR.services_by_name["RenderService"].methods:
        request = getattr(pb, method.input_type.name)()
        assert code_of(channel, method.name, request) == grpc.StatusCode.UNAUTHENTICATED, method.name
        assert code_of(channel, method.name, request, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED, method.name


def test_roles_and_projects(daemon):
    _, channel = daemon
    submit = pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY, project="film")
    assert code_of(channel, "SubmitStory", submit, TOKENS["viewer"]) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(channel, "SubmitStory", pb.SubmitStoryRequest(request_id="x", story_json=STORY, project="film"),
                   TOKENS["other"]) == grpc.StatusCode.PERMISSION_DENIED  # another project's submitter
    story_id = call(channel, "SubmitStory", submit, TOKENS["submitter"]).story_id
    assert call(channel, "GetStory", pb.GetStoryRequest(story_id=story_id), TOKENS["viewer"]).project == "film"
    assert code_of(channel, "GetStory", pb.GetStoryRequest(story_id=story_id), TOKENS["other"]) == grpc.StatusCode.NOT_FOUND
    assert code_of(channel, "CancelStory", pb.CancelStoryRequest(story_id=story_id), TOKENS["viewer"]) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(channel, "Drain", pb.DrainRequest(undrain=True), TOKENS["submitter"]) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(channel, "Drain", pb.DrainRequest(undrain=True), TOKENS["admin"]) == grpc.StatusCode.OK
    assert code_of(channel, "GetStory", pb.GetStoryRequest(story_id=story_id), TOKENS["admin"]) == grpc.StatusCode.OK


def test_health_needs_no_token_and_reflection_is_off(daemon, monkeypatch):
    d, channel = daemon
    monkeypatch.setenv("STORYFARM_ADMIN_TOKEN_SHA256", hash_token(TOKENS["admin"]))
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not load_config("production").reflection  # the packaged production config keeps it off
