"""Helpers of the ledger chaos tests: a load client that records what it saw acknowledged, process control,
and ledger assertions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.coderefs import KeyRing
from gateway.dev.servers import free_port
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.ledger.events import decode_event, is_reversal_entry
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.tenancy import admin_risk, admin_store
from gateway.tenancy.model import DEFAULT_BRAND_ID
from tests.conftest import gateway_environ
from tests.integration.conftest import DAY_MS, HAMMER_POLICY, Issued, issue_campaign
from tests.integration.grpc_helpers import redeem_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# One gateway process (its pid is the one killed); small writer batches and a short reclaim delay, so a restarted
# writer takes over a dead one's entries quickly.
PROCESS_KNOBS = {
    "RGW_WORKERS": "1",
    "RGW_WRITER_BATCH_SIZE": "50",
    "RGW_WRITER_BATCH_WAIT_MS": "20",
    "RGW_WRITER_CLAIM_IDLE_MS": "1000",
    "RGW_WRITER_BACKOFF_MAX_SECONDS": "1",
}
# Failures in transit: the call may or may not have happened (an INTERNAL the gateway raised itself is a bug).
TRANSPORT_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
LEDGER_DEADLINE_S = 60.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def issue_live(db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, count: int) -> Issued:
    """A campaign valid from a minute ago (the gateways under test run on the wall clock) and its codes."""
    start = now_ms() - 60_000
    out = tmp_path / "codes.txt"
    return await issue_campaign(
        db, redis, keyring, out, count=count, valid_from_ms=start, valid_until_ms=start + DAY_MS
    )


# --- the load client -------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One Redeem call and what became of it."""

    request: pb.RedeemRequest
    started: float
    ended: float = 0.0
    outcome: pb.Outcome.ValueType | None = None  # None: the call failed
    redemption_id: str = ""
    replayed: bool = False
    use_number: int = 0
    status: Any = None  # grpc.StatusCode of a failed call
    details: str = ""

    @property
    def code(self) -> str:
        return str(self.request.code)

    @property
    def redeemed(self) -> bool:
        return self.outcome == pb.OUTCOME_REDEEMED

    @property
    def unknown(self) -> bool:
        """Failed in transit: it may or may not have happened."""
        if self.outcome is not None or self.status not in TRANSPORT_FAILURES:
            return False
        return not (self.status == grpc.StatusCode.INTERNAL and self.details.startswith("internal error"))

    def __str__(self) -> str:
        what = self.status or pb.Outcome.Name(self.outcome or pb.OUTCOME_UNSPECIFIED)
        return f"{self.code[:6]}… {what} {self.details[:100]}"


async def redeem_once(stub: pb_grpc.RedemptionServiceStub, request: pb.RedeemRequest, timeout: float) -> Call:
    call = Call(request, time.monotonic())
    try:
        reply = await stub.Redeem(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        call.status, call.details = exc.code(), str(exc.details())
    else:
        call.outcome, call.redemption_id = reply.outcome, reply.redemption_id
        call.replayed, call.use_number = reply.replayed, reply.use_number
    call.ended = time.monotonic()
    return call


@dataclass
class Load:
    """Redeems fresh codes, each under its own idempotency key, at a bounded rate, until time or codes run out."""

    stub: pb_grpc.RedemptionServiceStub
    codes: Iterator[str]
    rate: float  # calls per second, all workers together
    workers: int = 8
    timeout: float = 2.0
    calls: list[Call] = field(default_factory=list)

    async def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(self._worker(n, until) for n in range(self.workers)))

    async def _worker(self, n: int, until: float) -> None:
        interval = self.workers / self.rate
        while time.monotonic() < until and (code := next(self.codes, None)) is not None:
            request = redeem_request(code, f"k-{uuid.uuid4().hex}", store="chaos", terminal=f"till-{n}")
            call = await redeem_once(self.stub, request, self.timeout)
            self.calls.append(call)
            pause = interval - (call.ended - call.started) if call.outcome is not None else max(interval, 0.2)
            await asyncio.sleep(max(pause, 0.0))

    def redeemed_between(self, start: float, end: float) -> int:
        """REDEEMED answers to calls started in [start, end)."""
        return sum(1 for c in self.calls if c.redeemed and start <= c.started < end)

    def in_flight_at(self, moment: float) -> list[Call]:
        return [c for c in self.calls if c.started <= moment <= c.ended]


