"""The redeem hot path's pipelined client for Redis Cluster: each call goes to the master owning its key's slot.

One PipelinedRedis per master does the pipelining (a few connections, every call in flight shares them); this
module only chooses the node and follows the cluster when slots move:

- The slot map comes from CLUSTER SLOTS (any reachable node, else the seeds) and is refreshed in the background
  after a MOVED, a CLUSTERDOWN or a failed call, at most every quarter second.
- MOVED slot host:port: the slot is pointed at the new owner at once and the call is sent again there.
- ASK slot host:port (the slot is being migrated and the key has left already): ASKING and the command are sent
  back to back on one connection of the target (PipelinedRedis.call_after); the map is left alone.
- TRYAGAIN (the keys of one call split by a migration in progress): sent again after 25 ms, doubled for each
  redirection the call followed before (0.775 s at most in all; MIGRATE moves a batch of keys in milliseconds).
  A call follows at most REDIRECTS of these; a MOVED, ASK or TRYAGAIN means the node did not run it, so a write
  sent again is never applied twice.
- A node that is down: its calls fail as PipelinedRedis's do (ConnectionError at once when it has no connection,
  TimeoutError when it stops answering), calls for other slots go on, and its client reconnects in the background.
  CLUSTERDOWN, a slot no node serves and redirections that do not settle fail as ClusterUnavailableError, a
  ConnectionError: callers map all of them to "unavailable".

Which commands: a call's slot is the slot of its first key, and every key of one call must share that slot (the
gateway's scripts give all their keys one hash tag). The first key is
- EVALSHA / EVAL / EVALSHA_RO / EVAL_RO / FCALL / FCALL_RO: args[3] when numkeys (args[2]) > 0; with no keys the
  call goes to any master;
- the keyless commands of _KEYLESS (PING, ECHO, INFO, DBSIZE, TIME, CLUSTER ...): any master;
- SCRIPT ... (LOAD, FLUSH, EXISTS): sent to every node; the reply is the first node's that answered (for LOAD
  the sha1, the same everywhere). That is how Script works unchanged: on NOSCRIPT from any node its SCRIPT LOAD
  reaches the node that answered NOSCRIPT (and the others, which is harmless), then EVALSHA runs again;
- any other command: args[1] (GET, SET, INCR, HGET, HSET, EXPIRE, ZADD, XADD, DEL of one hash tag ...). Commands
  whose first key is elsewhere (OBJECT, MEMORY USAGE, XREAD, BITOP, MIGRATE ...) are not supported.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any
from urllib.parse import urlparse

from redis import exceptions as redis_errors

from gateway.keys_slot import SLOTS, key_slot
from gateway.pipelined_redis import Arg, PipelinedRedis

REDIRECTS = 5
TRYAGAIN_DELAY_S = 0.025
REFRESH_GAP_S = 0.25
_REFRESH_BACKOFF_MAX_S = 2.0

_SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"})
_KEYLESS = frozenset(
    {"PING", "ECHO", "INFO", "DBSIZE", "TIME", "CLUSTER", "COMMAND", "CONFIG", "CLIENT", "ROLE", "LASTSAVE", "WAIT"}
)
_BROADCAST = frozenset({"SCRIPT"})
_FAILED = (redis_errors.RedisError, OSError, TimeoutError)


class ClusterUnavailableError(redis_errors.ConnectionError):
    """The cluster could not serve a call: CLUSTERDOWN, a slot no node serves, or redirections that did not
    settle. A ConnectionError, so callers treat it as Redis being unavailable."""


def _command(args: Sequence[Arg]) -> str:
    name = args[0]
    return (name.decode() if isinstance(name, bytes) else str(name)).upper()


def _first_key(command: str, args: Sequence[Arg]) -> Arg | None:
    """The key that routes a call (see the module docstring), None for a call any master can answer."""
    if command in _SCRIPT_CALLS:
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if command in _KEYLESS or command in _BROADCAST or len(args) < 2:
        return None
    return args[1]


def _slot(key: Arg) -> int:
    return key_slot(key if isinstance(key, str | bytes) else str(key))


def _seed(seed: str) -> tuple[str, str]:
    """("host:port", "user:password@" or "") of a seed given as host:port or redis://[user:password@]host:port."""
    parsed = urlparse(seed if "://" in seed else f"redis://{seed}")
    if parsed.scheme != "redis":
        raise ValueError(f"cluster seeds are host:port or redis:// URLs, not {seed!r}")
    auth = f"{parsed.username or ''}:{parsed.password}@" if parsed.password else ""
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}", auth


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _slot_ranges(reply: Any, asked: str) -> list[tuple[int, int, str]]:
    """(first slot, last slot, master "host:port") of a CLUSTER SLOTS reply. A master announced without an address
    ("" or "?") is the node that was asked."""
    ranges: list[tuple[int, int, str]] = []
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0] if master[0] not in (None, "", "?") else _host(asked)
        ranges.append((start, end, f"{host}:{int(master[1])}"))
    return ranges


