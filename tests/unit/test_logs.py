"""gateway/logs.py: JSON lines or text, fields appended, and a stuck log stream never holds up the caller."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from gateway import logs


class StuckStream(io.StringIO):
    """A stderr nobody reads: every write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait()
        return super().write(text)


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("rgw.access", logging.INFO, __file__, 1, "%s %s", ("Redeem", "OK"), None)
    record.fields = fields
    return record


def test_json_lines_carry_the_message_level_logger_and_fields() -> None:
    doc = json.loads(logs.JsonFormatter().format(_record(method="Redeem", code="OK", brand=1)))
    assert doc["msg"] == "Redeem OK" and doc["level"] == "INFO" and doc["logger"] == "rgw.access"
    assert (doc["method"], doc["code"], doc["brand"]) == ("Redeem", "OK", 1)
    assert doc["ts"].endswith("+00:00")


def test_json_lines_hold_the_traceback_as_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("rgw", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info())
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_text_lines_append_fields_and_skip_empty_ones() -> None:
    line = logs.TextFormatter().format(_record(method="Redeem", outcome="", client=None, duration_ms=1.5))
    assert line.endswith("rgw.access Redeem OK method=Redeem duration_ms=1.5")


def test_a_stuck_stream_drops_and_counts_records_instead_of_blocking(restore_root: None) -> None:
    stream = StuckStream()
    dropped = REGISTRY.get_sample_value("rgw_log_records_dropped_total") or 0.0
    stop = logs.configure("INFO", "json", stream=stream)
    finished = threading.Event()

    def emit() -> None:
        for n in range(logs.QUEUE_RECORDS + 500):
            logging.getLogger("rgw.test").info("line %d", n)
        finished.set()

    thread = threading.Thread(target=emit, daemon=True)
    thread.start()
    try:
        # generous: it is about never waiting for the stream, not about speed
        assert finished.wait(60), "logging blocked on a stuck stream"
        now = REGISTRY.get_sample_value("rgw_log_records_dropped_total") or 0.0
        assert now - dropped >= 499  # the writer thread holds one record while it waits
    finally:
        stream.release.set()
        stop()
    assert stream.getvalue().count("\n") >= logs.QUEUE_RECORDS
