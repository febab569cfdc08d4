"""The writer's gRPC health service: `rgw.redis` (and `rgw.risk_redis`), `rgw.postgres`, `rgw.live`, and the
overall "" that Kubernetes' readiness probe asks (gateway/grpc_api/health_checks.py does the checking)."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2_grpc

from gateway.grpc_api.health_checks import Check, ComponentHealth
from gateway.redis_client import RedisClient
from gateway.settings import Settings


class WriterHealth:
    """A small grpc.aio server with only the health service, and the checks that feed it."""

    def __init__(self, settings: Settings, clients: dict[str, RedisClient]) -> None:
        self._settings = settings
        self._pg: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.servicer = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        checks = [Check(name, partial(_ping, redis)) for name, redis in clients.items()]
        checks.append(Check("postgres", self._postgres))
        timeout = max(settings.redis_timeout_seconds, 2.0)
        self.checks = ComponentHealth(self.servicer, checks, overall=("",), timeout_s=timeout)

    async def start(self) -> None:
        """Bind RGW_WRITER_HEALTH_ADDR, run the first round of checks, then keep checking."""
        self.server.add_insecure_port(self._settings.writer_health_addr)
        await self.server.start()
        await self.checks.start()
        self._task = asyncio.create_task(self.checks.run(self._settings.health_interval_seconds))

    async def stop(self) -> None:
        """NOT_SERVING first, then stop serving and close the probe connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
        await self.server.stop(1)
        if self._pg is not None:
            self._pg.terminate()

    async def _postgres(self) -> str:
        """SELECT 1 on a connection kept for probing (a new one per check would churn Postgres' backends)."""
        if self._pg is None or self._pg.is_closed():
            self._pg = await asyncpg.connect(self._settings.database_url, timeout=5)
        try:
            await self._pg.fetchval("SELECT 1")
        except BaseException:
            self._pg.terminate()
            self._pg = None
            raise
        return ""


async def _ping(redis: RedisClient) -> str:
    await redis.ping()
    return ""
