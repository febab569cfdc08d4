"""Chaos tests of the ledger path (ARCHITECTURE.md: the durability table, invariants 2 and 8), against real
processes: `rgw serve` and `rgw writer` subprocesses, real redis-server and Postgres, killed with SIGKILL under load.

Each test runs a load client that redeems fresh codes, each under its own idempotency key, through a real channel
and remembers every redemption acknowledged to it. A call that failed in transit (UNAVAILABLE, DEADLINE_EXCEEDED,
a reset stream) may or may not have happened: after recovery it is retried with the same key and request, and the
answer (the first one replayed, or a fresh redemption) is what the client was acknowledged. Afterwards the ledger
must hold exactly the acknowledged redemptions - none missing, none extra, none twice - and no double-spend alarm.
"""

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
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer, free_port
from gateway.durability import mark_initialised
from gateway.ledger.events import decode_event
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_store import connect
from tests.conftest import gateway_environ
from tests.integration.conftest import DAY_MS, Issued, issue_campaign
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


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, redis_url: str, database_url: str, **extra: str) -> AsyncIterator[Rig]:
    port = free_port()
    env = gateway_environ(redis_url, database_url, RGW_GRPC_ADDR=f"127.0.0.1:{port}", **PROCESS_KNOBS, **extra)
    reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 300)]  # fmt: skip
    running = Rig(Processes(tmp_path, env), port, grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=reconnect))
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
        rids += [decode_event(fields)["rid"] for _, fields in found]
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


@pytest.mark.slow
async def test_writer_killed_twice_under_load_ledger_matches_acknowledgements(
    redis: Redis, db: asyncpg.Connection, keyring: KeyRing, redis_url: str, migrated: str, tmp_path: Path
) -> None:
    issued = await issue_live(db, redis, keyring, tmp_path, count=2500)
    cid, stream = issued.campaign.id, keys.outbox_key(issued.campaign.id, 0)
    async with rig(tmp_path, redis_url, migrated) as r:
        writer = r.procs.start("writer-1", "writer", RGW_WRITER_CONSUMER="writer-1")
        await r.start_gateway("gateway")
        load = Load(r.stub, iter(issued.codes), rate=300, workers=8)
        running = r.spawn(load.run(seconds=6))
        kills: list[tuple[str, int, int]] = []
        for n, committed in ((2, True), (3, False)):  # die after COMMIT before XACK; then before COMMIT
            await asyncio.sleep(1.8)
            dead = f"writer-{n - 1}"
            kills.append((dead, *await kill_writer_mid_batch(writer, redis, db, stream, dead, committed=committed)))
            writer = r.procs.start(f"writer-{n}", "writer", RGW_WRITER_CONSUMER=f"writer-{n}")
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        drain = await wait_for_ledger(db, redis, cid)
        await assert_ledger_matches(db, redis, cid, acked)
        (_, held_1, committed_1), (_, held_2, committed_2) = kills
        assert held_1 == committed_1 > 0, f"writer-1 was not caught between COMMIT and XACK: {kills}"
        assert held_2 > committed_2, f"writer-2 was not caught holding uncommitted entries: {kills}"
        for dead, _, _ in kills:  # what the dead held was reclaimed (XAUTOCLAIM) and acknowledged by another
            assert await pending_of(redis, stream, dead) == 0
        assert await redis.xlen(stream) == 0 and await pending_of(redis, stream) == 0
        assert writer.poll() is None
        report("writer-kill", acknowledged=len(acked), calls=len(load.calls), unknown=len(retries),
               kills=[(d, f"held {h}", f"{c} of them committed") for d, h, c in kills], drain_s=drain)  # fmt: skip


