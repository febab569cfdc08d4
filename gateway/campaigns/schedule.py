"""Redemption hours: when in the week a campaign's codes may be redeemed, as wall-clock windows in the campaign's
IANA time zone ("Mon-Fri 07:00-10:30", "Fri,Sat 22:00-02:00" across midnight).

The check runs inside the redeem script (lua/hours_lib.lua), and Redis' Lua has no time zone data. So the
publisher stores two strings in the campaign's meta hash: the windows (`encode_hours`) and the zone's UTC offsets
over the campaign's validity (`offset_table`), each change exact to the second. `in_hours` is the Python
reference of the Lua function, on the same strings; an integration test holds the two against each other."""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

MAX_WINDOWS = 32
MINUTES_PER_DAY = 1440
ALL_DAYS = (1, 2, 3, 4, 5, 6, 7)
EVERY_DAY_MASK = 127

_DAY_MS = 86_400_000
_MINUTE_MS = 60_000
# The table reaches two days past both ends of the validity: a time zone is never more than a day from UTC, so a
# check at any instant of the validity finds its offset whatever the clocks of the caller and Redis say.
_MARGIN_MS = 2 * _DAY_MS
# Past 20 years the last offset simply continues: the tz database's rules that far ahead are guesses anyway.
_MAX_SPAN_S = 20 * 366 * 86_400
# Offsets are compared once a day and a change is bisected to its second. Two changes less than a day apart that
# cancel out would be missed: since 1970 no zone has changed its offset twice within a week (tzdata 2026).
_STEP_S = 86_400
_HH_MM = re.compile(r"([0-9]{2}):([0-9]{2})")
_FIELDS = frozenset({"days", "start", "end"})

Violation = tuple[str, str]


@dataclass(frozen=True, slots=True)
class HoursWindow:
    """Wall-clock minutes on the given ISO weekdays (1 = Monday .. 7 = Sunday; empty = every day). With start < end
    the window is [start, end) of each such day; with end <= start it runs across midnight: [start, 24:00) of such a
    day and [00:00, end) of the next, so start == end is the 24 hours from start."""

    days: tuple[int, ...]
    start_min: int
    end_min: int

    def __post_init__(self) -> None:
        if list(self.days) != sorted(set(self.days)) or not set(self.days) <= set(ALL_DAYS):
            raise ValueError(f"days must be sorted, unique ISO weekdays 1..7: {self.days!r}")
        if not 0 <= self.start_min < MINUTES_PER_DAY or not 0 < self.end_min <= MINUTES_PER_DAY:
            raise ValueError(f"minutes out of range: start {self.start_min}, end {self.end_min}")

    @property
    def mask(self) -> int:
        """Bit d-1 for ISO weekday d."""
        return sum(1 << (d - 1) for d in self.days) if self.days else EVERY_DAY_MASK


class HoursError(ValueError):
    """Invalid redemption hours or time zone: every problem found, as (field path, description)."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(f"{path}: {description}" for path, description in violations))
        self.violations = violations


# -- Parsing and showing ----------------------------------------------------------------------------------------


def _minutes(value: object, path: str, *, end: bool) -> tuple[int | None, list[Violation]]:
    latest = "24:00" if end else "23:59"
    if value is None:
        return None, [(path, "is required")]
    match = _HH_MM.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None, [(path, f'must be a time "HH:MM" from "00:00" to "{latest}"')]
    hours, minutes = int(match[1]), int(match[2])
    if end and (hours, minutes) in ((24, 0), (0, 0)):
        # "00:00" as an end is the midnight ending the day: the same instants as "24:00"
        return MINUTES_PER_DAY, []
    if hours > 23 or minutes > 59:
        return None, [(path, f'must be a time "HH:MM" from "00:00" to "{latest}"')]
    return hours * 60 + minutes, []


def _days(value: object, path: str) -> tuple[tuple[int, ...], list[Violation]]:
    if value is None:
        return (), []
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        return (), [(path, "must be a list of ISO weekdays (1 = Monday .. 7 = Sunday)")]
    if not value:
        return (), [(path, "must not be empty: leave it out for every day")]
    problems: list[Violation] = []
    seen: set[int] = set()
    for i, day in enumerate(value):
        if isinstance(day, bool) or not isinstance(day, int) or not 1 <= day <= 7:
            problems.append((f"{path}[{i}]", "must be an ISO weekday from 1 (Monday) to 7 (Sunday)"))
        elif day in seen:
            problems.append((f"{path}[{i}]", f"day {day} is listed twice"))
        else:
            seen.add(day)
    return tuple(sorted(seen)), problems


def _window(item: object, path: str) -> tuple[HoursWindow | None, list[Violation]]:
    if not isinstance(item, Mapping):
        return None, [(path, 'must be an object {"days": [...], "start": "HH:MM", "end": "HH:MM"}')]
    problems = [(f"{path}.{key}", "unknown field") for key in item if key not in _FIELDS]
    days, found = _days(item.get("days"), f"{path}.days")
    problems += found
    start, found = _minutes(item.get("start"), f"{path}.start", end=False)
    problems += found
    end, found = _minutes(item.get("end"), f"{path}.end", end=True)
    problems += found
    if problems or start is None or end is None:
        return None, problems
    return HoursWindow(days, start, end), []


def parse_hours(items: Sequence[Mapping[str, object]], field: str = "redemption_hours") -> tuple[HoursWindow, ...]:
    """Windows from JSON-like objects {"days": [1, 2], "start": "07:00", "end": "10:30"} ("days" left out: every
    day; an end at or before the start: across midnight). Raises HoursError with every problem found."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise HoursError([(field, "must be a list of windows")])
    problems: list[Violation] = []
    if len(items) > MAX_WINDOWS:
        problems.append((field, f"at most {MAX_WINDOWS} windows, got {len(items)}"))
    windows: list[HoursWindow] = []
    for i, item in enumerate(items):
        window, found = _window(item, f"{field}[{i}]")
        problems += found
        if window is not None:
            windows.append(window)
    if problems:
        raise HoursError(problems)
    return tuple(windows)


