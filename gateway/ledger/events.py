"""Outbox entries as ledger rows: redemption events (redemptions) and reversal events (reversals). An entry that
cannot be parsed is a poison entry: it goes to the dead-letter stream, never silently away."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

from gateway.campaigns import layout

# A redemption event: one field, "v3", holding the values of layout.EVENT_V3 joined by "|" (none of them can
# contain "|": ids are validated to [A-Za-z0-9._:-], the rest are hex, numbers or UUIDs). Older formats are still
# read: "v2" lacks the face value (0: nothing was counted against a value budget), "v1", written before
# authentication existed, also lacks the client and brand (it belonged to the default brand, migration 0003).
EVENT_FIELDS_V1 = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term", "dev", "lat",
                   "lon", "acc", "idem")  # fmt: skip
EVENT_FIELDS_V2 = (*EVENT_FIELDS_V1, "client", "brand")
EVENT_FIELDS = layout.EVENT_V3
VERSION_FIELD = "v3"
FORMATS = {"v3": EVENT_FIELDS, "v2": EVENT_FIELDS_V2, "v1": EVENT_FIELDS_V1}  # redemption events, newest first
_OLD_DEFAULTS = {"client": "", "brand": "1", "fv": "0"}
REQUIRED = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term", "brand")

# A reversal event: one field, layout.REVERSAL_FORMAT ("x1"), holding the values of layout.REVERSAL_EVENT.
REVERSAL_FIELDS = layout.REVERSAL_EVENT
REVERSAL_VERSION_FIELD = layout.REVERSAL_FORMAT
REVERSAL_REQUIRED = ("xid", "rid", "ref", "kid", "cid", "shard", "use", "at", "caller", "brand")


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
    face_value: int


COLUMNS = list(LedgerRow._fields)


class ReversalRow(NamedTuple):
    """One reversal as the `reversals` table stores it (column order for COPY; recorded_at is the default)."""

    reversal_id: uuid.UUID
    redemption_id: uuid.UUID
    code_ref: bytes
    key_id: str
    use_number: int
    campaign_id: int
    shard: int
    face_value: int
    reason: str
    caller: str
    client_id: str
    brand_id: int
    reversed_at: datetime
    idempotency_scope: str
    fingerprint: str
    outbox_id: str


REVERSAL_COLUMNS = list(ReversalRow._fields)


def coordinate(text: str) -> float | None:
    """A latitude, longitude or accuracy; None when empty, ValueError when not a finite number."""
    if text == "":
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _face_value(text: str) -> int:
    value = int(text or 0)
    if value < 0:
        raise ValueError("negative face value")
    return value


def _code_ref(text: str) -> bytes:
    code_ref = bytes.fromhex(text)
    if len(code_ref) != 32:
        raise ValueError("code_ref is not 32 bytes")
    return code_ref


def _moment(ms: str) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


def _packed(names: tuple[str, ...], event: Mapping[str, str]) -> str:
    values = [event.get(name, "") for name in names]
    if any("|" in value for value in values):
        raise ValueError("an event value contains '|'")
    return "|".join(values)


def encode_event(event: Mapping[str, str]) -> dict[str, str]:
    """The outbox entry fields for a redemption event (as the redeem script writes them)."""
    return {VERSION_FIELD: _packed(EVENT_FIELDS, event)}


def decode_event(fields: Mapping[str, str]) -> dict[str, str]:
    """The redemption event held by an outbox entry (v3, v2 or v1); PoisonEntry when it is not in a known format
    (a reversal event included: see decode_reversal_event)."""
    for version, names in FORMATS.items():
        packed = fields.get(version)
        if packed is not None:
            values = packed.split("|")
            if len(values) != len(names):
                raise PoisonEntry(f"expected {len(names)} values, found {len(values)}")
            return {**_OLD_DEFAULTS, **dict(zip(names, values, strict=True))}
    raise PoisonEntry(f"unknown entry format (fields: {', '.join(sorted(fields))[:100]})")


def parse(entry_id: str, fields: Mapping[str, str]) -> LedgerRow:
    """The ledger row for one redemption entry; PoisonEntry when it is malformed."""
    entry = decode_event(fields)
    missing = [name for name in REQUIRED if not entry.get(name)]
    if missing:
        raise PoisonEntry(f"missing fields: {', '.join(missing)}")
    try:
        return LedgerRow(
            redemption_id=uuid.UUID(entry["rid"]),
            code_ref=_code_ref(entry["ref"]),
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
            redeemed_at=_moment(entry["at"]),
            fingerprint=entry["fp"],
            idempotency_scope=entry.get("idem", ""),
            outbox_id=entry_id,
            client_id=entry["client"],
            brand_id=int(entry["brand"]),
            face_value=_face_value(entry["fv"]),
        )
    except (ValueError, OverflowError) as exc:
        raise PoisonEntry(f"malformed entry: {exc}") from None


def is_reversal_entry(fields: Mapping[str, str]) -> bool:
    """Whether an outbox entry is a reversal event (rather than a redemption)."""
    return REVERSAL_VERSION_FIELD in fields


def encode_reversal_event(event: Mapping[str, str]) -> dict[str, str]:
    """The outbox entry fields for a reversal event (as the reverse script writes them; reconcile re-enqueues
    with it); missing values are empty, ValueError when a value contains "|"."""
    return {REVERSAL_VERSION_FIELD: _packed(REVERSAL_FIELDS, event)}


def decode_reversal_event(fields: Mapping[str, str]) -> dict[str, str]:
    """The reversal event held by an outbox entry; PoisonEntry when it is not one or has the wrong shape."""
    packed = fields.get(REVERSAL_VERSION_FIELD)
    if packed is None:
        raise PoisonEntry(f"not a reversal event (fields: {', '.join(sorted(fields))[:100]})")
    values = packed.split("|")
    if len(values) != len(REVERSAL_FIELDS):
        raise PoisonEntry(f"expected {len(REVERSAL_FIELDS)} reversal values, found {len(values)}")
    return dict(zip(REVERSAL_FIELDS, values, strict=True))


def parse_reversal(entry_id: str, fields: Mapping[str, str]) -> ReversalRow:
    """The reversals row for one reversal entry; PoisonEntry when it is malformed."""
    entry = decode_reversal_event(fields)
    missing = [name for name in REVERSAL_REQUIRED if not entry[name]]
    if missing:
        raise PoisonEntry(f"missing fields: {', '.join(missing)}")
    try:
        return ReversalRow(
            reversal_id=uuid.UUID(entry["xid"]),
            redemption_id=uuid.UUID(entry["rid"]),
            code_ref=_code_ref(entry["ref"]),
            key_id=entry["kid"],
            use_number=int(entry["use"]),
            campaign_id=int(entry["cid"]),
            shard=int(entry["shard"]),
            face_value=_face_value(entry["fv"]),
            reason=entry["reason"],
            caller=entry["caller"],
            client_id=entry["client"],
            brand_id=int(entry["brand"]),
            reversed_at=_moment(entry["at"]),
            idempotency_scope=entry["idem"],
            fingerprint=entry["fp"],
            outbox_id=entry_id,
        )
    except (ValueError, OverflowError) as exc:
        raise PoisonEntry(f"malformed reversal entry: {exc}") from None
