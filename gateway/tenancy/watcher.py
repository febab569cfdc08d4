"""Each gateway process's copy of the tenant registry, kept current without a round trip on the hot path.

Loaded from Postgres at start; every committed change bumps `registry_version` and is announced on Redis
(gateway/tenancy/notify.py): a PUBLISH that every process receives at once, and a version key each process polls
every RGW_REGISTRY_POLL_SECONDS as the backstop for a lost message. A newer version triggers an incremental load
(only rows changed since the version held). So a revocation reaches every worker of every pod within
poll interval + one load — about a second.

Fail closed: calls are refused (RegistryNotReady → UNAVAILABLE) until the first load succeeded, and when a newer
version is known but could not be loaded for RGW_REGISTRY_MAX_STALE_SECONDS (a revoked key must not stay usable
because Postgres is unreachable). While no change is announced, a Postgres outage does not stop redemptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from gateway import keys
from gateway.domain import RegistryNotReady
from gateway.redis_client import RedisClient
from gateway.tenancy.loader import load_changes
from gateway.tenancy.notify import current_version
from gateway.tenancy.snapshot import Registry

log = logging.getLogger("rgw.registry")
_RETRY_S = 0.5
_UNKNOWN_CHECK_S = 10.0  # how often to ask Postgres when Redis holds no version at all


class RegistryWatcher:
    """The current registry of this process, refreshed on change notifications and by polling the version."""

    def __init__(
        self,
        *,
        database_url: str,
        redis: RedisClient,
        poll_s: float,
        max_stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database_url = database_url
        self._redis = redis
        self._poll_s = poll_s
        self._max_stale_s = max_stale_s
        self._clock = clock
        self._current: Registry | None = None
        self._stale_since: float | None = None
        self._last_unknown_check = 0.0
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    def registry(self) -> Registry:
        """The registry to authenticate against (hot path: no I/O); RegistryNotReady when none may be used."""
        current = self._current
        if current is None:
            raise RegistryNotReady("not loaded yet")
        if self._stale_since is not None and self._clock() - self._stale_since > self._max_stale_s:
            raise RegistryNotReady("a newer registry could not be loaded")
        return current

    @property
    def version(self) -> int:
        """The version held (0: none)."""
        return self._current.version if self._current is not None else 0

    async def start(self) -> None:
        """Try the first load now (a failure is retried in the background), then follow changes."""
        await self._refresh_quietly()
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._listen())]

    async def stop(self) -> None:
        """Stop following changes."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def refresh(self) -> None:
        """Load what changed since the version held (everything, the first time)."""
        async with self._lock:
            conn = await asyncpg.connect(self._database_url, timeout=5)
            try:
                changes = await load_changes(conn, self.version)
            finally:
                await conn.close()
            base = self._current if self._current is not None else Registry.empty()
            self._current = base.apply(changes)
            self._stale_since = None

    async def saw_version(self, version: int | None) -> None:
        """A version was announced or polled: load it if it is newer than the one held (None: the key is
        missing, e.g. a rebuilt Redis — check Postgres)."""
        if version is None:
            if self._current is not None and self._clock() - self._last_unknown_check < _UNKNOWN_CHECK_S:
                return
            self._last_unknown_check = self._clock()
        elif version <= self.version:
            return
        elif self._stale_since is None and self._current is not None:
            self._stale_since = self._clock()
        await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("registry refresh failed (%s); holding version %d", type(exc).__name__, self.version)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s if self._current is not None else _RETRY_S)
            try:
                await self.saw_version(await current_version(self._redis))
            except (TimeoutError, OSError, ConnectionError) as exc:  # Redis down: redemption is down too
                log.debug("registry version poll failed: %s", type(exc).__name__)

    async def _listen(self) -> None:
        while True:
            try:
                await self._subscribe_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poll is the backstop; resubscribe after a pause
                log.debug("registry subscription lost: %s", type(exc).__name__)
                await asyncio.sleep(_RETRY_S)

    async def _subscribe_once(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.REGISTRY_CHANNEL)
            async for message in pubsub.listen():
                data = message.get("data")
                await self.saw_version(int(data) if str(data).isdigit() else None)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
