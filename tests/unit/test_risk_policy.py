from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk.model import FailurePolicy, Mode, Place, Rule, Scope
from risk.policy import (
    DEFAULT_DOCUMENT,
    DEFAULT_POLICY,
    LimitSpec,
    LockoutSpec,
    PolicyBook,
    PolicyError,
    parse_document,
)

SQUARE = [[13.0, 52.0], [14.0, 52.0], [14.0, 53.0], [13.0, 53.0], [13.0, 52.0]]


def violations(doc: object) -> dict[str, str]:
    with pytest.raises(PolicyError) as info:
        parse_document(doc)
    assert all(len(text) <= 96 for _, text in info.value.violations)
    return dict(info.value.violations)


def book(docs: dict[tuple[int, int], dict[str, Any]]) -> PolicyBook:
    return PolicyBook.from_documents(docs)


def test_defaults() -> None:
    assert parse_document(DEFAULT_DOCUMENT)["limits"]["terminal"] == {"limit": 120, "window_s": 60}
    policy = PolicyBook.empty().effective(7, 3)
    assert policy is DEFAULT_POLICY
    on = {Rule.RATE_LIMIT, Rule.DEVICE_VELOCITY, Rule.CODE_VELOCITY, Rule.LOCKOUT, Rule.TERMINAL_STORE}
    assert {rule for rule in Rule if policy.mode(rule) is Mode.ENFORCE} == on
    assert {rule for rule in Rule if policy.mode(rule) is Mode.OFF} == set(Rule) - on
    opened = {Rule.RATE_LIMIT, Rule.DEVICE_VELOCITY, Rule.CODE_VELOCITY, Rule.IMPOSSIBLE_TRAVEL}
    assert {rule for rule, f in policy.failure.items() if f is FailurePolicy.OPEN} == opened
    assert len(policy.failure) == len(Rule)
    assert dict(policy.limits) == {
        Scope.TERMINAL: LimitSpec(120, 60_000, False),
        Scope.STORE: LimitSpec(1200, 60_000, False),
        Scope.CLIENT: LimitSpec(60000, 60_000, False),
        Scope.DEVICE: LimitSpec(20, 3_600_000, False),
        Scope.CODE: LimitSpec(30, 60_000, False),
    }
    assert policy.lockout[Scope.TERMINAL] == LockoutSpec(10, 600_000, 900_000)
    assert policy.lockout[Scope.STORE] == LockoutSpec(50, 600_000, 900_000)
    assert policy.lockout[Scope.CLIENT] == LockoutSpec(500, 600_000, 900_000)
    assert (policy.unknown_terminal, policy.missing_location, policy.max_accuracy_m) == ("allow", "deny", 1000.0)
    assert policy.max_speed_mps == pytest.approx(250.0)
    assert (policy.travel_memory_ms, policy.device_uses, policy.regions) == (86_400_000, 0, None)


