"""Servicers the benchmark registers on the gateway's own server stack (never in production):

- CeilingServicer: Redeem's request and response types and a handler that does no work - what the stack
  itself costs, the ceiling any Redeem implementation on it can reach.
- PeerServicer: the redemption done the way most voucher systems do it - a Postgres transaction per call with
  SELECT ... FOR UPDATE on the code's row (fsync and synchronous_commit on) - for unary and for the batch path
  (one transaction per message, rows locked in a fixed order). Same validation and code_ref as the gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc

from gateway.clock import SystemClock
from gateway.coderefs import KeyRing
from gateway.domain import Outcome, RedeemCommand, RedeemResult
from gateway.grpc_api.auth import current_caller
from gateway.grpc_api.errors import rpc_boundary
from gateway.grpc_api.servicer import redeem_input, redeem_response
from gateway.ids import uuid7
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_store import idempotency_field
from gateway.validation import check_redeem

PEER_SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_codes (
    code_ref bytea PRIMARY KEY, campaign_id bigint NOT NULL, uses integer NOT NULL, used integer NOT NULL DEFAULT 0,
    valid_from timestamptz NOT NULL, valid_until timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS peer_redemptions (
    redemption_id uuid PRIMARY KEY, code_ref bytea NOT NULL, use_number integer NOT NULL, scope text NOT NULL,
    fingerprint text NOT NULL, store_id text NOT NULL, terminal_id text NOT NULL, redeemed_at timestamptz NOT NULL,
    UNIQUE (code_ref, scope));
"""
LOAD_PEER_CODES = """
INSERT INTO peer_codes (code_ref, campaign_id, uses, valid_from, valid_until)
SELECT ic.code_ref, ic.campaign_id, COALESCE(ic.uses, c.uses_per_code), COALESCE(ic.valid_from, c.valid_from),
       COALESCE(ic.valid_until, c.valid_until)
FROM issued_codes ic JOIN campaigns c ON c.id = ic.campaign_id  -- NULL: the code follows its campaign's rule
WHERE ic.campaign_id = $1
ON CONFLICT DO NOTHING"""


class CeilingServicer(pb_grpc.RedemptionServiceServicer):
    """Does no work: returns one prebuilt answer."""

    def __init__(self) -> None:
        self._answer = pb.RedeemResponse(outcome=pb.OUTCOME_REDEEMED, reason="REDEEMED", uses_left=0)

    async def Redeem(self, request: pb.RedeemRequest, context: grpc.aio.ServicerContext) -> pb.RedeemResponse:
        return self._answer


class PeerServicer(pb_grpc.RedemptionServiceServicer):
    """Redemption as a Postgres row-lock transaction."""

    def __init__(self, pool: asyncpg.Pool, keyring: KeyRing) -> None:
        self._pool = pool
        self._keyring = keyring
        self._clock = SystemClock()

    @rpc_boundary
    async def Redeem(self, request: pb.RedeemRequest, context: grpc.aio.ServicerContext) -> pb.RedeemResponse:
        command = check_redeem(redeem_input(request), self._keyring, current_caller())
        async with self._pool.acquire() as conn, conn.transaction():
            return redeem_response(await self._decide(conn, command, self._clock.now_ms()))

    async def RedeemStream(
        self, request_iterator: AsyncIterator[pb.RedeemStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RedeemStreamResponse]:
        caller = current_caller()
        async for message in request_iterator:
            commands = [check_redeem(redeem_input(item), self._keyring, caller) for item in message.items]
            now = self._clock.now_ms()
            async with self._pool.acquire() as conn, conn.transaction():
                refs = sorted({bytes.fromhex(c.lookup.refs[0].ref) for c in commands})
                # Lock every row of the message up front, in one order, so concurrent messages cannot deadlock.
                await conn.execute(
                    "SELECT 1 FROM peer_codes WHERE code_ref = ANY($1) ORDER BY code_ref FOR UPDATE", refs
                )
                results = [await self._decide(conn, command, now) for command in commands]
            yield pb.RedeemStreamResponse(
                batch_id=message.batch_id,
                results=[pb.RedeemStreamResult(response=redeem_response(r, "RedeemStream")) for r in results],
            )

    async def _decide(self, conn: asyncpg.Connection, command: RedeemCommand, now_ms: int) -> RedeemResult:
        ref = bytes.fromhex(command.lookup.refs[0].ref)
        cid = command.lookup.route.campaign_id
        scope = idempotency_field(command.client_id, command.terminal_id, command.idempotency_key)
        prior = await conn.fetchrow(
            "SELECT redemption_id, fingerprint, use_number, redeemed_at FROM peer_redemptions "
            "WHERE code_ref = $1 AND scope = $2", ref, scope,
        )  # fmt: skip
        if prior is not None:
            at = int(prior["redeemed_at"].timestamp() * 1000)
            return RedeemResult(Outcome.REDEEMED, cid, 0, str(prior["redemption_id"]), at, prior["use_number"], True)
        row = await conn.fetchrow(
            "SELECT uses, used, valid_from, valid_until FROM peer_codes WHERE code_ref = $1 FOR UPDATE", ref
        )
        if row is None:
            return RedeemResult(Outcome.NOT_FOUND, 0, 0)
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        if not row["valid_from"] <= now < row["valid_until"]:
            return RedeemResult(Outcome.EXPIRED if now >= row["valid_until"] else Outcome.NOT_YET_VALID, cid, 0)
        if row["used"] >= row["uses"]:
            return RedeemResult(Outcome.ALREADY_REDEEMED, cid, 0)
        use = row["used"] + 1
        rid = uuid7(now_ms)
        await conn.execute("UPDATE peer_codes SET used = $2 WHERE code_ref = $1", ref, use)
        await conn.execute(
            "INSERT INTO peer_redemptions VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            uuid.UUID(rid), ref, use, scope, command.fingerprint, command.store_id, command.terminal_id, now,
        )  # fmt: skip
        return RedeemResult(Outcome.REDEEMED, cid, row["uses"] - use, rid, now_ms, use)