@pytest.mark.slow
async def test_gateway_killed_under_load_ledger_matches_acknowledgements(
    redis: Redis, db: asyncpg.Connection, keyring: KeyRing, redis_url: str, migrated: str, tmp_path: Path
) -> None:
    issued = await issue_live(db, redis, keyring, tmp_path, count=2500)
    cid = issued.campaign.id
    async with rig(tmp_path, redis_url, migrated) as r:
        r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        gateway = await r.start_gateway("gateway-1")
        load = Load(r.stub, iter(issued.codes), rate=250, workers=16)
        running = r.spawn(load.run(seconds=7))
        kills: list[tuple[int, float]] = []
        for n in (2, 3):
            await asyncio.sleep(1.5)
            killed_at = time.monotonic()
            sigkill(gateway)
            gateway = await r.start_gateway(f"gateway-{n}")  # same port
            kills.append((len(load.in_flight_at(killed_at)), time.monotonic() - killed_at))
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        drain = await wait_for_ledger(db, redis, cid)
        await assert_ledger_matches(db, redis, cid, acked)
        assert sum(1 for c in load.calls if c.unknown) > 0, "no call was caught by the kills: the test proved nothing"
        report("gateway-kill", acknowledged=len(acked), calls=len(load.calls), unknown=len(retries),
               unknown_that_had_happened=sum(c.replayed for c in retries),
               kills=[f"{k[0]} in flight, down {k[1]:.2f}s" for k in kills], drain_s=drain)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_postgres_outage_redemptions_continue_and_backlog_drains(
    redis: Redis, keyring: KeyRing, redis_url: str, tmp_path: Path
) -> None:
    pg = await asyncio.to_thread(PostgresServer.start, data_dir=tmp_path / "pg", fsync=True)
    try:
        conn = await asyncpg.connect(pg.url)
        try:
            await migrate(conn)
            issued = await issue_live(conn, redis, keyring, tmp_path, count=3500)
        finally:
            await conn.close()
        await _outage_under_load(pg, redis, issued, redis_url, tmp_path)
    finally:
        await asyncio.to_thread(pg.stop)


async def _outage_under_load(pg: PostgresServer, redis: Redis, issued: Issued, redis_url: str, tmp_path: Path) -> None:
    cid, stream, outage_s = issued.campaign.id, keys.outbox_key(issued.campaign.id, 0), 20.0
    async with rig(tmp_path, redis_url, pg.url) as r:
        writer = r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        await r.start_gateway("gateway")
        load = Load(r.stub, iter(issued.codes), rate=100, workers=8)
        running = r.spawn(load.run(seconds=outage_s + 8))
        await asyncio.sleep(3)
        await asyncio.to_thread(pg.kill)  # SIGKILL of the postmaster: the writer may be mid-transaction
        down_at = time.monotonic()
        await asyncio.sleep(outage_s)
        backlog, measured_at = int(await redis.xlen(stream)), time.monotonic()
        assert writer.poll() is None, "the writer died while Postgres was down"
        await asyncio.to_thread(pg.restart)
        up_at = time.monotonic()
        caught_up = await wait_for_backlog_below(redis, stream, int(load.rate), within=30.0)
        await running
        during = load.redeemed_between(down_at, measured_at)
        assert during > 0.5 * load.rate * outage_s, f"only {during} redemptions while Postgres was down"
        assert backlog >= during, f"outbox holds {backlog} entries, fewer than the {during} redeemed meanwhile"
        failed = [str(c) for c in load.calls if c.outcome is None]
        assert not failed, f"{len(failed)} calls failed while Postgres was down or restarting: {failed[:5]}"
        acked = acknowledged(load.calls, [])
        conn = await asyncpg.connect(pg.url)
        try:
            drain = await wait_for_ledger(conn, redis, cid)
            await assert_ledger_matches(conn, redis, cid, acked)
        finally:
            await conn.close()
        report("postgres-outage", acknowledged=len(acked), outage_s=up_at - down_at,
               redeemed_while_down=load.redeemed_between(down_at, up_at), backlog_at_restart=backlog,
               backlog_cleared_after_restart_s=caught_up, drain_after_load_s=drain)  # fmt: skip


