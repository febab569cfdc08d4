from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from risk import engine as engine_module
from risk import keys
from risk.engine import RiskEngine
from risk.geo import EARTH_RADIUS_M
from risk.model import (
    Assessment,
    DeviceRules,
    Finding,
    Lockout,
    Mode,
    Place,
    Reason,
    RiskRequest,
    Rule,
    Scope,
    StoreFacts,
    Travel,
    Window,
)
from risk.policy import PolicyBook

T0_MS = 1_780_272_000_000
METRES_PER_DEGREE = EARTH_RADIUS_M * math.pi / 180
STORE = StoreFacts("store-1", 52.3731, 4.8926, 300.0)
AT_STORE = Place(52.3731 + 100 / METRES_PER_DEGREE, 4.8926, accuracy_m=20)
FAR_AWAY = Place(52.3731 + 300_000 / METRES_PER_DEGREE, 4.8926, accuracy_m=20)
NETHERLANDS = {"polygon": {"exterior": [[3.3, 50.7], [7.2, 50.7], [7.2, 53.6], [3.3, 53.6]]}}


def request(**changes: Any) -> RiskRequest:
    base = RiskRequest(
        brand_id=7,
        campaign_id=3,
        client_id="cl_pos",
        store_id="store-1",
        terminal_id="till-1",
        device_id="dev-1",
        location=AT_STORE,
        code_ref="ref-1",
        now_ms=T0_MS,
        counts=True,
        store=STORE,
        terminal_store="store-1",
    )
    return dataclasses.replace(base, **changes)


def engine(brand: dict[str, Any] | None = None, campaign: dict[str, Any] | None = None) -> RiskEngine:
    docs = {(7, 0): brand or {}, (7, 3): campaign or {}}
    policies = PolicyBook.from_documents(docs)
    return RiskEngine(lambda: policies)


def modes(**rules: str) -> dict[str, Any]:
    return {"modes": rules}


def verdict(assessment: Assessment) -> tuple[Reason | None, list[Reason]]:
    denial = assessment.denial.reason if assessment.denial else None
    return denial, [f.reason for f in assessment.shadow]


# --- the plan -----------------------------------------------------------------------------------------------


def test_default_plan() -> None:
    assessment = engine().assess(request())
    assert (assessment.denial, assessment.shadow, assessment.bind_terminal) == (None, (), False)
    plan = assessment.plan
    assert plan.windows == (
        Window(
            Rule.RATE_LIMIT, Scope.CLIENT, "cl_pos", "rgw:{r7}:w:0:client:cl_pos", 60000, 60_000, Mode.ENFORCE, True
        ),
        Window(
            Rule.RATE_LIMIT,
            Scope.TERMINAL,
            "store-1/till-1",
            "rgw:{r7}:w:0:terminal:store-1/till-1",
            120,
            60_000,
            Mode.ENFORCE,
            True,
        ),
        Window(Rule.RATE_LIMIT, Scope.STORE, "store-1", "rgw:{r7}:w:0:store:store-1", 1200, 60_000, Mode.ENFORCE, True),
        Window(
            Rule.DEVICE_VELOCITY, Scope.DEVICE, "dev-1", "rgw:{r7}:w:0:device:dev-1", 20, 3_600_000, Mode.ENFORCE, False
        ),
        Window(Rule.CODE_VELOCITY, Scope.CODE, "ref-1", "rgw:{r7}:w:0:code:ref-1", 30, 60_000, Mode.ENFORCE, False),
    )
    assert [(lock.scope, lock.subject, lock.threshold) for lock in plan.lockouts] == [
        (Scope.TERMINAL, "store-1/till-1", 10),
        (Scope.STORE, "store-1", 50),
        (Scope.CLIENT, "cl_pos", 500),
    ]
    assert plan.lockouts[0] == Lockout(
        Scope.TERMINAL,
        "store-1/till-1",
        keys.lock_key(7, Scope.TERMINAL, "store-1/till-1"),
        keys.failures_key(7, Scope.TERMINAL, "store-1/till-1"),
        10,
        600_000,
        900_000,
        Mode.ENFORCE,
    )
    assert (plan.travel, plan.device, plan.events_key) == (None, DeviceRules(), "rgw:{r7}:events")


