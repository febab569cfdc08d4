"""`rgw cluster spread`: where a campaign's (or SKU's) shards are on a Redis Cluster, shards per master, and with
--apply the slot moves that leave no master more than ceil(K/N) of them (gateway/cluster_slots.py)."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from functools import partial

import asyncpg
from redis.asyncio.cluster import RedisCluster

from gateway import keys
from gateway.campaigns.model import get_campaign
from gateway.cluster_slots import move_slot, plan, slot_owners
from gateway.inventory import layout
from gateway.inventory.model import get_sku
from gateway.keys_slot import key_slot
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings


async def _shards(conn: asyncpg.Connection, args: argparse.Namespace) -> tuple[str, int, Callable[[int], str]]:
    if args.campaign is not None:
        campaign = await get_campaign(conn, args.campaign)
        return f"campaign {campaign.id}", campaign.shards, partial(keys.meta_key, campaign.id)
    sku = await get_sku(conn, args.sku)
    return f"SKU {sku.id}", sku.shards, partial(layout.meta_key, sku.id)


async def _spread(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_cluster:
        print("rgw: RGW_REDIS_URL is one Redis, not a cluster: every shard is on it")
        return 1
    conn = await asyncpg.connect(settings.database_url)
    redis: RedisClient = connect(*settings.redis_target, pool_size=2, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        assert isinstance(redis, RedisCluster)
        what, shards, key_of_shard = await _shards(conn, args)
        await redis.initialize()
        masters = sorted(node.name for node in redis.get_primaries())
        owners = await slot_owners(redis)
        _report(what, shards, key_of_shard, owners, masters)
        moves = plan(shards, key_of_shard, owners, masters)
        for move in moves:
            print(f"{'moving' if args.apply else 'would move'} slot {move.slot} (shards "
                  f"{', '.join(map(str, move.shards))}) from {move.source} to {move.target}")  # fmt: skip
            if args.apply:
                await move_slot(redis, move)
        if args.apply and moves:
            _report(what, shards, key_of_shard, await slot_owners(redis), masters)
        return 0
    finally:
        await redis.aclose()
        await conn.close()


def _report(
    what: str, shards: int, key_of_shard: Callable[[int], str], owners: dict[int, str], masters: list[str]
) -> None:
    held = Counter(owners[key_slot(key_of_shard(k))] for k in range(shards))
    cells = ", ".join(f"{m}: {held.get(m, 0)}" for m in masters)
    print(f"{what}: {shards} shards over {len(masters)} masters - {cells}")


def add_cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """rgw cluster spread."""
    cluster = sub.add_parser("cluster", help="Redis Cluster operations").add_subparsers(dest="action", required=True)
    spread = cluster.add_parser("spread", help="shards per master of a campaign or SKU; --apply evens them out")
    which = spread.add_mutually_exclusive_group(required=True)
    which.add_argument("--campaign", type=int)
    which.add_argument("--sku", type=int, help="the SKU's id")
    spread.add_argument("--apply", action="store_true", help="move slots (live) until no master holds more than "
                        "ceil(shards / masters)")  # fmt: skip
    spread.set_defaults(run=_spread)
