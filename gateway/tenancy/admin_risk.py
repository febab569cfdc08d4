"""Administration of risk policies: one JSON document per brand (campaign 0: brand-wide) and per campaign of the
brand, validated by `risk.policy.parse_document` and stored normalised as registry data (migration 0005), so every
gateway process applies a change within seconds, like any other registry change (admin_tx.py).

A campaign id that is not a campaign of the brand is NotFoundError, exactly like a missing one. Clearing a policy
stores the empty document: rows are never deleted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.tenancy.admin_tx import Committed, audit_row, change
from gateway.tenancy.loader import RISK_POLICIES
from gateway.tenancy.model import BRAND_WIDE, NotFoundError, RiskPolicyRow
from gateway.validation import FieldViolation, InvalidRequest
from risk import policy

DOCUMENT_FIELD = "document"

_SELECT = f"""SELECT {RISK_POLICIES.columns} FROM risk_policies
              WHERE brand_id = $1 AND campaign_id = ANY($2::bigint[])"""  # noqa: S608 - constants only
_LOCK = f"""SELECT {RISK_POLICIES.columns} FROM risk_policies
            WHERE brand_id = $1 AND campaign_id = $2 FOR UPDATE"""  # noqa: S608 - constants only
_UPSERT = f"""
INSERT INTO risk_policies (brand_id, campaign_id, document, row_version) VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (brand_id, campaign_id) DO UPDATE SET document = EXCLUDED.document, row_version = EXCLUDED.row_version
RETURNING {RISK_POLICIES.columns}"""  # noqa: S608 - constants only
_BRAND = "SELECT 1 FROM brands WHERE id = $1"
_CAMPAIGN_OF_BRAND = "SELECT 1 FROM campaigns WHERE id = $1 AND brand_id = $2"


@dataclass(frozen=True, slots=True)
class PolicyLevels:
    """The stored document of one level, and every level that applies to it (brand-wide, and the campaign's when
    it is one) keyed as `Registry.risk_policies` is, for the effective merge."""

    stored: RiskPolicyRow
    levels: Mapping[tuple[int, int], Mapping[str, Any]]


def _document_field(path: str) -> str:
    """A violation's path inside the document as a field name: `document`, `document.modes.lockout`."""
    if not path:
        return DOCUMENT_FIELD
    return f"{DOCUMENT_FIELD}{path}" if path.startswith("[") else f"{DOCUMENT_FIELD}.{path}"


def normalise(document: object) -> dict[str, Any]:
    """The document as risk.policy validates and normalises it; InvalidRequest naming every violation. The empty
    document (which clears a policy) stays empty."""
    try:
        return policy.parse_document(document)
    except policy.PolicyError as exc:
        raise InvalidRequest([FieldViolation(_document_field(path), text) for path, text in exc.violations]) from None


async def _check_level(conn: asyncpg.Connection, brand_id: int, campaign_id: int) -> None:
    """NotFoundError unless the brand exists and campaign_id is 0 or one of its campaigns."""
    if await conn.fetchval(_BRAND, brand_id) is None:
        raise NotFoundError("no such brand")
    if campaign_id == BRAND_WIDE:
        return
    if campaign_id < 0 or await conn.fetchval(_CAMPAIGN_OF_BRAND, campaign_id, brand_id) is None:
        raise NotFoundError("no such campaign")


def _audit_state(row: RiskPolicyRow) -> str:
    return json.dumps({"brand_id": row.brand_id, "campaign_id": row.campaign_id, "document": row.document})


async def set_risk_policy(
    conn: asyncpg.Connection, *, actor: str, brand_id: int, campaign_id: int, document: object
) -> Committed[RiskPolicyRow]:
    """Store the brand's (campaign_id 0) or one of its campaigns' risk policy, normalised; `{}` clears it."""
    normalised = normalise(document)
    async with change(conn) as version:
        await _check_level(conn, brand_id, campaign_id)
        found = await conn.fetchrow(_LOCK, brand_id, campaign_id)
        before = None if found is None else _audit_state(RISK_POLICIES.row(found))
        after = RISK_POLICIES.row(await conn.fetchrow(_UPSERT, brand_id, campaign_id, json.dumps(normalised), version))
        await audit_row(
            conn, version, actor=actor, brand_id=brand_id, action="risk_policy.set",
            entity_id=f"{brand_id}/{campaign_id}", before=before, after=_audit_state(after),
        )  # fmt: skip
    return Committed(after, version)


async def get_risk_policy(conn: asyncpg.Connection, *, brand_id: int, campaign_id: int) -> PolicyLevels:
    """The stored document of the brand (campaign_id 0) or of one of its campaigns (`{}` when none is set), with
    the levels it merges with."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await _check_level(conn, brand_id, campaign_id)
        rows = [RISK_POLICIES.row(r) for r in await conn.fetch(_SELECT, brand_id, [BRAND_WIDE, campaign_id])]
    levels = {(row.brand_id, row.campaign_id): row.document for row in rows if row.document}
    stored = levels.get((brand_id, campaign_id), {})
    return PolicyLevels(RiskPolicyRow(brand_id, campaign_id, stored), levels)


def _regions(levels: PolicyLevels) -> list[Any]:
    """The regions in effect: those of the campaign's document if it has them, else the brand's (risk.policy)."""
    brand_id, campaign_id = levels.stored.brand_id, levels.stored.campaign_id
    for key in ((brand_id, campaign_id), (brand_id, BRAND_WIDE)):
        if "regions" in levels.levels.get(key, {}):
            return list(levels.levels[key]["regions"])
    return []


def _rendered(resolved: policy.Policy, regions: list[Any]) -> dict[str, Any]:
    """A resolved policy in the vocabulary of a policy document: every section, every value set."""
    return {
        "modes": {str(rule): str(mode) for rule, mode in resolved.modes.items()},
        "failure": {str(rule): str(failure) for rule, failure in resolved.failure.items()},
        "limits": {
            str(scope): {"limit": spec.limit, "window_s": spec.window_ms // 1000}
            for scope, spec in resolved.limits.items()
        },
        "lockout": {
            str(scope): {"threshold": s.threshold, "window_s": s.window_ms // 1000, "cooldown_s": s.cooldown_ms // 1000}
            for scope, s in resolved.lockout.items()
        },
        "terminals": {"unknown": resolved.unknown_terminal},
        "location": {"missing": resolved.missing_location, "max_accuracy_m": resolved.max_accuracy_m},
        "travel": {
            "max_speed_kmh": round(resolved.max_speed_mps * 3.6, 6),
            "memory_s": resolved.travel_memory_ms // 1000,
        },
        "device_limit": {"uses": resolved.device_uses} if resolved.device_uses else {},
        "regions": regions,
    }


def effective_document(levels: PolicyLevels) -> dict[str, Any]:
    """The policy in effect at this level - built-in defaults, then the brand's document, then the campaign's, as
    risk.policy resolves them - written as a complete policy document."""
    book = policy.PolicyBook.from_documents(levels.levels)
    resolved = book.effective(levels.stored.brand_id, levels.stored.campaign_id)
    return _rendered(resolved, _regions(levels))