def test_every_violation_is_listed_with_its_path() -> None:
    found = violations(
        {
            "modes": {"rate_limit": "on", "geofence": "enforce"},
            "failure": {"lockout": "closed", "rate_limit": True},
            "limits": {"terminal": {"limit": True, "window_s": 0}, "planet": None, "code": {"limit": 5}},
            "lockout": {"store": {"threshold": 5, "window_s": 60, "cooldown_s": 60, "x": 1}, "device": None},
            "terminals": {"unknown": "maybe"},
            "location": {"missing": "deny", "max_accuracy_m": math.nan},
            "travel": {"max_speed_kmh": 0, "memory_s": 59},
            "device_limit": {"uses": 1.5},
            "regions": [{"circle": {"lat": 91, "lon": 0, "radius_m": math.inf}}, {"polygon": {"exterior": []}}],
            "extra": {},
        }
    )
    assert found == {
        "modes.rate_limit": "must be one of off, shadow, enforce",
        "modes.geofence": "unknown rule",
        "failure.rate_limit": "must be one of open, closed",
        "limits.terminal.limit": "must be an integer",
        "limits.terminal.window_s": "must be an integer >= 1 and <= 86400",
        "limits.planet": "unknown scope; expected one of client, terminal, store, brand, device, code",
        "limits.code.window_s": "is required",
        "lockout.store.x": "unknown key; expected one of threshold, window_s, cooldown_s",
        "lockout.device": "unknown scope; expected one of terminal, store, client",
        "terminals.unknown": "must be one of allow, bind_first, deny",
        "location.max_accuracy_m": "must be a finite number",
        "travel.max_speed_kmh": "must be a finite number > 0 and <= 1e+09",
        "travel.memory_s": "must be an integer >= 60 and <= 604800",
        "device_limit.uses": "must be an integer",
        "regions[0].circle.lat": "must be a finite number >= -90 and <= 90",
        "regions[0].circle.radius_m": "must be a finite number",
        "regions[1].polygon.exterior": "must be a list of 3..1000 [lon, lat] positions",
        "extra": "unknown section",
    }


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ([], ""),
        ({"modes": []}, "modes"),
        ({"limits": {"store": {"limit": 0, "window_s": 60}}}, "limits.store.limit"),
        ({"limits": {"store": {"limit": 10**10, "window_s": 60}}}, "limits.store.limit"),
        ({"limits": {"store": {"limit": 1, "window_s": "60"}}}, "limits.store.window_s"),
        ({"lockout": {"client": {"threshold": 10001, "window_s": 1, "cooldown_s": 1}}}, "lockout.client.threshold"),
        ({"lockout": {"client": {"threshold": 1, "window_s": 1, "cooldown_s": 604801}}}, "lockout.client.cooldown_s"),
        ({"location": {"max_accuracy_m": 0.5}}, "location.max_accuracy_m"),
        ({"location": {"max_accuracy_m": True}}, "location.max_accuracy_m"),
        ({"location": {"max_accuracy_m": 10**400}}, "location.max_accuracy_m"),
        ({"travel": {"max_speed_kmh": 10**400}}, "travel.max_speed_kmh"),
        ({"travel": {"memory_s": 10**400}}, "travel.memory_s"),
        ({"travel": {"max_speed_kmh": -math.inf}}, "travel.max_speed_kmh"),
        ({"regions": {}}, "regions"),
        ({"regions": [{}]}, "regions[0]"),
        ({"regions": [{"circle": {"lat": 0, "lon": 0, "radius_m": 1}, "polygon": {}}]}, "regions[0]"),
        ({"regions": [{"circle": {"lat": 0, "lon": 0, "radius_m": 0}}]}, "regions[0].circle.radius_m"),
        ({"regions": [{"circle": {"lat": 0, "lon": 181, "radius_m": 1}}]}, "regions[0].circle.lon"),
        ({"regions": [{"polygon": {"holes": []}}]}, "regions[0].polygon.exterior"),
        ({"regions": [{"polygon": {"exterior": SQUARE, "holes": {}}}]}, "regions[0].polygon.holes"),
        ({"regions": [{"polygon": {"exterior": [[0, 0], [1, 0], [0, 0]]}}]}, "regions[0].polygon.exterior"),
        (
            {"regions": [{"polygon": {"exterior": [[0, 0], [1, 0], [1, 1], [0, 0, 5]]}}]},
            "regions[0].polygon.exterior[3]",
        ),
        ({"regions": [{"polygon": {"exterior": [[0, 0], [1, 0], [1, 91]]}}]}, "regions[0].polygon.exterior[2][1]"),
        (
            {"regions": [{"polygon": {"exterior": [[0, 0], [1, 0], [1, 1]], "holes": [[[5, 5]]]}}]},
            "regions[0].polygon.holes[0]",
        ),
    ],
)
def test_single_violations(doc: object, path: str) -> None:
    assert list(violations(doc)) == [path]


