"""lua/hours_lib.lua on a real redis-server, against its Python reference (gateway/campaigns/schedule.in_hours):
the edge cases of the unit tests (window edges, across midnight, 24:00, DST changes) and a property - any zone,
any windows, any instant of 2026-2027, near its offset changes and window edges too - that the two agree."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from importlib import resources

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway.campaigns.schedule import HoursWindow, encode_hours, in_hours, offset_table, parse_hours, utc_offset_s

FRAGMENT = resources.files("gateway.lua").joinpath("hours_lib.lua").read_text()
# One call checks many instants: ARGV = tz, win, now...
LOOP = """
local outside = {}
for i = 3, #ARGV do outside[#outside + 1] = outside_hours(ARGV[1], ARGV[2], tonumber(ARGV[i])) and 1 or 0 end
return outside
"""
SCRIPT = FRAGMENT + LOOP
ZONES = [
    "UTC", "Europe/London", "America/New_York", "Asia/Shanghai", "Australia/Lord_Howe", "Asia/Kathmandu",
    "America/St_Johns", "Pacific/Chatham", "Africa/Casablanca", "Pacific/Kiritimati", "Pacific/Pago_Pago",
]  # fmt: skip
FROM_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * 1000
UNTIL_MS = int(datetime(2028, 1, 1, tzinfo=UTC).timestamp()) * 1000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()) * 1000


@cache
def table(zone: str) -> str:
    return offset_table(zone, FROM_MS, UNTIL_MS)


async def lua_inside(redis: Redis, tz: str, win: str, instants: list[int]) -> list[bool]:
    outside = await redis.eval(SCRIPT, 0, tz, win, *instants)
    return [flag == 0 for flag in outside]


async def both_inside(redis: Redis, tz: str, win: str, instants: list[int]) -> list[bool]:
    """The Lua answers, after checking that Python gives the same ones."""
    lua = await lua_inside(redis, tz, win, instants)
    assert lua == [in_hours(win, tz, now) for now in instants], (tz, win, instants)
    return lua


def test_the_fragment_defines_locals_only_and_reads_no_keys() -> None:
    # Redis also refuses a script that creates a global: every EVAL below would fail
    assert re.search(r"^\s*function\b", FRAGMENT, re.MULTILINE) is None
    assert "redis.call" not in FRAGMENT and "redis.pcall" not in FRAGMENT
    assert "local function outside_hours(tz, win, now)" in FRAGMENT


async def test_no_windows_or_no_table(redis: Redis) -> None:
    now = utc_ms(2026, 6, 1, 12)
    noon_utc = encode_hours(parse_hours([{"start": "12:00", "end": "13:00"}]))
    assert await both_inside(redis, table("Asia/Shanghai"), "", [now]) == [True]
    assert await both_inside(redis, "", noon_utc, [now, now - 1]) == [True, False]
    # HMGET answers false for a field the meta hash lacks (a campaign published before redemption hours)
    absent = FRAGMENT + "return {outside_hours(false, false, 0) and 1 or 0, outside_hours(nil, ARGV[1], 0) and 1 or 0}"
    assert await redis.eval(absent, 0, encode_hours(parse_hours([{"start": "00:00", "end": "00:01"}]))) == [0, 0]


async def test_window_edges_in_the_campaigns_zone(redis: Redis) -> None:
    morning = encode_hours(parse_hours([{"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"}]))
    # Monday 2026-06-01 in Shanghai (UTC+8): 06:59:59, 07:00, 10:29:59, 10:30 local
    instants = [utc_ms(2026, 5, 31, 22, 59, 59), utc_ms(2026, 5, 31, 23), utc_ms(2026, 6, 1, 2, 29, 59)]
    instants.append(utc_ms(2026, 6, 1, 2, 30))
    assert await both_inside(redis, table("Asia/Shanghai"), morning, instants) == [False, True, True, False]


async def test_across_midnight_and_24_00(redis: Redis) -> None:
    friday_night = encode_hours(parse_hours([{"days": [5], "start": "22:00", "end": "02:00"}]))
    # Shanghai local: Fri 2026-06-05 22:00, Sat 01:59, Sat 02:00, Fri 01:00, Fri 21:59
    local = [(6, 5, 22, 0), (6, 6, 1, 59), (6, 6, 2, 0), (6, 5, 1, 0), (6, 5, 21, 59)]
    instants = [utc_ms(2026, m, d, h, mi) - 8 * HOUR_MS for m, d, h, mi in local]
    assert await both_inside(redis, table("Asia/Shanghai"), friday_night, instants) == [True, True, False, False, False]
    evening = encode_hours(parse_hours([{"days": [1], "start": "20:00", "end": "24:00"}]))
    # New York (UTC-4 in June): Mon 2026-06-01 23:59:59 and Tue 00:00 local
    instants = [utc_ms(2026, 6, 2, 3, 59, 59), utc_ms(2026, 6, 2, 4)]
    assert await both_inside(redis, table("America/New_York"), evening, instants) == [True, False]


async def test_dst_changes_in_london(redis: Redis) -> None:
    london = table("Europe/London")
    spring = encode_hours(parse_hours([{"days": [7], "start": "01:30", "end": "02:30"}]))
    instants = [utc_ms(2026, 3, 29, 0, 59, 59), utc_ms(2026, 3, 29, 1), utc_ms(2026, 3, 29, 1, 29, 59)]
    instants.append(utc_ms(2026, 3, 29, 1, 30))
    assert await both_inside(redis, london, spring, instants) == [False, True, True, False]
    autumn = encode_hours(parse_hours([{"days": [7], "start": "01:00", "end": "02:00"}]))
    instants = [utc_ms(2026, 10, 24, 23, 59, 59), utc_ms(2026, 10, 25, 0), utc_ms(2026, 10, 25, 0, 59, 59)]
    instants += [utc_ms(2026, 10, 25, 1), utc_ms(2026, 10, 25, 1, 59, 59), utc_ms(2026, 10, 25, 2)]
    assert await both_inside(redis, london, autumn, instants) == [False, True, True, True, True, False]


# -- Lua == Python ----------------------------------------------------------------------------------------------

windows_strategy = st.lists(
    st.builds(
        HoursWindow,
        st.sets(st.integers(1, 7)).map(lambda days: tuple(sorted(days))),
        st.integers(0, 1439),
        st.integers(1, 1440),
    ),
    max_size=5,
)


def instants_strategy(tz: str, windows: list[HoursWindow]) -> st.SearchStrategy[int]:
    """Anywhere in 2026-2027, at or near an offset change, or within seconds of a window's edge."""
    changes = [int(entry.split(":")[0]) for entry in tz.split(",")[1:]]
    edges = sorted({m for w in windows for m in (w.start_min, w.end_min)}) or [0]

    def near_edge(day: int, minute: int, delta: int) -> int:
        local = day * DAY_MS + minute * 60_000
        return local - utc_offset_s(tz, local) * 1000 + delta

    anywhere = st.integers(FROM_MS, UNTIL_MS - 1)
    edge = st.builds(
        near_edge,
        st.integers(FROM_MS // DAY_MS, UNTIL_MS // DAY_MS - 1),
        st.sampled_from(edges),
        st.one_of(st.sampled_from([-1, 0, 1]), st.integers(-120_000, 120_000)),
    )
    if not changes:
        return st.one_of(anywhere, edge)
    deltas = st.one_of(st.sampled_from([-1, 0, 1]), st.integers(-2 * HOUR_MS, 2 * HOUR_MS))
    change = st.builds(int.__add__, st.sampled_from(changes), deltas)
    return st.one_of(anywhere, edge, change)


@settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(data=st.data())
async def test_lua_agrees_with_python(redis: Redis, data: st.DataObject) -> None:
    tz = table(data.draw(st.sampled_from(ZONES), label="zone"))
    windows = data.draw(windows_strategy, label="windows")
    instants = data.draw(st.lists(instants_strategy(tz, windows), min_size=1, max_size=40), label="instants")
    await both_inside(redis, tz, encode_hours(windows), instants)
