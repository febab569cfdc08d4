"""Throw-away redis-server and PostgreSQL processes on free ports of 127.0.0.1.

Used by the pytest session fixtures (including chaos tests that SIGKILL a server and restart it on
the same port and data dir) and by `make run`, which keeps the data under a project directory.
Nothing here touches the machine's own Redis (6379) or PostgreSQL (5432).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self, TypeVar

__all__ = ["PortTakenError", "PostgresServer", "RedisServer", "free_port", "postgres_bindir"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
PG_START_TIMEOUT = 30
STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 5
_RESERVED_PORTS = frozenset({5432, 6379})  # the machine's own servers
# Not /tmp: the 0700 dirs that force a fallback (pytest-of-root) live there, and /var/tmp is always 1777.
_FALLBACK_ROOT = Path("/var/tmp")  # noqa: S108
_FALLBACK_PREFIX = "rgw-pg-"
_MARKER = "rgw-requested-path"
_ADDR_IN_USE = "Address already in use"
_POSTMASTER_NAMES = ("postgres", "postmaster")
_INITDB_ARGS = ("-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C")

_T = TypeVar("_T")


class PortTakenError(RuntimeError):
    """Another process bound the port between free_port() and the server's own bind()."""


# --------------------------------------------------------------------------- shared helpers


def free_port() -> int:
    """Return a port of 127.0.0.1 that was free a moment ago (callers retry if they lose a race)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    """The last lines written to path after offset (earlier runs of the same data dir are noise)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _lock_pid(path: Path) -> int | None:
    """The pid on the first line of a pid or lock file (redis.pid, postmaster.pid, socket locks)."""
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
        return abs(int(first))
    except (OSError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive_as(pid: int, *names: str) -> bool:
    """Whether pid runs one of the named programs.

    Zombies count as dead: a SIGKILLed postmaster is reparented to PID 1, which may never reap it.
    The name check catches a stale pid file whose pid was reused after a crash or reboot.
    """
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").is_dir():
        return _pid_exists(pid)
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        name = (proc / "comm").read_text().strip()
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and name in names


def _on_free_port(launch: Callable[[int], _T]) -> _T:
    for _ in range(_PORT_ATTEMPTS - 1):
        with contextlib.suppress(PortTakenError):
            return launch(free_port())
    return launch(free_port())


def _executable(name: str, *fallbacks: str) -> str:
    for candidate in (shutil.which(name), *fallbacks):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"{name} not found on PATH (looked in {os.environ.get('PATH', '')!r} and {fallbacks})")


