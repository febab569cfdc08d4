"""Administration of the registry: every change is ONE Postgres transaction that validates its input, bumps
`registry_version`, stamps that version into the rows it writes and appends one `audit_log` row.

Bad input raises InvalidRequest naming every bad field, before anything is written (nothing changes: the
transaction rolls back). A duplicate slug or external id is AlreadyExists. An unknown id is NotFoundError - and so
is an id of another brand than the `brand_id` a scoped caller acts for, with the same message, so that brands
cannot learn about each other (`brand_id=None`: the platform, every brand).

After a change commits, announce its version (`notify.publish`) so every gateway process refreshes. The shape of a
change (transaction, version, audit row) is admin_tx.py's; risk policies are admin_risk.py's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import asyncpg

from gateway.tenancy import api_keys
from gateway.tenancy.admin_rules import (
    EXTERNAL_ID_RULE,
    NAME_RULE,
    SLUG_RULE,
    STATUS_RULE,
    check,
    client_rules,
    is_env,
    is_external_id,
    is_name,
    is_slug,
    is_status,
    raise_if,
    store_rules,
)
from gateway.tenancy.admin_tx import Committed as Committed  # re-exported: callers name admin_store.Committed
from gateway.tenancy.admin_tx import Entity, audit, change, get_row, list_rows, state
from gateway.tenancy.loader import BRANDS, CLIENTS, KEYS, STORES, TERMINALS, Table
from gateway.tenancy.model import DEFAULT_RADIUS_M, ApiKey, AuditEntry, Brand, Client, Store, Terminal
from gateway.validation import FieldViolation

E = TypeVar("E", bound=Entity)

MAX_AUDIT_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key: its plaintext exists only here, to be shown once. `previous_keys_expire_at`: when the keys
    it replaces stop working (rotation only)."""

    client: Client
    key_id: str
    plaintext: str = field(repr=False)
    previous_keys_expire_at: datetime | None = None


# ---------------------------------------------------------------------------------------------------------- brands


_INSERT_BRAND = f"INSERT INTO brands (slug, name, row_version) VALUES ($1, $2, $3) RETURNING {BRANDS.columns}"  # noqa: S608


async def create_brand(conn: asyncpg.Connection, *, actor: str, slug: str, name: str) -> Committed[Brand]:
    """A new, active brand (platform only)."""
    raise_if(
        check(is_slug(slug), "slug", SLUG_RULE),
        check(is_name(name), "name", NAME_RULE),
    )
    async with change(conn, f"a brand with slug {slug!r} already exists") as version:
        brand = BRANDS.row(await conn.fetchrow(_INSERT_BRAND, slug, name, version))
        await audit(conn, version, actor, "brand.create", brand, None, state(brand))
    return Committed(brand, version)


async def list_brands(conn: asyncpg.Connection, *, brand_id: int | None = None) -> list[Brand]:
    """Every brand (platform), or only `brand_id`'s own."""
    return await list_rows(conn, BRANDS, "$1::bigint IS NULL OR id = $1", brand_id)


async def set_brand_status(conn: asyncpg.Connection, *, actor: str, brand_id: int, status: str) -> Committed[Brand]:
    """Enable or disable a brand: a disabled brand's clients are refused (platform only)."""
    return await _set_status(conn, BRANDS, actor=actor, brand_id=None, entity_id=brand_id, status=status)


async def _set_status(
    conn: asyncpg.Connection, table: Table[E], *, actor: str, brand_id: int | None, entity_id: int, status: str
) -> Committed[E]:
    raise_if(check(is_status(status), "status", STATUS_RULE))
    update = f"UPDATE {table.name} SET status = $2, row_version = $3 WHERE id = $1 RETURNING {table.columns}"  # noqa: S608
    async with change(conn) as version:
        before = await get_row(conn, table, entity_id, brand_id)
        after = table.row(await conn.fetchrow(update, entity_id, status, version))
        await audit(conn, version, actor, f"{table.entity}.set_status", after, state(before), state(after))
    return Committed(after, version)


# ---------------------------------------------------------------------------------------------------------- stores