@pytest.mark.slow
async def test_redis_killed_with_aof_always_loses_no_acknowledged_redemption(
    db: asyncpg.Connection, keyring: KeyRing, migrated: str, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(
        RedisServer.start, data_dir=tmp_path / "redis", appendonly=True, appendfsync="always"
    )
    client = connect(server.url, pool_size=8, timeout_s=5)
    try:
        await mark_initialised(client, "test")
        issued = await issue_live(db, client, keyring, tmp_path, count=1500)
        await _redis_kill_under_load(server, client, db, keyring, issued, migrated, tmp_path)
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def _redis_kill_under_load(
    server: RedisServer, client: Redis, db: asyncpg.Connection, keyring: KeyRing, issued: Issued, migrated: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cid = issued.campaign.id
    extra = {"RGW_REDIS_DURABILITY": "always", "RGW_REDIS_TIMEOUT_SECONDS": "1", "RGW_HEALTH_INTERVAL_SECONDS": "0.2"}
    async with rig(tmp_path, server.url, migrated, **extra) as r:
        writer = r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
        gateway = await r.start_gateway("gateway")  # it checked appendonly yes, appendfsync always, noeviction
        load = Load(r.stub, iter(issued.codes), rate=200, workers=16, timeout=3.0)
        running = r.spawn(load.run(seconds=6))
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        await asyncio.to_thread(server.kill)  # SIGKILL
        in_flight = len(load.in_flight_at(killed_at))
        await asyncio.sleep(1)
        await asyncio.to_thread(server.restart)  # replays the AOF
        await client.connection_pool.disconnect()  # this test's own connections died with the server
        up_at = time.monotonic()
        down_s = up_at - killed_at
        await running
        retries = await resolve_unknown(r.stub, load.calls)
        acked = acknowledged(load.calls, retries)
        assert retries, "no call was caught by the Redis kill: the test proved nothing"
        assert gateway.poll() is None and writer.poll() is None, "a process died with Redis"
        # Redis kept every acknowledged use, with the acknowledged redemption id, and no other use of any code.
        records = await code_records(client, keyring, issued, issued.codes)
        for code, (used, seq, first, second) in records.items():
            if code in acked:
                assert (used, seq, second) == ("1", "1", None), f"code {code[:6]}…: used {used}, seq {seq}"
                assert first.split("|")[0] == acked[code], f"code {code[:6]}… lost its acknowledged use record"
            else:
                assert (used, first) == ("0", None), f"code {code[:6]}… was never acknowledged but is used"
        # Each unknown call resolved to one redemption: the first replayed, or a fresh one - and it stays that one.
        again = {c.code: c for c in await settle(r.stub, [c.request for c in retries])}
        for call in retries:
            assert again[call.code].replayed and again[call.code].redemption_id == call.redemption_id
        drain = await wait_for_ledger(db, client, cid)
        await assert_ledger_matches(db, client, cid, acked)
        late = [c for c in load.calls if c.unknown and c.started > up_at]  # after Redis was back
        refused = sum(1 for c in late if "not ready" in c.details)  # while the gateway's connections reconnect
        report("redis-kill", acknowledged=len(acked), calls=len(load.calls), in_flight_at_kill=in_flight,
               unknown=len(retries), resolved_replayed=sum(c.replayed for c in retries),
               resolved_fresh=sum(not c.replayed for c in retries), redis_down_s=down_s, drain_s=drain,
               after_redis_was_back={"refused not ready": refused, "failed": len(late) - refused})  # fmt: skip


@pytest.mark.slow
async def test_redis_data_loss_refuses_until_rebuilt_then_replays_from_the_ledger(
    db: asyncpg.Connection, keyring: KeyRing, migrated: str, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(RedisServer.start, data_dir=tmp_path / "redis", appendonly=False)
    client = connect(server.url, pool_size=4, timeout_s=5)
    try:
        await mark_initialised(client, "test")
        issued = await issue_live(db, client, keyring, tmp_path, count=50)
        async with rig(tmp_path, server.url, migrated, RGW_HEALTH_INTERVAL_SECONDS="0.1") as r:
            r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
            await r.start_gateway("gateway")
            await _lose_and_rebuild(r, client, db, issued)
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


def _original_request(i: int, code: str) -> pb.RedeemRequest:
    """Varied requests, so a replay after the rebuild must match each one's own fingerprint."""
    where = pb.Location(latitude=52.5 + i / 1000, longitude=13.4, accuracy_m=5.0) if i % 2 else None
    return redeem_request(code, f"orig-{i}", terminal=f"till-{i % 3}", customer_device_id=f"dev-{i}", location=where)


async def _lose_and_rebuild(r: Rig, client: Redis, db: asyncpg.Connection, issued: Issued) -> None:
    cid, before, unused = issued.campaign.id, issued.codes[:30], issued.codes[30]
    originals = [await redeem_once(r.stub, _original_request(i, code), 2.0) for i, code in enumerate(before)]
    assert all(c.redeemed and not c.replayed for c in originals)
    acked = {c.code: c.redemption_id for c in originals}
    await wait_for_ledger(db, client, cid)  # the writer drained before the loss

    await client.flushall()
    lost_at = time.monotonic()
    probe = codes.generate(codes.Route(cid, 0))  # never issued: an empty Redis could only say NOT_FOUND
    while True:
        call = await redeem_once(r.stub, redeem_request(probe, f"probe-{uuid.uuid4().hex}"), 2.0)
        if call.status == grpc.StatusCode.UNAVAILABLE and "not initialised" in call.details:
            break
        assert call.outcome == pb.OUTCOME_NOT_FOUND, f"before the refusal: {call}"
        assert time.monotonic() - lost_at < 1.0, "still redeeming against an empty Redis after 10 health intervals"
        await asyncio.sleep(0.02)
    refused_after = time.monotonic() - lost_at
    assert await health(r.channel) == NOT_SERVING
    refused = await redeem_once(r.stub, redeem_request(before[0], "after-loss"), 2.0)
    assert refused.status == grpc.StatusCode.UNAVAILABLE and "not initialised" in refused.details

    rebuild = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway.cli", "rebuild-redis"], env={**os.environ, **r.procs.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rebuild.returncode == 0, rebuild.stderr
    assert "restored 1 campaigns, 50 codes, 30 uses" in rebuild.stdout, rebuild.stdout
    serving_after = await wait_for_health(r.channel, SERVING, within=1.0)

    for i, original in enumerate(originals):
        fresh_key = await redeem_once(r.stub, redeem_request(original.code, f"new-{i}"), 2.0)
        assert fresh_key.outcome == pb.OUTCOME_ALREADY_REDEEMED, f"used code redeemed again: {fresh_key}"
        retry = await redeem_once(r.stub, _original_request(i, original.code), 2.0)
        assert (retry.redeemed, retry.replayed) == (True, True), f"retry after rebuild: {retry}"
        assert (retry.redemption_id, retry.use_number) == (original.redemption_id, 1)
    first = await redeem_once(r.stub, redeem_request(unused, "unused-1"), 2.0)
    assert first.redeemed and not first.replayed, f"unused code after rebuild: {first}"
    second = await redeem_once(r.stub, redeem_request(unused, "unused-2"), 2.0)
    assert second.outcome == pb.OUTCOME_ALREADY_REDEEMED
    acked[unused] = first.redemption_id
    drain = await wait_for_ledger(db, client, cid)
    await assert_ledger_matches(db, client, cid, acked)
    report("redis-data-loss", redeemed_before_loss=len(originals), refused_after_s=refused_after,
           serving_after_rebuild_s=serving_after, drain_s=drain)  # fmt: skip
