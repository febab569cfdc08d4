"""Codes in bulk (gateway/campaigns/codegen.py) are exactly gateway.codes' format, and bulk code_refs are
KeyRing.ref's; the loader's call layout keeps to the script's."""

from __future__ import annotations

import hmac
import re
from collections import Counter
from importlib import resources

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import codes, keys
from gateway.campaigns import loader
from gateway.campaigns.codegen import CodeFactory
from gateway.coderefs import KeyRing


@given(st.integers(1, codes.MAX_CAMPAIGN_ID), st.integers(1, 1024))
@settings(max_examples=60)
def test_every_code_parses_to_its_campaign_and_shard(campaign_id: int, shards: int) -> None:
    made, placed = CodeFactory(campaign_id, shards).make(500)
    assert len(made) == len(placed) == 500
    for code, shard in zip(made, placed, strict=True):
        assert 0 <= shard < shards
        assert codes.parse(code.decode()) == codes.Route(campaign_id, shard)


@given(st.binary(min_size=16, max_size=16), st.integers(1, codes.MAX_CAMPAIGN_ID))
def test_a_code_is_what_codes_generate_makes_of_the_same_random_bits(raw: bytes, campaign_id: int) -> None:
    """The random characters are the drawn bytes mod 32, most significant first, like codes.generate's digits."""
    (code,), _ = CodeFactory(campaign_id, 1, randbytes=lambda n: raw * (n // 16)).make(1)
    randbits = 0
    for byte in raw[: codes.RANDOM_CHARS]:
        randbits = randbits * codes.BASE + byte % codes.BASE
    assert code.decode() == codes.generate(codes.Route(campaign_id, 0), randbits)


def test_codes_are_unique_and_every_character_is_drawn_evenly() -> None:
    made, _ = CodeFactory(7, 1).make(100_000)
    assert len(set(made)) == len(made)
    random_parts = [code.decode()[-1 - codes.RANDOM_CHARS : -1] for code in made]
    for position in (0, 6, codes.RANDOM_CHARS - 1):
        seen = Counter(part[position] for part in random_parts)
        assert set(seen) == set(codes.ALPHABET)
        assert max(seen.values()) < 1.2 * len(made) / codes.BASE  # ~3,125 each; 20% is > 10 standard deviations


def test_shards_are_spread() -> None:
    _, placed = CodeFactory(7, 4).make(40_000)
    assert all(9_000 < n < 11_000 for n in Counter(placed).values()) and set(placed) == {0, 1, 2, 3}


def test_bulk_refs_are_the_hmac_of_each_code() -> None:
    keyring = KeyRing({"short": bytes(range(32)), "long": bytes(range(100))}, "short")
    made, _ = CodeFactory(42, 1).make(50)
    for key_id in keyring.key_ids:
        assert keyring.refs_of(key_id, 42, made) == [
            bytes.fromhex(keyring.ref(key_id, 42, c.decode()).ref) for c in made
        ]
    assert keyring.refs_of("long", 42, [b"X"]) == [hmac.digest(bytes(range(100)), b"42\x00X", "sha256")]


def test_the_load_script_splits_bucket_fields_as_keys_cuts_them() -> None:
    source = resources.files("gateway.lua").joinpath("load_codes.lua").read_text()
    found = re.search(r"local FIELD = (\d+)", source)
    assert found is not None and int(found[1]) == keys.REF_CHARS - keys.BUCKET_CHARS
    assert loader.REF_BYTES * 2 == keys.REF_CHARS and loader.BUCKET_BYTES * 2 == keys.BUCKET_CHARS


def test_overrides_are_named_as_the_code_hash_fields() -> None:
    from datetime import UTC, datetime

    from gateway.campaigns.layout import CODE

    own = loader.Overrides(uses=3, valid_until=datetime(2026, 6, 1, tzinfo=UTC), face_value=500, bound_device="p-1")
    spec = own.spec()
    assert spec == "uses=3,vu=1780272000000,fv=500,dev=p-1"
    assert {pair.split("=")[0] for pair in spec.split(",")} <= set(CODE)
    assert loader.Overrides().spec() == ""


def test_bucket_calls_stay_within_one_tag_and_the_call_size() -> None:
    parts = loader._parts({f"rgw:{{c1.0}}:b:{n:04x}": [f"{n:020x}=1"] * 7 for n in range(1000)})
    calls = loader._bucket_calls("rgw:{c1.0}:budget", "iss", parts)
    assert sum(len(args) - 2 for _, args in calls) == 1000
    for call_keys, args in calls:
        assert {key[: key.index("}") + 1] for key in call_keys} == {"rgw:{c1.0}"}
        assert args[:2] == ["iss", "0"] and len(call_keys) == len(args) - 1
        assert sum(spec.count("=") for spec in args[2:]) <= loader.CALL_CODES + 7
