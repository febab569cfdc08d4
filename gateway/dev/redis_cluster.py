"""A throw-away Redis Cluster: `masters` redis-server children on free ports of 127.0.0.1, no replicas.

Every node is a RedisServer (gateway/dev/redis_server.py) with cluster mode on and a data dir of its own under the
cluster's workdir (node-0, node-1, ...) holding nodes.conf and the AOF (appendfsync always). A node SIGKILLed and
restarted on the same port and dir comes back with its node id, its slots (nodes.conf) and its data (the AOF), the
way the chaos tests kill -9 and restart a single server.

The cluster is formed without redis-cli: each fresh node gets a distinct config epoch and an even share of the
16384 slots (CLUSTER ADDSLOTSRANGE), the first node MEETs the others, and start() returns once every node reports
cluster_state:ok with all slots served and the same slot map. Each node's cluster bus gets a free port of its own
(cluster-port) rather than the default port + 10000, which does not exist for free ports above 55535.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.dev.processes import HOST, Managed, PortTakenError, free_port, wait_for
from gateway.dev.redis_server import RedisServer
from gateway.keys_slot import SLOTS

log = logging.getLogger("gateway.dev.servers")

# How long a node may be unreachable before its peers flag it (PFAIL, then FAIL by majority): small, so chaos tests
# see a killed node noticed within seconds. A flagged master with slots is cleared 2 node timeouts after its FAIL.
NODE_TIMEOUT_MS = 2000
# Forming the cluster or a restarted node's re-join: gossip, the 2 s writable delay of a (re)started master, and
# clearing a FAIL flag all fit well within this.
CONVERGE_TIMEOUT = 30.0
_COMMAND_TIMEOUT = 2.0
_PORT_ATTEMPTS = 5

# One entry of CLUSTER SLOTS, as compared between nodes: first slot, last slot, ip, port, node id of the master.
_SlotRange = tuple[int, int, str, int, str]


def node_command(port: int, *args: str | int) -> Any:
    """One command to the node on `port` over a fresh connection: RESP2, decoded, no retries (a dead node fails
    fast), and without redis-py's reply parsing (CLUSTER INFO stays text, CLUSTER SLOTS nested lists)."""
    with redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=_COMMAND_TIMEOUT,
        socket_connect_timeout=_COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        protocol=2,  # replies in one shape whatever redis-py defaults to
        decode_responses=True,
    ) as client:
        return client.execute_command(*args)


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on `port` as a dict (cluster_state, cluster_slots_ok, cluster_known_nodes, ...)."""
    text: str = node_command(port, "CLUSTER", "INFO")
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value.strip() for name, value in pairs}


def slot_ranges(port: int) -> list[_SlotRange]:
    """CLUSTER SLOTS of the node on `port`: (first, last, ip, port, node id) of each range's master, sorted."""
    reply: list[list[Any]] = node_command(port, "CLUSTER", "SLOTS")
    return sorted((int(r[0]), int(r[1]), str(r[2][0]), int(r[2][1]), str(r[2][2])) for r in reply)


def even_split(index: int, masters: int) -> tuple[int, int]:
    """The first and last slot of node `index` when `masters` nodes share the 16384 slots evenly, with the
    boundaries redis-cli --cluster create rounds to (3 masters: 0-5460, 5461-10922, 10923-16383)."""

    def boundary(k: int) -> int:  # round(k * SLOTS / masters), halves up
        return (2 * k * SLOTS + masters) // (2 * masters)

    return boundary(index), boundary(index + 1) - 1


