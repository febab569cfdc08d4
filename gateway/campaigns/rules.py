"""The rules a campaign's settings must meet, checked before anything is written: every bad field is reported at
once (InvalidRequest, as (field, description) pairs named like the API's Campaign message), and nothing changes.

A create or an update is a set of changes by API field name (`CHANGEABLE`, plus `shards` and `currency` for a
create) applied to a campaign - a blank one for a create - and the result is checked whole."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from gateway.campaigns.model import Campaign
from gateway.campaigns.schedule import HoursError, parse_hours, validate_time_zone
from gateway.tenancy.admin_rules import NAME_RULE, check, is_name
from gateway.validation import FieldViolation

MAX_USES = 1_000_000
MAX_SHARDS = 1024
MAX_VALID_DAYS = 3650
MAX_BUDGET_COUNT = 10**12
MAX_BUDGET_VALUE = 10**15
MAX_FACE_VALUE = 10**12
MAX_REVERSAL_WINDOW_S = 366 * 86_400
MAX_STORES = 10_000
MAX_GROUPS = 100
ID_RULE = "must be 1 to 64 characters of A-Z, a-z, 0-9 and . _ : -"
_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")

# What UpdateCampaign may change while the campaign is live (the API's names).
CHANGEABLE = frozenset({
    "name", "valid_from", "valid_until", "valid_days", "uses_per_code", "budget_count", "budget_value",
    "face_value", "time_zone", "redemption_hours", "allowed_stores", "allowed_store_groups", "reversal_window",
})  # fmt: skip
# Fixed once set: the shards route every issued code; a currency gives every face value granted its meaning.
FIXED = frozenset({"shards", "currency"})
REQUIRED = ("name", "valid_from", "valid_until")
_DATACLASS_NAMES = {"reversal_window": "reversal_window_s"}


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_id(value: str) -> bool:
    """A store's external id, a store group's name: 1 to 64 characters of [A-Za-z0-9._:-]."""
    return _ID_RE.fullmatch(value) is not None


def ids_violations(values: Sequence[str], field: str, most: int) -> list[FieldViolation]:
    """Each entry that is not an id (`field[i]`), or too many of them."""
    if len(values) > most:
        return [FieldViolation(field, f"at most {most} entries, got {len(values)}")]
    return [FieldViolation(f"{field}[{i}]", ID_RULE) for i, v in enumerate(values) if not is_id(v)]


def _validity(c: Campaign) -> list[FieldViolation]:
    aware = [
        *check(isinstance(c.valid_from, datetime) and c.valid_from.tzinfo is not None, "valid_from",
               "must be a moment with a time zone (ISO 8601)"),
        *check(isinstance(c.valid_until, datetime) and c.valid_until.tzinfo is not None, "valid_until",
               "must be a moment with a time zone (ISO 8601)"),
    ]  # fmt: skip
    if aware:
        return aware
    return check(c.valid_until > c.valid_from, "valid_until", "must be after valid_from")


def _currency(c: Campaign) -> list[FieldViolation]:
    if c.currency is not None:
        return check(bool(_CURRENCY_RE.fullmatch(c.currency)), "currency", "must be an ISO 4217 code such as CNY")
    needs = _whole(c.face_value, 1, MAX_FACE_VALUE) or c.budget_value is not None
    return check(not needs, "currency", "is required with a face value or a value budget")


def _time_zone(name: str) -> list[FieldViolation]:
    try:
        validate_time_zone(name)
    except HoursError as exc:
        return [FieldViolation(path, description) for path, description in exc.violations]
    return []


def _optional_range(value: int | None, field: str, high: int) -> list[FieldViolation]:
    return check(value is None or _whole(value, 1, high), field, f"must be from 1 to {high}, or unset for none")


def violations(c: Campaign) -> list[FieldViolation]:
    """Every rule `c` breaks (store groups' existence aside: that needs the database)."""
    return [
        *check(is_name(c.name), "name", NAME_RULE),
        *_validity(c),
        *_optional_range(c.valid_days, "valid_days", MAX_VALID_DAYS),
        *check(_whole(c.uses_per_code, 1, MAX_USES), "uses_per_code", f"must be from 1 to {MAX_USES}"),
        *check(_whole(c.shards, 1, MAX_SHARDS), "shards", f"must be from 1 to {MAX_SHARDS}"),
        *_optional_range(c.budget_count, "budget_count", MAX_BUDGET_COUNT),
        *_optional_range(c.budget_value, "budget_value", MAX_BUDGET_VALUE),
        *check(_whole(c.face_value, 0, MAX_FACE_VALUE), "face_value", f"must be from 0 to {MAX_FACE_VALUE}"),
        *_currency(c),
        *_time_zone(c.time_zone),
        *ids_violations(c.allowed_stores, "allowed_stores", MAX_STORES),
        *ids_violations(c.allowed_store_groups, "allowed_store_groups", MAX_GROUPS),
        *check(_whole(c.reversal_window_s, 0, MAX_REVERSAL_WINDOW_S), "reversal_window",
               f"must be from 0 to {MAX_REVERSAL_WINDOW_S // 86_400} days"),
    ]  # fmt: skip


def _strings(value: object, field: str) -> tuple[tuple[str, ...], list[FieldViolation]]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        return (), [FieldViolation(field, "must be a list of ids")]
    return tuple(sorted(set(value))), []


def _converted(name: str, value: object) -> tuple[Any, list[FieldViolation]]:
    """A change's value as the Campaign field holds it."""
    if name == "redemption_hours":
        try:
            return parse_hours(value), []  # type: ignore[arg-type]  # parse_hours checks the shape itself
        except HoursError as exc:
            return (), [FieldViolation(path, description) for path, description in exc.violations]
    if name in ("allowed_stores", "allowed_store_groups"):
        return _strings(value, name)
    return value, []


def apply(base: Campaign, changes: Mapping[str, object], *, creating: bool) -> tuple[Campaign, list[FieldViolation]]:
    """`base` with `changes` (API field names) applied, and every problem found: a field that may not change, a
    fixed one changed, a required one missing, a value of the wrong shape, a rule broken."""
    problems: list[FieldViolation] = []
    values: dict[str, Any] = {}
    for name, value in changes.items():
        refused = _fixed(base, name, value) if name in FIXED and not creating else []
        if refused:
            problems += refused
        elif name not in CHANGEABLE | FIXED:
            problems.append(FieldViolation(name, "cannot be changed"))
        else:
            values[_DATACLASS_NAMES.get(name, name)], found = _converted(name, value)
            problems += found
    if creating:
        problems += [FieldViolation(name, "is required") for name in REQUIRED if name not in changes]
    candidate = replace(base, **values)
    bad = {v.field.split("[", 1)[0] for v in problems}
    return candidate, problems + [v for v in violations(candidate) if v.field.split("[", 1)[0] not in bad]


def _fixed(base: Campaign, name: str, value: object) -> list[FieldViolation]:
    if name == "shards":
        ok = value == base.shards
        return check(ok, "shards", f"cannot change: fixed at {base.shards} when the campaign was created")
    ok = base.currency is None or value == base.currency
    return check(ok, "currency", f"cannot change once set (it is {base.currency})")
