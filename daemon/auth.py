"""Who is calling, and may they: bearer tokens per project, three roles, one gRPC interceptor.

Roles are ordered: viewer (read) < submitter (viewer + changing stories and batches of its own
project) < admin (everything, every project, Drain and pool operations). `RPC_ROLES` gives each
RenderService method its minimum role; the interceptor enforces it on every call by the method's
short name, before the handler runs. Whether the story a call names belongs to the caller's project
is only known once the servicer has loaded it, so the servicer calls `authorize(principal, rpc,
project)` itself, with the principal the interceptor left in `current_principal()`.

Invariants:
- tokens exist here only as sha256 hashes; a presented token is hashed and compared with every
  stored hash by `hmac.compare_digest`, without stopping at a match, so timing reveals neither
  whether nor which entry matched;
- fail closed: a method missing from RPC_ROLES needs admin; a request with two Authorization
  headers, or a scheme other than Bearer, is unauthenticated;
- health checks and reflection need no token (load balancers and grpcurl must reach them);
- with auth.require false (the loopback development default) every caller is an anonymous admin,
  and tokens are not even read: a loopback daemon without auth has nothing to protect per project.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import grpc

from storyfarm.daemon.config import ALL_PROJECTS, AuthConfig, Role

log = logging.getLogger(__name__)

ROLE_RANK: MappingProxyType[str, int] = MappingProxyType({"viewer": 0, "submitter": 1, "admin": 2})

RPC_ROLES: MappingProxyType[str, Role] = MappingProxyType({
    "GetStory": "viewer",
    "ListStories": "viewer",
    "WatchStory": "viewer",
    "ListArtifacts": "viewer",
    "DownloadArtifact": "viewer",
    "GetPool": "viewer",
    "GetBatch": "viewer",
    "WatchBatch": "viewer",
    "SubmitStory": "submitter",
    "CancelStory": "submitter",
    "PauseStory": "submitter",
    "ResumeStory": "submitter",
    "SetPriority": "submitter",
    "RetryShot": "submitter",
    "RerenderShot": "submitter",
    "SubmitBatch": "submitter",
    "CancelBatch": "submitter",
    "Drain": "admin",
})
DEFAULT_ROLE: Role = "admin"  # for any method not in RPC_ROLES

# Services anyone may call: gRPC health checks and server reflection.
PUBLIC_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
})

TOKEN_PREFIX = "sft_"  # makes leaked tokens easy for secret scanners to spot


class PermissionDenied(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    name: str
    project: str  # "*" for every project
    role: Role
    anonymous: bool = False

    def covers(self, project: str) -> bool:
        return self.role == "admin" or self.project in (ALL_PROJECTS, project)


ANONYMOUS_ADMIN = Principal(name="anonymous", project=ALL_PROJECTS, role="admin", anonymous=True)

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("storyfarm_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled (set by AuthInterceptor); None outside one."""
    return _current.get()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token for a client and the sha256 to put in the daemon's config."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)


def method_parts(full_method: str) -> tuple[str, str]:
    """'/storyfarm.v1.RenderService/GetStory' -> ('storyfarm.v1.RenderService', 'GetStory')."""
    service, _, name = full_method.lstrip("/").rpartition("/")
    return service, name


def _bearer(metadata: Iterable[Any] | None) -> str | None:
    values = []
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key.lower() == "authorization":
            values.append(value)
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authorizer:
    """Pure policy over `DaemonConfig.auth`: no I/O, no gRPC; the interceptor and the servicer
    both call it."""

    def __init__(self, config: AuthConfig):
        self.required = config.require
        self._entries = [(t.sha256.encode("ascii"), Principal(t.name, t.project, t.role)) for t in config.tokens]

    def authenticate(self, metadata: Iterable[Any] | None) -> Principal | None:
        """The caller named by `Authorization: Bearer <token>`, or None (no token, unknown token,
        malformed header). Without auth.require: the anonymous admin."""
        if not self.required:
            return ANONYMOUS_ADMIN
        token = _bearer(metadata)
        if token is None:
            return None
        digest = hash_token(token).encode("ascii")
        found = None
        for stored, principal in self._entries:  # every entry, no early exit
            if hmac.compare_digest(digest, stored):
                found = principal
        return found

    def authorize(self, principal: Principal, rpc_name: str, project: str | None = None) -> None:
        """Raise PermissionDenied unless `principal` may call `rpc_name` (short name) on `project`
        (None: the call names no project, or it is not known yet)."""
        needed = RPC_ROLES.get(rpc_name, DEFAULT_ROLE)
        if ROLE_RANK[principal.role] < ROLE_RANK[needed]:
            raise PermissionDenied(f"{principal.name} (role {principal.role}) may not call {rpc_name}: it needs {needed}")
        if project is not None and not principal.covers(project):
            raise PermissionDenied(f"{principal.name} acts for project {principal.project!r}, not {project!r}")


def _with_principal(behavior: Callable, principal: Principal, streams_out: bool) -> Callable:
    """Run a handler's behavior in a context where current_principal() is `principal`.

    gRPC runs handlers on pool threads, and a streaming response's generator body runs only when
    gRPC iterates it: each step runs inside one copied context, so nothing leaks between calls."""
    if not streams_out:
        def unary(request, context):
            ctx = contextvars.copy_context()
            ctx.run(_current.set, principal)
            return ctx.run(behavior, request, context)
        return unary

    def stream(request, context) -> Iterator:
        ctx = contextvars.copy_context()
        ctx.run(_current.set, principal)
        responses = ctx.run(behavior, request, context)
        while True:
            try:
                item = ctx.run(next, responses)
            except StopIteration:
                return
            yield item
    return stream


def _rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler with its behavior replaced by wrap(behavior, streams_out)."""
    kinds = [
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
    ]
    for behavior, make, streams_out in kinds:
        if behavior is not None:
            return make(wrap(behavior, streams_out),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise ValueError("gRPC method handler without a behavior")


def _refusal(code: grpc.StatusCode, details: str) -> Callable[[Callable, bool], Callable]:
    def wrap(_behavior: Callable, streams_out: bool) -> Callable:
        def refuse(_request, context):
            context.abort(code, details)
        if not streams_out:
            return refuse

        def refuse_stream(request, context):
            refuse(request, context)
            yield  # pragma: no cover - abort raises
        return refuse_stream
    return wrap


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and role-checks every RPC of a (synchronous) grpc.server.

    UNAUTHENTICATED: no token, an unknown token or a malformed header. PERMISSION_DENIED: a known
    token whose role is below the method's. The per-project check is the servicer's."""

    def __init__(self, authorizer: Authorizer):
        self.authorizer = authorizer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, rpc_name = method_parts(handler_call_details.method)
        if service in PUBLIC_SERVICES:
            return handler
        principal = self.authorizer.authenticate(handler_call_details.invocation_metadata)
        if principal is None:
            log.info("refused %s: no valid bearer token", handler_call_details.method)
            return _rebuild(handler, _refusal(
                grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required (metadata 'authorization: Bearer <token>')"))
        try:
            self.authorizer.authorize(principal, rpc_name)
        except PermissionDenied as exc:
            log.info("refused %s: %s", handler_call_details.method, exc.reason)
            return _rebuild(handler, _refusal(grpc.StatusCode.PERMISSION_DENIED, exc.reason))
        return _rebuild(handler, lambda behavior, streams_out: _with_principal(behavior, principal, streams_out))
