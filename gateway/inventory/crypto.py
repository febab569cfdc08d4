"""Card secrets at rest: AES-256-GCM under a key ring, and the keyed hash that finds a secret imported twice.

A secret is sealed as (key_id, nonce, ciphertext): a fresh random 96-bit nonce per encryption, the key named by
key_id (RGW_SECRET_KEYS; new secrets under RGW_SECRET_KEY_ID), and associated data that binds the ciphertext to its
brand and SKU (`associated_data`), so a ciphertext copied into another SKU or brand does not decrypt. The GCM
tag (16 bytes) ends the ciphertext.

dedup_ref = HMAC-SHA256(RGW_SECRET_DEDUP_KEY, normalised secret): the same secret imported twice into one brand
collides on UNIQUE(brand_id, dedup_ref) without the plaintext being stored. The dedup key never rotates (a new one
would let every secret imported before it be imported again); the encryption keys do (`rgw keys rotate`).

Nothing here logs, and no exception message carries a secret, a key or a ciphertext.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
MIN_DEDUP_KEY_BYTES = 32
KEY_ID_RULE = "1 to 32 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
_KEY_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class SecretKeyError(ValueError):
    """A ciphertext cannot be opened: its key is not configured, or it is not the ciphertext of this row (a wrong
    key, altered bytes, other associated data). The message names the key id only."""


def is_key_id(key_id: str) -> bool:
    """A key id as it is stored beside each ciphertext (Postgres, and the '|'-joined Redis record)."""
    return 1 <= len(key_id) <= 32 and set(key_id) <= _KEY_ID_CHARS


def normalise(secret: str) -> str:
    """The secret as it is hashed and encrypted: surrounding whitespace dropped."""
    return secret.strip()


def associated_data(brand_id: int, sku_id: int) -> bytes:
    """What a secret's ciphertext is bound to: its brand and its SKU (what the gateway knows when it answers an
    order from Redis, which holds no dedup_ref)."""
    return b"rgw-secret\x00%d\x00%d" % (brand_id, sku_id)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed secret: the key id, the nonce and the ciphertext (with its tag)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes = b""

    def __repr__(self) -> str:  # ciphertexts stay out of logs and tracebacks too
        return f"Sealed(key_id={self.key_id!r}, {len(self.ciphertext)} bytes)"


class SecretRing:
    """The encryption keys by id (`active_id` seals new secrets) and the dedup key."""

    def __init__(self, keys: Mapping[str, bytes], active_id: str, dedup_key: bytes) -> None:
        if active_id not in keys:
            raise ValueError(f"active secret key id {active_id!r} is not among the keys")
        for key_id, key in keys.items():
            if not is_key_id(key_id):
                raise ValueError(f"secret key id {key_id[:40]!r} must be {KEY_ID_RULE}")
            if len(key) != KEY_BYTES:
                raise ValueError(f"secret key {key_id!r} must be exactly {KEY_BYTES} bytes")
        if len(dedup_key) < MIN_DEDUP_KEY_BYTES:
            raise ValueError(f"the dedup key must be at least {MIN_DEDUP_KEY_BYTES} bytes")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._dedup_key = bytes(dedup_key)
        self.active_id = active_id
        self.key_ids = tuple(keys)

    def __repr__(self) -> str:
        return f"SecretRing(active_id={self.active_id!r}, key_ids={self.key_ids!r})"

    def dedup_ref(self, secret: str) -> bytes:
        """HMAC-SHA256 of the normalised secret under the dedup key (32 bytes)."""
        return hmac.digest(self._dedup_key, normalise(secret).encode(), "sha256")

    def encrypt(self, plaintext: str, aad: bytes) -> Sealed:
        """Seal `plaintext` under the active key with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        return Sealed(self.active_id, nonce, self._ciphers[self.active_id].encrypt(nonce, plaintext.encode(), aad))

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> str:
        """The plaintext of a sealed secret; SecretKeyError when its key is missing or it does not open."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SecretKeyError(f"secret key {key_id[:40]!r} is not configured (RGW_SECRET_KEYS)")
        try:
            return cipher.decrypt(bytes(nonce), bytes(ciphertext), aad).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise SecretKeyError(f"a ciphertext under key {key_id!r} does not open with its associated data") from None

    def reencrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> Sealed:
        """The same secret sealed again under the active key (a new nonce)."""
        return self.encrypt(self.decrypt(key_id, nonce, ciphertext, aad), aad)