def test_no_device_or_code_window_without_a_device_or_code() -> None:
    plan = engine().assess(request(device_id="", code_ref="")).plan
    assert [w.scope for w in plan.windows] == [Scope.CLIENT, Scope.TERMINAL, Scope.STORE]


def test_window_modes_follow_their_rules() -> None:
    plan = engine(modes(rate_limit="off", device_velocity="shadow")).assess(request()).plan
    assert [(w.scope, w.mode, w.quota) for w in plan.windows] == [
        (Scope.DEVICE, Mode.SHADOW, False),
        (Scope.CODE, Mode.ENFORCE, False),
    ]
    plan = engine(modes(device_velocity="off", code_velocity="off")).assess(request()).plan
    assert all(w.rule is Rule.RATE_LIMIT and w.quota for w in plan.windows)


def test_brand_limit_and_per_campaign_keys() -> None:
    brand = {"limits": {"brand": {"limit": 5000, "window_s": 60}, "store": {"limit": 100, "window_s": 60}}}
    campaign = {"limits": {"terminal": {"limit": 5, "window_s": 10}, "client": None}}
    plan = engine(brand, campaign).assess(request()).plan
    assert {w.scope: (w.key, w.limit) for w in plan.windows} == {
        Scope.TERMINAL: ("rgw:{r7}:w:3:terminal:store-1/till-1", 5),  # set by the campaign: counted per campaign
        Scope.STORE: ("rgw:{r7}:w:0:store:store-1", 100),
        Scope.BRAND: ("rgw:{r7}:w:0:brand:-", 5000),
        Scope.DEVICE: ("rgw:{r7}:w:0:device:dev-1", 20),
        Scope.CODE: ("rgw:{r7}:w:0:code:ref-1", 30),
    }


def test_lockouts_off_or_removed() -> None:
    assert engine(modes(lockout="off")).assess(request()).plan.lockouts == ()
    plan = engine({"lockout": {"store": None}}, modes(lockout="shadow")).assess(request()).plan
    assert [(lock.scope, lock.mode) for lock in plan.lockouts] == [
        (Scope.TERMINAL, Mode.SHADOW),
        (Scope.CLIENT, Mode.SHADOW),
    ]


def test_failure_plan_has_the_lockouts_of_assess_only() -> None:
    risk = engine()
    plan = risk.failure_plan(7, "cl_pos", "store-1", "till-1")
    assert plan.lockouts == risk.assess(request()).plan.lockouts
    assert (plan.windows, plan.travel, plan.events_key) == ((), None, "rgw:{r7}:events")


def test_travel() -> None:
    on = modes(impossible_travel="enforce")
    plan = engine(on, {"travel": {"max_speed_kmh": 360, "memory_s": 3600}}).assess(request()).plan
    assert plan.travel == Travel(
        "rgw:{r7}:t:dev-1", 100.0, AT_STORE.latitude, AT_STORE.longitude, 3_600_000, Mode.ENFORCE
    )
    risk = engine(on)
    inaccurate = Place(52.0, 4.0, accuracy_m=5000)
    for skipped in (request(device_id=""), request(location=None), request(location=inaccurate)):
        assessment = risk.assess(skipped)
        assert (assessment.plan.travel, assessment.denial, assessment.shadow) == (None, None, ())
    assert engine().assess(request()).plan.travel is None


def test_device_rules() -> None:
    on = {"modes": {"device_binding": "enforce", "device_limit": "shadow"}, "device_limit": {"uses": 2}}
    assert engine(on).assess(request()).plan.device == DeviceRules(Mode.ENFORCE, 2, Mode.SHADOW)
    # The mode alone limits nothing.
    assert engine(modes(device_limit="enforce")).assess(request()).plan.device == DeviceRules(Mode.OFF, 0, Mode.OFF)


