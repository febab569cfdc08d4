"""A log line that cannot become a flood: when every call fails the same way (a Redis outage, a client sending
garbage, a bug on the hot path), the log keeps a few lines per interval and counts the rest."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """At most `burst` lines per `interval_s`; the lines suppressed in an interval are reported with their count
    when the interval ends (a timer on the running loop), so a burst that stops is still counted."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 1.0,
        burst: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._burst = burst
        self._clock = clock
        self._window_end = 0.0
        self._emitted = 0
        self._suppressed = 0
        self._last_message = ""
        self._flush_scheduled = False

    @property
    def suppressed(self) -> int:
        """Lines held back in the current interval and not yet reported."""
        return self._suppressed

    def log(self, level: int, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        """Log like Logger.log, unless this interval's burst is spent; then count the line instead."""
        now = self._clock()
        if now >= self._window_end:
            self.flush()
            self._window_end, self._emitted = now + self._interval_s, 0
        if self._emitted < self._burst:
            self._emitted += 1
            self._logger.log(level, message, *args, exc_info=exc_info)
            return
        self._suppressed += 1
        self._last_message = message % args if args else message
        self._schedule_flush(self._window_end - now)

    def flush(self) -> None:
        """Report the lines suppressed so far, if any, with their count and the last of them."""
        if self._suppressed:
            self._logger.warning(
                "%d more like this suppressed in %gs; the last: %s",
                self._suppressed,
                self._interval_s,
                self._last_message,
            )
        self._suppressed = 0

    def _schedule_flush(self, delay_s: float) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a CLI): the next line after the interval reports the count
        self._flush_scheduled = True
        loop.call_later(max(delay_s, 0.0), self._timer_flush)

    def _timer_flush(self) -> None:
        self._flush_scheduled = False
        if self._clock() >= self._window_end:
            self.flush()
        elif self._suppressed:
            self._schedule_flush(self._window_end - self._clock())
