"""`make bench`: the gateway measured side by side with its own ceiling, with Redis' ceiling and with the design
most voucher systems use, in one run on this machine. Writes loadtest/results/bench.json, a PNG chart and the
`bench` section of BENCHMARKS.md.

Variants (all behind the same gRPC server stack - its interceptors, its logging, same worker processes - and the
same requests):
  ceiling      a bench-only servicer with Redeem's types and a handler that does no work
  ceiling-bare the same without the server interceptors (alternating CPU runs only): what they cost
  ceiling-unobserved, redeem-unobserved  the ceiling and redeem without the outermost interceptor, Observe (RED
               metrics, request id, one access-log line per call) and with RGW_ACCESS_LOG=false (alternating CPU
               runs only): what metrics and access log cost
  redeem       the real Redeem on fresh codes (Redis AOF appendfsync always), the risk engine on with the shipped
               default rules and raised limits (loadtest/bench_risk.py)
  redeem-risk-off  Redeem on fresh codes of the risk brand with RGW_RISK_ENGINE=false
  redeem-risk  the same requests with every risk rule enforced (none denies: the cost, not denials)
  redeem-everysec  the same with appendfsync everysec (RGW_REDIS_DURABILITY=everysec): what the disk's fsync
               tail latency costs
  stream       RedeemStream on fresh codes, ITEMS redemptions per message
  redeem-hot   Redeem on a few multi-use codes (over-redemption check: exactly their uses are granted)
  stream-cluster  RedeemStream as `stream`, its Redis a local 3-master Redis Cluster (AOF always; the masters
               share this machine's cores with everything else)
  redeem-1worker  Redeem as `redeem` with one server process instead of --workers (what a second process adds)
  peer         SELECT ... FOR UPDATE in a Postgres transaction per call (fsync, synchronous_commit on)
  peer-stream  the peer's batch path: one transaction per message, rows locked in order
  peer-hot     the peer on the same few multi-use codes
  redis        redis-benchmark EVALSHA of the redeem script, unpipelined and pipelined

Every server process logs as production does (gateway/logs.py: INFO, JSON lines, the access log on) to a file of
its own in the bench's workdir (loadtest/stack.py), not to the terminal.

Two measurements per variant: CPU per call at one open-loop rate below saturation (from /proc, every process),
and a ramp of open-loop rates for throughput and p50/p99/p999 latency, with the CPU of every process. Besides:
`interleaved` (CPU of ceiling-bare, ceiling and redeem measured alternately), `interleaved-risk` (the same for
redeem-risk-off and redeem-risk, with their p99), `interleaved-observe` (ceiling-unobserved, ceiling,
redeem-unobserved and redeem, with their p99: what metrics and access log add per call) and `burst` (the
limiter's accuracy, loadtest/bench_risk.py).

Usage: python -m loadtest.bench [--smoke] [--workers N] [--out DIR] [--no-markdown] [--only a,b,...]
A run with --only updates its own parts of OUT/bench.json and of BENCHMARKS.md and keeps the others (when
bench.json is of the same profile and worker count; otherwise it replaces them). --smoke writes to a temporary
directory unless --out says otherwise, never over the measured figures, and never to BENCHMARKS.md.
Exit status 1 when a fresh-code variant of the gateway saw a denial (its figures are then not like for like), the
burst admitted other than exactly its limit, or a server that should write the access log did not log every call
(or one that should not, did).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from loadtest import bench_risk
from loadtest import frames as fr
from loadtest.bench_redis import redis_ceiling
from loadtest.bench_report import merge_partial, write_outputs
from loadtest.procstat import CpuMeter
from loadtest.stack import SAME_REDIS, Stack, start_stack

GENERATOR = Path(__file__).with_name("h2gen.mjs")
REDEEM_PATH = "/redemption.v1.RedemptionService/Redeem"
STREAM_PATH = "/redemption.v1.RedemptionService/RedeemStream"
REDEEMED, ALREADY = "1", "2"
RESOURCE_EXHAUSTED = "8"  # a gRPC status: a caller quota declined the call
RISK_TARGET = 1.25  # issue 9: CPU per call with every rule enforced vs the engine off
SERVER_LOGGING = "as in production (gateway/logs.py): INFO, JSON lines, the access log on, to a file per process"
SMOKE_OUT = Path(tempfile.gettempdir()) / "rgw-bench-smoke"  # smoke figures never overwrite the measured ones


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
    burst_limit: int = 100


FULL = Profile(duration=5, warmup=1, unary_cpu_rate=600, stream_cpu_rate=40,
               unary_rates=(500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000),
               stream_rates=(50, 100, 200, 300, 400, 500, 650, 800), items=64, hot_codes=5, hot_uses=2000,
               redis_requests=200_000, cpu_rounds=9, burst_limit=100)  # fmt: skip
SMOKE = Profile(duration=0.5, warmup=0.2, unary_cpu_rate=100, stream_cpu_rate=5, unary_rates=(100,),
                stream_rates=(5,), items=8, hot_codes=2, hot_uses=20, redis_requests=1000, cpu_rounds=1,
                burst_limit=10)  # fmt: skip


@dataclass
class Variant:
    """One thing measured: how it is served and fed."""

    name: str
    server: str  # bench_server variant
    path: str
    mode: str  # unary | stream
    codes: str  # fresh | peer | hot | any
    fsync: str = "always"  # Redis appendfsync (and RGW_REDIS_DURABILITY) while this variant runs
    brand: str = "default"  # whose codes and client (loadtest/bench_risk.py): default | risk
    env: dict[str, str] = field(default_factory=dict)  # extra server settings
    redis: str = "single"  # single | cluster: the stack's one Redis or its 3-master cluster
    workers: int = 0  # server processes; 0: the bench's --workers
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def observed(self) -> bool:
        """Its servers run Observe with the access log on: every call must leave an access-log line."""
        return (self.server != "ceiling-bare" and not self.server.endswith("-unobserved")
                and self.env.get("RGW_ACCESS_LOG", "true") != "false")  # fmt: skip


def fresh_gateway(server: str, codes: str) -> bool:
    """The gateway on fresh codes: every call must be REDEEMED, or the variant measured something else."""
    return server.startswith("redeem") and codes == "fresh"


VARIANTS = [
    Variant("ceiling", "ceiling", REDEEM_PATH, "unary", "any"),
    Variant("redeem", "redeem", REDEEM_PATH, "unary", "fresh"),
    Variant("redeem-everysec", "redeem", REDEEM_PATH, "unary", "fresh", fsync="everysec"),
    Variant("redeem-risk-off", "redeem", REDEEM_PATH, "unary", "fresh", brand="risk", env={"RGW_RISK_ENGINE": "false"}),
    Variant("redeem-risk", "redeem", REDEEM_PATH, "unary", "fresh", brand="risk"),
    # the counters as their own call (the Redis Cluster layout), on the same Redis: what the second call costs
    Variant(
        "redeem-risk-2calls",
        "redeem",
        REDEEM_PATH,
        "unary",
        "fresh",
        brand="risk",
        env={"RGW_RISK_REDIS_URL": SAME_REDIS},
    ),
    Variant("stream", "redeem", STREAM_PATH, "stream", "fresh"),
    Variant("stream-cluster", "redeem", STREAM_PATH, "stream", "fresh", redis="cluster"),
    Variant("redeem-1worker", "redeem", REDEEM_PATH, "unary", "fresh", workers=1),
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
        return await self.stack.issue(
            count, peer=variant.codes == "peer", name=variant.name, brand=variant.brand, redis=variant.redis
        )

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
        meter = CpuMeter({"server": pids, "redis": self.stack.redis_pids(variant.redis),
                          "postgres": [self.stack.postgres.pid or 0]}, with_children=("postgres",))  # fmt: skip
        meter.start()
        result = run_generator(target, variant, frames, rate, p, self.stack.brand(variant.brand)[1])
        cpu = meter.stop()
        cpu["generator"] = round(result["generator_cpu_s"], 3)
        per_call = p.items if variant.mode == "stream" else 1
        calls_done = max(result["completed"], 1)
        result.update(cpu_s=cpu, redemptions_per_call=per_call,
                      cpu_us_per_call={k: round(v / calls_done * 1e6, 1) for k, v in cpu.items()},
                      cpu_us_per_redemption={k: round(v / calls_done / per_call * 1e6, 1) for k, v in cpu.items()},
                      redemptions_per_s=round(result["achieved_rate"] * per_call), denied=denials(result),
                      over_redeemed=max(0, result["outcomes"].get(REDEEMED, 0) - allowed))  # fmt: skip
        frames.unlink()
        return result

    async def run_variant(self, variant: Variant) -> None:
        p = self.profile
        self.stack.set_fsync(variant.fsync)
        workers = variant.workers or self.workers
        target, pids = self.stack.start_servers(
            variant.server, workers, durability=variant.fsync, env=variant.env, redis=variant.redis
        )
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


# Measured only in the alternating runs, as the baselines of the variants above.
CEILING_BARE = Variant("ceiling-bare", "ceiling-bare", REDEEM_PATH, "unary", "any")
CEILING_UNOBSERVED = Variant("ceiling-unobserved", "ceiling-unobserved", REDEEM_PATH, "unary", "any",
                             env={"RGW_ACCESS_LOG": "false"})  # fmt: skip
REDEEM_UNOBSERVED = Variant("redeem-unobserved", "redeem-unobserved", REDEEM_PATH, "unary", "fresh",
                            env={"RGW_ACCESS_LOG": "false"})  # fmt: skip
BY_NAME = {v.name: v for v in [*VARIANTS, CEILING_BARE, CEILING_UNOBSERVED, REDEEM_UNOBSERVED]}
# With Observe / without: the same servicer, the same other interceptors.
OBSERVE_PAIRS = (("ceiling", "ceiling-unobserved"), ("redeem", "redeem-unobserved"))


def denials(result: dict[str, Any]) -> int:
    """Calls declined: an outcome other than REDEEMED (a risk decline, ...) or a quota's RESOURCE_EXHAUSTED."""
    declined = sum(count for outcome, count in result["outcomes"].items() if outcome != REDEEMED)
    return int(declined + result["statuses"].get(RESOURCE_EXHAUSTED, 0))


