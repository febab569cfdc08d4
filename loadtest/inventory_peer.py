"""The inventory benchmark's peer (loadtest/bench_inventory.py; never in production): card secrets dispensed the way
well-built peers do it, in Postgres (fsync and synchronous_commit on), one transaction per order -

    SELECT ... FROM peer_secrets WHERE sku_id = $1 AND state = 'available' AND expires_at > now()
    ORDER BY expires_at, id LIMIT $n FOR UPDATE SKIP LOCKED
    UPDATE those rows to 'dispensed' with the order id; INSERT the order (UNIQUE (brand, order id)); COMMIT

- served by InventoryService.Dispense on the gateway's own server stack (same interceptors, auth, logging, process
model), with the same validation, SKU lookup, fingerprint and answers as the real servicer: its secrets are the
very ciphertexts the import sealed (copied from `secrets`), decrypted for the order's answer as the gateway does.
DispenseStream, its batch path, is the real servicer's shape too: a message's orders run concurrently, each its
own transaction on the pool (an order is the unit of atomicity in this design), answered in order.

Run as a server process: RGW_... python -m loadtest.inventory_peer (the gateway's settings, RGW_SECRET_KEYS).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import uvloop

from gateway import logs
from gateway.domain import Caller, ItemFailure
from gateway.grpc_api.auth import current_caller
from gateway.grpc_api.errors import rpc_boundary
from gateway.grpc_api.inventory_servicer import dispense_response, dispense_stream, order_input
from gateway.grpc_api.server import Gateway
from gateway.inventory.loader import expiry_ms
from gateway.inventory.service import (
    UNKNOWN_SKU,
    DispensedSecret,
    InventoryOutcome,
    InventoryService,
    OrderIdReused,
    OrderInput,
    OrderResult,
    SecretKeyRing,
    SkuDirectory,
    check_order,
    order_fingerprint,
    secret_aad,
)
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from gateway.settings import Settings

POOL_SIZE = 16  # Postgres connections per server process, as the redemption peer (loadtest/bench_server.py)

PEER_SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_secrets (
    id bigint PRIMARY KEY, brand_id bigint NOT NULL, sku_id bigint NOT NULL, supplier text NOT NULL,
    expires_at timestamptz NOT NULL, key_id text NOT NULL, nonce bytea NOT NULL, ciphertext bytea NOT NULL,
    state text NOT NULL DEFAULT 'available', order_id text, dispensed_at timestamptz);
CREATE INDEX IF NOT EXISTS peer_secrets_available ON peer_secrets (sku_id, expires_at, id)
    WHERE state = 'available';
CREATE TABLE IF NOT EXISTS peer_orders (
    brand_id bigint NOT NULL, order_id text NOT NULL, fingerprint text NOT NULL, sku_id bigint NOT NULL,
    secret_ids bigint[] NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (brand_id, order_id));
"""
# The same stock as the gateway's: every secret of the SKU, its ciphertext as imported.
LOAD_PEER_SECRETS = """
INSERT INTO peer_secrets (id, brand_id, sku_id, supplier, expires_at, key_id, nonce, ciphertext)
SELECT id, brand_id, sku_id, supplier, expires_at, key_id, nonce, ciphertext FROM secrets WHERE sku_id = $1
ON CONFLICT DO NOTHING"""
_PRIOR = "SELECT fingerprint, secret_ids FROM peer_orders WHERE brand_id = $1 AND order_id = $2"
_TAKE = """SELECT id, supplier, expires_at, key_id, nonce, ciphertext FROM peer_secrets
           WHERE sku_id = $1 AND state = 'available' AND expires_at > now()
           ORDER BY expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"""
_MARK = "UPDATE peer_secrets SET state = 'dispensed', order_id = $2, dispensed_at = now() WHERE id = ANY($1::bigint[])"
_ORDER = "INSERT INTO peer_orders (brand_id, order_id, fingerprint, sku_id, secret_ids) VALUES ($1, $2, $3, $4, $5)"
_BY_IDS = """SELECT id, supplier, expires_at, key_id, nonce, ciphertext FROM peer_secrets
             WHERE id = ANY($1::bigint[]) ORDER BY expires_at, id"""
OUT_OF_STOCK = OrderResult(InventoryOutcome.OUT_OF_STOCK, "OUT_OF_STOCK")


