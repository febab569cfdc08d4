"""Shared by the registry tests: two tenants (brand, store, terminal) and readings of the registry's state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.tenancy import admin_store as admin
from gateway.tenancy.model import Brand, Store, Terminal

ACTOR = "cl_testactor0"


@dataclass
class Tenant:
    brand: Brand
    store: Store
    terminal: Terminal


async def make_tenant(db: asyncpg.Connection, slug: str) -> Tenant:
    brand = (await admin.create_brand(db, actor=ACTOR, slug=slug, name=slug.title())).value
    store = (
        await admin.create_store(
            db, actor=ACTOR, brand_id=brand.id, external_id="store-1", name="Main street",
            latitude=48.8566, longitude=2.3522, time_zone="Europe/Paris",
        )
    ).value  # fmt: skip
    terminal = await admin.create_terminal(db, actor=ACTOR, brand_id=brand.id, store_id=store.id, external_id="till-1")
    return Tenant(brand, store, terminal.value)


async def two_tenants(db: asyncpg.Connection) -> tuple[Tenant, Tenant]:
    """Brands acme and globex, each with a store and a terminal."""
    return await make_tenant(db, "acme"), await make_tenant(db, "globex")


async def registry_version(db: asyncpg.Connection) -> int:
    version: int = await db.fetchval("SELECT version FROM registry_version")
    return version


async def audit_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM audit_log")
    return count


async def registry_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything a refused change must leave as it was."""
    tables = (
        "brands", "stores", "terminals", "api_clients", "api_keys", "risk_policies", "audit_log", "registry_version"
    )  # fmt: skip
    state = []
    for table in tables:
        state.append([tuple(r) for r in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")])
    return tuple(state)
