"""The ledger in Postgres: one transaction per batch, COPY into a staging table, idempotent inserts.

A redelivered event (same redemption id) never becomes a second row. A *different* redemption id for a code use
already in the ledger is a double spend: it is recorded (it was acknowledged to a POS, so it happened) and raised
as an alarm row - never dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from gateway.ledger.events import COLUMNS, LedgerRow

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


@dataclass(frozen=True, slots=True)
class Alarm:
    """A double spend: two redemption ids for one code use."""

    code_ref: bytes
    use_number: int
    campaign_id: int
    first_redemption_id: uuid.UUID
    conflicting_redemption_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one batch did to the ledger."""

    inserted: int
    duplicates: int
    alarms: list[Alarm]


async def write_batch(conn: asyncpg.Connection, rows: Sequence[LedgerRow]) -> BatchResult:
    """Record rows (distinct redemption ids) in one transaction; safe to repeat."""
    await conn.execute(_STAGING)
    async with conn.transaction():
        await conn.copy_records_to_table("ledger_staging", records=rows, columns=COLUMNS)
        results = await conn.fetch(_INSERT)
        clashes = [r["redemption_id"] for r in results if not r["fresh"]]
        alarms = [Alarm(*a) for a in await conn.fetch(_ALARMS, clashes)] if clashes else []
    return BatchResult(inserted=len(results), duplicates=len(rows) - len(results), alarms=alarms)
