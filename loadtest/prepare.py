"""The load test's data: campaigns and codes for the Locust scenarios, issued the way operators issue them.

Usage: python -m loadtest.prepare --out DIR [--fresh 50000] [--hot 5] [--hot-uses 100000] [--shards 1]
                                  [--valid-hours 24]

Reads the gateway's RGW_ variables (RGW_DATABASE_URL, RGW_REDIS_URL, RGW_CODE_KEYS, RGW_CODE_KEY_ID) to reach the
stores of the gateway under test - a local stack or a real deployment. It applies pending migrations, restores
Redis from Postgres if Redis is not initialised (as `rgw rebuild-redis` would), then creates two campaigns through
`gateway.issuance`:

- "fresh": single-use codes, each redeemed once by the launch-peak and mixed scenarios;
- "hot": a few codes with many uses each, which many terminals redeem at once.

Each campaign gets a risk policy (campaign level, so nothing else of the brand changes) that raises its rate
limits and velocities to numbers a load test never reaches: a few Locust users at full speed would otherwise be
throttled by the default 2 calls/s per till, and the hot codes declined by the default 30 uses a minute per code.
The lockouts keep their defaults (10 failures in 10 minutes lock a terminal): the attacker scenario must engage
them. It calls with its own API client (`attacker-key`), from its own stores, so the store and client lockouts it
triggers never lock out the honest scenarios' tills.

DIR (created 0700) receives the plaintext codes - test data, but redeemable ones, so each file is mode 0600 and
never overwritten - and `manifest.json`, which the locustfile reads. A DIR prepared before is refused: its codes
may have been used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import uvloop

from gateway import issuance
from gateway.coderefs import KeyRing
from gateway.db.migrate import MigrationError, migrate
from gateway.durability import is_initialised
from gateway.rebuild import rebuild_redis
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings, SettingsError
from gateway.tenancy import admin_risk, admin_store, notify
from gateway.tenancy.model import DEFAULT_BRAND_ID

MANIFEST = "manifest.json"
KEY_FILE = "api-key"
ATTACKER_KEY_FILE = "attacker-key"
FRESH_FILE = "fresh-codes.txt"
HOT_FILE = "hot-codes.txt"
ACTOR = "loadtest.prepare"
_UNREACHED = 10_000_000
# The load-test campaigns' risk policy: limits out of reach, everything else (lockouts included) the brand's.
LOAD_POLICY = {
    "limits": {scope: {"limit": _UNREACHED, "window_s": 3600 if scope == "device" else 60}
               for scope in ("terminal", "store", "client", "brand", "device", "code")},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CampaignData:
    """One prepared campaign: its id and shape, and the file (in the data dir) holding its codes."""

    campaign_id: int
    shards: int
    uses_per_code: int
    codes: int
    file: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the prepare step made; the locustfile's only input besides the code files."""

    created_at: str
    fresh: CampaignData
    hot: CampaignData
    key_file: str = KEY_FILE  # the internal API key the users authenticate with (0600, beside the codes)
    attacker_key_file: str = ATTACKER_KEY_FILE  # the attacker scenario's own client

    def write(self, directory: Path) -> None:
        fd = os.open(directory / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        raw = json.loads((directory / MANIFEST).read_text())
        fresh, hot = CampaignData(**raw["fresh"]), CampaignData(**raw["hot"])
        return cls(raw["created_at"], fresh, hot, raw.get("key_file", KEY_FILE), raw.get("attacker_key_file", KEY_FILE))


@dataclass(frozen=True, slots=True)
class Plan:
    """What to issue."""

    out: Path
    fresh: int
    hot: int
    hot_uses: int
    shards: int
    valid_for: timedelta


async def _ensure_initialised(conn: asyncpg.Connection, redis: RedisClient) -> None:
    # Issuance refuses an uninitialised Redis (it may have lost data); a new one only needs the marker, and one
    # that lost data must be restored before codes are added to it - rebuild_redis does both, idempotently.
    if not await is_initialised(redis):
        report = await rebuild_redis(conn, redis)
        print(f"redis was not initialised: restored {report.campaigns} campaigns, {report.codes} codes, "
              f"{report.uses_restored} uses from postgres")  # fmt: skip


async def _issue(
    conn: asyncpg.Connection, redis: RedisClient, keyring: KeyRing, plan: Plan, *, kind: str, count: int, uses: int
) -> CampaignData:
    now = datetime.now(UTC)
    campaign = await issuance.create_campaign(
        conn, redis, keyring,
        name=f"loadtest {kind} {now:%Y-%m-%d %H:%M:%S}", valid_from=now - timedelta(minutes=1),
        valid_until=now + plan.valid_for, uses_per_code=uses, shards=plan.shards,
    )  # fmt: skip
    file = FRESH_FILE if kind == "fresh" else HOT_FILE
    await issuance.issue_codes(conn, redis, keyring, campaign, count=count, out=plan.out / file)
    made = await admin_risk.set_risk_policy(
        conn, actor=ACTOR, brand_id=DEFAULT_BRAND_ID, campaign_id=campaign.id, document=LOAD_POLICY
    )
    await notify.publish(redis, made.version)
    return CampaignData(campaign.id, campaign.shards, uses, count, file)


async def _write_key(conn: asyncpg.Connection, redis: RedisClient, settings: Settings, path: Path, who: str) -> None:
    """An internal client of the default brand (whose campaigns these are) for the users, its key shown only in
    `path` (0600): Locust calls like a real order system. Revoke it with `rgw client revoke` after the run."""
    made = await admin_store.create_client(
        conn, actor=ACTOR, brand_id=DEFAULT_BRAND_ID, role="internal",
        label=f"loadtest {who} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}", env=settings.key_env,
    )  # fmt: skip
    await notify.publish(redis, made.version)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(made.value.plaintext + "\n")


async def prepare(settings: Settings, plan: Plan) -> Manifest:
    """Migrate, make sure Redis is initialised, issue both campaigns, write the manifest."""
    keyring = settings.keyring()
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        await migrate(conn)
        await _ensure_initialised(conn, redis)
        fresh = await _issue(conn, redis, keyring, plan, kind="fresh", count=plan.fresh, uses=1)
        hot = await _issue(conn, redis, keyring, plan, kind="hot", count=plan.hot, uses=plan.hot_uses)
        await _write_key(conn, redis, settings, plan.out / KEY_FILE, "tills")
        await _write_key(conn, redis, settings, plan.out / ATTACKER_KEY_FILE, "attacker")
    finally:
        await redis.aclose()
        await conn.close()
    manifest = Manifest(datetime.now(UTC).isoformat(timespec="seconds"), fresh, hot)
    manifest.write(plan.out)
    return manifest


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def parse_args(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m loadtest.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="data directory to create (or an empty one)")
    parser.add_argument("--fresh", type=_positive, default=50_000, help="single-use codes (default 50000)")
    parser.add_argument("--hot", type=_positive, default=5, help="multi-use hot codes (default 5)")
    parser.add_argument("--hot-uses", type=_positive, default=100_000, help="uses per hot code (default 100000)")
    parser.add_argument("--shards", type=_positive, default=1, help="campaign shards (Redis hash tags, default 1)")
    parser.add_argument("--valid-hours", type=_positive, default=24, help="validity of both campaigns (default 24)")
    args = parser.parse_args(argv)
    return Plan(args.out, args.fresh, args.hot, args.hot_uses, args.shards, timedelta(hours=args.valid_hours))


def _data_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        raise FileExistsError(f"{path} already holds prepared data (its codes may be used); choose a new --out")


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints what was issued; exit 1 with a message when the configuration or a store is wrong."""
    plan = parse_args(argv)
    started = time.perf_counter()
    try:
        settings = Settings.from_env()
        _data_dir(plan.out)
        manifest = uvloop.run(prepare(settings, plan))
    except (SettingsError, FileExistsError, MigrationError, issuance.IssuanceIncomplete, OSError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    print(f"prepared in {time.perf_counter() - started:.1f}s: campaign {manifest.fresh.campaign_id} with "
          f"{manifest.fresh.codes} single-use codes, campaign {manifest.hot.campaign_id} with {manifest.hot.codes} "
          f"codes of {manifest.hot.uses_per_code} uses; data in {plan.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
