"""Risk policies: the JSON document a brand stores per campaign, its validation, and the resolved `Policy`.

A document is stored per (brand_id, campaign_id); campaign 0 is the brand-wide document. The effective policy of a
campaign is built-in defaults, then the brand's document, then the campaign's:
- `modes`, `failure`, `limits`, `lockout` merge per key (a `null` limit or lockout removes an inherited one);
- every other section is replaced whole by the later document, its absent keys taken from the defaults.

Polygon rings are auto-closed: a ring whose last position differs from its first gets the first appended, and the
stored (normalised) document always holds closed rings, as RFC 7946 requires.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from risk import geo
from risk.model import FailurePolicy, Mode, Rule, Scope

log = logging.getLogger("rgw.risk")

MAX_REGIONS = 64
MAX_RING_POSITIONS = 1000
MAX_HOLES = 64
MAX_POSITIONS = 20_000  # all rings of a document together: bounds its size and the work to prepare it
MAX_COUNT = 1_000_000_000
_DESCRIPTION_CHARS = 96

DEFAULT_DOCUMENT: dict[str, Any] = {
    "modes": {
        # Counters need nothing from the brand: on from the start.
        "rate_limit": "enforce",
        "device_velocity": "enforce",
        "code_velocity": "enforce",
        "lockout": "enforce",
        "terminal_store": "enforce",
        # These need the brand's data (store locations, regions, customer devices): the brand switches them on.
        "store_geofence": "off",
        "campaign_region": "off",
        "impossible_travel": "off",
        "device_binding": "off",
        "device_limit": "off",
    },
    "failure": {
        # Counters failing open: a Redis hiccup must not stop every till; the redemption itself stays atomic.
        "rate_limit": "open",
        "device_velocity": "open",
        "code_velocity": "open",
        # Brute force is what an outage would invite: lockouts fail closed.
        "lockout": "closed",
        # A brand that switched a place rule on wants it enforced, not skipped when the store or region is unknown.
        "terminal_store": "closed",
        "store_geofence": "closed",
        "campaign_region": "closed",
        # Travel is a heuristic on the device's last place: losing that memory admits.
        "impossible_travel": "open",
        "device_binding": "closed",
        "device_limit": "closed",
    },
    "limits": {
        # Per minute: two a second per till, twenty a second per store, a thousand a second per API client
        # (brand-wide integrations). No brand-wide limit: the client limit already bounds one integration.
        "terminal": {"limit": 120, "window_s": 60},
        "store": {"limit": 1200, "window_s": 60},
        "client": {"limit": 60000, "window_s": 60},
        # A customer device redeeming more than 20 codes an hour is a farm, not a customer.
        "device": {"limit": 20, "window_s": 3600},
        # A code tried 30 times a minute is being guessed or replayed.
        "code": {"limit": 30, "window_s": 60},
    },
    "lockout": {
        # Failures (unknown codes, bad check characters) per 10 minutes before a 15-minute cool-down.
        "terminal": {"threshold": 10, "window_s": 600, "cooldown_s": 900},
        "store": {"threshold": 50, "window_s": 600, "cooldown_s": 900},
        "client": {"threshold": 500, "window_s": 600, "cooldown_s": 900},
    },
    # Terminals are registered by the brand's tooling, often after the first sale: admit unknown ones.
    "terminals": {"unknown": "allow"},
    # Once a location rule is on, a request without a usable location is declined (fail closed); 1 km of
    # accuracy is what a phone indoors reports.
    "location": {"missing": "deny", "max_accuracy_m": 1000.0},
    # Airliner speed, remembered a day.
    "travel": {"max_speed_kmh": 900.0, "memory_s": 86400},
    # No device limit unless `uses` is set: the device_limit mode alone limits nothing.
    "device_limit": {},
    "regions": [],
}


class PolicyError(ValueError):
    """A policy document that cannot be used; `violations` lists every problem as (field path, description)."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        shown = "; ".join(f"{path}: {text}" for path, text in self.violations[:5])
        more = f" (+{len(self.violations) - 5} more)" if len(self.violations) > 5 else ""
        super().__init__(f"{len(self.violations)} policy violation(s): {shown}{more}")


