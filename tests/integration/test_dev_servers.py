"""gateway.dev.servers against the real redis-server and PostgreSQL binaries."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from gateway.dev import postgres_server
from gateway.dev.servers import PostgresServer, RedisServer, free_port, postgres_bindir

pytestmark = pytest.mark.integration


def _raw(port: int, command: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command)
        return sock.recv(64)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pg_isready(port: int) -> bool:
    argv = [str(postgres_bindir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "5"]
    return subprocess.run(argv, check=False).returncode == 0


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _column(url: str, query: str) -> list[object]:
    conn = await asyncpg.connect(url)
    try:
        return [row[0] for row in await conn.fetch(query)]
    finally:
        await conn.close()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory the postgres user can reach even when running as root (tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="rgw-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_free_port_avoids_system_servers() -> None:
    ports = {free_port() for _ in range(20)}
    assert not ports & {5432, 6379}
    assert all(1024 < port < 65536 for port in ports)


def test_postgres_bindir_has_server_tools() -> None:
    bindir = postgres_bindir()
    assert all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres"))


def test_redis_aof_survives_kill(tmp_path: Path) -> None:
    with RedisServer.start(data_dir=tmp_path / "redis", appendonly=True, appendfsync="always") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert _raw(server.port, b"PING\r\n") == b"+PONG\r\n"
        with redis.Redis.from_url(server.url) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
            client.set("survivor", "yes")
        old_pid, port = server.pid, server.port

        server.kill()
        assert not _port_open(port)
        server.restart()

        assert (server.port, server.data_dir) == (port, (tmp_path / "redis").resolve())
        assert server.pid != old_pid
        with redis.Redis.from_url(server.url) as client:
            assert client.get("survivor") == b"yes"
    assert not _port_open(port)
    assert (tmp_path / "redis" / "redis.log").stat().st_size > 0


def test_redis_without_aof_forgets_after_kill(tmp_path: Path) -> None:
    with RedisServer.start(data_dir=tmp_path, appendonly=False) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("ephemeral", "1")
        server.kill()
        server.restart()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("ephemeral") is None


def test_redis_pause_resume_and_stop_while_paused(tmp_path: Path) -> None:
    server = RedisServer.start(data_dir=tmp_path, appendonly=False)
    try:
        server.pause()
        with pytest.raises(TimeoutError):
            _raw(server.port, b"PING\r\n", timeout=0.3)
        server.resume()
        assert _raw(server.port, b"PING\r\n") == b"+PONG\r\n"
        server.pause()
    finally:
        server.stop()
    assert not _port_open(server.port)
    server.stop()  # idempotent


def test_two_servers_at_once_get_different_ports(tmp_path: Path) -> None:
    with (
        RedisServer.start(data_dir=tmp_path / "a", appendonly=False) as first,
        RedisServer.start(data_dir=tmp_path / "b", appendonly=False, extra_args=["--databases", "4"]) as second,
    ):
        assert first.port != second.port
        assert _raw(first.port, b"PING\r\n") == _raw(second.port, b"PING\r\n") == b"+PONG\r\n"
        with redis.Redis.from_url(second.url) as client:
            assert client.config_get("databases") == {"databases": "4"}


def test_redis_start_stops_leftover_in_same_dir(tmp_path: Path) -> None:
    first = RedisServer.start(data_dir=tmp_path, appendonly=False)
    try:
        with RedisServer.start(data_dir=tmp_path, appendonly=False) as second:
            assert not first.running()
            assert not _port_open(first.port)
            assert _raw(second.port, b"PING\r\n") == b"+PONG\r\n"
    finally:
        first.stop()


def test_redis_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no-such-option"):
        RedisServer.start(data_dir=tmp_path, extra_args=["--no-such-option", "x"])


async def test_postgres_kill_restart_keeps_committed_row(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = await asyncio.to_thread(PostgresServer.start, data_dir=private / "pg", fsync=True)
    try:
        if os.geteuid() == 0:  # postgres cannot enter a root-only 0700 dir: the cluster moved
            assert server.data_dir.parent == Path("/var/tmp")
            assert (server.data_dir / "rgw-requested-path").read_text() == str((private / "pg").resolve())
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        await _execute(server.url, "CREATE TABLE t (v text)", "INSERT INTO t VALUES ('kept')")
        port, old_pid = server.port, server.pid

        await asyncio.to_thread(server.kill)
        assert not _port_open(port) and server.pid is None
        await asyncio.to_thread(server.restart)

        assert server.port == port and server.pid not in (None, old_pid)
        assert await _column(server.url, "SELECT v FROM t") == ["kept"]
        assert await _column(server.url, "SHOW fsync") == ["on"]
    finally:
        await asyncio.to_thread(server.stop)
    assert not _port_open(port)
    server.stop()  # idempotent
    shutil.rmtree(server.data_dir)


async def test_postgres_in_reachable_dir_on_given_port(reachable_dir: Path) -> None:
    port = free_port()
    with await asyncio.to_thread(PostgresServer.start, data_dir=reachable_dir, port=port, fsync=False) as server:
        assert (server.port, server.data_dir) == (port, reachable_dir.resolve())
        assert await asyncio.to_thread(_pg_isready, port)
        await _execute(server.url, "CREATE TABLE t AS SELECT 1 AS v")
        assert await _column(server.url, "SHOW synchronous_commit") == ["off"]
        await asyncio.to_thread(server.stop)
        assert not await asyncio.to_thread(_pg_isready, port)
        server.stop()  # idempotent

        version_mtime = (reachable_dir / "PG_VERSION").stat().st_mtime_ns
        await asyncio.to_thread(server.restart)  # no second initdb
        assert (reachable_dir / "PG_VERSION").stat().st_mtime_ns == version_mtime
        assert await _column(server.url, "SELECT v FROM t") == [1]

        # A postmaster left behind in the same data dir (crashed `make run`) is stopped, not fought.
        with await asyncio.to_thread(PostgresServer.start, data_dir=reachable_dir) as again:
            assert not _port_open(port)
            assert await _column(again.url, "SELECT v FROM t") == [1]
    assert not _port_open(port)


def test_sweep_removes_orphaned_fallback_only(tmp_path: Path) -> None:
    orphan = Path(tempfile.mkdtemp(prefix=postgres_server._FALLBACK_PREFIX, dir="/var/tmp"))
    kept = Path(tempfile.mkdtemp(prefix=postgres_server._FALLBACK_PREFIX, dir="/var/tmp"))
    try:
        (orphan / "rgw-requested-path").write_text(str(tmp_path / "gone"))
        (kept / "rgw-requested-path").write_text(str(tmp_path))
        postgres_server._sweep_orphaned_fallbacks()
        assert not orphan.exists()
        assert kept.exists()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
