"""The redemption rules, free of gRPC: checks input, asks the store once, returns domain results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from gateway.clock import Clock
from gateway.coderefs import KeyRing
from gateway.domain import (
    Caller,
    CodeLookup,
    CodeNotFound,
    CodeState,
    ItemFailure,
    NotReady,
    PermissionDenied,
    Readiness,
    RedeemCommand,
    RedeemInput,
    RedeemResult,
)
from gateway.ids import uuid7
from gateway.tenancy.sightings import Sightings
from gateway.validation import InvalidRequest, check_redeem, lookup_code

log = logging.getLogger("rgw.redeem")
Mode = Literal["redeem", "validate"]


class CodeStore(Protocol):
    """Where codes are decided (gateway/redis_store.py): domain results only, and StoreUnavailable when the store
    could not decide - so the service is tested with a fake."""

    async def decide(
        self, commands: Sequence[RedeemCommand], redemption_ids: Sequence[str], *, mode: Mode, now_ms: int
    ) -> Sequence[RedeemResult | ItemFailure]:
        """Commands of one campaign shard, decided at once: a result or an item's own failure each, in order."""
        ...

    async def redeem_one(self, command: RedeemCommand, redemption_id: str, *, mode: Mode, now_ms: int) -> RedeemResult:
        """One command; IdempotencyConflict for a key reused with another request."""
        ...

    async def code_state(self, lookup: CodeLookup, brand_id: int) -> CodeState | None:
        """A code's state, or None when unknown to this brand."""
        ...


class RedemptionService:
    """Redeem, Validate and GetCode. Exactly one awaited Redis call per request."""

    def __init__(
        self,
        *,
        store: CodeStore,
        keyring: KeyRing,
        clock: Clock,
        readiness: Readiness,
        new_id: Callable[[int], str] = uuid7,
        sightings: Sightings | None = None,
    ) -> None:
        self._readiness = readiness
        self._sightings = sightings or Sightings()
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._new_id = new_id

    async def redeem(self, request: RedeemInput, caller: Caller) -> RedeemResult:
        """Use the code once, or say why not; a retry with the same key replays the first answer."""
        command = check_redeem(request, self._keyring, caller)
        self._require_ready()
        now = self._clock.now_ms()
        self._sightings.saw(command.brand_id, command.store_id, command.terminal_id, now)
        result = await self._store.redeem_one(command, self._new_id(now), mode="redeem", now_ms=now)
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
                command = check_redeem(request, self._keyring, caller)
            except (InvalidRequest, PermissionDenied) as exc:
                results[index] = ItemFailure(exc)
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
        return await self._store.decide(commands, [self._new_id(now) for _ in commands], mode="redeem", now_ms=now)

    async def validate(self, request: RedeemInput, caller: Caller) -> RedeemResult:
        """What redeem would answer now; changes nothing."""
        command = check_redeem(request, self._keyring, caller, needs_key=False)
        self._require_ready()
        now = self._clock.now_ms()
        self._sightings.saw(command.brand_id, command.store_id, command.terminal_id, now)
        return await self._store.redeem_one(command, "", mode="validate", now_ms=now)

    async def get_code(self, raw_code: str, caller: Caller) -> tuple[CodeState, int]:
        """A code's state and the time it was read at (ms); another brand's code is not found."""
        lookup = lookup_code(raw_code, self._keyring)
        self._require_ready()
        state = await self._store.code_state(lookup, caller.brand_id)
        if state is None:
            raise CodeNotFound("no such code")
        return state, self._clock.now_ms()

    def _require_ready(self) -> None:
        if not self._readiness.ready:
            raise NotReady(self._readiness.reason)


def _item_result(
    outcomes: Sequence[RedeemResult | ItemFailure] | BaseException, position: int
) -> RedeemResult | ItemFailure:
    """An item's fate: its shard's failure (every item of that shard fails alike), or its own outcome."""
    if isinstance(outcomes, BaseException):
        if not isinstance(outcomes, Exception):
            raise outcomes  # cancellation and the like are not item failures
        return ItemFailure(outcomes)
    return outcomes[position]
