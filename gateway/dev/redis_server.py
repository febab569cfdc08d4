"""A throw-away redis-server child process on a free port of 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

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
    spawn,
    wait_for,
)

# The pre-split module's name, so `make run` log lines and any logging config keyed on it stay the same.
log = logging.getLogger("gateway.dev.servers")


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


class RedisServer(Managed):
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

        return launch(port) if port is not None else on_free_port(launch)

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
            executable("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server"),
            *("--daemonize", "no", "--bind", HOST, "--port", str(self.port)),
            *("--dir", str(self.data_dir), "--logfile", str(self.log_path), "--pidfile", str(self.pid_path)),
            *("--save", ""),
            *("--appendonly", "yes" if opts.appendonly else "no", "--appendfsync", opts.appendfsync),
            *("--maxmemory-policy", "noeviction", "--protected-mode", "no"),
            # Issued codes live in 65,536 bucket hashes per campaign shard (gateway/keys.py), ~30 bytes a code while
            # a bucket stays a listpack. At Redis' default of 128 entries the fullest buckets of a shard turn into
            # hash tables (~3x the memory) past ~5 million codes; 512 keeps them compact to ~25 million a shard, and
            # a listpack of 512 short fields is still scanned in microseconds.
            *("--hash-max-listpack-entries", "512"),
            *opts.extra_args,
        ]

    def _launch(self) -> None:
        self._stop_leftover()
        offset = log_size(self.log_path)
        self._proc = spawn(self._argv(), cwd=self.data_dir, output=self.log_path)
        if not wait_for(self._ready_or_dead, READY_TIMEOUT) or not self.running():
            self._fail_start(offset)
        log.info("redis-server pid %d listening on %s (data in %s)", self.pid, self.url, self.data_dir)

    def _stop_leftover(self) -> None:
        """A redis-server orphaned by a crashed run must not share this data dir with the new one."""
        pid = lock_pid(self.pid_path)
        if pid is None or not alive_as(pid, "redis-server"):
            return
        log.warning("stopping redis-server pid %d left running in %s by an earlier run", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
        if not wait_for(lambda: not alive_as(pid, "redis-server"), STOP_TIMEOUT):
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
        tail = log_tail(self.log_path, offset)
        what = f"exited with code {self._proc.returncode}" if exited else f"not ready in {READY_TIMEOUT:.0f}s"
        message = f"redis-server on port {self.port} {what}; {self.log_path} ends with:\n{tail}"
        raise (PortTakenError if exited and ADDR_IN_USE in tail else RuntimeError)(message)