@dataclass(frozen=True, slots=True)
class _Number:
    """A numeric field: `lo <= x <= hi` (`lo < x` when `lo_open`), an int when `integer`."""

    lo: float
    hi: float
    integer: bool = True
    lo_open: bool = False


@dataclass(frozen=True, slots=True)
class _Choice:
    choices: tuple[str, ...]


_Field = _Number | _Choice
_MODES = _Choice(tuple(m.value for m in Mode))
_FAILURES = _Choice(tuple(f.value for f in FailurePolicy))
_RULES = tuple(r.value for r in Rule)
_SCOPES = tuple(s.value for s in Scope)
_LOCKOUT_SCOPES = ("terminal", "store", "client")
_LIMIT = {"limit": _Number(1, MAX_COUNT), "window_s": _Number(1, 86400)}
_LOCKOUT = {"threshold": _Number(1, 10000), "window_s": _Number(1, 86400), "cooldown_s": _Number(1, 604800)}
_CIRCLE = {"lat": _Number(-90, 90, False), "lon": _Number(-180, 180, False), "radius_m": _Number(0, 2.1e7, False, True)}
_PLAIN_SECTIONS: dict[str, dict[str, _Field]] = {
    "terminals": {"unknown": _Choice(("allow", "bind_first", "deny"))},
    "location": {"missing": _Choice(("deny", "allow")), "max_accuracy_m": _Number(1, 100000, False)},
    "travel": {"max_speed_kmh": _Number(0, 1e9, False, True), "memory_s": _Number(60, 604800)},
    "device_limit": {"uses": _Number(1, MAX_COUNT)},
}
_SECTIONS = ("modes", "failure", "limits", "lockout", *_PLAIN_SECTIONS, "regions")


def _shown(key: object) -> str:
    """A key as it may appear in a path: bounded, so a hostile key cannot flood a violation list."""
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


class _Check:
    """Collects violations while normalising a document."""

    def __init__(self) -> None:
        self.violations: list[tuple[str, str]] = []

    def add(self, path: str, text: str) -> None:
        self.violations.append((path, text[:_DESCRIPTION_CHARS]))

    def obj(self, value: object, path: str, keys: Collection[str], what: str = "key") -> dict[str, Any] | None:
        """The value as an object whose keys are all known, else None (unknown keys are reported, not fatal)."""
        if not isinstance(value, dict):
            self.add(path, "must be an object")
            return None
        expected = ", ".join(keys) if len(keys) <= 6 else ""
        for key in value:
            if key not in keys:
                self.add(
                    f"{path}.{_shown(key)}", f"unknown {what}" + (f"; expected one of {expected}" if expected else "")
                )
        return {k: v for k, v in value.items() if k in keys}

    def field(self, value: object, path: str, spec: _Field) -> Any:
        """A normalised field value, or None after reporting why it is unusable."""
        if not isinstance(spec, _Choice):
            return self.number(value, path, spec)
        if isinstance(value, str) and value in spec.choices:
            return value
        self.add(path, "must be one of " + ", ".join(spec.choices))
        return None

    def number(self, value: object, path: str, spec: _Number) -> int | float | None:
        """A number within the spec's bounds (bools are not numbers; NaN and infinities are refused), else None."""
        kind = "an integer" if spec.integer else "a finite number"
        numeric = isinstance(value, int if spec.integer else int | float) and not isinstance(value, bool)
        # isfinite only on floats: an int is finite, and a huge one would overflow the conversion.
        if not numeric or (isinstance(value, float) and not math.isfinite(value)):
            self.add(path, f"must be {kind}")
            return None
        assert isinstance(value, int | float)  # for mypy: `numeric` said so
        above = value > spec.lo if spec.lo_open else value >= spec.lo
        if above and value <= spec.hi:  # int/float comparisons are exact in Python, whatever the int's size
            return value if spec.integer else float(value)
        self.add(path, f"must be {kind} {'>' if spec.lo_open else '>='} {spec.lo:g} and <= {spec.hi:g}")
        return None

    def fields(self, value: object, path: str, specs: Mapping[str, _Field], required: bool) -> dict[str, Any] | None:
        """An object of fields; with `required`, every field must be present."""
        given = self.obj(value, path, specs)
        if given is None:
            return None
        before = len(self.violations)
        out = {key: self.field(given[key], f"{path}.{key}", spec) for key, spec in specs.items() if key in given}
        for key in specs:
            if required and key not in given:
                self.add(f"{path}.{key}", "is required")
        return out if len(self.violations) == before else None

    def keyed(self, value: object, path: str, keys: Collection[str], item: Callable[[object, str], Any]) -> Any:
        """An object mapping known keys (rules, scopes) to items checked by `item`."""
        given = self.obj(value, path, keys, "rule" if path in ("modes", "failure") else "scope")
        return None if given is None else {key: item(v, f"{path}.{key}") for key, v in given.items()}


