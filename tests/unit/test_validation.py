from __future__ import annotations

import math

import pytest

from gateway import codes
from gateway.coderefs import KeyRing
from gateway.domain import Caller, Location, PermissionDenied, RedeemInput
from gateway.validation import InvalidRequest, check_redeem

RING = KeyRing({"k": b"k" * 32}, "k")
CALLER = Caller(client_id="cl_pos", brand_id=7, role="pos")
CODE = codes.generate(codes.Route(5, 0))


def request(**changes: object) -> RedeemInput:
    fields: dict[str, object] = {
        "code": CODE,
        "idempotency_key": "key-1",
        "store_id": "store-1",
        "terminal_id": "till-1",
        "customer_device_id": "",
        "location": None,
    }
    fields.update(changes)
    return RedeemInput(**fields)  # type: ignore[arg-type]


def violations(req: RedeemInput) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as info:
        check_redeem(req, RING, CALLER)
    return {v.field: v.description for v in info.value.violations}


def test_valid_request_becomes_a_command() -> None:
    command = check_redeem(request(code=CODE.lower()), RING, CALLER)
    assert command.lookup.route == codes.Route(5, 0)
    assert (command.client_id, command.brand_id, command.store_id, command.terminal_id) == (
        "cl_pos",
        7,
        "store-1",
        "till-1",
    )
    assert len(command.fingerprint) == 32


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"code": ""}, "code"),
        ({"code": "A" * 10_000}, "code"),
        ({"code": CODE[:-1] + ("2" if CODE[-1] != "2" else "3")}, "code"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 129}, "idempotency_key"),
        ({"store_id": "has space"}, "store_id"),
        ({"terminal_id": ""}, "terminal_id"),
        ({"customer_device_id": "ü"}, "customer_device_id"),
        ({"location": Location(91, 0, 5)}, "location.latitude"),
        ({"location": Location(0, -180.5, 5)}, "location.longitude"),
        ({"location": Location(0, 0, -1)}, "location.accuracy_m"),
        ({"location": Location(math.nan, 0, 1)}, "location.latitude"),
    ],
)
def test_each_bad_field_is_named(changes: dict[str, object], field: str) -> None:
    assert field in violations(request(**changes))


def test_all_problems_are_reported_together() -> None:
    found = violations(request(code="", store_id="", location=Location(0, 0, math.inf)))
    assert set(found) == {"code", "store_id", "location.accuracy_m"}


def test_violation_never_echoes_the_code() -> None:
    bad = CODE[:-1] + ("2" if CODE[-1] != "2" else "3")
    assert all(bad not in text for text in violations(request(code=bad)).values())


def test_fingerprint_changes_with_the_request_but_not_with_code_formatting() -> None:
    base = check_redeem(request(), RING, CALLER).fingerprint
    assert check_redeem(request(code=CODE.lower()), RING, CALLER).fingerprint == base
    assert check_redeem(request(store_id="store-2"), RING, CALLER).fingerprint != base
    assert check_redeem(request(location=Location(1, 2, 3)), RING, CALLER).fingerprint != base
    assert check_redeem(request(idempotency_key="other"), RING, CALLER).fingerprint == base


@pytest.mark.parametrize(
    ("bound", "changes"),
    [
        (Caller("cl", 7, "pos", store_id="store-2"), {}),
        (Caller("cl", 7, "pos", store_id="store-1", terminal_id="till-9"), {}),
        (Caller("cl", 7, "pos", store_id="store-1", terminal_id="till-1"), {"store_id": "store-3"}),
    ],
)
def test_a_bound_key_acts_only_for_its_store_and_terminal(bound: Caller, changes: dict[str, object]) -> None:
    with pytest.raises(PermissionDenied):
        check_redeem(request(**changes), RING, bound)


def test_a_bound_key_acts_for_its_own_store_and_terminal() -> None:
    bound = Caller("cl", 7, "pos", store_id="store-1", terminal_id="till-1")
    assert check_redeem(request(), RING, bound).store_id == "store-1"


def test_bad_fields_are_reported_before_the_binding() -> None:
    with pytest.raises(InvalidRequest):
        check_redeem(request(code="", store_id="elsewhere"), RING, Caller("cl", 7, "pos", store_id="store-1"))
