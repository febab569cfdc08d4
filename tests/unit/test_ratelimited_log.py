"""RateLimitedLog: a flood of identical failures becomes a few lines and a count."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.ratelimited_log import RateLimitedLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_keeps_a_few_lines_and_reports_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("t.burst"), interval_s=1.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, "t.burst"):
        for n in range(1000):
            limited.log(logging.WARNING, "bad request %d", n)
        assert [r.getMessage() for r in caplog.records] == ["bad request 0", "bad request 1", "bad request 2"]
        clock.now += 1.0
        limited.log(logging.WARNING, "bad request %d", 1000)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[3] == "997 more like this suppressed in 1s; the last: bad request 999"
    assert messages[4] == "bad request 1000" and len(messages) == 5


def test_tracebacks_are_kept_only_for_the_lines_that_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("t.exc"), burst=1, clock=FakeClock())
    with caplog.at_level(logging.ERROR, "t.exc"):
        for _ in range(50):
            limited.log(logging.ERROR, "internal error", exc_info=ValueError("boom"))
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
    assert limited.suppressed == 49


async def test_a_burst_that_stops_is_still_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("t.timer"), interval_s=0.05, burst=1, clock=clock)
    with caplog.at_level(logging.WARNING, "t.timer"):
        for _ in range(10):
            limited.log(logging.WARNING, "garbage")
        clock.now += 0.05
        await asyncio.sleep(0.3)  # no further line arrives: the loop's timer reports the count
    assert [r.getMessage() for r in caplog.records] == [
        "garbage",
        "9 more like this suppressed in 0.05s; the last: garbage",
    ]
