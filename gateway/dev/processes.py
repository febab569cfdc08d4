"""Process plumbing shared by the throw-away servers: ports, polling, log and pid files, spawning."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
ADDR_IN_USE = "Address already in use"
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 5
_RESERVED_PORTS = frozenset({5432, 6379})  # the machine's own servers

_T = TypeVar("_T")


class PortTakenError(RuntimeError):
    """Another process bound the port between free_port() and the server's own bind()."""


def free_port() -> int:
    """Return a port of 127.0.0.1 that was free a moment ago (callers retry if they lose a race)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    """The last lines written to path after offset (earlier runs of the same data dir are noise)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def lock_pid(path: Path) -> int | None:
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


def alive_as(pid: int, *names: str) -> bool:
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


def on_free_port(launch: Callable[[int], _T]) -> _T:
    for _ in range(_PORT_ATTEMPTS - 1):
        with contextlib.suppress(PortTakenError):
            return launch(free_port())
    return launch(free_port())


def executable(name: str, *fallbacks: str) -> str:
    for candidate in (shutil.which(name), *fallbacks):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"{name} not found on PATH (looked in {os.environ.get('PATH', '')!r} and {fallbacks})")


def spawn(argv: Sequence[str], *, cwd: Path, output: Path) -> subprocess.Popen[bytes]:
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


def run(argv: Sequence[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
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


class Managed:
    """Context-manager support: `with XServer.start(...) as s:` stops the server on exit."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
