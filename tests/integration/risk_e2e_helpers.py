"""Shared by the end-to-end risk tests (test_risk_e2e.py, test_risk_lockout.py, test_risk_policies_live.py): brand
1's policy applied on the running gateway, places around store-1, RPC helpers, the risk_events record read back
through the real ledger writer, and the google.rpc details of a caller-quota refusal."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway import codes
from gateway.coderefs import KeyRing
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.tenancy import admin_risk, admin_store, notify
from gateway.tenancy.model import Store
from gateway.validation import lookup_code
from tests.integration.conftest import RunningGateway

BRAND = 1  # the `issue` fixture's campaigns and the `gateway` fixture's callers are brand 1's
ACTOR = "tests"
STORE_1 = (31.23, 121.47)  # where the tenants fixture registered store-1 (Shanghai), radius 300 m
AT_STORE_1 = pb.Location(latitude=31.2302, longitude=121.4703, accuracy_m=15.0)  # ~40 m from it
FAR_NORTH = pb.Location(latitude=33.93, longitude=121.47, accuracy_m=15.0)  # 300 km north of store-1
BEIJING = pb.Location(latitude=39.9042, longitude=116.4074, accuracy_m=20.0)  # ~1070 km from store-1
APPLY_BOUND_S = 5.0
FAST = WriterConfig(batch_size=500, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)
_keys = itertools.count()


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str, bound_s: float = APPLY_BOUND_S) -> float:
    """Poll `predicate` until it holds; the seconds it took. AssertionError naming `what` past the bound."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not within {bound_s}s")


async def announce(gw: RunningGateway, db: asyncpg.Connection, redis: Redis) -> int:
    """Announce the registry's current version and wait until the running gateway holds it; returns it."""
    version: int = await db.fetchval("SELECT version FROM registry_version")
    await notify.publish(redis, version)

    async def held() -> bool:
        return gw.gateway.registry.version >= version

    await eventually(held, f"registry version {version} on the gateway")
    return version


async def apply_policy(
    gw: RunningGateway, db: asyncpg.Connection, redis: Redis, document: Mapping[str, Any], *, campaign_id: int = 0
) -> None:
    """Store brand 1's (campaign_id 0) or one of its campaigns' policy document and wait until the gateway has it.

    A brand document replaces the tenants fixture's HAMMER_POLICY whole: limits and lockouts not named take their
    built-in defaults again (generous enough for every test here but the ones that set their own)."""
    await admin_risk.set_risk_policy(db, actor=ACTOR, brand_id=BRAND, campaign_id=campaign_id, document=document)
    await announce(gw, db, redis)


def only(**sections: Any) -> dict[str, Any]:
    """A brand document with every limit and lockout removed except the sections given (which replace those
    keys): one rule is tested alone, never tripped by another's default."""
    limits: dict[str, Any] = dict.fromkeys(("client", "terminal", "store", "brand", "device", "code"))
    lockout: dict[str, Any] = dict.fromkeys(("terminal", "store", "client"))
    return {
        **sections,
        "limits": {**limits, **sections.get("limits", {})},
        "lockout": {**lockout, **sections.get("lockout", {})},
    }


async def add_store(
    db: asyncpg.Connection, external_id: str, *, at: tuple[float, float], terminals: tuple[str, ...] = ()
) -> Store:
    """Register another store of brand 1 (radius 300 m) with its terminals; announce it with `announce`."""
    store = (
        await admin_store.create_store(
            db, actor=ACTOR, brand_id=BRAND, external_id=external_id, name=external_id, latitude=at[0],
            longitude=at[1], time_zone="Asia/Shanghai",
        )
    ).value  # fmt: skip
    for terminal in terminals:
        await admin_store.create_terminal(db, actor=ACTOR, brand_id=BRAND, store_id=store.id, external_id=terminal)
    return store


def request(code: str, *, store: str = "store-1", terminal: str = "till-1", **fields: Any) -> pb.RedeemRequest:
    """A RedeemRequest with a fresh idempotency key (unless `idempotency_key` is given)."""
    fields.setdefault("idempotency_key", f"k-{next(_keys)}")
    return pb.RedeemRequest(code=code, store_id=store, terminal_id=terminal, **fields)


def validation(code: str, *, store: str = "store-1", terminal: str = "till-1", **fields: Any) -> pb.ValidateRequest:
    """A ValidateRequest."""
    return pb.ValidateRequest(code=code, store_id=store, terminal_id=terminal, **fields)


async def redeem(gw: RunningGateway, code: str, **fields: Any) -> pb.RedeemResponse:
    """Redeem `code` as brand 1's internal client (fields as `request`)."""
    response: pb.RedeemResponse = await gw.stub.Redeem(request(code, **fields))
    return response