def _hh_mm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def hours_to_json(windows: Sequence[HoursWindow]) -> list[dict[str, object]]:
    """The inverse of parse_hours: what Postgres stores (jsonb) and the API shows."""
    shown: list[dict[str, object]] = []
    for w in windows:
        item: dict[str, object] = {"days": list(w.days)} if w.days else {}
        item.update(start=_hh_mm(w.start_min), end=_hh_mm(w.end_min))
        shown.append(item)
    return shown


@cache
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def validate_time_zone(name: str) -> str:
    """An IANA time zone name the zoneinfo database knows (e.g. "Europe/London", "UTC"), returned unchanged."""
    if not isinstance(name, str) or name not in _known_zones():
        raise HoursError([("time_zone", f"unknown time zone {name!r}: expected an IANA name like Europe/London")])
    return name


# -- What the redeem script reads -------------------------------------------------------------------------------


def encode_hours(windows: Sequence[HoursWindow]) -> str:
    """The meta field `win`: "<weekday mask>:<start minute>:<end minute>,..."; "" (no windows) is any time."""
    return ",".join(f"{w.mask}:{w.start_min}:{w.end_min}" for w in windows)


def _offset_s(zone: ZoneInfo, second: int) -> int:
    offset = datetime.fromtimestamp(second, zone).utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


def _changes(zone: ZoneInfo, start_s: int, end_s: int) -> list[tuple[int, int]]:
    """(first second, offset) of each change of the zone's offset in (start_s, end_s]."""
    changes: list[tuple[int, int]] = []
    at, current = start_s, _offset_s(zone, start_s)
    while at < end_s:
        ahead = min(at + _STEP_S, end_s)
        if _offset_s(zone, ahead) == current:
            at = ahead
            continue
        before, after = at, ahead  # the offset is `current` at `before`, not at `after`
        while after - before > 1:
            middle = (before + after) // 2
            before, after = (middle, after) if _offset_s(zone, middle) == current else (before, middle)
        at, current = after, _offset_s(zone, after)
        changes.append((after, current))
    return changes


def offset_table(time_zone: str, from_ms: int, until_ms: int) -> str:
    """The meta field `tz`: "<ms>:<UTC offset in seconds>,..." ascending - the offset in force two days before
    from_ms, then every change of it up to two days after until_ms (at most 20 years are scanned)."""
    zone = ZoneInfo(validate_time_zone(time_zone))
    if until_ms < from_ms:
        raise ValueError(f"until_ms {until_ms} is before from_ms {from_ms}")
    first_ms = from_ms - _MARGIN_MS
    start_s = first_ms // 1000
    end_s = min(-(-(until_ms + _MARGIN_MS) // 1000), start_s + _MAX_SPAN_S)
    entries = [(first_ms, _offset_s(zone, start_s))]
    entries += [(second * 1000, offset) for second, offset in _changes(zone, start_s, end_s)]
    return ",".join(f"{ms}:{offset}" for ms, offset in entries)


# -- The reference of lua/hours_lib.lua -------------------------------------------------------------------------


def _parse_table(table: str) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    offsets: list[int] = []
    for entry in filter(None, table.split(",")):
        ms, offset = entry.split(":")
        starts.append(int(ms))
        offsets.append(int(offset))
    return starts, offsets


def utc_offset_s(table: str, now_ms: int) -> int:
    """The offset of the last entry at or before now_ms (the first entry's before it; 0 for an empty table)."""
    starts, offsets = _parse_table(table)
    if not offsets:
        return 0
    return offsets[max(bisect.bisect_right(starts, now_ms) - 1, 0)]


def local_weekday_minute(table: str, now_ms: int) -> tuple[int, int]:
    """The local ISO weekday (1 = Monday) and minute of the day at now_ms."""
    local_ms = now_ms + utc_offset_s(table, now_ms) * 1000
    day, ms_of_day = divmod(local_ms, _DAY_MS)
    return (day + 3) % 7 + 1, ms_of_day // _MINUTE_MS  # 1970-01-01 was a Thursday


def in_hours(windows_encoded: str, table: str, now_ms: int) -> bool:
    """Whether now_ms is inside one of the encoded windows in the zone of the offset table ("" windows: always)."""
    if not windows_encoded:
        return True
    weekday, minute = local_weekday_minute(table, now_ms)
    yesterday = (weekday + 5) % 7 + 1
    for window in windows_encoded.split(","):
        mask, start, end = (int(part) for part in window.split(":"))
        if start < end:
            inside = bool(mask >> (weekday - 1) & 1) and start <= minute < end
        else:
            inside = (bool(mask >> (weekday - 1) & 1) and minute >= start) or (
                bool(mask >> (yesterday - 1) & 1) and minute < end
            )
        if inside:
            return True
    return False
