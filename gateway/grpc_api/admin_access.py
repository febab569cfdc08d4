"""AdminService's way to the registry: a connection from the gateway's pool per call, and the announcement of every
committed change (notify.publish) so each gateway process refreshes its registry at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
from redis import exceptions as redis_errors

from gateway.domain import RegistryNotReady
from gateway.redis_client import RedisClient
from gateway.tenancy import notify
from gateway.tenancy.admin_tx import Committed

log = logging.getLogger("rgw.admin")
T = TypeVar("T")
Change = Callable[[asyncpg.Connection], Awaitable[Committed[T]]]
Query = Callable[[asyncpg.Connection], Awaitable[T]]

_CONNECT_TIMEOUT_S = 5.0
_ANNOUNCE_RETRY_S = 1.0
# Postgres could not be reached before anything happened (UNAVAILABLE): the call can simply be retried.
_DB_UNREACHABLE = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
_ANNOUNCE_FAILED = (redis_errors.RedisError, OSError, TimeoutError)


class RegistryAccess:
    """Reads and changes through a connection pool; announces each change, retrying in the background."""

    def __init__(self, pool: asyncpg.Pool, redis: RedisClient) -> None:
        self._pool = pool
        self._redis = redis
        self._unannounced = 0  # the newest committed version not yet announced (0: none)
        self._announcer: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self._pool.acquire(timeout=_CONNECT_TIMEOUT_S)
        except _DB_UNREACHABLE as exc:
            raise RegistryNotReady(f"the registry database is unreachable: {type(exc).__name__}") from None
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    async def read(self, query: Query[T]) -> T:
        """Run one query."""
        async with self._connection() as conn:
            return await query(conn)

    async def commit(self, change: Change[T]) -> T:
        """Run one change and announce its version; the answer is the committed value."""
        return (await self.commit_versioned(change)).value

    async def commit_versioned(self, change: Change[T]) -> Committed[T]:
        """Run one change and announce its version; the answer is the committed value and that version."""
        async with self._connection() as conn:
            committed = await change(conn)
        await self._announce(committed.version)
        return committed

    async def _announce(self, version: int) -> None:
        """Tell every gateway process. The change is committed whatever happens here, so a Redis failure does not
        fail the call (a retried create would make a second client, and its one-time key would be lost): this
        process keeps announcing in the background until Redis answers."""
        try:
            await notify.publish(self._redis, version)
        except _ANNOUNCE_FAILED as exc:
            log.warning("registry version %d is committed but not announced (%s); retrying", version,
                        type(exc).__name__)  # fmt: skip
            self._unannounced = max(self._unannounced, version)
            if self._announcer is None or self._announcer.done():
                self._announcer = asyncio.create_task(self._announce_later())

    async def _announce_later(self) -> None:
        # One announcement of the newest version covers the older ones: processes load every row changed since.
        while self._unannounced:
            await asyncio.sleep(_ANNOUNCE_RETRY_S)
            version = self._unannounced
            with contextlib.suppress(*_ANNOUNCE_FAILED):
                await notify.publish(self._redis, version)
                log.info("registry version %d announced", version)
                if self._unannounced == version:
                    self._unannounced = 0

    async def close(self) -> None:
        """Stop announcing in the background (the next change, by any process, announces what is left)."""
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        if self._unannounced:
            log.error("registry version %d was never announced: gateways apply it with the next change",
                      self._unannounced)  # fmt: skip
