"""Shard counts on a Redis Cluster: the shards of a campaign or SKU land on slots by CRC16 of their hash tag, so
a requested count is raised to the one of [K, 2K + N] that spreads them most evenly over the masters."""

from __future__ import annotations

import math
import statistics
from functools import partial

import pytest

from gateway import codes, keys
from gateway.dev.redis_cluster import even_split
from gateway.inventory import layout
from gateway.keys_slot import key_slot
from gateway.shard_spread import Owner, even_count, spread


def owner_of(key_of_shard: partial[str], masters: int) -> Owner:
    """Shard -> master of a cluster whose masters split the slots evenly (as redis-cli --cluster create does)."""
    ranges = [even_split(i, masters) for i in range(masters)]

    def owner(k: int) -> str:
        slot = key_slot(key_of_shard(k))
        return str(next(i for i, (first, last) in enumerate(ranges) if first <= slot <= last))

    return owner


def excess(shards: int, masters: int, owner: Owner) -> float:
    """The busiest master's shards over an even share (1.0: even)."""
    return max(spread(shards, owner).values()) / math.ceil(shards / masters)


@pytest.mark.parametrize(("masters", "requested"), [(3, 2), (3, 3), (3, 6), (3, 12), (6, 6), (6, 12)])
def test_the_chosen_count_is_never_less_even_and_on_average_much_more(masters: int, requested: int) -> None:
    before, after = [], []
    for campaign_id in range(1, 201):
        owner = owner_of(partial(keys.meta_key, campaign_id), masters)
        chosen = even_count(requested, masters, owner, limit=codes.MAX_SHARDS)
        assert requested <= chosen <= 2 * requested + masters
        before.append(excess(requested, masters, owner))
        after.append(excess(chosen, masters, owner))
        assert after[-1] <= before[-1]
        assert after[-1] == min(excess(k, masters, owner) for k in range(requested, chosen + 1))
    assert statistics.mean(before) > 1.15  # as requested, a busiest master carries 15%+ more than its share
    assert statistics.mean(after) < statistics.mean(before)


@pytest.mark.parametrize(("masters", "requested"), [(3, 2), (3, 3), (6, 6)])
def test_small_counts_become_perfectly_even(masters: int, requested: int) -> None:
    for campaign_id in range(1, 201):
        owner = owner_of(partial(keys.meta_key, campaign_id), masters)
        assert excess(even_count(requested, masters, owner, limit=codes.MAX_SHARDS), masters, owner) == 1.0


def test_skus_are_spread_the_same_way() -> None:
    for sku_id in range(1, 101):
        owner = owner_of(partial(layout.meta_key, sku_id), 3)
        assert excess(even_count(3, 3, owner, limit=64), 3, owner) == 1.0


def test_one_shard_and_one_master_are_left_alone() -> None:
    owner = owner_of(partial(keys.meta_key, 7), 3)
    assert even_count(1, 3, owner, limit=codes.MAX_SHARDS) == 1
    assert even_count(5, 1, owner, limit=codes.MAX_SHARDS) == 5


def test_the_limit_caps_the_count_and_the_most_even_one_below_it_is_taken() -> None:
    def skewed(k: int) -> str:  # no count is even on this cluster
        return "a" if k % 4 else "b"

    chosen = even_count(3, 2, skewed, limit=5)
    assert 3 <= chosen <= 5
    assert excess(chosen, 2, skewed) == min(excess(k, 2, skewed) for k in (3, 4, 5))
