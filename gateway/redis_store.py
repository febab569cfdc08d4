"""The gateway's view of Redis: the atomic redeem script and code state. Only this module and the loader speak
Redis commands; one function maps script replies to domain results, and Redis' failures leave as the domain's
StoreUnavailable - callers never see a Redis exception."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any, Literal

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway import keys, risk_plan
from gateway.domain import (
    CodeLookup,
    CodeState,
    FailedAttempt,
    IdempotencyConflict,
    ItemFailure,
    Location,
    Outcome,
    RedeemCommand,
    RedeemResult,
    StoreUnavailable,
    Throttled,
)
from gateway.pipelined_redis import PipelinedRedis, Script
from risk.model import Assessment, CounterPlan

# Campaigns whose meta predates brands belong to the default brand, as migration 0003 assigns them in Postgres.
DEFAULT_BRAND_ID = 1

Mode = Literal["redeem", "validate"]


def load_lua(name: str) -> str:
    """A Lua script shipped as package data."""
    return resources.files("gateway.lua").joinpath(name).read_text()


def connect(url: str, *, pool_size: int, timeout_s: float) -> Redis:
    """A client whose pool queues callers beyond `pool_size` instead of failing (bursts are normal here)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        # A pooled connection that died with a restarted Redis fails once; retry that once on a fresh one.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis_errors.ConnectionError],
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


# The redeem script's arguments (lua/redeem.lua), defined once: the store and the benchmark build calls from
# these, and a test holds them against the script's header.
SCRIPT_ARGS = ("mode", "now_ms", "candidates", "campaign", "shard", "brand")
ITEM_ARGS = (
    "idem", "legacy_idem", "fp", "rid", "caller", "client", "store", "term", "dev", "lat", "lon", "acc", "risk"
)  # fmt: skip


def idempotency_field(client_id: str, terminal_id: str, idempotency_key: str) -> str:
    """The code-hash field holding the first answer to (client, terminal, key) - the scope includes the code by
    place: the field lives in the code's hash."""
    scope = f"{client_id}\x00{terminal_id}\x00{idempotency_key}"
    return "i:" + hashlib.sha256(scope.encode()).hexdigest()[:32]


def legacy_idempotency_field(store_id: str, terminal_id: str, idempotency_key: str) -> str:
    """The field of a record written before authentication, when the caller was the claimed store/terminal. The
    script still replays it to the same retry (same store, terminal, key, code and request fingerprint), so a
    POS retrying across the upgrade learns its redemption happened instead of seeing ALREADY_REDEEMED."""
    scope = f"{store_id}/{terminal_id}\x00{idempotency_key}"
    return "i:" + hashlib.sha256(scope.encode()).hexdigest()[:32]


def caller_of(command: RedeemCommand) -> str:
    """Who an idempotency scope belongs to, as the use record and the ledger name it: client/terminal."""
    return f"{command.client_id}/{command.terminal_id}"


def _location_args(location: Location | None) -> tuple[str, str, str]:
    if location is None:
        return "", "", ""
    return repr(location.latitude), repr(location.longitude), repr(location.accuracy_m)


def _item_args(command: RedeemCommand, redemption_id: str, risk: str) -> list[str]:
    return [
        idempotency_field(command.client_id, command.terminal_id, command.idempotency_key),
        legacy_idempotency_field(command.store_id, command.terminal_id, command.idempotency_key),
        command.fingerprint,
        redemption_id,
        caller_of(command),
        command.client_id,
        command.store_id,
        command.terminal_id,
        command.customer_device_id,
        *_location_args(command.location),
        risk,
    ]


def _risk_arg(command: RedeemCommand, assessment: Assessment | None, script_keys: risk_plan.ScriptKeys) -> str:
    route = command.lookup.route
    device = command.customer_device_id
    device_key = keys.device_key(route.campaign_id, route.shard, device) if device else ""
    return risk_plan.encode(assessment, device_key, script_keys)


_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    OSError,
    asyncio.TimeoutError,
)