def _limit(check: _Check, value: object, path: str) -> dict[str, Any] | None:
    return None if value is None else check.fields(value, path, _LIMIT, True)


def _lockout(check: _Check, value: object, path: str) -> dict[str, Any] | None:
    return None if value is None else check.fields(value, path, _LOCKOUT, True)


def _ring(check: _Check, value: object, path: str) -> list[list[float]] | None:
    """A closed ring of [lon, lat] positions, auto-closed when its last position differs from its first."""
    if not isinstance(value, list) or not 3 <= len(value) <= MAX_RING_POSITIONS:
        check.add(path, f"must be a list of 3..{MAX_RING_POSITIONS} [lon, lat] positions")
        return None
    ring: list[list[float]] = []
    for i, position in enumerate(value):
        if not (isinstance(position, list) and len(position) == 2):
            check.add(f"{path}[{i}]", "must be [lon, lat]")
            continue
        lon = check.number(position[0], f"{path}[{i}][0]", _Number(-180, 180, False))
        lat = check.number(position[1], f"{path}[{i}][1]", _Number(-90, 90, False))
        if lon is not None and lat is not None:
            ring.append([lon, lat])
    if len(ring) != len(value):
        return None
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    if not 4 <= len(ring) <= MAX_RING_POSITIONS:  # counted closed, so the stored form parses again
        check.add(path, f"must close with 4..{MAX_RING_POSITIONS} positions (the last one repeating the first)")
        return None
    return ring


def _polygon(check: _Check, value: object, path: str) -> dict[str, Any] | None:
    given = check.obj(value, path, ("exterior", "holes"))
    if given is None:
        return None
    exterior = _ring(check, given.get("exterior"), f"{path}.exterior")
    holes_in = given.get("holes", [])
    if not isinstance(holes_in, list) or len(holes_in) > MAX_HOLES:
        check.add(f"{path}.holes", f"must be a list of at most {MAX_HOLES} rings")
        return None
    holes = [hole for i, given_hole in enumerate(holes_in) if (hole := _ring(check, given_hole, f"{path}.holes[{i}]"))]
    if exterior is None or len(holes) != len(holes_in):
        return None
    if problem := geo.polygon_problem(exterior, holes):
        check.add(path, problem)
        return None
    return {"exterior": exterior, "holes": holes}


def _region(check: _Check, value: object, path: str) -> dict[str, Any] | None:
    given = check.obj(value, path, ("circle", "polygon"))
    if given is None:
        return None
    if len(given) != 1:
        check.add(path, "must hold exactly one of circle, polygon")
        return None
    if "circle" in given:
        circle = check.fields(given["circle"], f"{path}.circle", _CIRCLE, True)
        return None if circle is None else {"circle": circle}
    polygon = _polygon(check, given["polygon"], f"{path}.polygon")
    return None if polygon is None else {"polygon": polygon}


