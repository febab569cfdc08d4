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
    [("abcd-efgh jk", "ABCDEFGHJK"), ("  x-y ", "XY"), ("zz--22", "ZZ22")],
)
def test_normalise_ignores_case_spaces_and_dashes(raw: str, expected: str) -> None:
    assert codes.normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "a\tb",  # a tab: only spaces and dashes are separators
        "ab\n",
        "a\x00b",
        "\u017f",  # LATIN SMALL LETTER LONG S: str.upper() makes it "S"
        "\ufb00",  # LATIN SMALL LIGATURE FF → "FF"
        "\ufb05",  # LIGATURE LONG S T → "ST"
        "\ufb06",  # LIGATURE ST → "ST"
        "\uff21",  # FULLWIDTH A
        "\u0410",  # CYRILLIC A
        "a\u2010b",  # HYPHEN, not hyphen-minus
        "a\u00a0b",  # NO-BREAK SPACE
        "o",  # a letter outside the alphabet, either case
        "1",
    ],
)
def test_normalise_refuses_every_other_character(raw: str) -> None:
    with pytest.raises(CodeFormatError, match="may contain only"):
        codes.normalise(raw)


def test_a_look_alike_never_becomes_a_valid_code() -> None:
    """Regression: str.upper() maps U+017F to "S" and U+FB05 to "ST", which let disguised codes through."""
    code = next(c for n in range(1000) if "ST" in (c := codes.generate(Route(7, 0), randbits=n * 7919)))
    assert codes.parse(codes.normalise(code)) == Route(7, 0)
    for disguise in (code.replace("S", "\u017f", 1), code.replace("ST", "\ufb05", 1), code.replace("ST", "\ufb06", 1)):
        with pytest.raises(CodeFormatError, match="may contain only"):
            codes.normalise(disguise)


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
