"""`rgw campaign create|update|pause|resume|list|stats|rebalance` and `rgw store-group set` as real processes
against real Postgres and Redis: every rule option, bad input (exit 2, every bad option named, nothing changed),
a campaign that is not there or not the brand's."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import keys
from tests.conftest import gateway_environ
from tests.integration.test_cli import rgw

VALIDITY = ("--valid-from", "2026-05-01T00:00:00+00:00", "--valid-until", "2026-07-01T00:00:00+00:00")


def ok(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = rgw(env, *args)
    assert done.returncode == 0, (args, done.stderr)
    return done


def refused(env: dict[str, str], *args: str) -> str:
    """stderr of a command that must exit 2."""
    done = rgw(env, *args)
    assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
    return done.stderr


async def everything(db: asyncpg.Connection, redis: Redis) -> tuple[Any, ...]:
    rows = [[tuple(r) for r in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")]
            for table in ("campaigns", "store_groups", "audit_log")]  # fmt: skip
    return (*rows, sorted(await redis.keys("rgw:{c*")))


async def test_create_with_every_rule_then_update_pause_resume_and_list(
    redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis
) -> None:
    env = gateway_environ(redis_url, migrated)
    group = json.loads(ok(env, "store-group", "set", "downtown", "--brand", "default", "--store", "s-2",
                          "--store", "s-1").stdout)  # fmt: skip
    assert group == {"brand_id": 1, "name": "downtown", "stores": ["s-1", "s-2"], "campaign_ids": []}
    created = ok(env, "campaign", "create", "--name", "Spring", *VALIDITY, "--uses-per-code", "3", "--shards", "2",
                 "--budget-count", "100", "--budget-value", "50000", "--face-value", "500", "--currency", "CNY",
                 "--time-zone", "Asia/Shanghai", "--hours", "1-5 07:00-10:30", "--hours", "all 22:00-02:00",
                 "--store", "store-1", "--store-group", "downtown", "--valid-days", "14", "--reversal-window",
                 "12h")  # fmt: skip
    cid = int(created.stdout)
    row = await db.fetchrow("SELECT * FROM campaigns WHERE id = $1", cid)
    assert (row["brand_id"], row["uses_per_code"], row["shards"], row["budget_count"], row["budget_value"]) == (
        1, 3, 2, 100, 50_000)  # fmt: skip
    assert (row["face_value"], row["currency"], row["time_zone"], row["valid_days"]) == (
        500,
        "CNY",
        "Asia/Shanghai",
        14,
    )
    assert (row["reversal_window_seconds"], list(row["allowed_store_groups"])) == (43_200, ["downtown"])
    assert json.loads(row["redemption_hours"]) == [{"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"},
                                                   {"start": "22:00", "end": "02:00"}]  # fmt: skip
    assert await redis.smembers(keys.stores_key(cid, 1)) == {"", "store-1", "s-1", "s-2"}
    assert await redis.hget(keys.meta_key(cid, 0), "win") == "31:420:630,127:1320:120"

    updated = json.loads(ok(env, "campaign", "update", str(cid), "--name", "Summer", "--budget-count", "120",
                            "--no-budget-value", "--no-hours").stdout)  # fmt: skip
    assert (updated["name"], updated["budget_count"], updated["budget_value"], updated["redemption_hours"]) == (
        "Summer", 120, None, [])  # fmt: skip
    assert [int(await redis.hget(keys.budget_key(cid, s), "n") or 0) for s in (0, 1)] == [60, 60]
    assert await redis.hget(keys.meta_key(cid, 1), "win") == ""

    assert json.loads(ok(env, "campaign", "pause", str(cid)).stdout)["status"] == "paused"
    assert await redis.hget(keys.meta_key(cid, 1), "p") == "1"
    assert json.loads(ok(env, "campaign", "resume", str(cid), "--brand", "default").stdout)["status"] == "active"
    assert await redis.hget(keys.meta_key(cid, 1), "p") == "0"

    listed = [json.loads(line) for line in ok(env, "campaign", "list", "--json").stdout.splitlines()]
    assert [(c["id"], c["name"], c["status"]) for c in listed] == [(cid, "Summer", "active")]
    assert "Summer" in ok(env, "campaign", "list", "--brand", "default").stdout
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["store_group.set", "campaign.create", "campaign.update", "campaign.pause", "campaign.resume"]


async def test_bad_input_names_every_bad_option_exits_2_and_changes_nothing(
    redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis
) -> None:
    env = gateway_environ(redis_url, migrated)
    cid = ok(env, "campaign", "create", "--name", "Plain", *VALIDITY, "--face-value", "5", "--currency", "EUR",
             "--shards", "2").stdout.strip()  # fmt: skip
    before = await everything(db, redis)

    stderr = refused(env, "campaign", "create", "--name", "", "--valid-from", "2026-07-01T00:00:00+00:00",
                     "--valid-until", "2026-06-01T00:00:00+00:00", "--budget-value", "10", "--time-zone", "Mars/Base",
                     "--store", "no spaces", "--store-group", "nobody", "--hours", "1-5 07:00-25:00",
                     "--reversal-window", "400d", "--shards", "2000", "--uses-per-code", "0")  # fmt: skip
    for option in ("--name", "--valid-until", "--currency", "--time-zone", "--store", "--store-group", "--hours",
                   "--reversal-window", "--shards", "--uses-per-code"):  # fmt: skip
        assert f"  {option} (" in stderr, (option, stderr)
    assert "nothing was changed" in stderr
    assert "--currency (currency): cannot change" in refused(env, "campaign", "update", cid, "--currency", "USD")
    assert "--budget-count" in refused(env, "campaign", "update", cid, "--budget-count", "5", "--no-budget-count")
    assert "weekdays" in refused(env, "campaign", "create", "--name", "x", "--hours", "8-9 07:00-08:00")
    assert "duration" in refused(env, "campaign", "create", "--name", "x", "--reversal-window", "soon")
    refused(env, "campaign", "update", cid, "--shards", "4")  # not an option of update: fixed at creation
    assert "no such campaign" in refused(env, "campaign", "pause", str(int(cid) + 100))
    ok(env, "brand", "create", "--slug", "acme", "--name", "Acme")
    assert "no such campaign" in refused(env, "campaign", "pause", cid, "--brand", "acme")  # not acme's
    assert "--brand" in refused(env, "store-group", "set", "g", "--brand", "nope", "--store", "s")
    assert "--store (stores[0])" in refused(env, "store-group", "set", "g", "--brand", "acme", "--store", "a b")
    assert (await everything(db, redis))[:2] == before[:2]  # the brand's audit row aside, nothing changed
    assert (await everything(db, redis))[3] == before[3]


async def test_stats_and_rebalance(redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis) -> None:
    env = gateway_environ(redis_url, migrated)
    cid = int(ok(env, "campaign", "create", "--name", "Big", *VALIDITY, "--shards", "4", "--budget-count", "400")
              .stdout)  # fmt: skip
    for shard, used in enumerate((100, 40, 0, 20)):
        await redis.hset(keys.budget_key(cid, shard), mapping={"un": used, "red": used, "iss": 200})

    figures = json.loads(ok(env, "campaign", "stats", str(cid), "--json").stdout)
    assert figures["total"] == {
        "issued": 800, "redeemed": 160, "reversed": 0, "budget_count_used": 160, "budget_count_left": 240,
        "budget_value_used": 0, "budget_value_left": None,
    }  # fmt: skip
    assert [s["budget_count_left"] for s in figures["shards"]] == [0, 60, 100, 80]
    assert "budget count     160 used, 240 left of 400" in ok(env, "campaign", "stats", str(cid)).stdout

    report = json.loads(ok(env, "campaign", "rebalance", str(cid), "--json").stdout)
    assert [s["budget_count"] - s["count_used"] for s in report["shares"]] == [60, 60, 60, 60]
    assert sum(s["budget_count"] for s in report["shares"]) == 400 and report["moves"]
    assert "0 move(s)" in ok(env, "campaign", "rebalance", str(cid)).stdout  # already level
    assert "no such campaign" in refused(env, "campaign", "stats", str(cid + 1))
