"""Reversals through the outbox into the ledger, against real Redis and Postgres: v3 redemption and x1 reversal
events land with every field, a redemption and its reversal in one batch both land, a redelivered reversal is not
a second row, a second, different reversal of one redemption is an alarm (never a second row), poison reversal
entries are dead-lettered - and a writer SIGKILLed mid-batch leaves every redemption and reversal exactly once."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway import keys
from gateway.coderefs import KeyRing
from gateway.ledger.events import EVENT_FIELDS_V2, decode_event, decode_reversal_event, is_reversal_entry
from gateway.ledger.writer import LedgerWriter
from tests.conftest import gateway_environ
from tests.integration.chaos_helpers import PROCESS_KNOBS, Processes, pending_of, sigkill
from tests.integration.ledger_state import (
    budget,
    campaign_with_codes,
    clean_reversals,
    drain,
    redeem,
    reverse,
    writer,
)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """The test database with no reversals left from earlier tests."""
    await clean_reversals(db)
    yield db


@pytest_asyncio.fixture(loop_scope="session")
async def one_writer(redis: Redis, migrated: str) -> AsyncIterator[LedgerWriter]:
    w = writer(redis, migrated)
    yield w
    await w.close()


async def run_until_idle(w: LedgerWriter) -> None:
    for _ in range(50):
        if await w.run_once() == 0:
            return
    raise AssertionError("the writer kept finding work")


async def test_v3_redemptions_and_x1_reversals_land_with_every_field(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=2, face_value=250, budget_count=10)
    first, second = codes.use(0), codes.use(1, face_value=400)
    await redeem(redis, first, second)
    undo = codes.reversal(second, reason="till-void")
    await reverse(redis, undo)
    # A v2 event (from before face values) is still read: it counted nothing against a value budget.
    legacy = codes.use(1)
    v2 = decode_event(legacy.event())
    await redis.xadd(keys.outbox_key(codes.campaign.id, 0), {"v2": "|".join(v2[name] for name in EVENT_FIELDS_V2)})
    await drain(redis, migrated)

    values = {str(r["redemption_id"]): r["face_value"] for r in await ledger.fetch("SELECT * FROM redemptions")}
    assert values == {first.redemption_id: 250, second.redemption_id: 400, legacy.redemption_id: 0}
    row = await ledger.fetchrow("SELECT * FROM reversals")
    assert row is not None and await ledger.fetchval("SELECT count(*) FROM reversals") == 1
    assert (str(row["reversal_id"]), str(row["redemption_id"])) == (undo.reversal_id, second.redemption_id)
    assert (row["code_ref"].hex(), row["key_id"], row["use_number"]) == (second.code_ref, "k2", 1)
    assert (row["campaign_id"], row["shard"], row["face_value"]) == (codes.campaign.id, 0, 400)
    assert (row["reason"], row["caller"], row["client_id"], row["brand_id"]) == ("till-void", "cl_t/till-2", "cl_t", 1)
    assert int(row["reversed_at"].timestamp() * 1000) == undo.at_ms
    assert (row["idempotency_scope"], row["fingerprint"]) == (undo.idem, undo.fingerprint)
    assert row["outbox_id"].count("-") == 1
    assert await redis.xlen(keys.outbox_key(codes.campaign.id, 0)) == 0
    assert await budget(redis, codes.campaign.id, 0) == {"n": 10, "v": 0, "un": 1, "uv": 250, "red": 2, "rev": 1,
                                                         "iss": 2}  # fmt: skip


async def test_redemption_and_its_reversal_in_one_batch_both_land(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, one_writer: LedgerWriter
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=1)
    use = codes.use(0)
    undo = codes.reversal(use)
    await redeem(redis, use)
    await reverse(redis, undo)
    written = metric("rgw_ledger_reversals_written_total")

    assert await one_writer.run_once() == 2  # one batch, one transaction

    assert await ledger.fetchval("SELECT count(*) FROM redemptions WHERE redemption_id = $1", use.redemption_id) == 1
    assert str(await ledger.fetchval("SELECT reversal_id FROM reversals")) == undo.reversal_id
    assert metric("rgw_ledger_reversals_written_total") == written + 1


async def test_redelivered_reversal_is_not_a_second_row(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, one_writer: LedgerWriter
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=1)
    use = codes.use(0)
    undo = codes.reversal(use)
    await redeem(redis, use)
    await reverse(redis, undo)
    await run_until_idle(one_writer)
    duplicates = metric("rgw_ledger_duplicates_total")

    outbox = keys.outbox_key(codes.campaign.id, 0)
    await redis.xadd(outbox, undo.event())  # type: ignore[arg-type]
    await redis.xadd(outbox, undo.event())  # type: ignore[arg-type]  # twice in one batch, too
    await run_until_idle(one_writer)

    assert await ledger.fetchval("SELECT count(*) FROM reversals") == 1
    assert await ledger.fetchval("SELECT count(*) FROM reversal_alarms") == 0
    assert metric("rgw_ledger_duplicates_total") == duplicates + 2
    assert await redis.xlen(outbox) == 0


@pytest.mark.parametrize("same_batch", [False, True])
async def test_a_second_different_reversal_of_one_redemption_is_an_alarm_never_a_row(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, one_writer: LedgerWriter,
    caplog: pytest.LogCaptureFixture, same_batch: bool,
) -> None:  # fmt: skip
    codes = await campaign_with_codes(ledger, redis, keyring, count=1)
    use = codes.use(0)
    first, second = codes.reversal(use), codes.reversal(use, reason="again")
    await redeem(redis, use)
    await reverse(redis, first)
    if not same_batch:
        await run_until_idle(one_writer)
    alarms = metric("rgw_ledger_reversal_alarms_total")

    outbox = keys.outbox_key(codes.campaign.id, 0)
    await redis.xadd(outbox, second.event())  # type: ignore[arg-type]
    await run_until_idle(one_writer)
    await redis.xadd(outbox, second.event())  # type: ignore[arg-type]  # redelivered: no second alarm
    await run_until_idle(one_writer)

    rows = await ledger.fetch("SELECT reversal_id, reason FROM reversals")
    assert [(str(r["reversal_id"]), r["reason"]) for r in rows] == [(first.reversal_id, "refund")]
    alarm = await ledger.fetchrow("SELECT * FROM reversal_alarms")
    assert alarm is not None and await ledger.fetchval("SELECT count(*) FROM reversal_alarms") == 1
    assert str(alarm["redemption_id"]) == use.redemption_id
    assert (str(alarm["first_reversal_id"]), str(alarm["conflicting_reversal_id"])) == (
        first.reversal_id, second.reversal_id,
    )  # fmt: skip
    assert metric("rgw_ledger_reversal_alarms_total") == alarms + 1
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "SECOND REVERSAL" in r.getMessage()]
    assert len(logged) == 1 and second.reversal_id in logged[0].getMessage()
    assert await redis.xlen(outbox) == 0


async def test_poison_reversal_entries_go_to_the_dead_letter_stream(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, one_writer: LedgerWriter
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=2)
    outbox = keys.outbox_key(codes.campaign.id, 0)
    use, other = codes.use(0), codes.use(1)
    await redeem(redis, use, other)
    good = codes.reversal(use)
    fields = decode_reversal_event(good.event())
    short = await redis.xadd(outbox, {"x1": "only|three|values"})
    no_uuid = await redis.xadd(outbox, {"x1": "|".join({**fields, "xid": "not-a-uuid"}.values())})
    no_ref = await redis.xadd(outbox, {"x1": "|".join({**fields, "xid": str(uuid.uuid4()), "ref": ""}.values())})
    # Use number 0 parses but breaks a CHECK constraint: Postgres rejects that row on every try.
    rejected = await redis.xadd(outbox, {"x1": "|".join({**fields, "xid": str(uuid.uuid4()), "use": "0"}.values())})
    await reverse(redis, good)
    dead = metric("rgw_ledger_dead_letters_total")

    await run_until_idle(one_writer)

    letters: Any = await redis.xrange(keys.deadletter_key(codes.campaign.id, 0))
    origins = {f["dl_origin_id"]: f["dl_reason"] for _, f in letters}
    assert set(origins) == {short, no_uuid, no_ref, rejected}
    assert "expected 15 reversal values, found 3" in origins[short]
    assert "malformed reversal entry" in origins[no_uuid] and "missing fields: ref" in origins[no_ref]
    assert "rejected by postgres" in origins[rejected]
    assert str(await ledger.fetchval("SELECT reversal_id FROM reversals")) == good.reversal_id
    assert await ledger.fetchval("SELECT count(*) FROM redemptions") == 2  # the good ones, around the bad ones
    assert await redis.xlen(outbox) == 0
    assert metric("rgw_ledger_dead_letters_total") == dead + 4


# --- a writer killed mid-batch -----------------------------------------------------------------------------------


async def _held_in_ledger(redis: Redis, db: asyncpg.Connection, stream: str, consumer: str) -> int:
    """How many of the entries `consumer` holds unacknowledged are committed to the ledger (either kind)."""
    held: Any = await redis.xpending_range(stream, keys.LEDGER_GROUP, "-", "+", 10_000, consumername=consumer)
    rids, xids = [], []
    for entry in held:
        found: Any = await redis.xrange(stream, entry["message_id"], entry["message_id"])
        for _, fields in found:
            if is_reversal_entry(fields):
                xids.append(decode_reversal_event(fields)["xid"])
            else:
                rids.append(decode_event(fields)["rid"])
    redeemed = await db.fetchval("SELECT count(*) FROM redemptions WHERE redemption_id = ANY($1::uuid[])", rids)
    reversed_ = await db.fetchval("SELECT count(*) FROM reversals WHERE reversal_id = ANY($1::uuid[])", xids)
    return int(redeemed) + int(reversed_)


async def _kill_holding(
    proc: subprocess.Popen[bytes], redis: Redis, db: asyncpg.Connection, stream: str, consumer: str, *, committed: bool
) -> tuple[int, int]:
    """SIGKILL the writer at a moment it holds entries all committed already (or none yet); returns (held, of them
    committed)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        held = await pending_of(redis, stream, consumer)
        if held and await _held_in_ledger(redis, db, stream, consumer) == (held if committed else 0):
            break
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.002)
    sigkill(proc)
    return await pending_of(redis, stream, consumer), await _held_in_ledger(redis, db, stream, consumer)


