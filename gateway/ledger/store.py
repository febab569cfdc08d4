"""The ledger in Postgres: one transaction per batch, COPY into a staging table, idempotent inserts.

A batch may mix redemptions, reversals, risk events (from the brands' risk-event streams) and inventory events
(from the SKU shards' outboxes); all kinds are
committed in the batch's one transaction, each through its own staging table, and a kind absent from the batch
costs nothing. Redemptions are written before reversals, so a redemption and its reversal in one batch both land.
A redelivered event (same redemption id; same reversal id; for a risk event, same brand and stream entry id)
never becomes a second row. A *different* redemption id for a code use already in the ledger is a double spend:
it is recorded (it was acknowledged to a POS, so it happened) and raised as an alarm row - never dropped. A
*different* reversal id for a redemption already reversed is a reversal alarm: the redemption stays reversed
once (reversals.redemption_id is UNIQUE), the second reversal becomes a reversal_alarms row. An inventory event
is recorded once (event_id); the secret uses a dispense or confirm gave its order become dispenses rows, once
each: a secret use the ledger holds for a *different* order becomes a dispense_alarms row, never a second row.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from gateway.ledger.events import COLUMNS, REVERSAL_COLUMNS, LedgerRow, ReversalRow
from gateway.ledger.inventory_events import DISPENSE_COLUMNS, EVENT_COLUMNS, DispenseRow, InventoryEntry
from gateway.ledger.risk_events import RISK_COLUMNS, RiskEventRow

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ledger_staging
    (LIKE redemptions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""

_COLUMN_LIST = ", ".join(COLUMNS)

# Column names come from the LedgerRow dataclass, never from input.
_INSERT = f"""
WITH new AS (
    INSERT INTO redemptions ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM ledger_staging
    ON CONFLICT (redemption_id) DO NOTHING
    RETURNING redemption_id, code_ref, use_number
), uses AS (
    INSERT INTO code_uses (code_ref, use_number, redemption_id)
    SELECT code_ref, use_number, redemption_id FROM new
    ON CONFLICT (code_ref, use_number) DO NOTHING
    RETURNING redemption_id
)
SELECT new.redemption_id, uses.redemption_id IS NOT NULL AS fresh
FROM new LEFT JOIN uses USING (redemption_id)"""  # noqa: S608

_ALARMS = """
INSERT INTO double_spend_alarms
    (code_ref, use_number, campaign_id, first_redemption_id, conflicting_redemption_id)
