"""The gateway's view of Redis: the atomic redeem script and code state. Only this module and the loader speak
Redis commands; one function maps script replies to domain results, and Redis' failures leave as the domain's
StoreUnavailable - callers never see a Redis exception."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from gateway import keys, risk_plan
from gateway.domain import (
    CodeLookup,
    CodeState,
    FailedAttempt,
    IdempotencyConflict,
    ItemFailure,
    Outcome,
    RedeemCommand,
    RedeemResult,
    Throttled,
)
from gateway.gateway_metrics import script_observer
from gateway.pipelined_redis import Script
from gateway.redis_client import HotClient, RedisClient
from gateway.risk_counters import PlanArg, SeparateCounters
from gateway.script_calls import (
    ITEM_ARGS,
    SCRIPT_ARGS,
    count_failure_args,
    idempotency_field,
    item_args,
    legacy_idempotency_field,
    load_lua,
    script_head,
    wrap_errors,
)
from risk.model import Assessment, CounterPlan

__all__ = [  # the script layout and helpers, for the store's callers and tests
    "ITEM_ARGS",
    "SCRIPT_ARGS",
    "RedisCodeStore",
    "idempotency_field",
    "legacy_idempotency_field",
    "load_lua",
]  # fmt: skip

# Campaigns whose meta predates brands belong to the default brand, as migration 0003 assigns them in Postgres.
DEFAULT_BRAND_ID = 1

Mode = Literal["redeem", "validate"]


def _risk_arg(command: RedeemCommand, assessment: Assessment | None, script_keys: risk_plan.ScriptKeys) -> str:
    route = command.lookup.route
    device = command.customer_device_id
    device_key = keys.device_key(route.campaign_id, route.shard, device) if device else ""
    return risk_plan.encode(assessment, device_key, script_keys)


def item_outcome(reply: Sequence[Any], campaign_id: int) -> RedeemResult | ItemFailure:
    """One item of a batch: its result, or the failure that item alone met (a reused idempotency key, a quota)."""
    try:
        return to_result(reply, campaign_id)
    except (IdempotencyConflict, Throttled) as exc:
        return ItemFailure(exc)


# Outcomes that say nothing about the code's campaign (it was not found, or not looked at).
_NO_CAMPAIGN = (Outcome.NOT_FOUND, Outcome.RISK_DENIED)
# Declines by a campaign rule: the script's reason field names the rule.
_RULE_DECLINES = (Outcome.NOT_ALLOWED, Outcome.BUDGET_EXHAUSTED, Outcome.CAMPAIGN_PAUSED)
_REDEEM_SECONDS = script_observer("redeem")
_FAILURES_SECONDS = script_observer("failures")


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
        risk_reason="" if outcome in _RULE_DECLINES else reason,
        retry_after_ms=int(retry_ms),
        shadow_hits=tuple(shadow.split(",")) if shadow else (),
        rule_reason=reason if outcome in _RULE_DECLINES else "",
    )


class RedisCodeStore:
    """Redeem, validate and inspect codes; the script is registered once (EVALSHA, reloaded on NOSCRIPT).

    With a pipelined client (PipelinedRedis, or PipelinedCluster on a cluster) the redeem script runs on it (the
    hot path); otherwise on redis-py."""

    def __init__(
        self, redis: RedisClient, pipelined: HotClient | None = None, *, counters: SeparateCounters | None = None
    ) -> None:
        self.redis = redis
        # None: the risk counters ride in the redeem script (one call); else they are their own call
        self._counters = counters
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
        replies = await self._replies(commands, redemption_ids, mode=mode, now_ms=now_ms, risks=risks)
        campaign_id = commands[0].lookup.route.campaign_id
        return [item_outcome(reply, campaign_id) for reply in replies]

    async def _replies(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        risks: Sequence[Assessment | None] | None,
    ) -> list[Any]:
        if self._counters is not None and risks is not None and any(r is not None for r in risks):
            return await self._counters.decide(self.run, commands, redemption_ids, risks, mode=mode, now_ms=now_ms)

        def whole_plan(position: int, command: RedeemCommand, table: risk_plan.ScriptKeys) -> str:
            return _risk_arg(command, risks[position], table) if risks is not None else ""

        return await self.run(commands, redemption_ids, mode=mode, now_ms=now_ms, plan=whole_plan)

    async def run(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        plan: PlanArg,
    ) -> list[Any]:
        """One redeem.lua call: `plan(position, command, keys)` gives each item's risk argument."""
        route = commands[0].lookup.route
        cid, shard = route.campaign_id, route.shard
        nk = len(commands[0].lookup.refs)
        # SCRIPT_KEYS (this minute's decision counters: the minute of the injected clock's now), then the codes
        script_keys = script_head(cid, shard, now_ms)
        for command in commands:
            for ref in command.lookup.refs:
                script_keys += [keys.bucket_key(cid, shard, ref.ref), keys.code_key(cid, shard, ref.ref)]
        # risk keys follow every code key: the script finds code keys by position
        extra = risk_plan.ScriptKeys(script_keys)
        key_ids = ",".join(ref.key_id for ref in commands[0].lookup.refs)
        args: list[str | int] = [mode, now_ms, nk, cid, shard, commands[0].brand_id, key_ids]
        for position, (command, redemption_id) in enumerate(zip(commands, redemption_ids, strict=True)):
            args += item_args(command, redemption_id, plan(position, command, extra))
        started = time.perf_counter()
        try:
            with wrap_errors():
                replies: list[Any] = await self._redeem(keys=script_keys, args=args)
        finally:
            _REDEEM_SECONDS(time.perf_counter() - started)
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
        replies = await self._replies([command], [redemption_id], mode=mode, now_ms=now_ms, risks=[risk])
        return to_result(replies[0], command.lookup.route.campaign_id)

    async def count_failure(self, plan: CounterPlan, attempt: FailedAttempt) -> None:
        """Count an attempt that failed before reaching the redeem script (a guessed code) towards the caller's
        lockouts, atomically (lua/failures.lua)."""
        if self._counters is not None:
            await self._counters.report([(plan, attempt, 0)], [])
            return
        script_keys, args = count_failure_args(plan, attempt, 0)
        if script_keys:
            started = time.perf_counter()
            try:
                with wrap_errors():
                    await self._failures(keys=script_keys, args=args)
            finally:
                _FAILURES_SECONDS(time.perf_counter() - started)

    async def code_state(self, lookup: CodeLookup, brand_id: int) -> CodeState | None:
        """The stored state of a code of `brand_id`, or None when unknown - another brand's code is unknown
        (one pipelined round trip)."""
        cid, shard = lookup.route.campaign_id, lookup.route.shard
        with wrap_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.meta_key(cid, shard), "vf", "vu", "brand", "uses", "vd")
                for ref in lookup.refs:
                    pipe.hget(keys.bucket_key(cid, shard, ref.ref), keys.bucket_field(ref.ref))
                    pipe.hmget(keys.code_key(cid, shard, ref.ref), "uses", "used", "vf", "vu", "last")
                meta, *found = await pipe.execute()
        if meta[0] is None or int(meta[2] or DEFAULT_BRAND_ID) != brand_id:
            return None
        for position, ref in enumerate(lookup.refs):
            issued, fields = found[2 * position], found[2 * position + 1]
            if issued is None:
                continue
            uses, used, vf, vu, last = fields
            valid_until = min(int(meta[1]), int(vu) if vu else int(meta[1]))
            if int(meta[4] or 0) > 0:
                valid_until = min(valid_until, int(issued) * 1000 + int(meta[4]))
            return CodeState(
                campaign_id=cid,
                code_ref_prefix=ref.prefix,
                uses_total=int(uses or meta[3] or 1),
                uses_used=int(used or 0),
                valid_from_ms=max(int(meta[0]), int(vf) if vf else int(meta[0])),
                valid_until_ms=valid_until,
                last_redeemed_ms=int(last or 0),
            )
        return None
