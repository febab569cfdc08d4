"""The composition root of `rgw serve`: wires settings, Redis, the service, health and reflection into one
grpc.aio server, and shuts it down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import risk_facts
from gateway.campaigns.lookup import CodeDirectory
from gateway.campaigns.reversal import Reversals
from gateway.clock import Clock, SystemClock
from gateway.coderefs import KeyRing
from gateway.domain import Readiness, RegistryNotReady
from gateway.durability import LOSS_WINDOW, InitialisedProbe, check_durability
from gateway.gateway_metrics import REDIS_DURABILITY, set_build_info, start_metrics_server
from gateway.grpc_api.admin_servicer import AdminServicer, register_admin_service
from gateway.grpc_api.auth import Authenticator, AuthInterceptor, RegistrySource
from gateway.grpc_api.health_checks import LIVE, Check, ComponentHealth
from gateway.grpc_api.interceptors import DecodeGuard
from gateway.grpc_api.inventory_servicer import register_inventory_service
from gateway.grpc_api.observe import Observe
from gateway.grpc_api.servicer import RedemptionServicer
from gateway.grpc_api.stream_replies import send_limit
from gateway.grpc_api.tls import client_id_from_context, server_credentials
from gateway.inventory.service import InventoryService, SecretKeyRing, SkuDirectory
from gateway.inventory.store import InventoryStore
from gateway.pb.redemption.v1 import admin_pb2, inventory_pb2
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_client import HotClient, RedisClient, connect, connect_hot
from gateway.redis_store import RedisCodeStore
from gateway.risk_counters import SeparateCounters
from gateway.risk_facts import RegistryRiskFacts
from gateway.service import RedemptionService
from gateway.settings import Settings, SettingsError
from gateway.tenancy.sightings import Sightings, flush_every, stop_flushing
from gateway.tenancy.watcher import RegistryWatcher
from risk.engine import RiskEngine

log = logging.getLogger("rgw.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RedemptionService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
INVENTORY_SERVICE_NAME = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: bounded messages — a reply may need more than a request (stream_replies.py); SO_REUSEPORT
    so several processes can share the port.

    A maximum connection age (RGW_GRPC_MAX_CONNECTION_AGE_SECONDS, unless 0): gRPC balances per connection, not per
    call, so a connection through a ClusterIP Service or an L4 load balancer stays pinned to the pod it first
    landed on; after a scale-up the new replicas would get no traffic from the POS connections already open. Past
    the age the server sends GOAWAY: the client opens a new connection for its next call (where kube-proxy or the
    balancer picks again) and calls in flight get the grace (…_GRACE_SECONDS) to finish before the old one is
    closed. A client balancing itself over the headless Service (round_robin) re-resolves DNS when a connection
    goes away, which is how it learns of new pods. gRPC adds ±10 % jitter, so connections opened together are not
    all closed together."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", send_limit(settings.max_message_bytes, settings.stream_max_items)),
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.grpc_max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(settings.grpc_max_connection_age_seconds * 1000))),
            ("grpc.max_connection_age_grace_ms", round(settings.grpc_max_connection_age_grace_seconds * 1000)),
        ]
    return options


def default_interceptors(
    source: RegistrySource, settings: Settings, *, observe: bool = True
) -> list[grpc.aio.ServerInterceptor]:
    """What every call goes through before its handler, outermost first: metrics, request id and access log (so
    every refusal is seen), who is calling (so an unknown caller
    learns nothing, not even how its bytes parse), then undecodable bytes. Certificates are looked at only where
    client certificates are required (without mTLS no call carries a verified one). `observe=False` leaves out
    the first (the benchmark measures what it costs)."""
    peer = client_id_from_context if settings.tls_client_auth == "require" else None
    outer: list[grpc.aio.ServerInterceptor] = [Observe(access_log=settings.access_log)] if observe else []
    return [
        *outer,
        AuthInterceptor(Authenticator(source), peer_identity=peer),
        DecodeGuard(),
    ]


def register_redemption_service(server: grpc.aio.Server, service: RedemptionService, settings: Settings) -> None:
    """The production API."""
    servicer = RedemptionServicer(service, stream_max_items=settings.stream_max_items)
    pb_grpc.add_RedemptionServiceServicer_to_server(servicer, server)


@dataclass
class Gateway:
    """A running gateway: the server, its Redis client and its health state."""

    settings: Settings
    keyring: KeyRing
    clock: Clock = field(default_factory=SystemClock)
    port: int = 0
    server: grpc.aio.Server = field(init=False)
    redis: RedisClient = field(init=False)
    health: health.aio.HealthServicer = field(init=False)
    readiness: Readiness = field(default_factory=Readiness)
    pipelined: HotClient | None = field(init=False, default=None)
    # Registers the API servicer(s); the default is the real RedemptionServicer. The benchmark passes its own
    # (an empty-handler ceiling, a Postgres peer) to measure them on exactly this server stack.
    register: Callable[[grpc.aio.Server, RedemptionService, Settings], None] | None = None
    # None: default_interceptors(). The benchmark passes [] to measure what the interceptors cost.
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None
    # False: default_interceptors() without Observe. The benchmark measures what metrics and access log cost.
    observe: bool = True
    registry: RegistryWatcher = field(init=False)
    # AdminService's and the sightings' connections: created empty (min_size=0), so a gateway starts while
    # Postgres is down.
    pool: asyncpg.Pool = field(init=False)
    admin: AdminServicer = field(init=False)
    sightings: Sightings = field(default_factory=Sightings)
    _sightings_task: asyncio.Task[None] | None = field(init=False, default=None)
    _health_task: asyncio.Task[None] | None = field(init=False, default=None)
    _initialised: InitialisedProbe = field(init=False)
    component_health: ComponentHealth = field(init=False)
    risk_facts: RegistryRiskFacts | None = field(init=False, default=None)
    risk_redis: RedisClient | None = field(init=False, default=None)
    risk_pipelined: HotClient | None = field(init=False, default=None)
    _risk_task: asyncio.Task[None] | None = field(init=False, default=None)
    # Decrypts card secrets for InventoryService's answers (gateway/inventory/crypto.py, from settings).
    secret_keys: SecretKeyRing | None = None
    # Registers InventoryService's servicer; the default is the real one. The inventory benchmark passes its
    # Postgres peer's, to measure it on exactly this server stack.
    register_inventory: Callable[[grpc.aio.Server, InventoryService, Settings], None] | None = None
    inventory: InventoryService | None = field(init=False, default=None)

    async def start(self) -> int:
        """Bind, start serving, and return the bound port (RGW_GRPC_ADDR may name port 0)."""
        s = self.settings
        self.redis = connect(*s.redis_target, pool_size=s.redis_pool_size, timeout_s=s.redis_timeout_seconds)
        try:
            config = await check_durability(self.redis, s.redis_durability)
        except BaseException:
            await self.redis.aclose()
            raise
        REDIS_DURABILITY.labels(
            required=s.redis_durability,
            appendfsync=config.get("appendfsync", "unknown"),
            loss_window=LOSS_WINDOW[s.redis_durability],
        ).set(1)
        # half the health check's time: a cluster client retrying a dead master must not time the whole check out
        self._initialised = InitialisedProbe(self.redis, timeout_s=s.redis_timeout_seconds / 2)
        self.registry = RegistryWatcher(
            database_url=s.database_url,
            redis=self.redis,
            poll_s=s.registry_poll_seconds,
            max_stale_s=s.registry_max_stale_seconds,
        )
        await self.registry.start()
        self.pipelined = await connect_hot(
            *s.redis_target, connections=s.redis_hot_connections, timeout_s=s.redis_timeout_seconds
        )
        # On a cluster a brand's risk counters and a campaign shard are different slots: two calls, always.
        separate = s.risk_engine and bool(s.risk_redis_url or s.redis_cluster)
        counters = await self._separate_counters() if separate else None
        store = RedisCodeStore(self.redis, self.pipelined, counters=counters)
        self.risk_facts = RegistryRiskFacts(self.registry.registry) if s.risk_engine else None
        self.pool = await asyncpg.create_pool(s.database_url, min_size=0, max_size=4)
        service = RedemptionService(
            store=store,
            keyring=self.keyring,
            clock=self.clock,
            readiness=self.readiness,
            sightings=self.sightings,
            risk=RiskEngine(self.risk_facts.book) if self.risk_facts is not None else None,
            facts=self.risk_facts,
            reversals=Reversals(self.pool, self.redis, self.clock),
            directory=CodeDirectory(self.redis, self.keyring, self._imports_codes),
        )
        self.server = grpc.aio.server(
            options=server_options(s),
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
            interceptors=(
                default_interceptors(self.registry, s, observe=self.observe)
                if self.interceptors is None
                else self.interceptors
            ),
        )
        (self.register or register_redemption_service)(self.server, service, s)
        self._sightings_task = asyncio.create_task(
            flush_every(s.terminal_seen_flush_seconds, self.sightings, self.pool)
        )
        if self.risk_facts is not None:
            self._risk_task = asyncio.create_task(
                risk_facts.maintain(self.risk_facts, self.pool, self.risk_redis or self.redis, s.risk_upkeep_seconds)
            )
        self.admin = AdminServicer.from_settings(
            s, self.pool, self.redis, self.risk_redis, keyring=self.keyring, clock=self.clock
        )
        register_admin_service(self.server, self.admin)
        self.inventory = InventoryService(
            store=InventoryStore(self.redis, self.pipelined), skus=SkuDirectory(self.pool), clock=self.clock,
            secret_keys=self.secret_keys if self.secret_keys is not None else _secret_keys(s),
        )  # fmt: skip
        (self.register_inventory or register_inventory_service)(self.server, self.inventory, s)
        self.inventory.start()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, INVENTORY_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        credentials = server_credentials(s)
        if credentials is None:
            self.port = self.server.add_insecure_port(s.grpc_addr)
        else:
            self.port = self.server.add_secure_port(s.grpc_addr, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {s.grpc_addr}")
        await self.server.start()
        self.component_health = ComponentHealth(
            self.health,
            self._health_checks(),
            overall=("", SERVICE_NAME),
            timeout_s=s.redis_timeout_seconds,
        )
        await self.health.set(LIVE, SERVING)
        await self._check_health()
        self._health_task = asyncio.create_task(self._watch_health())
        return self.port

    async def _separate_counters(self) -> SeparateCounters:
        """The risk counters as their own call (pipelined like the redeem script): on RGW_RISK_REDIS_URL, or on
        the code Redis Cluster itself when none is named."""
        s = self.settings
        if not s.risk_redis_url:
            return SeparateCounters(self.redis, self.pipelined)
        self.risk_redis = connect(s.risk_redis_url, pool_size=s.redis_pool_size, timeout_s=s.redis_timeout_seconds)
        # never waits for it: an unreachable risk Redis is what the failure policies are for
        self.risk_pipelined = await connect_hot(
            s.risk_redis_url, connections=s.redis_hot_connections, timeout_s=s.redis_timeout_seconds
        )
        return SeparateCounters(self.risk_redis, self.risk_pipelined)

    def _health_checks(self) -> list[Check]:
        """The gateway's components: Redis (reachable and initialised from Postgres), the pipelined redeem
        connections, the registry, and the separate risk Redis when there is one."""
        checks = [Check("redis", self._redis_probe)]
        if self.pipelined is not None:
            checks.append(Check("redis_hot", self._hot_probe))
        checks.append(Check("registry", self._registry_probe))
        if self.risk_redis is not None:
            checks.append(Check("risk_redis", self._risk_redis_probe))
        return checks

    async def _redis_probe(self) -> str:
        return await self._initialised.check()

    async def _hot_probe(self) -> str:
        connected = self.pipelined is not None and self.pipelined.connected
        return "" if connected else "the redeem connections to Redis are reconnecting"

    def _imports_codes(self, brand_id: int) -> bool:
        brand = self.registry.registry().brand(brand_id)
        return brand is not None and brand.imports_codes

    async def _registry_probe(self) -> str:
        try:
            self.registry.registry()
        except RegistryNotReady as exc:
            return f"the registry is not usable: {exc}"
        return ""

    async def _risk_redis_probe(self) -> str:
        assert self.risk_redis is not None
        await self.risk_redis.ping()
        return ""

    async def _check_health(self) -> None:
        """One round of health checks; redemptions are refused early (UNAVAILABLE) while Redis is not usable."""
        reasons = await self.component_health.check_once()
        reason = reasons.get("redis") or reasons.get("redis_hot") or ""
        if reason and reason != self.readiness.reason:
            log.warning("not serving: %s", reason)
        self.readiness.ready, self.readiness.reason = not reason, reason

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_seconds)
            await self._check_health()

    async def stop(self) -> None:
        """Graceful: health says NOT_SERVING first, in-flight calls get the grace period, then pools close."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await self.registry.stop()
        if self._risk_task is not None:
            self._risk_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._risk_task
            if self.risk_facts is not None:  # bindings of the last moments
                with contextlib.suppress(RegistryNotReady):
                    await self.risk_facts.flush_binds(self.pool, self.redis)
        await self.admin.close()
        if self.inventory is not None:
            await self.inventory.close()
        if self._sightings_task is not None:
            await stop_flushing(self._sightings_task, self.sightings, self.pool)
        await self.pool.close()
        if self.pipelined is not None:
            await self.pipelined.close()
        if self.risk_pipelined is not None:
            await self.risk_pipelined.close()
        if self.risk_redis is not None:
            await self.risk_redis.aclose()
        await self.redis.aclose()


class _NoSecretKeys:
    """Without RGW_SECRET_KEYS: a dispense is decided, its answer is INTERNAL (a retry with keys replays it)."""

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> str:
        raise RuntimeError("no card-secret keys configured (RGW_SECRET_KEYS)")


def _secret_keys(settings: Settings) -> SecretKeyRing:
    """The card-secret key ring from settings; a gateway without one serves everything else."""
    try:
        return settings.secret_ring()
    except SettingsError:
        return _NoSecretKeys()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (and the in-process writer, if configured)."""
    gateway = Gateway(settings=settings, keyring=settings.keyring())
    port = await gateway.start()
    set_build_info()
    if settings.metrics_addr:
        start_metrics_server(settings.metrics_addr)
    log.info("serving redemption.v1 on %s (port %d)", settings.grpc_addr, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    writer = None
    if settings.serve_writer:
        from gateway.ledger.runner import run_writer

        writer = asyncio.create_task(run_writer(settings, stop, serve_metrics=False))
    await stop.wait()
    log.info("shutting down: grace %.1fs for in-flight calls", settings.shutdown_grace_seconds)
    await gateway.stop()
    if writer is not None:
        await writer
    log.info("stopped")
