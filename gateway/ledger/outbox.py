"""The writer's view of the outbox streams in Redis: a consumer group per stream, reading new entries,
reclaiming those of dead consumers, acknowledging (then deleting) after the ledger commit, dead-lettering.

"Outbox" here means every stream in the directory set: the campaign shards' redemption outboxes and the brands'
risk-event streams alike. Nothing in this module looks inside an entry; the writer tells the kinds apart by
their format field.

Streams are never trimmed by length: an entry leaves its stream only after Postgres committed it (XACK + XDEL
in one MULTI, same slot) or after it was copied to the dead-letter stream.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from gateway import keys
from gateway.redis_client import RedisClient

log = logging.getLogger("rgw.outbox")


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox entry in hand."""

    stream: str
    id: str
    fields: dict[str, str]

    @property
    def key(self) -> tuple[str, str]:
        """Entry ids are unique per stream only."""
        return (self.stream, self.id)


@dataclass(frozen=True, slots=True)
class Backlog:
    """How much is waiting: entries in all outboxes and the age of the oldest."""

    entries: int
    oldest_age_seconds: float


def deadletter_key_for(stream: str) -> str:
    """The dead-letter stream beside an outbox stream (same hash tag): rgw:{c42.0}:outbox -> rgw:{c42.0}:deadletter,
    a brand's risk events rgw:{r7}:events -> rgw:{r7}:events:deadletter."""
    return stream.removesuffix(":outbox") + ":deadletter"


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


class Outbox:
    """Consumer-group access to every outbox stream listed in the directory set."""

    def __init__(self, redis: RedisClient, *, consumer: str, group: str = keys.LEDGER_GROUP) -> None:
        self.redis = redis
        self.consumer = consumer
        self.group = group
        self.streams: list[str] = []
        self._own_pending_done: set[str] = set()

    async def refresh(self) -> list[str]:
        """Re-read the directory of streams and make sure each has the consumer group."""
        found = sorted(str(s) for s in await self.redis.smembers(keys.OUTBOXES))
        for stream in set(found) - set(self.streams):
            await ensure_group(self.redis, stream, self.group)
        self.streams = found
        return found

    async def read(self, limit: int) -> list[Entry]:
        """Up to `limit` entries: first this consumer's own unacknowledged ones (after a restart under the same
        name, or a failed write), then new ones; one pipelined round trip over the streams per kind."""
        if not self.streams or limit <= 0:
            return []
        pending = [s for s in self.streams if s not in self._own_pending_done]
        if pending and (own := await self._read(pending, "0", limit)):
            return own
        return await self._read(self.streams, ">", limit)

    async def _read(self, streams: list[str], start: str, limit: int) -> list[Entry]:
        per_stream = max(1, limit // len(streams))
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xreadgroup(self.group, self.consumer, {stream: start}, count=per_stream)
            replies = await pipe.execute(raise_on_error=False)
        entries: list[Entry] = []
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, redis_errors.ResponseError) and "NOGROUP" in str(reply):
                await ensure_group(self.redis, stream, self.group)
                continue
            if isinstance(reply, Exception):
                raise reply
            batch = _entries(stream, reply)
            if start == "0" and not batch:
                self._own_pending_done.add(stream)
            entries += batch
        return entries  # never truncate: an entry read is pending to us and must be handled now

    def reread_pending(self) -> None:
        """Deliver this consumer's unacknowledged entries again on the next reads (after a failed write)."""
        self._own_pending_done.clear()

    async def reclaim(self, *, min_idle_ms: int, limit: int) -> list[Entry]:
        """Entries delivered to a consumer that has not acknowledged them for `min_idle_ms` (it died)."""
        claimed: list[Entry] = []
        for stream in self.streams:
            reply: Any = await self.redis.xautoclaim(
                stream, self.group, self.consumer, min_idle_time=min_idle_ms, start_id="0-0", count=limit
            )
            claimed += [Entry(stream, i, dict(f)) for i, f in reply[1] if f is not None]
            if len(claimed) >= limit:
                break
        return claimed

    async def ack(self, entries: Iterable[Entry]) -> None:
        """Acknowledge and delete entries the ledger has committed (MULTI per stream: same slot)."""
        by_stream: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_stream[entry.stream].append(entry.id)
        for stream, ids in by_stream.items():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, self.group, *ids)
                pipe.xdel(stream, *ids)
                await pipe.execute()

    async def dead_letter(self, entry: Entry, reason: str) -> None:
        """Move one entry to its dead-letter stream: copy, acknowledge and delete in one MULTI."""
        async with self.redis.pipeline(transaction=True) as pipe:
            fields = {**entry.fields, "dl_origin_id": entry.id, "dl_reason": reason[:500]}
            pipe.xadd(deadletter_key_for(entry.stream), fields)  # type: ignore[arg-type]
            pipe.xack(entry.stream, self.group, entry.id)
            pipe.xdel(entry.stream, entry.id)
            await pipe.execute()

    async def backlog(self) -> Backlog:
        """Entries waiting in all outboxes, and the age of the oldest (0 when empty)."""
        if not self.streams:
            return Backlog(0, 0.0)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
                pipe.xrange(stream, count=1)
            replies = await pipe.execute()
        total = sum(int(n) for n in replies[0::2])
        firsts = [_entry_ms(r[0][0]) for r in replies[1::2] if r]
        age = max(0.0, time.time() - min(firsts) / 1000) if firsts else 0.0
        return Backlog(total, age)


def _entries(stream: str, reply: Sequence[Any] | None) -> list[Entry]:
    if not reply:
        return []
    return [Entry(stream, entry_id, dict(fields)) for _, messages in reply for entry_id, fields in messages if fields]


async def ensure_group(redis: RedisClient, stream: str, group: str = keys.LEDGER_GROUP) -> None:
    """Create the consumer group (and the stream) if missing; reading starts at the beginning."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