_INSERT_STORE = f"""
INSERT INTO stores (brand_id, external_id, name, latitude, longitude, time_zone, radius_m, row_version)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {STORES.columns}"""  # noqa: S608 - constants only
# COALESCE: a parameter left NULL keeps the column as it is.
_UPDATE_STORE = f"""
UPDATE stores SET name = COALESCE($2, name), latitude = COALESCE($3, latitude), longitude = COALESCE($4, longitude),
                  time_zone = COALESCE($5, time_zone), radius_m = COALESCE($6, radius_m), row_version = $7
WHERE id = $1 RETURNING {STORES.columns}"""  # noqa: S608 - constants only


def _number(value: float | None) -> float | None:
    return None if value is None else float(value)


async def create_store(
    conn: asyncpg.Connection,
    *,
    actor: str,
    brand_id: int,
    external_id: str,
    name: str,
    latitude: float,
    longitude: float,
    time_zone: str,
    radius_m: float = DEFAULT_RADIUS_M,
) -> Committed[Store]:
    """A new, active store of the brand, with its location, geofence radius (metres) and IANA time zone."""
    raise_if(store_rules({
        "external_id": external_id, "name": name, "latitude": latitude, "longitude": longitude,
        "time_zone": time_zone, "radius_m": radius_m,
    }))  # fmt: skip
    async with change(conn, f"the brand already has a store {external_id!r}") as version:
        await get_row(conn, BRANDS, brand_id, brand_id)
        row = await conn.fetchrow(
            _INSERT_STORE, brand_id, external_id, name, float(latitude), float(longitude), time_zone,
            float(radius_m), version,
        )  # fmt: skip
        store = STORES.row(row)
        await audit(conn, version, actor, "store.create", store, None, state(store))
    return Committed(store, version)


async def update_store(
    conn: asyncpg.Connection,
    *,
    actor: str,
    brand_id: int | None,
    store_id: int,
    name: str | None = None,
    latitude: float | None = None,
    longitude: float | None = None,
    time_zone: str | None = None,
    radius_m: float | None = None,
) -> Committed[Store]:
    """Change one of the brand's stores: the fields given (None: unchanged). Its external id is its name in every
    request, so it never changes."""
    raise_if(store_rules({
        "name": name, "latitude": latitude, "longitude": longitude, "time_zone": time_zone, "radius_m": radius_m
    }))  # fmt: skip
    async with change(conn) as version:
        before = await get_row(conn, STORES, store_id, brand_id)
        row = await conn.fetchrow(
            _UPDATE_STORE, store_id, name, _number(latitude), _number(longitude), time_zone, _number(radius_m),
            version,
        )  # fmt: skip
        after = STORES.row(row)
        await audit(conn, version, actor, "store.update", after, state(before), state(after))
    return Committed(after, version)


async def list_stores(conn: asyncpg.Connection, *, brand_id: int | None) -> list[Store]:
    """The brand's stores (None: every brand's)."""
    return await list_rows(conn, STORES, "$1::bigint IS NULL OR brand_id = $1", brand_id)


async def set_store_status(
    conn: asyncpg.Connection, *, actor: str, brand_id: int | None, store_id: int, status: str
) -> Committed[Store]:
    """Enable or disable one of the brand's stores."""
    return await _set_status(conn, STORES, actor=actor, brand_id=brand_id, entity_id=store_id, status=status)


# ------------------------------------------------------------------------------------------------------- terminals


async def create_terminal(
    conn: asyncpg.Connection, *, actor: str, brand_id: int, store_id: int, external_id: str
) -> Committed[Terminal]:
    """A new, active terminal of one of the brand's stores."""
    raise_if(check(is_external_id(external_id), "external_id", EXTERNAL_ID_RULE))
    async with change(conn, f"the store already has a terminal {external_id!r}") as version:
        await get_row(conn, STORES, store_id, brand_id)
        row = await conn.fetchrow(
            f"""INSERT INTO terminals (brand_id, store_id, external_id, row_version)
                VALUES ($1, $2, $3, $4) RETURNING {TERMINALS.columns}""",  # noqa: S608 - constants only
            brand_id, store_id, external_id, version,
        )  # fmt: skip
        terminal = TERMINALS.row(row)
        await audit(conn, version, actor, "terminal.create", terminal, None, state(terminal))
    return Committed(terminal, version)


