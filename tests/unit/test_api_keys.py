"""API keys: the format round-trips, anything else is refused quietly, and the secret never shows."""

from __future__ import annotations

import re

import pytest

from gateway.tenancy import api_keys
from gateway.tenancy.api_keys import ParsedKey

# The secret-scanner pattern of the module docstring.
SCANNER = re.compile(r"\brgw_(live|test|dev)_[a-z2-7]{12}_[a-z2-7]{32}\b")


@pytest.mark.parametrize("env", api_keys.ENVIRONMENTS)
def test_a_generated_key_round_trips(env: str) -> None:
    parsed, plaintext = api_keys.generate(env)
    assert api_keys.parse(plaintext) == parsed
    assert plaintext == parsed.plaintext and plaintext.startswith(f"rgw_{env}_{parsed.key_id}_")
    assert len(parsed.key_id) == 12 and len(parsed.secret) == 32
    assert SCANNER.fullmatch(plaintext) and SCANNER.search(f"leaked: {plaintext}.")


def test_a_thousand_keys_parse_and_are_unique() -> None:
    keys = [api_keys.generate("live")[1] for _ in range(1000)]
    assert all(api_keys.parse(key) is not None for key in keys)
    assert len(set(keys)) == 1000
    assert len({api_keys.parse(key).key_id for key in keys}) == 1000  # type: ignore[union-attr]


def test_an_unknown_environment_cannot_be_generated() -> None:
    with pytest.raises(ValueError, match="env"):
        api_keys.generate("prod")


GOOD = "rgw_live_abcdefgh2345_" + "a" * 32
MALFORMED = [
    "",
    "rgw",
    "RGW_live_abcdefgh2345_" + "a" * 32,  # prefix case
    "rgx_live_abcdefgh2345_" + "a" * 32,  # wrong prefix
    "rgw_prod_abcdefgh2345_" + "a" * 32,  # unknown env
    "rgw_Live_abcdefgh2345_" + "a" * 32,
    "rgw_live_abcdefgh234_" + "a" * 32,  # key id too short
    "rgw_live_abcdefgh23456_" + "a" * 32,  # key id too long
    "rgw_live_abcdefgh2345_" + "a" * 31,  # secret too short
    "rgw_live_abcdefgh2345_" + "a" * 33,  # secret too long
    "rgw_live_abcdefgh2341_" + "a" * 32,  # 1 is not base32
    "rgw_live_abcdefgh2345_" + "a" * 31 + "0",  # 0 is not base32
    "rgw_live_ABCDEFGH2345_" + "a" * 32,  # upper case
    "rgw_live_abcdefgh2345_" + "A" * 32,
    "rgw_live_abcdefgh2345__" + "a" * 32,  # extra underscore
    "rgw__live_abcdefgh2345_" + "a" * 32,
    "rgw_live_abcdefgh2345_" + "a" * 16 + "_" + "a" * 15,
    GOOD + "\n",  # a trailing newline is not the key
    " " + GOOD,
    GOOD.replace("a", "\u0430"),  # Cyrillic a
    "rgw_live_abcdefgh2345_" + "a" * 32 + "a" * 10_000,  # 10 KB
    "x" * 10_240,
    "\x00" * 10_240,
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_key_is_none_without_an_exception(text: str) -> None:
    assert api_keys.parse(text) is None
    assert api_keys.redact(text) == "***"


def test_verify_accepts_only_the_right_secret_for_that_key_id() -> None:
    parsed, _ = api_keys.generate("test")
    stored = api_keys.secret_hash(parsed.key_id, parsed.secret)
    assert len(stored) == 32
    assert api_keys.verify(parsed, stored)
    other_secret = ParsedKey(parsed.env, parsed.key_id, "b" * 32)
    other_id = ParsedKey(parsed.env, "b" * 12, parsed.secret)
    assert not api_keys.verify(other_secret, stored)
    assert not api_keys.verify(other_id, stored)  # a hash is bound to its key id
    assert not api_keys.verify(parsed, bytes(32))


def test_redact_keeps_the_key_id_and_never_the_secret() -> None:
    parsed, plaintext = api_keys.generate("live")
    redacted = api_keys.redact(plaintext)
    assert redacted == f"rgw_live_{parsed.key_id}_***"
    assert parsed.secret not in redacted


def test_repr_and_str_of_a_parsed_key_hide_the_secret() -> None:
    parsed, plaintext = api_keys.generate("dev")
    for shown in (repr(parsed), str(parsed), f"{parsed}", repr([parsed])):
        assert parsed.secret not in shown and plaintext not in shown
        assert parsed.key_id in shown
