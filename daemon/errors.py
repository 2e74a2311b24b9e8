"""gRPC errors with google.rpc.Status details: which field, what is allowed, when to retry.

Every refusal the daemon sends goes through `abort`, so clients always find an ErrorInfo reason
(the names of storyfarm.v1.ErrorReason), field violations for bad input and RetryInfo where a
retry can help.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "storyfarm.v1"


class RpcError(Exception):
    """Raised inside handlers; turned into a rich status by the servicer's wrapper."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, *, fields: list[tuple[str, str]] = (),
                 retry_after: float | None = None, resource: tuple[str, str] | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.fields, self.retry_after, self.resource = list(fields), retry_after, resource
        self.metadata = dict(metadata or {})

    def status(self) -> grpc.Status:
        details = [error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)]
        if self.fields:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.fields
            ]))
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after * 1000))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.resource is not None:
            details.append(error_details_pb2.ResourceInfo(resource_type=self.resource[0], resource_name=self.resource[1]))
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        for d in details:
            status.details.add().Pack(d)
        return rpc_status.to_status(status)


def invalid(message: str, reason: str = "INVALID_STORY", fields: list[tuple[str, str]] = ()) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, reason, fields=fields)


def not_found(kind: str, name: str, reason: str) -> RpcError:
    return RpcError(grpc.StatusCode.NOT_FOUND, f"no {kind} {name}", reason, resource=(kind, name))


def precondition(message: str, reason: str) -> RpcError:
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, message, reason)
