"""Small helpers for calling the gateway over a real channel in tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from redis.asyncio import Redis

from gateway import keys
from gateway.ledger.events import decode_event
from gateway.pb.redemption.v1 import redemption_pb2 as pb


def redeem_request(
    code: str, key: str, *, store: str = "store-1", terminal: str = "till-1", **extra: object
) -> pb.RedeemRequest:
    return pb.RedeemRequest(code=code, idempotency_key=key, store_id=store, terminal_id=terminal, **extra)  # type: ignore[arg-type]


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations a failed call carried."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


RISK_KEYS = "rgw:{r"
# Kept current by each gateway's background upkeep (it lists every brand's risk-event stream every second), not by
# the requests a snapshot is taken around.
DIRECTORY = "rgw:outboxes"


async def redis_snapshot(redis: Redis, *, with_risk: bool = False) -> dict[str, object]:
    """Every key's logical content (DUMP is not stable: a hash may be re-ordered by rehashing on reads). The risk
    engine's counters (risk/keys.py) only with `with_risk`: every attempt counts there by design (its own tests
    assert what), while the codes' state must not change. Never the outbox directory (see DIRECTORY). The
    campaigns' decision counters (keys.stats_key) are in: a decided Redeem counts there, so a test that expects
    declines compares them with `decision_counts` and the rest with `without_decision_counts`."""
    state: dict[str, object] = {}
    for raw in await redis.keys("*"):
        key = str(raw)
        if key == DIRECTORY or (key.startswith(RISK_KEYS) and not with_risk):
            continue
        kind = await redis.type(key)
        if kind == "hash":
            state[key] = await redis.hgetall(key)
        elif kind == "stream":
            state[key] = await redis.xrange(key)
        else:
            state[key] = await redis.dump(key)
    return state


STATS = ":stats:"  # gateway/keys.py stats_key


def decision_counts(snapshot: Mapping[str, object]) -> Counter[str]:
    """The decision counters of a snapshot, summed over campaign shards and minutes: reason -> count."""
    total: Counter[str] = Counter()
    for key, fields in snapshot.items():
        if STATS in key:
            total.update({reason: int(n) for reason, n in cast(dict[str, str], fields).items()})
    return total


def without_decision_counts(snapshot: Mapping[str, object]) -> dict[str, object]:
    """A snapshot without the decision counters."""
    return {key: value for key, value in snapshot.items() if STATS not in key}


async def outbox_events(redis: Redis, campaign_id: int, shard: int = 0) -> list[dict[str, str]]:
    """The events in a campaign shard's outbox, oldest first, decoded."""
    entries: Any = await redis.xrange(keys.outbox_key(campaign_id, shard))
    return [decode_event(fields) for _, fields in entries]


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    """What the standard health service says of `service` ("" : the whole server)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def until_health(channel: grpc.aio.Channel, status: int, service: str = "") -> None:
    """Wait (up to ~10 s) until `service` reports `status`."""
    for _ in range(200):
        if await health_status(channel, service) == status:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"health of {service!r} never became {status}")
