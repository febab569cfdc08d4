"""Moving slots between the masters of a Redis Cluster, live, by the cluster's own protocol - and the plan that
spreads one campaign's (or SKU's) shards evenly (`rgw cluster spread`, gateway/shard_spread.py).

A slot moves as redis-cli --cluster reshard moves it: the target marks it IMPORTING, the source MIGRATING; MIGRATE
copies its keys in batches (atomically per batch: each key is on exactly one side); then every master learns the
new owner (SETSLOT NODE). Meanwhile the source answers ASK for keys already moved and TRYAGAIN for a script whose
keys are split between the two sides; the gateway's clients follow both (gateway/pipelined_cluster.py, redis-py),
so redemptions go on during the move and none is lost or doubled (tests/integration/test_cluster_chaos.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.keys_slot import key_slot
from gateway.redis_client import plain_client

log = logging.getLogger("rgw.cluster")

MIGRATE_BATCH = 100  # keys per MIGRATE: each batch blocks both nodes for its copy, so keep it small
MIGRATE_TIMEOUT_MS = 5000


@dataclass(frozen=True, slots=True)
class Move:
    """Slot `slot` (holding `shards` of the campaign's shards) from master `source` to master `target`."""

    slot: int
    source: str
    target: str
    shards: tuple[int, ...]


async def slot_owners(cluster: RedisCluster) -> dict[int, str]:
    """Slot -> the address ("host:port") of the master serving it, as the cluster says now (not as the client's
    cached map said when it last saw a MOVED)."""
    await cluster.initialize()
    await cluster.nodes_manager.initialize()
    return {slot: nodes[0].name for slot, nodes in cluster.nodes_manager.slots_cache.items() if nodes}


def plan(shards: int, key_of_shard: Callable[[int], str], owners: dict[int, str], masters: Sequence[str]) -> list[Move]:
    """Moves after which no master holds more than ceil(shards / masters) of the shards - the busiest master is
    what bounds the campaign - moving the fewest shards (a slot holding two shards moves as one)."""
    by_slot: dict[int, list[int]] = {}
    for k in range(shards):
        by_slot.setdefault(key_slot(key_of_shard(k)), []).append(k)
    held: dict[str, list[int]] = {m: [] for m in masters}
    for slot in sorted(by_slot):
        held.setdefault(owners[slot], []).append(slot)
    ceiling = math.ceil(shards / len(masters))
    count = {m: sum(len(by_slot[s]) for s in slots) for m, slots in held.items()}
    moves: list[Move] = []
    for source in sorted(held, key=lambda m: -count[m]):
        for slot in sorted(held[source], key=lambda s: len(by_slot[s])):
            if count[source] <= ceiling:
                break
            target = min(masters, key=lambda m: (count[m], m))
            size = len(by_slot[slot])
            if count[target] + size > ceiling or target == source:
                continue
            moves.append(Move(slot, source, target, tuple(by_slot[slot])))
            count[source] -= size
            count[target] += size
    return moves


async def move_slot(cluster: RedisCluster, move: Move) -> int:
    """Move one slot live (see the module docstring); returns the keys moved."""
    await cluster.initialize()
    masters = [node.name for node in cluster.get_primaries()]
    nodes = {name: plain_client(cluster, name) for name in {*masters, move.source, move.target}}
    try:
        ids = {name: str(await _command(client, "CLUSTER", "MYID")) for name, client in nodes.items()}
        source, target = nodes[move.source], nodes[move.target]
        await _command(target, "CLUSTER", "SETSLOT", move.slot, "IMPORTING", ids[move.source])
        await _command(source, "CLUSTER", "SETSLOT", move.slot, "MIGRATING", ids[move.target])
        moved = await _copy_keys(source, move)
        # the target first (it owns the slot from now), then the source (it stops answering ASK), then the rest
        for name in (move.target, move.source, *(m for m in masters if m not in (move.source, move.target))):
            await _command(nodes[name], "CLUSTER", "SETSLOT", move.slot, "NODE", ids[move.target])
    finally:
        for client in nodes.values():
            await client.aclose()
    log.info("slot %d moved from %s to %s (%d keys)", move.slot, move.source, move.target, moved)
    return moved


async def _copy_keys(source: Redis, move: Move) -> int:
    host, _, port = move.target.rpartition(":")
    moved = 0
    while batch := await _command(source, "CLUSTER", "GETKEYSINSLOT", move.slot, MIGRATE_BATCH):
        await _command(source, "MIGRATE", host, port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *batch)
        moved += len(batch)
    return moved


async def _command(node: Redis, *args: str | int) -> Any:
    return await node.execute_command(*args)  # type: ignore[no-untyped-call]
