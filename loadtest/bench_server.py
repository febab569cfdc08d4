"""One benchmark server process: the gateway's server stack (same settings, same process model, same
interceptors) serving one variant - `redeem` (the production servicer), `ceiling` or `peer` (loadtest.servicers), or
`ceiling-bare`: the ceiling without the server interceptors, to measure what they cost.

Usage: RGW_... python -m loadtest.bench_server {redeem,ceiling,ceiling-bare,peer}. Several processes may share the port
(SO_REUSEPORT), as with RGW_WORKERS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import asyncpg
import grpc
import uvloop

from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.service import RedemptionService
from gateway.settings import Settings
from loadtest.servicers import CeilingServicer, PeerServicer


async def serve(variant: str, settings: Settings) -> None:
    pool: Any = None
    register = None
    if variant in ("ceiling", "ceiling-bare"):

        def register(server: grpc.aio.Server, service: RedemptionService, s: Settings) -> None:
            pb_grpc.add_RedemptionServiceServicer_to_server(CeilingServicer(), server)  # type: ignore[abstract]

    elif variant == "peer":
        pool = await asyncpg.create_pool(settings.database_url, min_size=16, max_size=16)

        def register(server: grpc.aio.Server, service: RedemptionService, s: Settings) -> None:
            peer = PeerServicer(pool, s.keyring())  # type: ignore[abstract]  # bench-only: Redeem and RedeemStream
            pb_grpc.add_RedemptionServiceServicer_to_server(peer, server)

    interceptors: list[grpc.aio.ServerInterceptor] | None = [] if variant == "ceiling-bare" else None
    gateway = Gateway(settings=settings, keyring=settings.keyring(), register=register, interceptors=interceptors)
    await gateway.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
    if pool is not None:
        await pool.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    variant = sys.argv[1]
    if variant not in ("redeem", "ceiling", "ceiling-bare", "peer"):
        raise SystemExit("variant must be redeem, ceiling, ceiling-bare or peer")
    uvloop.run(serve(variant, Settings.from_env()))


if __name__ == "__main__":
    main()