SELECT s.code_ref, s.use_number, s.campaign_id, cu.redemption_id, s.redemption_id
FROM ledger_staging s
JOIN code_uses cu ON cu.code_ref = s.code_ref AND cu.use_number = s.use_number
WHERE s.redemption_id = ANY($1::uuid[])
ON CONFLICT (conflicting_redemption_id) DO NOTHING
RETURNING code_ref, use_number, campaign_id, first_redemption_id, conflicting_redemption_id"""


_RISK_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS risk_staging
    (LIKE risk_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""

_RISK_COLUMN_LIST = ", ".join(RISK_COLUMNS)

# Column names come from the RiskEventRow tuple, never from input. recorded_at takes the table's default.
_RISK_INSERT = f"""
INSERT INTO risk_events ({_RISK_COLUMN_LIST})
SELECT {_RISK_COLUMN_LIST} FROM risk_staging
ON CONFLICT (brand_id, stream_id) DO NOTHING"""  # noqa: S608


_REVERSAL_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS reversal_staging
    (LIKE reversals INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""

_REVERSAL_COLUMN_LIST = ", ".join(REVERSAL_COLUMNS)

# No conflict target: a row is skipped when its reversal_id is recorded (a redelivery) AND when its redemption
# is reversed already under another id (left for _REVERSAL_ALARMS). Within one batch the first of two reversals of
# one redemption wins (DO NOTHING sees rows the same statement inserted). Column names come from ReversalRow.
_REVERSAL_INSERT = f"""
INSERT INTO reversals ({_REVERSAL_COLUMN_LIST})
SELECT {_REVERSAL_COLUMN_LIST} FROM reversal_staging
ON CONFLICT DO NOTHING"""  # noqa: S608

# Staged reversals of a redemption the ledger holds under another reversal id. Redelivered, an alarm is not
# raised twice (conflicting_reversal_id is UNIQUE); RETURNING gives only the new ones.
_REVERSAL_ALARMS = """
INSERT INTO reversal_alarms (redemption_id, first_reversal_id, conflicting_reversal_id)
SELECT s.redemption_id, r.reversal_id, s.reversal_id
FROM reversal_staging s
JOIN reversals r ON r.redemption_id = s.redemption_id AND r.reversal_id <> s.reversal_id
ON CONFLICT (conflicting_reversal_id) DO NOTHING
RETURNING redemption_id, first_reversal_id, conflicting_reversal_id"""


_INVENTORY_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS inventory_staging
    (LIKE inventory_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS dispense_staging
    (LIKE dispenses INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""

_EVENT_COLUMN_LIST = ", ".join(EVENT_COLUMNS)
_DISPENSE_COLUMN_LIST = ", ".join(DISPENSE_COLUMNS)

# Column names come from the row tuples, never from input. A redelivered event is skipped by its id.
_INVENTORY_INSERT = f"""
INSERT INTO inventory_events ({_EVENT_COLUMN_LIST})
SELECT {_EVENT_COLUMN_LIST} FROM inventory_staging
ON CONFLICT (event_id) DO NOTHING"""  # noqa: S608

# A secret use already recorded is skipped: for the same order a redelivery, for another order an alarm (below).
# Within one batch the first of two orders for one secret use wins (DO NOTHING sees rows the same statement
# inserted).
_DISPENSE_INSERT = f"""
INSERT INTO dispenses ({_DISPENSE_COLUMN_LIST})
SELECT {_DISPENSE_COLUMN_LIST} FROM dispense_staging
ON CONFLICT (secret_id, use_number) DO NOTHING"""  # noqa: S608

# Staged secret uses the ledger holds for another order. Redelivered, an alarm is not raised twice (UNIQUE);
# RETURNING gives only the new ones.
_DISPENSE_ALARMS = """
INSERT INTO dispense_alarms (secret_id, use_number, first_order_id, conflicting_order)
SELECT DISTINCT s.secret_id, s.use_number, d.order_id, s.order_id
FROM dispense_staging s
JOIN dispenses d ON d.secret_id = s.secret_id AND d.use_number = s.use_number AND d.order_id <> s.order_id
ON CONFLICT (secret_id, use_number, conflicting_order) DO NOTHING
RETURNING secret_id, use_number, first_order_id, conflicting_order"""


@dataclass(frozen=True, slots=True)
class Alarm:
    """A double spend: two redemption ids for one code use."""

    code_ref: bytes
    use_number: int
    campaign_id: int
    first_redemption_id: uuid.UUID
    conflicting_redemption_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ReversalAlarm:
    """Two reversal ids for one redemption: the first is the ledger's, the conflicting one an alarm."""

    redemption_id: uuid.UUID
    first_reversal_id: uuid.UUID
    conflicting_reversal_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ReversalResult:
    """What one batch's reversals did to the ledger."""

    inserted: int = 0
    duplicates: int = 0
    alarms: list[ReversalAlarm] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DispenseAlarm:
    """One secret use given to two orders: the ledger keeps the first; the conflicting order is the alarm."""

    secret_id: int
    use_number: int
    first_order_id: str
    conflicting_order: str


