"""The tenant registry's domain objects: plain, immutable data with no I/O (the rows of migration 0003)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

# Owns every campaign created before brands existed (migration 0003).
DEFAULT_BRAND_ID = 1
# A store's geofence radius unless set otherwise, and the bounds of any (migration 0005).
DEFAULT_RADIUS_M = 300.0
MAX_RADIUS_M = 100_000.0
# The campaign id of a brand-wide risk policy.
BRAND_WIDE = 0


class Role(StrEnum):
    """What a client may do: pos (redeem at its brand's tills), internal (adds the batch stream), admin (its
    brand's administration), platform (every brand; names the brand it acts for)."""

    POS = "pos"
    INTERNAL = "internal"
    ADMIN = "admin"
    PLATFORM = "platform"


class Status(StrEnum):
    """Brands, stores and terminals are disabled, never deleted."""

    ACTIVE = "active"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Brand:
    """A tenant: its campaigns, stores and clients are invisible to every other brand."""

    id: int
    slug: str
    name: str
    status: Status
    # has imported codes (gateway/campaigns/directory.py): a code that is not a generated one is looked up in
    # the brand's directory - one more round trip, for this brand's requests only
    imports_codes: bool = False


@dataclass(frozen=True, slots=True)
class Store:
    """A brand's store, with the location, geofence radius (metres) and time zone the risk engine checks against."""

    id: int
    brand_id: int
    external_id: str
    name: str
    latitude: float
    longitude: float
    time_zone: str
    status: Status
    radius_m: float


@dataclass(frozen=True, slots=True)
class Terminal:
    """A till of one store (always of the store's brand)."""

    id: int
    brand_id: int
    store_id: int
    external_id: str
    status: Status
    first_seen_at: datetime | None
    last_seen_at: datetime | None


@dataclass(frozen=True, slots=True)
class Client:
    """A caller of the API. brand_id is None only for the platform role; store_id/terminal_id bind a pos or
    internal client to one store or till (a terminal binding always names its store too)."""

    id: str
    brand_id: int | None
    role: Role
    store_id: int | None
    terminal_id: int | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client's key as stored: only the hash of its secret. expires_at is set when the key is rotated out."""

    key_id: str
    client_id: str
    secret_hash: bytes
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def __repr__(self) -> str:
        # The hash is not the secret, but it has no business in logs or tracebacks either.
        return f"ApiKey(key_id={self.key_id!r}, client_id={self.client_id!r}, expires_at={self.expires_at!r})"


@dataclass(frozen=True, slots=True)
class RiskPolicyRow:
    """A brand's risk-policy document as stored: brand-wide (campaign_id 0) or for one campaign of the brand.
    The empty document is a cleared policy (rows are never deleted); risk/policy.py gives documents meaning."""

    brand_id: int
    campaign_id: int
    document: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One administration change: who, when, what, and the entity before and after (never a secret)."""

    id: int
    at: datetime
    actor: str
    brand_id: int | None
    action: str
    entity: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    version: int


class AlreadyExists(Exception):
    """A create that would duplicate a unique name (slug, external id); the message is safe to show."""


class NotFoundError(LookupError):
    """No such entity - or one of another brand, which must look exactly the same; the message is safe to show."""
