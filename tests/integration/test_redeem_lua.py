"""Contract of lua/redeem.lua against a real Redis: call it, inspect the raw state, call it again."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.coderefs import KeyRing
from gateway.dev.servers import free_port
from gateway.domain import (
    Caller,
    IdempotencyConflict,
    ItemFailure,
    Outcome,
    RedeemInput,
    RedeemResult,
    StoreUnavailable,
)
from gateway.redis_client import connect
from gateway.redis_store import (
    ITEM_ARGS,
    SCRIPT_ARGS,
    RedisCodeStore,
    idempotency_field,
    legacy_idempotency_field,
    load_lua,
)
from gateway.validation import check_redeem
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue
from tests.integration.grpc_helpers import outbox_events, redis_snapshot

CALLER = Caller(client_id="cl_a", brand_id=1, role="pos")  # the `issue` fixture's campaigns are brand 1's
OTHER_BRAND = Caller(client_id="cl_b", brand_id=2, role="pos")


def command(code: str, keyring: KeyRing, key: str = "idem-1", store: str = "s1", terminal: str = "t1",  # type: ignore[no-untyped-def]
            caller: Caller = CALLER):  # fmt: skip
    request = RedeemInput(code, key, store, terminal, "dev-1", None)
    return check_redeem(request, keyring, caller)


async def test_redeem_writes_use_record_idempotency_record_and_one_outbox_event(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1)
    cmd = command(issued.codes[0], keyring)
    store = RedisCodeStore(redis)
    cid, ref = issued.campaign.id, cmd.lookup.refs[0].ref

    result = await store.redeem_one(cmd, "rid-1", mode="redeem", now_ms=T0_MS)

    assert (result.outcome, result.use_number, result.uses_left, result.replayed) == (Outcome.REDEEMED, 1, 0, False)
    state = await redis.hgetall(keys.code_key(cid, 0, ref))
    assert state["used"] == "1" and state["seq"] == "1" and state["last"] == str(T0_MS)
    scope = idempotency_field("cl_a", "t1", "idem-1")
    assert state["u:1"] == f"rid-1|{T0_MS}|{cmd.fingerprint}|cl_a/t1|s1|t1|dev-1||||{scope}|cl_a|1|0"
    assert state[scope].startswith(cmd.fingerprint + "|rid-1|")
    events = await outbox_events(redis, cid)
    assert len(events) == 1
    event = events[0]
    assert event["rid"] == "rid-1" and event["ref"] == ref and event["use"] == "1" and event["kid"] == "k2"
    assert event["store"] == "s1" and event["term"] == "t1" and event["dev"] == "dev-1"
    assert (event["client"], event["brand"], event["caller"]) == ("cl_a", "1", "cl_a/t1")
    assert issued.codes[0] not in str(state) + str(events)  # never plaintext


async def test_second_call_replays_or_declines_and_changes_nothing(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1)
    store = RedisCodeStore(redis)
    cid = issued.campaign.id
    first = await store.redeem_one(command(issued.codes[0], keyring), "rid-1", mode="redeem", now_ms=T0_MS)
    code_key = keys.code_key(cid, 0, command(issued.codes[0], keyring).lookup.refs[0].ref)
    before = await redis.hgetall(code_key)

    replay = await store.redeem_one(command(issued.codes[0], keyring), "rid-2", mode="redeem", now_ms=T0_MS + 5)
    other_key = await store.redeem_one(
        command(issued.codes[0], keyring, key="idem-2"), "rid-3", mode="redeem", now_ms=T0_MS + 9
    )

    assert replay.replayed and replay.redemption_id == first.redemption_id == "rid-1"
    assert replay.redeemed_at_ms == T0_MS and replay.use_number == 1
    assert other_key.outcome is Outcome.ALREADY_REDEEMED
    assert await redis.hgetall(code_key) == before
    assert await redis.xlen(keys.outbox_key(cid, 0)) == 1


async def test_same_key_with_different_request_is_a_conflict(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(1)
    store = RedisCodeStore(redis)
    await store.redeem_one(command(issued.codes[0], keyring), "rid-1", mode="redeem", now_ms=T0_MS)
    # Same caller (store s1, terminal t1) and key, different customer device: a different request.
    changed = check_redeem(RedeemInput(issued.codes[0], "idem-1", "s1", "t1", "other-device", None), keyring, CALLER)
    with pytest.raises(IdempotencyConflict):
        await store.redeem_one(changed, "rid-2", mode="redeem", now_ms=T0_MS)


async def test_multi_use_code_counts_down_with_growing_use_numbers(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1, uses_per_code=3)
    store = RedisCodeStore(redis)
    results = [
        await store.redeem_one(command(issued.codes[0], keyring, key=f"k{n}"), f"rid-{n}", mode="redeem", now_ms=T0_MS)
        for n in range(4)
    ]
    assert [r.outcome for r in results] == [Outcome.REDEEMED] * 3 + [Outcome.ALREADY_REDEEMED]
    assert [r.use_number for r in results[:3]] == [1, 2, 3]
    assert [r.uses_left for r in results[:3]] == [2, 1, 0]
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 3


async def test_validity_window_uses_the_injected_time(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(1, valid_from_ms=T0_MS, valid_until_ms=T0_MS + DAY_MS)
    store = RedisCodeStore(redis)
    cmd = command(issued.codes[0], keyring)
    early = await store.redeem_one(cmd, "r", mode="redeem", now_ms=T0_MS - 1)
    late = await store.redeem_one(cmd, "r", mode="redeem", now_ms=T0_MS + DAY_MS)
    assert (early.outcome, late.outcome) == (Outcome.NOT_YET_VALID, Outcome.EXPIRED)
    assert (await store.redeem_one(cmd, "r", mode="redeem", now_ms=T0_MS + DAY_MS - 1)).outcome is Outcome.REDEEMED


async def test_validate_mode_changes_nothing(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(1)
    store = RedisCodeStore(redis)
    cmd = command(issued.codes[0], keyring)
    snapshot = await redis_snapshot(redis)
    result = await store.redeem_one(cmd, "", mode="validate", now_ms=T0_MS)
    assert result.outcome is Outcome.REDEEMABLE and result.uses_left == 1
    assert await redis_snapshot(redis) == snapshot


async def test_unknown_code_and_unknown_campaign_are_not_found(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    from gateway import codes

    issued = await issue(1)
    store = RedisCodeStore(redis)
    stranger = codes.generate(codes.Route(issued.campaign.id, 0))
    no_campaign = codes.generate(codes.Route(issued.campaign.id + 1000, 0))
    for code in (stranger, no_campaign):
        result = await store.redeem_one(command(code, keyring), "r", mode="redeem", now_ms=T0_MS)
        assert (result.outcome, result.campaign_id) == (Outcome.NOT_FOUND, 0)
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0


async def test_code_issued_under_an_older_key_is_found(issue: Issue, redis: Redis) -> None:
    old_ring = KeyRing({"k2": bytes(range(32)), "k1": bytes(range(100, 132))}, "k1")
    rotated = KeyRing({"k2": bytes(range(32)), "k1": bytes(range(100, 132))}, "k2")
    # The fixture's keyring hashes with k2; a gateway whose active key is now k1 must still find the code.
    issued = await issue(1)
    result = await RedisCodeStore(redis).redeem_one(
        command(issued.codes[0], old_ring), "r", mode="redeem", now_ms=T0_MS
    )
    assert result.outcome is Outcome.REDEEMED
    assert rotated.active_id == "k2"


async def test_script_survives_script_flush(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(2)
    store = RedisCodeStore(redis)
    await store.redeem_one(command(issued.codes[0], keyring), "r1", mode="redeem", now_ms=T0_MS)
    await redis.script_flush()
    result = await store.redeem_one(command(issued.codes[1], keyring), "r2", mode="redeem", now_ms=T0_MS)
    assert result.outcome is Outcome.REDEEMED


async def test_batch_of_items_in_one_call_is_decided_in_order(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(2)
    store = RedisCodeStore(redis)
    a, b = (command(c, keyring, key=f"k-{i}") for i, c in enumerate(issued.codes))
    a_again = command(issued.codes[0], keyring, key="k-other")
    changed = check_redeem(RedeemInput(issued.codes[1], "k-1", "s1", "t1", "other-device", None), keyring, CALLER)
    decided = await store.decide([a, b, a_again, changed], ["r-a", "r-b", "r-a2", "r-x"], mode="redeem", now_ms=T0_MS)
    results = [d for d in decided if isinstance(d, RedeemResult)]
    assert [r.outcome for r in results] == [Outcome.REDEEMED, Outcome.REDEEMED, Outcome.ALREADY_REDEEMED]
    conflict = decided[3]  # the same key for b with another request: that item alone fails
    assert isinstance(conflict, ItemFailure) and isinstance(conflict.error, IdempotencyConflict)


@pytest.mark.parametrize("state", ["valid", "used", "expired"])
async def test_another_brands_code_is_answered_as_a_never_issued_one(
    issue: Issue, redis: Redis, keyring: KeyRing, state: str
) -> None:
    """Brand 2 presenting brand 1's code - valid, used or expired - gets exactly the never-issued answer, reads
    nothing back and changes nothing."""
    issued = await issue(2)
    store = RedisCodeStore(redis)
    code, never_issued = issued.codes[0], issued.codes[1]
    never_ref = command(never_issued, keyring).lookup.refs[0].ref
    await redis.hdel(keys.bucket_key(issued.campaign.id, 0, never_ref), keys.bucket_field(never_ref))
    if state == "used":
        await store.redeem_one(command(code, keyring, key="first"), "rid-0", mode="redeem", now_ms=T0_MS)
    now = T0_MS + 2 * DAY_MS if state == "expired" else T0_MS
    before = await redis_snapshot(redis)
    for mode in ("redeem", "validate"):
        theirs = await store.redeem_one(command(code, keyring, caller=OTHER_BRAND), "r", mode=mode, now_ms=now)
        unknown = await store.redeem_one(command(never_issued, keyring), "r", mode=mode, now_ms=now)
        assert theirs == unknown and theirs.outcome is Outcome.NOT_FOUND and theirs.campaign_id == 0
    assert await redis_snapshot(redis) == before
    assert await store.code_state(command(code, keyring).lookup, brand_id=2) is None
    assert await store.code_state(command(code, keyring).lookup, brand_id=1) is not None


async def test_a_retry_across_the_upgrade_replays_the_record_written_before_authentication(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    """Before authentication the scope was (store/terminal, key, code). A POS that redeemed then and retries
    (same store, terminal, key and request) after the upgrade learns its redemption happened."""
    issued = await issue(1)
    cmd = command(issued.codes[0], keyring)
    code_key = keys.code_key(issued.campaign.id, 0, cmd.lookup.refs[0].ref)
    legacy = legacy_idempotency_field("s1", "t1", "idem-1")
    await redis.hset(
        code_key, mapping={"used": 1, "seq": 1, "u:1": "rid-old", legacy: f"{cmd.fingerprint}|rid-old|{T0_MS}|1|0"}
    )
    store = RedisCodeStore(redis)

    retry = await store.redeem_one(cmd, "rid-new", mode="redeem", now_ms=T0_MS + 1000)
    other_terminal = await store.redeem_one(
        command(issued.codes[0], keyring, terminal="t2"), "r", mode="redeem", now_ms=T0_MS
    )

    assert (retry.outcome, retry.replayed, retry.redemption_id, retry.use_number) == (
        Outcome.REDEEMED,
        True,
        "rid-old",
        1,
    )
    assert other_terminal.outcome is Outcome.ALREADY_REDEEMED and not other_terminal.replayed
    assert idempotency_field("cl_a", "t1", "idem-1") not in await redis.hgetall(code_key)  # replayed, not rewritten
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0


def test_the_argument_layout_is_the_scripts() -> None:
    """The script's header and its constants agree with the layout redis_store.py defines once."""
    source = load_lua("redeem.lua")
    assert f"local NF = {len(ITEM_ARGS)}" in source and f"local GLOBAL = {len(SCRIPT_ARGS)}" in source
    assert f"NF = {len(ITEM_ARGS)} fields (gateway/script_calls.py ITEM_ARGS)" in source


async def test_redis_failures_leave_the_store_as_the_domains_unavailable(issue: Issue, keyring: KeyRing) -> None:
    """Callers of the store never see a Redis exception: the service and the error mapping know only the domain."""
    issued = await issue(1)
    down = connect(f"redis://127.0.0.1:{free_port()}/0", pool_size=1, timeout_s=1)
    store = RedisCodeStore(down)
    cmd = command(issued.codes[0], keyring)
    try:
        with pytest.raises(StoreUnavailable):
            await store.redeem_one(cmd, "r", mode="redeem", now_ms=T0_MS)
        with pytest.raises(StoreUnavailable):
            await store.decide([cmd], ["r"], mode="redeem", now_ms=T0_MS)
        with pytest.raises(StoreUnavailable):
            await store.code_state(cmd.lookup, brand_id=1)
    finally:
        await down.aclose()
