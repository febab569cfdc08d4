"""The access log's own path: one line per RPC at the rate calls arrive, so it must cost next to nothing.

Through the logging module a line cost ~75 µs of CPU per call (measured: a LogRecord, a queue with a lock and a
condition, a thread woken for every record, json.dumps of a dict) - a third of a whole Redeem. Here the event loop
appends one tuple to a deque (atomic under the GIL: no lock, no wake-up); a thread wakes every FLUSH_S, formats
everything pending at once and writes it in one call, under the log handler's lock so lines never interleave with
other records. Bounded: past MAX_PENDING lines are dropped and counted (rgw_log_records_dropped_total), never
waited for. The fields are the fixed vocabularies of gateway/grpc_api/observe.py, ids checked by their own
formats (the request id by gateway/grpc_api/errors.py's check); the client id is still escaped (json.dumps).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from datetime import UTC, datetime

from gateway.gateway_metrics import LOG_RECORDS_DROPPED

FLUSH_S = 0.05
MAX_PENDING = 50_000

# (unix time, service, method, code, outcome, reason, answers, duration_ms, brand, client, request id)
Line = tuple[float, str, str, str, str, str, int, float, int | None, str | None, str]
FIELDS = ("service", "method", "code", "outcome", "reason", "answers", "duration_ms", "brand", "client", "request_id")


def _json(line: Line) -> str:
    ts = datetime.fromtimestamp(line[0], UTC).isoformat(timespec="milliseconds")
    _, service, method, code, outcome, reason, answers, duration, brand, client, rid = line
    return (  # the layout JsonFormatter (json.dumps) gives every other line
        f'{{"ts": "{ts}", "level": "INFO", "logger": "rgw.access", "msg": "{method} {code}", "service": "{service}", '
        f'"method": "{method}", "code": "{code}", "outcome": "{outcome}", "reason": "{reason}", "answers": {answers}, '
        f'"duration_ms": {duration}, "brand": {"null" if brand is None else brand}, "client": {json.dumps(client)}, '
        f'"request_id": "{rid}"}}\n'
    )


def _text(line: Line) -> str:
    ts = datetime.fromtimestamp(line[0]).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    pairs = " ".join(f"{k}={v}" for k, v in zip(FIELDS, line[1:], strict=True) if v not in (None, ""))
    return f"{ts} INFO rgw.access {line[2]} {line[3]} {pairs}\n"


class AccessSink:
    """Collects access lines from the event loop and writes them from a thread to `handler`'s stream."""

    def __init__(self, handler: logging.StreamHandler, log_format: str) -> None:  # type: ignore[type-arg]
        self._handler = handler
        self._format = _json if log_format == "json" else _text
        self._pending: deque[Line] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rgw-access-log", daemon=True)

    def add(self, line: Line) -> None:
        """Called on the event loop: never blocks, never formats."""
        if len(self._pending) >= MAX_PENDING:
            LOG_RECORDS_DROPPED.inc()
            return
        self._pending.append(line)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is pending and stop (bounded: a stuck stream does not keep the process from exiting)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        pending, fmt = self._pending, self._format
        lines = []
        while pending:
            lines.append(fmt(pending.popleft()))
        if not lines:
            return
        self._handler.acquire()  # the stream handler's own lock: whole lines, never interleaved with other records
        try:
            self._handler.stream.write("".join(lines))
            self._handler.stream.flush()
        finally:
            self._handler.release()


_sink: AccessSink | None = None


def install(sink: AccessSink | None) -> None:
    """Make `sink` the process's access log (None: back to the logging module, as in tests)."""
    global _sink
    _sink = sink


def current() -> AccessSink | None:
    """The installed sink, if any."""
    return _sink
