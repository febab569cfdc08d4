"""The outermost interceptor: gRPC RED metrics with go-grpc-middleware's names and labels, the request id, and one
access-log line per RPC.

Nothing here awaits: counters and the histogram are in-process, the log record goes to a queue that a thread
writes out (gateway/logs.py). Everything per method (label children, names) is built once, on its first call.
What the handler decided (outcome and reason, or a stream's item count) reaches the access log through `note`,
which the servicer calls where it builds the answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from gateway import gateway_metrics as m
from gateway.access_log import FIELDS
from gateway.access_log import current as access_sink
from gateway.grpc_api.auth import current_caller_or_none
from gateway.grpc_api.errors import bind_request_id
from gateway.grpc_api.interceptors import WrappingInterceptor

access_log = logging.getLogger("rgw.access")
_HEALTH = "/grpc.health.v1.Health/"

# Go's names of the status codes (grpc.StatusCode.NOT_FOUND -> "NotFound"), as go-grpc-middleware labels them.
GO_CODE_NAMES: dict[grpc.StatusCode | None, str] = {
    code: "".join(part.title() for part in code.name.split("_")) for code in grpc.StatusCode
}
GO_CODE_NAMES[grpc.StatusCode.OK] = GO_CODE_NAMES[None] = "OK"
GO_CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"

_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

_KINDS = {
    (False, False): ("unary_unary", "unary"),
    (False, True): ("unary_stream", "server_stream"),
    (True, False): ("stream_unary", "client_stream"),
    (True, True): ("stream_stream", "bidi_stream"),
}


class CallNote:
    """What one call decided, for its access-log line: the last answer's outcome and reason, and how many."""

    __slots__ = ("answers", "outcome", "reason")

    def __init__(self) -> None:
        self.outcome = self.reason = ""
        self.answers = 0


_NOTE: ContextVar[CallNote | None] = ContextVar("rgw_call_note", default=None)
_OUTCOMES: dict[tuple[str, str, str], Callable[[], None]] = {}


def note(method: str, outcome: str, reason: str) -> None:
    """Count one answer (rgw_redemption_outcomes_total) and remember it for the call's access-log line."""
    key = (method, outcome, reason)
    inc = _OUTCOMES.get(key)
    if inc is None:
        inc = _OUTCOMES[key] = m.REDEMPTION_OUTCOMES.labels(method, outcome, reason).inc
    inc()
    call = _NOTE.get()
    if call is not None:
        call.outcome, call.reason = outcome, reason
        call.answers += 1


_ITEM_ERRORS: dict[int, Callable[[], None]] = {}


def item_failed(code: int) -> None:
    """Count one stream item answered with an ItemError (its google.rpc code)."""
    inc = _ITEM_ERRORS.get(code)
    if inc is None:
        name = GO_CODE_NAMES.get(_BY_NUMBER.get(code), "Unknown")
        inc = _ITEM_ERRORS[code] = m.STREAM_ITEM_ERRORS.labels(name).inc
    inc()


