"""Chaos tests of the redeem path on a Redis Cluster of its own (3 masters, AOF with appendfsync always): the hot
campaign shard's slot migrated to another master while redemptions run, a master SIGKILLed and restarted under
load, a master that comes back empty noticed by the per-master "initialised" markers, and the other masters'
campaigns redeeming while one master is down.

The gateway runs in-process (its PipelinedCluster's redirection counters show the migration met the load), the
ledger writer as a real `rgw writer` process on the cluster's seed list. Afterwards every acknowledged redemption
must be in Redis and in the ledger exactly once, and nothing else may be.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.dev.redis_cluster import RedisCluster, node_command
from gateway.durability import is_initialised, mark_initialised
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.keys_slot import key_slot
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.pipelined_cluster import PipelinedCluster
from gateway.settings import Settings
from tests.conftest import gateway_environ
from tests.integration.chaos_helpers import (
    PROCESS_KNOBS,
    Call,
    Load,
    Processes,
    acknowledged,
    assert_ledger_matches,
    code_records,
    internal_key,
    report,
    resolve_unknown,
    settle,
    wait_for_ledger,
)
from tests.integration.conftest import Issue, Issued, RunningGateway
from tests.integration.grpc_helpers import redeem_request

# The gateway notices a dead master within a second and re-checks its health five times a second.
FAST_FAILURE = {"RGW_REDIS_TIMEOUT_SECONDS": "1", "RGW_HEALTH_INTERVAL_SECONDS": "0.2"}
MULTI_USES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """This module's own cluster: its tests kill, restart and wipe masters."""
    with RedisCluster(tmp_path_factory.mktemp("chaos-cluster"), masters=3) as c:
        for node in c.nodes:
            # A killed master must not take the others' slots down with it (the default stops the whole cluster).
            node_command(node.port, "CONFIG", "SET", "cluster-require-full-coverage", "no")
        yield c


@pytest.fixture(scope="module")
def redis_url(cluster: RedisCluster) -> str:
    """Overrides the session's: the `redis`, `tenants` and `gateway` fixtures of this module use this cluster."""
    return ",".join(f"redis://{seed}" for seed in cluster.seeds)


@contextlib.asynccontextmanager
async def in_process_gateway(
    redis_url: str, database_url: str, clock: ManualClock, **extra: str
) -> AsyncIterator[tuple[Gateway, pb_grpc.RedemptionServiceStub]]:
    """The real server stack, in-process (as the `gateway` fixture builds it), with more settings, called as a new
    internal client of the default brand with its risk limits off and no store or terminal registered (the load's
    terminals are unregistered names, as in the single-Redis chaos tests)."""
    api_key = await internal_key(database_url)
    settings = Settings.from_env(gateway_environ(redis_url, database_url, **extra))
    gw = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gw.start()
    reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
    channel = authenticated_channel(f"127.0.0.1:{port}", api_key, options=reconnect)
    try:
        yield gw, pb_grpc.RedemptionServiceStub(channel)
    finally:
        await channel.close()
        await gw.stop()


@contextlib.asynccontextmanager
async def writer_process(tmp_path: Path, redis_url: str, database_url: str, **extra: str) -> AsyncIterator[Processes]:
    """A real `rgw writer` on the cluster's seeds; its log is printed when the test fails."""
    procs = Processes(tmp_path, gateway_environ(redis_url, database_url, **PROCESS_KNOBS, **extra))
    procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
    try:
        yield procs
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()


def hot_client(gw: Gateway) -> PipelinedCluster:
    assert isinstance(gw.pipelined, PipelinedCluster), f"the gateway is not on the cluster: {gw.pipelined!r}"
    return gw.pipelined


# --- the slot migration --------------------------------------------------------------------------------------


