"""The redeem hot path's pipelined client against a real redis-server: order, errors, NOSCRIPT, timeouts,
reconnection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis import exceptions as redis_errors

from gateway.dev.servers import RedisServer
from gateway.pipelined_redis import PipelinedRedis, Script


@pytest.fixture
def server(tmp_path: Path) -> AsyncIterator[RedisServer]:  # type: ignore[misc]
    with RedisServer.start(data_dir=tmp_path / "r", appendonly=False) as s:
        yield s
        s.resume()


@pytest_asyncio.fixture(loop_scope="session")
async def client(server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    c = PipelinedRedis(server.url, connections=2, timeout_s=0.5)
    await c.connect()
    yield c
    await c.close()


async def test_concurrent_calls_get_their_own_replies(client: PipelinedRedis) -> None:
    replies = await asyncio.gather(*(client.call("ECHO", f"m{n}") for n in range(2000)))
    assert replies == [f"m{n}" for n in range(2000)]


async def test_error_replies_fail_only_their_call(client: PipelinedRedis) -> None:
    await client.call("SET", "s", "x")
    results: list[object] = await asyncio.gather(
        client.call("GET", "s"), client.call("INCR", "s"), client.call("ECHO", "ok"), return_exceptions=True
    )
    good, bad, after = results
    assert good == "x" and after == "ok"
    assert isinstance(bad, redis_errors.ResponseError)


async def test_script_is_reloaded_after_script_flush(client: PipelinedRedis) -> None:
    script = Script(client, "return {KEYS[1], ARGV[1]}")
    assert await script(keys=["k"], args=["a"]) == ["k", "a"]
    await client.call("SCRIPT", "FLUSH")
    assert await script(keys=["k2"], args=[7]) == ["k2", "7"]


async def assert_reconnects(client: PipelinedRedis) -> None:
    """The client reconnects by itself within 5 s and answers again."""
    for _ in range(100):
        if client.connected:
            break
        await asyncio.sleep(0.05)
    assert await client.call("PING") == "PONG"


async def test_hung_redis_times_out_and_the_client_recovers(client: PipelinedRedis, server: RedisServer) -> None:
    server.pause()
    with pytest.raises(redis_errors.TimeoutError):
        await client.call("PING")
    server.resume()
    await assert_reconnects(client)


async def test_restarted_redis_is_reconnected(client: PipelinedRedis, server: RedisServer) -> None:
    server.kill()
    # A call already written when the server died times out; later ones find no connection.
    with pytest.raises((redis_errors.ConnectionError, redis_errors.TimeoutError)):
        for _ in range(50):
            await client.call("PING")
            await asyncio.sleep(0.02)
    server.restart()
    await assert_reconnects(client)
