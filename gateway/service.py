"""The redemption rules, free of gRPC: checks input, asks the risk engine (in process), asks the store once - the
risk engine's counters riding in the same script call - and returns domain results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

from gateway import codes, gateway_metrics
from gateway.campaigns.reversal import ReversalResult, ReverseInput
from gateway.clock import Clock
from gateway.coderefs import KeyRing
from gateway.codes import Route
from gateway.domain import (
    Caller,
    CodeLookup,
    CodeNotFound,
    CodeState,
    FailedAttempt,
    ItemFailure,
    NotReady,
    Outcome,
    PermissionDenied,
    Readiness,
    RedeemCommand,
    RedeemInput,
    RedeemResult,
    StoreUnavailable,
    Throttled,
)
from gateway.ids import uuid7
from gateway.tenancy.sightings import Sightings
from gateway.validation import InvalidRequest, check_redeem, lookup_code
from risk.model import Assessment, CounterPlan, Place, RiskRequest, StoreFacts

log = logging.getLogger("rgw.redeem")
Mode = Literal["redeem", "validate"]


class CodeStore(Protocol):
    """Where codes are decided (gateway/redis_store.py): domain results only, and StoreUnavailable when the store
    could not decide - so the service is tested with a fake. The risk assessment's Redis part (counters, lockouts,
    device rules) is executed with the decision, atomically, and the decision's outcome feeds the lockout there."""

    async def decide(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        risks: Sequence[Assessment | None] | None = None,
    ) -> Sequence[RedeemResult | ItemFailure]:
        """Commands of one campaign shard, decided at once: a result or an item's own failure each, in order."""
        ...

    async def redeem_one(
        self, command: RedeemCommand, redemption_id: str, *, mode: Mode, now_ms: int, risk: Assessment | None = None
    ) -> RedeemResult:
        """One command; IdempotencyConflict for a key reused with another request, Throttled over a quota."""
        ...

    async def count_failure(self, plan: CounterPlan, attempt: FailedAttempt) -> None:
        """Count a failed attempt the store never decided (a guessed code) towards the caller's lockouts."""
        ...

    async def code_state(self, lookup: CodeLookup, brand_id: int) -> CodeState | None:
        """A code's state, or None when unknown to this brand."""
        ...


class Reverser(Protocol):
    """Where reversals are decided (gateway/campaigns/reversal.py)."""

    async def reverse(self, request: ReverseInput, caller: Caller) -> ReversalResult:
        """Void one redemption of the caller's brand, or say why not."""
        ...


class Directory(Protocol):
    """Where imported codes are found (gateway/campaigns/lookup.py)."""

    def imports(self, brand_id: int) -> bool:
        """Whether the brand has imported codes at all (read without I/O)."""
        ...

    async def find(self, brand_id: int, code: str) -> Route | None:
        """The route of one of the brand's imported codes (normalised), None when there is none."""
        ...


class RiskEngine(Protocol):
    """The risk engine (risk/engine.py): pure, in-process; its Redis part is a plan the store executes."""

    def assess(self, request: RiskRequest) -> Assessment:
        """The in-process verdict and the counters to check with the redemption."""
        ...

    def failure_plan(self, brand_id: int, client_id: str, store_id: str, terminal_id: str) -> CounterPlan:
        """The lockouts a failed attempt of this caller counts towards."""
        ...


class RiskFacts(Protocol):
    """What the registry knows that the risk rules need (gateway/risk_facts.py), read without I/O."""

    def store(self, brand_id: int, store_id: str) -> StoreFacts | None:
        """The registered store's location and radius, None when the store is not registered."""
        ...

    def terminal_store(self, brand_id: int, store_id: str, terminal_id: str) -> str | None:
        """The store the terminal is registered to, None when the terminal is unknown."""
        ...

    def bind_terminal(self, brand_id: int, store_id: str, terminal_id: str) -> None:
        """Register an unknown terminal to the store of its first redemption (the brand's bind_first policy)."""
        ...


