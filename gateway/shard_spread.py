"""How many shards a campaign or SKU gets on a Redis Cluster, and where their slots are, so that its shards spread
evenly over the masters.

A shard's slot is the CRC16 of its hash tag ({c<campaign>.<k>}, {k<sku>.<k>}): where the K shards of one campaign
land is not chosen, and with K = N masters the busiest master often holds two or three of them while another holds
none - the campaign then runs at the speed of one master, not N. Two remedies, both here:

- the count: on a cluster a campaign or SKU of K > 1 shards takes the smallest count K' in [K, 2K + N] for which no
  master holds more than ceil(K'/N) of its shards, or else the most even count of that range. CRC16 is linear, so
  the tags of one campaign (which differ in their last characters) fall in structured patterns: for many campaigns
  no count in the range is perfectly even (tests/unit/test_shard_spread.py measures how often);
- the slots: `rgw cluster spread --apply` moves the slots of a campaign's (or SKU's) shards from the masters that
  hold too many to those that hold too few, by the cluster's own live migration (gateway/cluster_slots.py), until
  no master holds more than ceil(K/N).

One shard stays one shard: there is nothing to spread, and a campaign with a per-device limit relies on having one.
The spread is the one at creation; moving slots later (adding masters, `redis-cli --cluster rebalance`) changes it -
`rgw cluster spread` reports it at any time.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

from redis.asyncio.cluster import RedisCluster

from gateway.redis_client import RedisClient

Owner = Callable[[int], str | None]  # the master serving shard k's slot, by its address


def spread(shards: int, owner: Owner) -> collections.Counter[str]:
    """Shards per master."""
    return collections.Counter(name for k in range(shards) if (name := owner(k)) is not None)


def _excess(shards: int, masters: int, owner: Owner) -> float:
    """How far the busiest master is above an even share (1.0: even)."""
    return max(spread(shards, owner).values(), default=0) / math.ceil(shards / masters)


def even_count(requested: int, masters: int, owner: Owner, *, limit: int) -> int:
    """The smallest shard count >= `requested` whose shards spread evenly over `masters` (see the module)."""
    if requested <= 1 or masters <= 1:
        return requested
    candidates = range(requested, min(limit, 2 * requested + masters) + 1)
    best = requested
    for count in candidates:
        excess = _excess(count, masters, owner)
        if excess <= 1.0:
            return count
        if excess < _excess(best, masters, owner):
            best = count
    return best


async def shard_owner(redis: RedisCluster, key_of_shard: Callable[[int], str]) -> Owner:
    """Shard k -> the address of the master serving its key's slot now (the slot map read afresh)."""
    await redis.initialize()
    await redis.nodes_manager.initialize()

    def owner(k: int) -> str | None:
        node = redis.get_node_from_key(key_of_shard(k))
        return node.name if node is not None else None

    return owner


async def shards_for(redis: RedisClient, requested: int, key_of_shard: Callable[[int], str], *, limit: int) -> int:
    """The shard count to create: `requested` on one Redis, even_count() on a cluster."""
    if not isinstance(redis, RedisCluster) or requested <= 1:
        return requested
    owner = await shard_owner(redis, key_of_shard)
    return even_count(requested, len(redis.get_primaries()), owner, limit=limit)