def _position_count(regions: list[Any]) -> int:
    """Positions in all rings, counted before checking them so a huge document is refused without that work."""
    polygons = [r["polygon"] for r in regions if isinstance(r, dict) and isinstance(r.get("polygon"), dict)]
    rings = [p.get("exterior") for p in polygons]
    rings += [hole for p in polygons if isinstance(p.get("holes"), list) for hole in p["holes"]]
    return sum(len(ring) for ring in rings if isinstance(ring, list))


def _regions(check: _Check, value: object, path: str) -> list[dict[str, Any] | None] | None:
    if not isinstance(value, list) or len(value) > MAX_REGIONS:
        check.add(path, f"must be a list of at most {MAX_REGIONS} regions")
        return None
    if _position_count(value) > MAX_POSITIONS:
        check.add(path, f"more than {MAX_POSITIONS} positions in all rings together")
        return None
    return [_region(check, region, f"{path}[{i}]") for i, region in enumerate(value)]


def _section(check: _Check, name: str, value: object) -> Any:
    """One top-level section, normalised (None after reporting a violation)."""
    if name == "modes":
        return check.keyed(value, name, _RULES, lambda v, p: check.field(v, p, _MODES))
    if name == "failure":
        return check.keyed(value, name, _RULES, lambda v, p: check.field(v, p, _FAILURES))
    if name == "limits":
        return check.keyed(value, name, _SCOPES, lambda v, p: _limit(check, v, p))
    if name == "lockout":
        return check.keyed(value, name, _LOCKOUT_SCOPES, lambda v, p: _lockout(check, v, p))
    if name == "regions":
        return _regions(check, value, name)
    return check.fields(value, name, _PLAIN_SECTIONS[name], False)


def parse_document(doc: object) -> dict[str, Any]:
    """Validate a whole policy document and return its normalised form (what gets stored).

    Raises PolicyError listing every violation - unknown keys, wrong types (a bool is not a number), NaN and
    infinities, out-of-range values, unusable polygons - each with its field path."""
    check = _Check()
    given = check.obj(doc, "", _SECTIONS, "section")
    if given is None:
        raise PolicyError([("", "a policy document must be a JSON object")])
    check.violations = [(path.lstrip("."), text) for path, text in check.violations]
    normalised = {name: _section(check, name, value) for name, value in given.items()}
    if check.violations:
        raise PolicyError(check.violations)
    return normalised


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A sliding-window limit; `per_campaign` when a campaign document set it (counted per campaign, else brand-wide
    with campaign 0 in the key)."""

    limit: int
    window_ms: int
    per_campaign: bool


@dataclass(frozen=True, slots=True)
class LockoutSpec:
    """`threshold` failures within `window_ms` lock the scope for `cooldown_ms`."""

    threshold: int
    window_ms: int
    cooldown_ms: int


@dataclass(frozen=True)
class Policy:
    """The effective policy of one (brand, campaign): defaults, brand document and campaign document resolved."""

    modes: Mapping[Rule, Mode]
    failure: Mapping[Rule, FailurePolicy]
    limits: Mapping[Scope, LimitSpec]
    lockout: Mapping[Scope, LockoutSpec]
    unknown_terminal: str
    missing_location: str
    max_accuracy_m: float
    regions: geo.Regions | None
    max_speed_mps: float
    travel_memory_ms: int
    device_uses: int  # 0: no device limit

    def mode(self, rule: Rule) -> Mode:
        """The rule's mode."""
        return self.modes[rule]


_DEFAULTS = parse_document(DEFAULT_DOCUMENT)  # also proves the defaults valid at import


def _merged(docs: Sequence[Mapping[str, Any]], section: str) -> dict[str, Any]:
    """A per-key section merged over the documents, later first; `null` entries removed."""
    merged: dict[str, Any] = {}
    for doc in docs:
        merged.update(doc.get(section, {}))
    return {key: value for key, value in merged.items() if value is not None}


