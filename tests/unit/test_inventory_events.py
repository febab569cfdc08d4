"""i1 inventory outbox entries as ledger rows: every field (the order's own fields too, and an entry written before
they were carried), dispenses only for dispense and confirm, poison."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from gateway.inventory import layout
from gateway.ledger.events import PoisonEntry
from gateway.ledger.inventory_events import (
    decode_inventory_event,
    encode_inventory_event,
    is_inventory_entry,
    parse_inventory_event,
)

EID = "0190a4b2-0000-7000-8000-000000000001"
FP = "0123456789abcdef0123456789abcdef"


def fields(**changes: str) -> dict[str, str]:
    values = {"event_id": EID, "kind": "dispense", "brand": "3", "sku": "7", "shard": "1", "order": "ord-1",
              "secrets": "11;1;sup-a;500;CNY,12;2;sup.b:x;0;USD", "at": "1780272000123", "client": "cl_i",
              "order_fp": FP, "order_exp": "1780272900123", "order_strat": "supplier",
              "order_sup": "sup.b:x"}  # fmt: skip
    return encode_inventory_event({**values, **changes})


def old_fields(**changes: str) -> dict[str, str]:
    """An entry as gateways wrote it before the order's fields were carried (layout.EVENT_V1)."""
    packed = fields(**changes)[layout.EVENT_FORMAT].split("|")[: len(layout.EVENT_V1)]
    return {layout.EVENT_FORMAT: "|".join(packed)}


def test_the_format_follows_the_layout() -> None:
    entry = fields()
    assert list(entry) == [layout.EVENT_FORMAT]
    assert entry[layout.EVENT_FORMAT].count("|") == len(layout.EVENT) - 1
    assert is_inventory_entry(entry) and not is_inventory_entry({"v3": "x"})
    assert decode_inventory_event(entry)["order"] == "ord-1"


def test_a_dispense_becomes_an_event_and_a_row_per_secret_use() -> None:
    parsed = parse_inventory_event("5-0", fields())
    event = parsed.event
    assert (event.event_id, event.brand_id, event.sku_id, event.shard) == (uuid.UUID(EID), 3, 7, 1)
    assert (event.order_id, event.kind, event.client_id, event.outbox_id) == ("ord-1", "dispense", "cl_i", "5-0")
    assert event.secrets == "11;1;sup-a;500;CNY,12;2;sup.b:x;0;USD"
    assert int(event.at.timestamp() * 1000) == 1780272000123
    assert [(d.secret_id, d.use_number, d.supplier, d.cost, d.currency) for d in parsed.dispenses] == [
        (11, 1, "sup-a", 500, "CNY"), (12, 2, "sup.b:x", 0, "USD")]  # fmt: skip
    assert {(d.order_id, d.brand_id, d.sku_id, d.event_id, d.dispensed_at) for d in parsed.dispenses} == {
        ("ord-1", 3, 7, uuid.UUID(EID), event.at)}  # fmt: skip


@pytest.mark.parametrize("kind", ["confirm", "dispense"])
def test_confirm_and_dispense_give_secrets(kind: str) -> None:
    assert len(parse_inventory_event("1-0", fields(kind=kind)).dispenses) == 2


@pytest.mark.parametrize("kind", ["hold", "release", "expire"])
def test_other_kinds_are_events_only(kind: str) -> None:
    parsed = parse_inventory_event("1-0", fields(kind=kind))
    assert parsed.event.kind == kind and parsed.dispenses == ()


def test_every_event_carries_the_orders_fields() -> None:
    assert layout.EVENT[: len(layout.EVENT_V1)] == layout.EVENT_V1  # appended: older entries are a prefix
    event = parse_inventory_event("1-0", fields(kind="expire")).event
    assert (event.fingerprint, event.strategy, event.supplier) == (FP, "supplier", "sup.b:x")
    assert event.hold_expires_at == datetime(2026, 6, 1, 0, 15, 0, 123_000, tzinfo=UTC)  # to the ms
    assert event.hold_expires_at is not None and int(event.hold_expires_at.timestamp() * 1000) == 1780272900123


def test_a_dispense_has_no_hold_expiry() -> None:
    event = parse_inventory_event("1-0", fields(order_exp="0", order_strat="expiry", order_sup="")).event
    assert (event.hold_expires_at, event.strategy, event.supplier) == (None, "expiry", "")


@pytest.mark.parametrize("kind", ["dispense", "hold", "confirm", "release", "expire"])
def test_an_entry_written_before_the_orders_fields_still_parses(kind: str) -> None:
    old = old_fields(kind=kind)
    assert old[layout.EVENT_FORMAT].count("|") == len(layout.EVENT_V1) - 1
    assert decode_inventory_event(old)["order_fp"] == ""
    parsed = parse_inventory_event("1-0", old)
    new = parse_inventory_event("1-0", fields(kind=kind))
    assert parsed.event == new.event._replace(fingerprint="", hold_expires_at=None, strategy="", supplier="")
    assert parsed.dispenses == new.dispenses
    assert (parsed.event.fingerprint, parsed.event.hold_expires_at, parsed.event.strategy) == ("", None, "")


def test_an_event_without_secrets_is_allowed() -> None:
    assert parse_inventory_event("1-0", fields(kind="release", secrets="")).dispenses == ()


@pytest.mark.parametrize(
    "bad",
    [
        {layout.EVENT_FORMAT: "too|few"},
        fields(kind="steal"),
        fields(event_id="not-a-uuid"),
        fields(order=""),
        fields(brand="0"),
        fields(sku="99999999999999999999"),
        fields(shard="-1"),
        fields(at="soon"),
        fields(at="99999999999999999999"),
        fields(secrets="11;1;sup-a;500"),
        fields(secrets="11;0;sup-a;500;CNY"),
        fields(secrets="11;1;sup a;500;CNY"),
        fields(secrets="11;1;sup-a;-5;CNY"),
        fields(secrets="11;1;sup-a;5;cny"),
        fields(secrets="x;1;sup-a;5;CNY"),
        {layout.EVENT_FORMAT: fields()[layout.EVENT_FORMAT] + "|extra"},
        {layout.EVENT_FORMAT: "|".join(fields()[layout.EVENT_FORMAT].split("|")[:-1])},
        fields(order_exp="soon"),
        fields(order_exp="-1"),
        fields(order_exp="99999999999999999999"),
        fields(order_strat="Cost!"),
        fields(order_sup="sup a"),
        fields(order_fp="f" * 129),
    ],
)
def test_malformed_entries_are_poison(bad: dict[str, str]) -> None:
    with pytest.raises(PoisonEntry):
        parse_inventory_event("1-0", bad)


def test_a_value_with_the_separator_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="contains"):
        encode_inventory_event({"order": "a|b"})
