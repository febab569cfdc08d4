"""Session fixtures: throw-away redis-server and Postgres on free ports (or the servers named by
RGW_TEST_REDIS_URL / RGW_TEST_DATABASE_URL), a migrated schema, and per-test clean state."""

from __future__ import annotations

import base64
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.db.migrate import migrate
from gateway.dev.redis_cluster import RedisCluster as LocalCluster
from gateway.dev.servers import PostgresServer, RedisServer
from gateway.durability import mark_initialised
from gateway.redis_client import RedisClient, connect

# 2026-06-01T00:00:00Z: tests run on a fixed clock so validity windows are deterministic.
T0_MS = 1_780_272_000_000
TEST_KEYS = {"k2": bytes(range(32)), "k1": bytes(range(100, 132))}
# The card-secret keys of a gateway under test (AES-256-GCM, and the dedup key); tests of their own use others.
TEST_SECRET_KEYS = {"s1": bytes(range(32)), "s2": bytes(range(100, 132))}
TEST_DEDUP_KEY = bytes(range(200, 232))


# An API key anywhere in a log line (the format scanners look for): no test of the suite may produce one.
API_KEY_PATTERN = re.compile(r"rgw_(?:live|test|dev)_[a-z2-7]{12}_[a-z2-7]{32}")
_FORMAT = logging.Formatter("%(message)s")


@pytest.fixture(autouse=True)
def no_api_key_in_any_log_line(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test of the suite is a canary run: the gateway's INFO lines and everything at WARNING and above are
    searched for API keys after each test (formatted with their tracebacks)."""
    caplog.set_level(logging.INFO, logger="rgw")
    yield
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    leaked = [r.name for r in records if API_KEY_PATTERN.search(_FORMAT.format(r))]
    assert not leaked, f"an API key was logged by {sorted(set(leaked))}"


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Garbage left when the session's event loop is gone is reported here, not raised.

    Leaks during a test fail that test (warnings are errors, and pytest collects unraisable warnings around every
    test phase). What only becomes garbage after the last fixture is torn down (once, in CI, unclosed sockets to a
    session server) belongs to no test, and raising it would fail a run whose tests all passed. So it is collected
    here, first, and printed with what it was - loudly enough to be fixed, without hiding a failing test."""
    leftovers: list[str] = []
    previous = sys.unraisablehook

    def record(unraisable: sys.UnraisableHookArgs) -> None:
        leftovers.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value} ({unraisable.object!r})"[:300])

    sys.unraisablehook = record
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    finally:
        sys.unraisablehook = previous
    leftovers += [f"{w.category.__name__}: {w.message}"[:300] for w in caught]
    if leftovers:
        print(f"\nsession-end garbage: {len(leftovers)} unclosed resource(s) outlived every test:", file=sys.stderr)
        for line in leftovers:
            print("  " + line, file=sys.stderr)


@pytest.fixture(scope="session")
def single_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("RGW_TEST_REDIS_URL"):
        yield url
        return
    with RedisServer.start(data_dir=tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local 3-master Redis Cluster (or RGW_TEST_REDIS_CLUSTER_URL's seeds), as RGW_REDIS_URL names one."""
    if url := os.environ.get("RGW_TEST_REDIS_CLUSTER_URL"):
        yield url
        return
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3) as cluster:
        yield ",".join(f"redis://{seed}" for seed in cluster.seeds)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """One redis-server; in a test marked single_and_cluster, that and then the cluster."""
    topology = getattr(request, "param", "single")
    return str(request.getfixturevalue(f"{topology}_redis_url"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked single_and_cluster runs unchanged on one redis-server and on the 3-master cluster."""
    if metafunc.definition.get_closest_marker("single_and_cluster") and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", ["single", "cluster"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("RGW_TEST_DATABASE_URL"):
        yield url
        return
    with PostgresServer.start(data_dir=tmp_path_factory.mktemp("pg"), fsync=False) as server:
        yield server.url


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def migrated(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return database_url


@pytest_asyncio.fixture(loop_scope="session")
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect(redis_url, pool_size=16, timeout_s=5)
    await client.flushdb()
    await mark_initialised(client, "tests")  # an empty Redis is the correct state for an empty database
    yield client
    await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def db(migrated: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated)
    await conn.execute(
        "TRUNCATE issued_codes, campaigns, redemptions, code_uses, double_spend_alarms, brands, stores, terminals,"
        " api_clients, api_keys, audit_log, registry_version, reversals, reversal_alarms, store_groups, code_batches,"
        " code_directory, inventory_events, dispenses, dispense_alarms RESTART IDENTITY CASCADE;"
        # what migration 0003 seeds: the default brand (id 1; the identity starts at 2) and the registry version
        " INSERT INTO brands (id, slug, name, status, row_version) OVERRIDING SYSTEM VALUE"
        " VALUES (1, 'default', 'Default brand', 'active', 1);"
        " INSERT INTO registry_version (version) VALUES (1)"
    )
    yield conn
    await conn.close()


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(TEST_KEYS, "k2")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0_MS)


def gateway_environ(redis_url: str, database_url: str, **extra: str) -> dict[str, str]:
    """An RGW_ environment for a gateway under test (settings never read os.environ in tests)."""
    keys = ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in TEST_KEYS.items())
    secret_keys = ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in TEST_SECRET_KEYS.items())
    return {
        "RGW_GRPC_ADDR": "127.0.0.1:0",
        "RGW_REDIS_URL": redis_url,
        "RGW_DATABASE_URL": database_url,
        "RGW_CODE_KEYS": keys,
        "RGW_CODE_KEY_ID": "k2",
        "RGW_SHUTDOWN_GRACE_SECONDS": "5",
        # The session Redis runs without AOF for speed; durability checks have tests of their own.
        "RGW_REDIS_DURABILITY": "none",
        "RGW_METRICS_ADDR": "",
        "RGW_WRITER_METRICS_ADDR": "",
        "RGW_WRITER_HEALTH_ADDR": "",
        "RGW_SECRET_KEYS": secret_keys,
        "RGW_SECRET_KEY_ID": "s1",
        "RGW_SECRET_DEDUP_KEY": base64.b64encode(TEST_DEDUP_KEY).decode(),
        **extra,
    }


@pytest.fixture
def codes_file(tmp_path: Path) -> Path:
    return tmp_path / "codes.txt"