def _plain(docs: Sequence[Mapping[str, Any]], section: str) -> dict[str, Any]:
    """A whole-section override: the last document having it, its absent keys from the defaults."""
    winner: Mapping[str, Any] = next((doc[section] for doc in reversed(docs) if section in doc), {})
    return {**_DEFAULTS[section], **winner}


def resolve(brand: Mapping[str, Any], campaign: Mapping[str, Any], regions: geo.Regions | None) -> Policy:
    """The effective policy of parsed brand and campaign documents (either may be `{}`); `regions` are the prepared
    regions of the document whose `regions` section wins."""
    docs = (_DEFAULTS, brand, campaign)
    own = campaign.get("limits", {})
    limits = {s: LimitSpec(v["limit"], v["window_s"] * 1000, s in own) for s, v in _merged(docs, "limits").items()}
    lockout = {
        s: LockoutSpec(v["threshold"], v["window_s"] * 1000, v["cooldown_s"] * 1000)
        for s, v in _merged(docs, "lockout").items()
    }
    location, travel = _plain(docs, "location"), _plain(docs, "travel")
    return Policy(
        modes=MappingProxyType({Rule(k): Mode(v) for k, v in _merged(docs, "modes").items()}),
        failure=MappingProxyType({Rule(k): FailurePolicy(v) for k, v in _merged(docs, "failure").items()}),
        limits=MappingProxyType({Scope(k): v for k, v in limits.items()}),
        lockout=MappingProxyType({Scope(k): v for k, v in lockout.items()}),
        unknown_terminal=_plain(docs, "terminals")["unknown"],
        missing_location=location["missing"],
        max_accuracy_m=float(location["max_accuracy_m"]),
        regions=None if regions is None or regions.empty else regions,
        max_speed_mps=travel["max_speed_kmh"] / 3.6,
        travel_memory_ms=travel["memory_s"] * 1000,
        device_uses=_plain(docs, "device_limit").get("uses", 0),
    )


DEFAULT_POLICY = resolve({}, {}, None)


class PolicyBook:
    """Every brand's and campaign's effective policy, resolved once when the registry loads its documents."""

    def __init__(self, policies: Mapping[tuple[int, int], Policy]) -> None:
        self._policies = dict(policies)

    @classmethod
    def empty(cls) -> PolicyBook:
        """A book without documents: every brand gets the defaults."""
        return cls({})

    @classmethod
    def from_documents(cls, docs: Mapping[tuple[int, int], Mapping[str, Any]]) -> PolicyBook:
        """A book of stored documents keyed (brand_id, campaign_id), campaign 0 for the brand's.

        Stored documents were validated on the way in; one that no longer parses is skipped with a warning (its
        brand and campaign, never its content) so one bad row cannot stop the gateway."""
        parsed = {key: doc for key, raw in docs.items() if (doc := _parsed(key, raw)) is not None}
        regions = {key: geo.Regions.from_specs(doc["regions"]) for key, doc in parsed.items() if "regions" in doc}
        policies: dict[tuple[int, int], Policy] = {}
        for brand_id, campaign_id in parsed:
            brand_key, own_key = (brand_id, 0), (brand_id, campaign_id)
            area = regions.get(own_key, regions.get(brand_key)) if campaign_id else regions.get(brand_key)
            campaign = parsed[own_key] if campaign_id else {}
            policies[own_key] = resolve(parsed.get(brand_key, {}), campaign, area)
        return cls(policies)

    def effective(self, brand_id: int, campaign_id: int) -> Policy:
        """The campaign's policy, else the brand's, else the defaults."""
        policies = self._policies
        policy = policies.get((brand_id, campaign_id)) or policies.get((brand_id, 0))
        return DEFAULT_POLICY if policy is None else policy


def _parsed(key: tuple[int, int], raw: object) -> dict[str, Any] | None:
    try:
        return parse_document(raw)
    except PolicyError as error:
        log.warning(
            "risk policy of brand %d campaign %d is invalid (%d violations); it is ignored",
            key[0],
            key[1],
            len(error.violations),
        )
        return None
