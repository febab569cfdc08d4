"""Inventory part of `rgw reconcile`: `reconcile_inventory(conn, redis, brand_id, repair=...)` checks each SKU shard.

- Every secret in exactly one state: with dispenses left it is in the expiry, cost and supplier indexes (scores
  matching its record); used up (left = 0) it is in none; an index id without a record is reported. A secret use
  listed by two live orders (held or dispensed) is reported.
- Redis orders against the ledger's dispenses, both ways, minding the outbox: a dispensed order's secret use that
  is neither in `dispenses` nor in an outbox event is missing in the ledger; a ledger dispense whose order Redis
  does not show with it is missing in Redis; the same secret use under different orders on the two sides is a
  conflict. Reading order makes a live SKU safe to check: RedisClient orders, then the outbox, then the ledger (an event
  leaves the outbox only after the ledger committed it).
- dispense_alarms rows (a secret use the writer saw for a second order) are reported.
Repair: re-enqueues the events missing in the ledger (one dispense event per order, with a deterministic event id,
so a repeated repair is one event; it carries the order's fingerprint, hold expiry, strategy and supplier, which
`rgw rebuild-redis` restores the order with) and rebuilds the indexes of the reported secrets from their records,
atomically per call (a script re-reads each record: a dispense meanwhile is never undone). Missing in Redis and
conflicts are reported only (`rgw rebuild-redis` restores a lost Redis; a conflict needs an operator).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from gateway.inventory import layout
from gateway.inventory.model import Sku
from gateway.inventory.status import find_skus
from gateway.ledger.events import PoisonEntry
from gateway.ledger.inventory_events import DISPENSING, decode_inventory_event, encode_inventory_event, parse_secrets
from gateway.redis_client import RedisClient

Use = tuple[int, int]  # (secret id, use number)
_NAMESPACE = uuid.UUID("5b0f3f38-7a9e-4c7e-9a43-0d1f3c2b8e61")
_LEDGER = "SELECT secret_id, use_number, order_id FROM dispenses WHERE sku_id = $1"
_ALARMS = """SELECT a.secret_id, a.use_number, a.first_order_id, a.conflicting_order FROM dispense_alarms a
             JOIN secrets s ON s.id = a.secret_id WHERE s.sku_id = $1 ORDER BY a.id"""
# KEYS: secrets hash, by-expiry, by-cost, then supplier indexes; ARGV: (secret id, supplier key index) pairs.
# Each id is indexed from its record when it has dispenses left, else taken out of every index given.
_REINDEX = """
local n = 0
for i = 1, #ARGV, 2 do
  local id, sup = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  local rec = redis.call('HGET', KEYS[1], id)
  local f = {}
  if rec then for v in string.gmatch(rec .. '|', '([^|]*)|') do f[#f + 1] = v end end
  if rec and tonumber(f[5]) > 0 then
    redis.call('ZADD', KEYS[2], f[4], id); redis.call('ZADD', KEYS[3], f[2], id); redis.call('ZADD', sup, f[4], id)
  else
    redis.call('ZREM', KEYS[2], id); redis.call('ZREM', KEYS[3], id); redis.call('ZREM', sup, id)
  end
  n = n + 1
end
return n"""


@dataclass
class InventoryReconcile:
    """The differences found (and what was repaired), over the SKUs checked."""

    skus: int = 0
    secrets: int = 0
    index_problems: list[str] = field(default_factory=list)
    reindex: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)  # (sku, shard) -> id: supplier
    double_held: list[str] = field(default_factory=list)
    missing_in_ledger: list[tuple[int, int, str, Use]] = field(default_factory=list)  # sku, shard, order, use
    missing_in_redis: list[tuple[int, str, Use]] = field(default_factory=list)
    conflicting: list[tuple[int, Use, str, str]] = field(default_factory=list)  # sku, use, Redis's, ledger's order
    alarms: list[tuple[int, int, str, str]] = field(default_factory=list)
    repaired: int = 0

    @property
    def discrepancies(self) -> int:
        return (len(self.index_problems) + len(self.double_held) + len(self.missing_in_ledger)
                + len(self.missing_in_redis) + len(self.conflicting) + len(self.alarms))  # fmt: skip

    def summary(self) -> str:
        return (f"inventory: {self.skus} SKUs, {self.secrets} secrets; index problems: {len(self.index_problems)}, "
                f"secret uses in two live orders: {len(self.double_held)}, missing in the ledger: "
                f"{len(self.missing_in_ledger)}, missing in Redis: {len(self.missing_in_redis)}, conflicting: "
                f"{len(self.conflicting)}, dispense alarms: {len(self.alarms)}; repaired: {self.repaired}")  # fmt: skip

    def details(self, limit: int = 20) -> list[str]:
        lines = [f"  {p}" for p in self.index_problems[:limit]] + [f"  {d}" for d in self.double_held[:limit]]
        lines += [f"  missing in ledger: sku {k} order {o} secret {u[0]} use {u[1]}"
                  for k, _, o, u in self.missing_in_ledger[:limit]]  # fmt: skip
        lines += [
            f"  missing in Redis: sku {k} order {o} secret {u[0]} use {u[1]}"
            for k, o, u in self.missing_in_redis[:limit]
        ]
        lines += [f"  conflicting: sku {k} secret {u[0]} use {u[1]}: RedisClient order {mine}, ledger order {theirs}"
                  for k, u, mine, theirs in self.conflicting[:limit]]  # fmt: skip
        lines += [f"  dispense alarm: secret {s} use {n}: order {first}, then {second}"
                  for s, n, first, second in self.alarms[:limit]]  # fmt: skip
        return lines


@dataclass
class _Shard:
    records: dict[int, list[str]]
    indexes: dict[str, dict[int, float]]  # "exp", "cost", "sup:<name>" -> id: score
    orders: dict[str, tuple[str, list[Use], str, dict[str, str]]]  # order -> (state, uses, at, the order's fields)


async def _read_shard(redis: RedisClient, sku: Sku, shard: int) -> _Shard:
    records = {int(k): str(v).split("|") async for k, v in redis.hscan_iter(layout.secrets_key(sku.id, shard))}
    suppliers = {record[0] for record in records.values()}
    names = {"exp": layout.by_expiry_key(sku.id, shard), "cost": layout.by_cost_key(sku.id, shard)}
    names |= {f"sup:{s}": layout.by_supplier_key(sku.id, shard, s) for s in suppliers}
    indexes: dict[str, dict[int, float]] = {}
    for name, key in names.items():
        members: Any = await redis.zrange(key, 0, -1, withscores=True)
        indexes[name] = {int(member): float(score) for member, score in members}
    orders = {}
    prefix = layout.order_key(sku.id, shard, "")
    async for key in redis.scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}") + "*", count=1000):
        found: Any = await redis.hmget(key, ["st", "ids", "at", "fp", "exp", "strat", "sup"])
        uses = [(int(i.split(";")[0]), int(i.split(";")[1])) for i in (found[1] or "").split(",") if i]
        own = {"order_fp": found[3] or "", "order_exp": found[4] or "0", "order_strat": found[5] or "",
               "order_sup": found[6] or ""}  # fmt: skip
        orders[str(key)[len(prefix) :]] = (found[0] or "", uses, found[2] or "0", own)
    return _Shard(records, indexes, orders)


def _check_indexes(report: InventoryReconcile, sku: Sku, shard: int, state: _Shard) -> None:
    bad: dict[int, str] = {}
    for name, members in state.indexes.items():
        for secret_id, score in members.items():
            record = state.records.get(secret_id)
            if record is None or int(record[4]) <= 0:
                report.index_problems.append(f"sku {sku.id}.{shard} secret {secret_id} in {name} but "
                                             + ("has no record" if record is None else "is used up"))  # fmt: skip
                bad[secret_id] = record[0] if record else name.removeprefix("sup:")
            elif (name.startswith("sup:") and record[0] != name[4:]) or score != float(
                record[1 if name == "cost" else 3]
            ):
                report.index_problems.append(f"sku {sku.id}.{shard} secret {secret_id} wrong in {name}")
                bad[secret_id] = record[0]
    for secret_id, record in state.records.items():
        if int(record[4]) > 0 and not all(
            secret_id in state.indexes.get(n, {}) for n in ("exp", "cost", f"sup:{record[0]}")
        ):
            report.index_problems.append(
                f"sku {sku.id}.{shard} secret {secret_id} has dispenses left but is not indexed"
            )
            bad[secret_id] = record[0]
    if bad:
        report.reindex[(sku.id, shard)] = bad


def _check_orders(report: InventoryReconcile, sku: Sku, state: _Shard) -> dict[Use, str]:
    owners: dict[Use, str] = {}
    for order, (st, uses, _, _) in state.orders.items():
        if st not in ("held", "dispensed"):
            continue
        for use in uses:
            if use in owners:
                report.double_held.append(
                    f"sku {sku.id} secret {use[0]} use {use[1]} in orders {owners[use]} and {order}"
                )
            owners[use] = order
    return owners


async def _on_their_way(redis: RedisClient, sku: Sku, shard: int) -> set[tuple[str, Use]]:
    way: set[tuple[str, Use]] = set()
    entries: Any = await redis.xrange(layout.outbox_key(sku.id, shard))
    for _, fields in entries:
        try:
            event = decode_inventory_event(fields)
            if event["kind"] in DISPENSING:
                way |= {(event["order"], (u.secret_id, u.use_number)) for u in parse_secrets(event["secrets"])}
        except (PoisonEntry, ValueError):
            continue  # poison is the writer's to dead-letter
    return way


async def _check_sku(
    conn: asyncpg.Connection, redis: RedisClient, sku: Sku, report: InventoryReconcile
) -> dict[int, _Shard]:
    shards = {shard: await _read_shard(redis, sku, shard) for shard in range(sku.shards)}
    way = {shard: await _on_their_way(redis, sku, shard) for shard in shards}
    ledger = {(r["secret_id"], r["use_number"]): r["order_id"] for r in await conn.fetch(_LEDGER, sku.id)}
    redis_dispensed: dict[Use, str] = {}
    for shard, state in shards.items():
        report.secrets += len(state.records)
        _check_indexes(report, sku, shard, state)
        _check_orders(report, sku, state)
        for order, (st, uses, _, _) in state.orders.items():
            for use in uses if st == "dispensed" else []:
                redis_dispensed[use] = order
                theirs = ledger.get(use)
                if theirs is None and (order, use) not in way[shard]:
                    report.missing_in_ledger.append((sku.id, shard, order, use))
                elif theirs is not None and theirs != order:
                    report.conflicting.append((sku.id, use, order, theirs))
    report.missing_in_redis += [(sku.id, order, use) for use, order in ledger.items() if use not in redis_dispensed]
    report.alarms += [(r[0], r[1], r[2], r[3]) for r in await conn.fetch(_ALARMS, sku.id)]
    return shards


async def reconcile_inventory(
    conn: asyncpg.Connection, redis: RedisClient, brand_id: int | None, *, repair: bool = False, sku: str | None = None
) -> InventoryReconcile:
    """Check every SKU of the brand (None: every brand), or the one named; with `repair`, fix what can be."""
    report = InventoryReconcile()
    for one in await find_skus(conn, brand_id, sku):
        report.skus += 1
        shards = await _check_sku(conn, redis, one, report)
        if repair:
            report.repaired += await _reenqueue(redis, one, shards, report)
    if repair:
        report.repaired += await _reindex(redis, report)
    return report


async def _reenqueue(redis: RedisClient, sku: Sku, shards: dict[int, _Shard], report: InventoryReconcile) -> int:
    by_order: defaultdict[tuple[int, str], list[Use]] = defaultdict(list)
    for sku_id, shard, order, use in report.missing_in_ledger:
        if sku_id == sku.id:
            by_order[(shard, order)].append(use)
    for (shard, order), uses in by_order.items():
        records = shards[shard].records
        secrets = ",".join(f"{s};{n};{records[s][0]};{records[s][1]};{records[s][2]}" for s, n in uses if s in records)
        event_id = uuid.uuid5(_NAMESPACE, f"{sku.id}|{order}|{secrets}")
        event = {"event_id": str(event_id), "kind": "dispense", "brand": str(sku.brand_id), "sku": str(sku.id),
                 "shard": str(shard), "order": order, "secrets": secrets, "at": shards[shard].orders[order][2],
                 "client": "reconcile", **shards[shard].orders[order][3]}  # fmt: skip
        await redis.xadd(layout.outbox_key(sku.id, shard), encode_inventory_event(event))  # type: ignore[arg-type]
    return sum(len(uses) for uses in by_order.values())


async def _reindex(redis: RedisClient, report: InventoryReconcile) -> int:
    script = redis.register_script(_REINDEX)
    fixed = 0
    for (sku_id, shard), ids in report.reindex.items():
        suppliers = sorted(set(ids.values()))
        base = [
            layout.secrets_key(sku_id, shard),
            layout.by_expiry_key(sku_id, shard),
            layout.by_cost_key(sku_id, shard),
        ]
        keys = [*base, *(layout.by_supplier_key(sku_id, shard, s) for s in suppliers)]
        args = [str(v) for secret_id, s in ids.items() for v in (secret_id, suppliers.index(s) + 4)]
        fixed += int(await script(keys=keys, args=args))
    return fixed
