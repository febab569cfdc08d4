"""The benchmark's outputs: JSON, a PNG chart (throughput and p99 against offered load) and the `bench` section
of BENCHMARKS.md with the ratios the targets are about. A partial run (`--only`) is merged into the previous
bench.json of the same profile: its parts replace theirs, and the section says which parts were measured when."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loadtest.report import update_section


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


# The report's parts other than the variants, by their `--only` name.
SECTIONS = {"interleaved_cpu": "interleaved", "interleaved_risk": "interleaved-risk",
            "interleaved_observe": "interleaved-observe", "burst": "burst", "redis": "redis"}  # fmt: skip


def parts(report: dict[str, Any]) -> list[str]:
    """What a report measured, by `--only` name."""
    return [*report["variants"], *(name for key, name in SECTIONS.items() if report.get(key))]


def merge_partial(previous_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The previous report with this partial run's parts in place of its own, when both are of the same profile
    and worker count (otherwise this run alone: figures of different profiles are not compared in one table)."""
    if not previous_path.exists():
        return report
    previous: dict[str, Any] = json.loads(previous_path.read_text())
    profile = json.loads(json.dumps(report["profile"]))  # as saved: tuples are lists there
    if previous.get("profile") != profile or previous.get("workers") != report["workers"]:
        print(f"bench: {previous_path} is of another profile or worker count: this partial run replaces it",
              file=sys.stderr)  # fmt: skip
        return report
    measured = parts(report)
    merged = {**previous, "variants": {**previous["variants"], **report["variants"]}}
    for key in SECTIONS:
        if report.get(key):
            merged[key] = report[key]
    earlier = [{**update, "parts": [p for p in update["parts"] if p not in measured]}
               for update in previous.get("updates", [])]  # fmt: skip
    this = {k: report[k] for k in ("date", "seconds", "machine", "command")}
    merged["updates"] = [update for update in earlier if update["parts"]] + [{**this, "parts": measured}]
    return merged


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are stated in."""
    v = report["variants"]

    def cpu(name: str, key: str = "server") -> float | None:
        value = v.get(name, {}).get("results", {}).get("cpu", {}).get("cpu_us_per_call", {}).get(key)
        return float(value) if value is not None else None

    def both(name: str) -> float | None:
        server, redis = cpu(name), cpu(name, "redis")
        return server + redis if server is not None and redis is not None else None

    def redemptions(name: str) -> float | None:
        r = v.get(name, {}).get("results", {})
        per = r.get("cpu", {}).get("redemptions_per_call", 1)
        return float(r.get("max_calls_per_s", 0) * per) if r else None

    def p99_half(name: str) -> float | None:
        value = v.get(name, {}).get("results", {}).get("half", {}).get("latency_ms", {}).get("p99")
        return float(value) if value is not None else None

    interleaved = report.get("interleaved_cpu", {}).get("ratio")
    observe = (report.get("interleaved_observe") or {}).get("observe", {})
    return {
        "ceiling_cpu_with_vs_without_interceptors": report.get("interleaved_cpu", {}).get("interceptors_ratio"),
        "ceiling_cpu_with_vs_without_observe": observe.get("ceiling", {}).get("ratio"),
        "redeem_cpu_with_vs_without_observe": observe.get("redeem", {}).get("ratio"),
        "ceiling_us_per_call_added_by_observe": observe.get("ceiling", {}).get("added_us"),
        "redeem_us_per_call_added_by_observe": observe.get("redeem", {}).get("added_us"),
        "redeem_cpu_per_call_vs_ceiling": interleaved or _ratio(cpu("redeem"), cpu("ceiling")),
        "redeem_cpu_per_call_vs_ceiling_single_runs": _ratio(cpu("redeem"), cpu("ceiling")),
        "stream_vs_unary_redeem": _ratio(redemptions("stream"), redemptions("redeem")),
        "stream_vs_peer_stream": _ratio(redemptions("stream"), redemptions("peer-stream")),
        "stream_cluster_vs_single": _ratio(redemptions("stream-cluster"), redemptions("stream")),
        "redeem_workers_vs_one": _ratio(redemptions("redeem"), redemptions("redeem-1worker")),
        "redeem_vs_peer_unary": _ratio(redemptions("redeem"), redemptions("peer")),
        "redeem_hot_vs_peer_hot": _ratio(redemptions("redeem-hot"), redemptions("peer-hot")),
        "redeem_p99_ms_at_half_saturation": _ms(p99_half("redeem")),
        "redeem_everysec_p99_ms_at_half_saturation": _ms(p99_half("redeem-everysec")),
        "ceiling_p99_ms_at_half_saturation": _ms(p99_half("ceiling")),
        "risk_cpu_per_call_every_rule_vs_engine_off": report.get("interleaved_risk", {}).get("ratio"),
        "risk_server_cpu_ratio": report.get("interleaved_risk", {}).get("server_ratio"),
        "risk_redis_cpu_ratio": report.get("interleaved_risk", {}).get("redis_ratio"),
        "risk_two_calls_cpu_ratio": report.get("interleaved_risk", {}).get("two_calls_ratio"),
        "risk_cpu_per_call_single_runs": _ratio(both("redeem-risk"), both("redeem-risk-off")),
        "burst_admitted_exactly_the_limit": report.get("burst", {}).get("exact"),
    }


def chart(report: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against offered load, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=False)
    for name, variant in report["variants"].items():
        steps = variant["results"].get("ramp", [])
        per = variant["results"].get("cpu", {}).get("redemptions_per_call", 1)
        offered = [s["offered_rate"] * per for s in steps]
        top.plot(offered, [s["achieved_rate"] * per for s in steps], marker="o", label=name)
        bottom.plot(offered, [s["latency_ms"]["p99"] for s in steps], marker="o", label=name)
    top.set(xscale="log", yscale="log", xlabel="offered redemptions/s (open loop)", ylabel="achieved redemptions/s")
    bottom.set(xscale="log", yscale="log", xlabel="offered redemptions/s (open loop)", ylabel="p99 latency (ms)")
    top.legend(fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    bottom.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"redemption gateway, {report['machine']}, {report['workers']} server processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_cells(cpu: dict[str, float]) -> str:
    return " / ".join(f"{cpu.get(k, 0):g}" for k in ("server", "redis", "postgres", "generator"))


def _interleaved(report: dict[str, Any]) -> str:
    cpu = report.get("interleaved_cpu") or {}
    if not cpu:
        return "(no alternating CPU runs in this report)"
    runs = "; ".join(f"{name} {values}" for name, values in cpu["samples_us"].items())
    medians = ", ".join(f"{name} {value:.0f}" for name, value in cpu["median_us"].items())
    return f"Alternating CPU runs at {cpu['rate']} calls/s, server µs per call: {runs}; medians: {medians}."


POLICIES = """Policies (loadtest/bench_risk.py): `redeem`, `redeem-everysec`, `stream` and `redeem-hot` run with the
risk engine on and the shipped default modes (rate limits, device and code velocity, lockouts, terminal_store enforced;
place and device rules off), with the default brand's limits raised so the offered load is admitted (the default 2
calls/s per till and 1,000/s per API client would decline most of a ramp offering 6,000/s from 50 tills and one
client). `redeem-risk` runs every rule enforced for its brand - rate limits on all six scopes (limits high enough
to admit the load), lockouts, terminal_store (registered terminals, unknown ones denied), store_geofence (stores
registered with a 10 km radius, every request 0-6 km from them), campaign_region (a polygon with a hole and a
circle), impossible_travel (a device always at the same place), device_binding, device_limit (1,000 uses), device
and code velocity; `redeem-risk-off` sends the same requests of the same brand to servers with
RGW_RISK_ENGINE=false."""


def _observe(report: dict[str, Any]) -> list[str]:
    """What metrics and access log cost: the ceiling and redeem with and without Observe, alternately."""
    group = report.get("interleaved_observe") or {}
    if not group:
        return []
    med, p99, lines, calls = group["median_us"], group["median_p99_ms"], group["access_log_lines"], group["calls"]
    rounds = len(group["samples_us"]["ceiling"])
    out = [
        "",
        "**Metrics and access log.** The outermost interceptor, `Observe` (RED metrics, request id, one JSON "
        "access-log line per call through gateway/access_log.py's deque and writer thread to a file per process, as "
        f"`rgw serve` logs), on and off; alternating runs at {group['rate']} calls/s ({rounds} rounds), server CPU "
        "per call, medians:",
        "",
        "| variant | without Observe (µs) | with (µs) | ratio | added µs per call: difference of the medians "
        "(median of the rounds' differences) | p99 without / with (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for on, figures in group["observe"].items():
        off = f"{on}-unobserved"
        out.append(f"| {on} | {med[off]:.0f} | {med[on]:.0f} | {figures['ratio']} | {figures['added_us']} "
                   f"({figures['added_us_paired']}) | {p99[off]} / {p99[on]} |")  # fmt: skip
    runs = "; ".join(f"{name} {values}" for name, values in group["samples_us"].items())
    written = ", ".join(f"{name} {lines[name]:,} for {calls[name]:,} calls" for name in group["observe"])
    out += ["", f"Rounds, server µs per call: {runs}. Access-log lines written: {written}; without Observe: "
            f"{sum(lines[f'{name}-unobserved'] for name in group['observe'])}."]  # fmt: skip
    return out


def _updates(report: dict[str, Any]) -> list[str]:
    """Which parts a later partial run measured again (the rest is from the run above)."""
    lines = []
    for u in report.get("updates", []):
        machine = f", {u['machine']}" if u["machine"] != report["machine"] else ""
        lines.append(f"Measured again {u['date']} by `{u['command']}` ({u['seconds']} s{machine}), the rest kept "
                     f"from the run above: {', '.join(u['parts'])}.")  # fmt: skip
    return lines


def _side_by_side(report: dict[str, Any]) -> list[str]:
    """p99 of redeem-risk-off and redeem-risk at each offered rate of their ramps."""
    variants = report["variants"]
    if "redeem-risk" not in variants or "redeem-risk-off" not in variants:
        return []
    ramps = [{s["offered_rate"]: s for s in variants[n]["results"]["ramp"]} for n in ("redeem-risk-off", "redeem-risk")]
    lines = [
        "",
        "| offered calls/s | engine off: achieved, p99 ms | every rule: achieved, p99 ms |",
        "|---:|---:|---:|",
    ]
    for rate in sorted(set(ramps[0]) & set(ramps[1])):
        off, on = ramps[0][rate], ramps[1][rate]
        lines.append(f"| {rate} | {off['achieved_rate']:.0f}, {off['latency_ms']['p99'] or 0:.1f} | "
                     f"{on['achieved_rate']:.0f}, {on['latency_ms']['p99'] or 0:.1f} |")  # fmt: skip
    return lines


def _risk(report: dict[str, Any]) -> list[str]:
    """The issue-9 figures: CPU per call and p99, every rule vs the engine off; the burst; what went wrong."""
    risk, burst = report.get("interleaved_risk") or {}, report.get("burst") or {}
    lines = ["", "**Risk engine.** " + POLICIES, ""]
    if risk:
        med, p99, red = risk["server_and_redis_median_us"], risk["median_p99_ms"], risk["redis_samples_us"]
        verdict = "meets" if risk["meets_target"] else "DOES NOT MEET"
        lines += [
            f"Alternating runs at {risk['rate']} calls/s ({len(risk['samples_us']['redeem-risk'])} rounds), server "
            f"µs per call: engine off {risk['samples_us']['redeem-risk-off']}, every rule "
            f"{risk['samples_us']['redeem-risk']}; Redis µs per call: engine off {red['redeem-risk-off']}, every rule "
            f"{red['redeem-risk']}; medians of server + Redis {med['redeem-risk-off']:.0f} / {med['redeem-risk']:.0f}: "
            f"**{risk['ratio']}x** ({verdict} the <= {risk['target']}x target). p99 at that same offered rate, "
            f"median of the rounds: engine off {p99['redeem-risk-off']} ms, every rule {p99['redeem-risk']} ms "
            f"(rounds: {risk['p99_ms']['redeem-risk-off']} / {risk['p99_ms']['redeem-risk']}). Denied calls: "
            f"{risk['denied']}.",
        ]
        if "redeem-risk-2calls" in med:
            lines += [
                "",
                f"The counters as their own call (`RGW_RISK_REDIS_URL`, the Redis Cluster layout) on the same "
                f"Redis: server µs per call {risk['samples_us']['redeem-risk-2calls']}, Redis "
                f"{red['redeem-risk-2calls']}; server + Redis median {med['redeem-risk-2calls']:.0f}: "
                f"**{risk['two_calls_ratio']}x** the engine off (server alone {risk['two_calls_server_ratio']}x), "
                f"p99 {p99['redeem-risk-2calls']} ms at the same rate.",
            ]
    lines += _side_by_side(report)
    if burst:
        lines += ["", f"Limiter burst: {burst['calls']} Redeem calls at once from one terminal whose campaign admits "
                  f"{burst['limit']} a minute there ({burst['seconds']} s): {burst['answers']} - "
                  f"{'exactly the limit admitted' if burst['exact'] else 'NOT exactly the limit'}; the first "
                  f"throttled answer said retry after {burst['first_throttled_retry_after_ms']} ms (all: "
                  f"{burst['retry_after_ms_range']} ms). Controls on the same servers: "
                  f"{burst['controls']['answers']}."]  # fmt: skip
    for problem in report.get("problems", []):
        lines += ["", f"**NOT LIKE FOR LIKE: {problem}**"]
    return lines


def markdown(report: dict[str, Any]) -> str:
    r = ratios(report)
    lines = [
        f"Measured {report['date']} on {report['machine']} by `{report['command']}` ({report['seconds']} s);",
        f"{report['workers']} server processes per variant on one port (SO_REUSEPORT). Redis: AOF, appendfsync always.",
        "Postgres: fsync on, synchronous_commit on. Generator: `loadtest/h2gen.mjs` (Node http2, open loop, latency",
        "from each request's scheduled send time); redis: `redis-benchmark`. CPU columns: server / redis / postgres /",
        "generator. The machine is shared and noisy: compare ratios within this run, not absolute numbers across runs.",
        *([f"Server logging: {report['server_logging']}."] if report.get("server_logging") else []),
        *_updates(report),
        "",
        "| target | measured |",
        "|---|---:|",
        f"| the ceiling's CPU per call with vs without the server interceptors (target <= 1.10) | "
        f"{r['ceiling_cpu_with_vs_without_interceptors']} |",
        f"| the ceiling's CPU per call with vs without metrics and access log (Observe; median of alternating runs) | "
        f"{r['ceiling_cpu_with_vs_without_observe']} |",
        f"| redeem's CPU per call with vs without metrics and access log (the same) | "
        f"{r['redeem_cpu_with_vs_without_observe']} |",
        f"| redeem CPU per call vs the ceiling's (target <= 1.5; median of alternating runs) | "
        f"{r['redeem_cpu_per_call_vs_ceiling']} |",
        f"| the same from the single CPU runs of the variant table below | "
        f"{r['redeem_cpu_per_call_vs_ceiling_single_runs']} |",
        f"| stream vs unary redeem, redemptions/s (target >= 5) | {r['stream_vs_unary_redeem']} |",
        f"| stream vs the peer's batch path (target >= 5) | {r['stream_vs_peer_stream']} |",
        f"| stream on a local 3-master Redis Cluster vs one Redis, redemptions/s (every process on these cores) | "
        f"{r['stream_cluster_vs_single']} |",
        f"| unary redeem with {report['workers']} server processes vs 1, redemptions/s | "
        f"{r['redeem_workers_vs_one']} |",
        f"| unary redeem vs the peer's unary | {r['redeem_vs_peer_unary']} |",
        f"| hot codes: redeem vs the peer | {r['redeem_hot_vs_peer_hot']} |",
        f"| redeem p99 at half its saturation rate, ms (target <= 10) | {r['redeem_p99_ms_at_half_saturation']} |",
        f"| the same with appendfsync everysec, ms | {r['redeem_everysec_p99_ms_at_half_saturation']} |",
        f"| the ceiling's p99 at half its saturation rate, ms | {r['ceiling_p99_ms_at_half_saturation']} |",
        f"| redeem with every risk rule enforced vs the engine off, server + Redis CPU per call (target <= 1.25; "
        f"median of alternating runs) | {r['risk_cpu_per_call_every_rule_vs_engine_off']} |",
        f"| the same, server CPU only / Redis CPU only | {r['risk_server_cpu_ratio']} / {r['risk_redis_cpu_ratio']} |",
        f"| the same from the single CPU runs of the variant table below, server + Redis | "
        f"{r['risk_cpu_per_call_single_runs']} |",
        f"| the limiter admitted exactly its limit under a concurrent burst | "
        f"{r['burst_admitted_exactly_the_limit']} |",
        "",
        _interleaved(report),
        *_observe(report),
        *_risk(report),
        "",
        "CPU per call at one open-loop rate below saturation (µs of CPU per call; streams: per message):",
        "",
        "| variant | rate (calls/s) | server | redis | postgres | generator | per redemption: server |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines = [line for line in lines if not line.endswith("| None |")]  # targets this run did not measure
    for name, variant in report["variants"].items():
        c = variant["results"]["cpu"]
        u = c["cpu_us_per_call"]
        lines.append(f"| {name} | {c['offered_rate']} | {u['server']} | {u['redis']} | {u['postgres']} | "
                     f"{u['generator']} | {c['cpu_us_per_redemption']['server']} |")  # fmt: skip
    lines += [
        "",
        "Saturation: the highest open-loop rate sustained (achieved >= 90% of offered, errors < 1%, p99 < 1 s), and",
        "latency at half of it:",
        "",
        "| variant | max calls/s | max redemptions/s | p50 / p99 / p999 at half (ms) | CPU s at half (srv/redis/pg/gen) | over-redeemed |",  # noqa: E501
        "|---|---:|---:|---|---|---:|",
    ]
    for name, variant in report["variants"].items():
        res = variant["results"]
        half, per = res["half"], res["cpu"]["redemptions_per_call"]
        lat = half["latency_ms"]
        over = sum(s.get("over_redeemed", 0) for s in [res["cpu"], half, *res["ramp"]])
        lines.append(f"| {name} | {res['max_calls_per_s']:,} | {res['max_calls_per_s'] * per:,} | "
                     f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p999']:.2f} | {_cpu_cells(half['cpu_s'])} | {over} |")  # fmt: skip  # noqa: E501
    lines += ["", "Ramp (offered → achieved calls/s, p99 ms):", ""]
    for name, variant in report["variants"].items():
        steps = ", ".join(f"{s['offered_rate']}→{s['achieved_rate']:.0f} ({s['latency_ms']['p99'] or 0:.1f})"
                          for s in variant["results"]["ramp"])  # fmt: skip
        lines.append(f"- **{name}**: {steps}")
    for run in report.get("redis", {}).get("runs", []):
        rules = "every campaign rule on" if run.get("rules") else "no campaign rules"
        lines.append(f"- **redis EVALSHA redeem, pipeline {run['pipeline']}, {rules}**: {run['rps']:,.0f} calls/s, "
                     f"p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, Redis CPU {run['redis_cpu_us_per_call']} µs/call")  # fmt: skip  # noqa: E501
    for pipeline, ratio in (report.get("redis", {}).get("rules_cpu_ratio") or {}).items():
        lines.append(f"- **campaign rules' cost, pipeline {pipeline}**: Redis CPU per call with every rule on / none: "
                     f"{ratio}x")  # fmt: skip
    lines += ["", "![throughput and p99 against offered load](loadtest/results/bench.png)"]
    return "\n".join(lines)


def write_outputs(
    report: dict[str, Any], out: Path, *, markdown_too: bool = True, chart_too: bool = True, **_: Any
) -> None:
    """JSON, PNG (unless disabled: a partial run without variants leaves the chart as it is) and (unless disabled)
    BENCHMARKS.md."""
    out.mkdir(parents=True, exist_ok=True)
    report["ratios"] = ratios(report)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["variants"] and chart_too:
        chart(report, out / "bench.png")
    if markdown_too:
        update_section(Path("BENCHMARKS.md"), "bench", markdown(report))
    print(json.dumps(report["ratios"], indent=2))


def rewrite_markdown(json_path: Path) -> None:
    """Regenerate the BENCHMARKS.md section from a saved bench.json (no new measurement)."""
    report = json.loads(json_path.read_text())
    report["ratios"] = ratios(report)
    update_section(Path("BENCHMARKS.md"), "bench", markdown(report))
