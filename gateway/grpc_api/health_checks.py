"""Health per component behind the standard gRPC health service, so a probe says which dependency is down.

Each check is a coroutine answering "" (healthy) or why not; an exception or a check slower than its timeout means
unhealthy (grpclib's health/check.py). The checks run together every interval, off the request path; each sets
its own health service name (`rgw.<component>`) and `rgw_dependency_up{dependency}`, and the overall names are
SERVING only when every component is. `rgw.live` stays SERVING while the process runs: liveness must not restart
a pod because Redis is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2

from gateway.gateway_metrics import DEPENDENCY_UP

log = logging.getLogger("rgw.health")
LIVE = "rgw.live"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Probe = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Check:
    """One dependency: its name (`rgw.<name>` in the health service, `dependency` in the metric) and its probe."""

    name: str
    probe: Probe


class ComponentHealth:
    """Runs the checks and publishes their verdicts."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        checks: Sequence[Check],
        *,
        overall: Sequence[str],
        timeout_s: float,
    ) -> None:
        self._servicer = servicer
        self._checks = tuple(checks)
        self._overall = tuple(overall)
        self._timeout_s = timeout_s
        self.reasons: dict[str, str] = {}

    async def start(self) -> None:
        """Mark the process live and run the first round (callers may await readiness right after)."""
        await self._servicer.set(LIVE, SERVING)
        await self.check_once()

    async def check_once(self) -> dict[str, str]:
        """One round: every check at once; returns the reasons of the unhealthy ones (empty: all healthy)."""
        verdicts = await asyncio.gather(*(self._run(check) for check in self._checks))
        for check, reason in zip(self._checks, verdicts, strict=True):
            if reason != self.reasons.get(check.name, ""):
                if reason:
                    log.warning("%s is unhealthy: %s", check.name, reason)
                else:
                    log.info("%s is healthy again", check.name)
            self.reasons[check.name] = reason
            DEPENDENCY_UP.labels(check.name).set(0 if reason else 1)
            await self._servicer.set(f"rgw.{check.name}", NOT_SERVING if reason else SERVING)
        status = NOT_SERVING if any(verdicts) else SERVING
        for name in self._overall:
            await self._servicer.set(name, status)
        return {name: reason for name, reason in self.reasons.items() if reason}

    async def run(self, interval_s: float) -> None:
        """Check every interval until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check_once()

    async def _run(self, check: Check) -> str:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await check.probe()
        except TimeoutError:
            return f"no answer within {self._timeout_s:g}s"
        except Exception as exc:  # any failure of a check means "unhealthy", with its kind as the reason
            return f"unreachable ({type(exc).__name__})"
