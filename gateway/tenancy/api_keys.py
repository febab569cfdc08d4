"""API keys: `rgw_<env>_<key_id>_<secret>`, e.g. `rgw_live_k3v7q2mz4xab_<32 characters>`.

    env     live | test | dev - which deployment issued it
    key_id  12 characters of lowercase base32 [a-z2-7]: 60 random bits, the primary key of `api_keys`, so a key
            is found by one dictionary lookup, never by scanning hashes
    secret  32 characters of [a-z2-7]: 160 random bits from `secrets`; only SHA-256(prefix, key_id, secret) is
            stored

The fixed prefix and shape make a leaked key recognisable to secret scanners, with this regex:

    \\brgw_(live|test|dev)_[a-z2-7]{12}_[a-z2-7]{32}\\b

A plaintext key exists only in the answer to the operation that created it; log `redact(key)` instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

ENVIRONMENTS = ("live", "test", "dev")
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # lowercase RFC 4648 base32: 5 bits a character
KEY_ID_CHARS = 12  # 60 bits: collisions are negligible and the id stays short enough to read out
SECRET_CHARS = 32  # 160 bits
MAX_KEY_CHARS = len("rgw_live__") + KEY_ID_CHARS + SECRET_CHARS
_KEY_RE = re.compile(rf"rgw_(live|test|dev)_([a-z2-7]{{{KEY_ID_CHARS}}})_([a-z2-7]{{{SECRET_CHARS}}})")
# Domain separation: this hash can never be mistaken for (or replayed as) any other SHA-256 in the system.
_HASH_PREFIX = b"rgw-api-key-v1\x00"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A well-formed key, split into its parts. Its repr never shows the secret."""

    env: str
    key_id: str
    secret: str

    def __repr__(self) -> str:
        return f"ParsedKey(env={self.env!r}, key_id={self.key_id!r}, secret='***')"

    @property
    def plaintext(self) -> str:
        """The key as the client sends it."""
        return f"rgw_{self.env}_{self.key_id}_{self.secret}"


def _random(chars: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(chars))


def generate(env: str) -> tuple[ParsedKey, str]:
    """A new random key and its plaintext. The plaintext is to be shown once and never logged or stored."""
    if env not in ENVIRONMENTS:
        raise ValueError(f"env must be one of {', '.join(ENVIRONMENTS)}")
    parsed = ParsedKey(env, _random(KEY_ID_CHARS), _random(SECRET_CHARS))
    return parsed, parsed.plaintext


def parse(text: str) -> ParsedKey | None:
    """The parts of a well-formed key, or None. Never raises; the length is checked before the regex runs."""
    if not isinstance(text, str) or len(text) > MAX_KEY_CHARS:
        return None
    match = _KEY_RE.fullmatch(text)
    if match is None:
        return None
    return ParsedKey(*match.groups())


def secret_hash(key_id: str, secret: str) -> bytes:
    """What `api_keys.secret_hash` stores: SHA-256 over a domain prefix, the key id and the secret.

    A fast hash is right here. Slow KDFs (bcrypt, scrypt, Argon2) exist to make guessing low-entropy passwords
    expensive; a 160-bit random secret cannot be guessed whatever the hash costs (2^160 tries), so a KDF would add
    nothing but milliseconds of CPU to every authenticated call on the hot path. The key id in the input binds
    a hash to its row, so a hash copied onto another key id does not verify.
    """
    return hashlib.sha256(_HASH_PREFIX + key_id.encode() + b"\x00" + secret.encode()).digest()


def verify(parsed: ParsedKey, stored_hash: bytes) -> bool:
    """Whether the key's secret matches the stored hash, compared in constant time."""
    return hmac.compare_digest(secret_hash(parsed.key_id, parsed.secret), stored_hash)


def redact(text: str) -> str:
    """A form of a presented key that is safe to log: `rgw_<env>_<key_id>_***`, or `***` if it does not parse
    (a malformed key may still be mostly a real secret)."""
    parsed = parse(text)
    return "***" if parsed is None else f"rgw_{parsed.env}_{parsed.key_id}_***"
