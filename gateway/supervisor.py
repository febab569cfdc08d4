"""`rgw serve` with RGW_WORKERS > 1: several server processes on one port (SO_REUSEPORT; the kernel spreads
connections over them). gRPC Python spends most of a call in per-call overhead on one core, so a second process
uses the second core. The supervisor forwards SIGTERM/SIGINT, so every worker shuts down gracefully, and exits
with the worst exit code. Worker i serves its metrics on RGW_METRICS_ADDR's port + i."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping

from gateway.settings import Settings


def worker_environ(settings: Settings, environ: Mapping[str, str], index: int) -> dict[str, str]:
    """The environment of worker `index`."""
    env = {**environ, "RGW_WORKERS": "1", "RGW_WORKER_INDEX": str(index)}
    if settings.metrics_addr:
        host, _, port = settings.metrics_addr.rpartition(":")
        env["RGW_METRICS_ADDR"] = f"{host}:{int(port) + index}"
    if index > 0:
        env["RGW_SERVE_WRITER"] = "false"  # one in-process writer is plenty for development
    return env


def supervise(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    """Start the workers and wait for them; signals are passed on to every worker."""
    env = dict(os.environ if environ is None else environ)
    command = [sys.executable, "-m", "gateway.cli", "serve"]
    # The command is this interpreter and module; nothing comes from input.
    workers = [subprocess.Popen(command, env=worker_environ(settings, env, i)) for i in range(settings.workers)]  # noqa: S603

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [worker.wait() for worker in workers]
    return max(codes, key=abs)
