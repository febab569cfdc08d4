"""Input checks. Bad input changes nothing: every problem found is reported at once, by field (invariant 6)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from gateway import codes
from gateway.coderefs import KeyRing
from gateway.domain import Caller, CodeLookup, Location, PermissionDenied, RedeemCommand, RedeemInput

MAX_RAW_CODE_CHARS = 64
_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
MAX_ACCURACY_M = 100_000.0
# Echoed in the reply: bounded so that a reply's size is too (gateway/grpc_api/stream_replies.py).
MAX_BATCH_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request and what is wrong (never echoes the code)."""

    field: str
    description: str


class InvalidRequest(Exception):
    """The request is malformed; nothing was changed. `guess`: the code has the shape of an issued code but is not
    one (a wrong check character, an unknown layout) - a failed attempt the risk engine's lockout counts."""

    def __init__(self, violations: list[FieldViolation], *, guess: bool = False) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations
        self.guess = guess


class UndecodableRequest(Exception):
    """The request's bytes are not a valid protobuf message of its type; nothing was looked at or changed."""

    def __init__(self, message_type: str, error: str) -> None:
        super().__init__(f"undecodable {message_type}: {error}")
        self.message_type = message_type
        self.error = error


def check_id(value: str, field: str, max_len: int, *, required: bool) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(field, "is required")] if required else []
    if len(value) > max_len:
        return [FieldViolation(field, f"must be at most {max_len} characters")]
    if not _ID_RE.fullmatch(value):
        return [FieldViolation(field, "may contain only A-Z, a-z, 0-9 and . _ : -")]
    return []


def _check_location(location: Location | None) -> list[FieldViolation]:
    if location is None:
        return []
    bounds = (
        ("location.latitude", location.latitude, -90.0, 90.0),
        ("location.longitude", location.longitude, -180.0, 180.0),
        ("location.accuracy_m", location.accuracy_m, 0.0, MAX_ACCURACY_M),
    )
    return [
        FieldViolation(field, f"must be a number from {low:g} to {high:g}")
        for field, value, low, high in bounds
        if not (math.isfinite(value) and low <= value <= high)
    ]


def lookup_code(raw: str, keyring: KeyRing, field: str = "code") -> CodeLookup:
    """The route and code_refs of a raw code, or InvalidRequest naming `field`."""
    if not raw:
        raise InvalidRequest([FieldViolation(field, "is required")])
    if len(raw) > MAX_RAW_CODE_CHARS:
        raise InvalidRequest([FieldViolation(field, f"must be at most {MAX_RAW_CODE_CHARS} characters")])
    try:
        code = codes.normalise(raw)
    except codes.CodeFormatError as exc:
        raise InvalidRequest([FieldViolation(field, str(exc))]) from None
    try:
        route = codes.parse(code)
    except codes.CodeFormatError as exc:
        guess = codes.is_code_shaped(code)
        raise InvalidRequest([FieldViolation(field, str(exc))], guess=guess) from None
    return CodeLookup(route, keyring.candidates(route.campaign_id, code))


def fingerprint(request: RedeemInput, code_ref: str) -> str:
    """A hash of the canonical request fields: the same attempt retried has the same fingerprint."""
    loc = request.location
    where = "" if loc is None else f"{loc.latitude!r},{loc.longitude!r},{loc.accuracy_m!r}"
    canonical = "\x1f".join((code_ref, request.store_id, request.terminal_id, request.customer_device_id, where))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def check_binding(request: RedeemInput, caller: Caller) -> None:
    """A key bound to a store (or terminal) acts only for it: PermissionDenied otherwise."""
    if caller.store_id and request.store_id != caller.store_id:
        raise PermissionDenied("this API key is bound to another store")
    if caller.terminal_id and request.terminal_id != caller.terminal_id:
        raise PermissionDenied("this API key is bound to another terminal")


def check_redeem(
    request: RedeemInput,
    keyring: KeyRing,
    caller: Caller,
    *,
    needs_key: bool = True,
    lookup: CodeLookup | None = None,
    code_checked: bool = False,
) -> RedeemCommand:
    """A RedeemCommand for a well-formed request of this caller: InvalidRequest listing every bad field, or
    PermissionDenied when the caller's key is bound to another store or terminal. `lookup`: the code's, already
    found (an imported code); `code_checked`: the code is known not to exist, check the rest only (the command
    returned then has no use)."""
    violations = [
        *check_id(request.idempotency_key, "idempotency_key", 128, required=needs_key),
        *check_id(request.store_id, "store_id", 64, required=True),
        *check_id(request.terminal_id, "terminal_id", 64, required=True),
        *check_id(request.customer_device_id, "customer_device_id", 128, required=False),
        *_check_location(request.location),
    ]
    guess = False
    try:
        if lookup is None and not code_checked:
            lookup = lookup_code(request.code, keyring)
    except InvalidRequest as exc:
        violations, guess = exc.violations + violations, exc.guess
    if violations:
        # only a guess from an identifiable terminal can be counted against it
        raise InvalidRequest(violations, guess=guess and len(violations) == 1)
    check_binding(request, caller)
    if lookup is None:
        lookup = CodeLookup(codes.Route(0, 0), ())
    return RedeemCommand(
        lookup=lookup,
        client_id=caller.client_id,
        brand_id=caller.brand_id,
        idempotency_key=request.idempotency_key,
        fingerprint=fingerprint(request, lookup.refs[0].ref if lookup.refs else ""),
        store_id=request.store_id,
        terminal_id=request.terminal_id,
        customer_device_id=request.customer_device_id,
        location=request.location,
    )


def check_stream_message(batch_id: str, items: int, max_items: int, *, secrets: int = 0, max_secrets: int = 0) -> None:
    """A RedeemStream or DispenseStream message as a whole, before any item is looked at: InvalidRequest ends the
    stream. `secrets`: what a DispenseStream message's orders ask for in all (at most `max_secrets`)."""
    violations = check_id(batch_id, "batch_id", MAX_BATCH_ID_CHARS, required=False)
    if items > max_items:
        violations.append(FieldViolation("items", f"at most {max_items} items per message"))
    if max_secrets and secrets > max_secrets:
        violations.append(FieldViolation("items", f"at most {max_secrets} secrets (quantities) in all per message"))
    if violations:
        raise InvalidRequest(violations)
