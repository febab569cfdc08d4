"""Memory per code in Redis and bytes per ledger row in Postgres, through the project's own code paths.

Usage: .venv/bin/python -m loadtest.measure_memory [--codes 100000] [--redeem 20000] [--out FILE]
(prints a JSON report; --out also writes it to FILE)

Starts its own redis-server (AOF on, appendfsync everysec: the AOF's bytes per redemption are measured, not its
fsync latency; no RDB) and Postgres (fsync off: sizes and WAL volume do not depend on it) on free ports in a
temporary directory, and stops both at the end. Then:

1. creates a single-use campaign (gateway.issuance.create_campaign) and issues `--codes` codes
   (gateway.issuance.issue_codes: Postgres COPY, then the bucket load into Redis) - `INFO memory` used_memory
   before/after gives Redis bytes per issued code, pg_total_relation_size('issued_codes') Postgres bytes per
   issued code, and pg_current_wal_lsn before/after the WAL per issued code;
2. redeems `--redeem` of them once each through the real redeem script (RedisCodeStore.decide, 64 codes a call,
   with a customer device and a location, as a POS sends them) - the used_memory delta gives the bytes a redeemed
   code adds while its outbox entry is still pending;
3. drains the outbox with one LedgerWriter (the production writer: COPY, INSERT ... ON CONFLICT, XACK + XDEL) -
   used_memory after the drain gives the bytes a redeemed code keeps for good (its state, use and idempotency
   records), the difference the bytes of a pending outbox entry; the AOF's growth over the redemptions and over
   the drain (XACK + XDEL) per redemption; pg_total_relation_size of `redemptions` and
   `code_uses` per row, and the WAL the drain wrote per row (pg_current_wal_lsn before/after).

It also prints how the hash tags of a campaign of K shards spread over the slots of N equal Redis Cluster masters
(gateway.keys_slot.key_slot, no server involved).

Bounded: with the defaults it runs in well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

from gateway import keys
from gateway.clock import SystemClock
from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.domain import Caller, Location, Outcome, RedeemInput, RedeemResult
from gateway.durability import mark_initialised
from gateway.ids import uuid7
from gateway.issuance import create_campaign, issue_codes
from gateway.keys_slot import SLOTS, key_slot
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.redis_client import RedisClient, connect
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem

KEYRING = KeyRing({"measure": os.urandom(32)}, "measure")
CALLER = Caller(client_id="cl_measure", brand_id=1, role="internal")  # the campaign is the default brand's
REDEEM_CHUNK = 64
REDIS_DEFAULT_LISTPACK_ENTRIES = 128
# A POS-like request: realistic lengths for the store, till and customer device ids, and a location.
STORE, TERMINAL, DEVICE = "store-004217", "till-03", "dev-7f3a9c1e2b4d5f60"
WHERE = Location(latitude=51.507351, longitude=-0.127758, accuracy_m=12.5)


async def used_memory(redis: RedisClient) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


async def aof_bytes(redis: RedisClient) -> int:
    info: Any = await redis.info("persistence")
    return int(info["aof_current_size"])


async def settled_memory(redis: RedisClient) -> int:
    """used_memory after a short pause (lazy frees and client buffers settle)."""
    await asyncio.sleep(0.2)
    return await used_memory(redis)


async def relation_bytes(conn: asyncpg.Connection, table: str) -> int:
    """Heap + indexes + TOAST of a table, after VACUUM so the visibility map and FSM exist as in steady state."""
    await conn.execute(f"VACUUM ANALYZE {table}")
    return int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table))


async def sampled_code_hashes(redis: RedisClient, campaign_id: int, sample: int = 200) -> dict[str, Any]:
    """MEMORY USAGE (every field counted) and encoding of `sample` redeemed codes' own hashes."""
    sizes: list[int] = []
    encodings: collections.Counter[str] = collections.Counter()
    async for key in redis.scan_iter(match=keys.code_key(campaign_id, 0, "*"), count=1000):
        sizes.append(int(await redis.memory_usage(key, samples=0) or 0))
        encodings[str(await redis.object("encoding", key))] += 1
        if len(sizes) >= sample:
            break
    return {"mean_bytes": round(sum(sizes) / max(len(sizes), 1), 1), "sampled": len(sizes),
            "encodings": dict(encodings)}  # fmt: skip


