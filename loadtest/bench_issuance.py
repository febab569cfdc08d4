"""Issuance benchmark: codes generated and loaded per second, end to end, and Redis bytes per issued code.

Usage: python -m loadtest.bench_issuance [--codes 1000000] [--out FILE] [--markdown]

It starts its own redis-server (no persistence; hash-max-listpack-entries at Redis' default of 128, the layout's
worst case) and Postgres (fsync on) on free ports, creates a single-shard campaign and issues N codes in one call
the way `rgw codes generate` does (generation, HMAC, COPY into issued_codes in one transaction, the 0600 file,
then the Redis load and the batch marked active): codes/s is N over that wall time. Redis bytes per code are the
`INFO memory` used_memory delta over the load, and `MEMORY USAGE` of every 64th bucket hash scaled up. Last, Redis
is flushed and the campaign reloaded from Postgres (`rgw rebuild-redis`, `rgw codes resume`): codes/s of that.
Prints one JSON object (also written to --out); --markdown updates the `issuance` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from gateway import issuance, keys
from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.durability import mark_initialised
from gateway.redis_client import RedisClient, connect
from loadtest.report import update_section

KEYRING = KeyRing({"bench": os.urandom(32)}, "bench")
REDIS_DEFAULT_LISTPACK_ENTRIES = 128
SAMPLE_EVERY = 64  # buckets


async def used_memory(redis: RedisClient) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


async def sampled_bytes(redis: RedisClient, campaign_id: int) -> int:
    """MEMORY USAGE of every SAMPLE_EVERY-th bucket of shard 0, scaled to all of them."""
    total = 0
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(0, 16**keys.BUCKET_CHARS, SAMPLE_EVERY):
            pipe.memory_usage(keys.bucket_key(campaign_id, 0, f"{n:0{keys.BUCKET_CHARS}x}"), samples=0)
        total = sum(size or 0 for size in await pipe.execute())
    return total * SAMPLE_EVERY


async def encodings(redis: RedisClient, campaign_id: int) -> dict[str, int]:
    """How the sampled buckets are encoded (listpack while small)."""
    found: dict[str, int] = {}
    for n in range(0, 16**keys.BUCKET_CHARS, SAMPLE_EVERY * 16):
        kind = await redis.object("encoding", keys.bucket_key(campaign_id, 0, f"{n:0{keys.BUCKET_CHARS}x}"))
        found[str(kind)] = found.get(str(kind), 0) + 1
    return found


async def measure(conn: asyncpg.Connection, redis: RedisClient, count: int, workdir: Path) -> dict[str, Any]:
    start = datetime.now(UTC)
    campaign = await issuance.create_campaign(conn, redis, KEYRING, name="bench-issuance",
                                              valid_from=start - timedelta(hours=1),
                                              valid_until=start + timedelta(days=30))  # fmt: skip
    before = await used_memory(redis)
    out = workdir / "codes.txt"
    began = time.perf_counter()
    marks: dict[str, float] = {}
    done = await issuance.issue_to_file(
        conn, redis, KEYRING, campaign, count=count, out=out,
        on_generated=lambda n: marks.__setitem__("copied", time.perf_counter() - began),
    )  # fmt: skip
    seconds = time.perf_counter() - began
    assert done.added == count, f"{done.added} codes loaded, expected {count}"
    info_delta = await used_memory(redis) - before
    sampled = await sampled_bytes(redis, campaign.id)
    shapes = await encodings(redis, campaign.id)
    await redis.flushdb()
    await mark_initialised(redis, "bench")
    reload_began = time.perf_counter()
    reloaded = await issuance.load_codes(conn, redis, campaign_id=campaign.id)
    reload_seconds = time.perf_counter() - reload_began
    assert reloaded == count
    return {
        "codes": count,
        "seconds": round(seconds, 2),
        "codes_per_second": round(count / seconds),
        "generate_and_copy_seconds": round(marks.get("copied", 0.0), 2),
        "redis_load_seconds": round(seconds - marks.get("copied", 0.0), 2),
        "redis_bytes_per_code_info_memory": round(info_delta / count, 1),
        "redis_bytes_per_code_memory_usage": round(sampled / count, 1),
        "bucket_encodings_sampled": shapes,
        "reload_from_postgres_codes_per_second": round(count / reload_seconds),
        "file_bytes": out.stat().st_size,
    }


async def run(count: int, workdir: Path) -> dict[str, Any]:
    with RedisServer.start(data_dir=workdir / "redis", appendonly=False) as rs, \
         PostgresServer.start(data_dir=workdir / "pg", fsync=True) as ps:  # fmt: skip
        conn = await asyncpg.connect(ps.url)
        redis = connect(rs.url, pool_size=4, timeout_s=60)
        try:
            await migrate(conn)
            await redis.config_set("hash-max-listpack-entries", REDIS_DEFAULT_LISTPACK_ENTRIES)
            await mark_initialised(redis, "bench")
            fsync = await conn.fetchval("SHOW fsync")
            result = await measure(conn, redis, count, workdir)
        finally:
            await redis.aclose()
            await conn.close()
    return {"postgres_fsync": fsync, "hash_max_listpack_entries": REDIS_DEFAULT_LISTPACK_ENTRIES, **result}


def markdown(report: dict[str, Any]) -> str:
    return "\n".join([
        f"Measured {report['date']} on {report['machine']} with `make bench-issuance`: {report['codes']:,} codes of",
        f"one single-shard campaign in one call (Postgres fsync={report['postgres_fsync']}; Redis",
        f"hash-max-listpack-entries={report['hash_max_listpack_entries']}, its default).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| end to end (generate, HMAC, COPY, file, commit, Redis load) | {report['codes_per_second']:,} codes/s |",
        f"| of which generate + COPY (in the transaction) | {report['generate_and_copy_seconds']} s |",
        f"| of which Redis load after the commit | {report['redis_load_seconds']} s |",
        f"| Redis bytes per code, INFO memory delta | {report['redis_bytes_per_code_info_memory']} |",
        f"| Redis bytes per code, MEMORY USAGE sampled | {report['redis_bytes_per_code_memory_usage']} |",
        f"| reload from Postgres (rebuild, resume) | {report['reload_from_postgres_codes_per_second']:,} codes/s |",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/issuance.json"))
    parser.add_argument("--markdown", action="store_true", help="update the issuance section of BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rgw-bench-issuance-") as tmp:
        report = uvloop.run(run(args.codes, Path(tmp)))
    report.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()} ({os.cpu_count()} cores)")
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if args.markdown:
        update_section(Path("BENCHMARKS.md"), "issuance", markdown(report))


if __name__ == "__main__":
    main()
