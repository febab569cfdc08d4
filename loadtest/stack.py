"""The benchmark's stack: its own Redis (AOF, appendfsync always) and Postgres (fsync, synchronous_commit on),
codes issued through the real issuance path, two brands (the default one and the risk variants', see
loadtest/bench_risk.py), and the server processes of one variant. Each server process logs as production does
(INFO, JSON lines, an access-log line per call) to a file of its own in the workdir, as a container runtime keeps a
container's stderr: not to the bench's terminal."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import redis as redis_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.redis_cluster import RedisCluster as LocalCluster
from gateway.dev.redis_cluster import node_command
from gateway.dev.servers import PostgresServer, RedisServer, free_port
from gateway.issuance import create_campaign, issue_codes
from gateway.rebuild import rebuild_redis
from gateway.redis_client import connect
from gateway.tenancy import admin_store, notify
from gateway.tenancy.model import DEFAULT_BRAND_ID
from loadtest import bench_risk
from loadtest.servicers import LOAD_PEER_CODES, PEER_SCHEMA

KEY = os.urandom(32)
KEYRING = KeyRing({"bench": KEY}, "bench")


@dataclass
class Stack:
    """Redis, Postgres and the environment for servers under test."""

    redis: RedisServer
    postgres: PostgresServer
    workdir: Path
    issued: int = 0
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)  # each server process's stdout and stderr, by pid
    # The benchmark authenticates like a real internal client (Redeem and RedeemStream), one per brand.
    api_key: str = field(default="", repr=False)
    risk_brand_id: int = 0
    risk_api_key: str = field(default="", repr=False)
    cluster: LocalCluster | None = None  # a 3-master Redis Cluster, for the variants that run on one

    @property
    def cluster_url(self) -> str:
        """The cluster's seeds as RGW_REDIS_URL names them."""
        if self.cluster is None:
            raise RuntimeError("this stack was started without a Redis Cluster")
        return ",".join(f"redis://{seed}" for seed in self.cluster.seeds)

    def redis_url(self, redis: str = "single") -> str:
        """RGW_REDIS_URL of the stack's single Redis, or of its cluster."""
        return self.cluster_url if redis == "cluster" else self.redis.url

    def redis_pids(self, redis: str = "single") -> list[int]:
        """The redis-server processes serving a variant (every master of the cluster)."""
        if redis == "cluster" and self.cluster is not None:
            return [node.pid for node in self.cluster.nodes if node.pid is not None]
        return [self.redis.pid] if self.redis.pid is not None else []

    @property
    def env(self) -> dict[str, str]:
        return {
            "RGW_REDIS_URL": self.redis.url,
            "RGW_DATABASE_URL": self.postgres.url,
            "RGW_CODE_KEYS": "bench:" + base64.b64encode(KEY).decode(),
            "RGW_REDIS_DURABILITY": "always",
            "RGW_METRICS_ADDR": "",
            "RGW_WRITER_METRICS_ADDR": "",
            "RGW_MAX_CONCURRENT_RPCS": "20000",
            "RGW_REDIS_POOL_SIZE": "64",
            # production's level and format: INFO is what lets the access log (rgw.access, INFO) be written
            "RGW_LOG_LEVEL": "INFO",
            "RGW_LOG_FORMAT": "json",
        }

    async def prepare(self) -> None:
        conn = await asyncpg.connect(self.postgres.url)
        redis = connect(self.redis.url, pool_size=4, timeout_s=30)
        try:
            await migrate(conn)
            await conn.execute(PEER_SCHEMA)
            await rebuild_redis(conn, redis)
            made = await admin_store.create_client(
                conn, actor="bench", brand_id=DEFAULT_BRAND_ID, role="internal", label="bench", env="test"
            )
            await notify.publish(redis, made.version)
            self.api_key = made.value.plaintext
            await bench_risk.prepare_default_brand(conn, redis, DEFAULT_BRAND_ID)
            self.risk_brand_id, self.risk_api_key = await bench_risk.prepare_risk_brand(conn, redis)
            if self.cluster is not None:  # the same state on the cluster: rebuilt from Postgres, as in production
                cluster = connect(self.cluster_url, pool_size=4, timeout_s=30)
                try:
                    await rebuild_redis(conn, cluster)
                    await notify.publish(cluster, await conn.fetchval("SELECT max(version) FROM registry_version"))
                finally:
                    await cluster.aclose()
        finally:
            await redis.aclose()
            await conn.close()

    def brand(self, name: str) -> tuple[int, str]:
        """A bench brand's id and client key: `default` or `risk`."""
        return (self.risk_brand_id, self.risk_api_key) if name == "risk" else (DEFAULT_BRAND_ID, self.api_key)

    async def issue(
        self,
        count: int,
        *,
        uses: int = 1,
        peer: bool = False,
        name: str = "bench",
        brand: str = "default",
        redis: str = "single",
    ) -> list[str]:
        """`count` fresh codes of a new campaign (also loaded into the peer's table when `peer`), in the single
        Redis or the cluster."""
        return (await self.issue_campaign(count, uses=uses, peer=peer, name=name, brand=brand, redis=redis))[1]

    async def issue_campaign(
        self,
        count: int,
        *,
        uses: int = 1,
        peer: bool = False,
        name: str = "bench",
        brand: str = "default",
        redis: str = "single",
    ) -> tuple[int, list[str]]:
        """A new campaign of the brand and its `count` codes."""
        conn = await asyncpg.connect(self.postgres.url)
        client = connect(self.redis_url(redis), pool_size=4, timeout_s=30)
        try:
            now = datetime.now(UTC)
            campaign = await create_campaign(conn, client, KEYRING, name=name, valid_from=now - timedelta(hours=1),
                                             valid_until=now + timedelta(days=1), uses_per_code=uses,
                                             brand_id=self.brand(brand)[0])  # fmt: skip
            self.issued += 1
            out = self.workdir / f"codes-{self.issued}.txt"
            await issue_codes(conn, client, KEYRING, campaign, count=count, out=out)
            if peer:
                await conn.execute(LOAD_PEER_CODES, campaign.id)
            return campaign.id, out.read_text().split()
        finally:
            await client.aclose()
            await conn.close()

    async def limit_terminal(self, campaign_id: int, n: int) -> None:
        """The risk brand's campaign admits N calls per minute per terminal (the burst)."""
        conn = await asyncpg.connect(self.postgres.url)
        redis = connect(self.redis.url, pool_size=4, timeout_s=30)
        try:
            await bench_risk.limit_terminal(conn, redis, brand_id=self.risk_brand_id, campaign_id=campaign_id, n=n)
        finally:
            await redis.aclose()
            await conn.close()

    def set_fsync(self, mode: str) -> None:
        """Switch Redis' appendfsync (always / everysec) between variants."""
        client = redis_sync.Redis(port=self.redis.port)
        try:
            client.config_set("appendfsync", mode)
        finally:
            client.close()

    def start_servers(
        self,
        variant: str,
        workers: int,
        *,
        durability: str = "always",
        env: dict[str, str] | None = None,
        redis: str = "single",
    ) -> tuple[str, list[int]]:
        """Start `workers` processes of a variant on one port (`env`: extra settings); returns the target and
        their pids."""
        port = free_port()
        extra = {name: self.redis.url if value == SAME_REDIS else value for name, value in (env or {}).items()}
        env = {**os.environ, **self.env, "RGW_GRPC_ADDR": f"127.0.0.1:{port}", "RGW_REDIS_DURABILITY": durability,
               "RGW_REDIS_URL": self.redis_url(redis), **extra}  # fmt: skip
        command = [sys.executable, "-m", "loadtest.bench_server", variant]
        (self.workdir / "logs").mkdir(exist_ok=True)
        started = []
        for n in range(workers):
            path = self.workdir / "logs" / f"{variant}-{port}-{n}.log"
            with path.open("wb") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
            self.logs[proc.pid] = path
            started.append(proc)
        self.servers += started
        target = f"127.0.0.1:{port}"
        _wait_serving(target, started, self.logs)
        return target, [p.pid for p in started]

    def access_lines(self, pids: list[int], method: str) -> int:
        """Access-log lines (logger rgw.access, JSON) the processes wrote for calls of a method: read once they
        stopped, their log queues flushed."""
        needles = (b'"logger": "rgw.access"', f'"method": "{method}"'.encode())
        return sum(_count(self.logs[pid], needles) for pid in pids)

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is not None:  # died during the variant: say why, its log goes with the workdir
                print(f"bench: server {proc.pid} had exited (status {proc.returncode}); the end of its log:\n"
                      f"{tail(self.logs[proc.pid])}", file=sys.stderr, flush=True)  # fmt: skip
            proc.terminate()
        for proc in self.servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.servers = []


