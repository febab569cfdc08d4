"""The registry's versions: migrating an existing database, incremental loads, and the announcement on Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway import keys
from gateway.db import migrate as migrations
from gateway.tenancy import admin_store as admin
from gateway.tenancy import notify
from gateway.tenancy.loader import load_changes, load_registry
from gateway.tenancy.model import DEFAULT_BRAND_ID, Brand, Status
from tests.integration.registry_helpers import (
    ACTOR,
    Tenant,
    registry_version,
    two_tenants,
)


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(db: asyncpg.Connection) -> tuple[Tenant, Tenant]:
    return await two_tenants(db)


# ------------------------------------------------------------------------------------------------------ migration


async def test_campaigns_without_a_brand_belong_to_the_default_brand(db: asyncpg.Connection) -> None:
    brand_id = await db.fetchval(
        """INSERT INTO campaigns (name, valid_from, valid_until, uses_per_code, key_id)
           VALUES ('old', now(), now() + interval '1 day', 1, 'k2') RETURNING brand_id"""
    )
    assert brand_id == DEFAULT_BRAND_ID
    default = (await load_registry(db)).brand(DEFAULT_BRAND_ID)
    assert default == Brand(1, "default", "Default brand", Status.ACTIVE)


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(database_url: str) -> AsyncIterator[str]:
    admin_conn = await asyncpg.connect(database_url)
    await admin_conn.execute("DROP DATABASE IF EXISTS registry_migrate_test WITH (FORCE)")
    await admin_conn.execute("CREATE DATABASE registry_migrate_test")
    yield f"{database_url.rpartition('/')[0]}/registry_migrate_test"
    await admin_conn.execute("DROP DATABASE IF EXISTS registry_migrate_test WITH (FORCE)")
    await admin_conn.close()


async def test_migrating_keeps_existing_campaigns_under_the_default_brand(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text, checksum text)")
        for migration in migrations.available()[:2]:  # the schema as it was before the registry
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                migration.version, migration.name, migration.checksum,
            )  # fmt: skip
        await conn.execute(
            """INSERT INTO campaigns (name, valid_from, valid_until, uses_per_code, key_id)
               VALUES ('before brands', now(), now() + interval '1 day', 1, 'k2')"""
        )
        assert "0003_registry.sql" in await migrations.migrate(conn)
        rows = await conn.fetch("SELECT name, brand_id FROM campaigns")
        registry = await load_registry(conn)
        next_brand = await conn.fetchval(
            "INSERT INTO brands (slug, name, row_version) VALUES ('b', 'B', 2) RETURNING id"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("before brands", DEFAULT_BRAND_ID)]
    assert registry.version == 1 and registry.brand_by_slug("default") is not None
    assert next_brand == 2  # the identity starts past the default brand


async def test_a_terminal_cannot_belong_to_another_brand_than_its_store(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, globex = tenants
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO terminals (brand_id, store_id, external_id, row_version) VALUES ($1, $2, 'x', 99)",
            globex.brand.id, acme.store.id,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- loads


async def test_an_incremental_load_returns_only_what_changed(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, globex = tenants
    loaded = await load_registry(db)
    assert loaded.version == await registry_version(db)
    assert loaded.store_by_external(acme.brand.id, "store-1") == acme.store
    assert loaded.terminal_by_external(globex.store.id, "till-1") == globex.terminal

    disabled = await admin.set_store_status(
        db, actor=ACTOR, brand_id=acme.brand.id, store_id=acme.store.id, status=Status.DISABLED
    )
    added = await admin.create_terminal(
        db, actor=ACTOR, brand_id=globex.brand.id, store_id=globex.store.id, external_id="till-2"
    )
    changes = await load_changes(db, loaded.version)
    assert changes.version == added.version == loaded.version + 2 and not changes.full
    assert changes.stores == (disabled.value,) and changes.terminals == (added.value,)
    assert not changes.brands and not changes.clients and not changes.keys
    refreshed = loaded.apply(changes)
    assert refreshed == await load_registry(db)
    assert refreshed.store(acme.store.id) == disabled.value and loaded.store(acme.store.id) == acme.store
    assert len(await load_changes(db, refreshed.version)) == 0


async def test_a_database_behind_the_snapshot_gives_a_full_load(db: asyncpg.Connection) -> None:
    changes = await load_changes(db, 1_000)
    assert changes.full and changes.version == 1 and [b.slug for b in changes.brands] == ["default"]


# ----------------------------------------------------------------------------------------------------------- redis


async def _messages(pubsub: PubSub, count: int) -> list[str]:
    heard: list[str] = []
    async with asyncio.timeout(5):
        while len(heard) < count:  # get_message answers None for the (ignored) subscription confirmation
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                heard.append(message["data"])
    return heard


async def test_publish_only_raises_the_version_and_announces_it(redis: Redis) -> None:
    assert await notify.current_version(redis) is None
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.REGISTRY_CHANNEL)
    try:
        assert await notify.publish(redis, 5) == 5
        assert await notify.publish(redis, 3) == 5  # a late announcement of an older version
        assert await notify.current_version(redis) == 5
        heard = await _messages(pubsub, 2)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert heard == ["5", "5"]
    await redis.set(keys.REGISTRY_VERSION, "garbage")
    assert await notify.current_version(redis) is None
    assert await notify.publish(redis, 6) == 6


async def test_concurrent_changes_get_distinct_consecutive_versions(migrated: str, db: asyncpg.Connection) -> None:
    start = await registry_version(db)
    conns = [await asyncpg.connect(migrated) for _ in range(4)]
    try:
        results = await asyncio.gather(*(
            admin.create_brand(conn, actor=ACTOR, slug=f"brand-{i}", name=f"B{i}") for i, conn in enumerate(conns)
        ))  # fmt: skip
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(r.version for r in results) == list(range(start + 1, start + 5))
    assert len(await load_changes(db, start)) == 4