class PeerInventoryServicer(pb_grpc.InventoryServiceServicer):
    """Dispense as a Postgres SKIP LOCKED transaction per order (Hold, Confirm, Release: not benchmarked, so they
    answer UNIMPLEMENTED as the generated base class does)."""

    def __init__(
        self, pool: asyncpg.Pool, skus: SkuDirectory, secret_keys: SecretKeyRing, stream_max_items: int
    ) -> None:
        self._stream_max_items = stream_max_items
        self._pool = pool
        self._skus = skus
        self._keys = secret_keys

    @rpc_boundary
    async def Dispense(self, request: pb.DispenseRequest, context: grpc.aio.ServicerContext) -> pb.DispenseResponse:
        return dispense_response(await self._order(order_input(request), current_caller()), "Dispense")

    async def DispenseStream(
        self, request_iterator: AsyncIterator[pb.DispenseStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DispenseStreamResponse]:
        async for reply in dispense_stream(request_iterator, context, self._many, self._stream_max_items):
            yield reply

    async def _many(self, orders: list[OrderInput], caller: Caller) -> list[OrderResult | ItemFailure]:
        """A message's orders concurrently, each its own transaction."""
        done = await asyncio.gather(*(self._order(o, caller) for o in orders), return_exceptions=True)
        return [r if isinstance(r, OrderResult) else ItemFailure(r) for r in done]  # type: ignore[arg-type]

    async def _order(self, order: OrderInput, caller: Caller) -> OrderResult:
        check_order(order, hold=False)
        sku = await self._skus.get(caller.brand_id, order.sku)
        if sku is None:
            return UNKNOWN_SKU
        fingerprint = order_fingerprint("dispense", order)
        try:
            return await self._dispense(caller.brand_id, sku.id, order.order_id, fingerprint, order.quantity)
        except asyncpg.UniqueViolationError:  # the same order committed meanwhile by a concurrent call: replay it
            return await self._dispense(caller.brand_id, sku.id, order.order_id, fingerprint, order.quantity)

    async def _dispense(
        self, brand_id: int, sku_id: int, order_id: str, fingerprint: str, quantity: int
    ) -> OrderResult:
        async with self._pool.acquire() as conn, conn.transaction():
            prior = await conn.fetchrow(_PRIOR, brand_id, order_id)
            if prior is not None:
                if prior["fingerprint"] != fingerprint:
                    raise OrderIdReused(order_id)
                rows = await conn.fetch(_BY_IDS, list(prior["secret_ids"]))
                return self._answer(rows, brand_id, sku_id, replayed=True)
            rows = await conn.fetch(_TAKE, sku_id, quantity)
            if len(rows) < quantity:
                return OUT_OF_STOCK  # nothing written: the transaction commits empty
            ids = [row["id"] for row in rows]
            await conn.execute(_MARK, ids, order_id)
            await conn.execute(_ORDER, brand_id, order_id, fingerprint, sku_id, ids)
        return self._answer(rows, brand_id, sku_id, replayed=False)

    def _answer(self, rows: list[asyncpg.Record], brand_id: int, sku_id: int, *, replayed: bool) -> OrderResult:
        secrets = tuple(
            DispensedSecret(
                row["id"],
                self._keys.decrypt(
                    row["key_id"], row["nonce"], row["ciphertext"], secret_aad(brand_id, sku_id, row["id"])
                ),
                row["supplier"],
                expiry_ms(row["expires_at"]),
                1,
            )
            for row in rows
        )
        return OrderResult(InventoryOutcome.DISPENSED, "DISPENSED", secrets, replayed)


async def serve(settings: Settings) -> None:
    pool: Any = await asyncpg.create_pool(settings.database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    ring = settings.secret_ring()

    def register_peer(server: grpc.aio.Server, service: InventoryService, settings: Settings) -> None:
        peer = PeerInventoryServicer(pool, SkuDirectory(pool), ring, settings.stream_max_items)  # type: ignore[abstract]
        pb_grpc.add_InventoryServiceServicer_to_server(peer, server)

    # The peer's servicer takes the place of the gateway's InventoryService, on the same server, interceptors and
    # settings.
    gateway = Gateway(settings=settings, keyring=settings.keyring(), register_inventory=register_peer)
    await gateway.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
    await pool.close()


def main() -> None:
    settings = Settings.from_env()
    stop_logging = logs.configure(settings.log_level, settings.log_format, access=settings.access_log)  # as rgw does
    try:
        uvloop.run(serve(settings))
    finally:
        stop_logging()


if __name__ == "__main__":
    main()
