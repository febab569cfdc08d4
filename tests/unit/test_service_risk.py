"""The risk wiring of RedemptionService with fakes: what the engine is asked, what the store receives, and what
the service does with the verdict - no Redis, no network."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from gateway import codes
from gateway.domain import Location, Outcome, RedeemResult, Throttled
from gateway.service import RedemptionService
from gateway.validation import InvalidRequest
from risk.model import Assessment, CounterPlan, RiskRequest, StoreFacts
from tests.unit.test_service import CALLER, FakeStore, request, service

STORE = StoreFacts("s", 31.23, 121.47, 300.0)


@dataclass
class FakeEngine:
    """Records what it is asked; answers with `assessment`."""

    assessment: Assessment = field(default_factory=lambda: Assessment(None, (), CounterPlan()))
    asked: list[RiskRequest] = field(default_factory=list)
    failure_plans: list[tuple[int, str, str, str]] = field(default_factory=list)

    def assess(self, request: RiskRequest) -> Assessment:
        self.asked.append(request)
        return self.assessment

    def failure_plan(self, brand_id: int, client_id: str, store_id: str, terminal_id: str) -> CounterPlan:
        self.failure_plans.append((brand_id, client_id, store_id, terminal_id))
        return CounterPlan(events_key="events")


@dataclass
class FakeFacts:
    """A registry with store `s`; terminal `t` registered at `registered_at`; bindings recorded."""

    registered_at: str | None = "s"
    bound: list[tuple[int, str, str]] = field(default_factory=list)

    def store(self, brand_id: int, store_id: str) -> StoreFacts | None:
        return STORE if store_id == "s" else None

    def terminal_store(self, brand_id: int, store_id: str, terminal_id: str) -> str | None:
        return self.registered_at

    def bind_terminal(self, brand_id: int, store_id: str, terminal_id: str) -> None:
        self.bound.append((brand_id, store_id, terminal_id))


class ThrottlingStore(FakeStore):
    async def redeem_one(self, *args: object, **kwargs: object) -> RedeemResult:
        raise Throttled("terminal:s/t", 1500)


def risky(store: FakeStore, engine: FakeEngine, facts: FakeFacts | None = None) -> RedemptionService:
    plain = service(store)
    return RedemptionService(
        store=store, keyring=plain._keyring, clock=plain._clock, readiness=plain._readiness,
        new_id=plain._new_id, risk=engine, facts=facts or FakeFacts(),
    )  # fmt: skip


async def test_the_engine_is_asked_before_the_store_and_its_assessment_rides_with_the_command() -> None:
    store, engine = FakeStore(), FakeEngine()
    where = Location(31.2, 121.4, 15.0)
    await risky(store, engine).redeem(request(customer_device_id="phone", location=where), CALLER)
    (asked,) = engine.asked
    assert (asked.brand_id, asked.client_id, asked.store_id, asked.terminal_id, asked.device_id) == (
        3, "cl_pos", "s", "t", "phone"
    )  # fmt: skip
    assert asked.counts and asked.store == STORE and asked.terminal_store == "s" and asked.campaign_id == 5
    assert (asked.location.latitude, asked.location.accuracy_m) == (31.2, 15.0)  # type: ignore[union-attr]
    assert len(asked.code_ref) == 64  # the keyed hash, never the code
    assert store.risks == [engine.assessment]


async def test_validate_asks_with_counts_false() -> None:
    engine = FakeEngine()
    await risky(FakeStore(), engine).validate(request(idempotency_key=""), CALLER)
    assert [asked.counts for asked in engine.asked] == [False]


async def test_every_stream_item_is_assessed_on_its_own() -> None:
    store, engine = FakeStore(), FakeEngine()
    await risky(store, engine).redeem_many([request(idempotency_key="a"), request(1, idempotency_key="b")], CALLER)
    assert len(engine.asked) == 2 and store.risks == [engine.assessment] * 2


async def test_a_guessed_check_character_is_counted_as_a_failure_and_still_invalid() -> None:
    store, engine = FakeStore(), FakeEngine()
    code = codes.generate(codes.Route(5, 0))
    guessed = code[:-1] + next(ch for ch in codes.ALPHABET if ch != code[-1])
    with pytest.raises(InvalidRequest):
        await risky(store, engine).redeem(request(code=guessed), CALLER)
    assert engine.failure_plans == [(3, "cl_pos", "s", "t")]
    ((plan, attempt),) = store.failures
    assert plan.events_key == "events" and (attempt.kind, attempt.store_id, attempt.terminal_id) == (
        "redeem", "s", "t"
    )  # fmt: skip


async def test_garbage_is_not_a_guess() -> None:
    store, engine = FakeStore(), FakeEngine()
    with pytest.raises(InvalidRequest):
        await risky(store, engine).redeem(request(code="hello world"), CALLER)
    assert store.failures == [] and engine.asked == []


async def test_an_unknown_terminal_is_bound_after_it_redeemed_when_the_policy_says_so() -> None:
    facts = FakeFacts(registered_at=None)
    engine = FakeEngine(Assessment(None, (), CounterPlan(), bind_terminal=True))
    await risky(FakeStore(), engine, facts).redeem(request(), CALLER)
    assert facts.bound == [(3, "s", "t")]


async def test_a_quota_refusal_propagates_and_is_counted() -> None:
    labels = {"rule": "rate_limit", "reason": "RATE_LIMITED", "mode": "enforce"}
    before = REGISTRY.get_sample_value("rgw_risk_decisions_total", labels) or 0
    with pytest.raises(Throttled):
        await risky(ThrottlingStore(), FakeEngine()).redeem(request(), CALLER)
    assert REGISTRY.get_sample_value("rgw_risk_decisions_total", labels) == before + 1


async def test_no_engine_means_no_assessment() -> None:
    store = FakeStore()
    result = await service(store).redeem(request(), CALLER)
    assert result.outcome is Outcome.REDEEMED and store.risks == [None]


def test_an_engine_without_registry_facts_is_refused() -> None:
    plain = service(FakeStore())
    with pytest.raises(ValueError, match="facts"):
        RedemptionService(store=FakeStore(), keyring=plain._keyring, clock=plain._clock, readiness=plain._readiness,
                          risk=FakeEngine())  # fmt: skip