async def settle(
    stub: pb_grpc.RedemptionServiceStub, requests: Iterable[pb.RedeemRequest], *, within: float = 30.0
) -> list[Call]:
    """Send each request until the gateway answers it (a transport failure is retried with the same request, so
    the same key), for at most `within` seconds; the last call of each."""
    limit = asyncio.Semaphore(16)
    deadline = time.monotonic() + within

    async def one(request: pb.RedeemRequest) -> Call:
        async with limit:
            while True:
                call = await redeem_once(stub, request, 3.0)
                if not call.unknown or time.monotonic() > deadline:
                    return call
                await asyncio.sleep(0.2)

    return list(await asyncio.gather(*(one(r) for r in requests)))


async def resolve_unknown(stub: pb_grpc.RedemptionServiceStub, calls: Iterable[Call]) -> list[Call]:
    """What became of each unknown call: the answer to the same request (same key) after recovery."""
    return await settle(stub, [c.request for c in calls if c.unknown])


def acknowledged(calls: list[Call], retries: list[Call]) -> dict[str, str]:
    """code -> the redemption id acknowledged for it. Every code is fresh and redeemed under one key, so every
    answer must be REDEEMED, with one redemption id per code, and every attempted code ends acknowledged."""
    everything = calls + retries
    failed = [str(c) for c in everything if c.outcome is None and not c.unknown]
    assert not failed, f"{len(failed)} calls failed for a reason other than transport: {failed[:5]}"
    unresolved = [str(c) for c in retries if c.outcome is None]
    assert not unresolved, f"{len(unresolved)} unknown calls still unanswered after recovery: {unresolved[:5]}"
    declined = [str(c) for c in everything if c.outcome is not None and not c.redeemed]
    assert not declined, f"fresh codes were declined: {declined[:5]}"
    acked: dict[str, str] = {}
    for call in everything:
        if call.redeemed:
            first = acked.setdefault(call.code, call.redemption_id)
            assert first == call.redemption_id, f"one code and key got two redemption ids: {first}, {call}"
    assert set(acked) == {c.code for c in calls}
    return acked


# --- processes -----------------------------------------------------------------------------------------------


class Processes:
    """The `rgw` subprocesses of one test, each logging to its own file; stop_all() kills what still runs."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: str, **extra: str) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", command],
                env={**os.environ, **self.env, **extra},
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.started.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def tails(self, lines: int = 15) -> str:
        out = []
        for name, proc in self.started:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {name} (exit {proc.poll()}) ---\n" + "\n".join(text))
        return "\n".join(out)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, f"process {proc.pid} died before it was to be killed (exit {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@dataclass
class Rig:
    """Processes, a client channel to the gateway's port, and background tasks - all ended on exit."""

    procs: Processes
    port: int
    channel: grpc.aio.Channel
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def stub(self) -> pb_grpc.RedemptionServiceStub:
        return pb_grpc.RedemptionServiceStub(self.channel)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.append(task)
        return task

    async def start_gateway(self, name: str) -> subprocess.Popen[bytes]:
        proc = self.procs.start(name, "serve")
        await wait_for_health(self.channel, SERVING, within=30, proc=proc)
        return proc


