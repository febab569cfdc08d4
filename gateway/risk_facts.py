"""The registry's facts as the risk engine needs them, read without I/O on the hot path.

Built once per registry version (a snapshot is immutable, so an index of it is too): the brand's stores by their
external id, and where each terminal external id is registered. Terminal ids are unique per store, not per brand,
so a terminal "naming another store" is a terminal id registered at another of the brand's stores and not at the
store it names. The policy book is rebuilt per version as well: a policy change reaches the engine with the
registry, within seconds on every gateway, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from gateway import keys as gateway_keys
from gateway.redis_client import RedisClient
from gateway.tenancy import admin_store, notify
from gateway.tenancy.model import AlreadyExists, NotFoundError, Status
from gateway.tenancy.snapshot import Registry
from risk import keys as risk_keys
from risk.model import StoreFacts
from risk.policy import PolicyBook

log = logging.getLogger("rgw.risk")

# bind_first registrations waiting for Postgres: a caller inventing terminal ids cannot grow memory without bound
MAX_PENDING_BINDS = 10_000
BIND_ACTOR = "risk:bind_first"


@dataclass(frozen=True, slots=True)
class _Index:
    version: int
    stores: dict[tuple[int, str], StoreFacts]
    store_ids: dict[tuple[int, str], int]
    terminal_stores: dict[tuple[int, str], tuple[str, ...]]
    book: PolicyBook


def _index(registry: Registry) -> _Index:
    stores: dict[tuple[int, str], StoreFacts] = {}
    store_ids: dict[tuple[int, str], int] = {}
    for store in registry.stores.values():
        store_ids[(store.brand_id, store.external_id)] = store.id
        if store.status is Status.ACTIVE:  # a disabled store has no location to be in
            stores[(store.brand_id, store.external_id)] = StoreFacts(
                store.external_id, store.latitude, store.longitude, store.radius_m
            )
    terminal_stores: dict[tuple[int, str], tuple[str, ...]] = {}
    for terminal in registry.terminals.values():
        owner = registry.stores.get(terminal.store_id)
        if owner is not None:
            key = (terminal.brand_id, terminal.external_id)
            terminal_stores[key] = (*terminal_stores.get(key, ()), owner.external_id)
    # the snapshot's read-only views as the plain JSON objects the policy parser expects
    book = PolicyBook.from_documents({level: dict(doc) for level, doc in registry.risk_policies.items()})
    return _Index(registry.version, stores, store_ids, terminal_stores, book)


@dataclass
class RegistryRiskFacts:
    """RiskFacts (gateway/service.py) over the current registry snapshot, and the bind_first registrations."""

    registry: Callable[[], Registry]
    _index: _Index | None = None
    _pending: dict[tuple[int, str], str] = field(default_factory=dict)
    _queued: dict[tuple[int, str, str], None] = field(default_factory=dict)

    def _current(self) -> _Index:
        registry = self.registry()
        index = self._index
        if index is None or index.version != registry.version:
            index = self._index = _index(registry)
        return index

    def book(self) -> PolicyBook:
        """The risk policies at the current registry version."""
        return self._current().book

    def store(self, brand_id: int, store_id: str) -> StoreFacts | None:
        return self._current().stores.get((brand_id, store_id))

    def terminal_store(self, brand_id: int, store_id: str, terminal_id: str) -> str | None:
        registered = self._current().terminal_stores.get((brand_id, terminal_id))
        if registered is None:
            return self._pending.get((brand_id, terminal_id))
        return store_id if store_id in registered else registered[0]

    def bind_terminal(self, brand_id: int, store_id: str, terminal_id: str) -> None:
        key = (brand_id, terminal_id)
        if key in self._pending or len(self._pending) >= MAX_PENDING_BINDS:
            return
        if (brand_id, store_id) not in self._current().store_ids:
            return  # only a registered store can own a terminal; an invented store id binds nothing
        # bound in this process at once; every other process learns it with the registry
        self._pending[key] = store_id
        self._queued[(brand_id, store_id, terminal_id)] = None

    async def flush_binds(self, pool: asyncpg.Pool, redis: RedisClient) -> int:
        """Register the terminals bound since the last flush; returns how many were registered."""
        queued, self._queued = self._queued, {}
        version = 0
        for brand_id, store_id, terminal_id in queued:
            store = self._current().store_ids.get((brand_id, store_id))
            if store is None:
                continue
            try:
                async with pool.acquire(timeout=5) as conn:
                    committed = await admin_store.create_terminal(
                        conn, actor=BIND_ACTOR, brand_id=brand_id, store_id=store, external_id=terminal_id
                    )
                version = committed.version
            except (AlreadyExists, NotFoundError):
                continue  # registered meanwhile (by an admin or another gateway): the registry will say where
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("terminal binding not recorded (%s); retrying", type(exc).__name__)
                self._queued[(brand_id, store_id, terminal_id)] = None
        if version:
            with contextlib.suppress(Exception):
                await notify.publish(redis, version)
        return len(queued) - len(self._queued)

    def forget_registered(self) -> None:
        """Drop pending bindings the registry now holds (they are the registry's to answer from now on)."""
        registered = self._current().terminal_stores
        for key in [k for k in self._pending if k in registered]:
            del self._pending[key]


async def register_event_streams(redis: RedisClient, registry: Registry) -> None:
    """Every brand's risk-event stream in the ledger writer's directory (rgw:outboxes). A separate call, not the
    redeem script's: on Redis Cluster the directory and a brand's risk tag are different slots."""
    streams = [risk_keys.events_key(brand_id) for brand_id in registry.brands]
    if streams:
        await redis.sadd(gateway_keys.OUTBOXES, *streams)


async def maintain(facts: RegistryRiskFacts, pool: asyncpg.Pool, redis: RedisClient, interval_s: float) -> None:
    """Forever (until cancelled): register bound terminals, and list every brand's event stream each round - a
    Redis that lost its data and was rebuilt must get the directory entries back (SADD of members present is a
    no-op)."""
    while True:
        try:
            await register_event_streams(redis, facts.registry())
            await facts.flush_binds(pool, redis)
            facts.forget_registered()
        except Exception as exc:  # the registry stale, Redis away: the next round tries again
            log.debug("risk upkeep deferred (%s)", type(exc).__name__)
        await asyncio.sleep(interval_s)
