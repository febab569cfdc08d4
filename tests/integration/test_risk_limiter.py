"""The risk part of lua/redeem.lua and lua/failures.lua against a real Redis, driven through RedisCodeStore with
the assessments of a real RiskEngine: sliding-window limits under concurrent bursts (exactly the limit passes, for
every scope), all scopes checked before any is counted, the window's exactness at its edges (and a property test
of it), brute-force lockout, and shadow mode. The clock is passed explicitly: the scripts never read Redis' own."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway.coderefs import KeyRing
from gateway.domain import Caller, FailedAttempt, Outcome, RedeemCommand, RedeemResult, Throttled
from gateway.redis_client import connect_hot, is_cluster
from gateway.redis_store import RedisCodeStore
from gateway.risk_counters import SeparateCounters
from gateway.tenancy.lockouts import lift_lockout
from gateway.validation import InvalidRequest
from risk import keys
from risk.model import Scope
from tests.conftest import T0_MS
from tests.integration.conftest import Issue
from tests.integration.risk_helpers import (
    BRAND,
    CALLER,
    Answer,
    Limiter,
    engine_of,
    flush_risk_keys,
    guessed_code,
    outcomes,
    policy,
    risk_events,
    throttled,
    times_used,
    unknown_code,
    window_key,
    window_size,
)

pytestmark = pytest.mark.single_and_cluster

LIMIT = 4
WINDOW_S = 60
WINDOW_MS = WINDOW_S * 1000
QUOTA_SCOPES = (Scope.CLIENT, Scope.TERMINAL, Scope.STORE, Scope.BRAND)
VELOCITY = {Scope.DEVICE: ("device_velocity", "DEVICE_VELOCITY"), Scope.CODE: ("code_velocity", "CODE_VELOCITY")}
NO_CAMPAIGN = 4242  # no meta in Redis: every code of it is NOT_FOUND, which the windows count like any attempt
LOCK = keys.lock_key(BRAND, Scope.TERMINAL, "s1/t1")
ONE_SECOND_LOCK = policy(lockout={"terminal": (3, 60, 1)})  # 3 failures a minute: locked for a second


@pytest_asyncio.fixture(loop_scope="session", params=["redis-py", "pipelined", "two calls"])
async def code_store(request: pytest.FixtureRequest, redis: Redis, redis_url: str) -> AsyncIterator[RedisCodeStore]:
    """The store on either client the gateway uses (redis-py, or the pipelined hot-path client), and with the
    counters as their own call (RGW_RISK_REDIS_URL, as on Redis Cluster) on the pipelined client. On a cluster
    the counters are always their own call (a brand's tag and a campaign shard's are different slots)."""
    cluster = is_cluster(redis_url)
    if request.param == "redis-py":
        yield RedisCodeStore(redis, counters=SeparateCounters(redis) if cluster else None)
        return
    if cluster and request.param == "pipelined":
        pytest.skip("on a cluster the pipelined store always makes two calls: the 'two calls' case")
    pipelined = await connect_hot(redis_url, connections=2, timeout_s=5)
    assert pipelined is not None
    counters = SeparateCounters(redis, pipelined) if request.param == "two calls" else None
    yield RedisCodeStore(redis, pipelined, counters=counters)
    await pipelined.close()


@pytest.fixture(params=["one call", "two calls"])
def any_store(request: pytest.FixtureRequest, redis: Redis, redis_url: str) -> RedisCodeStore:
    """The store with the risk counters inside the redeem script, or as their own call before it (on a cluster
    only the latter: the script cannot reach a brand's counters in another slot)."""
    if request.param == "one call" and is_cluster(redis_url):
        pytest.skip("on a cluster the risk counters are their own call: the 'two calls' case")
    return RedisCodeStore(redis, counters=SeparateCounters(redis) if request.param == "two calls" else None)


def admitted(answer: Answer) -> bool:
    """Not refused by a risk rule (the code's own answer may still be NOT_FOUND)."""
    return isinstance(answer, RedeemResult) and answer.outcome is not Outcome.RISK_DENIED


def shares_only(scope: Scope, n: int) -> dict[str, Any]:
    """Attempt n of a burst: its store, terminal, client and device differ from every other attempt's except the
    one subject the scope under test counts, so only that window can fill."""
    varied: dict[str, Any] = {
        "store": f"s{n}", "terminal": f"t{n}", "device": f"dev-{n}", "caller": Caller(f"cl_{n}", BRAND, "pos"),
    }  # fmt: skip
    shared: dict[Scope, dict[str, Any]] = {
        Scope.CLIENT: {"caller": CALLER},
        Scope.TERMINAL: {"store": "s1", "terminal": "t1"},
        Scope.STORE: {"store": "s1"},
        Scope.BRAND: {},
        Scope.DEVICE: {"device": "dev-1"},
        Scope.CODE: {},  # the code itself is shared
    }
    return {**varied, **shared[scope]}


def subject_of(scope: Scope, command: RedeemCommand) -> str:
    """The subject the scope counts for this command (risk/engine.py)."""
    subjects = {
        Scope.CLIENT: command.client_id,
        Scope.TERMINAL: keys.terminal_subject(command.store_id, command.terminal_id),
        Scope.STORE: command.store_id,
        Scope.BRAND: "-",
        Scope.DEVICE: command.customer_device_id,
        Scope.CODE: command.lookup.refs[0].ref,
    }
    return subjects[scope]


async def total_uses(redis: Redis, commands: Sequence[RedeemCommand]) -> int:
    """Uses taken of the commands' distinct codes."""
    distinct = {c.lookup.refs[0].ref: c for c in commands}
    return sum([await times_used(redis, c) for c in distinct.values()])


# -- 1. Concurrent bursts: exactly the limit passes, for every scope --------------------------------------------


@pytest.mark.parametrize("scope", list(Scope))
async def test_a_concurrent_burst_admits_exactly_the_limit(
    scope: Scope, code_store: RedisCodeStore, issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(3 * LIMIT, uses_per_code=3 * LIMIT)
    limiter = Limiter(code_store, engine_of(policy({scope.value: (LIMIT, WINDOW_S)})), keyring)
    codes = [issued.codes[0]] * (3 * LIMIT) if scope is Scope.CODE else issued.codes
    commands = [limiter.command(code, **shares_only(scope, n)) for n, code in enumerate(codes)]

    answers = await limiter.burst(commands, T0_MS)

    subject = subject_of(scope, commands[0])
    label = f"{scope.value}:{subject[:12] if scope is Scope.CODE else subject}"
    assert len(outcomes(answers, Outcome.REDEEMED)) == LIMIT
    if scope in QUOTA_SCOPES:
        refused = throttled(answers)
        assert [(t.scope, t.retry_after_ms) for t in refused] == [(label, WINDOW_MS)] * (2 * LIMIT)
    else:
        denied = outcomes(answers, Outcome.RISK_DENIED)
        rule, reason = VELOCITY[scope]
        expected = (rule, reason, WINDOW_MS)  # all counted at the same instant: free again a window later
        assert [(d.risk_rule, d.risk_reason, d.retry_after_ms) for d in denied] == [expected] * (2 * LIMIT)
    assert await window_size(redis, scope, subject) == LIMIT
    assert await total_uses(redis, commands) == LIMIT  # a refused attempt took nothing


@pytest.mark.parametrize("scope", list(Scope))
async def test_one_batch_of_one_script_call_admits_exactly_the_limit(
    scope: Scope, code_store: RedisCodeStore, issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    """A RedeemStream message is decided in one script call, whose items share windows: the script follows a
    shared window's count in Lua across its items (read once), and still admits exactly the limit."""
    issued = await issue(3 * LIMIT, uses_per_code=3 * LIMIT)
    limiter = Limiter(code_store, engine_of(policy({scope.value: (LIMIT, WINDOW_S)})), keyring)
    codes = [issued.codes[0]] * (3 * LIMIT) if scope is Scope.CODE else issued.codes
    commands = [limiter.command(code, **shares_only(scope, n)) for n, code in enumerate(codes)]
    risks = [limiter.assess(command, T0_MS, counts=True) for command in commands]

    answers = await code_store.decide(commands, [f"batch-{n}" for n in range(len(commands))], mode="redeem",
                                      now_ms=T0_MS, risks=risks)  # fmt: skip

    redeemed = [a for a in answers if isinstance(a, RedeemResult) and a.outcome is Outcome.REDEEMED]
    assert len(redeemed) == LIMIT
    assert answers[:LIMIT] == redeemed  # in order: the first LIMIT items of the message
    assert await window_size(redis, scope, subject_of(scope, commands[0])) == LIMIT
    assert await total_uses(redis, commands) == LIMIT


async def test_validate_counts_nothing_so_a_later_redeem_burst_still_gets_exactly_the_limit(
    code_store: RedisCodeStore, issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1, uses_per_code=3 * LIMIT)
    every_scope = policy({scope.value: (LIMIT, WINDOW_S) for scope in Scope})
    limiter = Limiter(code_store, engine_of(every_scope), keyring)
    commands = [limiter.command(issued.codes[0]) for _ in range(3 * LIMIT)]  # one caller, device and code

    validated = await limiter.burst(commands, T0_MS, mode="validate")

    assert len(outcomes(validated, Outcome.REDEEMABLE)) == 3 * LIMIT
    windows = [window_key(scope, subject_of(scope, commands[0])) for scope in Scope]
    assert await redis.exists(*windows) == 0
    redeemed = await limiter.burst(commands, T0_MS + 1)
    assert len(outcomes(redeemed, Outcome.REDEEMED)) == LIMIT
    assert len(throttled(redeemed)) + len(outcomes(redeemed, Outcome.RISK_DENIED)) == 2 * LIMIT
    assert [await redis.zcard(key) for key in windows] == [LIMIT] * len(windows)


# -- 2. All scopes checked before any is counted ----------------------------------------------------------------

# (limits, attempts as (terminal, device), the refusal of the last attempt, window sizes afterwards)
CHECKED_BEFORE_COUNTED = [
    pytest.param(
        {"terminal": (2, 60), "store": (100, 60)}, [("t1", "d1"), ("t1", "d2"), ("t1", "d3")], "terminal:s1/t1",
        {(Scope.TERMINAL, "s1/t1"): 2, (Scope.STORE, "s1"): 2}, id="terminal-full-store-not-counted",
    ),
    pytest.param(  # the terminal is checked first and passes: it must not count what the store refuses
        {"terminal": (100, 60), "store": (2, 60)}, [("t1", "d1"), ("t1", "d2"), ("t2", "d3")], "store:s1",
        {(Scope.TERMINAL, "s1/t1"): 2, (Scope.TERMINAL, "s1/t2"): 0, (Scope.STORE, "s1"): 2}, id="store-full",
    ),
    pytest.param(  # a velocity decline comes last in the order: no quota before it counts it
        {"terminal": (100, 60), "store": (100, 60), "device": (1, 60)}, [("t1", "d1"), ("t2", "d1")],
        "DEVICE_VELOCITY", {(Scope.TERMINAL, "s1/t2"): 0, (Scope.STORE, "s1"): 1, (Scope.DEVICE, "d1"): 1},
        id="device-declined",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("limits", "attempts", "refusal", "sizes"), CHECKED_BEFORE_COUNTED)
async def test_every_scope_is_checked_before_any_is_counted(
    limits: dict[str, tuple[int, int]],
    attempts: list[tuple[str, str]],
    refusal: str,
    sizes: dict[tuple[Scope, str], int],
    redis: Redis,
    keyring: KeyRing,
    any_store: RedisCodeStore,
) -> None:
    limiter = Limiter(any_store, engine_of(policy(limits)), keyring)
    code = unknown_code(NO_CAMPAIGN)
    answers = [
        await limiter.attempt(limiter.command(code, terminal=terminal, device=device), T0_MS + n)
        for n, (terminal, device) in enumerate(attempts)
    ]
    assert all(admitted(a) for a in answers[:-1])
    last = answers[-1]
    assert (last.scope if isinstance(last, Throttled) else last.risk_reason) == refusal
    assert {where: await window_size(redis, *where) for where in sizes} == sizes


# -- 3. A sliding window, exact at its edges --------------------------------------------------------------------


async def test_the_window_slides_across_a_fixed_boundary_and_retry_after_is_exact(
    redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    limiter = Limiter(any_store, engine_of(policy({"terminal": (3, 10)})), keyring)
    code = unknown_code(NO_CAMPAIGN)

    async def at(now_ms: int) -> Answer:
        return await limiter.attempt(limiter.command(code), now_ms)

    boundary = T0_MS + 10_000
    assert boundary % 10_000 == 0  # where a fixed 10 s window would start afresh and admit 3 more
    late = [boundary - 1000, boundary - 500, boundary - 1]
    assert all([admitted(await at(t)) for t in late])
    for now in (boundary, boundary + 1, boundary + 5000):
        refused = await at(now)
        assert isinstance(refused, Throttled) and refused.retry_after_ms == late[0] + 10_000 - now
    free_at = late[0] + 10_000  # the oldest counted attempt leaves the window
    just_before = await at(free_at - 1)
    assert isinstance(just_before, Throttled) and just_before.retry_after_ms == 1
    assert admitted(await at(free_at))
    next_refusal = await at(free_at + 1)
    assert isinstance(next_refusal, Throttled) and next_refusal.retry_after_ms == late[1] + 10_000 - free_at - 1


# -- 4. Property: never more than the limit in any window, and never refused below it ---------------------------

SUBJECTS = ("t1", "t2", "t3")
Schedule = tuple[int, int, list[tuple[int, str]]]  # limit, window_ms, (now_ms, terminal) in time order


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    """A limit, a window and attempts on a few terminals; gaps near the window's edges are drawn often."""
    limit, window_ms = draw(st.integers(1, 5)), draw(st.integers(1, 10)) * 1000
    # mostly about `limit` attempts per window and subject (where exactness shows), sometimes a window's edge
    gap = st.one_of(
        st.integers(0, 2 * window_ms // limit),
        st.integers(0, 2 * window_ms // limit),
        st.sampled_from([0, 1, window_ms - 1, window_ms, window_ms + 1]),
    )
    steps = draw(st.lists(st.tuples(gap, st.sampled_from(SUBJECTS)), min_size=1, max_size=50))
    now, attempts = T0_MS, []
    for step, terminal in steps:
        now += step
        attempts.append((now, terminal))
    return limit, window_ms, attempts


def assert_exact(limit: int, window_ms: int, attempts: list[tuple[int, str]], answers: list[Answer]) -> None:
    """Replay the answers against the definition: an attempt at t is admitted iff fewer than `limit` admitted
    attempts of its subject lie in (t - window_ms, t]; a refusal's retry_after_ms is when the oldest leaves."""
    admitted_at: dict[str, list[int]] = defaultdict(list)
    for (now, terminal), answer in zip(attempts, answers, strict=True):
        recent = [t for t in admitted_at[terminal] if t > now - window_ms]
        if isinstance(answer, Throttled):
            assert len(recent) == limit, f"refused at {now - T0_MS} with only {len(recent)} in the window"
            assert answer.retry_after_ms == recent[0] + window_ms - now
        else:
            assert answer.outcome is Outcome.NOT_FOUND and len(recent) < limit
            admitted_at[terminal].append(now)
    for times in admitted_at.values():
        # limit + 1 admitted within a half-open window [x, x + window_ms) would need these closer than window_ms
        assert all(times[i + limit] - times[i] >= window_ms for i in range(len(times) - limit))


@settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(schedule=schedules())
async def test_the_limiter_is_exact_for_any_schedule(
    schedule: Schedule, redis: Redis, redis_url: str, keyring: KeyRing
) -> None:
    limit, window_ms, attempts = schedule
    await flush_risk_keys(redis)
    engine = engine_of(policy({"terminal": (limit, window_ms // 1000)}))
    counters = SeparateCounters(redis) if is_cluster(redis_url) else None  # a cluster: always their own call
    limiter = Limiter(RedisCodeStore(redis, counters=counters), engine, keyring)
    code = unknown_code(NO_CAMPAIGN)
    answers = [await limiter.attempt(limiter.command(code, terminal=terminal), now) for now, terminal in attempts]
    assert_exact(limit, window_ms, attempts, answers)


# -- 5. Brute-force lockout -------------------------------------------------------------------------------------


def lockout_events(events: list[dict[str, str]]) -> list[tuple[str, str, str, str]]:
    return [(e["rule"], e["reason"], e["mode"], e["scope"]) for e in events]


async def test_failed_attempts_lock_the_terminal_even_for_a_valid_code_until_the_cooldown_ends(
    issue: Issue, redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    issued = await issue(3)
    limiter = Limiter(any_store, engine_of(ONE_SECOND_LOCK), keyring)
    unknown = unknown_code(issued.campaign.id)
    fails = [await limiter.attempt(limiter.command(unknown), T0_MS + n) for n in range(2)]
    assert all(isinstance(f, RedeemResult) and f.outcome is Outcome.NOT_FOUND for f in fails)
    below = await limiter.attempt(limiter.command(issued.codes[2]), T0_MS + 2)
    assert isinstance(below, RedeemResult) and below.outcome is Outcome.REDEEMED and not await redis.exists(LOCK)

    third = await limiter.attempt(limiter.command(unknown), T0_MS + 3)
    valid = limiter.command(issued.codes[0])
    denied = await limiter.attempt(valid, T0_MS + 4)
    elsewhere = await limiter.attempt(limiter.command(issued.codes[1], terminal="t2"), T0_MS + 5)

    assert isinstance(third, RedeemResult) and third.outcome is Outcome.NOT_FOUND
    assert isinstance(denied, RedeemResult) and denied.outcome is Outcome.RISK_DENIED
    assert (denied.risk_rule, denied.risk_reason) == ("lockout", "LOCKED_OUT")
    assert 0 < denied.retry_after_ms <= 1000  # what is left of the one-second cool-down
    assert await times_used(redis, valid) == 0
    assert isinstance(elsewhere, RedeemResult) and elsewhere.outcome is Outcome.REDEEMED
    locked = ("lockout", "LOCKED_OUT", "enforce", "terminal:s1/t1")
    assert lockout_events(await risk_events(redis)) == [locked, locked]  # the lock, then the denial
    await asyncio.sleep(await redis.pttl(LOCK) / 1000 + 0.05)  # the lock is a PX key: real time ends it
    again = await limiter.attempt(valid, T0_MS + 6)
    assert isinstance(again, RedeemResult) and again.outcome is Outcome.REDEEMED


async def test_validate_not_found_answers_count_as_failures_and_an_admin_lift_unlocks(
    issue: Issue, redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    issued = await issue(1)
    limiter = Limiter(any_store, engine_of(policy(lockout={"terminal": (3, 60, 900)})), keyring)
    for n in range(3):
        guess = await limiter.attempt(limiter.command(unknown_code(issued.campaign.id)), T0_MS + n, "validate")
        assert isinstance(guess, RedeemResult) and guess.outcome is Outcome.NOT_FOUND
    valid = limiter.command(issued.codes[0])
    answers = [await limiter.attempt(valid, T0_MS + 10, mode) for mode in ("validate", "redeem")]

    assert [(a.outcome, a.risk_reason) for a in answers if isinstance(a, RedeemResult)] == [
        (Outcome.RISK_DENIED, "LOCKED_OUT")
    ] * 2
    assert await times_used(redis, valid) == 0
    assert await lift_lockout(redis, brand_id=BRAND, scope="terminal", subject="s1/t1")
    lifted = await limiter.attempt(valid, T0_MS + 11)
    assert isinstance(lifted, RedeemResult) and lifted.outcome is Outcome.REDEEMED


async def test_guessed_check_characters_count_towards_the_same_lockout(
    issue: Issue, redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    issued = await issue(1)
    limiter = Limiter(any_store, engine_of(policy(lockout={"terminal": (3, 60, 900)})), keyring)
    with pytest.raises(InvalidRequest) as refused:
        limiter.command(guessed_code(issued.campaign.id))
    assert refused.value.guess  # what the service counts through failures.lua
    plan = limiter.engine.failure_plan(BRAND, CALLER.client_id, "s1", "t1")
    failures = keys.failures_key(BRAND, Scope.TERMINAL, "s1/t1")

    async def guess(n: int) -> None:
        attempt = FailedAttempt(T0_MS + n, f"guess-{n}", BRAND, "s1", "t1", CALLER.client_id, "dev-1", None, "redeem")
        await limiter.store.count_failure(plan, attempt)

    await guess(0)
    await guess(1)
    assert await redis.zcard(failures) == 2 and not await redis.exists(LOCK)
    unknown = await limiter.attempt(limiter.command(unknown_code(issued.campaign.id)), T0_MS + 2)  # the third
    assert isinstance(unknown, RedeemResult) and unknown.outcome is Outcome.NOT_FOUND and await redis.exists(LOCK)

    await lift_lockout(redis, brand_id=BRAND, scope="terminal", subject="s1/t1")
    for n in range(3, 6):
        await guess(n)
    await guess(6)  # while locked: not counted (the lock already says everything)
    denied = await limiter.attempt(limiter.command(issued.codes[0]), T0_MS + 7)

    assert await redis.exists(LOCK) and await redis.zcard(failures) == 0
    assert isinstance(denied, RedeemResult) and denied.risk_reason == "LOCKED_OUT"
    locked = ("lockout", "LOCKED_OUT", "enforce", "terminal:s1/t1")
    assert lockout_events(await risk_events(redis)) == [locked] * 3  # redeem.lua's lock, failures.lua's, denial


# -- 6. Shadow mode ---------------------------------------------------------------------------------------------

SHADOW = {"rate_limit": "shadow", "device_velocity": "shadow", "code_velocity": "shadow", "lockout": "shadow"}


async def test_shadow_limits_admit_everything_and_record_every_hit(
    issue: Issue, redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    issued = await issue(1, uses_per_code=10)
    limits = {"terminal": (2, 60), "store": (2, 60), "device": (2, 60), "code": (2, 60)}
    limiter = Limiter(any_store, engine_of(policy(limits, modes=SHADOW)), keyring)
    commands = [limiter.command(issued.codes[0]) for _ in range(5)]

    answers = [await limiter.attempt(c, T0_MS + n) for n, c in enumerate(commands)]

    assert len(outcomes(answers, Outcome.REDEEMED)) == 5
    hits = ("rate_limit:RATE_LIMITED",) * 2 + ("device_velocity:DEVICE_VELOCITY", "code_velocity:CODE_VELOCITY")
    assert [a.shadow_hits for a in answers if isinstance(a, RedeemResult)] == [(), ()] + [hits] * 3
    ref = commands[0].lookup.refs[0].ref
    scopes = ("terminal:s1/t1", "store:s1", "device:dev-1", f"code:{ref[:12]}")
    one_attempt = [(*hit.split(":"), "shadow", scope) for hit, scope in zip(hits, scopes, strict=True)]
    events = await risk_events(redis)
    assert lockout_events(events) == one_attempt * 3
    assert [e["at"] for e in events] == [str(T0_MS + n) for n in (2, 3, 4) for _ in scopes]
    assert all(e["kind"] == "redeem" and e["client"] == CALLER.client_id for e in events)
    assert issued.codes[0] not in str(events)
    # admitted attempts are counted, shadow hits included (the header: counted when admitted)
    assert await window_size(redis, Scope.TERMINAL, "s1/t1") == 5


async def test_a_shadow_lockout_records_but_never_locks(
    issue: Issue, redis: Redis, keyring: KeyRing, any_store: RedisCodeStore
) -> None:
    issued = await issue(1)
    doc = policy(lockout={"terminal": (2, 60, 900)}, modes=SHADOW)
    limiter = Limiter(any_store, engine_of(doc), keyring)
    fails = [await limiter.attempt(limiter.command(unknown_code(issued.campaign.id)), T0_MS + n) for n in range(3)]
    valid = await limiter.attempt(limiter.command(issued.codes[0]), T0_MS + 3)

    hit = ("lockout:LOCKED_OUT",)  # from the second failure on: the threshold is 2
    assert [(f.outcome, f.shadow_hits) for f in fails if isinstance(f, RedeemResult)] == [
        (Outcome.NOT_FOUND, ()), (Outcome.NOT_FOUND, hit), (Outcome.NOT_FOUND, hit)
    ]  # fmt: skip
    assert isinstance(valid, RedeemResult) and valid.outcome is Outcome.REDEEMED and not await redis.exists(LOCK)
    assert lockout_events(await risk_events(redis)) == [("lockout", "LOCKED_OUT", "shadow", "terminal:s1/t1")] * 2


async def test_a_window_key_holds_at_most_two_windows_of_members_and_expires_when_idle(
    any_store: RedisCodeStore, issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    """Expired members are trimmed about once a window (not on every attempt, to keep the AOF small), so a busy
    key never grows past two windows' attempts, and an idle one disappears."""
    issued = await issue(1)
    limiter = Limiter(any_store, engine_of(policy({"terminal": (1000, 1)})), keyring)
    for step in range(30):  # one attempt every 100 ms for 3 s: three windows of one second
        answer = await limiter.attempt(limiter.command(unknown_code(issued.campaign.id)), T0_MS + step * 100)
        assert admitted(answer)
    key = window_key(Scope.TERMINAL, "s1/t1")
    assert 10 <= await redis.zcard(key) <= 20
    assert 0 < await redis.pttl(key) <= 2000