class _Method:
    """One method's label children, looked up once."""

    __slots__ = ("_labels", "handled", "name", "received", "seconds", "sent", "service", "started")

    def __init__(self, full_method: str, grpc_type: str) -> None:
        self.service, _, self.name = full_method.lstrip("/").rpartition("/")
        self._labels = (grpc_type, self.service, self.name)
        self.started = m.GRPC_STARTED.labels(*self._labels).inc
        self.received = m.GRPC_RECEIVED.labels(*self._labels).inc
        self.sent = m.GRPC_SENT.labels(*self._labels).inc
        self.seconds = m.GRPC_SECONDS.labels(*self._labels).observe
        self.handled: dict[str, Callable[[], None]] = {}

    def finish(self, code: str, started: float, call: CallNote, rid: str, access: bool) -> None:
        elapsed = time.perf_counter() - started
        self.seconds(elapsed)
        inc = self.handled.get(code)
        if inc is None:
            inc = self.handled[code] = m.GRPC_HANDLED.labels(*self._labels, code).inc
        inc()
        if access and access_log.isEnabledFor(logging.INFO):
            self._log(code, elapsed, call, rid)

    def _log(self, code: str, elapsed: float, call: CallNote, rid: str) -> None:
        caller = current_caller_or_none()
        brand = caller.brand_id if caller is not None else None
        client = caller.client_id if caller is not None else None
        duration_ms = round(elapsed * 1000, 3)
        sink = access_sink()
        if sink is not None:  # the production path: a tuple onto a deque, formatted by a thread
            line = (time.time(), self.service, self.name, code, call.outcome, call.reason, call.answers, duration_ms)
            sink.add((*line, brand, client, rid))
            return
        fields = dict(zip(FIELDS, (self.service, self.name, code, call.outcome, call.reason, call.answers,
                                   duration_ms, brand, client, rid), strict=True))  # fmt: skip
        access_log.info("%s %s", self.name, code, extra={"fields": fields})


def _code(context: grpc.aio.ServicerContext) -> str:
    return GO_CODE_NAMES.get(context.code(), "Unknown")


def _failed(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        return _code(context)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller went away mid-call or mid-stream
        return "Canceled"
    return "Unknown"  # grpc.aio answers an exception that escapes a handler with UNKNOWN


def _begin(method: _Method, context: grpc.aio.ServicerContext) -> tuple[float, CallNote, str]:
    method.started()
    call = CallNote()
    _NOTE.set(call)  # each RPC runs in a task of its own: the note is this call's alone
    return time.perf_counter(), call, bind_request_id(context)


async def _counted(requests: AsyncIterator[Any], method: _Method) -> AsyncIterator[Any]:
    async for request in requests:
        method.received()
        yield request


def _observe(
    method: _Method, behaviour: Callable[..., Any], *, stream_in: bool, streaming_out: bool, access: bool
) -> Any:
    """The behaviour, measured: of the same kind (grpc.aio tells an async generator from a coroutine that writes
    with context.write(), like health's Watch, by its function type)."""

    def arrive(request: Any) -> Any:  # the request as the behaviour takes it, counting what arrives
        if stream_in:
            return _counted(request, method)
        method.received()
        return request

    if streaming_out and inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, call, rid = _begin(method, context)
            code = "OK"
            try:
                async for response in behaviour(arrive(request), context):
                    method.sent()
                    yield response
                code = _code(context)
            except BaseException as exc:
                code = _failed(exc, context)
                raise
            finally:
                method.finish(code, started, call, rid, access)

        return streaming

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, call, rid = _begin(method, context)
        code = "OK"
        try:
            response = await behaviour(arrive(request), context)
            if not streaming_out:
                method.sent()
            code = _code(context)
            return response
        except BaseException as exc:
            code = _failed(exc, context)
            raise
        finally:
            method.finish(code, started, call, rid, access)

    return single


def observed(handler: grpc.RpcMethodHandler, full_method: str, *, access: bool) -> grpc.RpcMethodHandler:
    """The same handler, measured and logged."""
    kind, grpc_type = _KINDS[(handler.request_streaming, handler.response_streaming)]
    method = _Method(full_method, grpc_type)
    behaviour = _observe(
        method,
        getattr(handler, kind),
        stream_in=handler.request_streaming,
        streaming_out=handler.response_streaming,
        access=access,
    )
    return handler._replace(**{kind: behaviour})


class Observe(WrappingInterceptor):
    """RED metrics and a request id for every call (health and reflection included: a probe storm is worth
    seeing), an access-log line for every call but health checks. Outermost, so refusals by the interceptors after
    it are measured and logged too."""

    def __init__(self, *, access_log: bool = True) -> None:
        super().__init__()
        self._access = access_log

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # probes call Health every few seconds per pod: measured, but kept out of the access log
        return observed(handler, method, access=self._access and not method.startswith(_HEALTH))
