"""The writer against real Redis and Postgres: every field lands, redelivery is idempotent, a second redemption
of one code use raises the double-spend alarm, poison entries are dead-lettered, several writers share work."""

from __future__ import annotations

import asyncio
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
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import T0_MS
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import outbox_events, redeem_request

pytestmark = pytest.mark.single_and_cluster

FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def writer(redis: Redis, migrated: str) -> AsyncIterator[LedgerWriter]:
    w = LedgerWriter(Outbox(redis, consumer="test-writer"), partial(asyncpg.connect, migrated), FAST)
    yield w
    await w.close()


async def drain(writer: LedgerWriter) -> None:
    for _ in range(50):
        if await writer.run_once() == 0:
            return
    raise AssertionError("the writer kept finding work")


async def test_redemption_reaches_the_ledger_with_every_field(
    gateway: RunningGateway, issue: Issue, writer: LedgerWriter, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    location = pb.Location(latitude=31.2304, longitude=121.4737, accuracy_m=12.5)
    request = redeem_request(issued.codes[0], "k-1", store="s-9", terminal="t-3", customer_device_id="d-7")
    request.location.CopyFrom(location)
    reply = await gateway.stub.Redeem(request)

    await drain(writer)

    row = await db.fetchrow("SELECT * FROM redemptions")
    assert row is not None and str(row["redemption_id"]) == reply.redemption_id
    event_ref = keys.code_key(issued.campaign.id, 0, row["code_ref"].hex())
    assert await redis.exists(event_ref)
    assert (row["use_number"], row["campaign_id"], row["shard"], row["key_id"]) == (1, issued.campaign.id, 0, "k2")
    client = gateway.tenants.clients["internal"]
    assert (row["store_id"], row["terminal_id"], row["customer_device_id"], row["caller"]) == (
        "s-9",
        "t-3",
        "d-7",
        f"{client}/t-3",
    )
    assert (row["client_id"], row["brand_id"], row["face_value"]) == (client, 1, 0)  # v3: the face value counted
    assert (row["latitude"], row["longitude"], row["accuracy_m"]) == (31.2304, 121.4737, 12.5)
    assert int(row["redeemed_at"].timestamp() * 1000) == T0_MS
    assert len(row["fingerprint"]) == 32 and row["idempotency_scope"].startswith("i:")
    assert await db.fetchval("SELECT count(*) FROM code_uses") == 1
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0  # acknowledged, then deleted


async def test_replayed_outbox_entry_does_not_create_a_second_row(
    gateway: RunningGateway, issue: Issue, writer: LedgerWriter, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "k"))
    event = (await outbox_events(redis, issued.campaign.id))[0]
    await drain(writer)
    duplicates = metric("rgw_ledger_duplicates_total")

    await redis.xadd(keys.outbox_key(issued.campaign.id, 0), encode_event(event))  # type: ignore[arg-type]
    await drain(writer)

    assert await db.fetchval("SELECT count(*) FROM redemptions") == 1
    assert await db.fetchval("SELECT count(*) FROM double_spend_alarms") == 0
    assert metric("rgw_ledger_duplicates_total") == duplicates + 1
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0


async def test_different_redemption_of_the_same_code_use_raises_the_alarm(
    gateway: RunningGateway, issue: Issue, writer: LedgerWriter, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    first = await gateway.stub.Redeem(redeem_request(issued.codes[0], "k"))
    event = (await outbox_events(redis, issued.campaign.id))[0]
    await drain(writer)
    alarms = metric("rgw_ledger_double_spend_alarms_total")

    forged = {**event, "rid": str(uuid.uuid4())}  # same code, same use number, another redemption
    await redis.xadd(keys.outbox_key(issued.campaign.id, 0), encode_event(forged))  # type: ignore[arg-type]
    await drain(writer)

    alarm = await db.fetchrow("SELECT * FROM double_spend_alarms")
    assert alarm is not None
    assert str(alarm["first_redemption_id"]) == first.redemption_id
    assert str(alarm["conflicting_redemption_id"]) == forged["rid"]
    assert alarm["use_number"] == 1 and alarm["campaign_id"] == issued.campaign.id
    assert await db.fetchval("SELECT count(*) FROM redemptions") == 2  # recorded, never silently dropped
    assert metric("rgw_ledger_double_spend_alarms_total") == alarms + 1


async def test_poison_entry_goes_to_the_dead_letter_stream(
    gateway: RunningGateway, issue: Issue, writer: LedgerWriter, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(2)
    outbox = keys.outbox_key(issued.campaign.id, 0)
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "k"))
    # Use number 0 parses but breaks a CHECK constraint: Postgres rejects that row on every try.
    bad_use = {**(await outbox_events(redis, issued.campaign.id))[0], "rid": str(uuid.uuid4()), "use": "0"}
    poison_id = await redis.xadd(outbox, {"rid": "not-a-uuid", "garbage": "yes"})
    rejected_id = await redis.xadd(outbox, encode_event(bad_use))  # type: ignore[arg-type]
    await gateway.stub.Redeem(redeem_request(issued.codes[1], "k"))
    dead = metric("rgw_ledger_dead_letters_total")

    await drain(writer)

    letters: Any = await redis.xrange(keys.deadletter_key(issued.campaign.id, 0))
    origins = {fields["dl_origin_id"]: fields["dl_reason"] for _, fields in letters}
    assert set(origins) == {poison_id, rejected_id}
    assert "unknown entry format" in origins[poison_id] and "rejected by postgres" in origins[rejected_id]
    assert await db.fetchval("SELECT count(*) FROM redemptions") == 2  # the good ones, around the bad ones
    assert await redis.xlen(outbox) == 0
    assert metric("rgw_ledger_dead_letters_total") == dead + 2