async def alternating(bench: Bench, names: tuple[str, ...], rounds: int) -> dict[str, Any]:
    """Server CPU per call (and p99) of several variants measured alternately at the same rate with every server
    set up: the ratios of medians do not depend on which drew a noisy minute. Also the calls each answered and
    the access-log lines its servers wrote for them (counted once they stopped)."""
    rate = bench.profile.unary_cpu_rate
    started = time.monotonic()
    sides = [(BY_NAME[name], *bench.stack.start_servers(BY_NAME[name].server, bench.workers, env=BY_NAME[name].env))
             for name in names]  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in names}
    redis: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    denied = dict.fromkeys(names, 0)
    calls = dict.fromkeys(names, 0)
    try:
        for n in range(rounds):
            for variant, target, pids in sides:
                result = await bench.measure(variant, target, pids, rate, f"interleaved-{variant.name}-{n}")
                samples[variant.name].append(result["cpu_us_per_call"]["server"])
                redis[variant.name].append(result["cpu_us_per_call"]["redis"])
                p99[variant.name].append(round(result["latency_ms"]["p99"] or 0, 2))
                denied[variant.name] += result["denied"]
                calls[variant.name] += result["completed"]
    finally:
        bench.stack.stop_servers()
    lines = {v.name: bench.stack.access_lines(pids, v.path.rsplit("/", 1)[1]) for v, _, pids in sides}
    both = {name: [a + b for a, b in zip(samples[name], redis[name], strict=True)] for name in names}
    print(f"alternating {', '.join(names)}: {rounds} rounds in {time.monotonic() - started:.0f} s", flush=True)
    return {"rate": rate, "samples_us": samples, "median_us": _medians(samples), "redis_samples_us": redis,
            "redis_median_us": _medians(redis), "server_and_redis_median_us": _medians(both), "p99_ms": p99,
            "median_p99_ms": _medians(p99), "denied": denied, "calls": calls,
            "access_log_lines": lines}  # fmt: skip


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(values), 2) for name, values in samples.items() if values}


