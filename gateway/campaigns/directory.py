"""A brand's directory of imported codes: a code a brand supplied carries no route in its text, so its entry
dir_ref = HMAC(key, "dir" | brand | code) (gateway/coderefs.py) says which campaign shard holds it - in Postgres
(`code_directory`, the system of record) and in Redis (rgw:{d<brand>}:dir:<bucket>, field bucket_field(dir_ref),
value "<campaign>.<shard>"; written by the loader after the codes themselves, read by `find_route`).

Importing also sets the brand's `imports_codes` flag through the registry (a versioned change every gateway
learns), so only the requests of brands with imports pay the directory's extra round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from gateway import keys
from gateway.coderefs import KeyRing
from gateway.codes import Route
from gateway.redis_client import RedisClient
from gateway.tenancy import notify
from gateway.tenancy.admin_tx import audit_row, change

_LOOKUP_CHUNK = 10_000
_EXISTING = "SELECT dir_ref FROM code_directory WHERE brand_id = $1 AND dir_ref = ANY($2::bytea[])"
_FLAG = "SELECT imports_codes FROM brands WHERE id = $1"
_SET_FLAG = "UPDATE brands SET imports_codes = true, row_version = $2 WHERE id = $1"
DIRECTORY_COLUMNS = ("brand_id", "dir_ref", "key_id", "campaign_id", "shard", "code_ref")


@dataclass(frozen=True, slots=True)
class Entry:
    """One imported code's directory row."""

    brand_id: int
    dir_ref: bytes
    key_id: str
    campaign_id: int
    shard: int
    code_ref: bytes

    def record(self) -> tuple[int, bytes, str, int, int, bytes]:
        return self.brand_id, self.dir_ref, self.key_id, self.campaign_id, self.shard, self.code_ref


async def find_route(redis: RedisClient, keyring: KeyRing, brand_id: int, normalised_code: str) -> Route | None:
    """The route of the brand's imported code (normalised, see codes.normalise_imported), or None: one HGET per
    key of the keyring, pipelined in one round trip (an import hashes with its campaign's key, which may no longer
    be the active one). The request path calls it through gateway/campaigns/lookup.py."""
    refs = keyring.dir_candidates(brand_id, normalised_code)
    async with redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.hget(keys.directory_key(brand_id, ref.ref), keys.bucket_field(ref.ref))
        found: list[str | bytes | None] = await pipe.execute()
    for value in found:
        if value:
            text = value.decode() if isinstance(value, bytes) else value
            campaign, _, shard = text.partition(".")
            return Route(int(campaign), int(shard))
    return None


async def existing(conn: asyncpg.Connection, keyring: KeyRing, brand_id: int, codes: Sequence[str]) -> set[int]:
    """The positions in `codes` (normalised) of those the brand's directory already has, under any key."""
    by_ref: dict[bytes, int] = {}
    for position, code in enumerate(codes):
        for ref in keyring.dir_candidates(brand_id, code):
            by_ref[bytes.fromhex(ref.ref)] = position
    found: set[int] = set()
    refs = list(by_ref)
    for start in range(0, len(refs), _LOOKUP_CHUNK):
        rows = await conn.fetch(_EXISTING, brand_id, refs[start : start + _LOOKUP_CHUNK])
        found.update(by_ref[bytes(row["dir_ref"])] for row in rows)
    return found


async def copy_entries(conn: asyncpg.Connection, entries: Iterable[Entry]) -> None:
    """Record directory rows (inside the import's transaction)."""
    await conn.copy_records_to_table(
        "code_directory", records=[e.record() for e in entries], columns=list(DIRECTORY_COLUMNS)
    )


async def mark_brand_imports(conn: asyncpg.Connection, redis: RedisClient, *, brand_id: int, actor: str) -> bool:
    """Set the brand's imports_codes flag as a registry change (version bump, row version, audit row) and announce
    it to every gateway; False when it was set already. Done before the import's own transaction (which must not
    hold the registry's version lock for minutes): a gateway that looks a code up before it is loaded finds
    nothing, which is what it would answer anyway."""
    if await conn.fetchval(_FLAG, brand_id):
        return False
    async with change(conn) as version:
        await conn.execute(_SET_FLAG, brand_id, version)
        await audit_row(conn, version, actor=actor, brand_id=brand_id, action="brand.imports_codes",
                        entity_id=str(brand_id), before='{"imports_codes": false}',
                        after='{"imports_codes": true}')  # fmt: skip
    await notify.publish(redis, version)
    return True
