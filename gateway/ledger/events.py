"""Outbox entries as ledger rows. An entry that cannot be parsed is a poison entry: it goes to the dead-letter
stream, never silently away."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

# The outbox entry format: one field, "v2", holding these values joined by "|" (none of them can contain "|":
# ids are validated to [A-Za-z0-9._:-], the rest are hex, numbers or UUIDs). "v1" entries, written before
# authentication existed, lack the client and brand: they belonged to the default brand (migration 0003).
EVENT_FIELDS_V1 = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term", "dev", "lat",
                   "lon", "acc", "idem")  # fmt: skip
EVENT_FIELDS = (*EVENT_FIELDS_V1, "client", "brand")
VERSION_FIELD = "v2"
_FORMATS = {"v2": EVENT_FIELDS, "v1": EVENT_FIELDS_V1}
_V1_DEFAULTS = {"client": "", "brand": "1"}
REQUIRED = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term", "brand")


class PoisonEntry(ValueError):
    """The entry is malformed; retrying cannot help."""


class LedgerRow(NamedTuple):
    """One redemption as the ledger stores it; field order is the column order COPY uses. A tuple, so it is
    its own COPY record (dataclasses.astuple deep-copies every field: it dominated a profile of the writer)."""

    redemption_id: uuid.UUID
    code_ref: bytes
    key_id: str
    use_number: int
    campaign_id: int
    shard: int
    caller: str
    store_id: str
    terminal_id: str
    customer_device_id: str
    latitude: float | None
    longitude: float | None
    accuracy_m: float | None
    redeemed_at: datetime
    fingerprint: str
    idempotency_scope: str
    outbox_id: str
    client_id: str
    brand_id: int


COLUMNS = list(LedgerRow._fields)


def coordinate(text: str) -> float | None:
    """A latitude, longitude or accuracy; None when empty, ValueError when not a finite number."""
    if text == "":
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def encode_event(event: Mapping[str, str]) -> dict[str, str]:
    """The outbox entry fields for an event (as redeem.lua writes them)."""
    return {VERSION_FIELD: "|".join(event.get(name, "") for name in EVENT_FIELDS)}


def decode_event(fields: Mapping[str, str]) -> dict[str, str]:
    """The event held by an outbox entry (v2, or v1 from before brands); PoisonEntry when it is not in a known
    format."""
    for version, names in _FORMATS.items():
        packed = fields.get(version)
        if packed is not None:
            values = packed.split("|")
            if len(values) != len(names):
                raise PoisonEntry(f"expected {len(names)} values, found {len(values)}")
            return {**_V1_DEFAULTS, **dict(zip(names, values, strict=True))}
    raise PoisonEntry(f"unknown entry format (fields: {', '.join(sorted(fields))[:100]})")


def parse(entry_id: str, fields: Mapping[str, str]) -> LedgerRow:
    """The ledger row for one outbox entry; PoisonEntry when it is malformed."""
    entry = decode_event(fields)
    missing = [name for name in REQUIRED if not entry.get(name)]
    if missing:
        raise PoisonEntry(f"missing fields: {', '.join(missing)}")
    try:
        code_ref = bytes.fromhex(entry["ref"])
        if len(code_ref) != 32:
            raise ValueError("code_ref is not 32 bytes")
        return LedgerRow(
            redemption_id=uuid.UUID(entry["rid"]),
            code_ref=code_ref,
            key_id=entry["kid"],
            use_number=int(entry["use"]),
            campaign_id=int(entry["cid"]),
            shard=int(entry["shard"]),
            caller=entry["caller"],
            store_id=entry["store"],
            terminal_id=entry["term"],
            customer_device_id=entry.get("dev", ""),
            latitude=coordinate(entry.get("lat", "")),
            longitude=coordinate(entry.get("lon", "")),
            accuracy_m=coordinate(entry.get("acc", "")),
            redeemed_at=datetime.fromtimestamp(int(entry["at"]) / 1000, UTC),
            fingerprint=entry["fp"],
            idempotency_scope=entry.get("idem", ""),
            outbox_id=entry_id,
            client_id=entry["client"],
            brand_id=int(entry["brand"]),
        )
    except (ValueError, OverflowError) as exc:
        raise PoisonEntry(f"malformed entry: {exc}") from None
