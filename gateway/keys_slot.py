"""Redis Cluster's hash slot of a key, computed here exactly as the server's keyHashSlot() does.

The slot is CRC16 (the XMODEM variant: polynomial 0x1021, initial value 0, no reflection, no final xor) of the key
modulo 16384. If the key holds a hash tag - a `{` followed later by a `}` with at least one byte between them - only
the bytes between the first `{` and the first `}` after it are hashed, so `{user1000}.a` and `{user1000}.b` share a
slot. An empty tag (`{}` first) or a `{` without a later `}` does not count and the whole key is hashed.

`binascii.crc_hqx(data, 0)` is that CRC (CRC-CCITT, XMODEM flavour), table-driven in the standard library's C code:
no dependency, and about a hundred times faster than a per-byte table walk in Python.
"""

from __future__ import annotations

from binascii import crc_hqx

SLOTS = 16384


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot (0..16383) of a key; a str key is hashed as its UTF-8 bytes, as redis-py sends it."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc_hqx(data, 0) & (SLOTS - 1)
