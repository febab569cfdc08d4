"""What the inventory import and rotation tests share: a key ring, an environment for `rgw`, CSV files, and the
Redis and Postgres state of a SKU's secrets read back."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway.inventory import layout
from gateway.inventory.crypto import SecretRing, associated_data
from gateway.inventory.loader import expiry_ms, parse_secret_record
from gateway.inventory.model import Sku

KEYS = {"s1": bytes(range(32)), "s2": bytes(range(100, 132))}
DEDUP = bytes(range(200, 232))
HEADER = "sku,supplier,secret,cost,currency,expires_at"
LATER = (datetime.now(UTC) + timedelta(days=90)).replace(microsecond=0)


def ring(active: str = "s1", *only: str) -> SecretRing:
    keys = {k: v for k, v in KEYS.items() if not only or k in only}
    return SecretRing(keys, active, DEDUP)


def secret_env(active: str = "s1", *only: str) -> dict[str, str]:
    keys = {k: v for k, v in KEYS.items() if not only or k in only}
    return {"RGW_SECRET_KEYS": ",".join(f"{k}:{base64.b64encode(v).decode()}" for k, v in keys.items()),
            "RGW_SECRET_KEY_ID": active, "RGW_SECRET_DEDUP_KEY": base64.b64encode(DEDUP).decode()}  # fmt: skip


def csv_lines(rows: Iterable[str]) -> list[str]:
    return [HEADER + "\n", *(row + "\n" for row in rows)]


def write_csv(path: Path, rows: Iterable[str]) -> Path:
    path.write_text("".join(csv_lines(rows)))
    return path


def row(sku: str, secret: str, *, supplier: str = "sup-a", cost: int = 1500, currency: str = "CNY",
        expires: datetime = LATER) -> str:  # fmt: skip
    return f"{sku},{supplier},{secret},{cost},{currency},{expires.isoformat()}"


async def postgres_secrets(db: asyncpg.Connection, sku_id: int) -> dict[int, asyncpg.Record]:
    rows = await db.fetch("SELECT * FROM secrets WHERE sku_id = $1", sku_id)
    return {r["id"]: r for r in rows}


async def redis_secrets(redis: Redis, sku: Sku) -> dict[int, tuple[int, dict[str, str]]]:
    """Every secret in the SKU's secrets hashes: id -> (shard, record fields)."""
    found: dict[int, tuple[int, dict[str, str]]] = {}
    for shard in range(sku.shards):
        records: Any = await redis.hgetall(layout.secrets_key(sku.id, shard))
        found.update({int(i): (shard, parse_secret_record(r)) for i, r in records.items()})
    return found


async def assert_redis_matches_postgres(db: asyncpg.Connection, redis: Redis, sku: Sku, keys: SecretRing) -> int:
    """Every secret of the SKU in Redis exactly as the layout says, and nothing else; the count."""
    in_pg, in_redis = await postgres_secrets(db, sku.id), await redis_secrets(redis, sku)
    assert set(in_pg) == set(in_redis)
    for secret_id, r in in_pg.items():
        shard, fields = in_redis[secret_id]
        assert shard == r["shard"]
        expiry = expiry_ms(r["expires_at"])
        assert fields == {
            "supplier": r["supplier"], "cost": str(r["cost"]), "currency": r["currency"], "expiry_ms": str(expiry),
            "left": str(sku.reuse), "used": "0", "key_id": r["key_id"],
            "nonce_b64": base64.b64encode(r["nonce"]).decode(), "ct_b64": base64.b64encode(r["ciphertext"]).decode(),
        }  # fmt: skip
        assert await redis.zscore(layout.by_expiry_key(sku.id, shard), str(secret_id)) == expiry
        assert await redis.zscore(layout.by_cost_key(sku.id, shard), str(secret_id)) == r["cost"]
        assert await redis.zscore(layout.by_supplier_key(sku.id, shard, r["supplier"]), str(secret_id)) == expiry
        aad = associated_data(r["brand_id"], sku.id)
        nonce, ct = base64.b64decode(fields["nonce_b64"]), base64.b64decode(fields["ct_b64"])
        keys.decrypt(fields["key_id"], nonce, ct, aad)  # opens
    for shard in range(sku.shards):
        assert await redis.zcard(layout.by_expiry_key(sku.id, shard)) == sum(
            1 for s, _ in in_redis.values() if s == shard
        )
    return len(in_pg)


async def plaintexts(db: asyncpg.Connection, keys: SecretRing, sku_id: int) -> set[str]:
    """Every secret of the SKU, decrypted from Postgres."""
    return {
        keys.decrypt(r["key_id"], r["nonce"], r["ciphertext"],
                     associated_data(r["brand_id"], r["sku_id"]))
        for r in (await postgres_secrets(db, sku_id)).values()
    }  # fmt: skip
