"""Wiring of `rgw writer` (and the optional writer inside `rgw serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from functools import partial

import asyncpg

from gateway.clock import SystemClock
from gateway.gateway_metrics import set_build_info, start_metrics_server
from gateway.inventory.status import run_stock_exporter
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings


def writer_config(settings: Settings) -> WriterConfig:
    """The writer's knobs from the settings."""
    return WriterConfig(
        batch_size=settings.writer_batch_size,
        batch_wait_s=settings.writer_batch_wait_ms / 1000,
        claim_idle_ms=settings.writer_claim_idle_ms,
        max_attempts=settings.writer_max_attempts,
        backoff_max_s=settings.writer_backoff_max_seconds,
    )


def consumer_name(settings: Settings) -> str:
    """This writer's name in the consumer groups."""
    return settings.writer_consumer or f"{socket.gethostname()}-{os.getpid()}"


async def run_writer(settings: Settings, stop: asyncio.Event, *, serve_metrics: bool = True) -> None:
    """Run one writer until `stop` is set (with its metrics and health endpoints unless inside `rgw serve`)."""
    if serve_metrics and settings.writer_metrics_addr:
        set_build_info()
        start_metrics_server(settings.writer_metrics_addr)
    # on a cluster, one client reaches every node's outboxes: each stream is read on the node owning its slot
    targets = {"redis": settings.redis_target}
    if settings.risk_redis_url and settings.risk_redis_url != settings.redis_url:
        targets["risk_redis"] = (settings.risk_redis_url, "auto")  # the risk-event streams live there
    clients = {
        name: connect(*target, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 5))
        for name, target in targets.items()
    }
    try:
        async with _health(settings, clients, enabled=serve_metrics):
            # the inventory's stock gauges are exported by the writer: one process per deployment, beside the ledger
            exporter = run_stock_exporter(
                partial(asyncpg.connect, settings.database_url, timeout=10),
                clients["redis"],
                stop,
                clock=SystemClock(),
                interval_s=settings.inventory_stock_seconds,
            )
            await asyncio.gather(exporter, *(_run_one(settings, redis, stop) for redis in clients.values()))
    finally:
        for redis in clients.values():
            await redis.aclose()


async def _run_one(settings: Settings, redis: RedisClient, stop: asyncio.Event) -> None:
    connect_pg = partial(asyncpg.connect, settings.database_url, timeout=10, command_timeout=60)
    writer = LedgerWriter(Outbox(redis, consumer=consumer_name(settings)), connect_pg, writer_config(settings))
    await writer.run(stop)


@contextlib.asynccontextmanager
async def _health(settings: Settings, clients: dict[str, RedisClient], *, enabled: bool) -> AsyncIterator[None]:
    """The writer's gRPC health service (RGW_WRITER_HEALTH_ADDR): its Redis servers and Postgres, checked every
    RGW_HEALTH_INTERVAL_SECONDS."""
    if not (enabled and settings.writer_health_addr):
        yield
        return
    from gateway.ledger.health_server import WriterHealth  # grpc only where it is served

    health = WriterHealth(settings, clients)
    await health.start()
    try:
        yield
    finally:
        await health.stop()
