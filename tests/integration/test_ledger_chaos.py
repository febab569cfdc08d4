"""Chaos tests of the ledger path (ARCHITECTURE.md: the durability table, invariants 2 and 8), against real
processes: `rgw serve` and `rgw writer` subprocesses, real redis-server and Postgres, killed with SIGKILL under load.

Each test runs a load client that redeems fresh codes, each under its own idempotency key, through a real channel
and remembers every redemption acknowledged to it. A call that failed in transit (UNAVAILABLE, DEADLINE_EXCEEDED,
a reset stream) may or may not have happened: after recovery it is retried with the same key and request, and the
answer (the first one replayed, or a fresh redemption) is what the client was acknowledged. Afterwards the ledger
must hold exactly the acknowledged redemptions - none missing, none extra, none twice - and no double-spend alarm.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.durability import mark_initialised
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.redis_client import connect_server as connect
from tests.integration.chaos_helpers import (
    NOT_SERVING,
    SERVING,
    Load,
    Rig,
    acknowledged,
    assert_ledger_matches,
    code_records,
    health,
    issue_live,
    kill_writer_mid_batch,
    pending_of,
    redeem_once,
    report,
    resolve_unknown,
    rig,
    settle,
    sigkill,
    wait_for_backlog_below,
    wait_for_health,
    wait_for_ledger,
)
from tests.integration.conftest import Issued
from tests.integration.grpc_helpers import redeem_request


@pytest.mark.slow
async def test_writer_killed_twice_under_load_ledger_matches_acknowledgements(
    redis: Redis, db: asyncpg.Connection, keyring: KeyRing, redis_url: str, migrated: str, tmp_path: Path
) -> None:
    issued = await issue_live(db, redis, keyring, tmp_path, count=2500)
    cid, stream = issued.campaign.id, keys.outbox_key(issued.campaign.id, 0)
    async with rig(tmp_path, redis_url, migrated) as r:
        writer = r.procs.start("writer-1", "writer", RGW_WRITER_CONSUMER="writer-1")
        await r.start_gateway("gateway")
        load = Load(r.stub, iter(issued.codes), rate=300, workers=8)
        running = r.spawn(load.run(seconds=6))
        kills: list[tuple[str, int, int]] = []
        for n, committed in ((2, True), (3, False)):  # die after COMMIT before XACK; then before COMMIT
            await asyncio.sleep(1.8)
            dead = f"writer-{n - 1}"
            kills.append((dead, *await kill_writer_mid_batch(writer, redis, db, stream, dead, committed=committed)))
            writer = r.procs.start(f"writer-{n}", "writer", RGW_WRITER_CONSUMER=f"writer-{n}")
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        drain = await wait_for_ledger(db, redis, cid)
        await assert_ledger_matches(db, redis, cid, acked)
        (_, held_1, committed_1), (_, held_2, committed_2) = kills
        assert held_1 == committed_1 > 0, f"writer-1 was not caught between COMMIT and XACK: {kills}"
        assert held_2 > committed_2, f"writer-2 was not caught holding uncommitted entries: {kills}"
        for dead, _, _ in kills:  # what the dead held was reclaimed (XAUTOCLAIM) and acknowledged by another
            assert await pending_of(redis, stream, dead) == 0
        assert await redis.xlen(stream) == 0 and await pending_of(redis, stream) == 0
        assert writer.poll() is None
        report("writer-kill", acknowledged=len(acked), calls=len(load.calls), unknown=len(retries),
               kills=[(d, f"held {h}", f"{c} of them committed") for d, h, c in kills], drain_s=drain)  # fmt: skip


@pytest.mark.slow
async def test_gateway_killed_under_load_ledger_matches_acknowledgements(
    redis: Redis, db: asyncpg.Connection, keyring: KeyRing, redis_url: str, migrated: str, tmp_path: Path
) -> None:
    issued = await issue_live(db, redis, keyring, tmp_path, count=2500)
    cid = issued.campaign.id
    async with rig(tmp_path, redis_url, migrated) as r:
        r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        gateway = await r.start_gateway("gateway-1")
        load = Load(r.stub, iter(issued.codes), rate=250, workers=16)
        running = r.spawn(load.run(seconds=7))
        kills: list[tuple[int, float]] = []
        for n in (2, 3):
            await asyncio.sleep(1.5)
            killed_at = time.monotonic()
            sigkill(gateway)
            gateway = await r.start_gateway(f"gateway-{n}")  # same port
            kills.append((len(load.in_flight_at(killed_at)), time.monotonic() - killed_at))
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        drain = await wait_for_ledger(db, redis, cid)
        await assert_ledger_matches(db, redis, cid, acked)
        assert sum(1 for c in load.calls if c.unknown) > 0, "no call was caught by the kills: the test proved nothing"
        report("gateway-kill", acknowledged=len(acked), calls=len(load.calls), unknown=len(retries),
               unknown_that_had_happened=sum(c.replayed for c in retries),
               kills=[f"{k[0]} in flight, down {k[1]:.2f}s" for k in kills], drain_s=drain)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_postgres_outage_redemptions_continue_and_backlog_drains(
    redis: Redis, keyring: KeyRing, redis_url: str, tmp_path: Path
) -> None:
    pg = await asyncio.to_thread(PostgresServer.start, data_dir=tmp_path / "pg", fsync=True)
    try:
        conn = await asyncpg.connect(pg.url)
        try:
            await migrate(conn)
            issued = await issue_live(conn, redis, keyring, tmp_path, count=3500)
        finally:
            await conn.close()
        await _outage_under_load(pg, redis, issued, redis_url, tmp_path)
    finally:
        await asyncio.to_thread(pg.stop)


async def _outage_under_load(pg: PostgresServer, redis: Redis, issued: Issued, redis_url: str, tmp_path: Path) -> None:
    cid, stream, outage_s = issued.campaign.id, keys.outbox_key(issued.campaign.id, 0), 20.0
    async with rig(tmp_path, redis_url, pg.url) as r:
        writer = r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        await r.start_gateway("gateway")
        load = Load(r.stub, iter(issued.codes), rate=100, workers=8)
        running = r.spawn(load.run(seconds=outage_s + 8))
        await asyncio.sleep(3)
        await asyncio.to_thread(pg.kill)  # SIGKILL of the postmaster: the writer may be mid-transaction
        down_at = time.monotonic()
        await asyncio.sleep(outage_s)
        backlog, measured_at = int(await redis.xlen(stream)), time.monotonic()
        assert writer.poll() is None, "the writer died while Postgres was down"
        await asyncio.to_thread(pg.restart)
        up_at = time.monotonic()
        caught_up = await wait_for_backlog_below(redis, stream, int(load.rate), within=30.0)
        await running
        # A second's margin: the SIGKILLed postmaster's backends notice its death only at their next wake-up, and
        # one may still commit a writer batch of redemptions made just after the kill.
        during = load.redeemed_between(down_at + 1.0, measured_at)
        assert during > 0.5 * load.rate * outage_s, f"only {during} redemptions while Postgres was down"
        assert backlog >= during, f"outbox holds {backlog} entries, fewer than the {during} redeemed meanwhile"
        failed = [str(c) for c in load.calls if c.outcome is None]
        assert not failed, f"{len(failed)} calls failed while Postgres was down or restarting: {failed[:5]}"
        acked = acknowledged(load.calls, [])
        conn = await asyncpg.connect(pg.url)
        try:
            drain = await wait_for_ledger(conn, redis, cid)
            await assert_ledger_matches(conn, redis, cid, acked)
        finally:
            await conn.close()
        report("postgres-outage", acknowledged=len(acked), outage_s=up_at - down_at,
               redeemed_while_down=load.redeemed_between(down_at, up_at), backlog_at_restart=backlog,
               backlog_cleared_after_restart_s=caught_up, drain_after_load_s=drain)  # fmt: skip


@pytest.mark.slow
async def test_redis_killed_with_aof_always_loses_no_acknowledged_redemption(
    db: asyncpg.Connection, keyring: KeyRing, migrated: str, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(
        RedisServer.start, data_dir=tmp_path / "redis", appendonly=True, appendfsync="always"
    )
    client = connect(server.url, pool_size=8, timeout_s=5)
    try:
        await mark_initialised(client, "test")
        issued = await issue_live(db, client, keyring, tmp_path, count=1500)
        await _redis_kill_under_load(server, client, db, keyring, issued, migrated, tmp_path)
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def _redis_kill_under_load(
    server: RedisServer, client: Redis, db: asyncpg.Connection, keyring: KeyRing, issued: Issued, migrated: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cid = issued.campaign.id
    extra = {"RGW_REDIS_DURABILITY": "always", "RGW_REDIS_TIMEOUT_SECONDS": "1", "RGW_HEALTH_INTERVAL_SECONDS": "0.2"}
    async with rig(tmp_path, server.url, migrated, **extra) as r:
        writer = r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        gateway = await r.start_gateway("gateway")  # it checked appendonly yes, appendfsync always, noeviction
        load = Load(r.stub, iter(issued.codes), rate=200, workers=16, timeout=3.0)
        running = r.spawn(load.run(seconds=6))
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        await asyncio.to_thread(server.kill)  # SIGKILL
        in_flight = len(load.in_flight_at(killed_at))
        await asyncio.sleep(1)
        await asyncio.to_thread(server.restart)  # replays the AOF
        await client.connection_pool.disconnect()  # this test's own connections died with the server
        up_at = time.monotonic()
        down_s = up_at - killed_at
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        assert retries, "no call was caught by the Redis kill: the test proved nothing"
        assert gateway.poll() is None and writer.poll() is None, "a process died with Redis"
        # Redis kept every acknowledged use, with the acknowledged redemption id, and no other use of any code.
        records = await code_records(client, keyring, issued, issued.codes)
        for code, (used, seq, first, second) in records.items():
            if code in acked:
                assert (used, seq, second) == ("1", "1", None), f"code {code[:6]}…: used {used}, seq {seq}"
                assert first.split("|")[0] == acked[code], f"code {code[:6]}… lost its acknowledged use record"
            else:
                # A code never redeemed has no state hash of its own (only its bucket field): used is absent.
                assert used in (None, "0") and first is None, f"code {code[:6]}… was never acknowledged but is used"
        # Each unknown call resolved to one redemption: the first replayed, or a fresh one - and it stays that one.
        again = {c.code: c for c in await settle(r.stub, [c.request for c in retries])}
        for call in retries:
            assert again[call.code].replayed and again[call.code].redemption_id == call.redemption_id
        drain = await wait_for_ledger(db, client, cid)
        await assert_ledger_matches(db, client, cid, acked)
        late = [c for c in load.calls if c.unknown and c.started > up_at]  # after Redis was back
        refused = sum(1 for c in late if "not ready" in c.details)  # while the gateway's connections reconnect
        report("redis-kill", acknowledged=len(acked), calls=len(load.calls), in_flight_at_kill=in_flight,
               unknown=len(retries), resolved_replayed=sum(c.replayed for c in retries),
               resolved_fresh=sum(not c.replayed for c in retries), redis_down_s=down_s, drain_s=drain,
               after_redis_was_back={"refused not ready": refused, "failed": len(late) - refused})  # fmt: skip


@pytest.mark.slow
async def test_redis_data_loss_refuses_until_rebuilt_then_replays_from_the_ledger(
    db: asyncpg.Connection, keyring: KeyRing, migrated: str, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(RedisServer.start, data_dir=tmp_path / "redis", appendonly=False)
    client = connect(server.url, pool_size=4, timeout_s=5)
    try:
        await mark_initialised(client, "test")
        issued = await issue_live(db, client, keyring, tmp_path, count=50)
        async with rig(tmp_path, server.url, migrated, RGW_HEALTH_INTERVAL_SECONDS="0.1") as r:
            r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
            await r.start_gateway("gateway")
            await _lose_and_rebuild(r, client, db, issued)
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


def _original_request(i: int, code: str) -> pb.RedeemRequest:
    """Varied requests, so a replay after the rebuild must match each one's own fingerprint."""
    where = pb.Location(latitude=52.5 + i / 1000, longitude=13.4, accuracy_m=5.0) if i % 2 else None
    return redeem_request(code, f"orig-{i}", terminal=f"till-{i % 3}", customer_device_id=f"dev-{i}", location=where)


