"""lua/inventory.lua against the layout defined once in Python (gateway/inventory/layout.py, store.py)."""

from __future__ import annotations

import re

from gateway.inventory import layout
from gateway.inventory.store import SCRIPT_ARGS, SCRIPT_KEYS
from gateway.script_calls import load_lua

SCRIPT = load_lua("inventory.lua")


def test_the_keys_and_arguments_are_the_stores() -> None:
    for position, name in enumerate(SCRIPT_KEYS, start=1):
        assert re.search(rf"KEYS\[{position}\]\s+rgw:\{{k\.s\}}:{name}", SCRIPT), name
    assert f"ARGV[{len(SCRIPT_ARGS)}]" in SCRIPT
    assert f"ARGV[{len(SCRIPT_ARGS) + 1}]" not in SCRIPT


def test_the_order_fields_and_the_event_are_the_layouts() -> None:
    found = re.search(r"redis\.call\('HMGET', order_key, ([^)]*)\)", SCRIPT)
    assert found
    assert set(re.findall(r"'([^']+)'", found.group(1))) <= set(layout.ORDER)
    event = re.search(r"local event = \{event_id\(\), ([^}]*)\}", SCRIPT)
    assert event
    lua_names = {"secrets": "secrets_", "at": "now", "client": "who"}
    names = ("event_id", *(name.strip() for name in event.group(1).split(",")))
    assert names == tuple(lua_names.get(name, name) for name in layout.EVENT)
    assert all(f"'{state}'" in SCRIPT for state in layout.ORDER_STATES)
    assert all(f"'{kind}'" in SCRIPT for kind in layout.EVENT_KINDS)