class RedisCluster(Managed):
    """A local Redis Cluster of `masters` masters; start() (or `with RedisCluster(workdir) as cluster:`) runs it."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if not 1 <= masters <= SLOTS:
            raise ValueError(f"a cluster needs 1 to {SLOTS} masters, not {masters}")
        self.workdir = workdir.resolve()
        self.masters = masters
        self.nodes: list[RedisServer] = []
        self._bus_ports: list[int] = []

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the nodes, form the cluster and wait until every node serves all slots with the same map."""
        if self.nodes:
            raise RuntimeError(f"the cluster in {self.workdir} is already started")
        stale = sorted(str(p) for p in self.workdir.glob("node-*/nodes.conf"))
        if stale:
            # Their peers' ports are gone: a new cluster on new free ports cannot reuse them.
            raise RuntimeError(f"{self.workdir} already holds a cluster's state ({', '.join(stale)}); use a fresh dir")
        try:
            for index in range(self.masters):
                self._start_node(index)
            self._form()
        except BaseException:
            self.stop()
            self.nodes.clear()
            self._bus_ports.clear()
            raise
        log.info("redis cluster of %d masters ready on %s (data in %s)", self.masters, self.seeds, self.workdir)

    def stop(self) -> None:
        """Stop every node cleanly (SIGTERM, then SIGKILL past the stop timeout); idempotent."""
        failures: list[Exception] = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (no AOF flush beyond what appendfsync always already did, no nodes.conf save)."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start node `index` again on its port and dir, then wait until the whole cluster is ok again."""
        self.nodes[index].restart()
        self._wait_converged(f"node {index} (port {self.nodes[index].port}) restarted")

    def __enter__(self) -> Self:
        if not self.nodes:
            self.start()
        return self

    # -- addresses ----------------------------------------------------------------------------------------------

    @property
    def seeds(self) -> list[str]:
        """host:port of every master, for a cluster client's startup nodes."""
        return [f"{HOST}:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's redis:// URL (a cluster client follows MOVED from there)."""
        if not self.nodes:
            raise RuntimeError("the cluster was never started")
        return self.nodes[0].url

    def slot_owner(self, slot: int) -> int:
        """The index in `nodes` of the master serving `slot`, per CLUSTER SLOTS of the first running node."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot must be 0..{SLOTS - 1}, not {slot}")
        running = [node for node in self.nodes if node.running()]
        if not running:
            raise RuntimeError("no node of the cluster is running")
        ports = [node.port for node in self.nodes]
        for first, last, _ip, port, _id in slot_ranges(running[0].port):
            if first <= slot <= last:
                return ports.index(port)
        raise LookupError(f"slot {slot} is not served by any node")

    # -- internals ----------------------------------------------------------------------------------------------

    def _start_node(self, index: int) -> None:
        taken = {node.port for node in self.nodes} | set(self._bus_ports)
        for attempt in range(_PORT_ATTEMPTS):
            port, bus = _fresh_port(taken), _fresh_port(taken)
            taken |= {port, bus}
            try:
                node = RedisServer.start(
                    data_dir=self.workdir / f"node-{index}",
                    port=port,
                    appendonly=True,
                    appendfsync="always",
                    extra_args=_cluster_args(bus),
                )
            except PortTakenError:
                if attempt == _PORT_ATTEMPTS - 1:
                    raise
                continue
            self.nodes.append(node)
            self._bus_ports.append(bus)
            return

    def _form(self) -> None:
        for index, node in enumerate(self.nodes):
            # Distinct epochs up front, as redis-cli --cluster create sets them: no epoch collisions to resolve.
            node_command(node.port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            node_command(node.port, "CLUSTER", "ADDSLOTSRANGE", *even_split(index, self.masters))
        first = self.nodes[0]
        for node, bus in zip(self.nodes[1:], self._bus_ports[1:], strict=True):
            node_command(first.port, "CLUSTER", "MEET", HOST, node.port, bus)
        self._wait_converged("forming the cluster")

    def _converged(self) -> bool:
        maps: list[list[_SlotRange]] = []
        for node in self.nodes:
            try:
                info = cluster_info(node.port)
                ok = (
                    info.get("cluster_state") == "ok"
                    and info.get("cluster_slots_ok") == str(SLOTS)
                    and info.get("cluster_known_nodes") == str(self.masters)
                )
                if not ok:
                    return False
                maps.append(slot_ranges(node.port))
            except (redis.RedisError, OSError):
                return False
        ids = {node_id for _first, _last, _ip, _port, node_id in maps[0]}
        return len(ids) == self.masters and all(m == maps[0] for m in maps)

    def _wait_converged(self, what: str) -> None:
        if not wait_for(self._converged, CONVERGE_TIMEOUT):
            raise RuntimeError(f"redis cluster not ok {CONVERGE_TIMEOUT:.0f}s after {what}:\n{self._describe()}")

    def _describe(self) -> str:
        lines = []
        for index, node in enumerate(self.nodes):
            state = _state_of(node.port)
            lines.append(f"  node {index} port {node.port} pid {_pid_of(node)}: {state}; log {node.log_path}")
        return "\n".join(lines)


def _cluster_args(bus_port: int) -> list[str]:
    return [
        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(bus_port)),
        # The address peers and clients are told, from the first CLUSTER SLOTS on (not learnt later by gossip).
        *("--cluster-announce-ip", HOST),
    ]


def _fresh_port(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            return port


def _pid_of(node: RedisServer) -> str:
    return str(node.pid) if node.running() else "-"


def _state_of(port: int) -> str:
    try:
        values = cluster_info(port)
    except (redis.RedisError, OSError) as exc:
        return f"unreachable ({exc})"
    names = ("cluster_state", "cluster_slots_ok", "cluster_slots_pfail", "cluster_slots_fail", "cluster_known_nodes")
    return ", ".join(f"{name}={values.get(name, '?')}" for name in names)
