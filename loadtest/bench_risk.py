"""The risk engine in `make bench`: the brands and policies the risk variants run under, and the limiter's
accuracy under a concurrent burst.

Three policies, one per question (BENCHMARKS.md names them beside the figures):
- the default brand (`redeem`, `stream`, `redeem-hot`, ...): the engine on with the shipped defaults - rate limits,
  device and code velocity, lockouts and terminal_store enforced; the place and device rules off - except that its
  limits are raised (`HEADROOM_LIMITS`) so they admit the bench's load: the default 2 calls/s per till and
  1,000/s per API client would otherwise decline most of a ramp that offers 6,000/s from 50 tills and one client;
- the risk brand (`redeem-risk`): every rule enforced (`EVERY_RULE`), its stores registered with a location and
  radius, its terminals registered to them, the requests inside both the stores' radius and the campaign region,
  limits high enough that nothing is declined - the comparison is about the cost, not denials;
- the same brand, codes and requests with RGW_RISK_ENGINE=false (`redeem-risk-off`).

The burst: `BURST_FACTOR` x N Redeem calls at once from one terminal whose campaign allows N per minute there;
exactly N must be admitted, the rest RESOURCE_EXHAUSTED with a RetryInfo. With it, `CONTROLS`: one request per
rule that must decline, proving the redeem-risk servers enforce the rules the bench's requests pass.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_client import RedisClient
from gateway.tenancy import admin_risk, admin_store, notify
from loadtest import frames as fr
from risk.model import Rule

ACTOR = "bench"
BIG = 10_000_000  # a limit the bench never reaches: the windows are checked and counted, nothing is declined
HEADROOM_LIMITS: dict[str, Any] = {
    "terminal": {"limit": BIG, "window_s": 60},
    "store": {"limit": BIG, "window_s": 60},
    "client": {"limit": BIG, "window_s": 60},
    "brand": {"limit": BIG, "window_s": 60},
    "device": {"limit": BIG, "window_s": 3600},
    "code": {"limit": BIG, "window_s": 60},
}
# The stores' registered place and radius: every bench request (frames.redeem_request) is within 6 km of it.
STORE_LAT, STORE_LON, STORE_RADIUS_M = 31.28, 121.47, 10_000.0
REGIONS: list[dict[str, Any]] = [
    # A polygon with a hole (the hole well away from the requests), and a circle elsewhere: a request is tested
    # against the circle first, then the polygon.
    {"polygon": {
        "exterior": [[121.0, 31.0], [122.0, 31.0], [122.0, 31.6], [121.0, 31.6]],
        "holes": [[[121.1, 31.05], [121.3, 31.05], [121.3, 31.15], [121.1, 31.15]]],
    }},
    {"circle": {"lat": 39.9, "lon": 116.4, "radius_m": 50_000.0}},
]  # fmt: skip
EVERY_RULE: dict[str, Any] = {
    "modes": {rule.value: "enforce" for rule in Rule},
    "limits": HEADROOM_LIMITS,
    # The default lockouts (no failure happens in the bench, so they are checked, never engaged).
    "terminals": {"unknown": "deny"},  # every bench terminal is registered: an unknown one would show as a denial
    "location": {"missing": "deny", "max_accuracy_m": 1000.0},
    "travel": {"max_speed_kmh": 900.0, "memory_s": 86400},  # a device is always at the same place (frames.py)
    "device_limit": {"uses": 1000},
    "regions": REGIONS,
}
BURST_TERMINAL = "burst-till"
BURST_FACTOR = 5
BURST_CHANNELS = 4  # several connections, so both server processes take part (SO_REUSEPORT spreads connections)


async def prepare_default_brand(conn: asyncpg.Connection, redis: RedisClient, brand_id: int) -> None:
    """The default brand keeps the shipped modes; only its limits get headroom."""
    made = await admin_risk.set_risk_policy(
        conn, actor=ACTOR, brand_id=brand_id, campaign_id=0, document={"limits": HEADROOM_LIMITS}
    )
    await notify.publish(redis, made.version)


async def prepare_risk_brand(conn: asyncpg.Connection, redis: RedisClient) -> tuple[int, str]:
    """A brand with every rule enforced, its stores and terminals registered; returns its id and a client key."""
    brand = (await admin_store.create_brand(conn, actor=ACTOR, slug="bench-risk", name="bench risk")).value
    stores = {}
    for number in range(fr.STORES):
        store = await admin_store.create_store(
            conn, actor=ACTOR, brand_id=brand.id, external_id=f"store-{number}", name=f"bench store {number}",
            latitude=STORE_LAT, longitude=STORE_LON, time_zone="Asia/Shanghai", radius_m=STORE_RADIUS_M,
        )  # fmt: skip
        stores[number] = store.value.id
    for till in range(fr.TERMINALS):
        await admin_store.create_terminal(
            conn, actor=ACTOR, brand_id=brand.id, store_id=stores[till % fr.STORES], external_id=f"till-{till}"
        )
    await admin_store.create_terminal(
        conn, actor=ACTOR, brand_id=brand.id, store_id=stores[0], external_id=BURST_TERMINAL
    )
    await admin_risk.set_risk_policy(conn, actor=ACTOR, brand_id=brand.id, campaign_id=0, document=EVERY_RULE)
    made = await admin_store.create_client(
        conn, actor=ACTOR, brand_id=brand.id, role="internal", label="bench risk", env="test"
    )
    await notify.publish(redis, made.version)
    return brand.id, made.value.plaintext


async def limit_terminal(
    conn: asyncpg.Connection, redis: RedisClient, *, brand_id: int, campaign_id: int, n: int
) -> None:
    """The burst's campaign: N calls per minute per terminal (counted for this campaign alone)."""
    document = {"limits": {"terminal": {"limit": n, "window_s": 60}}}
    made = await admin_risk.set_risk_policy(
        conn, actor=ACTOR, brand_id=brand_id, campaign_id=campaign_id, document=document
    )
    await notify.publish(redis, made.version)


