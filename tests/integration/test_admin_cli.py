"""`rgw brand|store|terminal|client|audit` as real processes against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.tenancy import api_keys
from gateway.tenancy.loader import load_registry
from tests.conftest import gateway_environ
from tests.integration.conftest import RunningGateway
from tests.integration.registry_helpers import registry_state

RGW = [sys.executable, "-m", "gateway.cli"]


def rgw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RGW, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def ok(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = rgw(env, *args)
    assert done.returncode == 0, (args, done.stderr)
    return done


def lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """stdout as JSON lines (every line must be one JSON object)."""
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_create_a_tenant_whose_printed_key_authenticates(
    redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis
) -> None:
    env = gateway_environ(redis_url, migrated)
    brand = json.loads(ok(env, "brand", "create", "--slug", "acme", "--name", "Acme").stdout)
    store = json.loads(ok(env, "store", "create", "--brand", "acme", "--external-id", "s-1", "--name", "Main street",
                          "--lat", "48.8566", "--lon", "2.3522", "--time-zone", "Europe/Paris").stdout)  # fmt: skip
    till = json.loads(ok(env, "terminal", "create", "--brand", str(brand["id"]), "--store", str(store["id"]),
                         "--external-id", "till-1").stdout)  # fmt: skip
    created = ok(env, "client", "create", "--brand", "acme", "--role", "pos", "--label", "till one",
                 "--terminal", str(till["id"]), "--env", "test")  # fmt: skip

    key = created.stdout.strip()
    assert created.stdout == key + "\n"  # the key, and nothing else, on stdout
    assert "shown this once" in created.stderr and key not in created.stderr
    parsed = api_keys.parse(key)
    assert parsed is not None and parsed.env == "test"
    client = (await load_registry(db)).authenticate(parsed, datetime.now(UTC))
    assert client is not None and (client.brand_id, client.store_id, client.terminal_id) == (
        brand["id"], store["id"], till["id"],
    )  # fmt: skip
    assert store["time_zone"] == "Europe/Paris" and store["status"] == "active"
    assert int(str(await redis.get(keys.REGISTRY_VERSION))) == await db.fetchval("SELECT version FROM registry_version")
    actors = await db.fetch("SELECT actor, action FROM audit_log WHERE brand_id = $1 ORDER BY id", brand["id"])
    assert [(r["actor"], r["action"]) for r in actors] == [
        (f"cli:{getpass.getuser()}", action)
        for action in ("brand.create", "store.create", "terminal.create", "client.create")
    ]


async def test_lists_are_json_lines_and_rotate_and_revoke(
    redis_url: str, migrated: str, db: asyncpg.Connection
) -> None:
    env = gateway_environ(redis_url, migrated, RGW_KEY_ENV="test")
    ok(env, "brand", "create", "--slug", "acme", "--name", "Acme")
    first = ok(env, "client", "create", "--brand", "acme", "--role", "admin", "--label", "acme admin").stdout.strip()
    client_id = lines(ok(env, "client", "list", "--brand", "acme"))[0]["id"]
    rotated = ok(env, "client", "rotate", client_id, "--grace", "60")
    revoked = lines(ok(env, "client", "revoke", client_id, "--brand", "acme"))

    second = rotated.stdout.strip()
    assert api_keys.parse(second) is not None and second != first and second.startswith("rgw_test_")
    assert "previous keys stop working" in rotated.stderr
    assert revoked[0]["id"] == client_id and revoked[0]["revoked_at"]
    brands = lines(ok(env, "brand", "list"))
    assert [b["slug"] for b in brands] == ["default", "acme"]
    audit = ok(env, "audit", "list", "--brand", "acme", "--limit", "10")
    assert [e["action"] for e in lines(audit)] == [
        "client.revoke",
        "client.rotate_key",
        "client.create",
        "brand.create",
    ]
    for key in (first, second):
        secret = key.rsplit("_", 1)[1]
        assert secret not in audit.stdout and secret not in ok(env, "client", "list").stdout
    assert all("secret_hash" not in line for line in ok(env, "client", "list").stdout.splitlines())


async def test_enable_and_disable(redis_url: str, migrated: str) -> None:
    env = gateway_environ(redis_url, migrated)
    store = json.loads(ok(env, "store", "create", "--brand", "default", "--external-id", "s", "--name", "S",
                          "--lat", "0", "--lon", "0", "--time-zone", "UTC").stdout)  # fmt: skip
    assert json.loads(ok(env, "store", "disable", str(store["id"])).stdout)["status"] == "disabled"
    assert json.loads(ok(env, "store", "enable", str(store["id"]), "--brand", "1").stdout)["status"] == "active"
    assert json.loads(ok(env, "brand", "disable", "default").stdout)["status"] == "disabled"
    listed = lines(ok(env, "store", "list", "--brand", "default"))
    assert [s["id"] for s in listed] == [store["id"]]


async def test_bad_input_exits_1_naming_every_field_and_changes_nothing(
    redis_url: str, migrated: str, db: asyncpg.Connection
) -> None:
    env = gateway_environ(redis_url, migrated)
    ok(env, "brand", "create", "--slug", "acme", "--name", "Acme")
    before = await registry_state(db)
    cases = [
        (("store", "create", "--brand", "acme", "--external-id", "bad id", "--name", "x", "--lat", "91",
          "--lon", "0", "--time-zone", "Mars/Olympus_Mons"), ["--external-id (external_id)", "--lat (latitude)",
                                                             "--time-zone (time_zone)"]),
        (("brand", "create", "--slug", "Bad Slug", "--name", " "), ["--slug (slug)", "--name (name)"]),
        (("store", "list", "--brand", "nope"), ["--brand (brand_id)"]),
        (("client", "create", "--brand", "acme", "--role", "wizard", "--label", "x"), ["--role (role)"]),
        (("client", "create", "--role", "pos", "--label", "x", "--env", "prod"), ["--brand (brand_id)", "--env (env)"]),
        (("client", "rotate", "cl_aaaaaaaaaa", "--grace", "-1"), ["--grace (grace)"]),
        (("audit", "list", "--limit", "0"), ["--limit (limit)"]),
        (("brand", "create", "--slug", "acme", "--name", "Again"), ["already exists"]),
        (("store", "disable", "9999"), ["no such store"]),
        (("client", "revoke", "cl_aaaaaaaaaa"), ["no such client"]),
    ]  # fmt: skip
    for args, named in cases:
        done = rgw(env, *args)
        assert done.returncode == 1, (args, done.stderr)
        assert all(text in done.stderr for text in named), (args, done.stderr)
        assert "nothing was changed" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""
    assert await registry_state(db) == before


async def test_no_change_is_made_when_it_could_not_be_announced(
    redis_url: str, migrated: str, db: asyncpg.Connection
) -> None:
    env = gateway_environ(redis_url, migrated, RGW_REDIS_URL="redis://127.0.0.1:1/0", RGW_REDIS_TIMEOUT_SECONDS="1")
    before = await registry_state(db)
    done = rgw(env, "brand", "create", "--slug", "acme", "--name", "Acme")
    assert done.returncode == 1 and "Redis (RGW_REDIS_URL) is unreachable" in done.stderr
    assert await registry_state(db) == before


async def test_a_created_key_calls_the_gateway(gateway: RunningGateway, redis_url: str, migrated: str) -> None:
    """The printed key works against a running gateway, through `rgw validate`, within the bound."""
    env = gateway_environ(redis_url, migrated)
    created = await asyncio.to_thread(ok, env, "client", "create", "--brand", "default", "--role", "pos",
                                      "--label", "cli till")  # fmt: skip
    key = created.stdout.strip()
    never_issued = codes.generate(codes.Route(1, 0))
    started = time.monotonic()
    while True:
        done = await asyncio.to_thread(
            rgw, env, "validate", "--addr", gateway.target, "--key", key, "--code", never_issued,
            "--store", "store-1", "--terminal", "till-1",
        )  # fmt: skip
        if done.returncode == 0 or time.monotonic() - started > 5:
            break
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "OUTCOME_NOT_FOUND"
