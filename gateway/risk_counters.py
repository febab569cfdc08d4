"""The risk counters as their own call, for when they cannot ride in the redeem script: on Redis Cluster the
brand's risk tag and the campaign shard are different slots, and RGW_RISK_REDIS_URL may name a separate Redis.

One attempt then costs up to three round trips instead of one: lua/risk.lua checks every lock and window and
counts the admitted attempt (risk tag), lua/redeem.lua decides the code with its device rules (campaign tag), and -
only when there is something to report - a failed attempt is counted towards the lockout and the device's last
place is kept (risk tag). When the counters cannot be reached, each rule's failure policy decides: an enforced
rule that fails closed declines the attempt (RISK_DATA_UNAVAILABLE), the others are skipped and recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from gateway import keys, risk_plan
from gateway.domain import FailedAttempt, Location, RedeemCommand, StoreUnavailable
from gateway.gateway_metrics import script_observer
from gateway.pipelined_redis import Script
from gateway.ratelimited_log import RateLimitedLog
from gateway.redis_client import HotClient, RedisClient
from gateway.script_calls import count_failure_args, item_args, load_lua, wrap_errors
from risk.model import Assessment, CounterPlan, Finding, Mode, Reason, Rule

# An item's risk argument for redeem.lua: (position, command, the call's KEYS) -> plan
PlanArg = Callable[[int, RedeemCommand, risk_plan.ScriptKeys], str]


class CodeRun(Protocol):
    """One redeem.lua call with a plan per item (RedisCodeStore.run)."""

    def __call__(
        self, commands: Sequence[RedeemCommand], redemption_ids: Sequence[str], *, mode: Any, now_ms: int,
        plan: PlanArg,
    ) -> Awaitable[list[Any]]: ...  # fmt: skip


_ADMITTED = "ADMITTED"
_RISK_SECONDS = script_observer("risk")
_log = RateLimitedLog(logging.getLogger("rgw.risk.counters"), burst=1)


def _present(plan: CounterPlan) -> list[Rule]:
    """The counter rules this plan has counters for (enforced or shadow)."""
    rules = [w.rule for w in plan.windows if w.mode is not Mode.OFF]
    if any(lock.mode is not Mode.OFF for lock in plan.lockouts):
        rules.append(Rule.LOCKOUT)
    if plan.travel is not None and plan.travel.mode is not Mode.OFF:
        rules.append(Rule.IMPOSSIBLE_TRAVEL)
    return list(dict.fromkeys(rules))


def unavailable(plan: CounterPlan) -> tuple[Finding | None, tuple[Finding, ...]]:
    """The failure policy when the counters cannot be reached: the first enforced fail-closed rule declines; every
    other counter rule of the plan is skipped and recorded as a shadow finding."""
    reason = Reason.RISK_DATA_UNAVAILABLE
    denial = Finding(plan.closed[0], reason, Mode.ENFORCE) if plan.closed else None
    skipped = tuple(Finding(rule, reason, Mode.SHADOW) for rule in _present(plan) if rule not in plan.closed)
    return denial, skipped


class SeparateCounters:
    """lua/risk.lua and the reports after a redemption, on the Redis holding the risk tags."""

    def __init__(self, redis: RedisClient, pipelined: HotClient | None = None) -> None:

        self.redis = redis
        self._pipelined = pipelined
        check, failures = load_lua("risk.lua"), load_lua("failures.lua")
        if pipelined is not None:
            self._check: Any = Script(pipelined, check)
            self._failures: Any = Script(pipelined, failures)
        else:
            self._check, self._failures = redis.register_script(check), redis.register_script(failures)

    async def check(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        risks: Sequence[Assessment],
        *,
        mode: str,
        now_ms: int,
    ) -> list[Any]:
        """One reply per command (redeem.lua's shape; status ADMITTED, RISK_DENIED or THROTTLED);
        StoreUnavailable when the counters cannot be reached."""

        script_keys: list[str] = []
        table = risk_plan.ScriptKeys(script_keys)
        route = commands[0].lookup.route
        args: list[str | int] = [mode, now_ms, 0, route.campaign_id, route.shard, commands[0].brand_id]
        for command, rid, assessment in zip(commands, redemption_ids, risks, strict=True):
            args += item_args(command, rid, risk_plan.encode_counters(assessment, table))
        started = time.perf_counter()
        try:
            with wrap_errors():
                replies: list[Any] = await self._check(keys=script_keys, args=args)
        finally:
            _RISK_SECONDS(time.perf_counter() - started)
        return replies

    async def report(
        self,
        failures: Sequence[tuple[CounterPlan, FailedAttempt, int]],
        places: Sequence[tuple[CounterPlan, Location, int]] = (),
    ) -> list[int]:
        """After the redemption: count failed attempts (plan, attempt, campaign) towards the lockouts and keep the
        place of each redeeming device (plan, location, now). Returns, per failure, how many shadow lockouts it
        reached (0 when the report was lost). Best effort: the answer is given already, and a lost report only
        loosens the lockout or the travel check by one attempt - logged, never raised."""
        shadows = [0] * len(failures)
        try:
            with wrap_errors():
                for position, (plan, attempt, campaign_id) in enumerate(failures):
                    script_keys, args = count_failure_args(plan, attempt, campaign_id)
                    if script_keys:
                        _, shadows[position] = await self._failures(keys=script_keys, args=args)
                for plan, place, now_ms in places:
                    travel = plan.travel
                    if travel is not None:
                        await self._set(travel.key, f"{place.latitude!r}|{place.longitude!r}|{now_ms}", travel.ttl_ms)
        except StoreUnavailable as exc:
            _log.log(logging.WARNING, "risk report lost (%s): the counters are unavailable", type(exc).__name__)
        return [int(n) for n in shadows]

    async def _set(self, key: str, value: str, ttl_ms: int) -> None:
        # on the pipelined client when there is one: this runs after every redemption with the travel rule on
        if self._pipelined is not None:
            await self._pipelined.call("SET", key, value, "PX", ttl_ms)
        else:
            await self.redis.set(key, value, px=ttl_ms)

    async def decide(
        self,
        run: CodeRun,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        risks: Sequence[Assessment | None],
        *,
        mode: Any,
        now_ms: int,
    ) -> list[Any]:
        """The three steps for commands of one campaign shard; replies in redeem.lua's shape, in order."""
        verdicts, fallback, admitted = await self._verdicts(commands, redemption_ids, risks, mode=mode, now_ms=now_ms)
        decided = [i for i in range(len(commands)) if verdicts[i] is None]
        replies: list[Any] = list(verdicts)
        if decided:
            outbox = keys.outbox_key(commands[0].lookup.route.campaign_id, commands[0].lookup.route.shard)

            def code_plan(position: int, command: RedeemCommand, table: risk_plan.ScriptKeys) -> str:
                assessment = risks[decided[position]]
                if assessment is None:
                    return ""
                denial, skipped = fallback.get(decided[position], (None, ()))
                device = command.customer_device_id
                route = command.lookup.route
                device_key = keys.device_key(route.campaign_id, route.shard, device) if device else ""
                return risk_plan.encode_code_part(assessment, device_key, table, outbox, denial=denial, shadow=skipped)

            code = await run([commands[i] for i in decided], [redemption_ids[i] for i in decided], mode=mode,
                             now_ms=now_ms, plan=code_plan)  # fmt: skip
            for i, reply in zip(decided, code, strict=True):
                replies[i] = _with_shadow(reply, admitted.get(i, ""))
        reported = [i for i in decided if i in admitted]  # nothing to report where the counters were unavailable
        await self._report(commands, redemption_ids, risks, replies, reported, mode=mode, now_ms=now_ms)
        return replies

    async def _verdicts(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        risks: Sequence[Assessment | None],
        *,
        mode: Any,
        now_ms: int,
    ) -> tuple[list[Any], dict[int, tuple[Finding | None, tuple[Finding, ...]]], dict[int, str]]:
        """Per item: the counters' final answer (a denial) or None (decide the code); when the counters could not
        be reached, each item's failure-policy outcome; and the admitted items with their shadow hits."""
        verdicts: list[Any] = [None] * len(commands)
        fallback: dict[int, tuple[Finding | None, tuple[Finding, ...]]] = {}
        admitted: dict[int, str] = {}
        risky = [(i, assessment) for i, assessment in enumerate(risks) if assessment is not None]
        if not risky:
            return verdicts, fallback, admitted
        try:
            replies = await self.check([commands[i] for i, _ in risky], [redemption_ids[i] for i, _ in risky],
                                       [a for _, a in risky], mode=mode, now_ms=now_ms)  # fmt: skip
        except StoreUnavailable as exc:
            _log.log(logging.WARNING, "risk counters unavailable (%s): failure policies apply", type(exc).__name__)
            fallback = {i: unavailable(assessment.plan) for i, assessment in risky}
            return verdicts, fallback, admitted
        for (i, _), reply in zip(risky, replies, strict=True):
            if reply[0] == _ADMITTED:
                admitted[i] = reply[10]
            else:
                verdicts[i] = reply
        return verdicts, fallback, admitted

    async def _report(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        risks: Sequence[Assessment | None],
        replies: list[Any],
        decided: Sequence[int],
        *,
        mode: Any,
        now_ms: int,
    ) -> None:
        failures: list[tuple[CounterPlan, FailedAttempt, int]] = []
        failed: list[int] = []
        places: list[tuple[CounterPlan, Location, int]] = []
        for i in decided:
            assessment, command, status = risks[i], commands[i], replies[i][0]
            if assessment is None:
                continue
            if status == "NOT_FOUND" and assessment.plan.lockouts:
                attempt = FailedAttempt(
                    now_ms, redemption_ids[i], command.brand_id, command.store_id, command.terminal_id,
                    command.client_id, command.customer_device_id, command.location, str(mode),
                )  # fmt: skip
                failures.append((assessment.plan, attempt, command.lookup.route.campaign_id))
                failed.append(i)
            elif status == "REDEEMED" and assessment.plan.travel is not None and command.location is not None:
                places.append((assessment.plan, command.location, now_ms))
        if failures or places:
            shadow_lockouts = await self.report(failures, places)
            for i, hits in zip(failed, shadow_lockouts, strict=True):
                if hits:  # the failure reached a shadow lockout: say so, as the one-call path does
                    replies[i] = _with_shadow(replies[i], "lockout:LOCKED_OUT", last=True)


def _with_shadow(reply: list[Any], shadow: str, *, last: bool = False) -> list[Any]:
    """redeem.lua's reply with more shadow hits: the counters' in front of its own, or the report's after."""
    if shadow:
        reply = list(reply)
        parts = [reply[10], shadow] if last else [shadow, reply[10]]
        reply[10] = ",".join(p for p in parts if p)
    return reply