async def redeemed(gw: RunningGateway, code: str, **fields: Any) -> None:
    """Redeem `code`, asserting it was redeemed."""
    response = await redeem(gw, code, **fields)
    assert (response.outcome, response.reason) == (pb.OUTCOME_REDEEMED, "REDEEMED"), response


async def uses_left(gw: RunningGateway, code: str) -> int:
    """The code's uses left, as GetCode reports them."""
    state: pb.GetCodeResponse = await gw.stub.GetCode(pb.GetCodeRequest(code=code))
    return state.uses_left


def unknown_code(campaign_id: int) -> str:
    """A well-formed code of the campaign that was never issued (NOT_FOUND: a failed attempt)."""
    return codes.generate(codes.Route(campaign_id, 0))


def guessed(code: str) -> str:
    """`code` with its check character changed: refused before Redis as INVALID_ARGUMENT, a guess."""
    return code[:-1] + next(ch for ch in codes.ALPHABET if ch != code[-1])


def decisions(rule: str, reason: str, mode: str) -> float:
    """rgw_risk_decisions_total{rule, reason, mode} of this process (the in-process gateway's)."""
    labels = {"rule": rule, "reason": reason, "mode": mode}
    return REGISTRY.get_sample_value("rgw_risk_decisions_total", labels) or 0.0


@dataclass(frozen=True)
class Quota:
    """What a RESOURCE_EXHAUSTED for a caller quota carried in its google.rpc details."""

    reason: str
    subject: str
    retry_ms: int


def quota_of(error: grpc.aio.AioRpcError) -> Quota:
    """The ErrorInfo reason, QuotaFailure subject and RetryInfo delay of a failed call (each asserted present)."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                found[kind.__name__] = unpacked = kind()
                detail.Unpack(unpacked)
    assert found.keys() == {"ErrorInfo", "QuotaFailure", "RetryInfo"}, found.keys()
    violations = found["QuotaFailure"].violations
    assert len(violations) == 1
    return Quota(found["ErrorInfo"].reason, violations[0].subject, found["RetryInfo"].retry_delay.ToMilliseconds())


@dataclass(frozen=True)
class Event:
    """The columns of a risk_events row a test expects (brand 1 and `kind` redeem unless said otherwise)."""

    campaign: int
    store: str
    terminal: str
    client: str
    rule: str
    reason: str
    mode: str
    location: pb.Location | None = None
    device: str = ""
    scope: str = ""
    kind: str = "redeem"
    brand: int = BRAND


def event_of(row: asyncpg.Record) -> Event:
    """A risk_events row as an Event (the location None when the request carried none)."""
    location = None
    if row["latitude"] is not None:
        location = pb.Location(latitude=row["latitude"], longitude=row["longitude"], accuracy_m=row["accuracy_m"])
    return Event(
        campaign=row["campaign_id"], store=row["store_id"], terminal=row["terminal_id"], client=row["client_id"],
        rule=row["rule"], reason=row["reason"], mode=row["mode"], location=location, device=row["customer_device_id"],
        scope=row["scope"], kind=row["kind"], brand=row["brand_id"],
    )  # fmt: skip


@dataclass
class Ledger:
    """risk_events as the real ledger writer records it from the brands' event streams (emptied when made)."""

    redis: Redis
    db: asyncpg.Connection
    database_url: str
    keyring: KeyRing

    async def rows(self) -> list[asyncpg.Record]:
        """Run a ledger writer until the outboxes are drained; every risk_events row, oldest first."""
        writer = LedgerWriter(
            Outbox(self.redis, consumer="risk-e2e"), partial(asyncpg.connect, self.database_url), FAST
        )
        try:
            for _ in range(50):
                if await writer.run_once() == 0:
                    break
            else:
                raise AssertionError("the writer kept finding work")
        finally:
            await writer.close()
        return list(await self.db.fetch("SELECT * FROM risk_events ORDER BY stream_id"))

    async def events(self, *codes_seen: str) -> list[Event]:
        """Every recorded event, after asserting that no column of any row holds one of `codes_seen` or its
        keyed hash (an event may name a prefix of the hash, never the code)."""
        rows = await self.rows()
        secrets = [*codes_seen, *(ref.ref for code in codes_seen for ref in lookup_code(code, self.keyring).refs)]
        for row in rows:
            for column, value in row.items():
                assert not any(secret in str(value) for secret in secrets), f"risk_events.{column} holds a code"
        return [event_of(row) for row in rows]


async def make_ledger(redis: Redis, db: asyncpg.Connection, database_url: str, keyring: KeyRing) -> Ledger:
    """A Ledger over an emptied risk_events (the shared db fixture does not truncate it)."""
    await db.execute("TRUNCATE risk_events")
    return Ledger(redis, db, database_url, keyring)
