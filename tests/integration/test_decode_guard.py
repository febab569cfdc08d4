"""DecodeGuard on every kind of RPC, whichever way its behaviour sends (async generator or context.write)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from gateway.grpc_api.interceptors import DecodeGuard

GOOD = wrappers_pb2.StringValue(value="ok").SerializeToString()
BAD = bytes.fromhex("0a01ff")  # field 1 holding invalid UTF-8


async def unary_unary(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> wrappers_pb2.StringValue:
    return request


async def unary_stream_gen(request: wrappers_pb2.StringValue, context: Any) -> AsyncIterator[wrappers_pb2.StringValue]:
    yield request


async def unary_stream_write(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> None:
    await context.write(request)


async def stream_unary(requests: AsyncIterator[wrappers_pb2.StringValue], context: Any) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value="".join([r.value async for r in requests]))


async def stream_stream_gen(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[wrappers_pb2.StringValue]:
    async for request in requests:
        yield request


async def stream_stream_write(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    async for request in requests:
        await context.write(request)


def _handler(factory: Callable[..., grpc.RpcMethodHandler], behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    return factory(behaviour, request_deserializer=wrappers_pb2.StringValue.FromString,
                   response_serializer=wrappers_pb2.StringValue.SerializeToString)  # fmt: skip


HANDLERS = {
    "UnaryUnary": _handler(grpc.unary_unary_rpc_method_handler, unary_unary),
    "UnaryStreamGen": _handler(grpc.unary_stream_rpc_method_handler, unary_stream_gen),
    "UnaryStreamWrite": _handler(grpc.unary_stream_rpc_method_handler, unary_stream_write),
    "StreamUnary": _handler(grpc.stream_unary_rpc_method_handler, stream_unary),
    "StreamStreamGen": _handler(grpc.stream_stream_rpc_method_handler, stream_stream_gen),
    "StreamStreamWrite": _handler(grpc.stream_stream_rpc_method_handler, stream_stream_write),
}


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[DecodeGuard()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(None)


async def _call(channel: grpc.aio.Channel, name: str, bodies: list[bytes]) -> list[bytes]:
    method = f"/t.T/{name}"
    if name.startswith("UnaryUnary"):
        return [await channel.unary_unary(method)(bodies[0], timeout=5)]
    if name.startswith("UnaryStream"):
        return [r async for r in channel.unary_stream(method)(bodies[0], timeout=5)]

    async def requests() -> AsyncIterator[bytes]:
        for body in bodies:
            yield body

    if name == "StreamUnary":
        return [await channel.stream_unary(method)(requests(), timeout=5)]
    return [r async for r in channel.stream_stream(method)(requests(), timeout=5)]


@pytest.mark.parametrize("name", HANDLERS)
async def test_good_messages_pass_untouched(channel: grpc.aio.Channel, name: str) -> None:
    replies = await _call(channel, name, [GOOD])
    assert [wrappers_pb2.StringValue.FromString(r).value for r in replies] == ["ok"]


@pytest.mark.parametrize("name", HANDLERS)
async def test_an_undecodable_message_is_invalid_argument(channel: grpc.aio.Channel, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(channel, name, [GOOD, BAD] if name.startswith("Stream") else [BAD])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "google.protobuf.StringValue" in (info.value.details() or "")
