"""Which Redis the gateway talks to: one server or a Redis Cluster, and the two clients for each.

RGW_REDIS_URL names one server (`redis://host:port/0`) or a cluster's seed nodes, comma-separated
(`redis://10.0.0.1:6379,10.0.0.2:6379` — any node will do, the clients learn the rest from CLUSTER SLOTS).
RGW_REDIS_MODE says which: `auto` (a list of seeds is a cluster, one URL a single server), `single` or `cluster`.

Everything but the hot path uses redis-py: `Redis` on one server, `redis.asyncio.cluster.RedisCluster` on a
cluster (routes each command by its key's slot, follows MOVED/ASK, splits multi-key DEL/EXISTS by slot, runs a
MULTI only when every key of it shares a slot — which this project's MULTIs do: they are per stream or per hash
tag). The hot path (the redeem, risk and inventory scripts) uses PipelinedRedis or PipelinedCluster: the same
script calls, pipelined, and on a cluster routed by slot (gateway/pipelined_cluster.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias
from urllib.parse import urlparse

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.pipelined_cluster import PipelinedCluster
from gateway.pipelined_redis import PipelinedRedis

RedisClient: TypeAlias = Redis | RedisCluster
HotClient: TypeAlias = PipelinedRedis | PipelinedCluster

MODES = ("auto", "single", "cluster")


def seeds(url: str) -> list[str]:
    """The comma-separated entries of RGW_REDIS_URL."""
    return [part.strip() for part in url.split(",") if part.strip()]


def is_cluster(url: str, mode: str = "auto") -> bool:
    """Whether `url` (with RGW_REDIS_MODE `mode`) names a Redis Cluster."""
    if mode == "cluster":
        return True
    if mode == "single":
        return False
    return len(seeds(url)) > 1


def url_problem(url: str, mode: str) -> str:
    """Why `url` cannot be used in `mode`, or "" when it can (for settings' validation)."""
    if mode not in MODES:
        return f"must be one of {', '.join(MODES)}, not {mode!r}"
    entries = seeds(url)
    if not entries:
        return "names no Redis"
    if mode == "single" and len(entries) > 1:
        return "lists several seed nodes, which is a cluster: set RGW_REDIS_MODE=cluster (or auto)"
    if not is_cluster(url, mode):
        return ""
    for entry in entries:
        parsed = urlparse(entry if "://" in entry else f"redis://{entry}")
        if parsed.scheme != "redis" or not parsed.hostname:
            return f"cluster seeds are host:port or redis://host:port, not {entry!r}"
        if parsed.path not in ("", "/", "/0"):
            return f"a Redis Cluster has database 0 only, not {parsed.path.lstrip('/')!r} in {entry!r}"
    return ""


def _startup_nodes(url: str) -> tuple[list[ClusterNode], str | None, str | None]:
    nodes: list[ClusterNode] = []
    username = password = None
    for entry in seeds(url):
        parsed = urlparse(entry if "://" in entry else f"redis://{entry}")
        nodes.append(ClusterNode(parsed.hostname or "127.0.0.1", parsed.port or 6379))
        username, password = username or parsed.username, password or parsed.password
    return nodes, username, password


def connect(url: str, mode: str = "auto", *, pool_size: int, timeout_s: float) -> RedisClient:
    """A redis-py client for everything but the hot path. On one server the pool queues callers beyond
    `pool_size` (bursts are normal here); on a cluster each node gets up to `pool_size` connections."""
    if is_cluster(url, mode):
        nodes, username, password = _startup_nodes(url)
        return RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            max_connections=pool_size,
            # Slots of a killed master are served again after failover; until then its slots fail, the others work.
            require_full_coverage=False,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )
    return connect_server(url, pool_size=pool_size, timeout_s=timeout_s)


