"""Auth: tokens, roles per RPC, projects, constant-time lookup, and the interceptor on a real server."""

from concurrent import futures

import grpc
import pytest
from storyfarm.v1 import render_pb2

from storyfarm.daemon import auth
from storyfarm.daemon.auth import (
    ANONYMOUS_ADMIN,
    RPC_ROLES,
    AuthInterceptor,
    Authorizer,
    PermissionDenied,
    Principal,
    current_principal,
    hash_token,
    new_token,
)
from storyfarm.daemon.config import AuthConfig, TokenEntry

TOKENS = {role: f"sft_{role}-token" for role in ("viewer", "submitter", "admin")}
# every RPC of the contract, read from the proto itself: a new RPC cannot silently miss the table
RPCS = [m.name for m in render_pb2.DESCRIPTOR.services_by_name["RenderService"].methods]
READS = {"GetStory", "ListStories", "WatchStory", "ListArtifacts", "DownloadArtifact", "GetPool", "GetBatch", "WatchBatch"}


def entry(role, project="p1", token=None):
    return TokenEntry(name=f"ci-{role}", project="*" if role == "admin" else project, role=role,
                      sha256=hash_token(token or TOKENS[role]))


@pytest.fixture(scope="module")
def authorizer():
    return Authorizer(AuthConfig(require=True, tokens=[entry(r) for r in TOKENS]))


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def test_new_token_and_hash():
    token, digest = new_token()
    assert token.startswith("sft_") and len(token) > 40
    assert digest == hash_token(token) and len(digest) == 64 and token not in digest
    assert new_token()[0] != token


@pytest.mark.parametrize(
    "metadata",
    [None, [], bearer("sft_wrong"), [("authorization", TOKENS["admin"])], [("authorization", f"Basic {TOKENS['admin']}")],
     [("authorization", "Bearer ")], bearer(TOKENS["admin"]) + bearer(TOKENS["viewer"])],
    ids=["none", "empty", "unknown", "no-scheme", "basic", "blank", "two-headers"],
)
def test_unauthenticated(authorizer, metadata):
    assert authorizer.authenticate(metadata) is None


def test_known_tokens_name_their_principal(authorizer):
    for role, token in TOKENS.items():
        p = authorizer.authenticate([("x-other", "1"), ("Authorization", f"bearer  {token} ")])
        assert p.role == role and not p.anonymous


def test_every_entry_is_compared_whichever_matches(authorizer, monkeypatch):
    calls, real = [], auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in [*TOKENS.values(), "sft_nobody"]:
        calls.clear()
        authorizer.authenticate(bearer(token))
        assert len(calls) == len(TOKENS), token  # no early exit on a match, no short cut on a miss
        assert all(len(a) == len(b) == 64 for a, b in calls)


def test_without_require_everyone_is_an_anonymous_admin():
    a = Authorizer(AuthConfig(require=False, tokens=[entry("viewer")]))
    assert a.authenticate(None) == ANONYMOUS_ADMIN == a.authenticate(bearer("sft_anything"))
    a.authorize(ANONYMOUS_ADMIN, "Drain", "any-project")


def test_the_rpc_table_covers_the_api():
    assert set(RPC_ROLES) == set(RPCS)


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("role", ["viewer", "submitter", "admin"])
def test_each_role_against_each_rpc(authorizer, role, rpc):
    principal = authorizer.authenticate(bearer(TOKENS[role]))
    allowed = role == "admin" or rpc in READS or (role == "submitter" and rpc != "Drain")
    if allowed:
        authorizer.authorize(principal, rpc, None if rpc in ("GetPool", "Drain") else "p1")
    else:
        with pytest.raises(PermissionDenied, match=f"may not call {rpc}"):
            authorizer.authorize(principal, rpc)


