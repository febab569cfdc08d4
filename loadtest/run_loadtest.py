"""`make loadtest`: the Locust scenarios against a throw-away local stack, headless and bounded in time.

Usage: python -m loadtest.run_loadtest [--users 40] [--spawn-rate 20] [--duration 30]
                                       [--scenarios LaunchPeak,HotCodes,Attacker,Mixed] [--results loadtest/results]
                                       [--fresh N] [--hot 5] [--hot-uses 100000]

Starts its own redis-server (AOF, appendfsync always) and Postgres (fsync on) on free ports of 127.0.0.1 under
.local/loadtest-*/ (removed afterwards, plaintext codes included), with a development HMAC key made for the run;
runs `python -m loadtest.prepare`; starts `rgw serve` (ledger writer in the same process, no metrics port) on a
free port; runs Locust headless in a subprocess (gevent must not patch this process); stops everything.

Locust's CSV files (`locust_stats.csv`, `locust_failures.csv`, ...) and HTML report (`locust.html`) go to the
results directory, with the gateway's log. Prints what the attacker met: its guesses answered NOT_FOUND, its
typos INVALID_ARGUMENT, and the lockout's declines (OUTCOME_RISK_DENIED:LOCKED_OUT), each counted apart. Exit status:
0 when Locust exited 0, no call failed and no exception was raised, no honest scenario (all but the attacker) met a
risk decline, and the gateway ran and stopped cleanly; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.dev.servers import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("LaunchPeak", "HotCodes", "Attacker", "Mixed")
HONEST = frozenset(SCENARIOS) - {"Attacker"}
# How the attacker's calls are named in Locust's report (loadtest/grpc_user.py).
ATTACKER_ROWS = {"lockout": "Redeem:OUTCOME_RISK_DENIED:LOCKED_OUT", "not found": "Redeem:OUTCOME_NOT_FOUND",
                 "mistyped": "Redeem:INVALID_ARGUMENT"}  # fmt: skip
PREFIX = "locust"
GATEWAY_START_TIMEOUT_S = 30
GATEWAY_STOP_TIMEOUT_S = 30
PREPARE_TIMEOUT_S = 300
# Beyond the run time: Locust's start-up, its stop timeout and writing the reports.
LOCUST_MARGIN_S = 60
LOCUST_STOP_TIMEOUT_S = 3
# One Locust process manages at most ~1k calls/s here (PERFORMANCE.md), about half of them on fresh codes: twice
# that per second of run time means LaunchPeak and Mixed never run out.
FRESH_PER_SECOND = 2_000


@dataclass(frozen=True, slots=True)
class Options:
    """One run."""

    users: int
    spawn_rate: float
    duration_s: int
    scenarios: tuple[str, ...]
    results: Path
    fresh: int
    hot: int
    hot_uses: int


class LoadTestError(RuntimeError):
    """The stack could not be set up or the run could not be made."""


def _scenarios(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SCENARIOS)} (comma-separated), not {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run_loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=40, help="concurrent Locust users (default 40)")
    parser.add_argument("--spawn-rate", type=float, default=20, help="users started per second (default 20)")
    parser.add_argument("--duration", type=int, default=30, help="run time in seconds (default 30)")
    parser.add_argument("--scenarios", type=_scenarios, default=SCENARIOS, help="comma-separated (default: all)")
    parser.add_argument("--results", type=Path, default=ROOT / "loadtest" / "results", help="report directory")
    parser.add_argument("--fresh", type=int, help=f"single-use codes to issue (default {FRESH_PER_SECOND}/s of run)")
    parser.add_argument("--hot", type=int, default=5, help="hot codes (default 5)")
    parser.add_argument("--hot-uses", type=int, default=100_000, help="uses per hot code (default 100000)")
    a = parser.parse_args(argv)
    fresh = a.fresh if a.fresh is not None else max(a.duration, 5) * FRESH_PER_SECOND
    if min(a.users, a.spawn_rate, a.duration, fresh, a.hot, a.hot_uses) <= 0:
        parser.error("every number must be positive")
    return Options(a.users, a.spawn_rate, a.duration, a.scenarios, a.results.resolve(), fresh, a.hot, a.hot_uses)


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A scratch dir under .local/ (git-ignored) for the servers' data and the plaintext codes, removed after."""
    (ROOT / ".local").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="loadtest-", dir=ROOT / ".local"))
    # Traversable (not listable) by others: as root, Postgres runs as `postgres` and must reach its data dir here.
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stack_environ(redis: RedisServer, pg: PostgresServer) -> dict[str, str]:
    """The environment of prepare and the gateway: ours, plus inherited RGW_ tuning (ours wins)."""
    return {
        **os.environ,
        "RGW_REDIS_URL": redis.url,
        "RGW_DATABASE_URL": pg.url,
        # A key made for this run only: its codes are worthless anywhere else.
        "RGW_CODE_KEYS": "loadtest:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "RGW_CODE_KEY_ID": "loadtest",
        "RGW_REDIS_DURABILITY": "always",
    }


def prepare(env: dict[str, str], data: Path, options: Options) -> None:
    argv = [sys.executable, "-m", "loadtest.prepare", "--out", str(data), "--fresh", str(options.fresh),
            "--hot", str(options.hot), "--hot-uses", str(options.hot_uses)]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=ROOT, timeout=PREPARE_TIMEOUT_S, check=False)  # noqa: S603
    if result.returncode != 0:
        raise LoadTestError(f"the prepare step failed (exit {result.returncode})")


