"""Server interceptors: what every RPC goes through before its handler.

`DecodeGuard` makes request bytes that do not parse an INVALID_ARGUMENT for every RPC and every stream message —
the gRPC API itself, health and reflection alike. Left alone, grpc.aio calls the deserializer outside any handler
and answers a DecodeError with UNKNOWN (unary) or INTERNAL (streams) plus a traceback in the log per call.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.grpc_api.errors import fault_for, request_id_of, status_for
from gateway.validation import UndecodableRequest

Deserializer = Callable[[bytes], Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse; the guard refuses it before the handler."""

    message_type: str
    error: str


def _message_type(deserializer: Deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)  # FromString is a classmethod of the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def tolerant(deserializer: Deserializer) -> Deserializer:
    """A deserializer that never raises: bytes that do not parse become an Undecodable."""
    message_type = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a foreign deserializer raises on garbage
            return Undecodable(message_type, type(exc).__name__)

    return deserialize


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    error = UndecodableRequest(request.message_type, request.error)
    await context.abort_with_status(status_for(fault_for(error, request_id_of(context))))


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The stream's messages, ending the call with INVALID_ARGUMENT at the first one that did not parse."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        yield request


def _guard_unary_in(behaviour: Callable[..., Any], streaming_out: bool) -> Callable[..., Any]:
    # A streaming behaviour is an async generator, or a coroutine that sends with context.write() (health's
    # Watch): the wrapper must be of the same kind, since grpc.aio tells them apart by their function type.
    if streaming_out and inspect.isasyncgenfunction(behaviour):

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            async for response in behaviour(request, context):
                yield response

        return unary_stream

    async def unary_in(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return await behaviour(request, context)

    return unary_in


def _guard_stream_in(behaviour: Callable[..., Any], streaming_out: bool) -> Callable[..., Any]:
    if streaming_out and inspect.isasyncgenfunction(behaviour):

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(_checked(requests, context), context):
                yield response

        return stream_stream

    async def stream_in(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_checked(requests, context), context)

    return stream_in


def guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler with a tolerant deserializer and a behaviour that refuses what did not parse."""
    if handler.request_deserializer is None:
        return handler  # raw bytes in: nothing to parse
    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]
    guard = _guard_stream_in if handler.request_streaming else _guard_unary_in
    behaviour = guard(getattr(handler, kind), handler.response_streaming)
    return handler._replace(request_deserializer=tolerant(handler.request_deserializer), **{kind: behaviour})


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor that wraps each method's handler: handlers are looked up per call but never change, so each
    wrapped handler is built once and cached (rebuilt only if the server hands out another handler)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler to use for `method` (the handler itself when there is nothing to add)."""
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._cache[method] = (handler, wrapped)
        return wrapped


class DecodeGuard(WrappingInterceptor):
    """Undecodable request bytes → INVALID_ARGUMENT (reason MALFORMED_REQUEST), before any handler logic."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return guarded(handler)
