"""Prometheus metrics of the gateway process, and the /metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics, start_http_server

# The *_created series double the output and say nothing an operator needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

REDIS_DURABILITY = Gauge(
    "rgw_redis_durability_info",
    "Redis persistence the gateway verified at start-up; loss_window is what a Redis crash can lose",
    ["required", "appendfsync", "loss_window"],
)


def start_metrics_server(addr: str) -> None:
    """Serve /metrics on host:port from a daemon thread (never on the event loop)."""
    host, _, port = addr.rpartition(":")
    start_http_server(int(port), addr=host)


RISK_DECISIONS = Counter(
    "rgw_risk_decisions_total",
    "Risk findings: enforced denials and shadow-mode hits (would have denied), by rule and reason",
    ["rule", "reason", "mode"],
)


def risk_decision(rule: str, reason: str, mode: str) -> None:
    """Count one risk finding (rule and reason are the engine's fixed vocabularies: bounded labels)."""
    RISK_DECISIONS.labels(rule, reason, mode).inc()
