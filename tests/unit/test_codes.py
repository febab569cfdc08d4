from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import codes
from gateway.codes import ALPHABET, CodeFormatError, Route

routes = st.builds(Route, st.integers(1, codes.MAX_CAMPAIGN_ID), st.integers(0, codes.MAX_SHARDS - 1))


@given(routes, st.integers(0, 2**65 - 1))
def test_generated_code_parses_back_to_its_route(route: Route, randbits: int) -> None:
    code = codes.generate(route, randbits)
    assert codes.parse(code) == route
    assert set(code) <= set(ALPHABET)


def test_alphabet_has_no_look_alikes() -> None:
    assert len(set(ALPHABET)) == 32
    assert not set(ALPHABET) & set("01OI")


def test_random_part_carries_at_least_60_bits() -> None:
    assert 5 * codes.RANDOM_CHARS >= 60
    generated = {codes.generate(Route(7, 0)) for _ in range(2000)}
    assert len(generated) == 2000


def test_short_code_for_small_campaign() -> None:
    code = codes.generate(Route(1, 0), 0)
    assert len(code) == codes.MIN_LENGTH == 17


@given(routes, st.integers(0, 2**65 - 1), st.data())
def test_every_single_character_typo_is_caught(route: Route, randbits: int, data: st.DataObject) -> None:
    code = codes.generate(route, randbits)
    position = data.draw(st.integers(0, len(code) - 1))
    wrong = data.draw(st.sampled_from([ch for ch in ALPHABET if ch != code[position]]))
    typo = code[:position] + wrong + code[position + 1 :]
    assert not codes.has_valid_check(typo)
    with pytest.raises(CodeFormatError):
        codes.parse(typo)


def test_most_neighbour_swaps_are_caught() -> None:
    caught = total = 0
    for n in range(300):
        code = codes.generate(Route(n + 1, n % 3), n * 7919)
        for i in range(len(code) - 1):
            if code[i] == code[i + 1]:
                continue
            swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
            total += 1
            caught += not codes.has_valid_check(swapped)
    assert caught / total > 0.99


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("abcd-efgh jk", "ABCDEFGHJK"), ("  x-y ", "XY"), ("a\tb", "AB")],
)
def test_normalise_ignores_case_spaces_and_dashes(raw: str, expected: str) -> None:
    assert codes.normalise(raw) == expected


def test_grouped_lowercase_code_is_accepted() -> None:
    code = codes.generate(Route(42, 3))
    grouped = "-".join(code[i : i + 4] for i in range(0, len(code), 4)).lower()
    assert codes.parse(codes.normalise(grouped)) == Route(42, 3)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("", "characters"),
        ("A" * 40, "characters"),
        ("0" * 17, "may contain only"),
    ],
)
def test_malformed_codes_are_rejected_with_a_reason(code: str, message: str) -> None:
    with pytest.raises(CodeFormatError, match=message):
        codes.parse(code)


def test_reserved_header_is_rejected() -> None:
    payload = ALPHABET[30] + "2" * 15
    with pytest.raises(CodeFormatError, match="layout"):
        codes.parse(payload + codes.check_character(payload))


def test_route_limits() -> None:
    with pytest.raises(ValueError):
        codes.generate(Route(0, 0))
    with pytest.raises(ValueError):
        codes.generate(Route(1, codes.MAX_SHARDS))
