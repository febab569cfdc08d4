"""Shards on a Redis Cluster: campaigns and SKUs created with as many shards as spread evenly over the masters,
and `rgw cluster spread --apply` moving a campaign's slots live until no master holds more than its share -
the campaign's codes redeem afterwards as before, through the gateway."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from functools import partial

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster

from gateway import keys
from gateway.cluster_slots import slot_owners
from gateway.inventory import layout
from gateway.inventory.model import create_sku
from gateway.keys_slot import key_slot
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.redis_client import RedisClient
from tests.conftest import gateway_environ
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request

pytestmark = pytest.mark.single_and_cluster


async def per_master(redis: RedisClient, shards: int, key_of_shard: partial[str]) -> Counter[str]:
    assert isinstance(redis, RedisCluster)
    owners = await slot_owners(redis)
    return Counter(owners[key_slot(key_of_shard(k))] for k in range(shards))


async def test_a_campaign_and_a_sku_get_as_many_shards_as_spread_evenly(
    issue: Issue, redis: RedisClient, db: asyncpg.Connection
) -> None:
    issued = await issue(30, shards=3)
    sku = await create_sku(db, redis, brand_id=1, code="month-card", name="Month card", shards=3)
    if not isinstance(redis, RedisCluster):  # one Redis: exactly what was asked
        assert (issued.campaign.shards, sku.shards) == (3, 3)
        return
    for shards, key_of_shard in ((issued.campaign.shards, partial(keys.meta_key, issued.campaign.id)),
                                 (sku.shards, partial(layout.meta_key, sku.id))):  # fmt: skip
        assert shards >= 3
        held = await per_master(redis, shards, key_of_shard)
        assert max(held.values()) == math.ceil(shards / 3), held
        assert all([await redis.exists(key_of_shard(k)) for k in range(shards)])  # each shard published


async def test_cluster_spread_apply_moves_slots_live_and_the_codes_still_redeem(
    gateway: RunningGateway, issue: Issue, redis: RedisClient, redis_url: str, migrated: str
) -> None:
    if not isinstance(redis, RedisCluster):
        refused = rgw(redis_url, migrated, "cluster", "spread", "--campaign", "1")
        assert refused.returncode == 1 and "not a cluster" in refused.stdout
        return
    # 8 shards over 3 masters: created campaigns until one's shards land unevenly (the count alone cannot fix all)
    for _ in range(40):
        issued = await issue(40, shards=8)
        key_of_shard = partial(keys.meta_key, issued.campaign.id)
        before = await per_master(redis, issued.campaign.shards, key_of_shard)
        if max(before.values()) > math.ceil(issued.campaign.shards / 3):
            break
    else:
        pytest.fail("no campaign of 8 shards was uneven: the test would not exercise a move")
    half = len(issued.codes) // 2
    first = [await gateway.stub.Redeem(redeem_request(code, f"a-{code}")) for code in issued.codes[:half]]

    moved = rgw(redis_url, migrated, "cluster", "spread", "--campaign", str(issued.campaign.id), "--apply")

    assert moved.returncode == 0, moved.stderr
    assert "moving slot" in moved.stdout
    after = await per_master(redis, issued.campaign.shards, key_of_shard)
    assert max(after.values()) == math.ceil(issued.campaign.shards / 3), (before, after)
    second = [await gateway.stub.Redeem(redeem_request(code, f"b-{code}")) for code in issued.codes]
    assert all(r.outcome == pb.OUTCOME_REDEEMED for r in first)
    assert [r.outcome for r in second[:half]] == [pb.OUTCOME_ALREADY_REDEEMED] * half  # the moved state held
    assert all(r.outcome == pb.OUTCOME_REDEEMED for r in second[half:])


def rgw(redis_url: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **gateway_environ(redis_url, database_url)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
