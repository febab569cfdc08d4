"""RedemptionService with a fake store: the rules of the service, without Redis or a network."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway import codes
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.domain import (
    Caller,
    CodeLookup,
    CodeNotFound,
    CodeState,
    FailedAttempt,
    ItemFailure,
    NotReady,
    Outcome,
    Readiness,
    RedeemCommand,
    RedeemInput,
    RedeemResult,
    StoreUnavailable,
)
from gateway.service import Mode, RedemptionService
from gateway.validation import InvalidRequest
from risk.model import Assessment, CounterPlan

RING = KeyRing({"k": b"k" * 32}, "k")
CALLER = Caller(client_id="cl_pos", brand_id=3, role="pos")
T0 = 1_780_272_000_000


class FakeStore:
    """Redeems everything once; a shard listed in `down` cannot be decided."""

    def __init__(self, down: frozenset[int] = frozenset()) -> None:
        self.calls: list[tuple[Mode, list[RedeemCommand]]] = []
        self.risks: list[Assessment | None] = []
        self.failures: list[tuple[CounterPlan, FailedAttempt]] = []
        self.down = down

    async def decide(
        self,
        commands: Sequence[RedeemCommand],
        redemption_ids: Sequence[str],
        *,
        mode: Mode,
        now_ms: int,
        risks: Sequence[Assessment | None] | None = None,
    ) -> Sequence[RedeemResult | ItemFailure]:
        self.calls.append((mode, list(commands)))
        self.risks += risks or [None] * len(commands)
        if commands[0].lookup.route.shard in self.down:
            raise StoreUnavailable("ConnectionError")
        return [RedeemResult(Outcome.REDEEMED, c.lookup.route.campaign_id, 0, rid, now_ms, 1) for c, rid in
                zip(commands, redemption_ids, strict=True)]  # fmt: skip

    async def redeem_one(
        self, command: RedeemCommand, redemption_id: str, *, mode: Mode, now_ms: int, risk: Assessment | None = None
    ) -> RedeemResult:
        (result,) = await self.decide([command], [redemption_id], mode=mode, now_ms=now_ms, risks=[risk])
        assert isinstance(result, RedeemResult)
        return result

    async def count_failure(self, plan: CounterPlan, attempt: FailedAttempt) -> None:
        self.failures.append((plan, attempt))

    async def code_state(self, lookup: CodeLookup, brand_id: int) -> CodeState | None:
        return None


def service(store: FakeStore, *, ready: bool = True) -> RedemptionService:
    return RedemptionService(store=store, keyring=RING, clock=ManualClock(T0), readiness=Readiness(ready, "test"),
                             new_id=lambda now: f"rid-{now}")  # fmt: skip


def request(shard: int = 0, **changes: object) -> RedeemInput:
    fields: dict[str, object] = {
        "code": codes.generate(codes.Route(5, shard)),
        "idempotency_key": "k",
        "store_id": "s",
        "terminal_id": "t",
        "customer_device_id": "",
        "location": None,
    }
    fields.update(changes)
    return RedeemInput(**fields)  # type: ignore[arg-type]


async def test_redeem_asks_the_store_once_as_the_caller() -> None:
    store = FakeStore()
    result = await service(store).redeem(request(), CALLER)
    assert result.outcome is Outcome.REDEEMED and result.redemption_id == f"rid-{T0}"
    ((mode, (command,)),) = store.calls
    assert mode == "redeem" and (command.client_id, command.brand_id) == ("cl_pos", 3)


async def test_bad_input_and_not_ready_never_reach_the_store() -> None:
    store = FakeStore()
    with pytest.raises(InvalidRequest):
        await service(store).redeem(request(code="nope"), CALLER)
    with pytest.raises(NotReady):
        await service(store, ready=False).redeem(request(), CALLER)
    assert store.calls == []


async def test_validate_needs_no_key_and_changes_nothing() -> None:
    store = FakeStore()
    await service(store).validate(request(idempotency_key=""), CALLER)
    assert [mode for mode, _ in store.calls] == ["validate"]


async def test_a_batch_is_one_call_per_shard_and_a_shard_that_is_down_fails_alone() -> None:
    store = FakeStore(down=frozenset({1}))
    batch = [request(0, idempotency_key="a"), request(1, idempotency_key="b"), request(0, code="x"),
             request(0, idempotency_key="c")]  # fmt: skip
    results = await service(store).redeem_many(batch, CALLER)
    assert sorted(len(commands) for _, commands in store.calls) == [1, 2]  # shard 0: two items, shard 1: one
    first, down, malformed, third = results
    assert isinstance(first, RedeemResult) and isinstance(third, RedeemResult)
    assert isinstance(down, ItemFailure) and isinstance(down.error, StoreUnavailable)
    assert isinstance(malformed, ItemFailure) and isinstance(malformed.error, InvalidRequest)


async def test_a_batch_when_not_ready_fails_every_item_without_the_store() -> None:
    store = FakeStore()
    results = await service(store, ready=False).redeem_many([request(), request(1)], CALLER)
    assert all(isinstance(r, ItemFailure) and isinstance(r.error, NotReady) for r in results)
    assert store.calls == []


async def test_an_unknown_code_is_not_found() -> None:
    with pytest.raises(CodeNotFound):
        await service(FakeStore()).get_code(codes.generate(codes.Route(5, 0)), CALLER)
