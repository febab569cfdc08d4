"""One benchmark server process: the gateway's server stack (same settings, same process model, same
interceptors, same logging) serving one variant - `redeem` (the production servicer), `ceiling` or `peer`
(loadtest.servicers); `ceiling-bare`: the ceiling without any server interceptor; `ceiling-unobserved` and
`redeem-unobserved`: the ceiling and redeem without the outermost one (Observe: metrics, request id, access log) -
to measure what the interceptors cost.

Logging is set up as `rgw serve` sets it up (gateway.logs: a bounded queue, a writer thread, RGW_LOG_FORMAT lines
on stderr, which loadtest/stack.py sends to a file per process, as a container runtime would).

Usage: RGW_... python -m loadtest.bench_server VARIANT. Several processes may share the port (SO_REUSEPORT), as with
RGW_WORKERS.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import asyncpg
import grpc
import uvloop

from gateway import logs
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.service import RedemptionService
from gateway.settings import Settings
from loadtest.servicers import CeilingServicer, PeerServicer

SERVERS = ("redeem", "redeem-unobserved", "ceiling", "ceiling-unobserved", "ceiling-bare", "peer")
UNOBSERVED = "-unobserved"


async def serve(variant: str, settings: Settings) -> None:
    pool: Any = None
    register = None
    if variant.startswith("ceiling"):

        def register(server: grpc.aio.Server, service: RedemptionService, s: Settings) -> None:
            pb_grpc.add_RedemptionServiceServicer_to_server(CeilingServicer(), server)  # type: ignore[abstract]

    elif variant == "peer":
        pool = await asyncpg.create_pool(settings.database_url, min_size=16, max_size=16)

        def register(server: grpc.aio.Server, service: RedemptionService, s: Settings) -> None:
            peer = PeerServicer(pool, s.keyring())  # type: ignore[abstract]  # bench-only: Redeem and RedeemStream
            pb_grpc.add_RedemptionServiceServicer_to_server(peer, server)

    interceptors: list[grpc.aio.ServerInterceptor] | None = [] if variant == "ceiling-bare" else None
    gateway = Gateway(settings=settings, keyring=settings.keyring(), register=register, interceptors=interceptors,
                      observe=not variant.endswith(UNOBSERVED))  # fmt: skip
    await gateway.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
    if pool is not None:
        await pool.close()


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) == 2 else ""
    if variant not in SERVERS:
        raise SystemExit(f"variant must be one of {', '.join(SERVERS)}")
    settings = Settings.from_env()
    stop_logging = logs.configure(settings.log_level, settings.log_format, access=settings.access_log)  # as rgw does
    try:
        uvloop.run(serve(variant, settings))
    finally:
        stop_logging()  # the writer thread's queue, flushed


if __name__ == "__main__":
    main()