@pytest.mark.slow
async def test_writer_killed_mid_batch_leaves_every_redemption_and_reversal_exactly_once(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, redis_url: str, migrated: str, tmp_path: Path
) -> None:
    count = 6000
    codes = await campaign_with_codes(ledger, redis, keyring, count=count, face_value=100)
    stream = keys.outbox_key(codes.campaign.id, 0)
    uses = [codes.use(i) for i in range(count)]
    reversals = [codes.reversal(u) for u in uses[::2]]
    for start in range(0, count, 500):  # each reversal right behind its redemption: many batches hold both kinds
        await redeem(redis, *uses[start : start + 500])
        await reverse(redis, *reversals[start // 2 : (start + 500) // 2])
    knobs = {**PROCESS_KNOBS, "RGW_WRITER_BATCH_SIZE": "20"}
    procs = Processes(tmp_path, gateway_environ(redis_url, migrated, **knobs))
    try:
        kills = []
        for n, committed in ((1, True), (2, False)):  # die after COMMIT before XACK; then before COMMIT
            proc = procs.start(f"writer-{n}", "writer", RGW_WRITER_CONSUMER=f"writer-{n}")
            kills.append(await _kill_holding(proc, redis, ledger, stream, f"writer-{n}", committed=committed))
        survivor = procs.start("writer-3", "writer", RGW_WRITER_CONSUMER="writer-3")
        deadline = time.monotonic() + 60
        while await redis.xlen(stream) or await pending_of(redis, stream):
            assert time.monotonic() < deadline, f"outbox not drained: {await redis.xlen(stream)} left"
            await asyncio.sleep(0.1)
        assert survivor.poll() is None
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
    (held_1, committed_1), (held_2, committed_2) = kills
    assert held_1 == committed_1 > 0, f"writer-1 was not caught between COMMIT and XACK: {kills}"
    assert held_2 > committed_2 == 0, f"writer-2 was not caught holding uncommitted entries: {kills}"
    rids = {str(r["redemption_id"]) for r in await ledger.fetch("SELECT redemption_id FROM redemptions")}
    xids = [str(r["reversal_id"]) for r in await ledger.fetch("SELECT reversal_id FROM reversals")]
    assert await ledger.fetchval("SELECT count(*) FROM redemptions") == count
    assert rids == {u.redemption_id for u in uses}
    assert sorted(xids) == sorted(x.reversal_id for x in reversals)
    assert await ledger.fetchval("SELECT count(*) FROM reversal_alarms") == 0
    assert await ledger.fetchval("SELECT count(*) FROM double_spend_alarms") == 0
    assert await redis.xlen(keys.deadletter_key(codes.campaign.id, 0)) == 0