def _spawn(argv: Sequence[str], *, cwd: Path, output: Path) -> subprocess.Popen[bytes]:
    # Errors from before the server opens its own log (bad arguments, say) land in `output` too.
    # A new session keeps a terminal Ctrl-C away from the servers, so `make run` can stop them in order.
    with output.open("ab") as sink:
        return subprocess.Popen(  # noqa: S603 - argv is built here from fixed flags and paths
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _run(argv: Sequence[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - argv is built here from fixed flags and paths
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )


class _Managed:
    """Context-manager support: `with XServer.start(...) as s:` stops the server on exit."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- redis


def _redis_request(port: int, command: bytes, *, until: bytes = b"\r\n") -> bytes:
    """Send one inline command and read until `until` shows up (or the peer closes / times out)."""
    data = b""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(command)
            while until not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        pass
    return data


def _redis_pid(port: int) -> int | None:
    # run_id follows process_id in INFO server, so waiting for it guarantees a complete process_id line.
    for line in _redis_request(port, b"INFO server\r\n", until=b"\r\nrun_id:").splitlines():
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


@dataclass(frozen=True)
class _RedisOptions:
    appendonly: bool
    appendfsync: str
    extra_args: tuple[str, ...]


class RedisServer(_Managed):
    """A foreground redis-server child process; see start()."""

    def __init__(self, *, data_dir: Path, port: int, options: _RedisOptions) -> None:
        self.data_dir = data_dir
        self.port = port
        self._options = options
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        *,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        extra_args: Sequence[str] = (),
    ) -> RedisServer:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        options = _RedisOptions(appendonly, appendfsync, tuple(extra_args))

        def launch(chosen: int) -> RedisServer:
            server = cls(data_dir=data_dir, port=chosen, options=options)
            server._launch()
            return server

        return launch(port) if port is not None else _on_free_port(launch)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server was never started")
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "redis.pid"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a paused server only sees the SIGTERM once continued
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, STOP_TIMEOUT)
            self.kill()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        self.stop()
        self._launch()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        if not self.running():
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        assert self._proc is not None
        self._proc.send_signal(signum)

    def _argv(self) -> list[str]:
        opts = self._options
        return [
            _executable("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server"),
            *("--daemonize", "no", "--bind", HOST, "--port", str(self.port)),
            *("--dir", str(self.data_dir), "--logfile", str(self.log_path), "--pidfile", str(self.pid_path)),
            *("--save", ""),
            *("--appendonly", "yes" if opts.appendonly else "no", "--appendfsync", opts.appendfsync),
            *("--maxmemory-policy", "noeviction", "--protected-mode", "no"),
            *opts.extra_args,
        ]

    def _launch(self) -> None:
        self._stop_leftover()
        offset = _log_size(self.log_path)
        self._proc = _spawn(self._argv(), cwd=self.data_dir, output=self.log_path)
        if not _wait_for(self._ready_or_dead, READY_TIMEOUT) or not self.running():
            self._fail_start(offset)
        log.info("redis-server pid %d listening on %s (data in %s)", self.pid, self.url, self.data_dir)

    def _stop_leftover(self) -> None:
        """A redis-server orphaned by a crashed run must not share this data dir with the new one."""
        pid = _lock_pid(self.pid_path)
        if pid is None or not _alive_as(pid, "redis-server"):
            return
        log.warning("stopping redis-server pid %d left running in %s by an earlier run", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
        if not _wait_for(lambda: not _alive_as(pid, "redis-server"), STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)

    def _ready_or_dead(self) -> bool:
        if not self.running():
            return True
        # -LOADING (AOF replay) means "keep polling"; the pid check rejects a PONG from a port thief.
        return _redis_request(self.port, b"PING\r\n").startswith(b"+PONG") and _redis_pid(self.port) == self.pid

    def _fail_start(self, offset: int) -> NoReturn:
        assert self._proc is not None
        exited = self._proc.poll() is not None
        self.kill()
        tail = _log_tail(self.log_path, offset)
        what = f"exited with code {self._proc.returncode}" if exited else f"not ready in {READY_TIMEOUT:.0f}s"
        message = f"redis-server on port {self.port} {what}; {self.log_path} ends with:\n{tail}"
        raise (PortTakenError if exited and _ADDR_IN_USE in tail else RuntimeError)(message)


# --------------------------------------------------------------------------- postgres


def _bindir_candidates() -> list[Path]:
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)  # /usr/local/bin/initdb may be a symlink
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = _run([pg_config, "--bindir"], cwd=Path("/"), timeout=10).stdout.strip()
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
    return [_executable("runuser", "/usr/sbin/runuser", "/sbin/runuser"), "-u", "postgres", "--", *argv]


def _give_to_postgres(path: Path) -> None:
    if _as_root():
        shutil.chown(path, user="postgres", group="postgres")


def _postgres_can_enter(path: Path) -> bool:
    return _run(_as_postgres(["test", "-x", str(path)]), cwd=Path("/"), timeout=10).returncode == 0


def _fallback_dir(requested: Path) -> Path:
    digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
    return _FALLBACK_ROOT / f"{_FALLBACK_PREFIX}{digest}"


def _sweep_orphaned_fallbacks() -> None:
    """Fallback clusters outlive the (pytest tmp) dirs they stand in for; drop those whose dir is gone."""
    for marker in _FALLBACK_ROOT.glob(f"{_FALLBACK_PREFIX}*/{_MARKER}"):
        cluster = marker.parent
        with contextlib.suppress(OSError):
            pid = _lock_pid(cluster / "postmaster.pid")
            if Path(marker.read_text()).exists() or (pid is not None and _alive_as(pid, *_POSTMASTER_NAMES)):
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


class PostgresServer(_Managed):
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

        return launch(port) if port is not None else _on_free_port(launch)

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
        pid = _lock_pid(self.data_dir / "postmaster.pid")
        return pid if pid is not None and _alive_as(pid, *_POSTMASTER_NAMES) else None

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
            _wait_for(lambda: not _alive_as(pid, *_POSTMASTER_NAMES), STOP_TIMEOUT)
        if not _wait_for(lambda: not _port_open(self.port), STOP_TIMEOUT):
            raise RuntimeError(f"port {self.port} still accepts connections after SIGKILL of postmaster {pid}")

    def restart(self) -> None:
        self.stop()
        self._launch()

    def _tool(self, name: str) -> str:
        return str(self._bindir / name)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = _as_postgres([self._tool("pg_ctl"), "-D", str(self.data_dir), *args])
        return _run(argv, cwd=self.data_dir, timeout=PG_START_TIMEOUT + 30)

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
        result = _run(_as_postgres(argv), cwd=self.data_dir, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed for {self.data_dir}:\n{result.stdout}{result.stderr}")

    def _remove_stale_locks(self) -> None:
        """A SIGKILLed postmaster leaves lock files that a new one may mistake for a live server."""
        for lock in [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]:
            pid = _lock_pid(lock)
            if pid is not None and not _alive_as(pid, *_POSTMASTER_NAMES):
                log.info("removing stale %s (pid %d is gone)", lock, pid)
                lock.unlink(missing_ok=True)

    def _launch(self) -> None:
        if self.pid is not None:
            log.warning("stopping postgres pid %s left running in %s by an earlier run", self.pid, self.data_dir)
            self.stop()
        self._ensure_cluster()
        deadline = time.monotonic() + PG_START_TIMEOUT
        while (failure := self._try_start()) is not None:
            if _ADDR_IN_USE in failure:
                raise PortTakenError(failure)
            if time.monotonic() >= deadline:
                raise RuntimeError(failure)
            # Typically the SIGKILLed postmaster's children still hold its shared memory for a moment.
            time.sleep(0.5)
        log.info("postgres pid %s listening on %s (data in %s)", self.pid, self.url, self.data_dir)

    def _try_start(self) -> str | None:
        """Start the postmaster once; None on success, else a description of the failure."""
        self._remove_stale_locks()
        offset = _log_size(self.log_path)
        timeout, options = str(PG_START_TIMEOUT), self._server_options()
        result = self._pg_ctl("-w", "-t", timeout, "-l", str(self.log_path), "-o", options, "start")
        if result.returncode == 0 and _wait_for(lambda: _port_open(self.port), READY_TIMEOUT):
            return None
        return (
            f"pg_ctl start failed for {self.data_dir} on port {self.port}:\n{result.stdout}{result.stderr}"
            f"{self.log_path} ends with:\n{_log_tail(self.log_path, offset)}"
        )
