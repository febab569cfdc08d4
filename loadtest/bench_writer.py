"""Ledger writer benchmark: sustained rows/s from the Redis outbox into Postgres (fsync and synchronous_commit
on), by batch size, and the time to drain a backlog of N events.

Usage: python -m loadtest.bench_writer [--events 100000] [--batch-sizes 100,500,1000,2000] [--out FILE]

It starts its own redis-server (AOF, appendfsync always) and Postgres (fsync on) on free ports, issues N codes,
redeems every one through the real redeem script (so the outbox holds real events), then lets one writer drain
the backlog for each batch size (the ledger is truncated and the events re-enqueued between runs). Results go to
a JSON file and into the `writer` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from gateway import keys
from gateway.clock import SystemClock
from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.domain import Caller, RedeemInput
from gateway.durability import mark_initialised
from gateway.ids import uuid7
from gateway.issuance import create_campaign, issue_codes
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.redis_client import RedisClient, connect
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem
from loadtest.report import update_section

KEYRING = KeyRing({"bench": os.urandom(32)}, "bench")
CALLER = Caller(client_id="cl_bench", brand_id=1, role="internal")  # the campaign is the default brand's
REDEEM_CHUNK = 64
PG_SETTINGS = "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')"


async def fill_outbox(
    conn: asyncpg.Connection, redis: RedisClient, events: int, workdir: Path
) -> tuple[int, list[dict[str, str]]]:
    """Issue `events` codes and redeem each once through the real script; returns the campaign and its events."""
    now = SystemClock().now_ms()
    from datetime import UTC, datetime, timedelta

    start = datetime.now(UTC)
    campaign = await create_campaign(conn, redis, KEYRING, name="bench", valid_from=start - timedelta(hours=1),
                                     valid_until=start + timedelta(days=1))  # fmt: skip
    out = workdir / "codes.txt"
    await issue_codes(conn, redis, KEYRING, campaign, count=events, out=out)
    codes = out.read_text().split()
    store = RedisCodeStore(redis)
    for i in range(0, len(codes), REDEEM_CHUNK):
        chunk = codes[i : i + REDEEM_CHUNK]
        commands = [check_redeem(RedeemInput(c, f"k{i + n}", "bench-store", "till-1", "", None), KEYRING, CALLER)
                    for n, c in enumerate(chunk)]  # fmt: skip
        await store.decide(commands, [uuid7(now) for _ in chunk], mode="redeem", now_ms=now)
    entries: Any = await redis.xrange(keys.outbox_key(campaign.id, 0))
    return campaign.id, [dict(f) for _, f in entries]


async def drain_once(redis: RedisClient, database_url: str, batch_size: int) -> float:
    """Seconds one writer takes to move the whole outbox into the ledger."""
    config = WriterConfig(batch_size=batch_size, batch_wait_s=0.005, poll_s=0.001, claim_idle_ms=60_000)
    writer = LedgerWriter(Outbox(redis, consumer=f"bench-{batch_size}"), partial(asyncpg.connect, database_url), config)
    started = time.perf_counter()
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()
    return time.perf_counter() - started


async def reset(conn: asyncpg.Connection, redis: RedisClient, campaign_id: int, events: list[dict[str, str]]) -> None:
    """Empty the ledger and put the same events back in the outbox."""
    await conn.execute("TRUNCATE redemptions, code_uses, double_spend_alarms")
    stream = keys.outbox_key(campaign_id, 0)
    for i in range(0, len(events), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for event in events[i : i + 1000]:
                pipe.xadd(stream, event)  # type: ignore[arg-type]
            await pipe.execute()


async def run(events: int, batch_sizes: list[int], workdir: Path) -> dict[str, Any]:
    with RedisServer.start(data_dir=workdir / "redis", appendonly=True, appendfsync="always") as rs, \
         PostgresServer.start(data_dir=workdir / "pg", fsync=True) as ps:  # fmt: skip
        conn = await asyncpg.connect(ps.url)
        redis = connect(rs.url, pool_size=4, timeout_s=30)
        try:
            await migrate(conn)
            await mark_initialised(redis, "bench")
            settings = {r["name"]: r["setting"] for r in await conn.fetch(PG_SETTINGS)}
            campaign_id, outbox = await fill_outbox(conn, redis, events, workdir)
            results = []
            for size in batch_sizes:
                await reset(conn, redis, campaign_id, outbox)
                seconds = await drain_once(redis, ps.url, size)
                rows = await conn.fetchval("SELECT count(*) FROM redemptions")
                assert rows == events, f"ledger has {rows} rows, expected {events}"
                results.append({"batch_size": size, "events": events, "seconds": round(seconds, 3),
                                "rows_per_second": round(events / seconds)})  # fmt: skip
                print(f"batch {size:>5}: {events} events drained in {seconds:.2f}s = {events / seconds:,.0f} rows/s")
        finally:
            await redis.aclose()
            await conn.close()
    return {"postgres": settings, "redis": {"appendonly": "yes", "appendfsync": "always"}, "results": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} with `{report['command']}`.",
        f"Postgres: fsync={report['postgres'].get('fsync')}, synchronous_commit="
        f"{report['postgres'].get('synchronous_commit')}; Redis: AOF appendfsync always. One writer process,",
        "one transaction per batch (COPY into a staging table, INSERT … ON CONFLICT DO NOTHING into `redemptions` and",
        "`code_uses`), then XACK + XDEL. Each row is a backlog of real redeem-script events drained from scratch.",
        "",
        "| batch size | events | drain time (s) | rows/s |",
        "|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['batch_size']} | {r['events']:,} | {r['seconds']} | {r['rows_per_second']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-sizes", default="100,500,1000,2000")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/writer.json"))
    parser.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="rgw-bench-") as tmp:
        report = uvloop.run(run(args.events, sizes, Path(tmp)))
    report.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()} ({os.cpu_count()} cores)",
                  command=f"make bench-writer (events={args.events})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_markdown:
        update_section(Path("BENCHMARKS.md"), "writer", markdown(report))


if __name__ == "__main__":
    main()
