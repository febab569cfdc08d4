"""Inventory outbox entries (field layout.EVENT_FORMAT, "i1") as ledger rows: one inventory_events row per entry
and, for a dispense or a confirm, one dispenses row per secret use it gave the order. An entry that cannot be
parsed is a poison entry: it goes to the dead-letter stream, never silently away.

An event carries its order's fingerprint, hold expiry, strategy and supplier in trailing fields (layout.EVENT); one
written before they were added (layout.EVENT_V1's length) still parses, with "" and no hold expiry for them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from gateway.inventory import layout
from gateway.ledger.events import PoisonEntry

EVENT_FIELDS = layout.EVENT
EVENT_FIELDS_V1 = layout.EVENT_V1
VERSION_FIELD = layout.EVENT_FORMAT
KINDS = frozenset(layout.EVENT_KINDS)
# The kinds whose secrets an order now owns for good: each secret use becomes a dispenses row.
DISPENSING = frozenset({"dispense", "confirm"})
_SUPPLIER = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_MAX_COST = 1_000_000_000_000
_REQUIRED = ("event_id", "kind", "brand", "sku", "shard", "order", "at")
_STRATEGY = re.compile(r"[a-z]{0,16}")
_MAX_FINGERPRINT = 128
_EPOCH = datetime.fromtimestamp(0, UTC)


class InventoryEventRow(NamedTuple):
    """One inventory event as inventory_events stores it (COPY column order; recorded_at is the default)."""

    event_id: uuid.UUID
    brand_id: int
    sku_id: int
    shard: int
    order_id: str
    kind: str
    secrets: str
    client_id: str
    at: datetime
    outbox_id: str
    fingerprint: str = ""  # the order's request fingerprint ("": an event from before it was carried)
    hold_expires_at: datetime | None = None  # the order's hold expiry (None: not a hold, or not carried)
    strategy: str = ""
    supplier: str = ""


class DispenseRow(NamedTuple):
    """One secret use given to an order, as dispenses stores it (COPY column order)."""

    secret_id: int
    use_number: int
    order_id: str
    brand_id: int
    sku_id: int
    supplier: str
    cost: int
    currency: str
    dispensed_at: datetime
    event_id: uuid.UUID


class InventoryEntry(NamedTuple):
    """What one i1 outbox entry becomes in the ledger."""

    event: InventoryEventRow
    dispenses: tuple[DispenseRow, ...]


class SecretUse(NamedTuple):
    """One element of an event's secrets: "<id>;<use>;<supplier>;<cost>;<currency>"."""

    secret_id: int
    use_number: int
    supplier: str
    cost: int
    currency: str


EVENT_COLUMNS = list(InventoryEventRow._fields)
DISPENSE_COLUMNS = list(DispenseRow._fields)


def is_inventory_entry(fields: Mapping[str, str]) -> bool:
    """Whether an outbox entry is an inventory event."""
    return VERSION_FIELD in fields


def encode_inventory_event(event: Mapping[str, str]) -> dict[str, str]:
    """The outbox entry fields for an inventory event (as the inventory script writes them; reconcile re-enqueues
    with it); missing values are empty, ValueError when a value contains "|"."""
    values = [event.get(name, "") for name in EVENT_FIELDS]
    if any("|" in value for value in values):
        raise ValueError("an inventory event value contains '|'")
    return {VERSION_FIELD: "|".join(values)}


def decode_inventory_event(fields: Mapping[str, str]) -> dict[str, str]:
    """The values of an i1 entry by name, every name of EVENT_FIELDS (the order's fields "" in an entry of
    EVENT_FIELDS_V1's length, written before they were carried); PoisonEntry when it is of neither length."""
    packed = fields.get(VERSION_FIELD)
    if packed is None:
        raise PoisonEntry(f"not an inventory event (fields: {', '.join(sorted(fields))[:100]})")
    values = packed.split("|")
    if len(values) not in (len(EVENT_FIELDS_V1), len(EVENT_FIELDS)):
        raise PoisonEntry(f"expected {len(EVENT_FIELDS)} (or {len(EVENT_FIELDS_V1)}) inventory event values, "
                          f"found {len(values)}")  # fmt: skip
    values += [""] * (len(EVENT_FIELDS) - len(values))
    return dict(zip(EVENT_FIELDS, values, strict=True))