async def test_several_writers_share_the_work_exactly_once(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, migrated: str
) -> None:
    issued = await issue(300, shards=3)
    replies = await asyncio.gather(*(gateway.stub.Redeem(redeem_request(c, "k")) for c in issued.codes))
    writers = [
        LedgerWriter(Outbox(redis, consumer=f"w{n}"), partial(asyncpg.connect, migrated), FAST) for n in range(3)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    try:
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM redemptions") == 300:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = {str(r["redemption_id"]) for r in await db.fetch("SELECT redemption_id FROM redemptions")}
    assert ids == {r.redemption_id for r in replies}
    assert await db.fetchval("SELECT count(*) FROM code_uses") == 300
    for shard in range(3):
        assert await redis.xlen(keys.outbox_key(issued.campaign.id, shard)) == 0


async def test_outbox_backlog_metrics(gateway: RunningGateway, issue: Issue, writer: LedgerWriter) -> None:
    issued = await issue(3)
    for n, code in enumerate(issued.codes):
        await gateway.stub.Redeem(redeem_request(code, f"k{n}"))
    await writer.outbox.refresh()
    backlog = await writer.outbox.backlog()
    assert backlog.entries == 3 and backlog.oldest_age_seconds >= 0
    await drain(writer)
    assert (await writer.outbox.backlog()).entries == 0
    assert metric("rgw_outbox_entries") in (0.0, 3.0)  # sampled at most once a second


async def test_backlog_metrics_stay_current_while_postgres_is_down(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    from gateway.dev.servers import free_port

    issued = await issue(3)
    dead_postgres = partial(asyncpg.connect, f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=1)
    config = WriterConfig(batch_size=1, batch_wait_s=0.01, poll_s=0.005, backoff_base_s=0.05, backoff_max_s=0.1,
                          backlog_refresh_s=0.05)  # fmt: skip
    writer = LedgerWriter(Outbox(redis, consumer="stuck"), dead_postgres, config)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        await gateway.stub.Redeem(redeem_request(issued.codes[0], "k0"))
        await asyncio.sleep(0.5)  # the writer now holds that entry and retries it
        for n, code in enumerate(issued.codes[1:], 1):
            await gateway.stub.Redeem(redeem_request(code, f"k{n}"))
        for _ in range(100):
            if metric("rgw_outbox_entries") == 3:
                break
            await asyncio.sleep(0.05)
        assert metric("rgw_outbox_entries") == 3 and metric("rgw_ledger_postgres_up") == 0
        assert metric("rgw_outbox_oldest_entry_age_seconds") > 0
    finally:
        stop.set()
        await task


async def test_writer_process_drains_and_exits_cleanly_on_sigterm(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis_url: str, migrated: str
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import gateway_environ

    issued = await issue(20)
    replies = [await gateway.stub.Redeem(redeem_request(c, f"k{n}")) for n, c in enumerate(issued.codes)]
    env = {**os.environ, **gateway_environ(redis_url, migrated, RGW_WRITER_CONSUMER="sigterm-test")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "writer"], env=env)
    try:
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM redemptions") == 20:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ids = {str(r["redemption_id"]) for r in await db.fetch("SELECT redemption_id FROM redemptions")}
    assert ids == {r.redemption_id for r in replies}
