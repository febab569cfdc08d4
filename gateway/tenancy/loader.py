"""Reading the registry from Postgres: everything, or only what changed since a version the caller holds.

Incremental refresh of a snapshot: `registry.apply(await load_changes(conn, registry.version))`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg

from gateway.tenancy.model import ApiKey, Brand, Client, RiskPolicyRow, Role, Status, Store, Terminal
from gateway.tenancy.snapshot import Registry, RegistryChanges

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Table(Generic[T]):
    """How one registry table maps to its domain object (column names are constants, never input)."""

    name: str
    entity: str
    columns: str
    row: Callable[[asyncpg.Record], T]


def _brand(r: asyncpg.Record) -> Brand:
    return Brand(r["id"], r["slug"], r["name"], Status(r["status"]), r["imports_codes"])


def _store(r: asyncpg.Record) -> Store:
    return Store(
        r["id"], r["brand_id"], r["external_id"], r["name"], r["latitude"], r["longitude"], r["time_zone"],
        Status(r["status"]), r["radius_m"],
    )  # fmt: skip


def _terminal(r: asyncpg.Record) -> Terminal:
    return Terminal(
        r["id"], r["brand_id"], r["store_id"], r["external_id"], Status(r["status"]), r["first_seen_at"],
        r["last_seen_at"],
    )  # fmt: skip


def _client(r: asyncpg.Record) -> Client:
    return Client(
        r["id"], r["brand_id"], Role(r["role"]), r["store_id"], r["terminal_id"], r["label"], r["created_at"],
        r["revoked_at"],
    )  # fmt: skip


def _key(r: asyncpg.Record) -> ApiKey:
    return ApiKey(
        r["key_id"], r["client_id"], bytes(r["secret_hash"]), r["created_at"], r["expires_at"], r["revoked_at"]
    )


def _risk_policy(r: asyncpg.Record) -> RiskPolicyRow:
    # asyncpg hands jsonb over as its text unless a codec is set; decoding here keeps connections codec-free.
    return RiskPolicyRow(r["brand_id"], r["campaign_id"], json.loads(r["document"]))


BRANDS = Table("brands", "brand", "id, slug, name, status, imports_codes", _brand)
STORES = Table(
    "stores", "store", "id, brand_id, external_id, name, latitude, longitude, time_zone, status, radius_m", _store
)  # fmt: skip
TERMINALS = Table(
    "terminals", "terminal", "id, brand_id, store_id, external_id, status, first_seen_at, last_seen_at", _terminal
)  # fmt: skip
CLIENTS = Table(
    "api_clients", "client", "id, brand_id, role, store_id, terminal_id, label, created_at, revoked_at", _client
)  # fmt: skip
KEYS = Table("api_keys", "key", "key_id, client_id, secret_hash, created_at, expires_at, revoked_at", _key)
RISK_POLICIES = Table("risk_policies", "risk policy", "brand_id, campaign_id, document", _risk_policy)


async def _changed(conn: asyncpg.Connection, table: Table[T], since_version: int) -> tuple[T, ...]:
    query = f"SELECT {table.columns} FROM {table.name} WHERE row_version > $1"  # noqa: S608 - constants only
    return tuple(table.row(r) for r in await conn.fetch(query, since_version))


async def load_changes(conn: asyncpg.Connection, since_version: int) -> RegistryChanges:
    """Every registry row stamped after `since_version` (0: every row), and the current registry version.

    One repeatable-read transaction, so all tables and the version come from one snapshot: writers bump the
    version first and commit in version order (migration 0003), so this sees every change up to that version.
    A database behind `since_version` (restored from a backup) gives a full load that replaces the snapshot.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version: int = await conn.fetchval("SELECT version FROM registry_version")
        if version < since_version:
            since_version = 0
        return RegistryChanges(
            version=version,
            full=since_version == 0,
            brands=await _changed(conn, BRANDS, since_version),
            stores=await _changed(conn, STORES, since_version),
            terminals=await _changed(conn, TERMINALS, since_version),
            clients=await _changed(conn, CLIENTS, since_version),
            keys=await _changed(conn, KEYS, since_version),
            risk_policies=await _changed(conn, RISK_POLICIES, since_version),
        )


async def load_registry(conn: asyncpg.Connection) -> Registry:
    """The whole registry, as one consistent snapshot."""
    return Registry.empty().apply(await load_changes(conn, 0))
