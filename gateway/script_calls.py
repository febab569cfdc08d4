"""How the gateway calls its Lua scripts: loading them, their argument layout (defined once), and Redis' failures
as the domain's StoreUnavailable. Shared by the code store (redis_store.py) and the separate risk counters
(risk_counters.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from importlib import resources

from redis import exceptions as redis_errors

from gateway import keys
from gateway.domain import FailedAttempt, Location, RedeemCommand, StoreUnavailable
from gateway.risk_plan import scope_label
from risk.model import CounterPlan, Mode

_INCLUDE = "--@include "


def load_lua(name: str) -> str:
    """A Lua script shipped as package data, with its `--@include <file>` lines replaced by that file (one level:
    a fragment shared by two scripts, e.g. risk_lib.lua, which redeem.lua and risk.lua both run)."""
    package = resources.files("gateway.lua")
    lines = package.joinpath(name).read_text().splitlines(keepends=True)
    return "".join(
        package.joinpath(line[len(_INCLUDE) :].strip()).read_text() if line.startswith(_INCLUDE) else line
        for line in lines
    )


# The redeem script's arguments (lua/redeem.lua), defined once: the store and the benchmark build calls from
# these, and a test holds them against the script's header.
SCRIPT_ARGS = ("mode", "now_ms", "candidates", "campaign", "shard", "brand", "key_ids")
# KEYS before the code keys; then, per item and candidate key id, the code's bucket and its own hash.
SCRIPT_KEYS = ("meta", "outbox", "stats", "budget", "stores")
ITEM_ARGS = (
    "idem", "legacy_idem", "fp", "rid", "caller", "client", "store", "term", "dev", "lat", "lon", "acc", "risk"
)  # fmt: skip


def script_head(campaign_id: int, shard: int, now_ms: int) -> list[str]:
    """The redeem script's SCRIPT_KEYS for one campaign shard at `now_ms`."""
    return [
        keys.meta_key(campaign_id, shard),
        keys.outbox_key(campaign_id, shard),
        keys.stats_key(campaign_id, shard, keys.stats_minute(now_ms)),
        keys.budget_key(campaign_id, shard),
        keys.stores_key(campaign_id, shard),
    ]


def idempotency_field(client_id: str, terminal_id: str, idempotency_key: str) -> str:
    """The code-hash field holding the first answer to (client, terminal, key) - the scope includes the code by
    place: the field lives in the code's hash."""
    scope = f"{client_id}\x00{terminal_id}\x00{idempotency_key}"
    return "i:" + hashlib.sha256(scope.encode()).hexdigest()[:32]


def legacy_idempotency_field(store_id: str, terminal_id: str, idempotency_key: str) -> str:
    """The field of a record written before authentication, when the caller was the claimed store/terminal. The
    script still replays it to the same retry (same store, terminal, key, code and request fingerprint), so a
    POS retrying across the upgrade learns its redemption happened instead of seeing ALREADY_REDEEMED."""
    scope = f"{store_id}/{terminal_id}\x00{idempotency_key}"
    return "i:" + hashlib.sha256(scope.encode()).hexdigest()[:32]


def caller_of(command: RedeemCommand) -> str:
    """Who an idempotency scope belongs to, as the use record and the ledger name it: client/terminal."""
    return f"{command.client_id}/{command.terminal_id}"


def location_args(location: Location | None) -> tuple[str, str, str]:
    if location is None:
        return "", "", ""
    return repr(location.latitude), repr(location.longitude), repr(location.accuracy_m)


def item_args(command: RedeemCommand, redemption_id: str, risk: str) -> list[str]:
    return [
        idempotency_field(command.client_id, command.terminal_id, command.idempotency_key),
        legacy_idempotency_field(command.store_id, command.terminal_id, command.idempotency_key),
        command.fingerprint,
        redemption_id,
        caller_of(command),
        command.client_id,
        command.store_id,
        command.terminal_id,
        command.customer_device_id,
        *location_args(command.location),
        risk,
    ]


_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    OSError,
    asyncio.TimeoutError,
)


@contextlib.contextmanager
def wrap_errors() -> Iterator[None]:
    """Redis failures as the domain's StoreUnavailable (an OOM refusal too: Redis is full, not the request bad)."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(type(exc).__name__) from exc
    except redis_errors.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise StoreUnavailable("OOM") from exc
        raise


def count_failure_args(
    plan: CounterPlan, attempt: FailedAttempt, campaign_id: int
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of lua/failures.lua for one failed attempt ([] when no lockout of the plan is on)."""
    locks = [lock for lock in plan.lockouts if lock.mode is not Mode.OFF]
    if not locks or not plan.events_key:
        return [], []
    script_keys = [plan.events_key]
    args: list[str | int] = [attempt.now_ms, attempt.member, attempt.brand_id, campaign_id, attempt.store_id,
                             attempt.terminal_id, attempt.client_id, attempt.device_id,
                             *location_args(attempt.location), attempt.kind]  # fmt: skip
    for lock in locks:
        script_keys += [lock.lock_key, lock.failures_key]
        args += [lock.threshold, lock.window_ms, lock.cooldown_ms, "E" if lock.mode is Mode.ENFORCE else "S",
                 scope_label(lock.scope.value, lock.subject)]  # fmt: skip
    return script_keys, args