def _wait_serving(target: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise LoadTestError(f"the gateway on {target} was not SERVING within {GATEWAY_START_TIMEOUT_S}s")


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def gateway(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`rgw serve` with the ledger writer in-process, on a free port; yields its target and process."""
    target = f"127.0.0.1:{free_port()}"
    env = {**env, "RGW_GRPC_ADDR": target, "RGW_SERVE_WRITER": "true", "RGW_METRICS_ADDR": "",
           "RGW_WRITER_METRICS_ADDR": "", "RGW_SHUTDOWN_GRACE_SECONDS": "5"}  # fmt: skip
    with log_path.open("wb") as log:
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop the gateway before its stores.
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_serving(target, proc)
        yield target, proc
    finally:
        _stop(proc, GATEWAY_STOP_TIMEOUT_S)


def locust_argv(options: Options, target: str, data: Path) -> list[str]:
    prefix = options.results / PREFIX
    return [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "-u", str(options.users), "-r", str(options.spawn_rate), "-t", f"{options.duration_s}s",
        "--stop-timeout", str(LOCUST_STOP_TIMEOUT_S), "--host", target, "--rgw-data", str(data),
        "--csv", str(prefix), "--html", str(prefix) + ".html", "--exit-code-on-error", "1",
        *options.scenarios,
    ]  # fmt: skip


def run_locust(options: Options, target: str, data: Path) -> int:
    """Locust's exit code; it is stopped (reports written) if it overruns its time."""
    proc = subprocess.Popen(locust_argv(options, target, data), cwd=ROOT)  # noqa: S603
    try:
        return proc.wait(options.duration_s + LOCUST_MARGIN_S)
    except subprocess.TimeoutExpired:
        print(f"locust overran {options.duration_s + LOCUST_MARGIN_S}s; stopping it", file=sys.stderr)
        return _stop(proc, 30) or 1
    finally:
        _stop(proc, 30)


def _rows(path: Path) -> int:
    """Data rows of a Locust CSV (its header excluded); -1 when it is missing."""
    if not path.exists():
        return -1
    with path.open(newline="") as handle:
        return max(sum(1 for _ in csv.reader(handle)) - 1, 0)


def request_counts(path: Path) -> dict[tuple[str, str], int]:
    """Calls per (scenario, name) in Locust's stats CSV; empty when it is missing."""
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {(row["Type"], row["Name"]): int(row["Request Count"]) for row in csv.DictReader(handle)}


def risk_summary(counts: dict[tuple[str, str], int]) -> tuple[dict[str, int], dict[str, int]]:
    """The attacker's calls by kind (lockout declines apart), and the honest scenarios' risk declines and quota
    refusals by name."""
    attacker = {kind: counts.get(("Attacker", name), 0) for kind, name in ATTACKER_ROWS.items()}
    honest = {f"{kind} {name}": n for (kind, name), n in counts.items()
              if kind in HONEST and ("RISK_DENIED" in name or "RESOURCE_EXHAUSTED" in name)}  # fmt: skip
    return attacker, honest


def verdict(options: Options, locust_code: int, gateway_code: int) -> list[str]:
    """What went wrong; empty when the run passed."""
    problems = []
    _, honest = risk_summary(request_counts(options.results / f"{PREFIX}_stats.csv"))
    if honest:
        problems.append(f"honest scenarios met risk declines: {honest}")
    if locust_code != 0:
        problems.append(f"locust exited {locust_code}")
    for kind in ("failures", "exceptions"):
        rows = _rows(options.results / f"{PREFIX}_{kind}.csv")
        if rows != 0:
            problems.append(f"{PREFIX}_{kind}.csv " + ("is missing" if rows < 0 else f"has {rows} row(s)"))
    if gateway_code != 0:
        problems.append(f"the gateway exited {gateway_code} (see {PREFIX}_gateway.log)")
    return problems


def run(options: Options) -> int:
    """The whole run; the exit status."""
    options.results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with work_dir() as work, RedisServer.start(data_dir=work / "redis") as redis, \
            PostgresServer.start(data_dir=work / "postgres") as pg:  # fmt: skip
        env = stack_environ(redis, pg)
        prepare(env, work / "data", options)
        with gateway(env, options.results / f"{PREFIX}_gateway.log") as (target, proc):
            locust_code = run_locust(options, target, work / "data")
            if proc.poll() is not None:
                print(f"the gateway died during the run (exit {proc.returncode})", file=sys.stderr)
        gateway_code = proc.returncode
    problems = verdict(options, locust_code, gateway_code)
    if "Attacker" in options.scenarios:
        attacker, _ = risk_summary(request_counts(options.results / f"{PREFIX}_stats.csv"))
        print("attacker: " + ", ".join(f"{n} {kind}" for kind, n in attacker.items()))
    print(f"\nloadtest: {'FAILED: ' + '; '.join(problems) if problems else 'passed'} in "
          f"{time.monotonic() - started:.0f}s; reports in {options.results}")  # fmt: skip
    return 1 if problems else 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI timeout, a test harness) unwinds like Ctrl-C, so the servers and children are stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(options)
    except LoadTestError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
