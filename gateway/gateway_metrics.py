"""Prometheus metrics of the gateway process, and the /metrics endpoint.

Every label takes values from a fixed vocabulary (gRPC methods and codes, outcomes, reasons, rules, script names,
dependency names): never a code, terminal, store, key or campaign id, so the series count stays bounded. With
RGW_WORKERS > 1 each worker process serves its own port (gateway/supervisor.py); Prometheus sums the targets.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# The *_created series double the output and say nothing an operator needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

REDIS_DURABILITY = Gauge(
    "rgw_redis_durability_info",
    "Redis persistence the gateway verified at start-up; loss_window is what a Redis crash can lose",
    ["required", "appendfsync", "loss_window"],
)
BUILD_INFO = Gauge("rgw_build_info", "The running build (always 1)", ["version", "python_version", "grpc_version"])
DEPENDENCY_UP = Gauge(
    "rgw_dependency_up", "1 while the process's last health check of a dependency passed", ["dependency"]
)
LOG_RECORDS_DROPPED = Counter(
    "rgw_log_records_dropped_total", "Log records dropped because the log writer thread fell behind"
)

# go-grpc-middleware's names and labels, so existing dashboards and SLO tooling work unchanged.
_GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code", [*_GRPC_LABELS, "grpc_code"]
)
GRPC_RECEIVED = Counter("grpc_server_msg_received_total", "RPC messages received by the server", _GRPC_LABELS)
GRPC_SENT = Counter("grpc_server_msg_sent_total", "RPC messages sent by the server", _GRPC_LABELS)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status (no grpc_code label, as in go-grpc-middleware)",
    _GRPC_LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

REDEMPTION_OUTCOMES = Counter(
    "rgw_redemption_outcomes_total",
    "Answers given, by method, outcome and reason (one per item on streams)",
    ["method", "outcome", "reason"],
)
STREAM_ITEM_ERRORS = Counter(
    "rgw_stream_item_errors_total", "RedeemStream items answered with an ItemError, by its code", ["grpc_code"]
)
AUTH_FAILURES = Counter("rgw_auth_failures_total", "Calls refused before their handler, by kind", ["kind"])
RISK_DECISIONS = Counter(
    "rgw_risk_decisions_total",
    "Risk findings: enforced denials and shadow-mode hits (would have denied), by rule and reason",
    ["rule", "reason", "mode"],
)
SCRIPT_SECONDS = Histogram(
    "rgw_redis_script_seconds",
    "Round trip of one Redis script call (a whole stream batch is one call)",
    ["script"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


def start_metrics_server(addr: str) -> None:
    """Serve /metrics on host:port from a daemon thread (never on the event loop)."""
    host, _, port = addr.rpartition(":")
    start_http_server(int(port), addr=host)


def set_build_info() -> None:
    """rgw_build_info: which version runs where (a join target for every other series)."""
    BUILD_INFO.labels(_version("redemption-gateway"), platform.python_version(), _version("grpcio")).set(1)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def risk_decision(rule: str, reason: str, mode: str) -> None:
    """Count one risk finding (rule and reason are the engine's fixed vocabularies: bounded labels)."""
    RISK_DECISIONS.labels(rule, reason, mode).inc()


def script_observer(script: str) -> Callable[[float], None]:
    """The observe function of one script's latency series (looked up once; callers time each call)."""
    return SCRIPT_SECONDS.labels(script).observe
