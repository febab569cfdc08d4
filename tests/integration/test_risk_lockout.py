"""Brute-force lockout end to end (OWASP OAT-002): failed attempts - unknown codes by Redeem or Validate, guessed
check characters - lock a terminal past its threshold, even for valid codes, while another terminal of the same
store keeps redeeming; the store locks when its terminals together fail too often; an admin lifts a lockout through
AdminService; in shadow mode the lockout only records."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway.coderefs import KeyRing
from gateway.pb.redemption.v1 import admin_pb2, admin_pb2_grpc
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.integration.conftest import Issue, Issued, RunningGateway
from tests.integration.risk_e2e_helpers import (
    Event,
    Ledger,
    apply_policy,
    decisions,
    guessed,
    make_ledger,
    only,
    redeem,
    redeemed,
    request,
    unknown_code,
    uses_left,
    validation,
)

COOLDOWN_MS = 900_000
# A terminal locks at its 3rd failure within 10 minutes, a store at its 6th: below the store's threshold one bad
# till does not stop its neighbours.
LOCKOUTS = {
    "terminal": {"threshold": 3, "window_s": 600, "cooldown_s": COOLDOWN_MS // 1000},
    "store": {"threshold": 6, "window_s": 600, "cooldown_s": COOLDOWN_MS // 1000},
}
TILL_1 = "terminal:store-1/till-1"


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(redis: Redis, db: asyncpg.Connection, migrated: str, keyring: KeyRing) -> Ledger:
    return await make_ledger(redis, db, migrated, keyring)


async def _fail(gateway: RunningGateway, issued: Issued, times: int, *, terminal: str = "till-1") -> None:
    """`times` unknown codes of the campaign redeemed from `terminal` of store-1, each NOT_FOUND."""
    for _ in range(times):
        response = await redeem(gateway, unknown_code(issued.campaign.id), terminal=terminal)
        assert response.outcome == pb.OUTCOME_NOT_FOUND


async def _locked_out(gateway: RunningGateway, code: str, *, terminal: str = "till-1") -> pb.RedeemResponse:
    """Redeem a valid code and assert it was declined LOCKED_OUT, within the cool-down, and left unused."""
    before = await uses_left(gateway, code)
    response = await redeem(gateway, code, terminal=terminal)
    assert (response.outcome, response.reason) == (pb.OUTCOME_RISK_DENIED, "LOCKED_OUT")
    # the lock's time left, read from Redis (a lock lives in real time): a little under the cool-down
    assert COOLDOWN_MS - 10_000 < response.retry_after.ToMilliseconds() <= COOLDOWN_MS
    assert await uses_left(gateway, code) == before
    return response


def _lockout_event(gateway: RunningGateway, campaign: int, mode: str = "enforce", scope: str = TILL_1) -> Event:
    client = gateway.tenants.clients["internal"]
    return Event(campaign, "store-1", "till-1", client, "lockout", "LOCKED_OUT", mode, scope=scope)


async def _listed(gateway: RunningGateway) -> list[tuple[str, str]]:
    """The brand's lockouts as AdminService lists them to brand 1's admin."""
    async with gateway.channel_as("admin") as channel:
        found = await admin_pb2_grpc.AdminServiceStub(channel).ListLockouts(admin_pb2.ListLockoutsRequest())
    return [(lock.scope, lock.subject) for lock in found.lockouts]


async def test_unknown_codes_lock_the_terminal_and_not_its_neighbour(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(3)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS))
    await _fail(gateway, issued, 2)
    await redeemed(gateway, issued.codes[0])  # two failures: below the threshold
    engaged = decisions("lockout", "LOCKED_OUT", "enforce")
    await _fail(gateway, issued, 1)  # the third locks till-1

    await _locked_out(gateway, issued.codes[1])
    await redeemed(gateway, issued.codes[2], terminal="till-2")  # the store has 3 failures of its 6

    assert await _listed(gateway) == [("terminal", "store-1/till-1")]
    assert decisions("lockout", "LOCKED_OUT", "enforce") == engaged + 1  # the denial (the engaging failure: no call)
    # the failure that engaged the lock, then the valid code it declined
    assert await ledger.events(*issued.codes) == [_lockout_event(gateway, issued.campaign.id)] * 2


async def test_a_guessed_check_character_counts_as_a_failure(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(2)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS))
    await _fail(gateway, issued, 2)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Redeem(request(guessed(issued.codes[1])))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await _locked_out(gateway, issued.codes[0])
    # the guess never reached a campaign: the lock it engaged is recorded with campaign 0
    assert await ledger.events(*issued.codes) == [
        _lockout_event(gateway, 0),
        _lockout_event(gateway, issued.campaign.id),
    ]


async def test_unknown_codes_asked_by_validate_count_too(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS))
    for _ in range(3):
        answer = await gateway.stub.Validate(validation(unknown_code(issued.campaign.id)))
        assert answer.outcome == pb.OUTCOME_NOT_FOUND

    checked = await gateway.stub.Validate(validation(issued.codes[0]))

    assert (checked.outcome, checked.reason) == (pb.OUTCOME_RISK_DENIED, "LOCKED_OUT")
    await _locked_out(gateway, issued.codes[0])


async def test_the_store_locks_when_its_terminals_together_fail_too_often(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(1)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS))
    for till in ("till-a", "till-b", "till-c"):
        await _fail(gateway, issued, 2, terminal=till)  # each below its own threshold; six for the store

    await _locked_out(gateway, issued.codes[0], terminal="till-fresh")

    assert await _listed(gateway) == [("store", "store-1")]
    denial = (await ledger.events(*issued.codes))[-1]
    assert (denial.terminal, denial.rule, denial.scope, denial.mode) == (
        "till-fresh", "lockout", "store:store-1", "enforce",
    )  # fmt: skip


async def test_an_admin_lifts_a_lockout_and_the_terminal_redeems_again(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(3)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS))
    await _fail(gateway, issued, 3)
    await _locked_out(gateway, issued.codes[0])
    lift = admin_pb2.LiftLockoutRequest(scope="terminal", subject="store-1/till-1")

    async with gateway.channel_as("admin") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        first, second = await admin.LiftLockout(lift), await admin.LiftLockout(lift)

    assert first.lifted and not second.lifted
    await redeemed(gateway, issued.codes[0])
    # the failure count was forgotten with the lock: one more failure does not lock again
    await _fail(gateway, issued, 1)
    await redeemed(gateway, issued.codes[1])
    assert await _listed(gateway) == []


async def test_a_lockout_in_shadow_mode_records_but_never_locks(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(1)
    await apply_policy(gateway, db, redis, only(lockout=LOCKOUTS, modes={"lockout": "shadow"}))
    shadowed = decisions("lockout", "LOCKED_OUT", "shadow")

    await _fail(gateway, issued, 3)
    await redeemed(gateway, issued.codes[0])

    assert await _listed(gateway) == []
    assert decisions("lockout", "LOCKED_OUT", "shadow") == shadowed + 1  # the third failure would have locked
    assert await ledger.events(*issued.codes) == [_lockout_event(gateway, issued.campaign.id, "shadow")]
