"""The Redis layout is defined once (gateway/campaigns/layout.py, gateway/script_calls.py): hold it against the
Lua sources, so a field added on one side only fails here rather than in production."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from gateway.campaigns import layout
from gateway.campaigns.model import Campaign
from gateway.campaigns.publish import meta_fields
from gateway.script_calls import ITEM_ARGS, SCRIPT_ARGS, SCRIPT_KEYS, load_lua

REDEEM = load_lua("redeem.lua")
REVERSE = load_lua("reverse.lua")


def _hmget(source: str, key: str) -> tuple[str, ...]:
    found = re.search(rf"redis\.call\('HMGET', {re.escape(key)}, ([^)]*)\)", source)
    assert found, key
    return tuple(re.findall(r"'([^']+)'", found.group(1)))


def _concat(source: str, first: str) -> tuple[str, ...]:
    found = re.search(rf"table\.concat\(\{{({re.escape(first)}, [^}}]*)\}}, '\|'\)", source, re.DOTALL)
    assert found, first
    return tuple(name.strip() for name in found.group(1).replace("\n", " ").split(","))


def test_the_meta_the_script_reads_is_the_layouts_and_the_publisher_writes_all_of_it() -> None:
    assert _hmget(REDEEM, "KEYS[1]") == layout.META
    campaign = Campaign(1, "c", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC), 1, 1, "k", 1)
    assert set(meta_fields(campaign)) == {*layout.META, *layout.META_PYTHON_ONLY}


def test_the_budget_and_code_fields_are_the_layouts() -> None:
    assert _hmget(REDEEM, "KEYS[4]") == layout.BUDGET
    assert _hmget(REDEEM, "code_key")[: len(layout.CODE)] == layout.CODE


def test_the_script_arguments_and_keys_are_defined_once() -> None:
    assert f"local NF = {len(ITEM_ARGS)}" in REDEEM
    assert f"local GLOBAL = {len(SCRIPT_ARGS)}" in REDEEM
    assert f"local HEAD = {len(SCRIPT_KEYS)}" in REDEEM
    for position, name in enumerate(SCRIPT_KEYS, start=1):
        assert re.search(rf"KEYS\[{position}\]\s+rgw:\{{c\.s\}}:{name}", REDEEM), name


def test_the_records_and_events_are_the_layouts() -> None:
    # the Lua variable names of the values differ from the layout's names only where noted
    lua_names = {"rid": "rid", "ref": "code.ref", "kid": "code.kid", "cid": "campaign", "use": "seq", "at": "now"}
    event = _concat(REDEEM, "rid, code.ref")
    assert event == tuple(lua_names.get(name, name) for name in layout.EVENT_V3)
    record = _concat(REDEEM, "rid, now, fp")
    assert record == tuple({"at": "now"}.get(name, name) for name in layout.USE_RECORD)
    assert _concat(REVERSE, "xid, now, reason") == ("xid", "now", "reason", "caller", "client")
    assert len(layout.REVERSAL_RECORD) == 5
    reversal = _concat(REVERSE, "xid, rid")
    assert len(reversal) == len(layout.REVERSAL_EVENT)
