"""The registry's domain objects as redemption.v1 admin messages and back, and replies cut to the send limit.

Pure functions, no I/O: the AdminService servicer (admin_servicer.py) stays a list of calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.tenancy.lockouts import Lockout
from gateway.tenancy.model import AuditEntry, Brand, Client, Role, Status, Store, Terminal
from gateway.validation import FieldViolation, InvalidRequest

T = TypeVar("T")
M = TypeVar("M", bound=Message)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A repeated message field costs its tag and a length prefix beside the message itself (at most 1 + 5 bytes).
_FIELD_OVERHEAD = 6

STATUSES: dict[Status, pb.EntityStatus.ValueType] = {
    Status.ACTIVE: pb.ENTITY_STATUS_ACTIVE,
    Status.DISABLED: pb.ENTITY_STATUS_DISABLED,
}
ROLES: dict[Role, pb.Role.ValueType] = {
    Role.POS: pb.ROLE_POS,
    Role.INTERNAL: pb.ROLE_INTERNAL,
    Role.ADMIN: pb.ROLE_ADMIN,
    Role.PLATFORM: pb.ROLE_PLATFORM,
}
_STATUS_NAMES: dict[int, str] = {number: str(status) for status, number in STATUSES.items()}
_ROLE_NAMES: dict[int, str] = {number: str(role) for role, number in ROLES.items()}


def status_name(value: int) -> str:
    """The registry's name of a requested status; "" for UNSPECIFIED or an unknown value, which the registry
    refuses as a bad `status` (so the violation is the registry's own, worded like every other)."""
    return _STATUS_NAMES.get(value, "")


def role_name(value: int) -> str:
    """The registry's name of a requested role; "" for UNSPECIFIED or an unknown value (a bad `role`)."""
    return _ROLE_NAMES.get(value, "")


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None (the field stays unset) for a moment that has not happened."""
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def brand(value: Brand) -> pb.Brand:
    """A Brand message."""
    return pb.Brand(id=value.id, slug=value.slug, name=value.name, status=STATUSES[value.status])


def store(value: Store) -> pb.Store:
    """A Store message."""
    return pb.Store(
        id=value.id, brand_id=value.brand_id, external_id=value.external_id, name=value.name,
        latitude=value.latitude, longitude=value.longitude, time_zone=value.time_zone, status=STATUSES[value.status],
        radius_m=value.radius_m,
    )  # fmt: skip


def terminal(value: Terminal) -> pb.Terminal:
    """A Terminal message."""
    return pb.Terminal(
        id=value.id, brand_id=value.brand_id, store_id=value.store_id, external_id=value.external_id,
        status=STATUSES[value.status], first_seen_at=timestamp(value.first_seen_at),
        last_seen_at=timestamp(value.last_seen_at),
    )  # fmt: skip


def client(value: Client) -> pb.Client:
    """A Client message: 0 stands for "none" (no brand, no binding). The model holds no key, so none can leak."""
    return pb.Client(
        id=value.id, brand_id=value.brand_id or 0, role=ROLES[value.role], store_id=value.store_id or 0,
        terminal_id=value.terminal_id or 0, label=value.label, created_at=timestamp(value.created_at),
        revoked_at=timestamp(value.revoked_at),
    )  # fmt: skip


def optional(request: Message, name: str) -> Any:
    """A proto3 `optional` field's value, or None when the request leaves it unset."""
    return getattr(request, name) if request.HasField(name) else None


def lockout(value: Lockout) -> pb.Lockout:
    """A Lockout message (0 seconds left: a lock without an end)."""
    return pb.Lockout(scope=value.scope, subject=value.subject, seconds_left=value.seconds_left or 0.0)


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def document(text: str, field: str) -> object:
    """The JSON value in `text`; InvalidRequest on `field` when it is not JSON (NaN and Infinity are not)."""
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "nested too deeply"
        raise InvalidRequest([FieldViolation(field, f"must be a JSON object ({reason})")]) from None


def document_json(value: Mapping[str, Any]) -> str:
    """A policy document as JSON, keys sorted (so equal documents read the same)."""
    return json.dumps(value, sort_keys=True)


def _struct(data: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if data is None:
        return None
    value = struct_pb2.Struct()
    value.update(data)
    return value


def audit_entry(value: AuditEntry) -> pb.AuditEntry:
    """An AuditEntry message; before/after are the JSON the registry wrote, as Structs."""
    return pb.AuditEntry(
        id=value.id, at=timestamp(value.at), actor=value.actor, brand_id=value.brand_id or 0, action=value.action,
        entity=value.entity, entity_id=value.entity_id, before=_struct(value.before), after=_struct(value.after),
        version=value.version,
    )  # fmt: skip


def fitting(messages: Sequence[M], budget: int) -> list[M]:
    """The longest prefix of `messages` whose encoding fits `budget` bytes: a reply over the server's send limit
    would fail as RESOURCE_EXHAUSTED after the work was done. The first message is always kept (a single
    registry row is far smaller than any send limit)."""
    kept: list[M] = []
    used = 0
    for message in messages:
        used += message.ByteSize() + _FIELD_OVERHEAD
        if kept and used > budget:
            break
        kept.append(message)
    return kept


class PageRequest(Protocol):
    """The paging fields every List request has."""

    @property
    def page_size(self) -> int: ...

    @property
    def page_token(self) -> str: ...


def page_size(request: PageRequest) -> int:
    """The page size asked for: 0 is the default, more than the maximum is the maximum."""
    if request.page_size < 0:
        raise InvalidRequest([FieldViolation("page_size", "must not be negative")])
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page(
    rows: Sequence[T], request: PageRequest, key: Callable[[T], str], message: Callable[[T], M], budget: int
) -> tuple[list[M], str]:
    """The page of `rows` after the request's token, ordered by `key`, as messages that fit `budget`; and the
    token of the next page ("" after the last). A token is the key of the last row sent, so rows added or changed
    between pages neither repeat nor push others out."""
    size = page_size(request)
    rest = sorted((row for row in rows if key(row) > request.page_token), key=key)
    sent = fitting([message(row) for row in rest[:size]], budget)
    more = len(sent) < len(rest)
    return sent, key(rest[len(sent) - 1]) if more else ""


def id_key(row: Brand | Store | Terminal) -> str:
    """A page key ordering integer ids as text (ids are positive, so zero-padding keeps their order)."""
    return f"{row.id:020d}"


def client_key(row: Client) -> str:
    """A page key for clients: their ids are fixed-length text."""
    return row.id