def _far(r: pb.RedeemRequest) -> None:
    r.location.latitude, r.location.longitude = 39.9, 116.4  # in the campaign's circle, 1,000 km from the store


def _unknown_terminal(r: pb.RedeemRequest) -> None:
    r.terminal_id = "till-unregistered"


# What to change in a bench request, and the reason it must then be declined with.
CONTROLS: dict[str, tuple[Any, str]] = {
    "outside the store's radius": (_far, "OUTSIDE_STORE_RADIUS"),
    "unregistered terminal": (_unknown_terminal, "UNKNOWN_TERMINAL"),
    "no location": (lambda r: r.ClearField("location"), "LOCATION_REQUIRED"),
    "no customer device": (lambda r: r.ClearField("customer_device_id"), "DEVICE_REQUIRED"),
}


async def controls(target: str, api_key: str, codes: list[str]) -> dict[str, Any]:
    """One request per control (on its own code); each must be OUTCOME_RISK_DENIED with its reason."""
    found: dict[str, str] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        for (name, (change, _)), code in zip(CONTROLS.items(), codes, strict=True):
            request = fr.redeem_request(code, len(found), tag="control")
            change(request)
            reply = await stub.Redeem(request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=10)
            found[name] = f"{pb.Outcome.Name(reply.outcome)}:{reply.reason}"
    ok = all(found[name] == f"OUTCOME_RISK_DENIED:{reason}" for name, (_, reason) in CONTROLS.items())
    return {"answers": found, "ok": ok}


def burst_request(code: str, n: int) -> pb.RedeemRequest:
    """A bench request (frames.py) from the burst terminal of store-0."""
    request = fr.redeem_request(code, n, tag="burst")
    request.store_id, request.terminal_id = "store-0", BURST_TERMINAL
    return request


def _retry_after_ms(error: grpc.aio.AioRpcError) -> int | None:
    status = rpc_status.from_call(error)  # reads the trailing metadata, which an aio error carries too
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 1_000_000)
    return None


async def _one(stub: Any, request: pb.RedeemRequest, key: str, answers: list[tuple[str, int | None]]) -> None:
    try:
        reply = await stub.Redeem(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        answers.append((pb.Outcome.Name(reply.outcome), None))
    except grpc.aio.AioRpcError as error:
        answers.append((error.code().name, _retry_after_ms(error)))


async def burst(target: str, api_key: str, codes: list[str], limit: int) -> dict[str, Any]:
    """All calls at once (completion order kept); exactly `limit` must be REDEEMED."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(BURST_CHANNELS)]  # fmt: skip
    try:
        stubs = [pb_grpc.RedemptionServiceStub(channel) for channel in channels]
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        answers: list[tuple[str, int | None]] = []
        started = time.perf_counter()
        requests = [burst_request(code, n) for n, code in enumerate(codes)]
        await asyncio.gather(*(_one(stubs[n % len(stubs)], r, api_key, answers) for n, r in enumerate(requests)))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    counts: dict[str, int] = {}
    for name, _ in answers:
        counts[name] = counts.get(name, 0) + 1
    retry = [after for name, after in answers if name == "RESOURCE_EXHAUSTED"]
    admitted = counts.get("OUTCOME_REDEEMED", 0)
    return {
        "limit": limit, "calls": len(codes), "seconds": round(elapsed, 3), "answers": counts, "admitted": admitted,
        "exact": admitted == limit and counts.get("RESOURCE_EXHAUSTED", 0) == len(codes) - limit,
        "first_throttled_retry_after_ms": retry[0] if retry else None,
        "retry_after_ms_range": [min(r for r in retry if r is not None), max(r for r in retry if r is not None)]
        if any(r is not None for r in retry) else None,
    }  # fmt: skip
