"""Time-ordered redemption ids (UUID version 7, RFC 9562), so the ledger can be partitioned by time."""

from __future__ import annotations

import secrets
import uuid


def uuid7(now_ms: int) -> str:
    """A UUIDv7: 48 bits of ms timestamp, version, 74 random bits."""
    rand = secrets.randbits(74)
    value = (now_ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76 | (rand >> 62) << 64  # version 7, 12 random bits (rand_a)
    value |= 0b10 << 62 | (rand & ((1 << 62) - 1))  # variant 10, 62 random bits (rand_b)
    return str(uuid.UUID(int=value))


def uuid7_ms(value: str) -> int:
    """The timestamp (ms) a UUIDv7 carries."""
    return uuid.UUID(value).int >> 80
