from __future__ import annotations

import uuid

import pytest

from gateway.coderefs import KeyRing
from gateway.ids import uuid7, uuid7_ms

KEYS = {"a": b"a" * 32, "b": b"b" * 32}


def test_code_ref_depends_on_key_campaign_and_code() -> None:
    ring = KeyRing(KEYS, "a")
    base = ring.ref("a", 1, "CODE").ref
    assert len(base) == 64
    assert ring.ref("a", 1, "CODE").ref == base
    assert ring.ref("b", 1, "CODE").ref != base
    assert ring.ref("a", 2, "CODE").ref != base  # same code, other campaign (or brand): no collision
    assert ring.ref("a", 1, "CODF").ref != base


def test_candidates_put_the_active_key_first() -> None:
    ring = KeyRing(KEYS, "b")
    assert [c.key_id for c in ring.candidates(1, "X")] == ["b", "a"]


def test_short_or_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        KeyRing({"a": b"short"}, "a")
    with pytest.raises(ValueError, match="active"):
        KeyRing(KEYS, "zz")


def test_uuid7_is_version_7_time_ordered_and_carries_the_time() -> None:
    ids = [uuid7(1_700_000_000_000 + n) for n in range(100)]
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert uuid7_ms(ids[5]) == 1_700_000_000_005
    assert len(set(uuid7(1) for _ in range(1000))) == 1000


def test_writer_backoff_is_capped_and_never_overflows() -> None:
    from gateway.ledger.writer import backoff

    assert all(0 <= backoff(n, base=0.1, cap=10) <= 10 for n in (0, 1, 10, 1023, 1024, 10_000))
    assert max(backoff(0, base=0.1, cap=10) for _ in range(100)) <= 0.1
