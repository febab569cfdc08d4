"""The one boundary that maps exceptions to gRPC statuses with google.rpc details.

Declines are not errors (they are outcomes); what reaches here is a fault of the caller (INVALID_ARGUMENT, with
every bad field) or of the system (UNAVAILABLE with RetryInfo when Redis cannot answer; INTERNAL, with a request
id only, for bugs).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis import exceptions as redis_errors

from gateway.domain import CodeNotFound, IdempotencyConflict, NotReady
from gateway.validation import FieldViolation, InvalidRequest

log = logging.getLogger("rgw.errors")
DOMAIN = "redemption.v1"
RETRY_AFTER_SECONDS = 1
_UNAVAILABLE_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def to_status(code: int, message: str, details: Sequence[Message] = ()) -> grpc.Status:
    """A grpc.Status carrying google.rpc details in its trailers."""
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def invalid_argument(violations: Sequence[FieldViolation]) -> grpc.Status:
    """INVALID_ARGUMENT with a BadRequest naming every bad field."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations
        ]
    )
    return to_status(code_pb2.INVALID_ARGUMENT, "invalid request: " + "; ".join(v.field for v in violations), [bad])


def idempotency_conflict() -> grpc.Status:
    """INVALID_ARGUMENT: a key reused for this code with a different request."""
    info = error_details_pb2.ErrorInfo(reason="IDEMPOTENCY_KEY_REUSED", domain=DOMAIN)
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="idempotency_key", description="was used for this code with a different request"
            )
        ]
    )
    return to_status(code_pb2.INVALID_ARGUMENT, "idempotency key reused with a different request", [info, bad])


def unavailable(what: str, reason: str = "DEPENDENCY_UNAVAILABLE", detail: str = "is unavailable") -> grpc.Status:
    """UNAVAILABLE with RetryInfo: retry with the same idempotency key."""
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_SECONDS))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"dependency": what})
    return to_status(code_pb2.UNAVAILABLE, f"{what} {detail}; retry with the same idempotency key", [info, retry])


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            return value[:64]
    return uuid.uuid4().hex


def _status_for(exc: Exception, context: grpc.aio.ServicerContext) -> grpc.Status:
    if isinstance(exc, InvalidRequest):
        return invalid_argument(exc.violations)
    if isinstance(exc, IdempotencyConflict):
        return idempotency_conflict()
    if isinstance(exc, NotReady):
        return unavailable("redis", "REDIS_NOT_READY", f"is not ready ({exc})")
    if isinstance(exc, CodeNotFound):
        return to_status(code_pb2.NOT_FOUND, "no such code")
    if isinstance(exc, _UNAVAILABLE_ERRORS) or (
        isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("OOM")
    ):
        log.warning("redis unavailable: %s", type(exc).__name__)
        return unavailable("redis")
    request_id = _request_id(context)
    log.exception("internal error, request id %s", request_id)
    return to_status(code_pb2.INTERNAL, f"internal error; request id {request_id}")


def rpc_boundary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Wrap a servicer method so every exception leaves as a precise status, never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort_with_status(_status_for(exc, context))
            raise  # unreachable: abort_with_status raises

    return wrapper
