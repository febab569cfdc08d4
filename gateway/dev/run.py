"""`make run`: a local gateway with a demo brand, store, terminal, POS key and campaign, from nothing.

Starts Redis (AOF on, fsync always) and Postgres under ./.local/ unless RGW_REDIS_URL / RGW_DATABASE_URL name
servers to use, makes a development HMAC key unless RGW_CODE_KEYS is set, migrates, restores Redis from Postgres,
makes sure the demo brand, store and terminal exist, creates a POS key bound to the demo store and a demo
campaign, prints a few demo codes and a command (with the key) that redeems one, and serves (with the ledger writer
in the same process) until Ctrl-C; then stops what it started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import uvloop

from gateway import issuance, logs
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.rebuild import rebuild_redis
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings
from gateway.tenancy import admin_store, notify
from gateway.tenancy.model import Brand, Store, Terminal

LOCAL = Path(".local")
DEMO_CODES = 5
DEMO_BRAND, DEMO_STORE, DEMO_TILL = "demo", "demo-store", "till-1"
ACTOR = "make run"
log = logging.getLogger("rgw.dev")


def _dev_keys() -> str:
    """A development HMAC key kept in .local/code-keys (0600), so demo codes stay valid across runs."""
    path = LOCAL / "code-keys"
    if not path.exists():
        LOCAL.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("dev1:" + base64.b64encode(secrets.token_bytes(32)).decode())
    return path.read_text().strip()


@contextlib.contextmanager
def local_servers(environ: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start the servers the environment does not name; yield the environment to run with."""
    with contextlib.ExitStack() as stack:
        env = dict(environ)
        if not env.get("RGW_REDIS_URL"):
            port = int(env.get("RGW_DEV_REDIS_PORT", "0")) or None
            redis = stack.enter_context(RedisServer.start(data_dir=LOCAL.resolve() / "redis", port=port))
            env["RGW_REDIS_URL"] = redis.url
            print(f"started redis-server on port {redis.port} (AOF, appendfsync always), data in {redis.data_dir}")
        if not env.get("RGW_DATABASE_URL"):
            port = int(env.get("RGW_DEV_POSTGRES_PORT", "0")) or None
            pg = stack.enter_context(PostgresServer.start(data_dir=LOCAL.resolve() / "postgres", port=port))
            env["RGW_DATABASE_URL"] = pg.url
            print(f"started postgres on port {pg.port}, data in {pg.data_dir}")
        env.setdefault("RGW_CODE_KEYS", _dev_keys())
        env.setdefault("RGW_SERVE_WRITER", "true")  # one process: redemptions reach the ledger too
        yield env


@dataclass(frozen=True)
class Demo:
    """What `make run` made: the campaign, its codes, and the POS key (shown once, in the banner)."""

    campaign_id: int
    codes: list[str]
    brand: Brand
    store: Store
    terminal: Terminal
    api_key: str = field(repr=False)


async def _demo_tenant(conn: asyncpg.Connection, redis: RedisClient, settings: Settings) -> Demo:
    """The demo brand, store and terminal (made once, found after) and a new POS key bound to the store."""
    brands = await admin_store.list_brands(conn)
    brand = (
        next((b for b in brands if b.slug == DEMO_BRAND), None)
        or (await admin_store.create_brand(conn, actor=ACTOR, slug=DEMO_BRAND, name="Demo brand")).value
    )
    stores = await admin_store.list_stores(conn, brand_id=brand.id)
    store = next((s for s in stores if s.external_id == DEMO_STORE), None) or (
        await admin_store.create_store(conn, actor=ACTOR, brand_id=brand.id, external_id=DEMO_STORE,
                                       name="Demo store", latitude=31.2304, longitude=121.4737,
                                       time_zone="Asia/Shanghai")
    ).value  # fmt: skip
    tills = await admin_store.list_terminals(conn, brand_id=brand.id, store_id=store.id)
    terminal = next((t for t in tills if t.external_id == DEMO_TILL), None) or (
        await admin_store.create_terminal(conn, actor=ACTOR, brand_id=brand.id, store_id=store.id,
                                          external_id=DEMO_TILL)
    ).value  # fmt: skip
    made = await admin_store.create_client(
        conn, actor=ACTOR, brand_id=brand.id, role="pos", label="make run demo till", store_id=store.id,
        env=settings.key_env,
    )  # fmt: skip
    await notify.publish(redis, made.version)
    return Demo(0, [], brand, store, terminal, made.value.plaintext)