async def _lose_and_rebuild(r: Rig, client: Redis, db: asyncpg.Connection, issued: Issued) -> None:
    cid, before, unused = issued.campaign.id, issued.codes[:30], issued.codes[30]
    originals = [await redeem_once(r.stub, _original_request(i, code), 2.0) for i, code in enumerate(before)]
    assert all(c.redeemed and not c.replayed for c in originals)
    acked = {c.code: c.redemption_id for c in originals}
    await wait_for_ledger(db, client, cid)  # the writer drained before the loss

    await client.flushall()
    lost_at = time.monotonic()
    probe = codes.generate(codes.Route(cid, 0))  # never issued: an empty Redis could only say NOT_FOUND
    while True:
        call = await redeem_once(r.stub, redeem_request(probe, f"probe-{uuid.uuid4().hex}"), 2.0)
        if call.status == grpc.StatusCode.UNAVAILABLE and "not initialised" in call.details:
            break
        assert call.outcome == pb.OUTCOME_NOT_FOUND, f"before the refusal: {call}"
        assert time.monotonic() - lost_at < 1.0, "still redeeming against an empty Redis after 10 health intervals"
        await asyncio.sleep(0.02)
    refused_after = time.monotonic() - lost_at
    assert await health(r.channel) == NOT_SERVING
    refused = await redeem_once(r.stub, redeem_request(before[0], "after-loss"), 2.0)
    assert refused.status == grpc.StatusCode.UNAVAILABLE and "not initialised" in refused.details

    rebuild = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway.cli", "rebuild-redis"], env={**os.environ, **r.procs.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rebuild.returncode == 0, rebuild.stderr
    assert "restored 1 campaigns, 50 codes, 30 uses" in rebuild.stdout, rebuild.stdout
    serving_after = await wait_for_health(r.channel, SERVING, within=1.0)

    for i, original in enumerate(originals):
        fresh_key = await redeem_once(r.stub, redeem_request(original.code, f"new-{i}"), 2.0)
        assert fresh_key.outcome == pb.OUTCOME_ALREADY_REDEEMED, f"used code redeemed again: {fresh_key}"
        retry = await redeem_once(r.stub, _original_request(i, original.code), 2.0)
        assert (retry.redeemed, retry.replayed) == (True, True), f"retry after rebuild: {retry}"
        assert (retry.redemption_id, retry.use_number) == (original.redemption_id, 1)
    first = await redeem_once(r.stub, redeem_request(unused, "unused-1"), 2.0)
    assert first.redeemed and not first.replayed, f"unused code after rebuild: {first}"
    second = await redeem_once(r.stub, redeem_request(unused, "unused-2"), 2.0)
    assert second.outcome == pb.OUTCOME_ALREADY_REDEEMED
    acked[unused] = first.redemption_id
    drain = await wait_for_ledger(db, client, cid)
    await assert_ledger_matches(db, client, cid, acked)
    report("redis-data-loss", redeemed_before_loss=len(originals), refused_after_s=refused_after,
           serving_after_rebuild_s=serving_after, drain_s=drain)  # fmt: skip
