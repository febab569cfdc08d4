"""Migrations: forward-only, idempotent, safe to run concurrently, and refuse edited history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from gateway.db import migrate as migrations


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(database_url: str) -> AsyncIterator[str]:
    """A database of its own, so these tests can start from an empty schema."""
    admin = await asyncpg.connect(database_url)
    await admin.execute("DROP DATABASE IF EXISTS migrate_test WITH (FORCE)")
    await admin.execute("CREATE DATABASE migrate_test")
    base, _, _ = database_url.rpartition("/")
    yield f"{base}/migrate_test"
    await admin.execute("DROP DATABASE IF EXISTS migrate_test WITH (FORCE)")
    await admin.close()


async def _run(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return await migrations.migrate(conn)
    finally:
        await conn.close()


async def test_migrate_twice_is_a_no_op(fresh_db: str) -> None:
    first = await _run(fresh_db)
    assert first == [m.name for m in migrations.available()] and first
    assert await _run(fresh_db) == []
    conn = await asyncpg.connect(fresh_db)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    finally:
        await conn.close()
    assert {"campaigns", "issued_codes", "schema_migrations"} <= tables


async def test_concurrent_migrations_apply_each_file_once(fresh_db: str) -> None:
    results = await asyncio.gather(*(_run(fresh_db) for _ in range(4)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in migrations.available())


async def test_an_edited_applied_migration_is_refused(fresh_db: str) -> None:
    await _run(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(migrations.MigrationError, match="changed after it was applied"):
            await migrations.migrate(conn)
    finally:
        await conn.close()


async def test_no_plaintext_column_for_codes(migrated: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        columns = {r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'issued_codes'"
        )}  # fmt: skip
    finally:
        await conn.close()
    assert "code_ref" in columns and not {"code", "plaintext"} & columns