async def prepare_demo(settings: Settings) -> Demo:
    """Migrate, make the demo tenant and a demo campaign with a few fresh codes (plaintext only in .local/)."""
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=4, timeout_s=settings.redis_timeout_seconds)
    try:
        await migrate(conn)
        # Our own Redis may be new or may have lost data: restore it from Postgres before adding anything.
        report = await rebuild_redis(conn, redis)
        print(f"redis restored from postgres: {report.campaigns} campaigns, {report.codes} codes, "
              f"{report.uses_restored} ledger uses")  # fmt: skip
        tenant = await _demo_tenant(conn, redis, settings)
        keyring = settings.keyring()
        now = datetime.now(UTC)
        campaign = await issuance.create_campaign(
            conn, redis, keyring,
            name=f"demo {now:%Y-%m-%d %H:%M}", valid_from=now - timedelta(minutes=1),
            valid_until=now + timedelta(days=30), brand_id=tenant.brand.id,
        )  # fmt: skip
        LOCAL.mkdir(exist_ok=True)  # noqa: ASYNC240 - before serving: with servers and keys configured, nothing else made it
        out = LOCAL / f"demo-codes-{campaign.id}.txt"
        await issuance.issue_codes(conn, redis, keyring, campaign, count=DEMO_CODES, out=out)
        return replace(tenant, campaign_id=campaign.id, codes=out.read_text().split())
    finally:
        await redis.aclose()
        await conn.close()


def _banner(settings: Settings, demo: Demo) -> str:
    host, _, port = settings.grpc_addr.rpartition(":")
    rgw = shlex.quote(str(Path(sys.executable).with_name("rgw")))
    lines = [
        "",
        f"Demo brand {demo.brand.slug!r} (id {demo.brand.id}), store {demo.store.external_id!r}, terminal "
        f"{demo.terminal.external_id!r}; a new POS API key bound to that store (shown only here):",
        f"    {demo.api_key}",
        "",
        f"Demo campaign {demo.campaign_id}: single-use codes (also in .local/demo-codes-{demo.campaign_id}.txt):",
        *(f"    {code}" for code in demo.codes),
        "",
        "Redeem one (run it twice: REDEEMED, then ALREADY_REDEEMED):",
        f"    RGW_API_KEY={demo.api_key} {rgw} redeem --addr {host}:{port} --store {demo.store.external_id} "
        f"--terminal {demo.terminal.external_id} --code {demo.codes[0]}",
        "",
        f"Serving redemption.v1 on {settings.grpc_addr}; Ctrl-C stops the gateway and the servers it started.",
    ]
    return "\n".join(lines)


def main() -> int:
    """Entry point of `make run`."""
    environ = {"RGW_LOG_FORMAT": "text", **os.environ}  # readable lines on a developer's terminal
    stop_logging = logs.configure(
        environ.get("RGW_LOG_LEVEL", "INFO"), environ["RGW_LOG_FORMAT"], access=environ.get("RGW_ACCESS_LOG") != "false"
    )
    with local_servers(environ) as env:
        settings = Settings.from_env(env)
        demo = uvloop.run(prepare_demo(settings))
        print(_banner(settings, demo), flush=True)
        from gateway.grpc_api.server import serve

        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            uvloop.run(serve(settings))
    stop_logging()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
