"""Risk-event stream entries as risk_events rows. Every risk denial and shadow hit is appended to the brand's
stream (risk/keys.py `events_key`), which is listed in the writer's directory like any outbox; an entry that
cannot be parsed is a poison entry and goes to the dead-letter stream beside it, never silently away."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

from gateway.ledger.events import PoisonEntry, coordinate

# The risk-event entry format: one field, "r1", holding these values joined by "|". The Lua scripts that append
# risk events follow this tuple; none of the values can contain "|" (ids are validated to [A-Za-z0-9._:-], rules,
# reasons, modes and kinds are fixed words, the rest are numbers). `campaign` is 0 when no campaign is known (an
# unknown code); `dev` and the location are empty when the request carried none; `scope` is "" for rules that
# have none, else "<scope>:<subject>" (e.g. "terminal:store-1/till-1").
RISK_EVENT_FIELDS = ("at", "brand", "campaign", "store", "term", "client", "dev", "rule", "reason", "mode", "scope",
                     "lat", "lon", "acc", "kind")  # fmt: skip
RISK_VERSION_FIELD = "r1"
MODES = frozenset({"enforce", "shadow"})
KINDS = frozenset({"redeem", "validate"})
_REQUIRED = ("at", "brand", "campaign", "rule", "mode", "kind")


class RiskEventRow(NamedTuple):
    """One risk event as risk_events stores it; field order is the column order COPY uses (a tuple, like
    LedgerRow, so it is its own COPY record). recorded_at is left to the table's default."""

    brand_id: int
    stream_id: str
    at: datetime
    campaign_id: int
    store_id: str
    terminal_id: str
    client_id: str
    customer_device_id: str
    rule: str
    reason: str
    mode: str
    scope: str
    latitude: float | None
    longitude: float | None
    accuracy_m: float | None
    kind: str


RISK_COLUMNS = list(RiskEventRow._fields)


def is_risk_entry(fields: Mapping[str, str]) -> bool:
    """Whether a stream entry is a risk event (rather than a redemption)."""
    return RISK_VERSION_FIELD in fields


def encode_risk_event(event: Mapping[str, str]) -> dict[str, str]:
    """The stream entry fields for a risk event (as the scripts write them); missing values are empty."""
    values = [event.get(name, "") for name in RISK_EVENT_FIELDS]
    if any("|" in value for value in values):
        raise ValueError("a risk event value contains '|'")
    return {RISK_VERSION_FIELD: "|".join(values)}


def decode_risk_event(fields: Mapping[str, str]) -> dict[str, str]:
    """The values of a risk-event entry by name; PoisonEntry when it is not an r1 entry of the right length."""
    packed = fields.get(RISK_VERSION_FIELD)
    if packed is None:
        raise PoisonEntry(f"not a risk event (fields: {', '.join(sorted(fields))[:100]})")
    values = packed.split("|")
    if len(values) != len(RISK_EVENT_FIELDS):
        raise PoisonEntry(f"expected {len(RISK_EVENT_FIELDS)} risk event values, found {len(values)}")
    return dict(zip(RISK_EVENT_FIELDS, values, strict=True))


def parse_risk_event(entry_id: str, fields: Mapping[str, str]) -> RiskEventRow:
    """The risk_events row for one stream entry; PoisonEntry when it is malformed."""
    event = decode_risk_event(fields)
    _check(event)
    try:
        return RiskEventRow(
            brand_id=_bigint(event["brand"], minimum=1),
            stream_id=entry_id,
            at=datetime.fromtimestamp(int(event["at"]) / 1000, UTC),
            campaign_id=_bigint(event["campaign"], minimum=0),
            store_id=event["store"],
            terminal_id=event["term"],
            client_id=event["client"],
            customer_device_id=event["dev"],
            rule=event["rule"],
            reason=event["reason"],
            mode=event["mode"],
            scope=event["scope"],
            latitude=coordinate(event["lat"]),
            longitude=coordinate(event["lon"]),
            accuracy_m=coordinate(event["acc"]),
            kind=event["kind"],
        )
    except (ValueError, OverflowError, OSError) as exc:  # OSError: a timestamp beyond the platform's range
        raise PoisonEntry(f"malformed risk event: {exc}") from None


def _bigint(text: str, *, minimum: int) -> int:
    value = int(text)
    if not minimum <= value < 2**63:  # beyond bigint, COPY would reject the whole batch
        raise ValueError(f"id {text[:20]} out of range")
    return value


def _check(event: Mapping[str, str]) -> None:
    """Reject here what the table's CHECKs would reject: a rejected batch costs a row-by-row retry."""
    missing = [name for name in _REQUIRED if not event[name]]
    if missing:
        raise PoisonEntry(f"missing risk event fields: {', '.join(missing)}")
    if event["mode"] not in MODES:
        raise PoisonEntry(f"unknown risk event mode {event['mode'][:20]!r}")
    if event["kind"] not in KINDS:
        raise PoisonEntry(f"unknown risk event kind {event['kind'][:20]!r}")
