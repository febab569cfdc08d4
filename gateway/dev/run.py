"""`make run`: a local gateway with a demo campaign, from nothing.

Starts Redis (AOF on, fsync always) and Postgres under ./.local/ unless RGW_REDIS_URL / RGW_DATABASE_URL name
servers to use, makes a development HMAC key unless RGW_CODE_KEYS is set, migrates, restores Redis from Postgres,
creates a demo campaign, prints a few demo codes and a command that redeems one, and serves (with the ledger
writer in the same process) until Ctrl-C; then stops what it started.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import uvloop

from gateway import issuance
from gateway.db.migrate import migrate
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.rebuild import rebuild_redis
from gateway.redis_store import connect
from gateway.settings import Settings

LOCAL = Path(".local")
DEMO_CODES = 5
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


async def prepare_demo(settings: Settings) -> tuple[int, list[str]]:
    """Migrate and create a demo campaign with a few fresh codes (plaintext only in .local/)."""
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(settings.redis_url, pool_size=4, timeout_s=settings.redis_timeout_seconds)
    try:
        await migrate(conn)
        # Our own Redis may be new or may have lost data: restore it from Postgres before adding anything.
        report = await rebuild_redis(conn, redis)
        print(f"redis restored from postgres: {report.campaigns} campaigns, {report.codes} codes, "
              f"{report.uses_restored} ledger uses")  # fmt: skip
        keyring = settings.keyring()
        now = datetime.now(UTC)
        campaign = await issuance.create_campaign(
            conn, redis, keyring,
            name=f"demo {now:%Y-%m-%d %H:%M}", valid_from=now - timedelta(minutes=1),
            valid_until=now + timedelta(days=30),
        )  # fmt: skip
        out = LOCAL / f"demo-codes-{campaign.id}.txt"
        await issuance.issue_codes(conn, redis, keyring, campaign, count=DEMO_CODES, out=out)
        return campaign.id, out.read_text().split()
    finally:
        await redis.aclose()
        await conn.close()


def _banner(settings: Settings, campaign_id: int, demo: list[str]) -> str:
    host, _, port = settings.grpc_addr.rpartition(":")
    rgw = shlex.quote(str(Path(sys.executable).with_name("rgw")))
    lines = [
        "",
        f"Demo campaign {campaign_id}: single-use codes (also in .local/demo-codes-{campaign_id}.txt):",
        *(f"    {code}" for code in demo),
        "",
        "Redeem one (run it twice: REDEEMED, then ALREADY_REDEEMED):",
        f"    {rgw} redeem --addr {host}:{port} --store demo-store --terminal till-1 --code {demo[0]}",
        "",
        f"Serving redemption.v1 on {settings.grpc_addr}; Ctrl-C stops the gateway and the servers it started.",
    ]
    return "\n".join(lines)


def main() -> int:
    """Entry point of `make run`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with local_servers(dict(os.environ)) as env:
        settings = Settings.from_env(env)
        campaign_id, demo = uvloop.run(prepare_demo(settings))
        print(_banner(settings, campaign_id, demo), flush=True)
        from gateway.grpc_api.server import serve

        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            uvloop.run(serve(settings))
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
