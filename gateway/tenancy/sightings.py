"""When each registered terminal was first and last seen, without a write on the hot path.

A call only notes (brand, store, terminal, time) in a dict; every interval the gateway writes what it noted in ONE
statement that touches registered terminals only (an unregistered terminal id matches nothing). Sightings are
not registry changes: they bump no version and no process reloads anything for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import asyncpg

log = logging.getLogger("rgw.sightings")

# Distinct terminals noted per interval: a caller inventing terminal ids cannot grow memory without bound.
MAX_PER_INTERVAL = 100_000
Key = tuple[int, str, str]

_FLUSH = """
UPDATE terminals t
SET last_seen_at = GREATEST(t.last_seen_at, v.at), first_seen_at = COALESCE(t.first_seen_at, v.at)
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[]) AS v(brand_id, store, terminal, at)
JOIN stores s ON s.brand_id = v.brand_id AND s.external_id = v.store
WHERE t.store_id = s.id AND t.external_id = v.terminal"""


class Sightings:
    """The terminals seen since the last flush, with the latest time each was seen."""

    def __init__(self, limit: int = MAX_PER_INTERVAL) -> None:
        self._seen: dict[Key, int] = {}
        self._limit = limit

    def saw(self, brand_id: int, store_id: str, terminal_id: str, at_ms: int) -> None:
        """Note a call from a terminal (external ids): a dict write, nothing else."""
        key = (brand_id, store_id, terminal_id)
        known = self._seen.get(key)
        if known is None and len(self._seen) >= self._limit:
            return
        if known is None or at_ms > known:
            self._seen[key] = at_ms

    def take(self) -> dict[Key, int]:
        """What was noted since the last take."""
        seen, self._seen = self._seen, {}
        return seen


async def flush(conn: asyncpg.Connection, seen: dict[Key, int]) -> int:
    """Record sightings in `terminals`; returns how many registered terminals were touched."""
    if not seen:
        return 0
    brands, stores, terminals = (list(column) for column in zip(*seen, strict=True))
    times = [datetime.fromtimestamp(ms / 1000, UTC) for ms in seen.values()]
    status: str = await conn.execute(_FLUSH, brands, stores, terminals, times)
    return int(status.rsplit(" ", 1)[-1])


async def flush_every(interval_s: float, sightings: Sightings, pool: asyncpg.Pool) -> None:
    """Flush forever (until cancelled); a failed flush keeps its sightings for the next one."""
    while True:
        await asyncio.sleep(interval_s)
        await flush_once(sightings, pool)


async def flush_once(sightings: Sightings, pool: asyncpg.Pool) -> None:
    """One flush of what was noted (put back when Postgres cannot take it)."""
    seen = sightings.take()
    try:
        async with pool.acquire(timeout=5) as conn:
            await flush(conn, seen)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("terminal sightings not recorded (%s); retrying next interval", type(exc).__name__)
        for (brand, store, terminal), at in seen.items():
            sightings.saw(brand, store, terminal, at)


async def stop_flushing(task: asyncio.Task[None], sightings: Sightings, pool: asyncpg.Pool) -> None:
    """Cancel the periodic flush and write what is left (graceful shutdown)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await flush_once(sightings, pool)
