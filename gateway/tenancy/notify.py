"""Announcing a committed registry change to every gateway process, through Redis.

Two signals, for speed and for safety: a PUBLISH on `keys.REGISTRY_CHANNEL` reaches every subscribed process at
once, and the version key `keys.REGISTRY_VERSION` lets a process that missed the message (pub/sub is
fire-and-forget: a reconnecting subscriber loses what was sent meanwhile) find the change by polling. Postgres
stays the source of truth: a process that sees a newer version loads the rows changed since the one it holds.

Call `publish` after the transaction committed, never inside it: a process that hears of a version must be able
to read it. After restoring the registry from a backup (its version went back), delete the version key.
"""

from __future__ import annotations

from gateway import keys
from gateway.redis_client import RedisClient

# KEYS[1] the registry version key; ARGV[1] a committed registry version (an integer).
# Sets the key unless it already holds a greater version - two administrators' publishes may arrive in either
# order, and the key must only move forwards. Returns the version the key holds afterwards.
_RAISE_VERSION = """
local held = tonumber(redis.call('GET', KEYS[1])) or 0
local version = tonumber(ARGV[1])
if version > held then
    redis.call('SET', KEYS[1], ARGV[1])
    return version
end
return held
"""


async def publish(redis: RedisClient, version: int) -> int:
    """Raise the version key to `version` (never lower it) and announce the version it then holds; returns it."""
    held = int(await redis.eval(_RAISE_VERSION, 1, keys.REGISTRY_VERSION, str(version)))
    await redis.publish(keys.REGISTRY_CHANNEL, str(held))
    return held


async def current_version(redis: RedisClient) -> int | None:
    """The latest announced registry version, or None when none was (a new or rebuilt Redis: ask Postgres)."""
    value = await redis.get(keys.REGISTRY_VERSION)
    text = value.decode() if isinstance(value, bytes) else str(value)
    return int(text) if value is not None and text.isdigit() else None