async def internal_key(database_url: str) -> str:
    """A new internal API key of the default brand (whose campaigns the tests issue), in that database, with the
    brand's risk limits and lockouts off: the chaos load hammers from a few terminals on purpose."""
    conn = await asyncpg.connect(database_url)
    try:
        await admin_risk.set_risk_policy(
            conn, actor="tests", brand_id=DEFAULT_BRAND_ID, campaign_id=0, document=HAMMER_POLICY
        )
        made = await admin_store.create_client(
            conn, actor="tests", brand_id=DEFAULT_BRAND_ID, role="internal", label="chaos load", env="test"
        )
    finally:
        await conn.close()
    return made.value.plaintext


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, redis_url: str, database_url: str, **extra: str) -> AsyncIterator[Rig]:
    port = free_port()
    env = gateway_environ(redis_url, database_url, RGW_GRPC_ADDR=f"127.0.0.1:{port}", **PROCESS_KNOBS, **extra)
    reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 300)]  # fmt: skip
    channel = authenticated_channel(f"127.0.0.1:{port}", await internal_key(database_url), options=reconnect)
    running = Rig(Processes(tmp_path, env), port, channel)
    try:
        yield running
    except BaseException:
        print(running.procs.tails())
        raise
    finally:
        for task in running.tasks:
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)
        await running.channel.close()
        running.procs.stop_all()


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return int(reply.status)


async def wait_for_health(
    channel: grpc.aio.Channel, status: int, *, within: float, proc: subprocess.Popen[bytes] | None = None
) -> float:
    """Seconds until the gateway's health is `status`."""
    started = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"gateway exited with {proc.returncode} before it was healthy")
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await health(channel) == status:
                return time.monotonic() - started
        if time.monotonic() - started > within:
            pytest.fail(f"health did not become {status} within {within}s")
        await asyncio.sleep(0.02)


# --- Redis and ledger state -----------------------------------------------------------------------------------


async def pending_of(redis: Redis, stream: str, consumer: str | None = None) -> int:
    """Entries delivered to `consumer` (or to anyone) and not acknowledged."""
    info: Any = await redis.xpending(stream, keys.LEDGER_GROUP)
    if consumer is None:
        return int(info["pending"])
    return sum(int(c["pending"]) for c in info["consumers"] if c["name"] == consumer)


async def held_already_in_ledger(redis: Redis, conn: asyncpg.Connection, stream: str, consumer: str) -> int:
    """How many of the entries `consumer` holds unacknowledged are committed to the ledger already."""
    held: Any = await redis.xpending_range(stream, keys.LEDGER_GROUP, "-", "+", 10_000, consumername=consumer)
    rids = []
    for entry in held:
        found: Any = await redis.xrange(stream, entry["message_id"], entry["message_id"])
        rids += [decode_event(fields)["rid"] for _, fields in found if not is_reversal_entry(fields)]
    query = "SELECT count(*) FROM redemptions WHERE redemption_id = ANY($1::uuid[])"
    return int(await conn.fetchval(query, rids))


