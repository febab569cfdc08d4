"""Code <-> customer device binding (单设备绑定) where it lives: in the redeem script, at issuance, and across a
Redis rebuilt from Postgres."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from gateway import issuance, keys
from gateway.coderefs import KeyRing
from gateway.domain import Caller, Outcome, RedeemInput, RedeemResult
from gateway.ids import uuid7
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.rebuild import rebuild_redis
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem
from risk.engine import RiskEngine
from risk.model import Assessment, RiskRequest
from risk.policy import PolicyBook
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, at

CALLER = Caller(client_id="cl_dev", brand_id=1, role="pos")
BINDING = PolicyBook.from_documents({(1, 0): {"modes": {"device_binding": "enforce"}}})
FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)


async def _campaign(db: asyncpg.Connection, redis: Redis, keyring: KeyRing, name: str) -> issuance.Campaign:
    return await issuance.create_campaign(
        db, redis, keyring, name=name, valid_from=at(T0_MS - DAY_MS), valid_until=at(T0_MS + DAY_MS)
    )


async def _redeem(store: RedisCodeStore, keyring: KeyRing, code: str, device: str, key: str) -> RedeemResult:
    command = check_redeem(RedeemInput(code, key, "s1", "t1", device, None), keyring, CALLER)
    engine = RiskEngine(lambda: BINDING)
    request = RiskRequest(
        brand_id=1, campaign_id=command.lookup.route.campaign_id, client_id=CALLER.client_id, store_id="s1",
        terminal_id="t1", device_id=device, location=None, code_ref=command.lookup.refs[0].ref, now_ms=T0_MS,
        counts=True, store=None, terminal_store=None,
    )  # fmt: skip
    assessment: Assessment = engine.assess(request)
    return await store.redeem_one(command, uuid7(T0_MS), mode="redeem", now_ms=T0_MS, risk=assessment)


async def test_a_code_issued_for_a_device_answers_only_that_device(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, "bound-at-issuance")
    out = tmp_path / "bound.txt"
    await issuance.issue_codes(db, redis, keyring, campaign, count=1, out=out, bound_device="phone-a")
    (code,) = out.read_text().split()
    store = RedisCodeStore(redis)

    other = await _redeem(store, keyring, code, "phone-b", "k1")
    owner = await _redeem(store, keyring, code, "phone-a", "k2")

    assert (other.outcome, other.risk_reason) == (Outcome.RISK_DENIED, "DEVICE_MISMATCH")
    assert owner.outcome is Outcome.REDEEMED
    assert await db.fetchval("SELECT bound_device FROM issued_codes WHERE campaign_id = $1", campaign.id) == "phone-a"


async def test_the_first_presentation_binds_and_a_rebuilt_redis_keeps_the_binding(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, migrated: str
) -> None:
    campaign = await issuance.create_campaign(
        db, redis, keyring, name="bound-first", valid_from=at(T0_MS - DAY_MS), valid_until=at(T0_MS + DAY_MS),
        uses_per_code=3,
    )  # fmt: skip
    out = tmp_path / "first.txt"
    await issuance.issue_codes(db, redis, keyring, campaign, count=1, out=out)
    (code,) = out.read_text().split()
    store = RedisCodeStore(redis)
    assert (await _redeem(store, keyring, code, "phone-a", "k1")).outcome is Outcome.REDEEMED
    writer = LedgerWriter(Outbox(redis, consumer="binding"), partial(asyncpg.connect, migrated), FAST)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()

    await redis.flushall()
    await rebuild_redis(db, redis)

    refused = await _redeem(store, keyring, code, "phone-b", "k2")
    assert (refused.outcome, refused.risk_reason) == (Outcome.RISK_DENIED, "DEVICE_MISMATCH")
    again = await _redeem(store, keyring, code, "phone-a", "k3")
    assert (again.outcome, again.use_number) == (Outcome.REDEEMED, 2)
    ref = check_redeem(RedeemInput(code, "x", "s1", "t1", "", None), keyring, CALLER).lookup.refs[0].ref
    assert await redis.hget(keys.code_key(campaign.id, 0, ref), "dev") == "phone-a"
