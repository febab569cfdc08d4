"""Redis must not lose acknowledged redemptions (invariant 2): the Redis reply is our commit point, so by default
the gateway requires `appendonly yes`, `appendfsync always` and `maxmemory-policy noeviction`, and refuses to
start otherwise. RGW_REDIS_DURABILITY=everysec accepts losing up to about one second (two when the disk is
slow) of acknowledged redemptions if Redis or its machine crashes; `none` is for development and tests only.

Also here: the "initialised" marker. A Redis without it (new, or one that lost its data) is never redeemed
against until `rgw rebuild-redis` has restored its state from Postgres (invariant 8).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import keys
from gateway.ratelimited_log import RateLimitedLog
from gateway.redis_client import RedisClient, each_primary

log = logging.getLogger("rgw.durability")

LOSS_WINDOW = {"always": "none", "everysec": "about 1 s (2 s with a slow disk)", "none": "unbounded"}


class DurabilityError(RuntimeError):
    """Redis is configured so that it could lose acknowledged redemptions."""


def durability_problems(config: dict[str, str], required: str) -> list[str]:
    """What is wrong with a Redis CONFIG for the required level, as instructions ('set X')."""
    if required == "none":
        return []
    problems = []
    if config.get("appendonly") != "yes":
        problems.append(f"appendonly is {config.get('appendonly')!r}: set appendonly yes")
    allowed = ("always",) if required == "always" else ("always", "everysec")
    if config.get("appendfsync") not in allowed:
        hint = "" if required == "everysec" else " (or accept a loss window with RGW_REDIS_DURABILITY=everysec)"
        problems.append(f"appendfsync is {config.get('appendfsync')!r}: set appendfsync always{hint}")
    if config.get("maxmemory-policy") != "noeviction":
        problems.append(f"maxmemory-policy is {config.get('maxmemory-policy')!r}: set maxmemory-policy noeviction")
    return problems


async def check_durability(redis: RedisClient, required: str) -> dict[str, str]:
    """The persistence settings of Redis (of every master of a cluster: one that may lose data is enough to lose
    redemptions); DurabilityError when they fall short of `required`."""
    try:
        async with each_primary(redis) as nodes:
            configs = [await _config(node) for node in nodes]
    except Exception as exc:
        if required == "none":
            return {}
        raise DurabilityError(f"cannot read the Redis persistence settings (CONFIG GET: {exc})") from exc
    problems = []
    for node, config in zip(nodes, configs, strict=True):
        where = "{host}:{port}: ".format(**node.connection_pool.connection_kwargs)
        problems += [(where if len(nodes) > 1 else "") + p for p in durability_problems(config, required)]
    if problems:
        raise DurabilityError(
            f"Redis could lose acknowledged redemptions (RGW_REDIS_DURABILITY={required}): " + "; ".join(problems)
        )
    return configs[0]


async def _config(node: Redis) -> dict[str, str]:
    config: dict[str, str] = {}
    for name in ("appendonly", "appendfsync", "maxmemory-policy"):
        config.update({str(k): str(v) for k, v in (await node.config_get(name)).items()})
    return config


async def is_initialised(redis: RedisClient) -> bool:
    """Whether Redis state was built from Postgres (and has not been lost since). On a cluster every master kept a
    marker of its own: a master restarted empty (or a replica promoted without the data) loses its marker, and
    with it the whole cluster counts as not initialised, though the main marker lives on another master."""
    marker = await redis.get(keys.INITIALISED)
    if marker is None:
        return False
    nodes = _node_markers(marker if isinstance(marker, str) else marker.decode())
    return not nodes or await redis.exists(*nodes) == len(nodes)


def _node_markers(marker: str) -> list[str]:
    try:
        nodes = json.loads(marker).get("nodes", [])
    except (ValueError, AttributeError):
        return []
    return [str(n) for n in nodes] if isinstance(nodes, list) else []


async def mark_initialised(redis: RedisClient, source: str) -> None:
    """Record that Redis now holds everything Postgres says it must (on a cluster: on every master too)."""
    nodes = await _marker_per_master(redis) if isinstance(redis, RedisCluster) else []
    for node in nodes:
        await redis.set(node, source)
    await redis.set(keys.INITIALISED, json.dumps({"at": int(time.time()), "by": source, "nodes": nodes}))


async def _marker_per_master(redis: RedisCluster) -> list[str]:
    """A marker key per master, each in a slot that master serves now (a marker migrates with its slot)."""
    await redis.initialize()
    masters = {node.name for node in redis.get_primaries()}
    found: dict[str, str] = {}
    for n in range(_MAX_MARKER_TRIES):
        key = keys.node_marker_key(n)
        owner = redis.get_node_from_key(key)
        if owner is not None and owner.name in masters and owner.name not in found:
            found[owner.name] = key
            if len(found) == len(masters):
                break
    return sorted(found.values())


_MAX_MARKER_TRIES = 100_000  # 16,384 slots: a master serving a single slot is found within ~16k candidates on average


# What a cluster client raises for a key whose master is down (or whose slot no node serves yet).
_MASTER_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.SlotNotCoveredError,
    TimeoutError,
)
NOT_INITIALISED = "Redis is not initialised from Postgres: run `rgw rebuild-redis`"


class InitialisedProbe:
    """The health check's view of the "initialised" markers. On one Redis: the marker is there, or not (an
    unreachable Redis raises). On a cluster, marker by marker within `timeout_s`: a marker missing from a master
    that answered means that master lost its data - not initialised, every redemption refused; a master that does
    not answer is only down - its slots' calls fail on their own (UNAVAILABLE) and the other masters' campaigns
    carry on. The marker list is remembered from the last read, for while the main marker's master is down; until
    it was read once, an unreachable master fails closed (raises)."""

    def __init__(self, redis: RedisClient, *, timeout_s: float) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._nodes: list[str] | None = None
        self._down_log = RateLimitedLog(log, interval_s=60, burst=1)

    async def check(self) -> str:
        """ "" when initialised (every master that answered keeps its marker), else why not."""
        if not isinstance(self._redis, RedisCluster):
            return "" if await is_initialised(self._redis) else NOT_INITIALISED
        down = 0
        try:
            marker = await self._answer(self._redis.get(keys.INITIALISED))
        except _MASTER_DOWN:
            if self._nodes is None:
                raise
            marker, down = json.dumps({"nodes": self._nodes}), 1
        if marker is None:
            return NOT_INITIALISED
        self._nodes = _node_markers(marker if isinstance(marker, str) else marker.decode())
        found = await asyncio.gather(
            *(self._answer(self._redis.exists(n)) for n in self._nodes), return_exceptions=True
        )
        for answer in found:
            if isinstance(answer, BaseException) and not isinstance(answer, _MASTER_DOWN):
                raise answer
            if answer == 0:
                return NOT_INITIALISED + " (a Redis Cluster master lost its data)"
            down += isinstance(answer, BaseException)
        if down:
            self._down_log.log(
                logging.WARNING, "%d Redis Cluster master(s) unreachable: serving the others' slots", down
            )
        return ""

    async def _answer(self, call: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self._timeout_s):
            return await call
