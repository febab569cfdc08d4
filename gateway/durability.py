"""Redis must not lose acknowledged redemptions (invariant 2): the Redis reply is our commit point, so by default
the gateway requires `appendonly yes`, `appendfsync always` and `maxmemory-policy noeviction`, and refuses to
start otherwise. RGW_REDIS_DURABILITY=everysec accepts losing up to about one second (two when the disk is
slow) of acknowledged redemptions if Redis or its machine crashes; `none` is for development and tests only.

Also here: the "initialised" marker. A Redis without it (new, or one that lost its data) is never redeemed
against until `rgw rebuild-redis` has restored its state from Postgres (invariant 8).
"""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from gateway import keys

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


async def check_durability(redis: Redis, required: str) -> dict[str, str]:
    """The persistence settings of Redis; DurabilityError when they fall short of `required`."""
    try:
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            config.update({str(k): str(v) for k, v in (await redis.config_get(name)).items()})
    except Exception as exc:
        if required == "none":
            return {}
        raise DurabilityError(f"cannot read the Redis persistence settings (CONFIG GET: {exc})") from exc
    problems = durability_problems(config, required)
    if problems:
        raise DurabilityError(
            f"Redis could lose acknowledged redemptions (RGW_REDIS_DURABILITY={required}): " + "; ".join(problems)
        )
    return config


async def is_initialised(redis: Redis) -> bool:
    """Whether Redis state was built from Postgres (and has not been lost since)."""
    return bool(await redis.exists(keys.INITIALISED))


async def mark_initialised(redis: Redis, source: str) -> None:
    """Record that Redis now holds everything Postgres says it must."""
    await redis.set(keys.INITIALISED, json.dumps({"at": int(time.time()), "by": source}))