def migrate_slot_in_batches(
    cluster: RedisCluster, slot: int, source: int, target: int, phases: list[str], *, batch: int, pause_s: float
) -> int:
    """Move `slot` from master `source` to master `target` as redis-cli --cluster reshard does, slowly enough for
    the load to meet each state: MIGRATING/IMPORTING, the keys moved `batch` at a time (a redeem call whose keys
    are split between the nodes gets TRYAGAIN, one whose keys all left gets ASK), then SETSLOT NODE on every
    master (MOVED for a client with the old map). Returns the number of keys moved."""
    src, dst = cluster.nodes[source].port, cluster.nodes[target].port
    src_id, dst_id = node_command(src, "CLUSTER", "MYID"), node_command(dst, "CLUSTER", "MYID")
    node_command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    node_command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    phases.append("migrating")
    time.sleep(0.3)
    phases.append("moving keys")
    moved = 0
    while found := node_command(src, "CLUSTER", "GETKEYSINSLOT", slot, batch):
        node_command(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *found)
        moved += len(found)
        time.sleep(pause_s)
    phases.append("moved keys")
    time.sleep(0.5)
    for port in (dst, src, *(n.port for n in cluster.nodes if n.port not in (src, dst))):
        node_command(port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    phases.append("assigned")
    return moved


# --- the load of the migration test ----------------------------------------------------------------------------


async def redeem_with_reason(stub: pb_grpc.RedemptionServiceStub, request: pb.RedeemRequest) -> Call:
    """One Redeem call; an answered one keeps the reply's reason in `details` (for the failure messages)."""
    call = Call(request, time.monotonic())
    try:
        reply = await stub.Redeem(request, timeout=3.0)
    except grpc.aio.AioRpcError as exc:
        call.status, call.details = exc.code(), str(exc.details())
    else:
        call.outcome, call.redemption_id = reply.outcome, reply.redemption_id
        call.replayed, call.use_number, call.details = reply.replayed, reply.use_number, reply.reason
    call.ended = time.monotonic()
    return call


@dataclass
class Hammer:
    """Redeems each code of a plan with more distinct idempotency keys than it has uses, all at once from several
    terminals (some with the same key twice at once), then resends some of the keys (a client's retry)."""

    stub: pb_grpc.RedemptionServiceStub
    uses: dict[str, int]  # code -> its uses
    phases: list[str]
    codes_per_second: float
    workers: int = 8
    calls: list[Call] = field(default_factory=list)
    phase_of: dict[int, str] = field(default_factory=dict)  # id(call) -> the migration phase it started in

    def attempts(self, n: int, code: str) -> tuple[list[pb.RedeemRequest], list[pb.RedeemRequest]]:
        """The concurrent requests of code n (its uses + 1 keys; every 4th code one key twice) and the resends."""
        requests = [
            redeem_request(code, f"k-{uuid.uuid4().hex}", store="chaos", terminal=f"till-{(n + k) % 5}")
            for k in range(self.uses[code] + 1)
        ]
        concurrent = requests + requests[:1] if n % 4 == 0 else requests
        resends = requests[:2] if n % 3 == 0 else []
        return concurrent, resends

    async def run(self, plan: list[str]) -> None:
        queue = iter(enumerate(plan))
        await asyncio.gather(*(self._worker(queue) for _ in range(self.workers)))

    async def _call(self, request: pb.RedeemRequest) -> Call:
        phase = self.phases[-1] if self.phases else "before"
        call = await redeem_with_reason(self.stub, request)
        self.phase_of[id(call)] = phase
        self.calls.append(call)
        return call

    async def _worker(self, queue: Iterator[tuple[int, str]]) -> None:
        interval = self.workers / self.codes_per_second
        for n, code in queue:
            started = time.monotonic()
            concurrent, resends = self.attempts(n, code)
            await asyncio.gather(*(self._call(r) for r in concurrent))
            for request in resends:
                await self._call(request)
            await asyncio.sleep(max(interval - (time.monotonic() - started), 0.0))

    def phases_met(self) -> collections.Counter[str]:
        """Calls started in each migration phase."""
        return collections.Counter(self.phase_of[id(c)] for c in self.calls)


def redemptions_by_key(calls: list[Call]) -> dict[str, set[str]]:
    """Idempotency key -> the redemption ids it was answered REDEEMED with (one at most, or the key was doubled)."""
    found: dict[str, set[str]] = collections.defaultdict(set)
    for call in calls:
        if call.redeemed:
            found[call.request.idempotency_key].add(call.redemption_id)
    return found


async def ledger_by_ref(db: asyncpg.Connection, campaign_id: int) -> dict[str, list[str]]:
    """code_ref (hex) -> the redemption ids the ledger holds for it."""
    rows = await db.fetch("SELECT redemption_id, code_ref FROM redemptions WHERE campaign_id = $1", campaign_id)
    found: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        found[bytes(row["code_ref"]).hex()].append(str(row["redemption_id"]))
    return found


async def give_uses(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, issued: Issued, code: str, uses: int
) -> None:
    """Give one issued code uses of its own (a per-code override, where the loader keeps it: Postgres and the
    code's hash)."""
    campaign = issued.campaign
    ref = keyring.ref(campaign.key_id, campaign.id, code).ref
    await db.execute("UPDATE issued_codes SET uses = $2 WHERE code_ref = $1", bytes.fromhex(ref), uses)
    await redis.hset(keys.code_key(campaign.id, codes.parse(code).shard, ref), "uses", uses)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_hot_campaign_shard_migrated_during_a_redeem_run_loses_and_doubles_nothing(
    cluster: RedisCluster, redis: Redis, db: asyncpg.Connection, keyring: KeyRing, issue: Issue, clock: ManualClock,
    redis_url: str, migrated: str, tmp_path: Path,
) -> None:  # fmt: skip
    issued = await issue(480)
    cid = issued.campaign.id
    assert issued.campaign.shards == 1  # one shard stays one shard on a cluster (gateway/shard_spread.py)
    attempted, untouched = issued.codes[:450], issued.codes[450:]
    uses = {code: MULTI_USES if n % 10 == 0 else 1 for n, code in enumerate(attempted)}  # 45 codes of 3 uses
    for code, n in uses.items():
        if n > 1:
            await give_uses(db, redis, keyring, issued, code, n)
    slot = key_slot(keys.outbox_key(cid, 0))
    assert {key_slot(k) for k in (keys.meta_key(cid, 0), keys.budget_key(cid, 0), keys.stats_key(cid, 0, 0))} == {slot}
    source = cluster.slot_owner(slot)
    target = (source + 1) % len(cluster.nodes)
    phases: list[str] = []
    random.shuffle(attempted)

    async with (
        writer_process(tmp_path, redis_url, migrated) as writer,
        in_process_gateway(redis_url, migrated, clock, **FAST_FAILURE) as (gw, stub),
    ):
        hot = hot_client(gw)
        hammer = Hammer(stub, uses, phases, codes_per_second=45)  # ~10 s of load

        async def migrate_mid_run() -> int:
            await asyncio.sleep(2.5)
            return await asyncio.to_thread(
                migrate_slot_in_batches, cluster, slot, source, target, phases, batch=8, pause_s=0.02
            )

        _, moved = await asyncio.gather(hammer.run(attempted), migrate_mid_run())
        redirections = dict(hot.redirections)
        met = hammer.phases_met()

        # The migration happened, and overlapped the load in each of its states.
        assert cluster.slot_owner(slot) == target, "the slot was not migrated"
        assert node_command(cluster.nodes[source].port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert node_command(cluster.nodes[target].port, "CLUSTER", "COUNTKEYSINSLOT", slot) >= moved > 400
        assert all(met[p] > 0 for p in ("before", "moving keys", "assigned")), f"the load missed a phase: {met}"
        # The gateway's redeem calls met the migration: split keys (TRYAGAIN) and keys gone to the target (ASK). Its
        # map then follows the slot (by a MOVED reply or its background refresh, whichever comes first).
        assert redirections.get("TRYAGAIN", 0) > 0 and redirections.get("ASK", 0) > 0, redirections
        assert hot.owner(slot) == cluster.seeds[target], "the gateway's slot map still names the old owner"

        # Every call the load could not get an answer to (redirections that did not settle) is answered now.
        unknown = [c for c in hammer.calls if c.unknown]
        retries = await resolve_unknown(stub, hammer.calls)
        everything = hammer.calls + retries
        failed = [str(c) for c in everything if c.outcome is None and not c.unknown]
        assert not failed, f"{len(failed)} calls failed for a reason other than transport: {failed[:5]}"
        unresolved = [str(c) for c in retries if c.outcome is None]
        assert not unresolved, f"{len(unresolved)} unknown calls still unanswered: {unresolved[:5]}"
        odd = [str(c) for c in everything if c.outcome not in (None, pb.OUTCOME_REDEEMED, pb.OUTCOME_ALREADY_REDEEMED)]
        assert not odd, f"unexpected answers: {odd[:5]}"

        # One key, one redemption (a concurrent duplicate and a resend of the key replay it); one code, as many
        # redemptions as it has uses - not one more (every code had one attempt more than its uses), not one less.
        by_key = redemptions_by_key(everything)
        doubled = {k: rids for k, rids in by_key.items() if len(rids) > 1}
        assert not doubled, f"an idempotency key got two redemptions: {list(doubled.items())[:3]}"
        acked: dict[str, set[str]] = collections.defaultdict(set)
        for call in everything:
            if call.redeemed:
                acked[call.code].add(call.redemption_id)
        wrong = {c[:6]: (len(acked[c]), n) for c, n in uses.items() if len(acked[c]) != n}
        assert not wrong, f"codes redeemed a number of times other than their uses (got, uses): {wrong}"
        fresh_after = sum(
            1 for c in hammer.calls if c.redeemed and not c.replayed and hammer.phase_of[id(c)] == "assigned"
        )
        assert fresh_after > 0, "nothing was redeemed on the slot's new owner: the writer's part proves nothing"
        replays = sum(1 for c in everything if c.redeemed and c.replayed)
        assert replays > 0, "no resend or concurrent duplicate of a key was replayed"

        # The writer followed the outbox to its new master and drained it: the ledger is exactly the acknowledgements.
        drain = await wait_for_ledger(db, redis, cid)
        assert writer.started[0][1].poll() is None, "the writer died during the migration"
        ledger = await ledger_by_ref(db, cid)
        all_rids = [rid for rids in ledger.values() for rid in rids]
        assert len(all_rids) == len(set(all_rids)), "a redemption id is in the ledger twice"
        acked_rids = {rid for rids in acked.values() for rid in rids}
        missing, extra = acked_rids - set(all_rids), set(all_rids) - acked_rids
        assert not missing and not extra, f"ledger differs: {len(missing)} acknowledged missing, {len(extra)} extra"
        campaign = issued.campaign
        for code in issued.codes:
            ref = keyring.ref(campaign.key_id, campaign.id, code).ref
            assert sorted(ledger.get(ref, [])) == sorted(acked.get(code, set())), f"code {code[:6]}…: ledger rows"
        assert await db.fetchval("SELECT count(*) FROM double_spend_alarms") == 0, "double-spend alarm raised"
        assert await redis.xlen(keys.deadletter_key(cid, 0)) == 0, "outbox entries were dead-lettered"

        # Redis holds the same uses: each code's use records are its acknowledged redemptions; untouched codes unused.
        use_fields = [f"u:{n}" for n in range(1, MULTI_USES + 2)]
        for code in issued.codes:
            ref = keyring.ref(campaign.key_id, campaign.id, code).ref
            reply: list[Any] = await redis.hmget(keys.code_key(cid, 0, ref), ["used", *use_fields])
            used, *records = reply
            want = acked.get(code, set())
            assert int(used or 0) == len(want), f"code {code[:6]}…: used {used}, acknowledged {len(want)}"
            assert {r.split("|")[0] for r in records if r} == want, f"code {code[:6]}…: use records differ"
        assert not any(acked.get(c) for c in untouched)

        report("cluster-migration", calls=len(hammer.calls), unknown=len(unknown), redeemed=len(acked_rids),
               replays=replays, redeemed_on_new_owner=fresh_after, keys_moved=moved, redirections=redirections,
               calls_per_phase=dict(met), drain_s=drain)  # fmt: skip


# --- a master killed and restarted -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_cluster_master_killed_and_restarted_with_aof_always_loses_no_acknowledged_redemption(
    cluster: RedisCluster, redis: Redis, db: asyncpg.Connection, keyring: KeyRing, issue: Issue, clock: ManualClock,
    redis_url: str, migrated: str, tmp_path: Path,
) -> None:  # fmt: skip
    for node in cluster.nodes:  # what RGW_REDIS_DURABILITY=always requires of every master (the gateway checks too)
        reply = node_command(node.port, "CONFIG", "GET", "append*")  # name, value, name, value, ...
        config = dict(zip(reply[::2], reply[1::2], strict=True))
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always"), config
    issued = await issue(1500)
    cid = issued.campaign.id
    assert issued.campaign.shards == 1
    victim = cluster.slot_owner(key_slot(keys.outbox_key(cid, 0)))
    extra = {"RGW_REDIS_DURABILITY": "always", **FAST_FAILURE}

    async with (
        writer_process(tmp_path, redis_url, migrated, RGW_REDIS_TIMEOUT_SECONDS="1") as writer,
        in_process_gateway(redis_url, migrated, clock, **extra) as (gw, stub),
    ):
        load = Load(stub, iter(issued.codes), rate=120, workers=12, timeout=3.0)
        running = asyncio.create_task(load.run(seconds=9))
        try:
            await asyncio.sleep(2.5)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, victim)  # SIGKILL
            in_flight = len(load.in_flight_at(killed_at))
            await asyncio.sleep(1.5)
            restarted_at = time.monotonic()
            await asyncio.to_thread(cluster.restart, victim)  # same port, nodes.conf and AOF; waits for cluster ok
            up_at = time.monotonic()
            await running
        finally:
            running.cancel()
        down = [c for c in load.calls if killed_at + 0.2 <= c.started <= restarted_at]
        assert down and all(c.outcome is None for c in down), "calls were answered while the shard's master was dead"
        assert {c.status for c in down} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        after = load.redeemed_between(up_at, time.monotonic())
        assert after > 0, "the load did not redeem again after the master was back"

        retries = await resolve_unknown(stub, load.calls)
        acked = acknowledged(load.calls, retries)
        assert retries, "no call was caught by the kill: the test proved nothing"
        # Redis kept every acknowledged use (the AOF replayed) with its redemption id, and no other use of any code.
        records = await code_records(redis, keyring, issued, issued.codes)
        for code, (used, seq, first, second) in records.items():
            if code in acked:
                assert (used, seq, second) == ("1", "1", None), f"code {code[:6]}…: used {used}, seq {seq}"
                assert first.split("|")[0] == acked[code], f"code {code[:6]}… lost its acknowledged use record"
            else:
                assert used in (None, "0") and first is None, f"code {code[:6]}… was never acknowledged but is used"
        again = {c.code: c for c in await settle(stub, [c.request for c in retries])}
        for call in retries:
            assert again[call.code].replayed and again[call.code].redemption_id == call.redemption_id
        drain = await wait_for_ledger(db, redis, cid)
        await assert_ledger_matches(db, redis, cid, acked)
        assert writer.started[0][1].poll() is None, "the writer died with the master"
        report("cluster-master-kill", acknowledged=len(acked), calls=len(load.calls), in_flight_at_kill=in_flight,
               failed_while_down=collections.Counter(f"{c.status.name}: {c.details[:60]}" for c in down),
               unknown=len(retries), resolved_replayed=sum(c.replayed for c in retries),
               master_down_s=up_at - killed_at, redeemed_after_restart=after, drain_s=drain,
               redirections=dict(hot_client(gw).redirections))  # fmt: skip