async def wal_lsn(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


async def redeem_all(redis: RedisClient, codes: list[str]) -> int:
    """Redeem each code once through the real script; returns how many were granted."""
    store = RedisCodeStore(redis)
    now = SystemClock().now_ms()
    granted = 0
    for i in range(0, len(codes), REDEEM_CHUNK):
        chunk = codes[i : i + REDEEM_CHUNK]
        commands = [
            check_redeem(RedeemInput(code, f"idem-{i + n:08d}", STORE, TERMINAL, DEVICE, WHERE), KEYRING, CALLER)
            for n, code in enumerate(chunk)
        ]
        results = await store.decide(commands, [uuid7(now) for _ in chunk], mode="redeem", now_ms=now)
        granted += sum(1 for r in results if isinstance(r, RedeemResult) and r.outcome is Outcome.REDEEMED)
    return granted


async def drain(redis: RedisClient, database_url: str) -> None:
    config = WriterConfig(batch_size=2000, batch_wait_s=0.005, poll_s=0.001, claim_idle_ms=60_000)
    writer = LedgerWriter(Outbox(redis, consumer="measure"), partial(asyncpg.connect, database_url), config)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()


async def measure(conn: asyncpg.Connection, redis: RedisClient, database_url: str, count: int, redeem: int,
                  workdir: Path) -> dict[str, Any]:  # fmt: skip
    start = datetime.now(UTC)
    campaign = await create_campaign(conn, redis, KEYRING, name="measure", valid_from=start - timedelta(hours=1),
                                     valid_until=start + timedelta(days=30))  # fmt: skip
    before_issue = await settled_memory(redis)
    out = workdir / "codes.txt"
    wal_issue = await wal_lsn(conn)
    await issue_codes(conn, redis, KEYRING, campaign, count=count, out=out)
    wal_issue = await wal_lsn(conn) - wal_issue
    after_issue = await settled_memory(redis)
    codes = out.read_text().split()
    issued_pg = await relation_bytes(conn, "issued_codes")

    aof_before = await aof_bytes(redis)
    granted = await redeem_all(redis, codes[:redeem])
    aof_redeemed = await aof_bytes(redis) - aof_before
    outbox_len = int(await redis.xlen(keys.outbox_key(campaign.id, 0)))
    if granted != redeem or outbox_len != redeem:
        raise RuntimeError(f"{granted} granted and {outbox_len} outbox entries after {redeem} redemptions")
    after_redeem = await settled_memory(redis)

    wal_before = await wal_lsn(conn)
    aof_before = await aof_bytes(redis)
    await drain(redis, database_url)
    aof_drained = await aof_bytes(redis) - aof_before
    wal_after = await wal_lsn(conn)
    rows = int(await conn.fetchval("SELECT count(*) FROM redemptions"))
    if rows != redeem:
        raise RuntimeError(f"the ledger has {rows} rows after draining {redeem} events")
    after_drain = await settled_memory(redis)
    code_hashes = await sampled_code_hashes(redis, campaign.id)
    redemptions_pg = await relation_bytes(conn, "redemptions")
    code_uses_pg = await relation_bytes(conn, "code_uses")
    return {
        "codes": count,
        "redeemed": redeem,
        "redis_bytes_per_issued_code": round((after_issue - before_issue) / count, 1),
        "redis_bytes_per_redeemed_code_outbox_pending": round((after_redeem - after_issue) / redeem, 1),
        "redis_bytes_per_redeemed_code_after_drain": round((after_drain - after_issue) / redeem, 1),
        "redis_redeemed_code_hash_memory_usage": code_hashes,
        "redis_bytes_per_pending_outbox_entry": round((after_redeem - after_drain) / redeem, 1),
        "redis_aof_bytes_per_redemption": round(aof_redeemed / redeem, 1),
        "redis_aof_bytes_per_redemption_drained": round(aof_drained / redeem, 1),
        "postgres_bytes_per_issued_code": round(issued_pg / count, 1),
        "postgres_wal_bytes_per_issued_code": round(wal_issue / count, 1),
        "postgres_bytes_per_redemptions_row": round(redemptions_pg / rows, 1),
        "postgres_bytes_per_code_uses_row": round(code_uses_pg / rows, 1),
        "postgres_wal_bytes_per_redemption": round((wal_after - wal_before) / rows, 1),
    }


def slot_spread(shards: int, masters: int, campaigns: int = 200) -> dict[str, float]:
    """How a campaign's `shards` hash tags land on `masters` equal contiguous slot ranges (what CLUSTER
    ADDSLOTSRANGE / redis-cli --cluster create give), over campaigns 1..`campaigns`: the busiest master's share
    of the campaign's shards relative to an even spread (1.0 = even), median and 95th percentile, and the share of
    campaigns that leave some master with none of their shards."""
    ratios: list[float] = []
    uncovered = 0
    for campaign_id in range(1, campaigns + 1):
        nodes = collections.Counter(
            key_slot(keys.shard_tag(campaign_id, shard)) * masters // SLOTS for shard in range(shards)
        )
        ratios.append(max(nodes.values()) / (shards / masters))
        uncovered += len(nodes) < masters
    ratios.sort()
    return {
        "shards": shards,
        "masters": masters,
        "busiest_over_even_median": round(ratios[len(ratios) // 2], 2),
        "busiest_over_even_p95": round(ratios[int(len(ratios) * 0.95)], 2),
        "campaigns_missing_a_master": round(uncovered / campaigns, 2),
    }


async def run(count: int, redeem: int, workdir: Path, listpack_value: int | None) -> dict[str, Any]:
    with RedisServer.start(data_dir=workdir / "redis", appendonly=True, appendfsync="everysec") as rs, \
         PostgresServer.start(data_dir=workdir / "pg", fsync=False) as ps:  # fmt: skip
        conn = await asyncpg.connect(ps.url)
        redis = connect(rs.url, pool_size=4, timeout_s=60)
        try:
            await migrate(conn)
            await redis.config_set("hash-max-listpack-entries", REDIS_DEFAULT_LISTPACK_ENTRIES)
            if listpack_value is not None:
                await redis.config_set("hash-max-listpack-value", listpack_value)
            await mark_initialised(redis, "measure")
            result = await measure(conn, redis, ps.url, count, redeem, workdir)
            config: Any = await redis.config_get("hash-max-listpack-value")
            result["hash_max_listpack_value"] = int(config["hash-max-listpack-value"])
            result["redis_version"] = (await redis.info("server"))["redis_version"]
            result["postgres_version"] = await conn.fetchval("SHOW server_version")
        finally:
            await redis.aclose()
            await conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--codes", type=int, default=100_000, help="codes to issue (bounded to 1,000,000)")
    parser.add_argument("--redeem", type=int, default=20_000, help="of them, how many to redeem once")
    parser.add_argument("--hash-max-listpack-value", type=int, help="Redis setting (default: Redis' own, 64)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    count = max(1_000, min(args.codes, 1_000_000))
    redeem = max(REDEEM_CHUNK, min(args.redeem, count))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rgw-measure-") as tmp:
        report = asyncio.run(run(count, redeem, Path(tmp), args.hash_max_listpack_value))
    report["slot_spread"] = [slot_spread(k, n) for n in (3, 6, 12) for k in (n, 2 * n, 4 * n, 8 * n)]
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  seconds=round(time.perf_counter() - began, 1))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