@contextlib.contextmanager
def _wrap_errors() -> Iterator[None]:
    """Redis failures as the domain's StoreUnavailable (an OOM refusal too: Redis is full, not the request bad)."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(type(exc).__name__) from exc
    except redis_errors.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise StoreUnavailable("OOM") from exc
        raise


def item_outcome(reply: Sequence[Any], campaign_id: int) -> RedeemResult | ItemFailure:
    """One item of a batch: its result, or the failure that item alone met (a reused idempotency key, a quota)."""
    try:
        return to_result(reply, campaign_id)
    except (IdempotencyConflict, Throttled) as exc:
        return ItemFailure(exc)


# Outcomes that say nothing about the code's campaign (it was not found, or not looked at).
_NO_CAMPAIGN = (Outcome.NOT_FOUND, Outcome.RISK_DENIED)


def to_result(reply: Sequence[Any], campaign_id: int) -> RedeemResult:
    """The domain result of one item of the script's reply: IdempotencyConflict for a key reused with another
    request, Throttled for a caller over its own quota."""
    status, uses_left, redemption_id, at_ms, use_number, replayed, rule, reason, scope, retry_ms, shadow = reply
    if status == "IDEMPOTENCY_MISMATCH":
        raise IdempotencyConflict("idempotency key was used for this code with a different request")
    if status == "THROTTLED":
        raise Throttled(scope, int(retry_ms))
    outcome = Outcome(status)
    return RedeemResult(
        outcome=outcome,
        campaign_id=0 if outcome in _NO_CAMPAIGN else campaign_id,
        uses_left=max(int(uses_left), 0),
        redemption_id=redemption_id,
        redeemed_at_ms=int(at_ms),
        use_number=int(use_number),
        replayed=bool(replayed),
        risk_rule=rule,
        risk_reason=reason,
        retry_after_ms=int(retry_ms),
        shadow_hits=tuple(shadow.split(",")) if shadow else (),
    )


class RedisCodeStore:
    """Redeem, validate and inspect codes; the script is registered once (EVALSHA, reloaded on NOSCRIPT).

    With a PipelinedRedis the redeem script runs on it (the hot path); otherwise on redis-py."""

    def __init__(self, redis: Redis, pipelined: PipelinedRedis | None = None) -> None:
        self.redis = redis
        source, failures = load_lua("redeem.lua"), load_lua("failures.lua")
        if pipelined is not None:
            self._redeem: Any = Script(pipelined, source)
            self._failures: Any = Script(pipelined, failures)
        else:
            self._redeem, self._failures = redis.register_script(source), redis.register_script(failures)

    async def decide(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        risks: Sequence[Assessment | None] | None = None,
    ) -> list[RedeemResult | ItemFailure]:
        """Decide commands that share one campaign shard in one script call, each with its risk assessment (whose
        Redis part runs in the same call): a result (or an item's own failure) per command, in order.
        StoreUnavailable when Redis could not decide."""
        replies = await self._run(commands, redemption_ids, mode=mode, now_ms=now_ms, risks=risks)
        campaign_id = commands[0].lookup.route.campaign_id
        return [item_outcome(reply, campaign_id) for reply in replies]

    async def _run(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        risks: Sequence[Assessment | None] | None,
    ) -> list[Any]:
        route = commands[0].lookup.route
        cid, shard = route.campaign_id, route.shard
        nk = len(commands[0].lookup.refs)
        script_keys = [keys.meta_key(cid, shard), keys.outbox_key(cid, shard)]
        for command in commands:
            script_keys += [keys.code_key(cid, shard, ref.ref) for ref in command.lookup.refs]
        # risk keys follow every code key: the script finds code keys by position
        extra = risk_plan.ScriptKeys(script_keys)
        args: list[str | int] = [mode, now_ms, nk, cid, shard, commands[0].brand_id]
        for position, (command, redemption_id) in enumerate(zip(commands, redemption_ids, strict=True)):
            risk = _risk_arg(command, risks[position], extra) if risks is not None else ""
            args += _item_args(command, redemption_id, risk)
        with _wrap_errors():
            replies: list[Any] = await self._redeem(keys=script_keys, args=args)
        return replies

    async def redeem_one(
        self,
        command: RedeemCommand,
        redemption_id: str,
        *,
        mode: Mode,
        now_ms: int,
        risk: Assessment | None = None,
    ) -> RedeemResult:
        """One code: exactly one awaited Redis call, the risk counters included. IdempotencyConflict for a key
        reused with another request, Throttled for a caller over its own quota."""
        replies = await self._run([command], [redemption_id], mode=mode, now_ms=now_ms, risks=[risk])
        return to_result(replies[0], command.lookup.route.campaign_id)

    async def count_failure(self, plan: CounterPlan, attempt: FailedAttempt) -> None:
        """Count an attempt that failed before reaching the redeem script (a guessed code) towards the caller's
        lockouts, atomically (lua/failures.lua)."""
        locks = [lock for lock in plan.lockouts if lock.mode.value != "off"]
        if not locks or not plan.events_key:
            return
        script_keys = [plan.events_key]
        # the event's fields as lua/failures.lua takes them; the campaign is unknown (0)
        args: list[str | int] = [attempt.now_ms, attempt.member, attempt.brand_id, 0, attempt.store_id,
                                 attempt.terminal_id, attempt.client_id, attempt.device_id,
                                 *_location_args(attempt.location), attempt.kind]  # fmt: skip
        for lock in locks:
            script_keys += [lock.lock_key, lock.failures_key]
            args += [lock.threshold, lock.window_ms, lock.cooldown_ms, "E" if lock.mode.value == "enforce" else "S",
                     risk_plan.scope_label(lock.scope.value, lock.subject)]  # fmt: skip
        with _wrap_errors():
            await self._failures(keys=script_keys, args=args)

    async def code_state(self, lookup: CodeLookup, brand_id: int) -> CodeState | None:
        """The stored state of a code of `brand_id`, or None when unknown - another brand's code is unknown
        (one pipelined round trip)."""
        cid, shard = lookup.route.campaign_id, lookup.route.shard
        with _wrap_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.meta_key(cid, shard), "vf", "vu", "brand")
                for ref in lookup.refs:
                    pipe.hmget(keys.code_key(cid, shard, ref.ref), "uses", "used", "vf", "vu", "last")
                meta, *found = await pipe.execute()
        if meta[0] is None or int(meta[2] or DEFAULT_BRAND_ID) != brand_id:
            return None
        for ref, fields in zip(lookup.refs, found, strict=True):
            if fields[0] is not None:
                uses, used, vf, vu, last = fields
                return CodeState(
                    campaign_id=cid,
                    code_ref_prefix=ref.prefix,
                    uses_total=int(uses),
                    uses_used=int(used),
                    valid_from_ms=max(int(vf), int(meta[0])),
                    valid_until_ms=min(int(vu), int(meta[1])),
                    last_redeemed_ms=int(last or 0),
                )
        return None
