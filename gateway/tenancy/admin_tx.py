"""The shape of every registry administration change: ONE Postgres transaction that bumps `registry_version`,
stamps that version into the rows it writes and appends one `audit_log` row (migration 0003). Shared by
admin_store.py (brands, stores, terminals, clients) and admin_risk.py (risk policies)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg

from gateway.tenancy.loader import BRANDS, Table
from gateway.tenancy.model import AlreadyExists, ApiKey, Brand, Client, NotFoundError, Store, Terminal

T = TypeVar("T")
Entity = Brand | Store | Terminal | Client

_BUMP = "UPDATE registry_version SET version = version + 1 RETURNING version"
_AUDIT = """INSERT INTO audit_log (actor, brand_id, action, entity, entity_id, before, after, version)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)"""
# An API key in the audit log: listed field by field, so that the secret's hash can never reach it.
_AUDITED_KEY_FIELDS = ("key_id", "created_at", "expires_at", "revoked_at")


@dataclass(frozen=True, slots=True)
class Committed(Generic[T]):
    """What a committed change wrote, and the registry version it produced (to announce with notify.publish)."""

    value: T
    version: int


@asynccontextmanager
async def change(conn: asyncpg.Connection, duplicate: str = "already exists") -> AsyncIterator[int]:
    """One administration transaction, yielding the registry version it produces. Bumping the version first takes
    the version row's lock: changes serialise and commit in version order (what incremental loads rely on)."""
    try:
        async with conn.transaction():
            yield await conn.fetchval(_BUMP)
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(duplicate) from None


def json_default(value: object) -> str:
    """json.dumps' fallback: times as ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _key_state(key: ApiKey) -> dict[str, Any]:
    return {name: getattr(key, name) for name in _AUDITED_KEY_FIELDS}


def state(entity: Entity, keys: Sequence[ApiKey] | None = None) -> str:
    """An entity as audit JSON (a client's with its keys' ids and expiries, never a hash)."""
    data = asdict(entity)
    if keys is not None:
        data["keys"] = [_key_state(key) for key in keys]
    return json.dumps(data, default=json_default)


async def audit_row(
    conn: asyncpg.Connection,
    version: int,
    *,
    actor: str,
    brand_id: int | None,
    action: str,
    entity_id: str,
    before: str | None,
    after: str,
) -> None:
    """Append one audit row; the entity kind is the action's first part (`store.create` -> store)."""
    kind = action.partition(".")[0]
    await conn.execute(_AUDIT, actor, brand_id, action, kind, entity_id, before, after, version)


async def audit(
    conn: asyncpg.Connection, version: int, actor: str, action: str, entity: Entity, before: str | None, after: str
) -> None:
    """Append the audit row of a change to `entity` (whose brand and id it records); before/after are JSON."""
    brand_id = entity.id if isinstance(entity, Brand) else entity.brand_id
    await audit_row(
        conn, version, actor=actor, brand_id=brand_id, action=action, entity_id=str(entity.id), before=before,
        after=after,
    )  # fmt: skip


async def get_row(conn: asyncpg.Connection, table: Table[T], entity_id: object, brand_id: int | None) -> T:
    """A row by id, locked for the change; NotFoundError when it is missing or not of `brand_id` (if given)."""
    scope = "id" if table is BRANDS else "brand_id"
    query = f"""SELECT {table.columns} FROM {table.name}
                WHERE id = $1 AND ($2::bigint IS NULL OR {scope} = $2) FOR UPDATE"""  # noqa: S608 - constants only
    row = await conn.fetchrow(query, entity_id, brand_id)
    if row is None:
        raise NotFoundError(f"no such {table.entity}")
    return table.row(row)


async def list_rows(conn: asyncpg.Connection, table: Table[T], where: str, *args: object) -> list[T]:
    """Rows matching `where` (a constant condition over $1.. args), by id."""
    query = f"SELECT {table.columns} FROM {table.name} WHERE {where} ORDER BY id"  # noqa: S608 - constants only
    return [table.row(r) for r in await conn.fetch(query, *args)]