async def list_terminals(
    conn: asyncpg.Connection, *, brand_id: int | None, store_id: int | None = None
) -> list[Terminal]:
    """The brand's terminals (None: every brand's), optionally of one store."""
    where = "($1::bigint IS NULL OR brand_id = $1) AND ($2::bigint IS NULL OR store_id = $2)"
    return await list_rows(conn, TERMINALS, where, brand_id, store_id)


async def set_terminal_status(
    conn: asyncpg.Connection, *, actor: str, brand_id: int | None, terminal_id: int, status: str
) -> Committed[Terminal]:
    """Enable or disable one of the brand's terminals."""
    return await _set_status(conn, TERMINALS, actor=actor, brand_id=brand_id, entity_id=terminal_id, status=status)


# --------------------------------------------------------------------------------------------------------- clients

_INSERT_CLIENT = f"""
INSERT INTO api_clients (id, brand_id, role, store_id, terminal_id, label, row_version)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {CLIENTS.columns}"""  # noqa: S608 - constants only
_INSERT_KEY = f"""
INSERT INTO api_keys (key_id, client_id, secret_hash, row_version)
VALUES ($1, $2, $3, $4) RETURNING {KEYS.columns}"""  # noqa: S608 - constants only
_CLIENT_KEYS = f"SELECT {KEYS.columns} FROM api_keys WHERE client_id = $1 ORDER BY created_at, key_id"  # noqa: S608
_REVOKE_CLIENT = f"""
UPDATE api_clients SET revoked_at = COALESCE(revoked_at, now()), row_version = $2
WHERE id = $1 RETURNING {CLIENTS.columns}"""  # noqa: S608 - constants only
_REVOKE_KEYS = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), row_version = $2 WHERE client_id = $1"
# Rotation never lengthens a key's life: one already expiring sooner keeps its expiry.
_EXPIRE_KEYS = """
UPDATE api_keys SET expires_at = $2, row_version = $3
WHERE client_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)"""


def _new_client_id() -> str:
    # 50 random bits: unguessable enough for an identifier that is not a secret, short enough to read out.
    return "cl_" + "".join(secrets.choice(api_keys.ALPHABET) for _ in range(10))


async def _binding(
    conn: asyncpg.Connection, brand_id: int | None, store_id: int | None, terminal_id: int | None
) -> tuple[int | None, list[FieldViolation]]:
    """The store a binding names (a terminal's own store when only the terminal is given), and its violations.
    Another brand's store or terminal is described exactly like a missing one; the brand must exist."""
    if brand_id is None:  # a platform client: _client_rules refuses any binding
        return store_id, []
    await get_row(conn, BRANDS, brand_id, brand_id)
    if terminal_id is not None:
        query = "SELECT store_id FROM terminals WHERE id = $1 AND brand_id = $2"
        terminal_store: int | None = await conn.fetchval(query, terminal_id, brand_id)
        if terminal_store is None:
            return store_id, [FieldViolation("terminal_id", "names no terminal of this brand")]
        ok = store_id in (None, terminal_store)
        return terminal_store, check(ok, "store_id", "must be the terminal's store, or empty")
    if store_id is not None:
        found = await conn.fetchval("SELECT 1 FROM stores WHERE id = $1 AND brand_id = $2", store_id, brand_id)
        return store_id, check(found is not None, "store_id", "names no store of this brand")
    return None, []


async def _insert_key(conn: asyncpg.Connection, client_id: str, env: str, version: int) -> tuple[ApiKey, str]:
    parsed, plaintext = api_keys.generate(env)
    secret = api_keys.secret_hash(parsed.key_id, parsed.secret)
    return KEYS.row(await conn.fetchrow(_INSERT_KEY, parsed.key_id, client_id, secret, version)), plaintext


