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

from gateway import access_log, logs


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


def _line(**overrides: object) -> access_log.Line:
    base: dict[str, object] = {
        "ts": 1_780_272_000.5, "service": "redemption.v1.RedemptionService", "method": "Redeem", "code": "OK",
        "outcome": "redeemed", "reason": "REDEEMED", "answers": 1, "duration_ms": 1.25, "brand": 1,
        "client": 'cl_"quoted"', "request_id": "pos-42.till-1:7",
    }  # fmt: skip
    base.update(overrides)
    return tuple(base.values())  # type: ignore[return-value]


def test_the_access_sink_writes_json_lines_a_thread_formats(restore_root: None) -> None:
    stream = io.StringIO()
    stop = logs.configure("INFO", "json", stream=stream)
    sink = access_log.current()
    assert sink is not None
    sink.add(_line())
    sink.add(_line(brand=None, client=None, code="Unauthenticated", outcome="", reason=""))
    stop()
    assert access_log.current() is None
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["logger"] == "rgw.access" and first["msg"] == "Redeem OK" and first["ts"].startswith("2026-06-01T")
    assert (first["client"], first["request_id"], first["brand"], first["duration_ms"]) == (
        'cl_"quoted"',
        "pos-42.till-1:7",
        1,
        1.25,
    )
    assert (second["brand"], second["client"], second["code"]) == (None, None, "Unauthenticated")


def test_the_access_sink_writes_text_and_is_off_when_asked_or_above_info(restore_root: None) -> None:
    stream = io.StringIO()
    stop = logs.configure("INFO", "text", stream=stream)
    sink = access_log.current()
    assert sink is not None
    sink.add(_line(outcome=""))
    stop()
    assert stream.getvalue().rstrip().endswith("rgw.access Redeem OK service=redemption.v1.RedemptionService "
                                               'method=Redeem code=OK reason=REDEEMED answers=1 duration_ms=1.25 '
                                               'brand=1 client=cl_"quoted" request_id=pos-42.till-1:7')  # fmt: skip
    for level, access in (("INFO", False), ("WARNING", True)):
        stop = logs.configure(level, "json", stream=io.StringIO(), access=access)
        assert access_log.current() is None
        stop()


def test_the_access_sink_drops_and_counts_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access_log, "MAX_PENDING", 3)
    sink = access_log.AccessSink(logging.StreamHandler(io.StringIO()), "json")  # not started: nothing drains
    dropped = REGISTRY.get_sample_value("rgw_log_records_dropped_total") or 0.0
    for _ in range(5):
        sink.add(_line())
    assert (REGISTRY.get_sample_value("rgw_log_records_dropped_total") or 0.0) - dropped == 2
