"""gateway/campaigns/schedule.py: redemption hours parsed and validated (every problem, with its field path), their
encoding for the redeem script, the time zone's offset table, and the Python reference of the Lua check - at
window edges, across midnight, at 24:00 and across DST changes, and against zoneinfo for random instants."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.campaigns.schedule import (
    MAX_WINDOWS,
    HoursError,
    HoursWindow,
    encode_hours,
    hours_to_json,
    in_hours,
    local_weekday_minute,
    offset_table,
    parse_hours,
    utc_offset_s,
    validate_time_zone,
)

DAY_MS = 86_400_000


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()) * 1000


def local_ms(zone: str, *at: int, fold: int = 0) -> int:
    """A local wall-clock time (year, month, day[, hour, minute, second]); fold=1: the second of a repeated hour."""
    year, month, day, hour, minute, second = (*at, 0, 0, 0)[:6]
    wall = datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone), fold=fold)
    return int(wall.timestamp()) * 1000


@cache
def table(zone: str) -> str:
    return offset_table(zone, utc_ms(2026, 1, 1), utc_ms(2028, 1, 1))


def violations(items: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    with pytest.raises(HoursError) as raised:
        parse_hours(items)
    return raised.value.violations


def paths(items: Sequence[Mapping[str, object]]) -> list[str]:
    return [path for path, _ in violations(items)]


# -- Parsing ----------------------------------------------------------------------------------------------------


def test_parse_windows_with_and_without_days() -> None:
    windows = parse_hours(
        [
            {"days": [5, 1, 3], "start": "07:00", "end": "10:30"},
            {"start": "22:00", "end": "02:00"},
            {"days": [7], "start": "20:00", "end": "24:00"},
        ]
    )
    assert windows == (
        HoursWindow((1, 3, 5), 420, 630),
        HoursWindow((), 1320, 120),
        HoursWindow((7,), 1200, 1440),
    )
    assert parse_hours([]) == ()
    assert parse_hours([{"days": None, "start": "00:00", "end": "23:59"}]) == (HoursWindow((), 0, 1439),)


def test_an_end_of_midnight_is_24_00_and_start_equal_to_end_is_a_whole_day_from_start() -> None:
    assert parse_hours([{"start": "22:00", "end": "00:00"}]) == (HoursWindow((), 1320, 1440),)
    assert parse_hours([{"start": "00:00", "end": "00:00"}]) == (HoursWindow((), 0, 1440),)
    assert parse_hours([{"start": "07:00", "end": "07:00"}]) == (HoursWindow((), 420, 420),)


def test_json_round_trip() -> None:
    items: list[dict[str, object]] = [
        {"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"},
        {"start": "22:00", "end": "02:00"},
        {"days": [6, 7], "start": "09:05", "end": "24:00"},
    ]
    assert hours_to_json(parse_hours(items)) == items
    assert parse_hours(hours_to_json(parse_hours(items))) == parse_hours(items)


def test_every_problem_is_reported_with_its_path() -> None:
    found = violations(
        [
            {"days": [1, 8, 1, True, "2"], "start": "7:00", "end": "24:01", "note": "x"},
            {"start": "24:00", "end": "23:60"},
            {"days": [], "start": 700},
            "09:00-17:00",  # type: ignore[list-item]
            {"days": "1,2", "start": "09:00", "end": "17:00"},
        ]
    )
    assert [path for path, _ in found] == [
        "redemption_hours[0].note",
        "redemption_hours[0].days[1]",
        "redemption_hours[0].days[2]",
        "redemption_hours[0].days[3]",
        "redemption_hours[0].days[4]",
        "redemption_hours[0].start",
        "redemption_hours[0].end",
        "redemption_hours[1].start",
        "redemption_hours[1].end",
        "redemption_hours[2].days",
        "redemption_hours[2].start",
        "redemption_hours[2].end",
        "redemption_hours[3]",
        "redemption_hours[4].days",
    ]
    described = dict(found)
    assert "listed twice" in described["redemption_hours[0].days[2]"]
    assert "from 1 (Monday) to 7 (Sunday)" in described["redemption_hours[0].days[1]"]
    assert "24:00" in described["redemption_hours[0].end"]
    assert "23:59" in described["redemption_hours[1].start"]
    assert described["redemption_hours[2].end"] == "is required"
    assert "leave it out" in described["redemption_hours[2].days"]


@pytest.mark.parametrize(
    "value", ["7:00", "07:0", "0700", "07:00 ", "07-00", "\u0660\u0667:\u0660\u0660", "24:00", "23:60", "99:99", ""]
)
def test_start_must_be_hh_mm_up_to_23_59(value: str) -> None:
    assert paths([{"start": value, "end": "10:00"}]) == ["redemption_hours[0].start"]


@pytest.mark.parametrize("value", ["24:01", "25:00", "12:60", "1:00", None, 1440])
def test_end_must_be_hh_mm_up_to_24_00(value: object) -> None:
    assert paths([{"start": "10:00", "end": value}]) == ["redemption_hours[0].end"]


def test_at_most_32_windows_and_a_list_of_them() -> None:
    window = {"start": "09:00", "end": "10:00"}
    assert len(parse_hours([window] * MAX_WINDOWS)) == MAX_WINDOWS
    assert violations([window] * (MAX_WINDOWS + 1)) == [("redemption_hours", "at most 32 windows, got 33")]
    assert paths({"start": "09:00"}) == ["redemption_hours"]  # type: ignore[arg-type]
    assert paths("09:00-10:00") == ["redemption_hours"]  # type: ignore[arg-type]


def test_hours_error_is_a_value_error_naming_every_problem() -> None:
    with pytest.raises(ValueError, match=r"redemption_hours\[0\]\.start: .*redemption_hours\[0\]\.end: is required"):
        parse_hours([{"start": "x"}])


def test_windows_keep_their_invariants() -> None:
    for bad in [((2, 1), 0, 60), ((1, 1), 0, 60), ((8,), 0, 60), ((), 1440, 60), ((), -1, 60), ((), 0, 0)]:
        with pytest.raises(ValueError):
            HoursWindow(*bad)


# -- Time zones and the offset table ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Europe/London", "America/New_York", "Asia/Shanghai", "Asia/Kolkata"])
def test_known_time_zones(name: str) -> None:
    assert validate_time_zone(name) == name


@pytest.mark.parametrize("name", ["", "Mars/Olympus", "europe/london", "Europe/London ", "../etc/passwd", "+08:00"])
def test_unknown_time_zones(name: str) -> None:
    with pytest.raises(HoursError) as raised:
        validate_time_zone(name)
    assert [path for path, _ in raised.value.violations] == ["time_zone"]
    with pytest.raises(HoursError):
        offset_table(name, utc_ms(2026, 1, 1), utc_ms(2027, 1, 1))


def test_london_2026_has_both_changes_exact_to_the_second() -> None:
    start, end = utc_ms(2026, 1, 1), utc_ms(2027, 1, 1)
    assert offset_table("Europe/London", start, end) == (
        f"{start - 2 * DAY_MS}:0,{utc_ms(2026, 3, 29, 1)}:3600,{utc_ms(2026, 10, 25, 1)}:0"
    )


def test_new_york_2026() -> None:
    start, end = utc_ms(2026, 1, 1), utc_ms(2027, 1, 1)
    assert offset_table("America/New_York", start, end) == (
        f"{start - 2 * DAY_MS}:-18000,{utc_ms(2026, 3, 8, 7)}:-14400,{utc_ms(2026, 11, 1, 6)}:-18000"
    )


def test_zones_without_changes_have_one_entry() -> None:
    start, end = utc_ms(2026, 1, 1, 12, 30, 15) + 123, utc_ms(2027, 1, 1)
    assert offset_table("Asia/Shanghai", start, end) == f"{start - 2 * DAY_MS}:28800"
    assert offset_table("UTC", start, end) == f"{start - 2 * DAY_MS}:0"


def test_the_table_reaches_two_days_past_each_end() -> None:
    # the campaign runs 2026-03-31 .. 2026-10-23: both London changes are within two days of it
    assert offset_table("Europe/London", utc_ms(2026, 3, 31, 1), utc_ms(2026, 10, 23, 1)) == (
        f"{utc_ms(2026, 3, 29, 1)}:3600,{utc_ms(2026, 10, 25, 1)}:0"
    )
    assert offset_table("Europe/London", utc_ms(2026, 3, 31, 2), utc_ms(2026, 10, 23, 0)) == (
        f"{utc_ms(2026, 3, 29, 2)}:3600"
    )
    with pytest.raises(ValueError, match="before"):
        offset_table("UTC", utc_ms(2026, 2, 1), utc_ms(2026, 1, 1))


def test_the_scan_stops_after_20_years_and_is_fast() -> None:
    began = time.perf_counter()
    short = offset_table("Europe/London", utc_ms(2026, 1, 1), utc_ms(2027, 1, 1))
    one_year = time.perf_counter() - began
    century = offset_table("Europe/London", utc_ms(2026, 1, 1), utc_ms(2126, 1, 1))
    assert one_year < 0.05
    entries = century.split(",")
    assert century.startswith(short.rsplit(",", 1)[0]) and len(entries) == 1 + 2 * 20
    assert int(entries[-1].split(":")[0]) < utc_ms(2046, 1, 1)


@pytest.mark.parametrize(
    "zone", ["Europe/London", "America/New_York", "Australia/Lord_Howe", "Africa/Casablanca", "Pacific/Chatham"]
)
def test_the_table_agrees_with_zoneinfo_every_hour(zone: str) -> None:
    tz = ZoneInfo(zone)
    for hour in range(0, 2 * 366 * 24, 1):
        now_ms = utc_ms(2026, 1, 1) + hour * 3_600_000
        expected = datetime.fromtimestamp(now_ms / 1000, tz).utcoffset()
        assert expected is not None and utc_offset_s(table(zone), now_ms) == expected.total_seconds()


def test_offsets_before_the_first_entry_and_of_an_empty_table() -> None:
    assert utc_offset_s("1000:3600,5000:7200", 0) == 3600
    assert utc_offset_s("1000:3600,5000:7200", 4999) == 3600
    assert utc_offset_s("1000:3600,5000:7200", 5000) == 7200
    assert utc_offset_s("", 5000) == 0


# -- Encoding and the check -------------------------------------------------------------------------------------


def test_encode_hours() -> None:
    windows = parse_hours(
        [
            {"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"},
            {"days": [5, 6], "start": "22:00", "end": "02:00"},
            {"start": "12:00", "end": "24:00"},
            {"days": [7], "start": "00:00", "end": "00:00"},
            {"days": [1, 2, 3, 4, 5, 6, 7], "start": "08:00", "end": "09:00"},
        ]
    )
    assert encode_hours(windows) == "31:420:630,48:1320:120,127:720:1440,64:0:1440,127:480:540"
    assert encode_hours(()) == ""


def test_local_weekday_and_minute() -> None:
    assert local_weekday_minute("", 0) == (4, 0)  # 1970-01-01 00:00 UTC, a Thursday
    assert local_weekday_minute(table("Asia/Shanghai"), utc_ms(2026, 6, 7, 16, 30)) == (1, 30)  # Mon 00:30 local
    assert local_weekday_minute(table("America/New_York"), utc_ms(2026, 6, 1, 3, 59)) == (7, 1439)  # Sun 23:59


def test_no_windows_is_any_time() -> None:
    assert in_hours("", table("Europe/London"), utc_ms(2026, 6, 1))


def check(windows: Sequence[Mapping[str, object]], zone: str, *at: int, fold: int = 0) -> bool:
    return in_hours(encode_hours(parse_hours(windows)), table(zone), local_ms(zone, *at, fold=fold))


def test_start_is_inside_and_end_is_not_in_the_campaigns_zone() -> None:
    morning = [{"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"}]
    for zone in ("Asia/Shanghai", "America/New_York", "Europe/London"):
        assert not check(morning, zone, 2026, 6, 1, 6, 59, 59)  # Monday
        assert check(morning, zone, 2026, 6, 1, 7, 0)
        assert check(morning, zone, 2026, 6, 1, 10, 29, 59)
        assert not check(morning, zone, 2026, 6, 1, 10, 30)
        assert not check(morning, zone, 2026, 6, 6, 8, 0)  # Saturday
    # 07:00 in Shanghai is 23:00 UTC the day before
    assert in_hours(encode_hours(parse_hours(morning)), table("Asia/Shanghai"), utc_ms(2026, 5, 31, 23))
    assert not in_hours(encode_hours(parse_hours(morning)), table("UTC"), utc_ms(2026, 5, 31, 23))


def test_across_midnight_covers_the_next_morning_of_a_listed_day_only() -> None:
    friday_night = [{"days": [5], "start": "22:00", "end": "02:00"}]
    zone = "Asia/Shanghai"
    assert not check(friday_night, zone, 2026, 6, 5, 21, 59)  # Friday
    assert check(friday_night, zone, 2026, 6, 5, 22, 0)
    assert check(friday_night, zone, 2026, 6, 5, 23, 59, 59)
    assert check(friday_night, zone, 2026, 6, 6, 0, 0)  # Saturday
    assert check(friday_night, zone, 2026, 6, 6, 1, 59)
    assert not check(friday_night, zone, 2026, 6, 6, 2, 0)
    assert not check(friday_night, zone, 2026, 6, 5, 1, 0)  # Friday morning: Thursday night is not listed
    assert not check(friday_night, zone, 2026, 6, 6, 22, 30)  # Saturday night


def test_sunday_night_runs_into_monday() -> None:
    sunday_night = [{"days": [7], "start": "23:00", "end": "01:00"}]
    assert check(sunday_night, "America/New_York", 2026, 6, 8, 0, 30)  # Monday
    assert not check(sunday_night, "America/New_York", 2026, 6, 7, 0, 30)  # Sunday morning


def test_a_whole_day_from_start() -> None:
    from_seven = [{"days": [1], "start": "07:00", "end": "07:00"}]
    assert not check(from_seven, "Europe/London", 2026, 6, 1, 6, 59)
    assert check(from_seven, "Europe/London", 2026, 6, 1, 7, 0)
    assert check(from_seven, "Europe/London", 2026, 6, 2, 6, 59)
    assert not check(from_seven, "Europe/London", 2026, 6, 2, 7, 0)


def test_up_to_24_00() -> None:
    evening = [{"days": [1], "start": "20:00", "end": "24:00"}]
    assert check(evening, "Asia/Shanghai", 2026, 6, 1, 23, 59, 59)
    assert not check(evening, "Asia/Shanghai", 2026, 6, 2, 0, 0)
    assert not check(evening, "Asia/Shanghai", 2026, 6, 1, 19, 59)


def test_day_masks() -> None:
    weekdays = [{"days": [1, 3, 5], "start": "09:00", "end": "17:00"}, {"days": [6], "start": "10:00", "end": "12:00"}]
    inside = [(2026, 6, 1, 9), (2026, 6, 3, 12), (2026, 6, 5, 16, 59), (2026, 6, 6, 10)]
    outside = [(2026, 6, 2, 12), (2026, 6, 4, 12), (2026, 6, 6, 12), (2026, 6, 7, 10), (2026, 6, 1, 17)]
    assert all(check(weekdays, "Europe/London", *at) for at in inside)
    assert not any(check(weekdays, "Europe/London", *at) for at in outside)


def test_spring_forward_in_london() -> None:
    # 2026-03-29 (a Sunday) 01:00 UTC: 01:00 GMT becomes 02:00 BST, so of 01:30-02:30 only 02:00-02:30 happens
    night = encode_hours(parse_hours([{"days": [7], "start": "01:30", "end": "02:30"}]))
    london = table("Europe/London")
    assert not in_hours(night, london, utc_ms(2026, 3, 29, 0, 59, 59))  # 00:59:59 GMT
    assert in_hours(night, london, utc_ms(2026, 3, 29, 1))  # 02:00 BST
    assert in_hours(night, london, utc_ms(2026, 3, 29, 1, 29, 59))  # 02:29:59 BST
    assert not in_hours(night, london, utc_ms(2026, 3, 29, 1, 30))  # 02:30 BST
    assert in_hours(night, london, utc_ms(2026, 3, 22, 1, 30))  # a week earlier: 01:30 GMT


def test_fall_back_in_london_the_repeated_hour_is_inside_both_times() -> None:
    # 2026-10-25 (a Sunday) 01:00 UTC: 02:00 BST becomes 01:00 GMT, so 01:00-02:00 happens twice
    night = encode_hours(parse_hours([{"days": [7], "start": "01:00", "end": "02:00"}]))
    london = table("Europe/London")
    assert not in_hours(night, london, utc_ms(2026, 10, 24, 23, 59, 59))  # 00:59:59 BST
    assert in_hours(night, london, utc_ms(2026, 10, 25, 0))  # 01:00 BST
    assert in_hours(night, london, utc_ms(2026, 10, 25, 0, 59, 59))  # 01:59:59 BST
    assert in_hours(night, london, utc_ms(2026, 10, 25, 1))  # 01:00 GMT
    assert in_hours(night, london, utc_ms(2026, 10, 25, 1, 59, 59))  # 01:59:59 GMT
    assert not in_hours(night, london, utc_ms(2026, 10, 25, 2))  # 02:00 GMT
    assert check([{"days": [7], "start": "01:00", "end": "02:00"}], "Europe/London", 2026, 10, 25, 1, 30, fold=1)


# -- Against zoneinfo -------------------------------------------------------------------------------------------

# whole-hour, half-hour and 45-minute offsets; DST north and south, of 30 minutes (Lord Howe), suspended for Ramadan
# (Casablanca); and both ends of the world (Kiritimati +14, Pago Pago -11)
ZONES = [
    "UTC", "Europe/London", "America/New_York", "Asia/Shanghai", "Australia/Lord_Howe", "Asia/Kathmandu",
    "America/St_Johns", "Pacific/Chatham", "Africa/Casablanca", "Pacific/Kiritimati", "Pacific/Pago_Pago",
]  # fmt: skip


def expected_inside(windows: Sequence[HoursWindow], zone: str, now_ms: int) -> bool:
    """The windows' definition, on zoneinfo's local time."""
    here = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(zone))
    minute = here.hour * 60 + here.minute
    today, yesterday = here.isoweekday(), (here - timedelta(days=1)).isoweekday()
    for w in windows:
        days = w.days or (1, 2, 3, 4, 5, 6, 7)
        if w.start_min < w.end_min and today in days and w.start_min <= minute < w.end_min:
            return True
        if w.end_min <= w.start_min and ((today in days and minute >= w.start_min) or
                                         (yesterday in days and minute < w.end_min)):  # fmt: skip
            return True
    return False


windows_strategy = st.lists(
    st.builds(
        HoursWindow,
        st.sets(st.integers(1, 7)).map(lambda days: tuple(sorted(days))),
        st.integers(0, 1439),
        st.integers(1, 1440),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    zone=st.sampled_from(ZONES),
    windows=windows_strategy,
    now_ms=st.integers(utc_ms(2026, 1, 1), utc_ms(2028, 1, 1) - 1),
)
def test_in_hours_agrees_with_zoneinfo(zone: str, windows: list[HoursWindow], now_ms: int) -> None:
    assert in_hours(encode_hours(windows), table(zone), now_ms) == (
        not windows or expected_inside(windows, zone, now_ms)
    )
