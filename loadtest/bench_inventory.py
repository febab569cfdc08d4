"""Inventory benchmark: card secrets dispensed per second by InventoryService - the gateway (one atomic Redis
script per order, AOF appendfsync always) against the design well-built peers use (a Postgres transaction per
order with SELECT ... FOR UPDATE SKIP LOCKED, fsync on: loadtest/inventory_peer.py) - on the same gRPC server
stack, the same stock, the same load generator, with zero duplicates checked in both. Each design is measured on
both paths: Dispense (one call per order) and DispenseStream (its batch path: ITEMS orders per message, each
decided on its own - the peer runs a message's orders concurrently, a transaction each).

Usage: python -m loadtest.bench_inventory [--smoke] [--secrets N] [--workers N] [--out FILE] [--markdown]

It starts its own redis-server (AOF, appendfsync always) and Postgres (fsync on) on free ports (loadtest/stack.py),
creates one SKU of the default brand and imports N secrets (200,000) through the real import path
(gateway/inventory/importing.py: checked, deduplicated, sealed with AES-256-GCM, COPY, loaded into Redis); the
peer's table gets a copy of the same rows (the same ciphertexts). Then, per design, server processes of the
gateway's own stack (`ours`: loadtest/bench_server.py redeem, the real InventoryService; `peer`:
loadtest/inventory_peer.py) are driven by loadtest/h2gen.mjs (Node, its own process) with Dispense requests of
unique order ids, 1 and 10 secrets per order, on each path:
  - saturation: a closed loop at each concurrency of the ramp (the generator keeps at most C calls - stream
    messages - in flight; it offers far more) - the best secrets/s is the maximum;
  - half: an open loop at half the maximum order rate - p50/p99/p999 from each request's scheduled send time;
  - CPU of every process (server, Redis, Postgres with its backends, the generator) per run, from /proc.
After each design: ours - its outboxes drained into the ledger by the ledger writer (gateway/ledger), and
`dispenses` and `dispense_alarms` checked; peer - its orders' secret ids checked: no secret in two orders.
Writes one JSON object to --out (loadtest/results/inventory.json); --markdown updates the `inventory` section
of BENCHMARKS.md. Exit status 1 when a duplicate was found or a run saw an answer other than DISPENSED.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets as random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from gateway.db.migrate import migrate
from gateway.dev.servers import free_port
from gateway.inventory.crypto import SecretRing
from gateway.inventory.importing import Record, import_records
from gateway.inventory.model import create_sku
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.rebuild import rebuild_redis
from gateway.redis_client import connect
from gateway.tenancy import admin_store, notify
from gateway.tenancy.model import DEFAULT_BRAND_ID
from loadtest.inventory_peer import LOAD_PEER_SECRETS, PEER_SCHEMA
from loadtest.procstat import CpuMeter
from loadtest.report import update_section
from loadtest.stack import Stack, _wait_serving, start_stack

GENERATOR = Path(__file__).with_name("h2gen.mjs")
DISPENSE_PATH = "/redemption.v1.InventoryService/Dispense"
STREAM_PATH = "/redemption.v1.InventoryService/DispenseStream"
ITEMS = 64  # orders per DispenseStream message (the server's default limit; at 10 per order 640 of its 1,000 secrets)
IMPORT_CHUNK = 400_000
STREAMS = 64  # DispenseStream calls the generator keeps open, over its connections
DISPENSED, OUT_OF_STOCK = "1", "3"  # InventoryOutcome values as h2gen counts them
SKU_CODE = "bench-card"
SUPPLIERS = ("sup-a", "sup-b", "sup-c")
TARGET = 5.0  # issue 12: secrets/s of ours over the peer's
SERVERS = {"ours": ["-m", "loadtest.bench_server", "redeem"], "peer": ["-m", "loadtest.inventory_peer"]}
SMOKE_OUT = Path(tempfile.gettempdir()) / "rgw-bench-inventory-smoke.json"
# ours: the ledger (a secret-use is its primary key there; a second order for one is an alarm row)
_LEDGER_COUNTS = """SELECT count(*) AS n, count(DISTINCT secret_id) AS secrets, count(DISTINCT order_id) AS orders
                    FROM dispenses WHERE sku_id = $1"""
_LEDGER_TWICE = """SELECT count(*) FROM (SELECT secret_id FROM dispenses WHERE sku_id = $1
                   GROUP BY secret_id HAVING count(DISTINCT order_id) > 1) d"""
# the peer: its orders' secret ids, and the order each secret row names
_PEER_COUNTS = """SELECT count(*) AS n, count(DISTINCT s) AS secrets, count(DISTINCT o.order_id) AS orders
                  FROM peer_orders o, unnest(o.secret_ids) s"""
_PEER_FOREIGN = """SELECT count(*) FROM peer_orders o, unnest(o.secret_ids) s JOIN peer_secrets p ON p.id = s
                   WHERE p.order_id IS DISTINCT FROM o.order_id"""
DRAIN = WriterConfig(batch_size=2000, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)


@dataclass(frozen=True)
class Profile:
    """How much stock, and how long and how hard to measure."""

    secrets: int
    workers: int
    duration: float
    warmup: float
    concurrencies: tuple[int, ...]
    offered: int  # orders/s the saturation runs offer (far above what either design serves)
    stream_concurrencies: tuple[int, ...]  # messages in flight
    stream_offered: int  # orders/s the stream's saturation runs offer
    quantities: tuple[int, ...] = (1, 10)
    paths: tuple[str, ...] = ("unary", "stream")


FULL = Profile(secrets=1_200_000, workers=2, duration=3, warmup=0.5, concurrencies=(16, 64, 192), offered=12_000,
               stream_concurrencies=(1, 2, 4, 8, 16, 64), stream_offered=48_000)  # fmt: skip
SMOKE = Profile(secrets=12_000, workers=1, duration=0.6, warmup=0.2, concurrencies=(8,), offered=400,
                stream_concurrencies=(4,), stream_offered=256)  # fmt: skip


def frame(message: pb.DispenseRequest | pb.DispenseStreamRequest) -> bytes:
    """One length-prefixed gRPC message (as loadtest/frames.py)."""
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def order(tag: str, n: int, quantity: int) -> pb.DispenseRequest:
    return pb.DispenseRequest(order_id=f"{tag}-{n}", sku=SKU_CODE, quantity=quantity,
                              strategy=pb.STRATEGY_EARLIEST_EXPIRY)  # fmt: skip


def write_orders(path: Path, tag: str, frames: int, quantity: int, items: int) -> Path:
    """`frames` Dispense requests (items 1) or DispenseStream messages of `items` orders, every order its own id,
    earliest expiry first."""
    if items == 1:
        data = b"".join(frame(order(tag, n, quantity)) for n in range(frames))
    else:
        data = b"".join(
            frame(pb.DispenseStreamRequest(batch_id=str(m), items=[order(tag, m * items + i, quantity)
                                                                  for i in range(items)]))
            for m in range(frames)
        )  # fmt: skip
    path.write_bytes(data)
    return path


def run_generator(target: str, frames: Path, rate: int, p: Profile, in_flight: int, api_key: str, *,
                  stream: bool) -> dict[str, Any]:  # fmt: skip
    """h2gen once: `rate` calls (stream messages) per second offered, at most `in_flight` outstanding (a closed
    loop when the rate is above what the server serves); its JSON report."""
    mode = ["--mode", "stream", "--path", STREAM_PATH, "--streams", str(min(STREAMS, in_flight)),
            "--connections", str(min(16, in_flight))] if stream else [
            "--mode", "unary", "--path", DISPENSE_PATH, "--connections", str(min(32, in_flight))]  # fmt: skip
    command = ["node", str(GENERATOR), "--target", target, "--frames", str(frames), "--rate", str(rate),
               "--duration", str(p.duration), "--warmup", str(p.warmup), "--max-inflight", str(in_flight),
               *mode]  # fmt: skip
    env = {**os.environ, "RGW_API_KEY": api_key}  # not on argv, which any `ps` shows
    done = subprocess.run(command, capture_output=True, text=True, timeout=p.duration + p.warmup + 90, check=True,  # noqa: S603
                          env=env)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def secret_env(ring_keys: dict[str, bytes], dedup: bytes) -> dict[str, str]:
    """The servers' card-secret settings: the keys the import sealed with."""
    b64 = base64.b64encode
    return {"RGW_SECRET_KEYS": ",".join(f"{k}:{b64(v).decode()}" for k, v in ring_keys.items()),
            "RGW_SECRET_KEY_ID": next(iter(ring_keys)), "RGW_SECRET_DEDUP_KEY": b64(dedup).decode()}  # fmt: skip