async def create_client(
    conn: asyncpg.Connection,
    *,
    actor: str,
    brand_id: int | None,
    role: str,
    label: str,
    store_id: int | None = None,
    terminal_id: int | None = None,
    env: str,
) -> Committed[IssuedKey]:
    """A new API client and its first key (the plaintext is in the result, and nowhere else). A platform client
    has no brand; a pos or internal client may be bound to one store or terminal of its brand."""
    rules = [
        *client_rules(brand_id, role, store_id, terminal_id),
        *check(is_name(label), "label", NAME_RULE),
        *check(is_env(env), "env", f"must be one of {', '.join(api_keys.ENVIRONMENTS)}"),
    ]
    async with change(conn) as version:
        store_id, binding = await _binding(conn, brand_id, store_id, terminal_id)
        raise_if(rules, binding)
        row = await conn.fetchrow(
            _INSERT_CLIENT, _new_client_id(), brand_id, role, store_id, terminal_id, label, version
        )
        client = CLIENTS.row(row)
        key, plaintext = await _insert_key(conn, client.id, env, version)
        await audit(conn, version, actor, "client.create", client, None, state(client, [key]))
    return Committed(IssuedKey(client, key.key_id, plaintext), version)


async def list_clients(conn: asyncpg.Connection, *, brand_id: int | None) -> list[Client]:
    """The brand's clients (None: every client, platform clients included)."""
    return await list_rows(conn, CLIENTS, "$1::bigint IS NULL OR brand_id = $1", brand_id)


async def _keys_of(conn: asyncpg.Connection, client_id: str) -> list[ApiKey]:
    return [KEYS.row(r) for r in await conn.fetch(_CLIENT_KEYS, client_id)]


async def revoke_client(
    conn: asyncpg.Connection, *, actor: str, brand_id: int | None, client_id: str
) -> Committed[Client]:
    """Revoke a client and every key it has, at once (revoking twice keeps the first time)."""
    async with change(conn) as version:
        before = await get_row(conn, CLIENTS, client_id, brand_id)
        before_json = state(before, await _keys_of(conn, client_id))
        after = CLIENTS.row(await conn.fetchrow(_REVOKE_CLIENT, client_id, version))
        await conn.execute(_REVOKE_KEYS, client_id, version)
        after_json = state(after, await _keys_of(conn, client_id))
        await audit(conn, version, actor, "client.revoke", after, before_json, after_json)
    return Committed(after, version)


async def rotate_client_key(
    conn: asyncpg.Connection, *, actor: str, brand_id: int | None, client_id: str, grace: timedelta, env: str
) -> Committed[IssuedKey]:
    """A new key for the client; its current keys keep working until now + grace (never longer than they already
    would), then are refused. The plaintext of the new key is in the result, and nowhere else."""
    raise_if(
        check(grace >= timedelta(0), "grace", "must not be negative"),
        check(is_env(env), "env", f"must be one of {', '.join(api_keys.ENVIRONMENTS)}"),
    )
    async with change(conn) as version:
        client = await get_row(conn, CLIENTS, client_id, brand_id)
        raise_if(check(client.revoked_at is None, "client_id", "is revoked: create a new client instead"))
        before_json = state(client, await _keys_of(conn, client_id))
        expires_at: datetime = await conn.fetchval("SELECT now() + $1::interval", grace)
        await conn.execute(_EXPIRE_KEYS, client_id, expires_at, version)
        key, plaintext = await _insert_key(conn, client_id, env, version)
        after_json = state(client, await _keys_of(conn, client_id))
        await audit(conn, version, actor, "client.rotate_key", client, before_json, after_json)
    return Committed(IssuedKey(client, key.key_id, plaintext, expires_at), version)


# ----------------------------------------------------------------------------------------------------------- audit


def _audit_entry(r: asyncpg.Record) -> AuditEntry:
    before = json.loads(r["before"]) if r["before"] is not None else None
    after = json.loads(r["after"]) if r["after"] is not None else None
    return AuditEntry(
        r["id"], r["at"], r["actor"], r["brand_id"], r["action"], r["entity"], r["entity_id"], before, after,
        r["version"],
    )  # fmt: skip


async def list_audit(conn: asyncpg.Connection, *, brand_id: int | None, limit: int = 100) -> list[AuditEntry]:
    """The newest changes first: the brand's (None: every change, platform ones included)."""
    raise_if(check(0 < limit <= MAX_AUDIT_LIMIT, "limit", f"must be from 1 to {MAX_AUDIT_LIMIT}"))
    rows = await conn.fetch(
        """SELECT id, at, actor, brand_id, action, entity, entity_id, before, after, version FROM audit_log
           WHERE $1::bigint IS NULL OR brand_id = $1 ORDER BY id DESC LIMIT $2""",
        brand_id, limit,
    )  # fmt: skip
    return [_audit_entry(r) for r in rows]
