"""Campaigns as redemption.v1 admin messages and back: a Campaign message as the changes gateway/campaigns/admin.py
applies (by API field name), a campaign and its live figures as messages. Pure functions, no I/O.

Request fields are named in violations as the caller wrote them: a campaign's rule as `campaign.<field>` (its
hours as `campaign.redemption_hours[i].start`), the mask as `update_mask`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from gateway.campaigns.model import ACTIVE, DEFAULT_REVERSAL_WINDOW_S, PAUSED, Campaign
from gateway.campaigns.rules import CHANGEABLE, FIXED
from gateway.campaigns.schedule import hours_to_json
from gateway.campaigns.stats import CampaignStats, Counters
from gateway.grpc_api.admin_messages import timestamp
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.validation import FieldViolation, InvalidRequest

CAMPAIGN_FIELD = "campaign"
MASK_FIELD = "update_mask"
STATUSES: dict[str, pb.CampaignStatus.ValueType] = {
    ACTIVE: pb.CAMPAIGN_STATUS_ACTIVE,
    PAUSED: pb.CAMPAIGN_STATUS_PAUSED,
}
_STATUS_NAMES: dict[int, str] = {number: name for name, number in STATUSES.items()}
# Fields the mask may name that are not rules: the ones a caller might expect to change here, and where to go.
_NOT_HERE = {"status": "use SetCampaignStatus", "id": "names the campaign", "brand_id": "is fixed",
             "created_at": "is fixed", "updated_at": "is set by every change"}  # fmt: skip


def status_name(value: int) -> str:
    """The campaign status a request asks for; "" for UNSPECIFIED or an unknown value (refused as `status`)."""
    return _STATUS_NAMES.get(value, "")


def _hours(message: pb.Campaign) -> list[dict[str, object]]:
    windows: list[dict[str, object]] = []
    for w in message.redemption_hours:
        window: dict[str, object] = {"days": list(w.days)} if w.days else {}
        window.update(start=w.start, end=w.end)
        windows.append(window)
    return windows


def _seconds(duration: duration_pb2.Duration) -> int | float:
    """Whole seconds; a fraction stays a float, which the rules refuse."""
    return duration.seconds if not duration.nanos else duration.seconds + duration.nanos / 1e9


def _has(message: Message, name: str) -> bool:
    return message.HasField(name)


def _value(message: pb.Campaign, name: str) -> object:
    """One field of the message as the campaign rules take it (unset optional numbers and blanks: none)."""
    if name in ("valid_from", "valid_until"):
        return getattr(message, name).ToDatetime(tzinfo=UTC) if _has(message, name) else None
    if name in ("budget_count", "budget_value"):
        return getattr(message, name) if _has(message, name) else None
    if name == "valid_days":
        return message.valid_days or None
    if name == "currency":
        return message.currency or None
    if name == "time_zone":
        return message.time_zone or "UTC"
    if name == "redemption_hours":
        return _hours(message)
    if name in ("allowed_stores", "allowed_store_groups"):
        return list(getattr(message, name))
    if name == "reversal_window":
        return _seconds(message.reversal_window) if _has(message, name) else DEFAULT_REVERSAL_WINDOW_S
    return getattr(message, name)


def create_fields(message: pb.Campaign) -> dict[str, object]:
    """Every rule of a new campaign; a field left unset takes its default (a required one stays missing)."""
    fields = {name: _value(message, name) for name in sorted(CHANGEABLE | FIXED)}
    for name in ("valid_from", "valid_until"):
        if fields[name] is None:
            del fields[name]
    if not message.name:
        del fields["name"]
    fields["uses_per_code"] = message.uses_per_code or 1
    fields["shards"] = message.shards or 1
    return fields


def update_fields(message: pb.Campaign, paths: Sequence[str]) -> dict[str, object]:
    """The rules the mask names, with their values in `message` (named but unset: cleared or default)."""
    problems = []
    for path in paths:
        if path not in CHANGEABLE | FIXED:
            why = _NOT_HERE.get(path, "names no field of Campaign that can change")
            problems.append(FieldViolation(MASK_FIELD, f"{path!r} {why}"))
    if not paths:
        problems.append(FieldViolation(MASK_FIELD, "is required: the fields to change"))
    if problems:
        raise InvalidRequest(problems)
    return {path: _value(message, path) for path in paths}


def in_campaign(exc: InvalidRequest) -> InvalidRequest:
    """The rules' field names as fields of the request's `campaign` (the mask's stay as they are)."""
    return InvalidRequest([
        v if v.field.startswith(MASK_FIELD) else FieldViolation(f"{CAMPAIGN_FIELD}.{v.field}", v.description)
        for v in exc.violations
    ])  # fmt: skip


def campaign(c: Campaign) -> pb.Campaign:
    """A Campaign message."""
    message = pb.Campaign(
        id=c.id, brand_id=c.brand_id, name=c.name, status=STATUSES[c.status], valid_from=timestamp(c.valid_from),
        valid_until=timestamp(c.valid_until), valid_days=c.valid_days or 0, uses_per_code=c.uses_per_code,
        shards=c.shards, face_value=c.face_value, currency=c.currency or "", time_zone=c.time_zone,
        allowed_stores=c.allowed_stores, allowed_store_groups=c.allowed_store_groups,
        reversal_window=duration_pb2.Duration(seconds=c.reversal_window_s), created_at=timestamp(c.created_at),
        updated_at=timestamp(c.updated_at),
    )  # fmt: skip
    for window in hours_to_json(c.redemption_hours):
        days = window.get("days", [])
        assert isinstance(days, list)
        message.redemption_hours.add(days=days, start=str(window["start"]), end=str(window["end"]))
    if c.budget_count is not None:
        message.budget_count = c.budget_count
    if c.budget_value is not None:
        message.budget_value = c.budget_value
    return message


def counters(value: Counters) -> pb.CampaignCounters:
    """A CampaignCounters message (what is left: unset without such a budget)."""
    message = pb.CampaignCounters(
        issued=value.issued, redeemed=value.redeemed, reversed=value.reversed,
        budget_count_used=value.budget_count_used, budget_value_used=value.budget_value_used,
    )  # fmt: skip
    if value.budget_count_left is not None:
        message.budget_count_left = value.budget_count_left
    if value.budget_value_left is not None:
        message.budget_value_left = value.budget_value_left
    return message


def stats(value: CampaignStats, c: Campaign) -> pb.GetCampaignStatsResponse:
    """The GetCampaignStats reply."""
    return pb.GetCampaignStatsResponse(
        total=counters(value.total), shards=[counters(s) for s in value.shards],
        decisions_last_hour=dict(value.decisions_last_hour), status=STATUSES[c.status],
    )  # fmt: skip


def page_key(c: Campaign) -> str:
    """A list's page token: the last id sent, zero-padded like the registry lists'."""
    return f"{c.id:020d}"


def after_id(token: str) -> int:
    """The id a page token names ("" : from the start); INVALID_ARGUMENT for anything a list never returned."""
    if not token:
        return 0
    if len(token) != 20 or not token.isdigit():
        raise InvalidRequest([FieldViolation("page_token", "is not a token this list returned")])
    return int(token)