def parse_secrets(text: str) -> list[SecretUse]:
    """The secret uses of an event's secrets value ("" = none); ValueError when malformed."""
    if not text:
        return []
    uses = []
    for item in text.split(","):
        parts = item.split(";")
        if len(parts) != 5:
            raise ValueError("a secret is not <id>;<use>;<supplier>;<cost>;<currency>")
        secret_id, use, supplier, cost, currency = parts
        uses.append(SecretUse(_bounded(secret_id, 1, 2**63), _bounded(use, 1, 2**31), _checked(_SUPPLIER, supplier),
                              _bounded(cost, 0, _MAX_COST + 1), _checked(_CURRENCY, currency)))  # fmt: skip
    return uses


def parse_inventory_event(entry_id: str, fields: Mapping[str, str]) -> InventoryEntry:
    """The ledger rows of one i1 entry; PoisonEntry when it is malformed."""
    event = decode_inventory_event(fields)
    missing = [name for name in _REQUIRED if not event[name]]
    if missing:
        raise PoisonEntry(f"missing inventory event fields: {', '.join(missing)}")
    if event["kind"] not in KINDS:
        raise PoisonEntry(f"unknown inventory event kind {event['kind'][:20]!r}")
    try:
        row = InventoryEventRow(
            event_id=uuid.UUID(event["event_id"]),
            brand_id=_bounded(event["brand"], 1, 2**63),
            sku_id=_bounded(event["sku"], 1, 2**63),
            shard=_bounded(event["shard"], 0, 2**31),
            order_id=event["order"],
            kind=event["kind"],
            secrets=event["secrets"],
            client_id=event["client"],
            at=datetime.fromtimestamp(int(event["at"]) / 1000, UTC),
            outbox_id=entry_id,
            fingerprint=_limited(event["order_fp"], _MAX_FINGERPRINT),
            hold_expires_at=_hold_expiry(event["order_exp"]),
            strategy=_checked(_STRATEGY, event["order_strat"]),
            supplier=_checked(_SUPPLIER, event["order_sup"]) if event["order_sup"] else "",
        )
        uses = parse_secrets(event["secrets"])
    except (ValueError, OverflowError, OSError) as exc:  # OSError: a timestamp beyond the platform's range
        raise PoisonEntry(f"malformed inventory event: {exc}") from None
    return InventoryEntry(row, _dispenses(row, uses) if row.kind in DISPENSING else ())


def _dispenses(row: InventoryEventRow, uses: list[SecretUse]) -> tuple[DispenseRow, ...]:
    return tuple(DispenseRow(u.secret_id, u.use_number, row.order_id, row.brand_id, row.sku_id, u.supplier, u.cost,
                             u.currency, row.at, row.event_id) for u in uses)  # fmt: skip


def _bounded(text: str, low: int, high: int) -> int:
    """An integer in [low, high): beyond a column's range COPY would reject the whole batch."""
    value = int(text)
    if not low <= value < high:
        raise ValueError(f"{text[:20]} out of range")
    return value


def _limited(text: str, most: int) -> str:
    if len(text) > most:
        raise ValueError(f"value longer than {most} characters")
    return text


def _hold_expiry(text: str) -> datetime | None:
    """The hold expiry of an event's ms ("" or 0: none); exact to the ms."""
    ms = _bounded(text, 0, 2**63) if text else 0
    return _EPOCH + timedelta(milliseconds=ms) if ms else None


def _checked(pattern: re.Pattern[str], text: str) -> str:
    if not pattern.fullmatch(text):
        raise ValueError(f"malformed value {text[:20]!r}")
    return text