async def _freeze_when_holding(
    proc: subprocess.Popen[bytes], redis: Redis, conn: asyncpg.Connection, stream: str, consumer: str,
    *, committed: bool | None, within: float,
) -> bool:  # fmt: skip
    """Freeze the writer (SIGSTOP) at a moment it holds unacknowledged entries: all already committed to the
    ledger (committed=True: between COMMIT and XACK), none committed yet (False), or either (None).
    True: it is left frozen; False: no such moment came, it is left running."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        held = await pending_of(redis, stream, consumer)
        if held > 0:
            in_ledger = await held_already_in_ledger(redis, conn, stream, consumer)
            if committed is None or in_ledger == (held if committed else 0):
                return True
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.005)
    return False


async def kill_writer_mid_batch(
    proc: subprocess.Popen[bytes], redis: Redis, conn: asyncpg.Connection, stream: str, consumer: str,
    *, committed: bool,
) -> tuple[int, int]:  # fmt: skip
    """SIGKILL the writer while it holds unacknowledged entries, committed to the ledger already or not yet (any
    held entries if that moment does not come); returns (entries it held at death, how many were committed)."""
    for wanted in (committed, None):
        if await _freeze_when_holding(proc, redis, conn, stream, consumer, committed=wanted, within=3.0):
            break
    sigkill(proc)
    return await pending_of(redis, stream, consumer), await held_already_in_ledger(redis, conn, stream, consumer)


async def wait_for_backlog_below(redis: Redis, stream: str, entries: int, *, within: float) -> float:
    """Seconds until the outbox holds fewer than `entries` (the writer caught up with a backlog)."""
    started = time.monotonic()
    while (backlog := int(await redis.xlen(stream))) >= entries:
        if time.monotonic() - started > within:
            pytest.fail(f"outbox still holds {backlog} entries {within:.0f}s after Postgres came back")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def wait_for_ledger(conn: asyncpg.Connection, redis: Redis, campaign_id: int) -> float:
    """Seconds until the campaign's outbox is empty with nothing pending: every event acknowledged to a client was
    in the outbox before its reply, and leaves it only once committed, so the ledger is then final."""
    started = time.monotonic()
    stream = keys.outbox_key(campaign_id, 0)
    while True:
        backlog, pending = int(await redis.xlen(stream)), await pending_of(redis, stream)
        if backlog == 0 and pending == 0:
            return time.monotonic() - started
        if time.monotonic() - started > LEDGER_DEADLINE_S:
            rows = await conn.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", campaign_id)
            pytest.fail(f"ledger not drained in {LEDGER_DEADLINE_S:.0f}s: {rows} rows, "
                        f"outbox {backlog} entries, {pending} pending")  # fmt: skip
        await asyncio.sleep(0.1)


async def assert_ledger_matches(
    conn: asyncpg.Connection, redis: Redis, campaign_id: int, acked: dict[str, str]
) -> None:
    """The ledger holds exactly the acknowledged redemptions: none missing, none extra, none twice; no alarm."""
    rows = await conn.fetch(
        "SELECT redemption_id, code_ref, use_number FROM redemptions WHERE campaign_id = $1", campaign_id
    )
    rids = [str(r["redemption_id"]) for r in rows]
    assert len(rids) == len(set(rids)), "a redemption id is in the ledger twice"
    expected = set(acked.values())
    missing, extra = expected - set(rids), set(rids) - expected
    assert not missing and not extra, f"ledger differs: {len(missing)} acknowledged missing, {len(extra)} extra"
    assert len({bytes(r["code_ref"]) for r in rows}) == len(rows), "a code has two redemptions in the ledger"
    assert {r["use_number"] for r in rows} <= {1}
    uses = await conn.fetchval(
        "SELECT count(*) FROM code_uses cu JOIN redemptions r USING (redemption_id) WHERE r.campaign_id = $1",
        campaign_id,
    )
    assert uses == len(expected)
    assert await conn.fetchval("SELECT count(*) FROM double_spend_alarms") == 0, "double-spend alarm raised"
    assert await redis.xlen(keys.deadletter_key(campaign_id, 0)) == 0, "outbox entries were dead-lettered"


async def code_records(redis: Redis, keyring: KeyRing, issued: Issued, wanted: Iterable[str]) -> dict[str, list[Any]]:
    """code -> [used, seq, use record 1, use record 2] as Redis holds them."""
    campaign = issued.campaign
    wanted = list(wanted)
    async with redis.pipeline(transaction=False) as pipe:
        for code in wanted:
            ref = keyring.ref(campaign.key_id, campaign.id, code).ref
            pipe.hmget(keys.code_key(campaign.id, codes.parse(code).shard, ref), "used", "seq", "u:1", "u:2")
        found: list[list[Any]] = await pipe.execute()
    return dict(zip(wanted, found, strict=True))


def report(name: str, **facts: object) -> None:
    print(f"\nchaos[{name}]: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in facts.items()))  # fmt: skip


# --- the tests ------------------------------------------------------------------------------------------------
