"""The plan as the Lua scripts read it: valid JSON, keys named by their KEYS index (each key once), and the
cached parts of a plan never leaking from one attempt into another."""

from __future__ import annotations

import json

from gateway.risk_plan import ScriptKeys, encode, encode_code_part, encode_counters
from risk.model import (
    Assessment,
    CounterPlan,
    DeviceRules,
    Finding,
    Lockout,
    Mode,
    Reason,
    Rule,
    Scope,
    Travel,
    Window,
)

TERMINAL = Window(Rule.RATE_LIMIT, Scope.TERMINAL, "s/t", "w:terminal", 120, 60_000, Mode.ENFORCE, quota=True)
CODE = Window(Rule.CODE_VELOCITY, Scope.CODE, "ab" * 32, "w:code", 30, 60_000, Mode.SHADOW, quota=False)
LOCK = Lockout(Scope.TERMINAL, "s/t", "lock:t", "fail:t", 10, 600_000, 900_000, Mode.ENFORCE)
PLAN = CounterPlan(
    windows=(TERMINAL, CODE), lockouts=(LOCK,), travel=Travel("t:dev", 250.0, 31.2, 121.4, 86_400_000, Mode.ENFORCE),
    device=DeviceRules(Mode.ENFORCE, 3, Mode.SHADOW), events_key="events",
)  # fmt: skip


def test_the_whole_plan_names_each_key_by_its_index_after_the_keys_already_there() -> None:
    keys = ["meta", "outbox", "code"]
    plan = json.loads(encode(Assessment(None, (), PLAN), "dev:key", ScriptKeys(keys)))
    assert keys == ["meta", "outbox", "code", "events", "w:terminal", "w:code", "lock:t", "fail:t", "t:dev",
                    "dev:key"]  # fmt: skip
    assert plan == {
        "e": 4,
        "w": [[5, 120, 60_000, "E", "rate_limit", "RATE_LIMITED", 1, "terminal:s/t"],
              [6, 30, 60_000, "S", "code_velocity", "CODE_VELOCITY", 0, "code:" + "ab" * 6]],
        "l": [[7, 8, 10, 600_000, 900_000, "E", "terminal:s/t"]],
        "t": [9, 250.0, 86_400_000, "E"],
        "d": ["E", 3, "S", 10],
    }  # fmt: skip


def test_a_key_shared_by_two_items_is_passed_once() -> None:
    keys: list[str] = []
    table = ScriptKeys(keys)
    first = json.loads(encode_counters(Assessment(None, (), PLAN), table))
    second = json.loads(encode_counters(Assessment(None, (), PLAN), table))
    assert first == second and len(keys) == len(set(keys)) == 6


def test_an_in_process_denial_carries_only_what_records_it() -> None:
    denial = Finding(Rule.STORE_GEOFENCE, Reason.OUTSIDE_STORE_RADIUS, Mode.ENFORCE)
    shadow = Finding(Rule.CAMPAIGN_REGION, Reason.OUTSIDE_CAMPAIGN_REGION, Mode.SHADOW)
    plan = json.loads(encode(Assessment(denial, (shadow,), PLAN), "dev:key", ScriptKeys([])))
    assert plan == {"e": 1, "s": [["campaign_region", "OUTSIDE_CAMPAIGN_REGION", ""]],
                    "x": ["store_geofence", "OUTSIDE_STORE_RADIUS", ""]}  # fmt: skip


def test_the_code_part_records_into_the_outbox_and_carries_the_device_rules() -> None:
    keys = ["meta", "outbox"]
    plan = json.loads(encode_code_part(Assessment(None, (), PLAN), "dev:key", ScriptKeys(keys), "outbox"))
    assert plan == {"e": 2, "d": ["E", 3, "S", 3]} and keys == ["meta", "outbox", "dev:key"]


def test_no_engine_is_an_empty_argument() -> None:
    assert encode(None, "", ScriptKeys([])) == ""