# --- a master restarted empty ----------------------------------------------------------------------------------


async def test_a_master_restarted_empty_makes_the_cluster_uninitialised(
    cluster: RedisCluster, redis: Redis, gateway: RunningGateway
) -> None:
    await mark_initialised(redis, "test")
    main: Any = await redis.get(keys.INITIALISED)
    nodes = json.loads(main)["nodes"]
    ports = [node.port for node in cluster.nodes]
    owners = {ports[cluster.slot_owner(key_slot(n))] for n in nodes}
    assert len(nodes) == len(cluster.nodes) and owners == set(ports), f"not one marker per master: {nodes}"
    assert await is_initialised(redis)
    assert (await gateway.gateway.component_health.check_once()).get("redis", "") == ""

    holder = cluster.slot_owner(key_slot(keys.INITIALISED))
    wiped = (holder + 1) % len(cluster.nodes)
    node_command(cluster.nodes[wiped].port, "FLUSHALL")  # as if restarted without its data

    # With the main marker alone the loss would go unnoticed: it lives on a master that kept its data.
    assert await redis.get(keys.INITIALISED) == main
    assert not await is_initialised(redis)
    reasons = await gateway.gateway.component_health.check_once()
    assert "not initialised" in reasons.get("redis", ""), reasons


# --- a master down: the other masters' campaigns --------------------------------------------------------------