@dataclass(frozen=True, slots=True)
class InventoryResult:
    """What one batch's inventory events did to the ledger."""

    events_inserted: int = 0
    event_duplicates: int = 0
    dispenses_inserted: int = 0
    alarms: list[DispenseAlarm] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one batch did to the ledger."""

    inserted: int
    duplicates: int
    alarms: list[Alarm]
    risk_inserted: int = 0
    risk_duplicates: int = 0
    reversals: ReversalResult = field(default_factory=ReversalResult)
    inventory: InventoryResult = field(default_factory=InventoryResult)


async def write_batch(
    conn: asyncpg.Connection,
    rows: Sequence[LedgerRow],
    risk_rows: Sequence[RiskEventRow] = (),
    reversal_rows: Sequence[ReversalRow] = (),
    inventory: Sequence[InventoryEntry] = (),
) -> BatchResult:
    """Record redemptions (distinct redemption ids), then reversals (distinct reversal ids), risk events and
    inventory events (distinct outbox entries) in one transaction; safe to repeat."""
    kinds = ((_STAGING, rows), (_REVERSAL_STAGING, reversal_rows), (_RISK_STAGING, risk_rows),
             (_INVENTORY_STAGING, inventory))  # fmt: skip
    staging = [sql for sql, wanted in kinds if wanted]
    if staging:
        await conn.execute(";".join(staging))  # outside the transaction: created once per connection
    async with conn.transaction():
        result = await _write_redemptions(conn, rows) if rows else BatchResult(0, 0, [])
        reversals = await _write_reversals(conn, reversal_rows) if reversal_rows else ReversalResult()
        risk_inserted = await _write_risk_events(conn, risk_rows) if risk_rows else 0
        stock = await _write_inventory(conn, inventory) if inventory else InventoryResult()
    return BatchResult(result.inserted, result.duplicates, result.alarms, risk_inserted,
                       len(risk_rows) - risk_inserted, reversals, stock)  # fmt: skip


async def _write_redemptions(conn: asyncpg.Connection, rows: Sequence[LedgerRow]) -> BatchResult:
    await conn.copy_records_to_table("ledger_staging", records=rows, columns=COLUMNS)
    results = await conn.fetch(_INSERT)
    clashes = [r["redemption_id"] for r in results if not r["fresh"]]
    alarms = [Alarm(*a) for a in await conn.fetch(_ALARMS, clashes)] if clashes else []
    return BatchResult(inserted=len(results), duplicates=len(rows) - len(results), alarms=alarms)


async def _write_reversals(conn: asyncpg.Connection, rows: Sequence[ReversalRow]) -> ReversalResult:
    await conn.copy_records_to_table("reversal_staging", records=rows, columns=REVERSAL_COLUMNS)
    inserted = _row_count(await conn.execute(_REVERSAL_INSERT))
    # Everything staged was new: no alarm is possible, and the common batch pays no second statement.
    alarms = [] if inserted == len(rows) else [ReversalAlarm(*a) for a in await conn.fetch(_REVERSAL_ALARMS)]
    return ReversalResult(inserted, len(rows) - inserted - len(alarms), alarms)


async def _write_risk_events(conn: asyncpg.Connection, rows: Sequence[RiskEventRow]) -> int:
    """Newly recorded risk events; a redelivered entry (same brand and stream id) is skipped."""
    await conn.copy_records_to_table("risk_staging", records=rows, columns=RISK_COLUMNS)
    return _row_count(await conn.execute(_RISK_INSERT))


async def _write_inventory(conn: asyncpg.Connection, entries: Sequence[InventoryEntry]) -> InventoryResult:
    """Events by id, then their secret uses; alarms only when some staged use was not new (the common batch pays
    no third statement)."""
    await conn.copy_records_to_table("inventory_staging", records=[e.event for e in entries], columns=EVENT_COLUMNS)
    events = _row_count(await conn.execute(_INVENTORY_INSERT))
    uses: list[DispenseRow] = [use for entry in entries for use in entry.dispenses]
    if not uses:
        return InventoryResult(events, len(entries) - events)
    await conn.copy_records_to_table("dispense_staging", records=uses, columns=DISPENSE_COLUMNS)
    inserted = _row_count(await conn.execute(_DISPENSE_INSERT))
    alarms = [] if inserted == len(uses) else [DispenseAlarm(*a) for a in await conn.fetch(_DISPENSE_ALARMS)]
    return InventoryResult(events, len(entries) - events, inserted, alarms)


def _row_count(status: str) -> int:
    """The rows an INSERT command tag ("INSERT 0 <rows>") reports."""
    return int(status.rsplit(" ", 1)[1])
