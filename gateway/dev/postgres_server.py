"""A throw-away PostgreSQL cluster on a free port of 127.0.0.1, run as `postgres` when we are root."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.dev.processes import (
    ADDR_IN_USE,
    HOST,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    Managed,
    PortTakenError,
    alive_as,
    executable,
    lock_pid,
    log_size,
    log_tail,
    on_free_port,
    port_open,
    run,
    wait_for,
)

# The pre-split module's name, so `make run` log lines and any logging config keyed on it stay the same.
log = logging.getLogger("gateway.dev.servers")

PG_START_TIMEOUT = 30
# Not /tmp: the 0700 dirs that force a fallback (pytest-of-root) live there, and /var/tmp is always 1777.
_FALLBACK_ROOT = Path("/var/tmp")  # noqa: S108
_FALLBACK_PREFIX = "rgw-pg-"
_MARKER = "rgw-requested-path"
_POSTMASTER_NAMES = ("postgres", "postmaster")
_INITDB_ARGS = ("-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C")


def _bindir_candidates() -> list[Path]:
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)  # /usr/local/bin/initdb may be a symlink
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = run([pg_config, "--bindir"], cwd=Path("/"), timeout=10).stdout.strip()
            candidates.extend([Path(out)] if out else [])
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates.extend(sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)[::-1])
    return candidates


@functools.cache
def postgres_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres."""
    for candidate in _bindir_candidates():
        if all(os.access(candidate / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, in `pg_config --bindir`"
        " or in /usr/lib/postgresql/*/bin; install the PostgreSQL server (Debian: apt-get install postgresql)"
    )


def _as_root() -> bool:
    return os.geteuid() == 0


def _as_postgres(argv: Sequence[str]) -> list[str]:
    """initdb and postgres refuse to run as root, so as root they run as the `postgres` user."""
    if not _as_root():
        return list(argv)
    return [executable("runuser", "/usr/sbin/runuser", "/sbin/runuser"), "-u", "postgres", "--", *argv]


def _give_to_postgres(path: Path) -> None:
    if _as_root():
        shutil.chown(path, user="postgres", group="postgres")


def _postgres_can_enter(path: Path) -> bool:
    return run(_as_postgres(["test", "-x", str(path)]), cwd=Path("/"), timeout=10).returncode == 0


def _fallback_dir(requested: Path) -> Path:
    digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
    return _FALLBACK_ROOT / f"{_FALLBACK_PREFIX}{digest}"


def _sweep_orphaned_fallbacks() -> None:
    """Fallback clusters outlive the (pytest tmp) dirs they stand in for; drop those whose dir is gone."""
    for marker in _FALLBACK_ROOT.glob(f"{_FALLBACK_PREFIX}*/{_MARKER}"):
        cluster = marker.parent
        with contextlib.suppress(OSError):
            pid = lock_pid(cluster / "postmaster.pid")
            if Path(marker.read_text()).exists() or (pid is not None and alive_as(pid, *_POSTMASTER_NAMES)):
                continue
            log.info("removing orphaned postgres fallback dir %s", cluster)
            shutil.rmtree(cluster)


def _place_data_dir(requested: Path) -> Path:
    """Where the cluster really lives: `requested`, unless (as root) `postgres` cannot reach it."""
    # Created even when unused: while it exists, _sweep_orphaned_fallbacks keeps its fallback.
    requested.mkdir(parents=True, exist_ok=True)
    if not _as_root() or _postgres_can_enter(requested.parent):
        _give_to_postgres(requested)
        return requested
    fallback = _fallback_dir(requested)
    log.warning(
        "user postgres cannot traverse the parents of %s; keeping that cluster in %s instead",
        requested,
        fallback,
    )
    _sweep_orphaned_fallbacks()
    fallback.mkdir(mode=0o700, exist_ok=True)
    _give_to_postgres(fallback)
    return fallback


class PostgresServer(Managed):
    """A PostgreSQL cluster run by pg_ctl with its own data dir and unix socket dir; see start()."""

    def __init__(self, *, data_dir: Path, requested_dir: Path, port: int, fsync: bool) -> None:
        self.data_dir = data_dir
        self.requested_dir = requested_dir
        self.port = port
        self.fsync = fsync
        self._bindir = postgres_bindir()

    @classmethod
    def start(cls, *, data_dir: Path, port: int | None = None, fsync: bool = True) -> PostgresServer:
        requested = data_dir.resolve()
        placed = _place_data_dir(requested)

        def launch(chosen: int) -> PostgresServer:
            server = cls(data_dir=placed, requested_dir=requested, port=chosen, fsync=fsync)
            server._launch()
            return server

        return launch(port) if port is not None else on_free_port(launch)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "sockets"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid(self) -> int | None:
        """The live postmaster's pid, or None when it is not running."""
        pid = lock_pid(self.data_dir / "postmaster.pid")
        return pid if pid is not None and alive_as(pid, *_POSTMASTER_NAMES) else None

    def running(self) -> bool:
        return self.pid is not None

    def stop(self) -> None:
        if self.pid is None:
            return
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT)))
        if result.returncode != 0 and self.pid is not None:
            raise RuntimeError(f"pg_ctl stop failed for {self.data_dir}:\n{result.stdout}{result.stderr}")

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive_as(pid, *_POSTMASTER_NAMES), STOP_TIMEOUT)
        if not wait_for(lambda: not port_open(self.port), STOP_TIMEOUT):
            raise RuntimeError(f"port {self.port} still accepts connections after SIGKILL of postmaster {pid}")

    def restart(self) -> None:
        self.stop()
        self._launch()

    def _tool(self, name: str) -> str:
        return str(self._bindir / name)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = _as_postgres([self._tool("pg_ctl"), "-D", str(self.data_dir), *args])
        return run(argv, cwd=self.data_dir, timeout=PG_START_TIMEOUT + 30)

    def _server_options(self) -> str:
        on = "on" if self.fsync else "off"
        return " ".join(
            [
                f"-p {self.port} -k {shlex.quote(str(self.socket_dir))} -c listen_addresses={HOST}",
                f"-c fsync={on} -c synchronous_commit={on} -c full_page_writes={on} -c max_connections=200",
            ]
        )

    def _ensure_cluster(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.data_dir != self.requested_dir:
            (self.data_dir / _MARKER).write_text(str(self.requested_dir))
        self.socket_dir.mkdir(exist_ok=True)
        _give_to_postgres(self.socket_dir)

    def _initdb(self) -> None:
        argv = [self._tool("initdb"), "-D", str(self.data_dir), *_INITDB_ARGS]
        result = run(_as_postgres(argv), cwd=self.data_dir, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed for {self.data_dir}:\n{result.stdout}{result.stderr}")

    def _remove_stale_locks(self) -> None:
        """A SIGKILLed postmaster leaves lock files that a new one may mistake for a live server."""
        for lock in [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]:
            pid = lock_pid(lock)
            if pid is not None and not alive_as(pid, *_POSTMASTER_NAMES):
                log.info("removing stale %s (pid %d is gone)", lock, pid)
                lock.unlink(missing_ok=True)

    def _launch(self) -> None:
        if self.pid is not None:
            log.warning("stopping postgres pid %s left running in %s by an earlier run", self.pid, self.data_dir)
            self.stop()
        self._ensure_cluster()
        deadline = time.monotonic() + PG_START_TIMEOUT
        while (failure := self._try_start()) is not None:
            if ADDR_IN_USE in failure:
                raise PortTakenError(failure)
            if time.monotonic() >= deadline:
                raise RuntimeError(failure)
            # Typically the SIGKILLed postmaster's children still hold its shared memory for a moment.
            time.sleep(0.5)
        log.info("postgres pid %s listening on %s (data in %s)", self.pid, self.url, self.data_dir)

    def _try_start(self) -> str | None:
        """Start the postmaster once; None on success, else a description of the failure."""
        self._remove_stale_locks()
        offset = log_size(self.log_path)
        timeout, options = str(PG_START_TIMEOUT), self._server_options()
        result = self._pg_ctl("-w", "-t", timeout, "-l", str(self.log_path), "-o", options, "start")
        if result.returncode == 0 and wait_for(lambda: port_open(self.port), READY_TIMEOUT):
            return None
        return (
            f"pg_ctl start failed for {self.data_dir} on port {self.port}:\n{result.stdout}{result.stderr}"
            f"{self.log_path} ends with:\n{log_tail(self.log_path, offset)}"
        )
