"""The pipelined hot-path client over a real 3-master Redis Cluster: routing by slot, scripts and NOSCRIPT, a slot
migrated under load (TRYAGAIN and ASK, then MOVED) without a write lost or repeated, a master hung, and a master
killed and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from redis import exceptions as redis_errors

from gateway.dev.processes import free_port
from gateway.dev.redis_cluster import RedisCluster, node_command, slot_ranges
from gateway.keys_slot import key_slot
from gateway.pipelined_cluster import PipelinedCluster
from gateway.pipelined_redis import Script

INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"
INCR_BOTH_SCRIPT = "redis.call('INCR', KEYS[1]) return redis.call('INCR', KEYS[2])"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3) as c:
        for node in c.nodes:
            # A killed master must not take the others' slots down with it (the default stops the whole cluster).
            node_command(node.port, "CONFIG", "SET", "cluster-require-full-coverage", "no")
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster: RedisCluster) -> AsyncIterator[PipelinedCluster]:
    c = PipelinedCluster(cluster.seeds[:1], connections_per_node=2, timeout_s=1.0)
    await c.connect()
    yield c
    await c.close()


def address(cluster: RedisCluster, index: int) -> str:
    return cluster.seeds[index]


def keys_per_node(cluster: RedisCluster, prefix: str, per_node: int) -> dict[int, list[str]]:
    """`per_node` keys of distinct hash tags owned by each master (per the cluster's own CLUSTER SLOTS)."""
    ports = [node.port for node in cluster.nodes]
    ranges = slot_ranges(ports[0])
    found: dict[int, list[str]] = {i: [] for i in range(len(ports))}
    n = 0
    while any(len(owned) < per_node for owned in found.values()):
        key = f"{{{prefix}{n}}}:k"
        slot = key_slot(key)
        owner = next(ports.index(port) for first, last, _, port, _ in ranges if first <= slot <= last)
        if len(found[owner]) < per_node:
            found[owner].append(key)
        n += 1
    return found


def commandstat_calls(port: int, command: str) -> int:
    """How many times the node ran `command` since CONFIG RESETSTAT (redis-py parses INFO into a dict)."""
    info: dict[str, dict[str, int]] = node_command(port, "INFO", "commandstats")
    return info.get(f"cmdstat_{command}", {}).get("calls", 0)


async def test_slot_map_matches_the_cluster(cluster: RedisCluster, client: PipelinedCluster) -> None:
    assert client.connected
    for slot in (0, 5460, 5461, 10922, 10923, 16383, key_slot("{user1000}.a")):
        assert client.owner(slot) == address(cluster, cluster.slot_owner(slot))
    for key in ("{user1000}.a", "plain", "x{}y", "{a}b{c}"):
        assert key_slot(key) == node_command(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key)


async def test_seeds_that_do_not_answer_are_skipped(cluster: RedisCluster) -> None:
    c = PipelinedCluster([f"127.0.0.1:{free_port()}", cluster.seeds[2]], connections_per_node=1, timeout_s=1.0)
    try:
        await c.connect()
        assert c.connected
        assert c.owner(0) == address(cluster, cluster.slot_owner(0))
        assert await c.call("SET", "{seeded}:k", "v") == "OK"
    finally:
        await c.close()


async def test_commands_go_to_the_owner_of_their_slot(cluster: RedisCluster, client: PipelinedCluster) -> None:
    keys = keys_per_node(cluster, "route", 100)
    everything = [k for ks in keys.values() for k in ks]
    assert await asyncio.gather(*(client.call("SET", k, k) for k in everything)) == ["OK"] * len(everything)
    assert await asyncio.gather(*(client.call("GET", k) for k in everything)) == everything
    for index, owned in keys.items():
        port = cluster.nodes[index].port
        assert node_command(port, "EXISTS", *owned[:1]) == 1
        assert node_command(port, "DBSIZE") >= len(owned)
    assert client.redirections == {}, "a fresh map needs no redirection"
    # Keyless commands go to some master; errors fail only their call.
    assert await client.call("PING") == "PONG"
    results = await asyncio.gather(
        client.call("INCR", everything[0]), client.call("GET", everything[1]), return_exceptions=True
    )
    assert isinstance(results[0], redis_errors.ResponseError) and results[1] == everything[1]


async def test_scripts_run_on_the_owner_and_reload_after_noscript(
    cluster: RedisCluster, client: PipelinedCluster
) -> None:
    script = Script(client, INCR_SCRIPT)
    keys = keys_per_node(cluster, "script", 50)
    await client.call("SCRIPT", "LOAD", INCR_SCRIPT)
    for node in cluster.nodes:
        node_command(node.port, "CONFIG", "RESETSTAT")
    assert await asyncio.gather(*(script(keys=[k], args=[]) for ks in keys.values() for k in ks)) == [1] * 150
    for index, owned in keys.items():
        assert commandstat_calls(cluster.nodes[index].port, "evalsha") == len(owned)

    # A node that lost its scripts (restarted, flushed): NOSCRIPT, loaded there, run again.
    node_command(cluster.nodes[1].port, "SCRIPT", "FLUSH")
    assert await asyncio.gather(*(script(keys=[k], args=[]) for ks in keys.values() for k in ks)) == [2] * 150
    await client.call("SCRIPT", "FLUSH")  # on every node
    assert await asyncio.gather(*(script(keys=[k], args=[]) for ks in keys.values() for k in ks)) == [3] * 150
    for node in cluster.nodes:
        assert node_command(node.port, "SCRIPT", "EXISTS", script.sha) == [1]


def migrate_slot(cluster: RedisCluster, slot: int, source: int, target: int, phases: list[str]) -> None:
    """Move `slot` from node `source` to node `target` the way redis-cli --cluster reshard does, lingering in each
    state so calls meet it: MIGRATING/IMPORTING with the keys still on the source, keys moved one at a time (the keys
    of one call split between the nodes: TRYAGAIN), every key moved (ASK), then the slot assigned (MOVED)."""
    src, dst = cluster.nodes[source].port, cluster.nodes[target].port
    src_id, dst_id = node_command(src, "CLUSTER", "MYID"), node_command(dst, "CLUSTER", "MYID")
    node_command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    node_command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    phases.append("migrating")
    time.sleep(0.2)
    phases.append("moving keys")
    while keys := node_command(src, "CLUSTER", "GETKEYSINSLOT", slot, 1):
        node_command(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
        time.sleep(0.1)
    phases.append("moved keys")
    time.sleep(0.3)
    for node in (dst, src, *(n.port for n in cluster.nodes if n.port not in (src, dst))):
        node_command(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    phases.append("assigned")


@pytest.mark.slow
async def test_slot_migrated_under_load_loses_and_repeats_no_write(
    cluster: RedisCluster, client: PipelinedCluster
) -> None:
    counter, scripted, pair = "{migrating}:counter", "{migrating}:scripted", ["{migrating}:a", "{migrating}:b"]
    slot = key_slot(counter)
    source = cluster.slot_owner(slot)
    target = (source + 1) % len(cluster.nodes)
    script, both = Script(client, INCR_SCRIPT), Script(client, INCR_BOTH_SCRIPT)
    phases: list[str] = []
    seen: set[str] = set()

    async def load() -> None:
        for _ in range(50):  # 1,000 INCRs, 500 script INCRs and 250 of a pair of keys, in bursts, over the migration
            replies = await asyncio.gather(
                *(client.call("INCR", counter) for _ in range(20)),
                *(script(keys=[scripted], args=[]) for _ in range(10)),
                *(both(keys=pair, args=[]) for _ in range(5)),
            )
            assert all(isinstance(r, int) for r in replies)
            seen.add(phases[-1] if phases else "before")
            await asyncio.sleep(0.025)

    await asyncio.gather(load(), asyncio.to_thread(migrate_slot, cluster, slot, source, target, phases))
    assert {"migrating", "moving keys", "moved keys", "assigned"} <= seen, f"the load missed a phase: {seen}"
    assert await client.call("GET", counter) == "1000"
    assert await client.call("GET", scripted) == "500"
    assert await asyncio.gather(*(client.call("GET", k) for k in pair)) == ["250", "250"]
    assert node_command(cluster.nodes[target].port, "GET", counter) == "1000"
    assert all(client.redirections[r] > 0 for r in ("ASK", "MOVED", "TRYAGAIN")), client.redirections
    for _ in range(50):  # the background refresh catches up with the cluster
        if client.owner(slot) == address(cluster, target):
            break
        await asyncio.sleep(0.05)
    assert client.owner(slot) == address(cluster, target)
    moved = client.redirections["MOVED"]
    assert await client.call("INCR", counter) == 1001
    assert client.redirections["MOVED"] == moved, "the refreshed map sends the slot's calls to its new owner"


async def answers_again(client: PipelinedCluster, key: str, value: str) -> None:
    """Calls for the key's master work again within 10 s."""
    for _ in range(100):
        try:
            assert await client.call("GET", key) == value
            return
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            await asyncio.sleep(0.1)
    assert await client.call("GET", key) == value


@pytest.mark.slow
async def test_hung_master_times_out_its_calls_only(cluster: RedisCluster, client: PipelinedCluster) -> None:
    keys = keys_per_node(cluster, "hung", 3)
    for k in (k for ks in keys.values() for k in ks):
        await client.call("SET", k, "v")
    cluster.nodes[0].pause()
    try:
        started = time.monotonic()
        hung = asyncio.gather(*(client.call("GET", k) for k in keys[0]), return_exceptions=True)
        for index in (1, 2):
            assert await asyncio.gather(*(client.call("GET", k) for k in keys[index])) == ["v"] * 3
        assert all(isinstance(r, redis_errors.TimeoutError) for r in await hung)
        assert time.monotonic() - started < 2.0
    finally:
        cluster.nodes[0].resume()
    await answers_again(client, keys[0][0], "v")


@pytest.mark.slow
async def test_killed_master_fails_its_calls_fast_and_comes_back(
    cluster: RedisCluster, client: PipelinedCluster
) -> None:
    keys = keys_per_node(cluster, "chaos", 5)
    for k in (k for ks in keys.values() for k in ks):
        await client.call("SET", k, "v")
    victim = 2
    cluster.kill(victim)
    try:
        started = time.monotonic()
        for k in keys[victim]:
            with pytest.raises((redis_errors.ConnectionError, redis_errors.TimeoutError)):
                await client.call("GET", k)
        assert time.monotonic() - started < 1.5, "calls to a dead master must fail fast"
        for _ in range(3):  # the other masters keep serving their slots, across the cluster noticing the failure
            for index in (0, 1):
                assert await asyncio.gather(*(client.call("GET", k) for k in keys[index])) == ["v"] * 5
            await asyncio.sleep(1.5)
        assert client.connected
    finally:
        await asyncio.to_thread(cluster.restart, victim)
    await answers_again(client, keys[victim][0], "v")
    assert await asyncio.gather(*(client.call("GET", k) for k in keys[victim])) == ["v"] * 5