# A variant's setting whose value is the stack's Redis URL (known only once the stack runs).
SAME_REDIS = "@stack-redis"


def _count(path: Path, needles: tuple[bytes, ...]) -> int:
    with path.open("rb") as lines:
        return sum(1 for line in lines if all(needle in line for needle in needles))


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a server's log (what it said before it died)."""
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - 64 * 1024))
        return b"\n".join(log.read().splitlines()[-lines:]).decode(errors="replace")


def _wait_serving(target: str, procs: list[subprocess.Popen[bytes]], logs: dict[int, Path]) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            dead = next((p for p in procs if p.poll() is not None), None)
            if dead is not None:
                raise RuntimeError(f"a {target} server exited at start (status {dead.returncode}); the end of "
                                   f"{logs[dead.pid]}:\n{tail(logs[dead.pid])}")  # fmt: skip
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    time.sleep(0.3 * len(procs))  # let every worker bind before load starts
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    ends = "\n".join(f"{logs[p.pid]}:\n{tail(logs[p.pid])}" for p in procs)
    raise RuntimeError(f"{target} did not become SERVING; the end of its logs:\n{ends}")


def start_stack(workdir: Path, *, cluster: bool = False) -> Stack:
    """Redis and Postgres, and (`cluster`) a 3-master Redis Cluster beside the single Redis."""
    redis = RedisServer.start(data_dir=workdir / "redis", appendonly=True, appendfsync="always")
    # No automatic AOF rewrite during the run: a rewrite that starts mid-variant (the AOF doubles every few
    # variants here) stalls the always-fsync writes for seconds on this disk, and the variant then measures the
    # rewrite (timeouts, UNAVAILABLE) instead of the gateway. Production schedules BGREWRITEAOF off-peak.
    client = redis_sync.Redis(port=redis.port)
    try:
        client.config_set("auto-aof-rewrite-percentage", 0)
    finally:
        client.close()
    postgres = PostgresServer.start(data_dir=workdir / "pg", fsync=True)
    local_cluster = LocalCluster(workdir / "cluster", masters=3) if cluster else None
    if local_cluster is not None:
        local_cluster.start()
        for node in local_cluster.nodes:  # as the single Redis: no AOF rewrite mid-variant
            node_command(node.port, "CONFIG", "SET", "auto-aof-rewrite-percentage", "0")
    return Stack(redis, postgres, workdir, cluster=local_cluster)