class RedemptionService:
    """Redeem, Validate and GetCode. Exactly one awaited Redis call per request, risk counters included."""

    def __init__(
        self,
        *,
        store: CodeStore,
        keyring: KeyRing,
        clock: Clock,
        readiness: Readiness,
        new_id: Callable[[int], str] = uuid7,
        sightings: Sightings | None = None,
        risk: RiskEngine | None = None,
        facts: RiskFacts | None = None,
        reversals: Reverser | None = None,
        directory: Directory | None = None,
    ) -> None:
        if (risk is None) != (facts is None):
            raise ValueError("the risk engine needs the registry's facts, and they are useless without it")
        self._risk = risk
        self._facts = facts
        self._readiness = readiness
        self._sightings = sightings or Sightings()
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._new_id = new_id
        self._reversals = reversals
        self._directory = directory

    async def redeem(self, request: RedeemInput, caller: Caller) -> RedeemResult:
        """Use the code once, or say why not; a retry with the same key replays the first answer."""
        command = await self._checked(request, caller, "redeem")
        self._require_ready()
        if command is None:
            return UNLISTED
        now = self._clock.now_ms()
        self._sightings.saw(command.brand_id, command.store_id, command.terminal_id, now)
        assessment = self._assess(command, now, counts=True)
        result = await self._with_risk(
            self._store.redeem_one(command, self._new_id(now), mode="redeem", now_ms=now, risk=assessment)
        )
        self._observe(command, assessment, result)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "redeem ref=%s outcome=%s replayed=%s",
                command.lookup.refs[0].prefix,
                result.outcome,
                result.replayed,
            )
        return result

    async def redeem_many(self, requests: Sequence[RedeemInput], caller: Caller) -> list[RedeemResult | ItemFailure]:
        """Redeem a batch: every item keeps Redeem's guarantees; one script call per campaign shard, the shards
        concurrently. A malformed item, or a shard Redis could not decide, fails alone."""
        results: list[RedeemResult | ItemFailure] = [ItemFailure(NotReady(self._readiness.reason))] * len(requests)
        if not self._readiness.ready:
            return results
        by_shard: dict[tuple[int, int], list[tuple[int, RedeemCommand]]] = {}
        for index, request in enumerate(requests):
            try:
                command = await self._checked(request, caller, "redeem")
            except (InvalidRequest, PermissionDenied, StoreUnavailable) as exc:
                results[index] = ItemFailure(exc)
                continue
            if command is None:
                results[index] = UNLISTED
                continue
            route = command.lookup.route
            by_shard.setdefault((route.campaign_id, route.shard), []).append((index, command))
        now = self._clock.now_ms()
        for group in by_shard.values():
            for _, command in group:
                self._sightings.saw(command.brand_id, command.store_id, command.terminal_id, now)
        groups = list(by_shard.values())
        decided = await asyncio.gather(*(self._decide(group, now) for group in groups), return_exceptions=True)
        for group, outcomes in zip(groups, decided, strict=True):
            for position, (index, _) in enumerate(group):
                results[index] = _item_result(outcomes, position)
        return results

    async def _decide(self, group: list[tuple[int, RedeemCommand]], now: int) -> Sequence[RedeemResult | ItemFailure]:
        commands = [command for _, command in group]
        risks = [self._assess(command, now, counts=True) for command in commands]
        ids = [self._new_id(now) for _ in commands]
        outcomes = await self._store.decide(commands, ids, mode="redeem", now_ms=now, risks=risks)
        for command, assessment, outcome in zip(commands, risks, outcomes, strict=True):
            if isinstance(outcome, RedeemResult):
                self._observe(command, assessment, outcome)
            elif isinstance(outcome.error, Throttled):
                gateway_metrics.risk_decision("rate_limit", "RATE_LIMITED", "enforce")
        return outcomes

    async def validate(self, request: RedeemInput, caller: Caller) -> RedeemResult:
        """What redeem would answer now; changes nothing."""
        command = await self._checked(request, caller, "validate", needs_key=False)
        self._require_ready()
        if command is None:
            return UNLISTED
        now = self._clock.now_ms()
        self._sightings.saw(command.brand_id, command.store_id, command.terminal_id, now)
        assessment = self._assess(command, now, counts=False)
        # the id names a failed attempt in the lockout's window; Validate redeems nothing with it
        result = await self._with_risk(
            self._store.redeem_one(command, self._new_id(now), mode="validate", now_ms=now, risk=assessment)
        )
        self._observe(command, assessment, result)
        return result

    async def get_code(self, raw_code: str, caller: Caller) -> tuple[CodeState, int]:
        """A code's state and the time it was read at (ms); another brand's code is not found."""
        lookup = await self._imported(raw_code, caller) if self._imports(caller) else None
        lookup = lookup or lookup_code(raw_code, self._keyring)
        self._require_ready()
        state = await self._store.code_state(lookup, caller.brand_id)
        if state is None:
            raise CodeNotFound("no such code")
        return state, self._clock.now_ms()

    async def reverse(self, request: ReverseInput, caller: Caller) -> ReversalResult:
        """Void one redemption (within its campaign's reversal window), once; a retry replays the first answer."""
        self._require_ready()
        if self._reversals is None:
            raise NotReady("reversals are not served by this gateway")
        result = await self._reversals.reverse(request, caller)
        log.info("reverse redemption=%s outcome=%s replayed=%s", request.redemption_id, result.outcome, result.replayed)
        return result

    def _require_ready(self) -> None:
        if not self._readiness.ready:
            raise NotReady(self._readiness.reason)

    def _imports(self, caller: Caller) -> bool:
        return self._directory is not None and self._directory.imports(caller.brand_id)

    async def _imported(self, raw_code: str, caller: Caller) -> CodeLookup | None:
        """The lookup of an imported code of the caller's brand: None when the text is a generated code (it routes
        itself) or cannot be an imported one; CodeNotFound when the brand's directory does not have it."""
        text = codes.normalise_imported(raw_code)
        if text is None or codes.is_generated(text) or self._directory is None:
            return None
        self._require_ready()
        route = await self._directory.find(caller.brand_id, text)
        if route is None:
            raise CodeNotFound("no such code")
        return CodeLookup(route, self._keyring.candidates(route.campaign_id, text))

    async def _checked(
        self, request: RedeemInput, caller: Caller, kind: str, *, needs_key: bool = True
    ) -> RedeemCommand | None:
        """check_redeem, and a guessed code (right shape, wrong check character) counted as a failed attempt. For a
        brand that imports codes, a code that is not a generated one is looked up in its directory first: None
        when it is not there either (counted as a failed attempt too)."""
        lookup = None
        if self._imports(caller):
            try:
                lookup = await self._imported(request.code, caller)
            except CodeNotFound:
                check_redeem(request, self._keyring, caller, needs_key=needs_key, code_checked=True)
                if self._risk is not None and self._readiness.ready:
                    await self._count_guess(self._risk, request, caller, kind)
                return None
        try:
            return check_redeem(request, self._keyring, caller, needs_key=needs_key, lookup=lookup)
        except InvalidRequest as exc:
            if exc.guess and self._risk is not None and self._readiness.ready:
                await self._count_guess(self._risk, request, caller, kind)
            raise

    async def _count_guess(self, risk: RiskEngine, request: RedeemInput, caller: Caller, kind: str) -> None:
        plan = risk.failure_plan(caller.brand_id, caller.client_id, request.store_id, request.terminal_id)
        now = self._clock.now_ms()
        attempt = FailedAttempt(
            now, self._new_id(now), caller.brand_id, request.store_id, request.terminal_id, caller.client_id,
            request.customer_device_id, request.location, kind,
        )  # fmt: skip
        try:
            await self._store.count_failure(plan, attempt)
        except StoreUnavailable:
            # the answer stays INVALID_ARGUMENT; with Redis down nothing can be redeemed, so no guess can win
            log.debug("a guessed code was not counted: redis unavailable")

    def _assess(self, command: RedeemCommand, now: int, *, counts: bool) -> Assessment | None:
        if self._risk is None or self._facts is None:
            return None
        brand, store, terminal = command.brand_id, command.store_id, command.terminal_id
        loc = command.location
        return self._risk.assess(
            RiskRequest(
                brand_id=brand,
                campaign_id=command.lookup.route.campaign_id,
                client_id=command.client_id,
                store_id=store,
                terminal_id=terminal,
                device_id=command.customer_device_id,
                location=None if loc is None else Place(loc.latitude, loc.longitude, loc.accuracy_m),
                code_ref=command.lookup.refs[0].ref,
                now_ms=now,
                counts=counts,
                store=self._facts.store(brand, store),
                terminal_store=self._facts.terminal_store(brand, store, terminal),
            )
        )

    @staticmethod
    async def _with_risk(decision: Awaitable[RedeemResult]) -> RedeemResult:
        try:
            return await decision
        except Throttled:
            gateway_metrics.risk_decision("rate_limit", "RATE_LIMITED", "enforce")
            raise

    def _observe(self, command: RedeemCommand, assessment: Assessment | None, result: RedeemResult) -> None:
        """Metrics of the risk verdict, and the bind_first binding of an unknown terminal once it redeemed."""
        if assessment is None:
            return
        if result.outcome is Outcome.RISK_DENIED:
            gateway_metrics.risk_decision(result.risk_rule, result.risk_reason, "enforce")
        for hit in result.shadow_hits:
            rule, _, reason = hit.partition(":")
            gateway_metrics.risk_decision(rule, reason, "shadow")
        if assessment.bind_terminal and result.outcome is Outcome.REDEEMED and self._facts is not None:
            self._facts.bind_terminal(command.brand_id, command.store_id, command.terminal_id)


# An imported-looking code its brand's directory does not have: answered as a code that was never issued.
UNLISTED = RedeemResult(outcome=Outcome.NOT_FOUND, campaign_id=0, uses_left=0)


def _item_result(
    outcomes: Sequence[RedeemResult | ItemFailure] | BaseException, position: int
) -> RedeemResult | ItemFailure:
    """An item's fate: its shard's failure (every item of that shard fails alike), or its own outcome."""
    if isinstance(outcomes, BaseException):
        if not isinstance(outcomes, Exception):
            raise outcomes  # cancellation and the like are not item failures
        return ItemFailure(outcomes)
    return outcomes[position]
