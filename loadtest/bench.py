"""`make bench`: the gateway measured side by side with its own ceiling, with Redis' ceiling and with the design
most voucher systems use, in one run on this machine. Writes loadtest/results/bench.json, a PNG chart and the
`bench` section of BENCHMARKS.md.

Variants (all behind the same gRPC server stack, same worker processes, same requests):
  ceiling      a bench-only servicer with Redeem's types and a handler that does no work
  ceiling-bare the same without the server interceptors (alternating CPU runs only): what they cost
  redeem       the real Redeem on fresh codes (Redis AOF appendfsync always)
  redeem-everysec  the same with appendfsync everysec (RGW_REDIS_DURABILITY=everysec): what the disk's fsync
               tail latency costs
  stream       RedeemStream on fresh codes, ITEMS redemptions per message
  redeem-hot   Redeem on a few multi-use codes (over-redemption check: exactly their uses are granted)
  peer         SELECT ... FOR UPDATE in a Postgres transaction per call (fsync, synchronous_commit on)
  peer-stream  the peer's batch path: one transaction per message, rows locked in order
  peer-hot     the peer on the same few multi-use codes
  redis        redis-benchmark EVALSHA of the redeem script, unpipelined and pipelined

Two measurements per variant: CPU per call at one open-loop rate below saturation (from /proc, every process),
and a ramp of open-loop rates for throughput and p50/p99/p999 latency, with the CPU of every process.

Usage: python -m loadtest.bench [--smoke] [--workers N] [--out DIR] [--no-markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from loadtest import frames as fr
from loadtest.bench_redis import redis_ceiling
from loadtest.bench_report import write_outputs
from loadtest.procstat import CpuMeter
from loadtest.stack import Stack, start_stack

GENERATOR = Path(__file__).with_name("h2gen.mjs")
REDEEM_PATH = "/redemption.v1.RedemptionService/Redeem"
STREAM_PATH = "/redemption.v1.RedemptionService/RedeemStream"
REDEEMED, ALREADY = "1", "2"


@dataclass(frozen=True)
class Profile:
    """How long and how hard to measure."""

    duration: float
    warmup: float
    unary_cpu_rate: int
    stream_cpu_rate: int
    unary_rates: tuple[int, ...]
    stream_rates: tuple[int, ...]
    items: int
    hot_codes: int
    hot_uses: int
    redis_requests: int
    cpu_rounds: int = 5


FULL = Profile(duration=5, warmup=1, unary_cpu_rate=600, stream_cpu_rate=40,
               unary_rates=(500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000),
               stream_rates=(50, 100, 200, 300, 400, 500, 650, 800), items=64, hot_codes=5, hot_uses=2000,
               redis_requests=200_000, cpu_rounds=9)  # fmt: skip
SMOKE = Profile(duration=0.5, warmup=0.2, unary_cpu_rate=100, stream_cpu_rate=5, unary_rates=(100,),
                stream_rates=(5,), items=8, hot_codes=2, hot_uses=20, redis_requests=1000, cpu_rounds=1)  # fmt: skip


@dataclass
class Variant:
    """One thing measured: how it is served and fed."""

    name: str
    server: str  # bench_server variant
    path: str
    mode: str  # unary | stream
    codes: str  # fresh | peer | hot | any
    fsync: str = "always"  # Redis appendfsync (and RGW_REDIS_DURABILITY) while this variant runs
    results: dict[str, Any] = field(default_factory=dict)


VARIANTS = [
    Variant("ceiling", "ceiling", REDEEM_PATH, "unary", "any"),
    Variant("redeem", "redeem", REDEEM_PATH, "unary", "fresh"),
    Variant("redeem-everysec", "redeem", REDEEM_PATH, "unary", "fresh", fsync="everysec"),
    Variant("stream", "redeem", STREAM_PATH, "stream", "fresh"),
    Variant("redeem-hot", "redeem", REDEEM_PATH, "unary", "hot"),
    Variant("peer", "peer", REDEEM_PATH, "unary", "peer"),
    Variant("peer-stream", "peer", STREAM_PATH, "stream", "peer"),
    Variant("peer-hot", "peer", REDEEM_PATH, "unary", "hot-peer"),
]


class Bench:
    """Runs the variants against one stack."""

    def __init__(self, stack: Stack, profile: Profile, workers: int) -> None:
        self.stack = stack
        self.profile = profile
        self.workers = workers
        self._any_codes: list[str] = []

    async def codes_for(self, variant: Variant, calls: int) -> list[str]:
        """Codes for `calls` calls (messages x items for streams): fresh ones unless the variant says otherwise."""
        count = calls * (self.profile.items if variant.mode == "stream" else 1)
        if variant.codes == "any":
            if not self._any_codes:
                self._any_codes = await self.stack.issue(min(count, 5000), name="ceiling")
            return [self._any_codes[i % len(self._any_codes)] for i in range(count)]
        if variant.codes.startswith("hot"):
            hot = await self.stack.issue(self.profile.hot_codes, uses=self.profile.hot_uses,
                                         peer=variant.codes == "hot-peer", name=variant.name)  # fmt: skip
            return [hot[i % len(hot)] for i in range(count)]
        return await self.stack.issue(count, peer=variant.codes == "peer", name=variant.name)

    def frames(self, variant: Variant, codes: list[str], tag: str) -> Path:
        if variant.mode == "stream":
            frames = fr.stream_frames(codes, items=self.profile.items, tag=tag)
        else:
            frames = fr.unary_frames(codes, tag=tag)
        return fr.write_frames(self.stack.workdir / f"frames-{tag}.bin", frames)

    async def measure(self, variant: Variant, target: str, pids: list[int], rate: int, tag: str) -> dict[str, Any]:
        """One open-loop run at `rate` calls (messages) per second, with the CPU of every process."""
        p = self.profile
        calls = int(rate * (p.duration + p.warmup))
        codes = await self.codes_for(variant, calls)
        # The ceiling answers REDEEMED without looking: only real variants can over-redeem.
        allowed = p.hot_codes * p.hot_uses if variant.codes.startswith("hot") else len(set(codes))
        if variant.codes == "any":
            allowed = calls * (p.items if variant.mode == "stream" else 1)
        frames = self.frames(variant, codes, tag)
        settle()
        meter = CpuMeter({"server": pids, "redis": [self.stack.redis.pid], "postgres": [self.stack.postgres.pid or 0]},
                         with_children=("postgres",))  # fmt: skip
        meter.start()
        result = run_generator(target, variant, frames, rate, p, self.stack.api_key)
        cpu = meter.stop()
        cpu["generator"] = round(result["generator_cpu_s"], 3)
        per_call = p.items if variant.mode == "stream" else 1
        calls_done = max(result["completed"], 1)
        result.update(cpu_s=cpu, redemptions_per_call=per_call,
                      cpu_us_per_call={k: round(v / calls_done * 1e6, 1) for k, v in cpu.items()},
                      cpu_us_per_redemption={k: round(v / calls_done / per_call * 1e6, 1) for k, v in cpu.items()},
                      redemptions_per_s=round(result["achieved_rate"] * per_call),
                      over_redeemed=max(0, result["outcomes"].get(REDEEMED, 0) - allowed))  # fmt: skip
        frames.unlink()
        return result

    async def run_variant(self, variant: Variant) -> None:
        p = self.profile
        self.stack.set_fsync(variant.fsync)
        target, pids = self.stack.start_servers(variant.server, self.workers, durability=variant.fsync)
        try:
            cpu_rate = p.stream_cpu_rate if variant.mode == "stream" else p.unary_cpu_rate
            variant.results["cpu"] = await self.measure(variant, target, pids, cpu_rate, f"{variant.name}-cpu")
            variant.results["ramp"] = await self.ramp(variant, target, pids)
            best = max((s["achieved_rate"] for s in variant.results["ramp"]), default=0)
            half = max(1, int(best / 2))
            variant.results["half"] = await self.measure(variant, target, pids, half, f"{variant.name}-half")
            variant.results["max_calls_per_s"] = round(best)
        finally:
            self.stack.stop_servers()
            self.stack.set_fsync("always")
        print(f"{variant.name}: max {variant.results['max_calls_per_s']} calls/s, "
              f"p99 at half {variant.results['half']['latency_ms']['p99']} ms", flush=True)  # fmt: skip

    async def ramp(self, variant: Variant, target: str, pids: list[int]) -> list[dict[str, Any]]:
        """Offered rates up the list until the server no longer keeps up (achieved < 90%, errors, p99 > 1 s)."""
        steps = []
        rates = self.profile.stream_rates if variant.mode == "stream" else self.profile.unary_rates
        for rate in rates:
            step = await self.measure(variant, target, pids, rate, f"{variant.name}-{rate}")
            steps.append(step)
            p99 = step["latency_ms"]["p99"] or 0
            if step["achieved_rate"] < 0.9 * rate or step["errors"] > 0.01 * step["completed"] or p99 > 1000:
                break
        return steps


CEILING_BARE = Variant("ceiling-bare", "ceiling-bare", REDEEM_PATH, "unary", "any")


async def interleaved_cpu(bench: Bench, rounds: int) -> dict[str, Any]:
    """CPU per call of the ceiling without and with the interceptors and of redeem, measured alternately at the
    same rate with every server set up: the ratios of medians do not depend on which drew a noisy minute."""
    by_name = {v.name: v for v in VARIANTS}
    rate = bench.profile.unary_cpu_rate
    sides = [(variant, *bench.stack.start_servers(variant.server, bench.workers))
             for variant in (CEILING_BARE, by_name["ceiling"], by_name["redeem"])]  # fmt: skip
    samples: dict[str, list[float]] = {variant.name: [] for variant, _, _ in sides}
    try:
        for n in range(rounds):
            for variant, target, pids in sides:
                result = await bench.measure(variant, target, pids, rate, f"interleaved-{variant.name}-{n}")
                samples[variant.name].append(result["cpu_us_per_call"]["server"])
    finally:
        bench.stack.stop_servers()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"rate": rate, "samples_us": samples, "median_us": medians,
            "ratio": round(medians["redeem"] / medians["ceiling"], 2) if medians["ceiling"] else None,
            "interceptors_ratio": round(medians["ceiling"] / medians["ceiling-bare"], 3)
            if medians["ceiling-bare"] else None}  # fmt: skip


def settle() -> None:
    """Flush what issuing the codes left in the page cache: otherwise its writeback stalls the AOF fsyncs of
    the measurement that follows, and the latency measured is issuance's, not the gateway's."""
    os.sync()
    time.sleep(1)


def run_generator(target: str, variant: Variant, frames: Path, rate: int, p: Profile, api_key: str) -> dict[str, Any]:
    """Run h2gen (Node) once and return its JSON report. 32 connections: SO_REUSEPORT spreads connections, not
    calls, over the server processes, and a few connections can leave one process idle while another is full."""
    command = ["node", str(GENERATOR), "--target", target, "--path", variant.path, "--frames", str(frames),
               "--rate", str(rate), "--duration", str(p.duration), "--warmup", str(p.warmup),
               "--mode", variant.mode, "--connections", "32", "--streams", "64"]  # fmt: skip
    env = {**os.environ, "RGW_API_KEY": api_key}  # not on argv, which any `ps` shows
    timeout = p.duration + p.warmup + 90
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True, env=env)  # noqa: S603
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def run(profile: Profile, workers: int, workdir: Path, only: set[str] | None) -> dict[str, Any]:
    stack = start_stack(workdir)
    try:
        await stack.prepare()
        bench = Bench(stack, profile, workers)
        cpu = await interleaved_cpu(bench, profile.cpu_rounds) if only is None or "interleaved" in only else {}
        for variant in VARIANTS:
            if only is None or variant.name in only:
                await bench.run_variant(variant)
        redis = redis_ceiling(stack.redis, profile.redis_requests) if only is None or "redis" in only else {}
    finally:
        stack.stop_servers()
        stack.redis.stop()
        stack.postgres.stop()
    return {
        "profile": asdict(profile),
        "workers": workers,
        "variants": {v.name: {**asdict(v), "results": v.results} for v in VARIANTS if v.results},
        "redis": redis,
        "interleaved_cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="side-by-side benchmark of the redemption gateway")
    parser.add_argument("--smoke", action="store_true", help="seconds, to prove the harness works (not for figures)")
    parser.add_argument("--workers", type=int, default=2, help="server processes per variant (SO_REUSEPORT)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--only", default="", help="comma-separated variants, `interleaved` for the alternating "
                        "CPU runs (default: all)")  # fmt: skip
    parser.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else FULL
    only = set(args.only.split(",")) if args.only else None
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rgw-bench-") as tmp:
        report = uvloop.run(run(profile, args.workers, Path(tmp), only))
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(time.time() - started),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  command="make bench" + (" (smoke)" if args.smoke else ""))  # fmt: skip
    write_outputs(report, args.out, markdown_too=not args.no_markdown and not args.smoke)


if __name__ == "__main__":
    main()