def test_invalid_polygons_are_refused_with_their_region_path() -> None:
    bow_tie = [[0, 0], [1, 1], [1, 0], [0, 1]]
    around = [[10, 0], [100, 0], [179, 0], [-179, 1], [-100, 1], [-10, 1]]
    hole_outside = [[20, 20], [21, 20], [21, 21]]
    found = violations(
        {
            "regions": [
                {"circle": {"lat": 0, "lon": 0, "radius_m": 10}},
                {"polygon": {"exterior": bow_tie}},
                {"polygon": {"exterior": around}},
                {"polygon": {"exterior": SQUARE, "holes": [hole_outside]}},
            ]
        }
    )
    assert list(found) == ["regions[1].polygon", "regions[2].polygon", "regions[3].polygon"]
    assert found["regions[1].polygon"].startswith("invalid polygon: Self-intersection")
    assert "180 degrees" in found["regions[2].polygon"]


def test_size_bounds() -> None:
    circle = {"circle": {"lat": 0, "lon": 0, "radius_m": 10}}
    assert list(violations({"regions": [circle] * 65})) == ["regions"]
    long_ring = [[i / 1000, 0.0] for i in range(1000)] + [[0.5, 1.0]]
    assert list(violations({"regions": [{"polygon": {"exterior": long_ring}}]})) == ["regions[0].polygon.exterior"]
    open_ring = [[i / 1000, 0.0] for i in range(999)] + [[0.5, 1.0]]  # 1000 positions, 1001 once closed
    assert list(violations({"regions": [{"polygon": {"exterior": open_ring}}]})) == ["regions[0].polygon.exterior"]
    ring = [*open_ring[:998], [0.5, 1.0], [0.0, 0.0]]  # 1000 positions, closed
    assert parse_document({"regions": [{"polygon": {"exterior": ring}}]})
    many = [{"polygon": {"exterior": ring}}] * 21
    assert violations({"regions": many}) == {"regions": "more than 20000 positions in all rings together"}
    holes = {"polygon": {"exterior": SQUARE, "holes": [SQUARE] * 65}}
    assert list(violations({"regions": [holes]})) == ["regions[0].polygon.holes"]


def test_a_hostile_key_is_shortened_in_its_path() -> None:
    path = next(iter(violations({"modes": {"x" * 10_000: "off"}})))
    assert path == "modes." + "x" * 37 + "..."


def test_normalised_document() -> None:
    doc = parse_document(
        {
            "location": {"max_accuracy_m": 50},
            "regions": [{"polygon": {"exterior": [[13, 52], [14, 52], [14, 53]]}}],
            "limits": {"brand": None},
        }
    )
    assert doc["location"] == {"max_accuracy_m": 50.0}
    assert isinstance(doc["location"]["max_accuracy_m"], float)
    assert doc["regions"][0]["polygon"] == {"exterior": [[13, 52], [14, 52], [14, 53], [13, 52]], "holes": []}
    assert doc["limits"] == {"brand": None}
    assert parse_document(doc) == doc  # normalising is idempotent


