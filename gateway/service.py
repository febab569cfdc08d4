"""The redemption rules, free of gRPC: checks input, asks the store once, returns domain results."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.clock import Clock
from gateway.coderefs import KeyRing
from gateway.domain import CodeNotFound, CodeState, NotReady, Readiness, RedeemInput, RedeemResult
from gateway.ids import uuid7
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem, lookup_code

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
    ) -> None:
        self._readiness = readiness
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._new_id = new_id

    async def redeem(self, request: RedeemInput) -> RedeemResult:
        """Use the code once, or say why not; a retry with the same key replays the first answer."""
        command = check_redeem(request, self._keyring)
        self._require_ready()
        now = self._clock.now_ms()
        result = await self._store.redeem_one(command, self._new_id(now), mode="redeem", now_ms=now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "redeem ref=%s outcome=%s replayed=%s",
                command.lookup.refs[0].prefix,
                result.outcome,
                result.replayed,
            )
        return result

    async def validate(self, request: RedeemInput) -> RedeemResult:
        """What redeem would answer now; changes nothing."""
        command = check_redeem(request, self._keyring, needs_key=False)
        self._require_ready()
        now = self._clock.now_ms()
        return await self._store.redeem_one(command, "", mode="validate", now_ms=now)

    async def get_code(self, raw_code: str) -> tuple[CodeState, int]:
        """A code's state and the time it was read at (ms)."""
        lookup = lookup_code(raw_code, self._keyring)
        self._require_ready()
        state = await self._store.code_state(lookup)
        if state is None:
            raise CodeNotFound("no such code")
        return state, self._clock.now_ms()

    def _require_ready(self) -> None:
        if not self._readiness.ready:
            raise NotReady(self._readiness.reason)