# --- terminal binding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("enforce", (Reason.TERMINAL_STORE_MISMATCH, [])),
        ("shadow", (None, [Reason.TERMINAL_STORE_MISMATCH])),
        ("off", (None, [])),
    ],
)
def test_terminal_registered_to_another_store(mode: str, expected: tuple[Reason | None, list[Reason]]) -> None:
    assessment = engine(modes(terminal_store=mode)).assess(request(terminal_store="store-2"))
    assert verdict(assessment) == expected
    if assessment.denial:
        assert assessment.denial == Finding(Rule.TERMINAL_STORE, Reason.TERMINAL_STORE_MISMATCH, Mode.ENFORCE)
        assert assessment.plan.events_key  # the plan is still built: the denial is recorded through it


@pytest.mark.parametrize(
    ("unknown", "counts", "expected", "bind"),
    [
        ("allow", True, (None, []), False),
        ("bind_first", True, (None, []), True),
        ("bind_first", False, (None, []), False),  # Validate never binds
        ("deny", True, (Reason.UNKNOWN_TERMINAL, []), False),
    ],
)
def test_unknown_terminal(unknown: str, counts: bool, expected: tuple[Reason | None, list[Reason]], bind: bool) -> None:
    assessment = engine({"terminals": {"unknown": unknown}}).assess(request(terminal_store=None, counts=counts))
    assert (verdict(assessment), assessment.bind_terminal) == (expected, bind)


def test_unknown_terminal_in_shadow_mode() -> None:
    doc = {"terminals": {"unknown": "deny"}, "modes": {"terminal_store": "shadow"}}
    assert verdict(engine(doc).assess(request(terminal_store=None))) == (None, [Reason.UNKNOWN_TERMINAL])


# --- store geofence ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (AT_STORE, None),
        (FAR_AWAY, Reason.OUTSIDE_STORE_RADIUS),
        (None, Reason.LOCATION_REQUIRED),
        (Place(52.3731, 4.8926, accuracy_m=1001), Reason.LOCATION_TOO_INACCURATE),
    ],
)
def test_store_geofence(location: Place | None, expected: Reason | None) -> None:
    assessment = engine(modes(store_geofence="enforce")).assess(request(location=location))
    assert verdict(assessment) == (expected, [])
    if expected:
        assert assessment.denial == Finding(Rule.STORE_GEOFENCE, expected, Mode.ENFORCE)


def test_store_geofence_in_shadow_and_off() -> None:
    assert verdict(engine(modes(store_geofence="shadow")).assess(request(location=FAR_AWAY))) == (
        None,
        [Reason.OUTSIDE_STORE_RADIUS],
    )
    assert verdict(engine().assess(request(location=FAR_AWAY))) == (None, [])


def test_store_geofence_admits_without_a_location_when_the_policy_allows() -> None:
    doc = {"modes": {"store_geofence": "enforce"}, "location": {"missing": "allow"}}
    risk = engine(doc)
    assert verdict(risk.assess(request(location=None))) == (None, [])
    assert verdict(risk.assess(request(location=Place(52.0, 4.0, accuracy_m=5000)))) == (None, [])


@pytest.mark.parametrize(("failure", "expected"), [("closed", Reason.RISK_DATA_UNAVAILABLE), ("open", None)])
def test_unregistered_store(failure: str, expected: Reason | None) -> None:
    doc = {"modes": {"store_geofence": "enforce"}, "failure": {"store_geofence": failure}}
    risk = engine(doc)
    assert verdict(risk.assess(request(store=None))) == (expected, [])
    assert verdict(risk.assess(request(store=None, location=None))) == (expected, [])  # the store decides first
    no_radius = dataclasses.replace(STORE, radius_m=0.0)
    assert verdict(risk.assess(request(store=no_radius))) == (expected, [])


# --- campaign region --------------------------------------------------------------------------------------------


def test_campaign_region() -> None:
    risk = engine({"regions": [NETHERLANDS]}, modes(campaign_region="enforce"))
    assert verdict(risk.assess(request())) == (None, [])
    assert verdict(risk.assess(request(location=Place(48.8566, 2.3522)))) == (Reason.OUTSIDE_CAMPAIGN_REGION, [])
    assert verdict(risk.assess(request(location=None))) == (Reason.LOCATION_REQUIRED, [])
    inaccurate = Place(52.0, 5.0, accuracy_m=2000)
    assert verdict(risk.assess(request(location=inaccurate))) == (Reason.LOCATION_TOO_INACCURATE, [])