class InventoryBench:
    """One stack, one SKU, both designs."""

    def __init__(self, stack: Stack, profile: Profile) -> None:
        self.stack = stack
        self.profile = profile
        keys = {"bench": os.urandom(32)}
        dedup = os.urandom(32)
        self.ring = SecretRing(keys, "bench", dedup)
        self.env = secret_env(keys, dedup)
        self.sku_id = 0
        self.api_key = ""
        self.runs = 0

    async def prepare(self) -> dict[str, Any]:
        """Schema, a client of role internal, the SKU and its stock (imported for ours, copied for the peer)."""
        conn = await asyncpg.connect(self.stack.postgres.url)
        redis = connect(self.stack.redis.url, pool_size=4, timeout_s=60)
        try:
            await migrate(conn)
            await conn.execute(PEER_SCHEMA)
            await rebuild_redis(conn, redis)
            made = await admin_store.create_client(conn, actor="bench", brand_id=DEFAULT_BRAND_ID, role="internal",
                                                   label="bench-inventory", env="test")  # fmt: skip
            await notify.publish(redis, made.version)
            self.api_key = made.value.plaintext
            sku = await create_sku(conn, redis, brand_id=DEFAULT_BRAND_ID, code=SKU_CODE, name="Bench month card",
                                   max_per_order=100)  # fmt: skip
            self.sku_id = sku.id
            now = datetime.now(UTC)
            records = [
                Record(n + 1, SKU_CODE, SUPPLIERS[n % len(SUPPLIERS)], random.token_hex(12), 1000 + n % 500, "CNY",
                       now + timedelta(days=30 + n % 300, seconds=n))
                for n in range(self.profile.secrets)
            ]  # fmt: skip
            began = time.perf_counter()
            imported = 0
            for start in range(0, len(records), IMPORT_CHUNK):  # an import takes at most 1,000,000 records
                done = await import_records(conn, redis, self.ring, DEFAULT_BRAND_ID,
                                            records[start : start + IMPORT_CHUNK], all_or_nothing=True,
                                            actor="bench")  # fmt: skip
                assert not done.refused, f"{len(done.refused)} refused"
                imported += done.imported
            import_s = time.perf_counter() - began
            assert imported == self.profile.secrets, f"{imported} imported"
            await conn.execute(LOAD_PEER_SECRETS, sku.id)
            await conn.execute("ANALYZE peer_secrets")
            fsync = await conn.fetchval("SHOW fsync")
            appendfsync = (await redis.config_get("appendfsync"))["appendfsync"]
        finally:
            await redis.aclose()
            await conn.close()
        return {"secrets": self.profile.secrets, "import_seconds": round(import_s, 2),
                "import_secrets_per_second": round(self.profile.secrets / import_s), "postgres_fsync": fsync,
                "redis_appendfsync": appendfsync}  # fmt: skip

    def start_servers(self, design: str) -> tuple[str, list[int]]:
        """The design's server processes on one port (SO_REUSEPORT), logging to files as loadtest/stack.py."""
        port = free_port()
        env = {**os.environ, **self.stack.env, **self.env, "RGW_GRPC_ADDR": f"127.0.0.1:{port}"}
        (self.stack.workdir / "logs").mkdir(exist_ok=True)
        started = []
        for n in range(self.profile.workers):
            path = self.stack.workdir / "logs" / f"inventory-{design}-{n}.log"
            with path.open("wb") as log:
                proc = subprocess.Popen([sys.executable, *SERVERS[design]], env=env, stdout=log,  # noqa: S603
                                        stderr=subprocess.STDOUT)  # fmt: skip
            self.stack.logs[proc.pid] = path
            started.append(proc)
        self.stack.servers += started
        target = f"127.0.0.1:{port}"
        _wait_serving(target, started, self.stack.logs)
        return target, [p.pid for p in started]

    def one_run(self, design: str, target: str, pids: list[int], quantity: int, rate: int, in_flight: int,
                items: int) -> dict[str, Any]:  # fmt: skip
        """One generator run with the CPU of every process; `rate` in orders/s (items per call: 1 unary, else
        DispenseStream messages of `items` orders)."""
        p = self.profile
        self.runs += 1
        calls = max(1, rate // items)
        frames = write_orders(self.stack.workdir / "orders.bin", f"{design}-q{quantity}-r{self.runs}",
                              int(calls * (p.duration + p.warmup)) + 1, quantity, items)  # fmt: skip
        os.sync()  # the frame file's writeback must not stall the AOF fsyncs measured next
        meter = CpuMeter({"server": pids, "redis": [self.stack.redis.pid], "postgres": [self.stack.postgres.pid or 0]},
                         with_children=("postgres",))  # fmt: skip
        meter.start()
        out = run_generator(target, frames, calls, p, in_flight, self.api_key, stream=items > 1)
        cpu = meter.stop()
        cpu["generator"] = round(out["generator_cpu_s"], 3)
        dispensed = out["outcomes"].get(DISPENSED, 0)  # orders (stream: per item)
        # only dispensed orders count (an OUT_OF_STOCK answer is cheaper: counted, it would flatter the figure)
        orders_per_s = out["achieved_rate"] * items * dispensed / max(sum(out["outcomes"].values()), 1)
        return {
            "in_flight": in_flight, "items_per_call": items, "offered_orders_per_s": calls * items,
            "orders_per_s": round(orders_per_s, 1),
            "secrets_per_s": round(orders_per_s * quantity), "latency_ms": _rounded(out["latency_ms"]),
            "sent": out["sent"], "completed": out["completed"], "errors": out["errors"], "statuses": out["statuses"],
            "outcomes": out["outcomes"], "secrets_dispensed": dispensed * quantity, "cpu_s": cpu,
            "cpu_us_per_secret": {k: round(v * 1e6 / max(dispensed * quantity, 1), 1) for k, v in cpu.items()},
        }  # fmt: skip

    def measure(self, design: str, target: str, pids: list[int], quantity: int, path: str) -> dict[str, Any]:
        """The saturation ramp and the half-saturation run of one design, order size and path."""
        p = self.profile
        items = ITEMS if path == "stream" else 1
        offered = p.stream_offered if path == "stream" else p.offered
        concurrencies = p.stream_concurrencies if path == "stream" else p.concurrencies
        ramp = [self.one_run(design, target, pids, quantity, offered, c, items) for c in concurrencies]
        best = max(ramp, key=lambda r: r["orders_per_s"])
        half_rate = max(items, round(best["orders_per_s"] / 2))
        half = self.one_run(design, target, pids, quantity, half_rate, 4000, items)
        for step in [*ramp, half]:
            print(f"bench-inventory: {design} {path} x{quantity} in_flight={step['in_flight']} "
                  f"offered={step['offered_orders_per_s']}/s -> {step['secrets_per_s']} secrets/s "
                  f"p99={step['latency_ms']['p99']} ms outcomes={step['outcomes']}",
                  file=sys.stderr, flush=True)  # fmt: skip
        return {"quantity": quantity, "path": path, "ramp": ramp, "max_secrets_per_s": best["secrets_per_s"],
                "max_orders_per_s": best["orders_per_s"], "best_in_flight": best["in_flight"],
                "half": half}  # fmt: skip

    async def run_design(self, design: str) -> dict[str, Any]:
        target, pids = self.start_servers(design)
        try:
            results = {f"{path}-x{q}": self.measure(design, target, pids, q, path)
                       for path in self.profile.paths for q in self.profile.quantities}  # fmt: skip
        finally:
            self.stack.stop_servers()
        began = time.perf_counter()
        check = await (self.check_ours() if design == "ours" else self.check_peer())
        check["check_seconds"] = round(time.perf_counter() - began, 2)
        acknowledged = sum(s["secrets_dispensed"] for r in results.values() for s in [*r["ramp"], r["half"]])
        check["acknowledged_secrets"] = acknowledged
        check["unrecorded_acknowledged"] = max(0, acknowledged - check["recorded_secrets"])
        return {"results": results, "check": check}

    async def check_ours(self) -> dict[str, Any]:
        """Drain every outbox into the ledger, then: no secret in two orders in `dispenses`, no alarm."""
        redis = connect(self.stack.redis.url, pool_size=4, timeout_s=60)
        writer = LedgerWriter(Outbox(redis, consumer="bench-inventory"),
                              partial(asyncpg.connect, self.stack.postgres.url), DRAIN)  # fmt: skip
        try:
            events = 0
            while (n := await writer.run_once()) > 0:
                events += n
        finally:
            await writer.close()
            await redis.aclose()
        conn = await asyncpg.connect(self.stack.postgres.url)
        try:
            row = await conn.fetchrow(_LEDGER_COUNTS, self.sku_id)
            twice = await conn.fetchval(_LEDGER_TWICE, self.sku_id)
            alarms = await conn.fetchval("SELECT count(*) FROM dispense_alarms")
        finally:
            await conn.close()
        return {"source": "ledger dispenses (outboxes drained by the ledger writer)", "events_drained": events,
                "recorded_secrets": row["n"], "distinct_secrets": row["secrets"], "orders": row["orders"],
                "duplicates": int(twice) + int(alarms), "alarms": int(alarms)}  # fmt: skip

    async def check_peer(self) -> dict[str, Any]:
        """No secret id in two of the peer's orders, and every order's secrets marked as its own."""
        conn = await asyncpg.connect(self.stack.postgres.url)
        try:
            row = await conn.fetchrow(_PEER_COUNTS)
            foreign = await conn.fetchval(_PEER_FOREIGN)
            marked = await conn.fetchval("SELECT count(*) FROM peer_secrets WHERE state = 'dispensed'")
        finally:
            await conn.close()
        return {"source": "peer_orders and peer_secrets", "recorded_secrets": row["n"],
                "distinct_secrets": row["secrets"], "orders": row["orders"], "secrets_marked_dispensed": marked,
                "duplicates": int(row["n"] - row["secrets"]) + int(foreign)}  # fmt: skip


def _rounded(latency: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 2) for k, v in latency.items()}