def connect_server(url: str, *, pool_size: int, timeout_s: float) -> Redis:
    """A redis-py client of one server whose pool queues callers beyond `pool_size` (bursts are normal here)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        # A pooled connection that died with a restarted Redis fails once; retry that once on a fresh one.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis_errors.ConnectionError],
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


async def connect_hot(url: str, mode: str = "auto", *, connections: int, timeout_s: float) -> HotClient | None:
    """The pipelined client of the script calls, connected (in the background while Redis is down), or None
    where it cannot serve (a unix socket or TLS URL: redis-py carries the scripts there)."""
    client: HotClient
    if is_cluster(url, mode):
        client = PipelinedCluster(seeds(url), connections_per_node=connections, timeout_s=timeout_s)
    elif url.startswith("redis://"):
        client = PipelinedRedis(url, connections=connections, timeout_s=timeout_s)
    else:
        return None
    await client.connect()
    return client


@contextlib.asynccontextmanager
async def each_primary(client: RedisClient) -> AsyncIterator[list[Redis]]:
    """One plain client per master (the server itself when not a cluster), for what must hold on every node:
    persistence settings, flushing a test database; closed on exit (not the single server's)."""
    if not isinstance(client, RedisCluster):
        yield [client]
        return
    await client.initialize()
    nodes = [plain_client(client, node.name) for node in client.get_primaries()]
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.aclose()


ScriptCall: TypeAlias = tuple[Sequence[str], Sequence[str | int]]  # (KEYS, ARGV) of one EVALSHA

_REDIRECTED = (
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)


async def evalsha_many(client: RedisClient, sha: str, calls: Sequence[ScriptCall]) -> list[Any]:
    """EVALSHA every call, pipelined, replies in order (bulk loading: codes, secrets, re-encryption).

    One server: one pipeline. A cluster: redis-py refuses scripts in its cluster pipeline, so the calls are grouped
    by the master serving their first key's slot and each group is one pipeline on that master, the groups sent
    concurrently; a call answered MOVED/ASK (a slot migrating meanwhile) is sent again on its own through the
    cluster client, which follows the redirection. NoScriptError as from a single server's pipeline."""
    if not isinstance(client, RedisCluster):
        async with client.pipeline(transaction=False) as pipe:
            for call_keys, call_args in calls:
                pipe.evalsha(sha, len(call_keys), *call_keys, *call_args)
            return list(await pipe.execute())
    return await _evalsha_on_cluster(client, sha, calls)


async def _evalsha_on_cluster(client: RedisCluster, sha: str, calls: Sequence[ScriptCall]) -> list[Any]:
    await client.initialize()
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for position, (call_keys, _) in enumerate(calls):
        node = client.get_node_from_key(call_keys[0])
        groups[node.name if node is not None else ""].append(position)
    replies: list[Any] = [None] * len(calls)

    async def on_node(name: str, positions: list[int]) -> None:
        async with plain_client(client, name) as node, node.pipeline(transaction=False) as pipe:
            for position in positions:
                call_keys, call_args = calls[position]
                pipe.evalsha(sha, len(call_keys), *call_keys, *call_args)
            for position, reply in zip(positions, await pipe.execute(raise_on_error=False), strict=True):
                replies[position] = reply

    await asyncio.gather(*(on_node(name, positions) for name, positions in groups.items() if name))
    unsent = set(groups.get("", []))  # slots without a known master: the cluster client finds them
    for position, reply in enumerate(replies):
        if isinstance(reply, redis_errors.NoScriptError):
            raise reply
        if position in unsent or isinstance(reply, _REDIRECTED):
            call_keys, call_args = calls[position]
            replies[position] = await client.evalsha(sha, len(call_keys), *call_keys, *call_args)
        elif isinstance(reply, Exception):
            raise reply
    return replies


def plain_client(cluster: RedisCluster, name: str) -> Redis:
    """A plain client of one cluster node ("host:port"), with the cluster client's credentials and timeouts."""
    host, _, port = name.rpartition(":")
    kwargs = cluster.connection_kwargs
    return Redis(
        host=host or "127.0.0.1",
        port=int(port),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        socket_timeout=kwargs.get("socket_timeout"),
        socket_connect_timeout=kwargs.get("socket_connect_timeout"),
        decode_responses=True,
    )
