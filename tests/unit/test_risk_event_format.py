"""The risk-event entry format (r1): what the scripts write is what the writer parses, and a malformed entry is a
poison entry, never a row."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.ledger.events import PoisonEntry, decode_event
from gateway.ledger.risk_events import (
    RISK_COLUMNS,
    RISK_EVENT_FIELDS,
    RISK_VERSION_FIELD,
    decode_risk_event,
    encode_risk_event,
    is_risk_entry,
    parse_risk_event,
)

EVENT = {
    "at": "1795000000123", "brand": "7", "campaign": "42", "store": "store-1", "term": "till-1", "client": "cl_abc",
    "dev": "dev-9", "rule": "lockout", "reason": "LOCKED_OUT", "mode": "enforce", "scope": "terminal:store-1/till-1",
    "lat": "31.2304", "lon": "121.4737", "acc": "12.5", "kind": "redeem",
}  # fmt: skip


def test_the_format_is_one_field_of_fifteen_values_in_a_fixed_order() -> None:
    assert RISK_VERSION_FIELD == "r1"
    assert RISK_EVENT_FIELDS == ("at", "brand", "campaign", "store", "term", "client", "dev", "rule", "reason",
                                 "mode", "scope", "lat", "lon", "acc", "kind")  # fmt: skip
    fields = encode_risk_event(EVENT)
    assert list(fields) == ["r1"]
    assert fields["r1"] == (
        "1795000000123|7|42|store-1|till-1|cl_abc|dev-9|lockout|LOCKED_OUT|enforce|terminal:store-1/till-1"
        "|31.2304|121.4737|12.5|redeem"
    )


def test_round_trip() -> None:
    fields = encode_risk_event(EVENT)
    assert is_risk_entry(fields)
    assert decode_risk_event(fields) == EVENT
    row = parse_risk_event("1795000000123-0", fields)
    assert row.brand_id == 7 and row.stream_id == "1795000000123-0" and row.campaign_id == 42
    assert row.at == datetime(2026, 11, 18, 11, 6, 40, 123000, tzinfo=UTC)
    assert (row.store_id, row.terminal_id, row.client_id, row.customer_device_id) == (
        "store-1", "till-1", "cl_abc", "dev-9",
    )  # fmt: skip
    assert (row.rule, row.reason, row.mode, row.scope, row.kind) == (
        "lockout", "LOCKED_OUT", "enforce", "terminal:store-1/till-1", "redeem",
    )  # fmt: skip
    assert (row.latitude, row.longitude, row.accuracy_m) == (31.2304, 121.4737, 12.5)


def test_the_row_is_its_own_copy_record_in_column_order() -> None:
    row = parse_risk_event("1-0", encode_risk_event(EVENT))
    assert RISK_COLUMNS[:2] == ["brand_id", "stream_id"] and "recorded_at" not in RISK_COLUMNS
    assert tuple(row) == tuple(getattr(row, column) for column in RISK_COLUMNS)


def test_empty_optional_values() -> None:
    minimal = {**EVENT, "campaign": "0", "dev": "", "scope": "", "lat": "", "lon": "", "acc": "", "reason": "",
               "mode": "shadow", "kind": "validate"}  # fmt: skip
    row = parse_risk_event("1-0", encode_risk_event(minimal))
    assert row.campaign_id == 0 and row.customer_device_id == "" and row.scope == "" and row.reason == ""
    assert (row.latitude, row.longitude, row.accuracy_m) == (None, None, None)
    assert (row.mode, row.kind) == ("shadow", "validate")


def test_redemption_entries_are_not_risk_entries() -> None:
    assert not is_risk_entry({"v2": "a|b"}) and not is_risk_entry({"v1": "a|b"})


def test_readers_of_redemption_events_see_a_risk_event_as_not_theirs() -> None:
    """reconcile and the test helpers decode redemption events and skip PoisonEntry: a risk event is skipped."""
    with pytest.raises(PoisonEntry, match="unknown entry format"):
        decode_event(encode_risk_event(EVENT))


def test_a_value_with_the_separator_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match=r"'\|'"):
        encode_risk_event({**EVENT, "store": "a|b"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"at": ""}, "missing risk event fields: at"),
        ({"brand": ""}, "missing"),
        ({"rule": ""}, "missing"),
        ({"at": "soon"}, "malformed"),
        ({"at": "9" * 30}, "malformed"),
        ({"brand": "0"}, "malformed"),
        ({"brand": "seven"}, "malformed"),
        ({"campaign": "-1"}, "malformed"),
        ({"campaign": str(2**63)}, "malformed"),
        ({"lat": "north"}, "malformed"),
        ({"lon": "nan"}, "malformed"),
        ({"acc": "inf"}, "malformed"),
        ({"mode": "off"}, "unknown risk event mode"),
        ({"kind": "issue"}, "unknown risk event kind"),
    ],
)
def test_malformed_values_are_poison(change: dict[str, str], message: str) -> None:
    with pytest.raises(PoisonEntry, match=message):
        parse_risk_event("1-0", encode_risk_event({**EVENT, **change}))


@pytest.mark.parametrize(
    "fields",
    [
        {"r1": "1|2|3"},
        {"r1": encode_risk_event(EVENT)["r1"] + "|extra"},
        {"r1": ""},
        {"v2": "not|a|risk|event"},
        {},
    ],
)
def test_wrong_shapes_are_poison(fields: dict[str, str]) -> None:
    with pytest.raises(PoisonEntry):
        parse_risk_event("1-0", fields)