def problems(designs: dict[str, Any]) -> list[str]:
    """What makes the figures wrong: a duplicate, an answer other than DISPENSED, a failed call."""
    found = []
    for design, data in designs.items():
        if data["check"]["duplicates"]:
            found.append(f"{design}: {data['check']['duplicates']} secret(s) in two orders")
        if data["check"]["unrecorded_acknowledged"]:
            found.append(f"{design}: {data['check']['unrecorded_acknowledged']} acknowledged secrets not recorded")
        for name, result in data["results"].items():
            for step in [*result["ramp"], result["half"]]:
                other = {k: v for k, v in step["outcomes"].items() if k != DISPENSED}
                if other or step["errors"]:
                    found.append(f"{design} {name} in_flight={step['in_flight']}: outcomes {other}, "
                                 f"statuses {step['statuses']}")  # fmt: skip
    return found


async def run(profile: Profile, workdir: Path) -> dict[str, Any]:
    stack = start_stack(workdir)
    try:
        bench = InventoryBench(stack, profile)
        stock = await bench.prepare()
        designs = {design: await bench.run_design(design) for design in ("ours", "peer")}
    finally:
        stack.stop_servers()
        stack.redis.stop()
        stack.postgres.stop()
    ratios = {
        name: round(designs["ours"]["results"][name]["max_secrets_per_s"]
                    / max(designs["peer"]["results"][name]["max_secrets_per_s"], 1), 2)
        for name in designs["ours"]["results"]
    }  # fmt: skip
    return {"profile": asdict(profile), "stock": stock, "designs": designs, "ratio_ours_over_peer": ratios,
            "target_ratio": TARGET, "problems": problems(designs)}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    ours, peer = report["designs"]["ours"], report["designs"]["peer"]
    p, stock = report["profile"], report["stock"]
    lines = [
        f"Measured {report['date']} on {report['machine']} with `make bench-inventory`: InventoryService on",
        f"the gateway's own gRPC stack ({p['workers']} server processes), unique order ids, earliest expiry first,",
        f"on both paths: `Dispense` (one call per order) and `DispenseStream` ({ITEMS} orders per message, {STREAMS}",
        "streams; each order decided on its own - the peer's a transaction each, concurrently),",
        f"one SKU of {stock['secrets']:,} secrets imported through the real import path "
        f"({stock['import_secrets_per_second']:,} secrets/s).",
        "**ours**: one atomic Redis script per order (`Dispense`) or per SKU shard and message (`DispenseStream`, each",
        f"order decided on its own inside it; appendfsync {stock['redis_appendfsync']}); **peer**: one Postgres",
        "transaction per order, `SELECT ... FOR UPDATE SKIP LOCKED` + UPDATE + INSERT order (fsync",
        f"{stock['postgres_fsync']}), the same stock and ciphertexts. Maximum: the best of closed loops at",
        f"{', '.join(str(c) for c in p['concurrencies'])} calls (stream: "
        f"{', '.join(str(c) for c in p['stream_concurrencies'])} messages) in flight; latency: an open loop at half",
        "of it (stream: per message).",
        "",
        "| path | secrets per order | design | max secrets/s | max orders/s | p50 / p99 at half (ms) | "
        "server CPU µs/secret at max | duplicates |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in ours["results"]:
        for design, data in (("ours", ours), ("peer", peer)):
            r = data["results"][name]
            best = next(s for s in r["ramp"] if s["in_flight"] == r["best_in_flight"])
            lat = r["half"]["latency_ms"]
            lines.append(f"| {r['path']} | {r['quantity']} | {design} | {r['max_secrets_per_s']:,} | "
                         f"{r['max_orders_per_s']:,} | "
                         f"{lat['p50']} / {lat['p99']} | {best['cpu_us_per_secret']['server']} | "
                         f"{data['check']['duplicates']} |")  # fmt: skip
    ratios = "; ".join(f"{k.partition('-x')[0]} at {k.partition('-x')[2]} per order **{v}x**"
                       for k, v in report["ratio_ours_over_peer"].items())  # fmt: skip
    lines += [
        "",
        f"Ours over peer in secrets/s (target: {report['target_ratio']:g}x): {ratios}.",
        f"Duplicates checked after each design: ours {ours['check']['duplicates']} (ledger `dispenses` after draining",
        f"the outboxes, and `dispense_alarms`: {ours['check']['recorded_secrets']:,} secrets to "
        f"{ours['check']['orders']:,} orders), "
        f"peer {peer['check']['duplicates']} ({peer['check']['recorded_secrets']:,} secrets to "
        f"{peer['check']['orders']:,} orders).",
    ]  # fmt: skip
    if report["problems"]:
        lines += ["", "Problems: " + "; ".join(report["problems"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny stock: proves the harness, not the speed")
    parser.add_argument("--secrets", type=int, help="stock imported (default 200,000; smoke 6,000)")
    parser.add_argument("--workers", type=int, help="server processes per design (default 2; smoke 1)")
    parser.add_argument("--paths", help="comma-separated: unary, stream (default both)")
    parser.add_argument("--out", type=Path, help="JSON report (default loadtest/results/inventory.json)")
    parser.add_argument("--markdown", action="store_true", help="update the inventory section of BENCHMARKS.md")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else FULL
    paths = tuple(args.paths.split(",")) if args.paths else None
    changes = {
        k: v for k, v in (("secrets", args.secrets), ("workers", args.workers), ("paths", paths)) if v is not None
    }
    profile = Profile(**{**asdict(profile), **changes}) if changes else profile
    out = args.out or (SMOKE_OUT if args.smoke else Path("loadtest/results/inventory.json"))
    with tempfile.TemporaryDirectory(prefix="rgw-bench-inventory-") as tmp:
        report = uvloop.run(run(profile, Path(tmp)))
    report.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()} ({os.cpu_count()} cores)")
    text = json.dumps(report, indent=2)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if args.markdown and not args.smoke:
        update_section(Path("BENCHMARKS.md"), "inventory", markdown(report))
    if report["problems"]:
        print("bench-inventory: " + "; ".join(report["problems"]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
