"""Logging of every `rgw` process: JSON lines in production, readable text in development (RGW_LOG_FORMAT).

The event loop never waits for a log stream: records go into a bounded in-memory queue and a thread formats and
writes them. When the thread falls behind (a blocked stderr, a burst) records are dropped and counted
(rgw_log_records_dropped_total) rather than stalling redemptions. Structured fields travel in
`extra={"fields": {...}}` (the access log's method, status, outcome, duration, brand, client, request id); no
caller ever puts a code, key or secret there.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

from gateway import access_log
from gateway.gateway_metrics import LOG_RECORDS_DROPPED

QUEUE_RECORDS = 10_000
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, the record's fields, and exc when raised."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the record's fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))


class _QueueHandler(QueueHandler):
    """Hands records to the writer thread as they are: formatting happens there, not on the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            LOG_RECORDS_DROPPED.inc()


class _Listener(QueueListener):
    """At shutdown, waits a little for room for its stop marker and for the thread to write what is queued, but
    never forever: a process must be able to exit while its stderr is stuck."""

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=5)  # type: ignore[attr-defined]
        except queue.Full:
            return  # the stream is stuck: the queued records are lost with the process
        thread.join(timeout=10)
        self._thread = None


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of RGW_LOG_FORMAT."""
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(level: str, log_format: str, stream: TextIO | None = None, *, access: bool = True) -> Callable[[], None]:
    """Route every logger through the queue to `stream` (stderr), and the access log (when on and INFO is logged)
    through its own sink (gateway/access_log.py); returns the function that flushes and stops both."""
    target = logging.StreamHandler(sys.stderr if stream is None else stream)
    target.setFormatter(formatter(log_format))
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_RECORDS)
    listener = _Listener(records, target)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_QueueHandler(records))
    root.setLevel(level)
    listener.start()
    sink = None
    if access and root.isEnabledFor(logging.INFO):
        sink = access_log.AccessSink(target, log_format)
        sink.start()
    access_log.install(sink)

    def stop() -> None:
        if sink is not None:
            access_log.install(None)
            sink.stop()
        listener.stop()

    return stop
