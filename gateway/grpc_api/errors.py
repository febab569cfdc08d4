"""The one boundary that maps exceptions to gRPC statuses with google.rpc details.

Declines are not errors (they are outcomes); what reaches here is a fault of the caller (INVALID_ARGUMENT, with
every bad field) or of the system (UNAVAILABLE with RetryInfo when Redis cannot answer; INTERNAL, with a request
id only, for bugs).
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.domain import (
    CodeNotFound,
    IdempotencyConflict,
    LedgerBehind,
    LedgerUnavailable,
    NotReady,
    PermissionDenied,
    RegistryNotReady,
    StoreUnavailable,
    Throttled,
    Unauthenticated,
)
from gateway.inventory.service import OrderIdReused
from gateway.ratelimited_log import RateLimitedLog
from gateway.tenancy.model import AlreadyExists, NotFoundError
from gateway.validation import FieldViolation, InvalidRequest, UndecodableRequest

DOMAIN = "redemption.v1"
REQUEST_ID_HEADER = "x-request-id"
# What a request id may look like when the caller sends one: anything else (a code pasted by mistake, a log
# injection) is replaced by a new id rather than echoed into logs and trailers.
_REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REQUEST_ID: ContextVar[str] = ContextVar("rgw_request_id", default="")
RETRY_AFTER_SECONDS = 1

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def to_status(code: int, message: str, details: Sequence[Message] = ()) -> grpc.Status:
    """A grpc.Status carrying google.rpc details in its trailers, and the call's request id (an abort replaces
    the trailers set before it, so the id must travel with the status)."""
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    rid = _REQUEST_ID.get()
    if not rid:
        return status
    return type(status)(status.code, status.details, (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))


@dataclass(frozen=True, slots=True)
class Fault:
    """What went wrong, in terms a caller can act on: a google.rpc code, a message (never a code in plaintext),
    a machine reason, the bad fields, and whether retrying (with the same idempotency key) may help."""

    code: int
    message: str
    reason: str
    violations: Sequence[FieldViolation] = ()
    retry: bool = False
    # RESOURCE_EXHAUSTED by a quota: the scope over its limit, and when the next attempt is admitted
    quota_subject: str = ""
    retry_after_ms: int = 0


_UNAUTHENTICATED = (
    "missing or invalid credentials: send `authorization: Bearer <API key>` metadata (or a client "
    "certificate where mTLS is configured)"
)
_REUSED_KEY = FieldViolation("idempotency_key", "was used for this code with a different request")
_REUSED_ORDER = FieldViolation("order_id", "was used in this brand with a different request")


# Every call fails the same way during an outage, a garbage flood or a bug on the hot path: logs must not drown.
_unavailable_log = RateLimitedLog(logging.getLogger("rgw.errors.unavailable"), burst=1)
_malformed_log = RateLimitedLog(logging.getLogger("rgw.errors.malformed"))
_internal_log = RateLimitedLog(logging.getLogger("rgw.errors.internal"))
_auth_log = RateLimitedLog(logging.getLogger("rgw.errors.auth"))


def _undecodable(exc: UndecodableRequest) -> Fault:
    _malformed_log.log(logging.WARNING, "refused an undecodable %s (%s)", exc.message_type, exc.error)
    message = (f"the request is not a valid {exc.message_type}: its bytes do not parse as protobuf (truncated, a "
               "wrong wire type, or a string that is not UTF-8)")  # fmt: skip
    return Fault(code_pb2.INVALID_ARGUMENT, message, "MALFORMED_REQUEST")


def _unauthenticated(exc: Unauthenticated) -> Fault:
    _auth_log.log(logging.WARNING, "refused a call: %s credentials", exc.kind)
    return Fault(code_pb2.UNAUTHENTICATED, _UNAUTHENTICATED, "UNAUTHENTICATED")


def _throttled(exc: Throttled) -> Fault:
    after_ms = max(exc.retry_after_ms, 1)
    message = f"rate limit of {exc.scope} reached; retry in {after_ms / 1000:.3f} s"
    return Fault(
        code_pb2.RESOURCE_EXHAUSTED, message, "RATE_LIMITED", retry=True, quota_subject=exc.scope,
        retry_after_ms=after_ms,
    )  # fmt: skip


def _unavailable(exc: StoreUnavailable) -> Fault:
    _unavailable_log.log(logging.WARNING, "redis unavailable: %s", exc)
    return Fault(code_pb2.UNAVAILABLE, "redis is unavailable; retry with the same idempotency key",
                 "DEPENDENCY_UNAVAILABLE", retry=True)  # fmt: skip


# Request-path exceptions and their faults, most specific first.
_FAULTS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], Callable[[Any], Fault]], ...] = (
    (UndecodableRequest, _undecodable),
    (Unauthenticated, _unauthenticated),
    (PermissionDenied, lambda e: Fault(code_pb2.PERMISSION_DENIED, str(e), "PERMISSION_DENIED")),
    (RegistryNotReady, lambda e: Fault(code_pb2.UNAVAILABLE, f"the tenant registry is not ready ({e}); retry with "
                                       "the same idempotency key", "REGISTRY_NOT_READY", retry=True)),
    (InvalidRequest, lambda e: Fault(code_pb2.INVALID_ARGUMENT, "invalid request: " + "; ".join(
        v.field for v in e.violations), "INVALID_REQUEST", e.violations)),
    (IdempotencyConflict, lambda e: Fault(code_pb2.INVALID_ARGUMENT, "idempotency key reused with a different "
                                          "request", "IDEMPOTENCY_KEY_REUSED", [_REUSED_KEY])),
    (OrderIdReused, lambda e: Fault(code_pb2.INVALID_ARGUMENT, "order id used before with a different request",
                                    "ORDER_ID_REUSED", [_REUSED_ORDER])),
    (NotReady, lambda e: Fault(code_pb2.UNAVAILABLE, f"redis is not ready ({e}); retry with the same idempotency "
                               "key", "REDIS_NOT_READY", retry=True)),
    (Throttled, _throttled),
    (CodeNotFound, lambda e: Fault(code_pb2.NOT_FOUND, "no such code", "CODE_NOT_FOUND")),
    # an administered entity - or another brand's, which looks exactly the same
    (NotFoundError, lambda e: Fault(code_pb2.NOT_FOUND, str(e), "NOT_FOUND")),
    (AlreadyExists, lambda e: Fault(code_pb2.ALREADY_EXISTS, str(e), "ALREADY_EXISTS")),
    (StoreUnavailable, _unavailable),
    (LedgerBehind, lambda e: Fault(code_pb2.UNAVAILABLE, "the redemption is not in the ledger yet; retry with the "
                                   "same idempotency key", "LEDGER_BEHIND", retry=True)),
    (LedgerUnavailable, lambda e: Fault(code_pb2.UNAVAILABLE, "the ledger is unavailable; retry with the same "
                                        "idempotency key", "DEPENDENCY_UNAVAILABLE", retry=True)),
)  # fmt: skip


def fault_for(exc: Exception, request_id: Callable[[], str]) -> Fault:
    """The one mapping from exceptions to faults (unary statuses and stream item errors alike)."""
    for kind, fault in _FAULTS:
        if isinstance(exc, kind):
            return fault(exc)
    rid = request_id()
    _internal_log.log(logging.ERROR, "internal error, request id %s", rid, exc_info=exc)
    return Fault(code_pb2.INTERNAL, f"internal error; request id {rid}", "INTERNAL")


def status_for(fault: Fault) -> grpc.Status:
    """A grpc.Status with google.rpc details: ErrorInfo always, BadRequest for bad fields, RetryInfo to retry."""
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=fault.reason, domain=DOMAIN)]
    if fault.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in fault.violations
        ]))  # fmt: skip
    if fault.quota_subject:
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=fault.quota_subject, description=fault.message)
        ]))  # fmt: skip
    if fault.retry:
        delay = duration_pb2.Duration(seconds=RETRY_AFTER_SECONDS)
        if fault.retry_after_ms:
            delay.FromMilliseconds(fault.retry_after_ms)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return to_status(fault.code, fault.message, details)


def bind_request_id(context: grpc.aio.ServicerContext) -> str:
    """The call's request id - the caller's x-request-id when it is a plain token, else a new one - remembered for
    the rest of the call (every RPC runs in a task of its own) and returned to the caller in trailing metadata."""
    rid = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID_FORM.fullmatch(value):
            rid = value
            break
    rid = rid or uuid.uuid4().hex
    _REQUEST_ID.set(rid)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
    return rid


def request_id_of(context: grpc.aio.ServicerContext) -> Callable[[], str]:
    """The call's request id (bound by the observing interceptor; bound here on a server without it)."""

    def request_id() -> str:
        return _REQUEST_ID.get() or bind_request_id(context)

    return request_id


def rpc_boundary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Wrap a servicer method so every exception leaves as a precise status, never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort_with_status(status_for(fault_for(exc, request_id_of(context))))
            raise  # unreachable: abort_with_status raises

    return wrapper