def _over(medians: dict[str, float], a: str, b: str, digits: int = 2) -> float | None:
    return round(medians[a] / medians[b], digits) if medians.get(b) else None


async def interleaved_cpu(bench: Bench, rounds: int) -> dict[str, Any]:
    """The ceiling without and with the interceptors, and redeem, alternately."""
    cpu = await alternating(bench, ("ceiling-bare", "ceiling", "redeem"), rounds)
    medians = cpu["median_us"]
    return {**cpu, "ratio": _over(medians, "redeem", "ceiling"),
            "interceptors_ratio": _over(medians, "ceiling", "ceiling-bare", 3)}  # fmt: skip


async def interleaved_risk(bench: Bench, rounds: int) -> dict[str, Any]:
    """Every risk rule enforced vs the engine off, alternately: CPU per call and p99 at the same offered rate. The
    target's CPU is the server's and Redis' together: the rules run in both."""
    cpu = await alternating(bench, ("redeem-risk-off", "redeem-risk", "redeem-risk-2calls"), rounds)
    ratio = _over(cpu["server_and_redis_median_us"], "redeem-risk", "redeem-risk-off")
    return {**cpu, "ratio": ratio, "server_ratio": _over(cpu["median_us"], "redeem-risk", "redeem-risk-off"),
            "redis_ratio": _over(cpu["redis_median_us"], "redeem-risk", "redeem-risk-off"),
            "two_calls_ratio": _over(cpu["server_and_redis_median_us"], "redeem-risk-2calls", "redeem-risk-off"),
            "two_calls_server_ratio": _over(cpu["median_us"], "redeem-risk-2calls", "redeem-risk-off"),
            "target": RISK_TARGET, "meets_target": ratio is not None and ratio <= RISK_TARGET}  # fmt: skip


