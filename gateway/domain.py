"""The gateway's domain objects: plain data, no gRPC, no Redis."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.coderefs import CodeRef
from gateway.codes import Route


class Outcome(StrEnum):
    """The business decision on a code (mirrors redemption.v1.Outcome)."""

    REDEEMED = "REDEEMED"
    ALREADY_REDEEMED = "ALREADY_REDEEMED"
    NOT_FOUND = "NOT_FOUND"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    REDEEMABLE = "REDEEMABLE"
    RISK_DENIED = "RISK_DENIED"
    CAMPAIGN_PAUSED = "CAMPAIGN_PAUSED"
    NOT_ALLOWED = "NOT_ALLOWED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


@dataclass(frozen=True, slots=True)
class Location:
    """Where a redemption happens (WGS 84 degrees, accuracy in metres)."""

    latitude: float
    longitude: float
    accuracy_m: float


@dataclass(frozen=True, slots=True)
class RedeemInput:
    """A redeem or validate request as the caller sent it, not yet checked."""

    code: str
    idempotency_key: str
    store_id: str
    terminal_id: str
    customer_device_id: str
    location: Location | None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as authentication established it (gateway/grpc_api/auth.py): the API client, the brand
    it acts for, its role, and the store or terminal (external ids) its key is bound to ("" = not bound)."""

    client_id: str
    brand_id: int
    role: str
    store_id: str = ""
    terminal_id: str = ""


@dataclass(frozen=True, slots=True)
class CodeLookup:
    """A well-formed code: its route and its code_ref under every key."""

    route: Route
    refs: tuple[CodeRef, ...]


@dataclass(frozen=True, slots=True)
class RedeemCommand:
    """A checked request, ready for the atomic script."""

    lookup: CodeLookup
    client_id: str
    brand_id: int
    idempotency_key: str
    fingerprint: str
    store_id: str
    terminal_id: str
    customer_device_id: str
    location: Location | None


@dataclass(frozen=True, slots=True)
class RedeemResult:
    """The answer for one code."""

    outcome: Outcome
    campaign_id: int
    uses_left: int
    redemption_id: str = ""
    redeemed_at_ms: int = 0
    use_number: int = 0
    replayed: bool = False
    # RISK_DENIED: the rule and its machine reason, and when trying again may help (0: it will not by waiting)
    risk_rule: str = ""
    risk_reason: str = ""
    retry_after_ms: int = 0
    # rule:reason of every shadow-mode hit (recorded, not enforced), for the metric
    shadow_hits: tuple[str, ...] = ()
    # NOT_ALLOWED and BUDGET_EXHAUSTED: which campaign rule declined (STORE_NOT_ALLOWED, BUDGET_VALUE_EXHAUSTED, ...)
    rule_reason: str = ""


@dataclass(frozen=True, slots=True)
class CodeState:
    """A code's stored state (GetCode)."""

    campaign_id: int
    code_ref_prefix: str
    uses_total: int
    uses_used: int
    valid_from_ms: int
    valid_until_ms: int
    last_redeemed_ms: int


class IdempotencyConflict(Exception):
    """The idempotency key was used before for this code with a different request."""


class PermissionDenied(Exception):
    """The authenticated caller may not do this (a store- or terminal-bound key naming another one)."""


class Unauthenticated(Exception):
    """No valid credentials. `kind` (missing, malformed, invalid, ...) is for logs and metrics; the caller is
    told only that its credentials were not accepted."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class RegistryNotReady(Exception):
    """The tenant registry is not loaded, or is known to be stale: fail closed."""


class Throttled(Exception):
    """The caller is over its own quota (a rate limit of its client, terminal, store or brand): nothing was
    decided or counted. `scope` names the quota ("terminal:store-1/till-1"), `limit` says what it allows."""

    def __init__(self, scope: str, retry_after_ms: int, limit: str = "") -> None:
        super().__init__(f"rate limit of {scope} reached")
        self.scope = scope
        self.retry_after_ms = retry_after_ms
        self.limit = limit


class CodeNotFound(Exception):
    """No such code (GetCode)."""


class StoreUnavailable(Exception):
    """Redis could not decide: unreachable, timed out, read-only (a replica) or out of memory. The call may or may
    not have happened; a retry with the same idempotency key learns which."""


class LedgerBehind(Exception):
    """Reverse: the redemption is recent and not in the ledger yet - retry with the same idempotency key."""


class LedgerUnavailable(Exception):
    """Reverse: Postgres could not be asked where the redemption is - retry with the same idempotency key."""


class NotReady(Exception):
    """The gateway must not decide now (Redis not initialised from Postgres, or unreachable)."""


@dataclass(slots=True)
class Readiness:
    """Whether Redis may be redeemed against, kept current by health checking (no await on the hot path)."""

    ready: bool = False
    reason: str = "starting"


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """One item of a batch that was not decided: an exception the unary path would have raised."""

    error: Exception


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """A failed attempt the redeem script never saw (a guessed code), as its risk event names it: never the code.
    `member` is a unique id for the attempt; `kind` is redeem or validate."""

    now_ms: int
    member: str
    brand_id: int
    store_id: str
    terminal_id: str
    client_id: str
    device_id: str
    location: Location | None
    kind: str
