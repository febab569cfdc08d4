"""A lean Redis client for the redeem hot path: a few connections, each pipelining every request in flight.

Why not redis-py here: per call it checks a connection out of the pool and back (a lock and a condition),
builds the command in Python and wraps the reply in layers of callbacks; a profile of Redeem put that at about a
third of the gateway's CPU per call. Here a call is: pack the command (hiredis, in C), write it, and await a
future that the connection's protocol resolves in order as hiredis parses replies. Many calls share a
connection (Redis answers in order), so there is no pool to wait for and Redis sees natural pipelines, which
also amortise its AOF fsync.

Only what the hot path needs: EVALSHA with NOSCRIPT fallback, and timeouts (a connection whose oldest request
is older than the timeout is closed and all its requests fail with TimeoutError). Everything else uses redis-py.
Redis Cluster's MOVED, ASK, TRYAGAIN and CLUSTERDOWN replies fail as redis-py's classes for them, which
gateway/pipelined_cluster.py acts on (a single Redis never sends them).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast
from urllib.parse import urlparse

import hiredis
from redis import exceptions as redis_errors

Arg = str | int | bytes


class _Connection(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in order."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.reader = hiredis.Reader(encoding="utf-8")
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self.outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not a subclass of asyncio.Transport, though it behaves as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, _ = self.waiters.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_response_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(redis_errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_lost(self)

    def fail(self, error: Exception) -> None:
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, packed: bytes, now: float) -> asyncio.Future[Any]:
        if self.transport is None or self.transport.is_closing():
            raise redis_errors.ConnectionError("not connected to Redis")
        future: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append((future, now))
        # Commands sent in the same event-loop turn leave in one write: a syscall per call was the largest
        # item of this module in a profile under load.
        if not self.outgoing:
            self.loop.call_soon(self.flush)
        self.outgoing.append(packed)
        return future

    def flush(self) -> None:
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _response_error(message: str) -> redis_errors.ResponseError:
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    if message.startswith("READONLY"):
        return redis_errors.ReadOnlyError(message)
    if message.startswith(("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")):
        return _cluster_error(message)
    return redis_errors.ResponseError(message)


def _cluster_error(message: str) -> redis_errors.ResponseError:
    """Redis Cluster's redirections and refusals, as redis-py's classes (PipelinedCluster acts on them)."""
    code, _, rest = message.partition(" ")
    try:
        if code == "MOVED":
            return redis_errors.MovedError(rest)  # .slot_id, .host, .port
        if code == "ASK":
            return redis_errors.AskError(rest)
    except ValueError:  # not "<slot> <host>:<port>": leave it a plain error
        return redis_errors.ResponseError(message)
    if code == "TRYAGAIN":
        return redis_errors.TryAgainError(message)
    return redis_errors.ClusterDownError(message)


class PipelinedRedis:
    """`connections` pipelined connections to one Redis (round robin), reconnected in the background."""

    def __init__(self, url: str, *, connections: int = 4, timeout_s: float = 2.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError("the pipelined client supports redis:// URLs (use redis-py for TLS or sockets)")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int((parsed.path or "/0").lstrip("/") or 0)
        self._password = parsed.password
        self._username = parsed.username
        self._timeout = timeout_s
        self._size = connections
        self._connections: list[_Connection | None] = [None] * connections
        self._next = itertools.cycle(range(connections))
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def connect(self) -> None:
        """Open every connection (failures are retried in the background)."""
        results = await asyncio.gather(*(self._open(i) for i in range(self._size)), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                self._reconnect(index)
        self._watch()

    async def _open(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(lambda c: self._lost(index, c)), self._host, self._port),
            self._timeout,
        )
        for command in self._handshake():
            packed = hiredis.pack_command(command)  # type: ignore[arg-type]  # the stub types it as a 1-tuple
            reply = await asyncio.wait_for(conn.send(packed, loop.time()), self._timeout)
            if isinstance(reply, Exception):
                raise reply
        if conn.transport is None or conn.transport.is_closing():
            # Lost while opening (Redis restarting, a proxy closing): its loss notice came before this slot held it,
            # so no one else will reconnect it - the caller's retry loop must.
            raise redis_errors.ConnectionError("connection to Redis lost while it was being opened")
        self._connections[index] = conn

    def _handshake(self) -> list[tuple[Arg, ...]]:
        commands: list[tuple[Arg, ...]] = []
        if self._password:
            commands.append(("AUTH", *(x for x in (self._username, self._password) if x)))
        if self._db:
            commands.append(("SELECT", self._db))
        return commands

    @property
    def connected(self) -> bool:
        """Whether at least one connection is up (health checking requires it)."""
        return any(
            c is not None and c.transport is not None and not c.transport.is_closing() for c in self._connections
        )

    def _lost(self, index: int, conn: _Connection) -> None:
        # Reconnect right away rather than on the next call, so the hot path is ready when Redis is. Only for
        # the connection in the slot now: a late notice from an old one must not drop its replacement.
        if self._connections[index] in (conn, None):
            self._connections[index] = None
            self._reconnect(index)

    def _reconnect(self, index: int) -> None:
        # A finished task stays in _tasks until its done-callback runs: only a running one is a reconnect in hand.
        if self._closed or any(t.get_name() == f"reconnect-{index}" and not t.done() for t in self._tasks):
            return

        async def again() -> None:
            delay = 0.05
            while not self._closed:
                try:
                    await self._open(index)
                    return
                except (OSError, TimeoutError, redis_errors.RedisError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)

        task = asyncio.create_task(again(), name=f"reconnect-{index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch(self) -> None:
        """Every 100 ms: fail and close a connection whose oldest request has waited longer than the timeout."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in self._connections:
            if conn is not None and conn.waiters and now - conn.waiters[0][1] > self._timeout:
                conn.fail(redis_errors.TimeoutError(f"Redis did not answer within {self._timeout}s"))
                if conn.transport is not None:
                    conn.transport.abort()
        if not self._closed:
            self._watchdog = loop.call_later(0.1, self._watch)

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send one command; the returned future resolves to its reply (or raises its error)."""
        for _ in range(self._size):
            index = next(self._next)
            conn = self._connections[index]
            if conn is not None and conn.transport is not None and not conn.transport.is_closing():
                return conn.send(hiredis.pack_command(args), asyncio.get_running_loop().time())  # type: ignore[arg-type]
            if conn is None:
                self._reconnect(index)
        raise redis_errors.ConnectionError("no connection to Redis")

    def call_after(self, first: Sequence[Arg], *args: Arg) -> asyncio.Future[Any]:
        """Send `first` and then this command back to back on one connection, nothing of other calls between them
        (Redis Cluster's ASKING must come right before the command it lets through). The future is the command's;
        `first`'s reply is dropped."""
        for _ in range(self._size):
            index = next(self._next)
            conn = self._connections[index]
            if conn is not None and conn.transport is not None and not conn.transport.is_closing():
                now = asyncio.get_running_loop().time()
                conn.send(hiredis.pack_command(tuple(first)), now).add_done_callback(_drop)  # type: ignore[arg-type]
                return conn.send(hiredis.pack_command(args), now)  # type: ignore[arg-type]
            if conn is None:
                self._reconnect(index)
        raise redis_errors.ConnectionError("no connection to Redis")

    async def close(self) -> None:
        """Close every connection and stop reconnecting."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in self._connections:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
                await conn.closed


def _drop(future: asyncio.Future[Any]) -> None:
    """Retrieve a reply no one awaits, so an error in it is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class Caller(Protocol):
    """What Script needs of a client: PipelinedRedis, or PipelinedCluster (which sends SCRIPT LOAD to every node)."""

    def call(self, *args: Arg) -> asyncio.Future[Any]: ...


class Script:
    """A Lua script run by EVALSHA; on NOSCRIPT (a restarted or flushed Redis) it is loaded and run again."""

    def __init__(self, client: Caller, source: str) -> None:
        self._client = client
        self._source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self._client.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self._client.call("SCRIPT", "LOAD", self._source)
            return await self._client.call("EVALSHA", self.sha, len(keys), *keys, *args)