@pytest.mark.slow
async def test_campaigns_of_the_other_masters_keep_redeeming_while_one_master_is_down(
    cluster: RedisCluster, redis: Redis, db: asyncpg.Connection, issue: Issue, clock: ManualClock, redis_url: str,
    migrated: str,
) -> None:  # fmt: skip
    victim_campaign = await issue(5)
    victim = cluster.slot_owner(key_slot(keys.outbox_key(victim_campaign.campaign.id, 0)))
    for _ in range(20):
        other = await issue(10)
        if cluster.slot_owner(key_slot(keys.outbox_key(other.campaign.id, 0))) != victim:
            break
    else:
        pytest.fail("no campaign landed on another master")
    extra = {"RGW_REDIS_DURABILITY": "always", **FAST_FAILURE}
    async with in_process_gateway(redis_url, migrated, clock, **extra) as (_, stub):
        await asyncio.to_thread(cluster.kill, victim)
        try:
            await asyncio.sleep(0.5)
            dead = await redeem_with_reason(stub, redeem_request(victim_campaign.codes[0], "on-the-dead-master"))
            alive: list[Call] = []
            for n, code in enumerate(other.codes):  # 2.5 s: a dozen health rounds, however slow each one is
                alive.append(await redeem_with_reason(stub, redeem_request(code, f"on-a-live-master-{n}")))
                await asyncio.sleep(0.25)
        finally:
            await asyncio.to_thread(cluster.restart, victim)
    assert dead.status == grpc.StatusCode.UNAVAILABLE, dead
    refused = [c.details for c in alive if not c.redeemed]
    assert not refused, f"a campaign on a live master was refused while another master was down: {refused[:3]}"