def test_projects(authorizer):
    submitter = authorizer.authenticate(bearer(TOKENS["submitter"]))
    with pytest.raises(PermissionDenied, match="acts for project 'p1', not 'p2'"):
        authorizer.authorize(submitter, "CancelStory", "p2")
    with pytest.raises(PermissionDenied, match="not 'p2'"):
        authorizer.authorize(submitter, "GetStory", "p2")
    admin = authorizer.authenticate(bearer(TOKENS["admin"]))
    for project in ("p1", "p2", "zz"):
        authorizer.authorize(admin, "CancelStory", project)
    farm_viewer = Principal("dash", "*", "viewer")
    authorizer.authorize(farm_viewer, "GetStory", "p2")
    with pytest.raises(PermissionDenied):
        authorizer.authorize(farm_viewer, "CancelStory", "p2")


def test_unknown_rpc_needs_admin(authorizer):
    with pytest.raises(PermissionDenied, match="needs admin"):
        authorizer.authorize(Principal("s", "p1", "submitter"), "EvictWorker")
    authorizer.authorize(Principal("a", "*", "admin"), "EvictWorker")


# -- the interceptor on a real server -------------------------------------------------------------

IDENTITY = dict(request_deserializer=None, response_serializer=None)


def _whoami(request, context):
    p = current_principal()
    return f"{p.name}:{p.role}".encode()


def _whoami_stream(request, context):
    for i in range(3):
        p = current_principal()  # read inside the generator body: runs while gRPC iterates it
        yield f"{i}:{p.name}".encode()


def _count(requests, context):
    return str(sum(1 for _ in requests)).encode()


@pytest.fixture(scope="module")
def server(authorizer):
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[AuthInterceptor(authorizer)])
    handlers = {name: grpc.unary_unary_rpc_method_handler(_whoami) for name in ("GetStory", "CancelStory", "Drain")}
    handlers["WatchStory"] = grpc.unary_stream_rpc_method_handler(_whoami_stream)
    handlers["SubmitBatch"] = grpc.stream_unary_rpc_method_handler(_count)
    srv.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("storyfarm.v1.RenderService", handlers),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(lambda r, c: b"SERVING")}),
    ])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    srv.stop(None)


def call(channel, method, token=None, kind="unary"):
    md = bearer(token) if token else None
    path = f"/storyfarm.v1.RenderService/{method}"
    if kind == "stream":
        return list(channel.unary_stream(path)(b"x", metadata=md, timeout=5))
    if kind == "client-stream":
        return channel.stream_unary(path)(iter([b"a", b"b"]), metadata=md, timeout=5)
    return channel.unary_unary(path)(b"x", metadata=md, timeout=5)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_interceptor_admits_and_exposes_the_principal(server):
    assert call(server, "GetStory", TOKENS["viewer"]) == b"ci-viewer:viewer"
    assert call(server, "CancelStory", TOKENS["submitter"]) == b"ci-submitter:submitter"
    assert call(server, "Drain", TOKENS["admin"]) == b"ci-admin:admin"
    assert call(server, "WatchStory", TOKENS["viewer"], "stream") == [b"0:ci-viewer", b"1:ci-viewer", b"2:ci-viewer"]
    assert call(server, "SubmitBatch", TOKENS["submitter"], "client-stream") == b"2"
    assert current_principal() is None  # nothing leaks into the caller's thread


def test_interceptor_refuses(server):
    code, details = code_of(lambda: call(server, "GetStory"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
    assert code_of(lambda: call(server, "GetStory", "sft_wrong"))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = code_of(lambda: call(server, "CancelStory", TOKENS["viewer"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "needs submitter" in details
    assert code_of(lambda: call(server, "Drain", TOKENS["submitter"]))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: call(server, "WatchStory", None, "stream"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(server, "SubmitBatch", TOKENS["viewer"], "client-stream"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: call(server, "NoSuchMethod", TOKENS["admin"]))[0] == grpc.StatusCode.UNIMPLEMENTED


def test_health_needs_no_token(server):
    assert server.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b"SERVING"
