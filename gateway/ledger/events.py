"""Outbox entries as ledger rows. An entry that cannot be parsed is a poison entry: it goes to the dead-letter
stream, never silently away."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime

REQUIRED = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term")


class PoisonEntry(ValueError):
    """The entry is malformed; retrying cannot help."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One redemption as the ledger stores it; field order is the `redemptions` column order used by COPY."""

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

    def record(self) -> tuple[object, ...]:
        """The row as a COPY record."""
        return astuple(self)


COLUMNS = [f.name for f in fields(LedgerRow)]


def _coordinate(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def parse(entry_id: str, entry: Mapping[str, str]) -> LedgerRow:
    """The ledger row for one outbox entry; PoisonEntry when it is malformed."""
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
            latitude=_coordinate(entry.get("lat", "")),
            longitude=_coordinate(entry.get("lon", "")),
            accuracy_m=_coordinate(entry.get("acc", "")),
            redeemed_at=datetime.fromtimestamp(int(entry["at"]) / 1000, UTC),
            fingerprint=entry["fp"],
            idempotency_scope=entry.get("idem", ""),
            outbox_id=entry_id,
        )
    except (ValueError, OverflowError) as exc:
        raise PoisonEntry(f"malformed entry: {exc}") from None
