"""The rules administration input must meet: every bad field is reported at once (InvalidRequest), before
anything is written."""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Callable, Mapping

from gateway.tenancy import api_keys
from gateway.tenancy.model import MAX_RADIUS_M, Role, Status
from gateway.validation import FieldViolation, InvalidRequest

_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_EXTERNAL_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# IANA names are letters, digits, _ + - in /-separated parts: no dots, so never a path outside the zone database.
_ZONE_RE = re.compile(r"[A-Za-z0-9_+-]{1,64}(?:/[A-Za-z0-9_+-]{1,64}){0,3}")
# Files of the zone database that are not IANA zone names (`localtime` is whatever the host is set to).
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})
MAX_NAME_CHARS = 200
_BINDABLE = frozenset({Role.POS, Role.INTERNAL})

SLUG_RULE = "must be 1 to 63 characters of a-z, 0-9 and -, not starting with -"
EXTERNAL_ID_RULE = "must be 1 to 64 characters of A-Z, a-z, 0-9 and . _ : -"
NAME_RULE = f"must be 1 to {MAX_NAME_CHARS} printable characters, not only spaces"
STATUS_RULE = f"must be one of {', '.join(Status)}"
RADIUS_RULE = f"must be a number of metres greater than 0 and at most {MAX_RADIUS_M:g}"


def check(ok: bool, name: str, rule: str) -> list[FieldViolation]:
    """A violation of `rule` by field `name`, unless ok."""
    return [] if ok else [FieldViolation(name, rule)]


def raise_if(*groups: list[FieldViolation]) -> None:
    """InvalidRequest with every violation found, if any."""
    violations = [v for group in groups for v in group]
    if violations:
        raise InvalidRequest(violations)


def is_slug(value: object) -> bool:
    return isinstance(value, str) and _SLUG_RE.fullmatch(value) is not None


def is_external_id(value: object) -> bool:
    return isinstance(value, str) and _EXTERNAL_ID_RE.fullmatch(value) is not None


def is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and value.isprintable() and not value.isspace()


def in_range(value: object, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and low <= value <= high


def is_time_zone(value: object) -> bool:
    if not isinstance(value, str) or not _ZONE_RE.fullmatch(value) or value in _NOT_ZONES:
        return False
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def is_radius(value: object) -> bool:
    return in_range(value, 0, MAX_RADIUS_M) and value != 0


def is_status(value: object) -> bool:
    return value in Status.__members__.values()


def is_env(value: object) -> bool:
    return value in api_keys.ENVIRONMENTS


def client_rules(
    brand_id: int | None, role: str, store_id: int | None, terminal_id: int | None
) -> list[FieldViolation]:
    if role not in Role.__members__.values():
        return [FieldViolation("role", f"must be one of {', '.join(Role)}")]
    platform = role == Role.PLATFORM
    bound = store_id is not None or terminal_id is not None
    return [
        *check(platform == (brand_id is None), "brand_id", "is required, except for (and only for) the platform role"),
        *check(not bound or role in _BINDABLE, "store_id" if store_id is not None else "terminal_id",
                "only pos and internal clients are bound to a store or terminal"),
    ]  # fmt: skip


_STORE_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "external_id": (is_external_id, EXTERNAL_ID_RULE),
    "name": (is_name, NAME_RULE),
    "latitude": (lambda value: in_range(value, -90, 90), "must be a number from -90 to 90"),
    "longitude": (lambda value: in_range(value, -180, 180), "must be a number from -180 to 180"),
    "time_zone": (is_time_zone, "must be an IANA time zone name, such as Europe/Paris"),
    "radius_m": (is_radius, RADIUS_RULE),
}


def store_rules(fields: Mapping[str, object]) -> list[FieldViolation]:
    """The violations of a store's fields, by name (None: not given - an update leaves it as it is)."""
    return [
        FieldViolation(name, _STORE_RULES[name][1])
        for name, value in fields.items()
        if value is not None and not _STORE_RULES[name][0](value)
    ]