def test_campaign_region_is_skipped_without_regions() -> None:
    assert verdict(engine(modes(campaign_region="enforce")).assess(request(location=None))) == (None, [])


def test_campaign_region_in_shadow_mode() -> None:
    risk = engine({"regions": [NETHERLANDS], "modes": {"campaign_region": "shadow"}})
    assert verdict(risk.assess(request(location=Place(48.8566, 2.3522)))) == (None, [Reason.OUTSIDE_CAMPAIGN_REGION])


# --- several findings -------------------------------------------------------------------------------------------


def test_denial_is_the_first_enforced_finding_and_shadow_lists_the_rest() -> None:
    doc = {
        "regions": [NETHERLANDS],
        "modes": {"terminal_store": "shadow", "store_geofence": "enforce", "campaign_region": "enforce"},
    }
    paris = Place(48.8566, 2.3522)
    assessment = engine(doc).assess(request(terminal_store="store-2", location=paris))
    assert assessment.denial == Finding(Rule.STORE_GEOFENCE, Reason.OUTSIDE_STORE_RADIUS, Mode.ENFORCE)
    assert assessment.shadow == (Finding(Rule.TERMINAL_STORE, Reason.TERMINAL_STORE_MISMATCH, Mode.SHADOW),)
    doc["modes"] = {"store_geofence": "shadow", "campaign_region": "shadow"}
    assert verdict(engine(doc).assess(request(location=paris))) == (
        None,
        [Reason.OUTSIDE_STORE_RADIUS, Reason.OUTSIDE_CAMPAIGN_REGION],
    )


# --- books --------------------------------------------------------------------------------------------------------


def test_the_engine_follows_book_swaps() -> None:
    books = [PolicyBook.empty()]
    risk = RiskEngine(lambda: books[-1])
    assert verdict(risk.assess(request(terminal_store=None))) == (None, [])
    assert len(risk.assess(request()).plan.lockouts) == 3
    books.append(PolicyBook.from_documents({(7, 0): {"terminals": {"unknown": "deny"}, "modes": {"lockout": "off"}}}))
    assert verdict(risk.assess(request(terminal_store=None))) == (Reason.UNKNOWN_TERMINAL, [])
    assert risk.assess(request()).plan.lockouts == ()
    assert risk.policy(7, 3).unknown_terminal == "deny"


def test_caller_parts_are_reused_and_subjects_stay_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    risk = engine()
    first, second = risk.assess(request(device_id="dev-1")).plan, risk.assess(request(device_id="dev-2")).plan
    assert first.windows[0] is second.windows[0] and first.lockouts is second.lockouts
    assert (first.windows[3].subject, second.windows[3].subject) == ("dev-1", "dev-2")
    monkeypatch.setattr(engine_module, "CALLER_CACHE_SIZE", 1)
    for till in ("till-1", "till-2", "till-1", "till-3"):
        plan = risk.assess(request(terminal_id=till)).plan
        assert plan.windows[1].key == f"rgw:{{r7}}:w:0:terminal:store-1/{till}"
        assert plan.lockouts[0].lock_key == f"rgw:{{r7}}:lock:terminal:store-1/{till}"
    assert risk.failure_plan(7, "cl_other", "store-9", "t").lockouts[2].failures_key == "rgw:{r7}:f:client:cl_other"


def test_campaigns_sharing_the_brand_policy_share_its_keys() -> None:
    risk = engine(campaign={"limits": {"store": {"limit": 5, "window_s": 60}}})
    own = {w.scope: w.key for w in risk.assess(request(campaign_id=3)).plan.windows}
    other = {w.scope: w.key for w in risk.assess(request(campaign_id=4)).plan.windows}
    assert (own[Scope.STORE], other[Scope.STORE]) == ("rgw:{r7}:w:3:store:store-1", "rgw:{r7}:w:0:store:store-1")
    assert own[Scope.CLIENT] == other[Scope.CLIENT] == "rgw:{r7}:w:0:client:cl_pos"