async def interleaved_observe(bench: Bench, rounds: int) -> dict[str, Any]:
    """The ceiling and redeem without and with Observe (RED metrics, request id, one JSON access-log line per call
    written out by the logging thread), alternately: what metrics and access log add to a call's server CPU."""
    cpu = await alternating(bench, ("ceiling-unobserved", "ceiling", "redeem-unobserved", "redeem"), rounds)
    samples, medians = cpu["samples_us"], cpu["median_us"]
    observe = {}
    for on, off in OBSERVE_PAIRS:
        paired = [a - b for a, b in zip(samples[on], samples[off], strict=True)]
        observe[on] = {"ratio": _over(medians, on, off, 3),
                       "added_us": round(medians[on] - medians[off], 1) if on in medians and off in medians else None,
                       "added_us_paired": round(statistics.median(paired), 1) if paired else None}  # fmt: skip
    return {**cpu, "observe": observe}


async def limiter_burst(bench: Bench) -> dict[str, Any]:
    """BURST_FACTOR x N concurrent calls at one terminal whose campaign admits N a minute, against the
    redeem-risk servers (issued and limited before they start, so they load the policy)."""
    n, key = bench.profile.burst_limit, bench.stack.risk_api_key
    calls = n * bench_risk.BURST_FACTOR
    campaign, codes = await bench.stack.issue_campaign(calls + len(bench_risk.CONTROLS), name="burst", brand="risk")
    await bench.stack.limit_terminal(campaign, n)
    risk = next(v for v in VARIANTS if v.name == "redeem-risk")
    target, _ = bench.stack.start_servers(risk.server, bench.workers, env=risk.env)
    try:
        result = await bench_risk.burst(target, key, codes[:calls], n)
        result["controls"] = await bench_risk.controls(target, key, codes[calls:])
    finally:
        bench.stack.stop_servers()
    print(f"burst: {result['admitted']} of {result['calls']} admitted at a limit of {n}; "
          f"first throttled retry after {result['first_throttled_retry_after_ms']} ms", flush=True)  # fmt: skip
    return result


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
    def chosen(name: str) -> bool:
        return only is None or name in only

    stack = start_stack(workdir, cluster=any(chosen(v.name) for v in VARIANTS if v.redis == "cluster"))
    try:
        await stack.prepare()
        bench = Bench(stack, profile, workers)
        cpu = await interleaved_cpu(bench, profile.cpu_rounds) if chosen("interleaved") else {}
        risk = await interleaved_risk(bench, profile.cpu_rounds) if chosen("interleaved-risk") else {}
        observe = await interleaved_observe(bench, profile.cpu_rounds) if chosen("interleaved-observe") else {}
        burst = await limiter_burst(bench) if chosen("burst") else {}
        for variant in VARIANTS:
            if chosen(variant.name):
                await bench.run_variant(variant)
        redis = redis_ceiling(stack.redis, profile.redis_requests) if chosen("redis") else {}
    finally:
        stack.stop_servers()
        stack.redis.stop()
        if stack.cluster is not None:
            stack.cluster.stop()
        stack.postgres.stop()
    report = {
        "profile": asdict(profile),
        "workers": workers,
        "server_logging": SERVER_LOGGING,
        "variants": {v.name: {**asdict(v), "results": v.results} for v in VARIANTS if v.results},
        "redis": redis,
        "interleaved_cpu": cpu,
        "interleaved_risk": risk,
        "interleaved_observe": observe,
        "burst": burst,
    }
    report["problems"] = problems(report)
    return report


