"""`rgw reconcile` finds each kind of difference between Redis, the outbox and the ledger, and --repair fixes it;
`rgw rebuild-redis` restores a Redis that lost its data."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import gateway_environ
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request

pytestmark = pytest.mark.single_and_cluster

FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200)


def rgw(redis_url: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **gateway_environ(redis_url, database_url)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def drain(redis: Redis, database_url: str) -> None:
    writer = LedgerWriter(Outbox(redis, consumer="reconcile-test"), partial(asyncpg.connect, database_url), FAST)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()


async def redeem_all(gateway: RunningGateway, codes: list[str]) -> list[pb.RedeemResponse]:
    return [await gateway.stub.Redeem(redeem_request(code, f"key-{n}")) for n, code in enumerate(codes)]


async def test_consistent_campaign_passes(
    gateway: RunningGateway, issue: Issue, redis: Redis, db: asyncpg.Connection, redis_url: str, migrated: str
) -> None:
    issued = await issue(5)
    await redeem_all(gateway, issued.codes[:3])
    await drain(redis, migrated)
    result = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 uses in Redis, 3 in the ledger" in result.stdout


async def test_use_missing_from_the_ledger_is_found_and_reenqueued(
    gateway: RunningGateway, issue: Issue, redis: Redis, db: asyncpg.Connection, redis_url: str, migrated: str
) -> None:
    issued = await issue(3)
    replies = await redeem_all(gateway, issued.codes)
    await drain(redis, migrated)
    lost = replies[1].redemption_id
    await db.execute("DELETE FROM code_uses WHERE redemption_id = $1", lost)
    await db.execute("DELETE FROM redemptions WHERE redemption_id = $1", lost)

    found = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))
    repaired = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id), "--repair")
    await drain(redis, migrated)
    after = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))

    assert found.returncode == 1 and "missing in the ledger: 1" in found.stdout and lost in found.stdout
    assert repaired.returncode == 1 and "repaired: 1" in repaired.stdout
    assert after.returncode == 0, after.stdout
    row = await db.fetchrow("SELECT * FROM redemptions WHERE redemption_id = $1", lost)
    assert row is not None and row["store_id"] == "store-1" and row["use_number"] == 1


async def test_in_flight_outbox_entries_are_not_discrepancies(
    gateway: RunningGateway, issue: Issue, redis_url: str, migrated: str, db: asyncpg.Connection
) -> None:
    issued = await issue(2)
    await redeem_all(gateway, issued.codes)  # not drained: both events still in the outbox
    result = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))
    assert result.returncode == 0 and "2 in the outbox" in result.stdout


@pytest.mark.parametrize("loss", ["use_record", "whole_code"])
async def test_ledger_use_missing_in_redis_is_marked_used(
    gateway: RunningGateway,
    issue: Issue,
    redis: Redis,
    db: asyncpg.Connection,
    redis_url: str,
    migrated: str,
    loss: str,
) -> None:
    issued = await issue(2)
    replies = await redeem_all(gateway, issued.codes[:1])
    await drain(redis, migrated)
    code_ref = (await db.fetchval("SELECT code_ref FROM redemptions")).hex()
    code_key = keys.code_key(issued.campaign.id, 0, code_ref)
    if loss == "use_record":  # Redis forgot the use: the code looks unused again
        await redis.hdel(code_key, "u:1")
        await redis.hset(code_key, mapping={"used": 0, "seq": 0})
    else:
        await redis.delete(code_key)
    found = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))
    repaired = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id), "--repair")
    after = rgw(redis_url, migrated, "reconcile", "--campaign", str(issued.campaign.id))

    assert found.returncode == 1 and "missing in Redis: 1" in found.stdout
    assert repaired.returncode == 1 and after.returncode == 0, after.stdout
    again = await gateway.stub.Redeem(redeem_request(issued.codes[0], "another-key"))
    assert again.outcome == pb.OUTCOME_ALREADY_REDEEMED  # fail closed: the recorded use is never granted again
    retry = await gateway.stub.Redeem(redeem_request(issued.codes[0], "key-0"))
    assert retry.replayed and retry.redemption_id == replies[0].redemption_id
    assert str(await redis.hget(code_key, "u:1")).startswith(replies[0].redemption_id)


async def test_rebuild_redis_restores_state_and_marker(
    gateway: RunningGateway, issue: Issue, redis: Redis, db: asyncpg.Connection, redis_url: str, migrated: str
) -> None:
    issued = await issue(4, uses_per_code=2)
    used = await redeem_all(gateway, issued.codes[:2])
    await drain(redis, migrated)
    await redis.flushdb()

    refused = rgw(redis_url, migrated, "codes", "load", "--campaign", str(issued.campaign.id))
    rebuilt = rgw(redis_url, migrated, "rebuild-redis")

    assert refused.returncode == 1 and "rebuild-redis" in refused.stderr
    assert rebuilt.returncode == 0 and "restored 1 campaigns, 4 codes, 2 uses" in rebuilt.stdout
    assert await redis.exists(keys.INITIALISED)
    reply = await gateway.stub.Redeem(redeem_request(issued.codes[0], "new"))
    assert reply.outcome == pb.OUTCOME_REDEEMED and reply.use_number == 2 and reply.uses_left == 0
    replay = await gateway.stub.Redeem(redeem_request(issued.codes[1], "key-1"))
    assert replay.replayed and replay.redemption_id == used[1].redemption_id
    assert (await gateway.stub.Redeem(redeem_request(issued.codes[3], "x"))).uses_left == 1
    assert rgw(redis_url, migrated, "rebuild-redis").returncode == 0  # idempotent
    assert (
        await redis.hget(
            keys.code_key(
                issued.campaign.id,
                0,
                (
                    await db.fetchval(
                        "SELECT code_ref FROM redemptions WHERE redemption_id = $1", used[0].redemption_id
                    )
                ).hex(),
            ),
            "used",
        )
        == "2"
    )


# --- reversals and budget counters (state made without the gateway: tests/integration/ledger_state.py) -------------
