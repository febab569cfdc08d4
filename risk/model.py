"""The risk engine's own vocabulary: what it is asked, what it finds, and what it asks Redis to count.

Plain immutable data - no gRPC, no protobuf, no gateway. The gateway translates its requests into `RiskRequest`
(with the registry facts the pure rules need) and executes `CounterPlan` inside its redeem script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Mode(StrEnum):
    """How a rule acts: not at all, recorded as "would have denied" but admitted, or enforced."""

    OFF = "off"
    SHADOW = "shadow"
    ENFORCE = "enforce"


class FailurePolicy(StrEnum):
    """What a check does when its data is unavailable: admit (open) or decline (closed)."""

    OPEN = "open"
    CLOSED = "closed"


class Rule(StrEnum):
    """Every rule the engine knows; each has its own mode per brand and campaign."""

    RATE_LIMIT = "rate_limit"  # caller quotas: client, terminal, store, brand -> RESOURCE_EXHAUSTED
    DEVICE_VELOCITY = "device_velocity"  # attempts per customer device per window -> decline
    CODE_VELOCITY = "code_velocity"  # attempts per code per window -> decline
    LOCKOUT = "lockout"  # brute force: failures per terminal, store, client -> locked for a cool-down
    TERMINAL_STORE = "terminal_store"  # a registered terminal naming another store
    STORE_GEOFENCE = "store_geofence"  # within the store's registered radius
    CAMPAIGN_REGION = "campaign_region"  # within the campaign's regions
    IMPOSSIBLE_TRAVEL = "impossible_travel"  # one customer device, two places, too fast
    DEVICE_BINDING = "device_binding"  # a code bound to one customer device
    DEVICE_LIMIT = "device_limit"  # uses per customer device per campaign


class Scope(StrEnum):
    """Who or what a counter counts."""

    CLIENT = "client"
    TERMINAL = "terminal"
    STORE = "store"
    BRAND = "brand"
    DEVICE = "device"
    CODE = "code"


class Reason(StrEnum):
    """Machine reasons of risk declines (RedeemResponse.reason), stable: callers match on them."""

    RATE_LIMITED = "RATE_LIMITED"  # a caller quota (RESOURCE_EXHAUSTED, not a decline)
    DEVICE_VELOCITY = "DEVICE_VELOCITY"
    CODE_VELOCITY = "CODE_VELOCITY"
    LOCKED_OUT = "LOCKED_OUT"
    TERMINAL_STORE_MISMATCH = "TERMINAL_STORE_MISMATCH"
    UNKNOWN_TERMINAL = "UNKNOWN_TERMINAL"
    OUTSIDE_STORE_RADIUS = "OUTSIDE_STORE_RADIUS"
    OUTSIDE_CAMPAIGN_REGION = "OUTSIDE_CAMPAIGN_REGION"
    LOCATION_REQUIRED = "LOCATION_REQUIRED"
    LOCATION_TOO_INACCURATE = "LOCATION_TOO_INACCURATE"
    IMPOSSIBLE_TRAVEL = "IMPOSSIBLE_TRAVEL"
    DEVICE_MISMATCH = "DEVICE_MISMATCH"
    DEVICE_REQUIRED = "DEVICE_REQUIRED"
    DEVICE_LIMIT = "DEVICE_LIMIT"
    RISK_DATA_UNAVAILABLE = "RISK_DATA_UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class Place:
    """A reported position: WGS 84 degrees and the radius of its 68% confidence circle in metres."""

    latitude: float
    longitude: float
    accuracy_m: float = 0.0


@dataclass(frozen=True, slots=True)
class StoreFacts:
    """What the registry says about the store a request names."""

    external_id: str
    latitude: float
    longitude: float
    radius_m: float


@dataclass(frozen=True, slots=True)
class RiskRequest:
    """One redeem or validate attempt as the risk engine sees it.

    `store` is None when the named store is not registered (a fact the geofence needs is unavailable);
    `terminal_store` is the external id of the store the named terminal is registered to, None when the terminal
    is unknown. `code_ref` is the code's keyed hash (never the code); `counts` is False for Validate."""

    brand_id: int
    campaign_id: int
    client_id: str
    store_id: str
    terminal_id: str
    device_id: str
    location: Place | None
    code_ref: str
    now_ms: int
    counts: bool
    store: StoreFacts | None
    terminal_store: str | None


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule that would deny. `mode` ENFORCE denies; SHADOW is only recorded. `quota` findings are the caller's
    own quota (RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure naming `scope`); the rest are declines."""

    rule: Rule
    reason: Reason
    mode: Mode
    scope: str = ""
    retry_after_ms: int = 0
    quota: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding-window limit checked in Redis: at most `limit` counted attempts in any `window_ms`.

    Checked for every attempt; counted (a member added) only when every window and lock of the attempt passes
    and the attempt counts (Redeem, not Validate)."""

    rule: Rule
    scope: Scope
    subject: str
    key: str
    limit: int
    window_ms: int
    mode: Mode
    quota: bool


@dataclass(frozen=True, slots=True)
class Lockout:
    """Brute-force lockout of one scope: `threshold` failures within `window_ms` lock it for `cooldown_ms`."""

    scope: Scope
    subject: str
    lock_key: str
    failures_key: str
    threshold: int
    window_ms: int
    cooldown_ms: int
    mode: Mode


@dataclass(frozen=True, slots=True)
class Travel:
    """Impossible travel for one customer device: the last redemption's place and time live at `key`."""

    key: str
    max_speed_mps: float
    latitude: float
    longitude: float
    ttl_ms: int
    mode: Mode


@dataclass(frozen=True, slots=True)
class DeviceRules:
    """Rules the redeem script enforces on the code itself (campaign shard keys, built by the gateway)."""

    binding: Mode = Mode.OFF
    limit: int = 0
    limit_mode: Mode = Mode.OFF


@dataclass(frozen=True, slots=True)
class CounterPlan:
    """Everything an attempt needs from Redis, executed atomically with the redemption.

    `events_key` is the brand's risk-event stream: the script appends every denial and shadow hit there.
    `closed` are the enforced counter rules of this plan whose failure policy is closed: when the counters cannot
    be reached (a separate call that failed), the first of them declines the attempt; the others fail open."""

    windows: tuple[Window, ...] = ()
    lockouts: tuple[Lockout, ...] = ()
    travel: Travel | None = None
    device: DeviceRules = field(default_factory=DeviceRules)
    events_key: str = ""
    closed: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class Assessment:
    """The in-process verdict and the Redis part still to run.

    `denial` is the first enforced finding of the in-process rules (binding, geofence, location); the Redis part
    does not run then, only the event is recorded. `shadow` are in-process findings recorded but not enforced.
    `bind_terminal` asks the gateway to bind an unknown terminal to the named store after a redemption."""

    denial: Finding | None
    shadow: tuple[Finding, ...]
    plan: CounterPlan
    bind_terminal: bool = False
