"""The redemption rules, free of gRPC: checks input, asks the store once, returns domain results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from gateway.clock import Clock
from gateway.coderefs import KeyRing
from gateway.domain import (
    Caller,
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
from gateway.redis_store import RedisCodeStore, to_result
from gateway.tenancy.sightings import Sightings
from gateway.validation import InvalidRequest, check_redeem, lookup_code

log = logging.getLogger("rgw.redeem")


class RedemptionService:
    """Redeem, Validate and GetCode. Exactly one awaited Redis call per request."""

    def __init__(
        self,
        *,
        store: RedisCodeStore,
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
        replies = await asyncio.gather(*(self._decide(group, now) for group in groups), return_exceptions=True)
        for group, reply in zip(groups, replies, strict=True):
            for position, (index, command) in enumerate(group):
                results[index] = _item_result(reply, position, command)
        return results

    async def _decide(self, group: list[tuple[int, RedeemCommand]], now: int) -> list[object]:
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
    reply: list[object] | BaseException, position: int, command: RedeemCommand
) -> RedeemResult | ItemFailure:
    if isinstance(reply, BaseException):
        if not isinstance(reply, Exception):
            raise reply  # cancellation and the like are not item failures
        return ItemFailure(reply)
    try:
        return to_result(reply[position], command.lookup.route.campaign_id)  # type: ignore[arg-type]
    except Exception as exc:  # an idempotency conflict fails this item only
        return ItemFailure(exc)
