"""Code uses as both sides record them - Redis use records and ledger rows - and the two repairs between them:
re-enqueue a use the ledger is missing, mark used in Redis a use it is missing (fail closed)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from gateway import keys
from gateway.ledger.events import encode_event
from gateway.redis_store import load_lua

_LEDGER_USES = """
SELECT cu.code_ref, cu.use_number, r.redemption_id, r.redeemed_at, r.fingerprint, r.caller, r.store_id,
       r.terminal_id, r.customer_device_id, r.latitude, r.longitude, r.accuracy_m, r.idempotency_scope,
       r.client_id, r.brand_id, r.key_id, r.campaign_id, r.shard, ic.uses
FROM code_uses cu
JOIN redemptions r ON r.redemption_id = cu.redemption_id
LEFT JOIN issued_codes ic ON ic.code_ref = cu.code_ref
WHERE r.campaign_id = $1"""


@dataclass(frozen=True, slots=True)
class Use:
    """One use of one code, with what its outbox event carries."""

    campaign_id: int
    shard: int
    code_ref: str  # hex
    key_id: str
    use_number: int
    redemption_id: str
    at_ms: int
    fingerprint: str
    caller: str
    store_id: str
    terminal_id: str
    device: str
    lat: str
    lon: str
    acc: str
    idem: str
    client_id: str
    brand_id: str
    uses_total: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.code_ref, self.use_number)

    def record(self) -> str:
        """The Redis use record (see lua/redeem.lua)."""
        return "|".join((self.redemption_id, str(self.at_ms), self.fingerprint, self.caller, self.store_id,
                         self.terminal_id, self.device, self.lat, self.lon, self.acc, self.idem, self.client_id,
                         self.brand_id))  # fmt: skip

    def event(self) -> dict[str, str]:
        """The outbox entry, as redeem.lua writes it."""
        return encode_event({
            "rid": self.redemption_id, "ref": self.code_ref, "kid": self.key_id, "cid": str(self.campaign_id),
            "shard": str(self.shard), "use": str(self.use_number), "at": str(self.at_ms), "fp": self.fingerprint,
            "caller": self.caller, "store": self.store_id, "term": self.terminal_id, "dev": self.device,
            "lat": self.lat, "lon": self.lon, "acc": self.acc, "idem": self.idem, "client": self.client_id,
            "brand": self.brand_id,
        })  # fmt: skip


def _coordinate(value: float | None) -> str:
    return "" if value is None else repr(value)


def from_record(campaign_id: int, shard: int, code_ref: str, key_id: str, use_number: int, record: str) -> Use:
    """A Use from a Redis use record (one written before brands has no client and belongs to the default brand)."""
    rid, at, fp, caller, store, term, dev, lat, lon, acc, idem, client, brand = (record.split("|") + [""] * 13)[:13]
    return Use(campaign_id, shard, code_ref, key_id, use_number, rid, int(at or 0), fp, caller, store, term,
               dev, lat, lon, acc, idem, client, brand or "1")  # fmt: skip


async def ledger_uses(conn: asyncpg.Connection, campaign_id: int) -> dict[tuple[str, int], Use]:
    """Every code use of a campaign the ledger holds (the first redemption of each use)."""
    uses = {}
    for r in await conn.fetch(_LEDGER_USES, campaign_id):
        use = Use(
            r["campaign_id"], r["shard"], r["code_ref"].hex(), r["key_id"], r["use_number"], str(r["redemption_id"]),
            int(r["redeemed_at"].timestamp() * 1000), r["fingerprint"], r["caller"], r["store_id"], r["terminal_id"],
            r["customer_device_id"], _coordinate(r["latitude"]), _coordinate(r["longitude"]),
            _coordinate(r["accuracy_m"]), r["idempotency_scope"], r["client_id"], str(r["brand_id"]), r["uses"] or 0,
        )  # fmt: skip
        uses[use.key] = use
    return uses


class UseRepairs:
    """Writes that bring Redis and the outbox in line with each other."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._mark_used = redis.register_script(load_lua("mark_used.lua"))

    async def mark_used(self, uses: Iterable[Use]) -> int:
        """Record ledger uses in Redis (fail closed); returns how many were new. Codes must be loaded."""
        added = 0
        for use in uses:
            left = max(use.uses_total - use.use_number, 0)
            idem_record = f"{use.fingerprint}|{use.redemption_id}|{use.at_ms}|{use.use_number}|{left}"
            code_key = keys.code_key(use.campaign_id, use.shard, use.code_ref)
            args: list[str | int] = [use.use_number, use.record(), use.at_ms, use.idem, idem_record]
            result = await self._mark_used(keys=[code_key], args=args)
            if result == -1:
                raise LookupError(f"code {use.code_ref[:12]} of campaign {use.campaign_id} is not loaded in Redis")
            added += int(result)
        return added

    async def reenqueue(self, uses: Iterable[Use]) -> int:
        """Append the outbox events of uses the ledger is missing (the writer inserts them idempotently)."""
        count = 0
        for use in uses:
            await self.redis.xadd(keys.outbox_key(use.campaign_id, use.shard), use.event())  # type: ignore[arg-type]
            count += 1
        return count