class PipelinedCluster:
    """PipelinedRedis's call(), connect(), connected and close() over a Redis Cluster; see the module docstring."""

    def __init__(self, seeds: Sequence[str], *, connections_per_node: int = 2, timeout_s: float = 2.0) -> None:
        if not seeds:
            raise ValueError("PipelinedCluster needs at least one seed address")
        parsed = [_seed(s) for s in seeds]
        self._seeds = [address for address, _ in parsed]
        self._auth = next((auth for _, auth in parsed if auth), "")
        self._per_node = connections_per_node
        self._timeout = timeout_s
        self._slots: list[str | None] = [None] * SLOTS
        self._masters: list[str] = []
        self._nodes: dict[str, PipelinedRedis] = {}
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._retiring: dict[str, asyncio.TimerHandle] = {}
        self._next = itertools.count()
        self._refresher: asyncio.Task[None] | None = None
        self._stale = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: set[asyncio.Task[None]] = set()
        self._closed = False
        self.redirections: collections.Counter[str] = collections.Counter()  # MOVED, ASK, TRYAGAIN replies followed

    async def connect(self) -> None:
        """Load the slot map and connect to every master. If no node answers, the map is loaded in the background
        (calls fail with ConnectionError until then), as PipelinedRedis retries its connections."""
        if not await self._load_slots():
            self._refresh_soon()

    @property
    def connected(self) -> bool:
        """Whether the slot map is loaded and at least one master has a connection up (as PipelinedRedis's "at
        least one connection": with a master down the slots of the others still work)."""
        return any(self._nodes[m].connected for m in self._masters if m in self._nodes)

    def owner(self, slot: int) -> str | None:
        """The "host:port" of the master this client sends the slot's calls to (None before the map is loaded)."""
        return self._slots[slot]

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send one command to the master of its slot; the future resolves to its reply (or raises its error)."""
        command = _command(args)
        key = _first_key(command, args)
        slot: int | None = None
        if key is None:
            if command in _BROADCAST:
                return self._broadcast(args)
            address = self._any_master()
        else:
            slot = _slot(key)
            maybe = self._slots[slot]
            if maybe is None:
                self._refresh_soon()
                raise ClusterUnavailableError(f"no Redis Cluster node is known to serve slot {slot}")
            address = maybe
        node = self._nodes.get(address)
        if node is None:  # not expected: every address in the map has its client
            self._refresh_soon()
            raise ClusterUnavailableError(f"no client for the Redis Cluster node {address}")
        try:
            inner = node.call(*args)
        except redis_errors.ConnectionError:
            self._refresh_soon()
            raise
        outer: asyncio.Future[Any] = inner.get_loop().create_future()
        inner.add_done_callback(partial(self._settle, outer, address, args, slot, REDIRECTS))
        return outer

    def _any_master(self) -> str:
        masters = self._masters
        for _ in range(len(masters)):
            address = masters[next(self._next) % len(masters)]
            if self._nodes[address].connected:
                return address
        if not masters:
            self._refresh_soon()
            raise ClusterUnavailableError("the Redis Cluster slot map is not loaded yet")
        return masters[0]  # none connected: its call raises ConnectionError, as PipelinedRedis's does

    def _settle(
        self,
        outer: asyncio.Future[Any],
        address: str,
        args: tuple[Arg, ...],
        slot: int | None,
        redirects: int,
        inner: asyncio.Future[Any],
    ) -> None:
        """The reply of a node: passed on, or followed when it is a redirection (MovedError is an AskError)."""
        if inner.cancelled():
            outer.cancel()
            return
        error = inner.exception()
        if outer.done():  # cancelled by its caller
            return
        if error is None:
            outer.set_result(inner.result())
            return
        if isinstance(error, redis_errors.AskError | redis_errors.TryAgainError):
            self.redirections[_redirection(error)] += 1
            if redirects > 0:
                self._spawn(self._redirect(outer, address, args, slot, redirects - 1, error))
                return
            self._refresh_soon()
            error = _unavailable(f"no reply after {REDIRECTS} redirections ({type(error).__name__})", error)
        elif isinstance(error, redis_errors.ClusterDownError):
            self._refresh_soon()
            error = _unavailable(str(error), error)
        elif isinstance(error, redis_errors.ConnectionError | redis_errors.TimeoutError):
            self._refresh_soon()
        outer.set_exception(error)

    async def _redirect(
        self,
        outer: asyncio.Future[Any],
        address: str,
        args: tuple[Arg, ...],
        slot: int | None,
        redirects: int,
        error: redis_errors.ResponseError,
    ) -> None:
        try:
            target, inner = await self._send_again(address, args, slot, redirects, error)
        except asyncio.CancelledError:  # closed
            if not outer.done():
                outer.set_exception(redis_errors.ConnectionError("the cluster client was closed"))
            raise
        except Exception as exc:  # whatever it is, the caller must not wait forever
            if not outer.done():
                outer.set_exception(exc)
            return
        inner.add_done_callback(partial(self._settle, outer, target, args, slot, redirects))

    async def _send_again(
        self, address: str, args: tuple[Arg, ...], slot: int | None, redirects: int, error: redis_errors.ResponseError
    ) -> tuple[str, asyncio.Future[Any]]:
        if isinstance(error, redis_errors.AskError):
            target = f"{error.host or _host(address)}:{error.port}"
            node = await self._node(target)
            if isinstance(error, redis_errors.MovedError):
                self._slots[error.slot_id] = target
                self._refresh_soon()
                return target, node.call(*args)
            return target, node.call_after(("ASKING",), *args)
        await asyncio.sleep(TRYAGAIN_DELAY_S * 2 ** (REDIRECTS - 1 - redirects))
        target = (self._slots[slot] if slot is not None else None) or address
        return target, (await self._node(target)).call(*args)

    def _broadcast(self, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        # Every node known, not only the masters of the map: a node importing its first slot owns none yet, and
        # ASK sends EVALSHA there.
        if not self._masters:
            self._refresh_soon()
            raise ClusterUnavailableError("the Redis Cluster slot map is not loaded yet")
        return self._spawn(_first_reply(list(self._nodes.values()), args))

    async def _node(self, address: str) -> PipelinedRedis:
        """The client of a node, created and connected on first use."""
        retiring = self._retiring.pop(address, None)
        if retiring is not None:
            retiring.cancel()
        if address not in self._nodes:
            self._nodes[address] = PipelinedRedis(
                f"redis://{self._auth}{address}/0", connections=self._per_node, timeout_s=self._timeout
            )
            self._opening[address] = asyncio.ensure_future(self._nodes[address].connect())
        await asyncio.shield(self._opening[address])
        return self._nodes[address]

    def _refresh_soon(self) -> None:
        """Reload the slot map in the background; calls asking for it meanwhile are served by that one reload."""
        if self._closed:
            return
        self._stale = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        delay = REFRESH_GAP_S
        while self._stale and not self._closed:
            self._stale = False
            if await self._load_slots():
                delay = REFRESH_GAP_S
            else:
                self._stale = True
                delay = min(delay * 2, _REFRESH_BACKOFF_MAX_S)
            await asyncio.sleep(delay)  # a burst of MOVED or of failed calls costs one reload

    async def _load_slots(self) -> bool:
        """Ask the connected masters, then the seeds, for CLUSTER SLOTS; apply the first map that comes."""
        connected = [m for m in self._masters if self._nodes[m].connected]
        start = next(self._next) % len(connected) if connected else 0
        candidates = connected[start:] + connected[:start]
        candidates += [s for s in self._seeds if s not in candidates]
        for address in candidates:
            try:
                reply = await self._ask(address, "CLUSTER", "SLOTS")
                ranges = _slot_ranges(reply, address)
            except (*_FAILED, ValueError, TypeError, IndexError):
                continue
            if ranges:
                await self._apply(ranges)
                return True
        return False

    async def _ask(self, address: str, *args: Arg) -> Any:
        node = self._nodes.get(address)
        if node is not None:
            return await node.call(*args)
        probe = PipelinedRedis(f"redis://{self._auth}{address}/0", connections=1, timeout_s=self._timeout)
        try:
            await probe.connect()
            return await probe.call(*args)
        finally:
            await probe.close()

    async def _apply(self, ranges: list[tuple[int, int, str]]) -> None:
        slots: list[str | None] = [None] * SLOTS
        for start, end, address in ranges:
            await self._node(address)
            slots[start : end + 1] = [address] * (end - start + 1)
        if self._closed:
            return
        self._slots = slots
        self._masters = sorted({address for _, _, address in ranges})
        # A node that owns no slot any more is closed once the calls in flight on it are answered or timed out
        # (kept if a redirection names it again meanwhile).
        loop = asyncio.get_running_loop()
        for address in self._nodes.keys() - set(self._masters) - self._retiring.keys():
            self._retiring[address] = loop.call_later(2 * self._timeout, self._retire, address)

    def _retire(self, address: str) -> None:
        self._retiring.pop(address, None)
        node = self._nodes.pop(address, None)
        self._opening.pop(address, None)  # long done: it was opened at least 2 timeouts ago
        if node is not None:
            task = asyncio.get_running_loop().create_task(node.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Close every node's connections and stop following the cluster."""
        self._closed = True
        for handle in self._retiring.values():
            handle.cancel()
        self._retiring.clear()
        pending = [t for t in (self._refresher, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        # Connections being opened are let finish (within the timeout), so that closing the nodes closes them.
        await asyncio.gather(*pending, *self._opening.values(), *self._retired, return_exceptions=True)
        await asyncio.gather(*(node.close() for node in self._nodes.values()))


def _redirection(error: redis_errors.ResponseError) -> str:
    if isinstance(error, redis_errors.MovedError):
        return "MOVED"
    return "ASK" if isinstance(error, redis_errors.AskError) else "TRYAGAIN"


def _unavailable(message: str, cause: BaseException) -> ClusterUnavailableError:
    error = ClusterUnavailableError(message)
    error.__cause__ = cause
    return error


async def _first_reply(nodes: list[PipelinedRedis], args: tuple[Arg, ...]) -> Any:
    """Send a command to every node; the first node's reply that is not an error (else the first error). A node
    that is down does not fail a SCRIPT LOAD meant for the others."""
    calls: list[Any] = []
    for node in nodes:
        try:
            calls.append(node.call(*args))
        except redis_errors.ConnectionError as exc:
            calls.append(exc)
    replies = await asyncio.gather(*(c for c in calls if isinstance(c, asyncio.Future)), return_exceptions=True)
    errors = [c for c in calls if isinstance(c, BaseException)]
    for reply in replies:
        if not isinstance(reply, BaseException):
            return reply
    raise (errors + [r for r in replies if isinstance(r, BaseException)])[0]
