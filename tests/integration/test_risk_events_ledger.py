"""The writer drains the brands' risk-event streams into risk_events against real Redis and Postgres: the stream
is discovered through the directory, batches mixing risk events and redemptions land exactly once, a redelivered
entry never duplicates a row, and a malformed risk event is dead-lettered while the rest are recorded."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway import keys
from gateway.ledger.events import encode_event
from gateway.ledger.outbox import Outbox, deadletter_key_for
from gateway.ledger.risk_events import encode_risk_event
from gateway.ledger.writer import LedgerWriter, WriterConfig
from risk.keys import events_key
from tests.conftest import T0_MS

FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)
BRAND = 7
STREAM = events_key(BRAND)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def risk_event(n: int, **change: str) -> dict[str, str]:
    """A lockout denial of attempt n, with a location."""
    return {
        "at": str(T0_MS + n), "brand": str(BRAND), "campaign": "42", "store": "store-1", "term": "till-1",
        "client": "cl_pos", "dev": f"dev-{n}", "rule": "lockout", "reason": "LOCKED_OUT", "mode": "enforce",
        "scope": "terminal:store-1/till-1", "lat": "31.2304", "lon": "121.4737", "acc": "12.5", "kind": "redeem",
        **change,
    }  # fmt: skip


def redemption_event(campaign_id: int = 42) -> dict[str, str]:
    """A redemption as redeem.lua writes it (the ledger has no foreign keys, so no campaign is needed)."""
    return {
        "rid": str(uuid.uuid4()), "ref": secrets.token_hex(32), "kid": "k2", "cid": str(campaign_id), "shard": "0",
        "use": "1", "at": str(T0_MS), "fp": secrets.token_hex(16), "caller": "cl_pos/till-1", "store": "store-1",
        "term": "till-1", "dev": "", "lat": "", "lon": "", "acc": "", "idem": "i:x", "client": "cl_pos",
        "brand": str(BRAND),
    }  # fmt: skip


@pytest_asyncio.fixture(loop_scope="session")
async def risk_db(db: asyncpg.Connection) -> asyncpg.Connection:
    """The db fixture, with risk_events emptied too (the shared fixture predates the table)."""
    await db.execute("TRUNCATE risk_events")
    return db


def make_writer(redis: Redis, url: str, consumer: str) -> LedgerWriter:
    return LedgerWriter(Outbox(redis, consumer=consumer), partial(asyncpg.connect, url), FAST)


@pytest_asyncio.fixture(loop_scope="session")
async def writer(redis: Redis, migrated: str) -> AsyncIterator[LedgerWriter]:
    w = make_writer(redis, migrated, "test-writer")
    yield w
    await w.close()


async def drain(writer: LedgerWriter) -> None:
    for _ in range(50):
        if await writer.run_once() == 0:
            return
    raise AssertionError("the writer kept finding work")


async def add(redis: Redis, stream: str, fields: dict[str, str], entry_id: str = "*") -> str:
    return str(await redis.xadd(stream, fields, id=entry_id))  # type: ignore[arg-type]


async def risk_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM risk_events ORDER BY stream_id"))


async def assert_drained(redis: Redis, stream: str) -> None:
    assert await redis.xlen(stream) == 0  # acknowledged, then deleted
    pending: Any = await redis.xpending(stream, keys.LEDGER_GROUP)
    assert pending["pending"] == 0


async def test_risk_events_and_redemptions_in_one_batch_land_exactly_once(
    writer: LedgerWriter, risk_db: asyncpg.Connection, redis: Redis
) -> None:
    # Written before any writer saw the stream: the group is created from the directory and reads from the start.
    ids = [await add(redis, STREAM, encode_risk_event(risk_event(n))) for n in range(3)]
    shadow = risk_event(3, campaign="0", dev="", rule="store_geofence", reason="OUTSIDE_STORE_RADIUS",
                        mode="shadow", scope="", lat="", lon="", acc="", kind="validate")  # fmt: skip
    ids.append(await add(redis, STREAM, encode_risk_event(shadow)))
    beside = redemption_event()
    await add(redis, STREAM, encode_event(beside))  # a redemption in a risk stream is still a redemption
    elsewhere = redemption_event()
    await add(redis, keys.outbox_key(42, 0), encode_event(elsewhere))
    await redis.sadd(keys.OUTBOXES, STREAM, keys.outbox_key(42, 0))
    written = metric("rgw_ledger_risk_events_written_total")

    await drain(writer)

    rows = await risk_rows(risk_db)
    assert [r["stream_id"] for r in rows] == ids
    first = rows[0]
    assert (first["brand_id"], first["campaign_id"], first["store_id"], first["terminal_id"]) == (
        BRAND, 42, "store-1", "till-1",
    )  # fmt: skip
    assert (first["client_id"], first["customer_device_id"], first["rule"], first["reason"]) == (
        "cl_pos", "dev-0", "lockout", "LOCKED_OUT",
    )  # fmt: skip
    assert (first["mode"], first["scope"], first["kind"]) == ("enforce", "terminal:store-1/till-1", "redeem")
    assert (first["latitude"], first["longitude"], first["accuracy_m"]) == (31.2304, 121.4737, 12.5)
    assert int(first["at"].timestamp() * 1000) == T0_MS and first["recorded_at"] is not None
    last = rows[-1]
    assert (last["campaign_id"], last["customer_device_id"], last["mode"], last["kind"]) == (
        0, "", "shadow", "validate",
    )  # fmt: skip
    assert (last["latitude"], last["longitude"], last["accuracy_m"], last["scope"]) == (None, None, None, "")
    recorded = {str(r["redemption_id"]) for r in await risk_db.fetch("SELECT redemption_id FROM redemptions")}
    assert recorded == {beside["rid"], elsewhere["rid"]}
    assert metric("rgw_ledger_risk_events_written_total") == written + 4
    await assert_drained(redis, STREAM)
    await assert_drained(redis, keys.outbox_key(42, 0))


async def test_a_batch_of_only_risk_events(writer: LedgerWriter, risk_db: asyncpg.Connection, redis: Redis) -> None:
    await redis.sadd(keys.OUTBOXES, STREAM)
    await drain(writer)  # the writer knows the stream before its first entry
    await add(redis, STREAM, encode_risk_event(risk_event(1)))

    await drain(writer)

    assert len(await risk_rows(risk_db)) == 1
    assert await risk_db.fetchval("SELECT count(*) FROM redemptions") == 0
    await assert_drained(redis, STREAM)


class Killed(Exception):
    """The writer died between the commit and the acknowledgement."""


async def test_an_entry_redelivered_after_a_crash_before_the_ack_is_not_recorded_twice(
    redis: Redis, migrated: str, risk_db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await redis.sadd(keys.OUTBOXES, STREAM)
    for n in range(3):
        await add(redis, STREAM, encode_risk_event(risk_event(n)))
    doomed = make_writer(redis, migrated, "doomed")

    async def die(*_: object) -> None:
        raise Killed

    monkeypatch.setattr(doomed.outbox, "ack", die)
    with pytest.raises(Killed):
        await doomed.run_once()
    await doomed.close()
    assert len(await risk_rows(risk_db)) == 3  # committed, but still pending to the dead consumer
    duplicates = metric("rgw_ledger_duplicates_total")

    await asyncio.sleep(FAST.claim_idle_ms / 1000 + 0.05)
    survivor = make_writer(redis, migrated, "survivor")
    try:
        await drain(survivor)  # reclaims the dead consumer's entries and writes them again
    finally:
        await survivor.close()

    assert len(await risk_rows(risk_db)) == 3
    assert metric("rgw_ledger_duplicates_total") == duplicates + 3
    await assert_drained(redis, STREAM)


async def test_the_same_entry_added_again_is_not_recorded_twice(
    writer: LedgerWriter, risk_db: asyncpg.Connection, redis: Redis
) -> None:
    """A stream rebuilt with the same ids (a Redis restored from an older copy) is already in risk_events."""
    await redis.sadd(keys.OUTBOXES, STREAM)
    fields = encode_risk_event(risk_event(1))
    entry_id = await add(redis, STREAM, fields)
    await drain(writer)
    await redis.delete(STREAM)  # with its consumer group: the writer recreates it

    await add(redis, STREAM, fields, entry_id)
    await add(redis, STREAM, encode_risk_event(risk_event(2)))
    assert await writer.run_once() == 0  # this read finds the group gone and recreates it, reading from the start
    await drain(writer)

    rows = await risk_rows(risk_db)
    assert [r["stream_id"] for r in rows] == [entry_id, rows[1]["stream_id"]]  # the first once, the second new
    await assert_drained(redis, STREAM)


async def test_a_malformed_risk_event_is_dead_lettered_and_the_rest_recorded(
    writer: LedgerWriter, risk_db: asyncpg.Connection, redis: Redis
) -> None:
    await redis.sadd(keys.OUTBOXES, STREAM)
    good = [await add(redis, STREAM, encode_risk_event(risk_event(n))) for n in range(2)]
    short = await add(redis, STREAM, {"r1": "1|2|3"})
    bad_mode = await add(redis, STREAM, encode_risk_event(risk_event(5, mode="off")))
    good.append(await add(redis, STREAM, encode_risk_event(risk_event(6))))
    dead = metric("rgw_ledger_dead_letters_total")

    await drain(writer)

    assert [r["stream_id"] for r in await risk_rows(risk_db)] == good
    letters: Any = await redis.xrange(deadletter_key_for(STREAM))
    assert deadletter_key_for(STREAM) == "rgw:{r7}:events:deadletter"
    assert [(f["dl_origin_id"], f["dl_reason"]) for _, f in letters] == [
        (short, "expected 15 risk event values, found 3"),
        (bad_mode, "unknown risk event mode 'off'"),
    ]
    assert letters[0][1]["r1"] == "1|2|3"  # the entry itself is kept for inspection
    assert metric("rgw_ledger_dead_letters_total") == dead + 2
    await assert_drained(redis, STREAM)


async def test_the_backlog_counts_waiting_risk_events(
    writer: LedgerWriter, risk_db: asyncpg.Connection, redis: Redis
) -> None:
    await redis.sadd(keys.OUTBOXES, STREAM)
    await add(redis, STREAM, encode_risk_event(risk_event(1)), f"{T0_MS}-0")
    await writer.outbox.refresh()

    backlog = await writer.outbox.backlog()

    assert backlog.entries == 1 and backlog.oldest_age_seconds > 0
