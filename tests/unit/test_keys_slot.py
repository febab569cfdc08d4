"""gateway.keys_slot against the cluster spec's examples and a byte-at-a-time CRC16 written from the spec.

The comparison with a live node's CLUSTER KEYSLOT is in tests/integration/test_redis_cluster_fixture.py."""

from __future__ import annotations

import random

import pytest
from redis.crc import key_slot as redis_py_key_slot

from gateway.keys_slot import SLOTS, key_slot


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def _crc16(data: bytes) -> int:
    """CRC16-XMODEM, table-driven, as crc16.c of Redis computes it."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def _reference_slot(key: bytes) -> int:
    """keyHashSlot() of cluster.c, transcribed loop for loop."""
    for s in range(len(key)):
        if key[s] == ord("{"):
            break
    else:
        return _crc16(key) & 0x3FFF
    for e in range(s + 1, len(key)):
        if key[e] == ord("}"):
            break
    else:
        return _crc16(key) & 0x3FFF
    if e == s + 1:
        return _crc16(key) & 0x3FFF
    return _crc16(key[s + 1 : e]) & 0x3FFF


def test_crc16_check_value_of_the_spec() -> None:
    # The cluster spec's CRC16 reference: "123456789" -> 0x31C3.
    assert _crc16(b"123456789") == 0x31C3
    assert key_slot("123456789") == 0x31C3 % SLOTS


@pytest.mark.parametrize(
    ("key", "slot"),
    [("foo", 12182), ("bar", 5061), ("somekey", 11058), ("hello", 866), ("", 0)],
)
def test_known_slots(key: str, slot: int) -> None:
    assert key_slot(key) == slot


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        ("{user1000}.following", "user1000"),
        ("{user1000}.followers", "user1000"),
        ("foo{}{bar}", "foo{}{bar}"),  # the first tag is empty: the whole key
        ("foo{{bar}}zap", "{bar"),  # from the first { to the first } after it
        ("foo{bar}{zap}", "bar"),
        ("{}", "{}"),
        ("{", "{"),
        ("}{", "}{"),
        ("a}b{c}", "c"),
        ("{{}}", "{"),
        ("x{ä}y", "ä"),
    ],
)
def test_hash_tags(key: str, hashed: str) -> None:
    assert key_slot(key) == _crc16(hashed.encode()) % SLOTS


def test_str_is_hashed_as_utf8() -> None:
    for key in ("ключ", "鍵{タグ}", "emoji 🎟️", "{é}x"):
        assert key_slot(key) == key_slot(key.encode())


def test_agrees_with_reference_and_redis_py() -> None:
    rng = random.Random(13)
    alphabet = b"{}{}ab\x00\xff\xc3\xa4"
    for _ in range(5_000):
        key = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert key_slot(key) == _reference_slot(key) == redis_py_key_slot(key), key
    for _ in range(1_000):
        key = rng.randbytes(rng.randrange(0, 40))
        assert key_slot(key) == _reference_slot(key) == redis_py_key_slot(key), key
