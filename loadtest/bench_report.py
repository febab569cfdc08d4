"""The benchmark's outputs: JSON, a PNG chart (throughput and p99 against offered load) and the `bench` section
of BENCHMARKS.md with the ratios the targets are about."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.report import update_section


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are stated in."""
    v = report["variants"]

    def cpu(name: str, key: str = "server") -> float | None:
        value = v.get(name, {}).get("results", {}).get("cpu", {}).get("cpu_us_per_call", {}).get(key)
        return float(value) if value is not None else None

    def redemptions(name: str) -> float | None:
        r = v.get(name, {}).get("results", {})
        per = r.get("cpu", {}).get("redemptions_per_call", 1)
        return float(r.get("max_calls_per_s", 0) * per) if r else None

    def p99_half(name: str) -> float | None:
        value = v.get(name, {}).get("results", {}).get("half", {}).get("latency_ms", {}).get("p99")
        return float(value) if value is not None else None

    interleaved = report.get("interleaved_cpu", {}).get("ratio")
    return {
        "ceiling_cpu_with_vs_without_interceptors": report.get("interleaved_cpu", {}).get("interceptors_ratio"),
        "redeem_cpu_per_call_vs_ceiling": interleaved or _ratio(cpu("redeem"), cpu("ceiling")),
        "redeem_cpu_per_call_vs_ceiling_single_runs": _ratio(cpu("redeem"), cpu("ceiling")),
        "stream_vs_unary_redeem": _ratio(redemptions("stream"), redemptions("redeem")),
        "stream_vs_peer_stream": _ratio(redemptions("stream"), redemptions("peer-stream")),
        "redeem_vs_peer_unary": _ratio(redemptions("redeem"), redemptions("peer")),
        "redeem_hot_vs_peer_hot": _ratio(redemptions("redeem-hot"), redemptions("peer-hot")),
        "redeem_p99_ms_at_half_saturation": _ms(p99_half("redeem")),
        "redeem_everysec_p99_ms_at_half_saturation": _ms(p99_half("redeem-everysec")),
        "ceiling_p99_ms_at_half_saturation": _ms(p99_half("ceiling")),
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


def markdown(report: dict[str, Any]) -> str:
    r = ratios(report)
    lines = [
        f"Measured {report['date']} on {report['machine']} by `{report['command']}` ({report['seconds']} s);",
        f"{report['workers']} server processes per variant on one port (SO_REUSEPORT). Redis: AOF, appendfsync always.",
        "Postgres: fsync on, synchronous_commit on. Generator: `loadtest/h2gen.mjs` (Node http2, open loop, latency",
        "from each request's scheduled send time); redis: `redis-benchmark`. CPU columns: server / redis / postgres /",
        "generator. The machine is shared and noisy: compare ratios within this run, not absolute numbers across runs.",
        "",
        "| target | measured |",
        "|---|---:|",
        f"| the ceiling's CPU per call with vs without the server interceptors (target <= 1.10) | "
        f"{r['ceiling_cpu_with_vs_without_interceptors']} |",
        f"| redeem CPU per call vs the ceiling's (target <= 1.5; median of alternating runs) | "
        f"{r['redeem_cpu_per_call_vs_ceiling']} |",
        f"| the same from the single CPU runs of the variant table below | "
        f"{r['redeem_cpu_per_call_vs_ceiling_single_runs']} |",
        f"| stream vs unary redeem, redemptions/s (target >= 5) | {r['stream_vs_unary_redeem']} |",
        f"| stream vs the peer's batch path (target >= 5) | {r['stream_vs_peer_stream']} |",
        f"| unary redeem vs the peer's unary | {r['redeem_vs_peer_unary']} |",
        f"| hot codes: redeem vs the peer | {r['redeem_hot_vs_peer_hot']} |",
        f"| redeem p99 at half its saturation rate, ms (target <= 10) | {r['redeem_p99_ms_at_half_saturation']} |",
        f"| the same with appendfsync everysec, ms | {r['redeem_everysec_p99_ms_at_half_saturation']} |",
        f"| the ceiling's p99 at half its saturation rate, ms | {r['ceiling_p99_ms_at_half_saturation']} |",
        "",
        _interleaved(report),
        "",
        "CPU per call at one open-loop rate below saturation (µs of CPU per call; streams: per message):",
        "",
        "| variant | rate (calls/s) | server | redis | postgres | generator | per redemption: server |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
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
        lines.append(f"- **redis EVALSHA redeem, pipeline {run['pipeline']}**: {run['rps']:,.0f} calls/s, "
                     f"p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, Redis CPU {run['redis_cpu_us_per_call']} µs/call")  # fmt: skip  # noqa: E501
    lines += ["", "![throughput and p99 against offered load](loadtest/results/bench.png)"]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out: Path, *, markdown_too: bool = True, **_: Any) -> None:
    """JSON, PNG and (unless disabled) BENCHMARKS.md."""
    out.mkdir(parents=True, exist_ok=True)
    report["ratios"] = ratios(report)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["variants"]:
        chart(report, out / "bench.png")
    if markdown_too and report["variants"]:
        update_section(Path("BENCHMARKS.md"), "bench", markdown(report))
    print(json.dumps(report["ratios"], indent=2))


def rewrite_markdown(json_path: Path) -> None:
    """Regenerate the BENCHMARKS.md section from a saved bench.json (no new measurement)."""
    report = json.loads(json_path.read_text())
    report["ratios"] = ratios(report)
    update_section(Path("BENCHMARKS.md"), "bench", markdown(report))
