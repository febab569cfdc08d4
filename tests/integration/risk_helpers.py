"""Helpers of the limiter tests: a real RiskEngine over policy documents, attempts driven through RedisCodeStore
with its assessment (the clock passed explicitly), and the risk keys' raw state."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from gateway import codes
from gateway import keys as gateway_keys
from gateway.coderefs import KeyRing
from gateway.domain import Caller, Outcome, RedeemCommand, RedeemInput, RedeemResult, Throttled
from gateway.redis_store import Mode as StoreMode
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem
from risk import keys
from risk.engine import RiskEngine
from risk.model import Assessment, RiskRequest, Scope
from risk.policy import PolicyBook

BRAND = 1  # the `issue` fixture's campaigns are brand 1's
CALLER = Caller(client_id="cl_a", brand_id=BRAND, role="pos")
EVENT_FIELDS = (
    "at", "brand", "campaign", "store", "term", "client", "dev", "rule", "reason", "mode", "scope", "lat", "lon",
    "acc", "kind",
)  # fmt: skip

Answer = RedeemResult | Throttled


def policy(
    limits: dict[str, tuple[int, int]] | None = None,
    lockout: dict[str, tuple[int, int, int]] | None = None,
    modes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A brand document with only the given limits ((limit, window_s) per scope) and lockouts ((threshold,
    window_s, cooldown_s) per scope): every default limit and lockout is removed, so one rule is tested alone."""
    doc_limits: dict[str, Any] = {scope.value: None for scope in Scope}
    for scope, (limit, window_s) in (limits or {}).items():
        doc_limits[scope] = {"limit": limit, "window_s": window_s}
    doc_lockout: dict[str, Any] = {scope: None for scope in ("terminal", "store", "client")}
    for scope, (threshold, window_s, cooldown_s) in (lockout or {}).items():
        doc_lockout[scope] = {"threshold": threshold, "window_s": window_s, "cooldown_s": cooldown_s}
    return {"limits": doc_limits, "lockout": doc_lockout, "modes": modes or {}}


def engine_of(document: dict[str, Any]) -> RiskEngine:
    """A RiskEngine whose book holds `document` as brand 1's policy."""
    book = PolicyBook.from_documents({(BRAND, 0): document})
    return RiskEngine(lambda: book)


def unknown_code(campaign_id: int) -> str:
    """A well-formed code of the campaign that was never issued (NOT_FOUND)."""
    return codes.generate(codes.Route(campaign_id, 0))


def guessed_code(campaign_id: int) -> str:
    """A code-shaped text with a wrong check character (refused before Redis: a guess)."""
    code = unknown_code(campaign_id)
    wrong = next(ch for ch in codes.ALPHABET if ch != code[-1])
    return code[:-1] + wrong


@dataclass
class Limiter:
    """Attempts as the service makes them: check_redeem, RiskEngine.assess, then the store's one script call."""

    store: RedisCodeStore
    engine: RiskEngine
    keyring: KeyRing
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def command(
        self, code: str, *, key: str = "", store: str = "s1", terminal: str = "t1", device: str = "dev-1",
        caller: Caller = CALLER,
    ) -> RedeemCommand:  # fmt: skip
        """A checked request; a fresh idempotency key unless one is given."""
        key = key or f"k{next(self._ids)}"
        return check_redeem(RedeemInput(code, key, store, terminal, device, None), self.keyring, caller)

    def assess(self, command: RedeemCommand, now_ms: int, *, counts: bool) -> Assessment:
        """The engine's assessment of the command (no registry: unknown store, unknown terminal)."""
        return self.engine.assess(
            RiskRequest(
                brand_id=command.brand_id,
                campaign_id=command.lookup.route.campaign_id,
                client_id=command.client_id,
                store_id=command.store_id,
                terminal_id=command.terminal_id,
                device_id=command.customer_device_id,
                location=None,
                code_ref=command.lookup.refs[0].ref,
                now_ms=now_ms,
                counts=counts,
                store=None,
                terminal_store=None,
            )
        )

    async def attempt(self, command: RedeemCommand, now_ms: int, mode: StoreMode = "redeem") -> Answer:
        """One attempt: its result, or the Throttled a caller quota raised."""
        risk = self.assess(command, now_ms, counts=mode == "redeem")
        rid = f"rid-{next(self._ids)}"  # names the counted attempt in the windows: unique per attempt
        try:
            return await self.store.redeem_one(command, rid, mode=mode, now_ms=now_ms, risk=risk)
        except Throttled as throttled:
            return throttled

    async def burst(self, commands: Sequence[RedeemCommand], now_ms: int, mode: StoreMode = "redeem") -> list[Answer]:
        """Every command at once (asyncio.gather), all at the same instant."""
        return list(await asyncio.gather(*(self.attempt(c, now_ms, mode) for c in commands)))


def outcomes(answers: Sequence[Answer], outcome: Outcome) -> list[RedeemResult]:
    """The answers that are results with `outcome`."""
    return [a for a in answers if isinstance(a, RedeemResult) and a.outcome is outcome]


def throttled(answers: Sequence[Answer]) -> list[Throttled]:
    """The answers that are caller-quota refusals."""
    return [a for a in answers if isinstance(a, Throttled)]


def window_key(scope: Scope, subject: str) -> str:
    """A brand-wide (campaign 0) window of brand 1: what a brand document's limits count in."""
    return keys.window_key(BRAND, 0, scope, subject)


async def window_size(redis: Redis, scope: Scope, subject: str) -> int:
    """Counted attempts in a window's log (members are not trimmed by reading: this is the raw count)."""
    return int(await redis.zcard(window_key(scope, subject)))


async def times_used(redis: Redis, command: RedeemCommand) -> int:
    """How many uses of the command's code were taken (its hash field `used`; no hash yet: none)."""
    route = command.lookup.route
    used = await redis.hget(gateway_keys.code_key(route.campaign_id, route.shard, command.lookup.refs[0].ref), "used")
    return int(used or 0)


async def risk_events(redis: Redis) -> list[dict[str, str]]:
    """Brand 1's risk-event stream, each `r1` entry split into its named fields."""
    entries: Any = await redis.xrange(keys.events_key(BRAND))  # str fields: the client decodes responses
    return [dict(zip(EVENT_FIELDS, fields["r1"].split("|"), strict=True)) for _, fields in entries]


async def flush_risk_keys(redis: Redis) -> None:
    """Delete every risk key of brand 1 (between examples of a property test)."""
    found = [key async for key in redis.scan_iter(match=f"{keys.PREFIX}:{keys.brand_tag(BRAND)}:*", count=1000)]
    if found:
        await redis.delete(*found)