ALTERNATING = ("interleaved_cpu", "interleaved_risk", "interleaved_observe")


def problems(report: dict[str, Any]) -> list[str]:
    """What makes a report's comparisons wrong: a denial on fresh codes, a burst not admitting exactly N, an access
    log not written for every call where it is on (or written where it is off)."""
    found = []
    for name, variant in report["variants"].items():
        res = variant["results"]
        steps = [res[k] for k in ("cpu", "half") if k in res] + res.get("ramp", [])
        denied = sum(step["denied"] for step in steps)
        if fresh_gateway(variant["server"], variant["codes"]) and denied:
            found.append(f"{name}: {denied} call(s) denied on fresh codes")
    for group in (report.get(key) or {} for key in ALTERNATING):
        for name, denied in group.get("denied", {}).items():
            if denied and BY_NAME[name].codes != "any":
                found.append(f"alternating runs of {name}: {denied} call(s) denied on fresh codes")
        found += _access_log_problems(group)
    burst = report.get("burst") or {}
    if burst and not burst["exact"]:
        found.append(f"burst: {burst['answers']} at a limit of {burst['limit']}, not exactly the limit admitted")
    if burst and not burst["controls"]["ok"]:
        found.append(f"the risk rules did not decline the controls as expected: {burst['controls']['answers']}")
    return found


def _access_log_problems(group: dict[str, Any]) -> list[str]:
    found = []
    for name, lines in group.get("access_log_lines", {}).items():
        calls = group["calls"][name]
        if BY_NAME[name].observed and lines < calls:
            found.append(f"alternating runs of {name}: {lines} access-log lines for {calls} calls (records dropped, "
                         "or the access log is off: the figures do not include writing it)")  # fmt: skip
        elif not BY_NAME[name].observed and lines:
            found.append(f"alternating runs of {name}: {lines} access-log lines, where the access log is off")
    return found


PARTS = {v.name for v in VARIANTS} | {"interleaved", "interleaved-risk", "interleaved-observe", "burst", "redis"}


def main() -> None:
    parser = argparse.ArgumentParser(description="side-by-side benchmark of the redemption gateway")
    parser.add_argument("--smoke", action="store_true", help="seconds, to prove the harness works (not for figures)")
    parser.add_argument("--workers", type=int, default=2, help="server processes per variant (SO_REUSEPORT)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: loadtest/results; with --smoke: {SMOKE_OUT}")  # fmt: skip
    parser.add_argument("--only", default="", help="comma-separated parts: variants; `interleaved`, "
                        "`interleaved-risk` and `interleaved-observe` for the alternating CPU runs, `burst` for the "
                        "limiter's accuracy, `redis` (default: all)")  # fmt: skip
    parser.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else FULL
    only = {part for part in args.only.split(",") if part} or None
    if only is not None and only - PARTS:
        parser.error(f"unknown parts: {', '.join(sorted(only - PARTS))} (known: {', '.join(sorted(PARTS))})")
    out = args.out or (SMOKE_OUT if args.smoke else Path("loadtest/results"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rgw-bench-") as tmp:
        report = uvloop.run(run(profile, args.workers, Path(tmp), only))
    argv = " ".join(sys.argv[1:])
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(time.time() - started),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  command="make bench" + (f' BENCH_ARGS="{argv}"' if argv else ""))  # fmt: skip
    failed = report["problems"]  # this run's own
    measured_variants = bool(report["variants"])
    if only is not None:  # a partial run: its parts replace theirs, the others stay
        report = merge_partial(out / "bench.json", report)
        report["problems"] = problems(report)
    write_outputs(report, out, markdown_too=not args.no_markdown and not args.smoke, chart_too=measured_variants)
    print(f"bench: wrote {out / 'bench.json'}", flush=True)
    for problem in failed:
        print(f"bench: NOT LIKE FOR LIKE - {problem}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
