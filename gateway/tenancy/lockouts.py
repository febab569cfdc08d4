"""Administration of the risk engine's brute-force lockouts, which live only in Redis (risk/keys.py): list a brand's
current ones, and lift one - its lock and its failure count, so it does not lock again at the next failure. A lift
is audited in Postgres like a registry change (but changes no registry row, so bumps no version).

Never the hot path: listing SCANs the brand's lock keys (bounded, `MAX_LISTED`). Redis failures are the domain's
StoreUnavailable, like the redemption store's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from redis import exceptions as redis_errors

from gateway.domain import StoreUnavailable
from gateway.redis_client import RedisClient
from gateway.tenancy.admin_rules import check, raise_if
from gateway.tenancy.admin_tx import audit_row
from risk import keys
from risk.model import Scope

# A lock a scope of these can be under (risk.model.Lockout): what LiftLockout accepts.
LIFTABLE = (Scope.TERMINAL, Scope.STORE, Scope.CLIENT)
MAX_LISTED = 1000
SCAN_COUNT = 500
MAX_SUBJECT_CHARS = 200
SCOPE_RULE = f"must be one of {', '.join(LIFTABLE)}"
SUBJECT_RULE = f"is required: 1 to {MAX_SUBJECT_CHARS} characters (a terminal's is `<store>/<terminal>`)"


@dataclass(frozen=True, slots=True)
class Lockout:
    """One locked-out scope; `seconds_left` is None for a lock without an expiry (set by hand)."""

    scope: str
    subject: str
    seconds_left: float | None


@dataclass(frozen=True, slots=True)
class Lockouts:
    """A brand's current lockouts by scope and subject; `truncated` when there were more than MAX_LISTED."""

    entries: tuple[Lockout, ...]
    truncated: bool


@asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (redis_errors.RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(type(exc).__name__) from exc


async def _lock_keys(redis: RedisClient, brand_id: int) -> tuple[list[str], bool]:
    found: list[str] = []
    async for key in redis.scan_iter(match=keys.lock_pattern(brand_id), count=SCAN_COUNT):
        if len(found) == MAX_LISTED:
            return found, True
        found.append(key)
    return found, False


def _lockout(prefix: str, key: str, ttl_ms: int) -> Lockout:
    # A subject may hold ':' (external ids do); the scope never does, so the first ':' ends it.
    scope, _, subject = key.removeprefix(prefix).partition(":")
    return Lockout(scope, subject, None if ttl_ms == -1 else ttl_ms / 1000)


async def list_lockouts(redis: RedisClient, *, brand_id: int) -> Lockouts:
    """The brand's current lockouts (at most MAX_LISTED), ordered by scope and subject."""
    prefix = keys.lock_pattern(brand_id).removesuffix("*")
    async with _redis_errors():
        found, truncated = await _lock_keys(redis, brand_id)
        async with redis.pipeline(transaction=False) as pipe:
            for key in found:
                pipe.pttl(key)
            ttls: list[int] = await pipe.execute() if found else []
    # -2: the lock expired between SCAN and PTTL - it is no longer current.
    entries = sorted(
        (_lockout(prefix, key, ttl) for key, ttl in zip(found, ttls, strict=True) if ttl != -2),
        key=lambda lock: (lock.scope, lock.subject),
    )
    return Lockouts(tuple(entries), truncated)


def lift_rules(scope: str, subject: str) -> None:
    """InvalidRequest unless `scope` can be locked out and `subject` could name one."""
    raise_if(
        check(scope in LIFTABLE, "scope", SCOPE_RULE),
        check(0 < len(subject) <= MAX_SUBJECT_CHARS, "subject", SUBJECT_RULE),
    )


async def lift_lockout(redis: RedisClient, *, brand_id: int, scope: str, subject: str) -> bool:
    """Delete the scope's lock and its failure count; True when it was locked out. Both keys carry the brand's risk
    tag, so one MULTI removes them together (on Redis Cluster too)."""
    lift_rules(scope, subject)
    lock = keys.lock_key(brand_id, Scope(scope), subject)
    failures = keys.failures_key(brand_id, Scope(scope), subject)
    async with _redis_errors(), redis.pipeline(transaction=True) as pipe:
        pipe.delete(lock)
        pipe.delete(failures)
        deleted_lock, _ = await pipe.execute()
    return bool(deleted_lock)


def _lift_state(scope: str, subject: str, locked: bool) -> str:
    return json.dumps({"scope": scope, "subject": subject, "locked": locked})


async def lift_audited(
    conn: asyncpg.Connection, *, redis: RedisClient, actor: str, brand_id: int, scope: str, subject: str
) -> bool:
    """lift_lockout with its audit row (every attempt, lifted or not: who tried matters too). Redis is changed
    inside the audit's transaction, so a lift Redis refused leaves no audit row; the row records the registry
    version current at the time."""
    async with conn.transaction():
        version: int = await conn.fetchval("SELECT version FROM registry_version")
        lifted = await lift_lockout(redis, brand_id=brand_id, scope=scope, subject=subject)
        await audit_row(
            conn, version, actor=actor, brand_id=brand_id, action="lockout.lift", entity_id=f"{scope}:{subject}",
            before=_lift_state(scope, subject, lifted), after=_lift_state(scope, subject, False),
        )  # fmt: skip
    return lifted