def test_campaign_document_overrides_the_brand_document() -> None:
    brand = {
        "modes": {"store_geofence": "shadow", "device_limit": "enforce"},
        "limits": {"brand": {"limit": 5000, "window_s": 60}, "terminal": {"limit": 60, "window_s": 60}},
        "lockout": {"store": None},
        "location": {"missing": "allow", "max_accuracy_m": 200},
        "device_limit": {"uses": 3},
    }
    campaign = {
        "modes": {"store_geofence": "enforce"},
        "limits": {"terminal": {"limit": 10, "window_s": 30}, "code": None},
        "location": {"max_accuracy_m": 50},
    }
    policies = book({(7, 0): brand, (7, 3): campaign})
    brand_policy, campaign_policy = policies.effective(7, 0), policies.effective(7, 3)
    assert brand_policy.mode(Rule.STORE_GEOFENCE) is Mode.SHADOW
    assert campaign_policy.mode(Rule.STORE_GEOFENCE) is Mode.ENFORCE
    assert campaign_policy.mode(Rule.DEVICE_LIMIT) is Mode.ENFORCE  # inherited per key
    assert campaign_policy.limits[Scope.TERMINAL] == LimitSpec(10, 30_000, True)
    assert campaign_policy.limits[Scope.BRAND] == LimitSpec(5000, 60_000, False)
    assert brand_policy.limits[Scope.TERMINAL] == LimitSpec(60, 60_000, False)
    assert Scope.CODE in brand_policy.limits and Scope.CODE not in campaign_policy.limits  # null removes
    assert Scope.STORE not in campaign_policy.lockout and Scope.TERMINAL in campaign_policy.lockout
    # A plain section is replaced whole: the campaign's location takes `missing` from the defaults, not the brand.
    assert (brand_policy.missing_location, brand_policy.max_accuracy_m) == ("allow", 200.0)
    assert (campaign_policy.missing_location, campaign_policy.max_accuracy_m) == ("deny", 50.0)
    assert campaign_policy.device_uses == 3


def test_campaigns_without_a_document_get_the_brand_policy() -> None:
    policies = book({(7, 0): {"terminals": {"unknown": "deny"}}, (8, 4): {"terminals": {"unknown": "bind_first"}}})
    assert policies.effective(7, 99) is policies.effective(7, 0)
    assert policies.effective(7, 99).unknown_terminal == "deny"
    assert policies.effective(8, 4).unknown_terminal == "bind_first"
    assert policies.effective(8, 0) is DEFAULT_POLICY
    assert policies.effective(9, 1) is DEFAULT_POLICY


def test_regions_come_from_the_document_that_has_them_and_are_prepared_once() -> None:
    square = {"regions": [{"polygon": {"exterior": SQUARE}}]}
    policies = book({(7, 0): square, (7, 1): {"modes": {"campaign_region": "enforce"}}, (7, 2): {"regions": []}})
    brand_regions = policies.effective(7, 0).regions
    assert brand_regions is not None and brand_regions.contains(Place(52.5, 13.5))
    assert policies.effective(7, 1).regions is brand_regions
    assert policies.effective(7, 2).regions is None  # an empty list removes the brand's regions
    assert policies.effective(7, 1) is policies.effective(7, 1)


def test_a_bad_stored_document_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rgw.risk")
    secret = "brand-secret-label"
    policies = book({(7, 0): {"terminals": {"unknown": "deny"}}, (7, 3): {secret: 1}})
    assert policies.effective(7, 3).unknown_terminal == "deny"  # falls back to the brand's
    assert [r.getMessage() for r in caplog.records] == [
        "risk policy of brand 7 campaign 3 is invalid (1 violations); it is ignored"
    ]
    assert secret not in caplog.text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
SECTION_NAMES = st.sampled_from(list(DEFAULT_DOCUMENT))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(SECTION_NAMES, JSON, max_size=4) | JSON)
def test_any_json_is_either_a_document_or_a_policy_error(doc: object) -> None:
    try:
        normalised = parse_document(doc)
    except PolicyError as error:
        assert error.violations
        assert all(len(text) <= 96 for _, text in error.violations)
    else:
        assert parse_document(normalised) == normalised
        PolicyBook.from_documents({(1, 0): normalised}).effective(1, 0)


def test_policy_error_is_a_value_error_with_a_summary() -> None:
    with pytest.raises(ValueError, match=r"^2 policy violation\(s\): modes: must be an object; limits: "):
        parse_document({"modes": 1, "limits": 2})


def test_policies_of_equal_documents_are_equal() -> None:
    doc = {"regions": [{"polygon": {"exterior": SQUARE}}, {"circle": {"lat": 1, "lon": 2, "radius_m": 3}}]}
    assert book({(1, 0): doc}).effective(1, 0) == book({(2, 0): doc}).effective(2, 0)
    assert book({(1, 0): doc}).effective(1, 0) != book({(1, 0): {}}).effective(1, 0)
