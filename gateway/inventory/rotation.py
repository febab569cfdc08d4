"""`rgw keys rotate`: every secret re-encrypted under the active key (RGW_SECRET_KEY_ID), online.

Postgres first, in chunks of CHUNK secrets, each chunk one transaction (rows locked FOR UPDATE SKIP LOCKED, so an
import or a second rotation is never waited on): decrypted under the old key, sealed again under the active one
(a new nonce, the same associated data), written back. After each commit the same secrets' records in Redis
are swapped by lua/inventory_rekey.lua: a compare-and-set on the old key id and nonce that changes only the three
crypto fields - a record a dispense or a hold changed meanwhile keeps its counters, and a record already rotated
or gone is left alone. Then a sweep of every SKU shard's secrets hash catches the records a rotation killed
between its commit and its Redis step left behind (and secrets loaded from a pre-rotation read), setting them
to what Postgres holds. So a rotation can be rerun at any time; once it reports nothing left under another key,
the old keys can be removed from RGW_SECRET_KEYS.
"""

from __future__ import annotations

import base64
import logging
from collections import defaultdict
from dataclasses import dataclass

import asyncpg
from redis import exceptions as redis_errors

from gateway.inventory import layout
from gateway.inventory.crypto import SecretRing, associated_data
from gateway.inventory.loader import parse_secret_record
from gateway.inventory.model import Sku, list_skus
from gateway.redis_client import RedisClient, evalsha_many
from gateway.script_calls import load_lua

log = logging.getLogger("rgw.inventory")

CHUNK = 1_000
_SCAN = 1_000
_PICK = """SELECT id, brand_id, sku_id, shard, key_id, nonce, ciphertext, dedup_ref FROM secrets
           WHERE key_id <> $1 AND ($2::bigint IS NULL OR brand_id = $2) AND id > $3
           ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED"""
_WRITE = """UPDATE secrets s SET key_id = $1, nonce = v.nonce, ciphertext = v.ciphertext
            FROM unnest($2::bigint[], $3::bytea[], $4::bytea[]) AS v(id, nonce, ciphertext) WHERE s.id = v.id"""
_SEALED = "SELECT id, key_id, nonce, ciphertext FROM secrets WHERE id = ANY($1::bigint[])"
_LEFT = "SELECT count(*) FROM secrets WHERE key_id <> $1 AND ($2::bigint IS NULL OR brand_id = $2)"


@dataclass(frozen=True, slots=True)
class Rotated:
    """What a rotation did: secrets re-encrypted in Postgres, Redis records swapped, and secrets still under
    another key afterwards (0 once done; more: locked by a concurrent run, rerun)."""

    reencrypted: int
    redis_records: int
    left: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _Rekey:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._sha = ""

    async def run(self, calls: dict[tuple[int, int], list[str]]) -> int:
        if not calls:
            return 0
        if not self._sha:
            self._sha = await self._redis.script_load(load_lua("inventory_rekey.lua"))
        try:
            return await self._pipelined(calls)
        except redis_errors.NoScriptError:
            self._sha = await self._redis.script_load(load_lua("inventory_rekey.lua"))
            return await self._pipelined(calls)

    async def _pipelined(self, calls: dict[tuple[int, int], list[str]]) -> int:
        script_calls = [([layout.secrets_key(sku_id, shard)], args) for (sku_id, shard), args in calls.items()]
        replies = await evalsha_many(self._redis, self._sha, script_calls)
        return sum(int(r) for r in replies)


async def rotate(
    conn: asyncpg.Connection, redis: RedisClient, ring: SecretRing, *, brand_id: int | None = None, chunk: int = CHUNK
) -> Rotated:
    """Re-encrypt every secret (of one brand, or all) under `ring.active_id`; see the module's docstring."""
    rekey = _Rekey(redis)
    active, after, reencrypted, swapped = ring.active_id, 0, 0, 0
    while True:
        calls: dict[tuple[int, int], list[str]] = defaultdict(list)
        async with conn.transaction():
            rows = await conn.fetch(_PICK, active, brand_id, after, chunk)
            if not rows:
                break
            ids, nonces, texts = [], [], []
            for row in rows:
                aad = associated_data(row["brand_id"], row["sku_id"])
                sealed = ring.reencrypt(row["key_id"], row["nonce"], row["ciphertext"], aad)
                ids.append(row["id"])
                nonces.append(sealed.nonce)
                texts.append(sealed.ciphertext)
                calls[(row["sku_id"], row["shard"])] += [
                    str(row["id"]), row["key_id"], _b64(row["nonce"]), active, _b64(sealed.nonce),
                    _b64(sealed.ciphertext),
                ]  # fmt: skip
            await conn.execute(_WRITE, active, ids, nonces, texts)
        after = rows[-1]["id"]
        reencrypted += len(rows)
        swapped += await rekey.run(calls)
        log.info("key rotation: %d secrets re-encrypted under key %r so far", reencrypted, active)
    swapped += await _sweep(conn, redis, rekey, active, brand_id)
    left = int(await conn.fetchval(_LEFT, active, brand_id))
    return Rotated(reencrypted, swapped, left)


async def _skus(conn: asyncpg.Connection, brand_id: int | None) -> list[Sku]:
    found: list[Sku] = []
    after = 0
    while page := await list_skus(conn, brand_id, after, 1000):
        found += page
        after = page[-1].id
    return found


async def _sweep(conn: asyncpg.Connection, redis: RedisClient, rekey: _Rekey, active: str, brand_id: int | None) -> int:
    """Swap every Redis record still under another key than `active` to what Postgres holds."""
    swapped = 0
    for sku in await _skus(conn, brand_id):
        for shard in range(sku.shards):
            stale: dict[int, dict[str, str]] = {}
            async for secret_id, record in redis.hscan_iter(layout.secrets_key(sku.id, shard), count=_SCAN):
                fields = parse_secret_record(str(record))
                if fields["key_id"] != active:
                    stale[int(secret_id)] = fields
            if not stale:
                continue
            args: list[str] = []
            for row in await conn.fetch(_SEALED, list(stale)):
                was = stale[row["id"]]
                if row["key_id"] == active:
                    args += [str(row["id"]), was["key_id"], was["nonce_b64"], active, _b64(row["nonce"]),
                             _b64(row["ciphertext"])]  # fmt: skip
            swapped += await rekey.run({(sku.id, shard): args} if args else {})
    return swapped
