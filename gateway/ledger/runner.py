"""Wiring of `rgw writer` (and the optional writer inside `rgw serve`)."""

from __future__ import annotations

import asyncio
import os
import socket
from functools import partial

import asyncpg

from gateway.gateway_metrics import start_metrics_server
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.redis_store import connect
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
    """Run one writer until `stop` is set."""
    if serve_metrics and settings.writer_metrics_addr:
        start_metrics_server(settings.writer_metrics_addr)
    urls = [settings.redis_url]
    if settings.risk_redis_url and settings.risk_redis_url != settings.redis_url:
        urls.append(settings.risk_redis_url)  # the risk-event streams live there (RGW_RISK_REDIS_URL)
    await asyncio.gather(*(_run_one(settings, url, stop) for url in urls))


async def _run_one(settings: Settings, url: str, stop: asyncio.Event) -> None:
    redis = connect(url, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 5))
    connect_pg = partial(asyncpg.connect, settings.database_url, timeout=10, command_timeout=60)
    writer = LedgerWriter(Outbox(redis, consumer=consumer_name(settings)), connect_pg, writer_config(settings))
    try:
        await writer.run(stop)
    finally:
        await redis.aclose()
