"""gateway.dev.redis_cluster against real redis-server processes, and gateway.keys_slot against CLUSTER KEYSLOT."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster
from redis.exceptions import MovedError

from gateway.dev.processes import alive_as, port_open, wait_for
from gateway.dev.redis_cluster import RedisCluster, cluster_info, even_split, node_command, slot_ranges
from gateway.keys_slot import SLOTS, key_slot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def _key_on(cluster: RedisCluster, index: int, prefix: str) -> str:
    """A key whose slot node `index` serves."""
    for n in range(1_000):
        key = f"{prefix}:{n}"
        if cluster.slot_owner(key_slot(key)) == index:
            return key
    raise AssertionError(f"no key {prefix}:0..999 on node {index}")


@pytest.mark.parametrize("masters", [1, 2, 3, 5, 7, 100])
def test_even_split_partitions_the_slots(masters: int) -> None:
    ranges = [even_split(index, masters) for index in range(masters)]
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(previous[1] + 1 == current[0] for previous, current in itertools.pairwise(ranges))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_three_masters_cover_all_slots(cluster: RedisCluster) -> None:
    assert len(cluster.nodes) == 3
    assert cluster.seeds == [f"127.0.0.1:{node.port}" for node in cluster.nodes]
    assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    ports = [node.port for node in cluster.nodes]
    views = [slot_ranges(port) for port in ports]
    assert views[0] == views[1] == views[2]
    assert [(first, last, ip, port) for first, last, ip, port, _id in views[0]] == [
        (*even_split(i, 3), "127.0.0.1", ports[i]) for i in range(3)
    ]
    assert sum(last - first + 1 for first, last, *_ in views[0]) == SLOTS
    for port in ports:
        info = cluster_info(port)
        assert (info["cluster_state"], info["cluster_slots_ok"], info["cluster_known_nodes"]) == ("ok", "16384", "3")
        assert node_command(port, "CONFIG", "GET", "appendfsync") == ["appendfsync", "always"]
    assert [even_split(i, 3) for i in range(3)] == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert [cluster.slot_owner(slot) for slot in (0, 5460, 5461, 10922, 10923, SLOTS - 1)] == [0, 0, 1, 1, 2, 2]


def test_key_written_through_owner_reads_back(cluster: RedisCluster) -> None:
    for index, node in enumerate(cluster.nodes):
        key = _key_on(cluster, index, "readback")
        with redis.Redis.from_url(node.url) as client:
            assert client.set(key, f"from node {index}")
            assert client.get(key) == f"from node {index}".encode()
        other = cluster.nodes[(index + 1) % len(cluster.nodes)]
        with redis.Redis.from_url(other.url) as client, pytest.raises(MovedError) as moved:
            client.get(key)
        assert (moved.value.slot_id, moved.value.node_addr) == (key_slot(key), ("127.0.0.1", node.port))
    # A cluster client seeded with the fixture's URL finds every key's owner.
    with redis.cluster.RedisCluster.from_url(cluster.url) as client:
        for index in range(len(cluster.nodes)):
            key = _key_on(cluster, index, "readback")
            assert client.get(key) == f"from node {index}".encode()


def _random_keys(rng: random.Random, count: int) -> list[str | bytes]:
    words = ["user", "campaign", "", "ä", "鍵", "🎟", "x" * 40, "{", "}", "{}", "{{", "}}", "{a}", ":", "\x00"]
    keys: list[str | bytes] = []
    for n in range(count):
        kind = n % 4
        if kind == 0:  # printable ASCII, braces likely
            keys.append("".join(rng.choice("ab{}:_0") for _ in range(rng.randrange(0, 16))))
        elif kind == 1:  # words, tags, empty tags and nested braces, non-ASCII
            keys.append("".join(rng.choice(words) for _ in range(rng.randrange(1, 6))))
        elif kind == 2:  # arbitrary bytes, including invalid UTF-8
            keys.append(rng.randbytes(rng.randrange(0, 24)))
        else:  # the gateway's shape of key: a tag, then more
            keys.append(f"rgw:{{c{rng.randrange(10**6)}:s{rng.randrange(64)}}}:b{rng.randrange(65536)}")
    return keys


def test_key_slot_matches_cluster_keyslot(cluster: RedisCluster) -> None:
    keys = _random_keys(random.Random(13), 2_000)
    keys += ["{}", "{}{a}", "{{a}}", "a{b}c{d}", "}{", "{", "", "é{}", "{é}", b"\xff{\xfe}", b"{\x00}"]
    with redis.Redis.from_url(cluster.url) as client:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        expected = pipe.execute()
    mismatches = [(key, slot, key_slot(key)) for key, slot in zip(keys, expected, strict=True) if key_slot(key) != slot]
    assert not mismatches


@pytest.mark.slow
def test_kill_restart_keeps_data_and_stop_leaves_no_process(tmp_path: Path) -> None:
    with RedisCluster(tmp_path, masters=3) as cluster:
        keys = [_key_on(cluster, index, "chaos") for index in range(3)]
        for index, key in enumerate(keys):
            with redis.Redis.from_url(cluster.nodes[index].url) as client:
                client.set(key, f"value {index}")
        victim = cluster.nodes[1]
        node_id, old_pid = node_command(victim.port, "CLUSTER", "MYID"), victim.pid

        cluster.kill(1)
        assert not victim.running()
        assert not port_open(victim.port)
        # The survivors notice (PFAIL after the node timeout, FAIL by majority): a real outage, not a blink.
        assert wait_for(lambda: cluster_info(cluster.nodes[0].port)["cluster_state"] == "fail", 15.0)

        cluster.restart(1)
        assert (victim.pid != old_pid, victim.data_dir) == (True, (tmp_path / "node-1").resolve())
        assert node_command(victim.port, "CLUSTER", "MYID") == node_id
        assert all(cluster_info(node.port)["cluster_state"] == "ok" for node in cluster.nodes)
        for index, key in enumerate(keys):
            with redis.Redis.from_url(cluster.nodes[index].url) as client:
                assert client.get(key) == f"value {index}".encode()
        pids = [node.pid for node in cluster.nodes]
        ports = [node.port for node in cluster.nodes]

    assert not any(alive_as(pid, "redis-server") for pid in pids)
    assert not any(port_open(port) for port in ports)
    cluster.stop()  # idempotent
    with pytest.raises(RuntimeError, match="already holds a cluster"):
        RedisCluster(tmp_path).start()
