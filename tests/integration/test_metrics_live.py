"""Real processes, scraped like Prometheus scrapes them: `rgw serve` with two workers (one metrics port each) and
`rgw writer`. The totals add up across the workers, every metric the alerts and the dashboard use is exported,
the writer's health names its dependencies, and the JSON logs of the run hold no code and no API key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway import codes
from gateway.coderefs import KeyRing
from gateway.dev.processes import HOST, free_port
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.inventory.model import create_sku
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.conftest import gateway_environ
from tests.deploy.metric_names import alert_metric_names, dashboard_metric_names
from tests.integration.conftest import DAY_MS, Tenants, issue_campaign
from tests.integration.grpc_helpers import redeem_request

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING
Sample = tuple[str, dict[str, str], float]


def _consecutive_free_ports() -> int:
    """A port p with p and p + 1 free (worker i serves metrics on p + i)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port + 1))
            except OSError:
                continue
        return port


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(v for n, got, v in samples if n == name and all(got.get(k) == w for k, w in labels.items()))


@dataclass
class Stack:
    target: str
    gateway_metrics: tuple[int, int]
    writer_metrics: int
    writer_health: int
    logs: list[Path]


async def _until(check: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if callable(check) and await check():
                return
        except (OSError, grpc.aio.AioRpcError):
            pass  # not up yet
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


async def _status(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest_asyncio.fixture(loop_scope="session")
async def stack(redis_url: str, migrated: str, tmp_path: Path) -> AsyncIterator[Stack]:
    metrics, port = _consecutive_free_ports(), free_port()
    writer_metrics, writer_health = free_port(), free_port()
    env = {
        **os.environ,
        **gateway_environ(
            redis_url, migrated, RGW_GRPC_ADDR=f"{HOST}:{port}", RGW_WORKERS="2", RGW_METRICS_ADDR=f"{HOST}:{metrics}",
            RGW_WRITER_METRICS_ADDR=f"{HOST}:{writer_metrics}", RGW_WRITER_HEALTH_ADDR=f"{HOST}:{writer_health}",
            RGW_LOG_FORMAT="json", RGW_HEALTH_INTERVAL_SECONDS="0.2", RGW_WRITER_BATCH_WAIT_MS="20",
            RGW_INVENTORY_STOCK_SECONDS="0.2",
        ),
    }  # fmt: skip
    logs = [tmp_path / "gateway.log", tmp_path / "writer.log"]
    processes = []
    for command, log in zip(("serve", "writer"), logs, strict=True):
        with log.open("wb") as out:
            processes.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", command], env=env, stderr=out))
    try:
        yield Stack(f"{HOST}:{port}", (metrics, metrics + 1), writer_metrics, writer_health, logs)
    finally:
        _stop(processes)


async def test_two_workers_and_a_writer_export_what_operations_rely_on(
    stack: Stack, db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, tenants: Tenants
) -> None:
    now_ms = time.time_ns() // 1_000_000
    issued = await issue_campaign(
        db,
        redis,
        keyring,
        tmp_path / "live.txt",
        count=24,
        valid_from_ms=now_ms - DAY_MS,
        valid_until_ms=now_ms + DAY_MS,
    )
    key = tenants.keys["internal"]
    # a SKU, so that the writer's stock gauges have a series to export
    await create_sku(db, redis, brand_id=1, code="live-month", name="Live month card")
    await _until(lambda: _all_up(stack), "both workers' metrics and the writer's health")
    await _until(lambda: _serving(stack.target), "the gateway to serve")

    async def redeem(code: str, idempotency_key: str, store: str = "store-1") -> None:
        # a channel per call: a new connection, which the kernel spreads over the workers (SO_REUSEPORT)
        async with authenticated_channel(stack.target, key) as channel:
            await pb_grpc.RedemptionServiceStub(channel).Redeem(redeem_request(code, idempotency_key, store=store))

    for i, code in enumerate(issued.codes[:20]):
        await redeem(code, f"first-{i}")
    for i, code in enumerate(issued.codes[:4]):
        await redeem(code, f"again-{i}")  # declines: ALREADY_REDEEMED
    await redeem(issued.codes[20], "moved", store="store-2")  # a risk denial (till-1 belongs to store-1)
    canary = codes.generate(codes.Route(issued.campaign.id, 0))
    await redeem(canary, "unknown")  # NOT_FOUND
    await _faults(stack.target, key, issued.codes[21])

    gateway = [scrape(p) for p in stack.gateway_metrics]
    per_worker = [total(s, "grpc_server_handled_total", grpc_method="Redeem", grpc_code="OK") for s in gateway]
    assert sum(per_worker) == 26 and all(n > 0 for n in per_worker), per_worker
    both = [sample for samples in gateway for sample in samples]
    assert total(both, "rgw_redemption_outcomes_total", method="Redeem", outcome="redeemed") == 20
    assert total(both, "rgw_redemption_outcomes_total", outcome="already_redeemed") == 4
    assert total(both, "rgw_redemption_outcomes_total", outcome="risk_denied", reason="TERMINAL_STORE_MISMATCH") == 1
    assert total(both, "grpc_server_handling_seconds_count", grpc_method="Redeem") == sum(
        total(s, "grpc_server_handled_total", grpc_method="Redeem") for s in gateway
    )

    async def drained() -> bool:
        return total(scrape(stack.writer_metrics), "rgw_ledger_rows_written_total") == 20

    await _until(drained, "the writer to record the 20 redemptions")

    async def stock_exported() -> bool:
        return any(name == "rgw_inventory_low" for name, _, _ in scrape(stack.writer_metrics))

    await _until(stock_exported, "the writer to export the stock gauges")
    writer = scrape(stack.writer_metrics)
    exported = {name for name, _, _ in [*both, *writer]}
    used = alert_metric_names() | dashboard_metric_names()
    assert used, "no metric names found in the alerts and the dashboard"
    assert not used - exported, f"used by alerts or dashboard but exported by nobody: {sorted(used - exported)}"
    for service in ("", "rgw.live", "rgw.redis", "rgw.postgres"):
        assert await _status(f"{HOST}:{stack.writer_health}", service) == SERVING, service

    secrets = [*issued.codes, canary, key, *tenants.keys.values()]
    lines = [line for log in stack.logs for line in log.read_text().splitlines() if line.strip()]
    access = [doc for doc in map(json.loads, lines) if doc["logger"] == "rgw.access"]  # every line is JSON
    assert sum(1 for doc in access if doc["method"] == "Redeem") >= 28
    assert not [s for s in secrets if any(s in line for line in lines)], "a code or key was logged"


async def _all_up(stack: Stack) -> bool:
    for port in (*stack.gateway_metrics, stack.writer_metrics):
        scrape(port)
    return bool(await _status(f"{HOST}:{stack.writer_health}", "") == SERVING)


async def _serving(target: str) -> bool:
    return bool(await _status(target, "redemption.v1.RedemptionService") == SERVING)


async def _faults(target: str, key: str, code: str) -> None:
    """An unknown key, a bad request, and a stream with a refused item: the labelled series that only exist once
    something went wrong must exist for the alerts' sake."""
    async with authenticated_channel(target, "rgw_test_" + "a" * 12 + "_" + "b" * 32) as stranger:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.RedemptionServiceStub(stranger).Redeem(redeem_request(code, "k"))
    async with authenticated_channel(target, key) as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Redeem(redeem_request("", "k"))
        item = redeem_request(code, "bad key!")

        async def requests() -> AsyncIterator[pb.RedeemStreamRequest]:
            yield pb.RedeemStreamRequest(batch_id="b", items=[item])

        replies = [reply async for reply in stub.RedeemStream(requests())]
        assert replies[0].results[0].HasField("error")
