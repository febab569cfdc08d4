"""Reverse: void one redemption of the caller's brand within its campaign's reversal window.

The redemption's route (campaign, shard, code, use number) comes from the ledger - a redemption id carries no
route - and the decision and its effects are one script call on the campaign shard (lua/reverse.lua): the use and
the budget are given back once however many reversals race, and a reversal racing a redemption of the same code
loses nothing. The reversal reaches the ledger through the outbox, like a redemption.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg

from gateway import keys
from gateway.clock import Clock
from gateway.domain import Caller, IdempotencyConflict, LedgerBehind, LedgerUnavailable, PermissionDenied
from gateway.gateway_metrics import script_observer
from gateway.ids import uuid7, uuid7_ms
from gateway.redis_client import RedisClient
from gateway.script_calls import load_lua, wrap_errors
from gateway.validation import FieldViolation, InvalidRequest, check_id

# A redemption the ledger does not hold yet is at most this old (the writer commits well within a second; an
# outbox backlog longer than this is alerted on): until then "not found" may only mean "not written yet".
LEDGER_GRACE_MS = 5 * 60 * 1000
_REASON = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SECONDS = script_observer("reverse")

_LOOKUP = """
SELECT campaign_id, shard, code_ref, key_id, use_number, brand_id FROM redemptions WHERE redemption_id = $1"""


class ReversalOutcome(StrEnum):
    """The decision on a reversal (mirrors redemption.v1.ReversalOutcome)."""

    REVERSED = "REVERSED"
    ALREADY_REVERSED = "ALREADY_REVERSED"
    NOT_FOUND = "NOT_FOUND"
    WINDOW_CLOSED = "WINDOW_CLOSED"


@dataclass(frozen=True, slots=True)
class ReverseInput:
    """A reversal as the caller asked for it, not yet checked."""

    redemption_id: str
    reason: str
    idempotency_key: str
    store_id: str
    terminal_id: str


@dataclass(frozen=True, slots=True)
class ReversalResult:
    """The answer to a reversal."""

    outcome: ReversalOutcome
    reason: str
    campaign_id: int = 0
    reversal_id: str = ""
    reversed_at_ms: int = 0
    uses_left: int = 0
    use_number: int = 0
    replayed: bool = False


NOT_FOUND = ReversalResult(ReversalOutcome.NOT_FOUND, "REDEMPTION_NOT_FOUND")


def check_reverse(request: ReverseInput, caller: Caller) -> uuid.UUID:
    """The redemption id of a well-formed request; InvalidRequest naming every bad field; PermissionDenied for a
    key bound to another store or terminal."""
    violations: list[FieldViolation] = []
    rid: uuid.UUID | None = None
    try:
        rid = uuid.UUID(request.redemption_id)
    except ValueError:
        pass
    if not request.redemption_id:
        violations.append(FieldViolation("redemption_id", "is required"))
    elif rid is None or len(request.redemption_id) != 36:
        violations.append(FieldViolation("redemption_id", "must be a redemption id (a UUID)"))
    if not _REASON.fullmatch(request.reason):
        violations.append(FieldViolation("reason", "must be 1 to 64 characters of A-Z, a-z, 0-9 and . _ : -"))
    violations += check_id(request.idempotency_key, "idempotency_key", 128, required=True)
    violations += check_id(request.store_id, "store_id", 64, required=True)
    violations += check_id(request.terminal_id, "terminal_id", 64, required=True)
    if violations:
        raise InvalidRequest(violations)
    if caller.store_id and request.store_id != caller.store_id:
        raise PermissionDenied("this API key is bound to another store")
    if caller.terminal_id and request.terminal_id != caller.terminal_id:
        raise PermissionDenied("this API key is bound to another terminal")
    assert rid is not None
    return rid


def reversal_field(client_id: str, terminal_id: str, redemption_id: str, idempotency_key: str) -> str:
    """The code-hash field holding the first answer to this caller's reversal with this key."""
    scope = f"{client_id}\x00{terminal_id}\x00{redemption_id}\x00{idempotency_key}"
    return "r:" + hashlib.sha256(scope.encode()).hexdigest()[:32]


def reversal_fingerprint(request: ReverseInput) -> str:
    """What a retry must repeat for its key to replay the first answer."""
    text = "\x00".join((request.redemption_id.lower(), request.reason, request.store_id, request.terminal_id))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Reversals:
    """Reverse redemptions: the ledger says where, one script call decides and applies."""

    def __init__(self, pool: asyncpg.Pool, redis: RedisClient, clock: Clock) -> None:
        self._pool = pool
        self._redis = redis
        self._clock = clock
        self._script: Any = redis.register_script(load_lua("reverse.lua"))

    async def reverse(self, request: ReverseInput, caller: Caller) -> ReversalResult:
        rid = check_reverse(request, caller)
        now = self._clock.now_ms()
        row = await self._locate(rid)
        if row is None or row["brand_id"] != caller.brand_id:
            # another brand's redemption is answered exactly as one that does not exist
            if 0 <= now - _uuid_ms(rid) <= LEDGER_GRACE_MS:
                raise LedgerBehind("the redemption is not in the ledger yet")
            return NOT_FOUND
        cid, shard, ref = row["campaign_id"], row["shard"], row["code_ref"].hex()
        script_keys = [keys.meta_key(cid, shard), keys.budget_key(cid, shard), keys.outbox_key(cid, shard),
                       keys.code_key(cid, shard, ref)]  # fmt: skip
        args: list[str | int] = [
            now, caller.brand_id, str(rid), row["use_number"], uuid7(now), request.reason,
            reversal_field(caller.client_id, request.terminal_id, str(rid), request.idempotency_key),
            reversal_fingerprint(request), f"{caller.client_id}/{request.terminal_id}", caller.client_id, ref,
            row["key_id"], cid, shard,
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            with wrap_errors():
                status, left, xid, at, use, replayed, reason = await self._script(keys=script_keys, args=args)
        finally:
            _SECONDS(time.perf_counter() - started)
        if status == "IDEMPOTENCY_MISMATCH":
            raise IdempotencyConflict("idempotency key was used for this redemption with a different request")
        if status == "NOT_FOUND":
            return NOT_FOUND
        return ReversalResult(ReversalOutcome(status), reason, cid, xid, int(at), max(int(left), 0), int(use),
                              bool(replayed))  # fmt: skip

    async def _locate(self, rid: uuid.UUID) -> asyncpg.Record | None:
        try:
            async with self._pool.acquire() as conn:
                row: asyncpg.Record | None = await conn.fetchrow(_LOOKUP, rid)
                return row
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc


def _uuid_ms(rid: uuid.UUID) -> int:
    return uuid7_ms(str(rid)) if rid.version == 7 else 0
