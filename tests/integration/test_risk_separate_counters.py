"""The risk counters as their own call (RGW_RISK_REDIS_URL; the path Redis Cluster takes): the failure policy when
they cannot be reached, the events that then go through the campaign's outbox, and a gateway serving that way.
The limiter's own behaviour in this layout is covered by test_risk_limiter.py (its stores include "two calls")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import asyncpg
import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.dev.processes import free_port
from gateway.domain import Outcome
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_client import connect_server as connect
from gateway.redis_store import RedisCodeStore
from gateway.risk_counters import SeparateCounters
from gateway.settings import Settings
from gateway.tenancy import admin_risk, notify
from risk import keys as risk_keys
from risk.model import Scope
from tests.conftest import T0_MS, gateway_environ
from tests.integration.conftest import Issue, Tenants
from tests.integration.grpc_helpers import redeem_request
from tests.integration.risk_helpers import Limiter, engine_of, policy, times_used, unknown_code

FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)
ALL_OPEN = {rule: "open" for rule in ("rate_limit", "device_velocity", "code_velocity", "lockout", "impossible_travel")}


@pytest_asyncio.fixture(loop_scope="session")
async def unreachable() -> AsyncIterator[Redis]:
    """A client of a Redis that is not there (nothing listens on the port)."""
    client = connect(f"redis://127.0.0.1:{free_port()}/0", pool_size=2, timeout_s=0.5)
    yield client
    await client.aclose()


async def _ledger_events(redis: Redis, migrated: str, db: asyncpg.Connection) -> list[asyncpg.Record]:
    writer = LedgerWriter(Outbox(redis, consumer="separate"), partial(asyncpg.connect, migrated), FAST)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()
    return list(await db.fetch("SELECT rule, reason, mode, campaign_id, terminal_id FROM risk_events ORDER BY at"))


async def test_unreachable_counters_decline_where_a_rule_fails_closed_and_record_it_with_the_code(
    issue: Issue, redis: Redis, unreachable: Redis, keyring: KeyRing, migrated: str, db: asyncpg.Connection
) -> None:
    """The default policy: lockout enforced and failing closed - no counters, no redemption (a guessing attacker
    must not get an outage as a gift); the denial is recorded through the campaign's outbox."""
    await db.execute("TRUNCATE risk_events")
    issued = await issue(1)
    store = RedisCodeStore(redis, counters=SeparateCounters(unreachable))
    limiter = Limiter(store, engine_of(policy(limits={"terminal": (5, 60)}, lockout={"terminal": (3, 60, 900)})),
                      keyring)  # fmt: skip
    command = limiter.command(issued.codes[0])

    answer = await limiter.attempt(command, T0_MS)

    assert not isinstance(answer, Exception)
    assert (answer.outcome, answer.risk_rule, answer.risk_reason) == (Outcome.RISK_DENIED, "lockout",
                                                                       "RISK_DATA_UNAVAILABLE")  # fmt: skip
    assert await times_used(redis, command) == 0
    rows = await _ledger_events(redis, migrated, db)
    campaign = issued.campaign.id
    assert [tuple(r) for r in rows] == [
        ("lockout", "RISK_DATA_UNAVAILABLE", "enforce", campaign, "t1"),
        ("rate_limit", "RISK_DATA_UNAVAILABLE", "shadow", campaign, "t1"),  # fails open: skipped, recorded
    ]


async def test_unreachable_counters_admit_where_every_rule_fails_open_and_say_what_was_skipped(
    issue: Issue, redis: Redis, unreachable: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1)
    store = RedisCodeStore(redis, counters=SeparateCounters(unreachable))
    document = policy(limits={"terminal": (5, 60)}, lockout={"terminal": (3, 60, 900)})
    limiter = Limiter(store, engine_of({**document, "failure": ALL_OPEN}), keyring)
    command = limiter.command(issued.codes[0])

    answer = await limiter.attempt(command, T0_MS)

    assert not isinstance(answer, Exception)
    assert answer.outcome is Outcome.REDEEMED
    assert set(answer.shadow_hits) == {"lockout:RISK_DATA_UNAVAILABLE", "rate_limit:RISK_DATA_UNAVAILABLE"}
    assert await times_used(redis, command) == 1


async def test_a_failed_attempt_is_reported_to_the_counters_after_the_code_said_not_found(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1)
    store = RedisCodeStore(redis, counters=SeparateCounters(redis))
    limiter = Limiter(store, engine_of(policy(lockout={"terminal": (2, 60, 900)})), keyring)
    for _ in range(2):
        assert not isinstance(await limiter.attempt(limiter.command(unknown_code(issued.campaign.id)), T0_MS),
                              Exception)  # fmt: skip

    locked = await limiter.attempt(limiter.command(issued.codes[0]), T0_MS + 1)

    assert not isinstance(locked, Exception)
    assert (locked.outcome, locked.risk_reason) == (Outcome.RISK_DENIED, "LOCKED_OUT")
    assert await redis.exists(risk_keys.lock_key(1, Scope.TERMINAL, "s1/t1"))


@pytest_asyncio.fixture(loop_scope="session")
async def two_call_gateway(
    redis_url: str, migrated: str, tenants: Tenants, redis: Redis, clock: ManualClock
) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway whose risk counters are their own call (RGW_RISK_REDIS_URL = the same Redis)."""
    settings = Settings.from_env(gateway_environ(redis_url, migrated, RGW_RISK_REDIS_URL=redis_url))
    gw = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gw.start()
    yield gw, f"127.0.0.1:{port}"
    await gw.stop()


async def test_a_gateway_with_separate_counters_counts_and_limits_through_grpc(
    two_call_gateway: tuple[Gateway, str], issue: Issue, redis: Redis, tenants: Tenants, db: asyncpg.Connection
) -> None:
    gw, target = two_call_gateway
    issued = await issue(3)
    committed = await admin_risk.set_risk_policy(
        db, actor="tests", brand_id=1, campaign_id=0, document=policy(limits={"terminal": (2, 60)})
    )
    await notify.publish(redis, committed.version)
    for _ in range(100):
        if gw.registry.version >= committed.version:
            break
        await asyncio.sleep(0.02)
    channel = authenticated_channel(target, tenants.keys["internal"])
    stub = pb_grpc.RedemptionServiceStub(channel)
    try:
        first = [await stub.Redeem(redeem_request(code, f"k{n}", terminal="till-x")) for n, code in
                 enumerate(issued.codes[:2])]  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Redeem(redeem_request(issued.codes[2], "k3", terminal="till-x"))
    finally:
        await channel.close()
    assert [r.outcome for r in first] == [pb.OUTCOME_REDEEMED] * 2
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await redis.zcard(risk_keys.window_key(1, 0, Scope.TERMINAL, "store-1/till-x")) == 2
