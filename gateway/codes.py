"""The code format: what a code the gateway issues looks like, and how a POS can check one offline.

A code is written in a 32-character alphabet without look-alikes (no 0/O, no 1/I), so a human reading a code
aloud or typing it from a receipt cannot confuse two characters. Layout (no separators; display may group it):

    H  C…C  S…S  R(13)  K
    |  |    |    |     └ check character: Luhn mod 32 over everything before it (catches every single-character
    |  |    |    |       typo and almost every swap of neighbours, without a network call)
    |  |    |    └ random part: 13 characters = 65 bits from a CSPRNG
    |  |    └ shard, base 32, shard_len characters
    |  └ campaign id, base 32, campaign_len characters
    └ header: (campaign_len - 1) * 4 + (shard_len - 1), campaign_len 1..6, shard_len 1..4

So a code carries its route (campaign and shard, i.e. its Redis hash tag) and no lookup is needed before the
redeem script. Header values 24..31 are reserved for future formats (for example imported codes).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
BASE = len(ALPHABET)
RANDOM_CHARS = 13
MAX_CAMPAIGN_CHARS = 6
MAX_SHARD_CHARS = 4
MAX_CAMPAIGN_ID = BASE**MAX_CAMPAIGN_CHARS - 1
MAX_SHARDS = BASE**MAX_SHARD_CHARS
MIN_LENGTH = 1 + 1 + 1 + RANDOM_CHARS + 1
MAX_LENGTH = 1 + MAX_CAMPAIGN_CHARS + MAX_SHARD_CHARS + RANDOM_CHARS + 1
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}
SEPARATORS = " -"
# What a caller may send: the alphabet in either case and the two separators, ASCII only. Matched before any
# case mapping, because str.upper() maps non-ASCII look-alikes onto the alphabet (U+017F → "S", U+FB05 → "ST").
_ACCEPTED = re.compile(f"[{ALPHABET}{ALPHABET.lower()}{re.escape(SEPARATORS)}]*")
_DROP_SEPARATORS = str.maketrans("", "", SEPARATORS)


ACCEPTED_CHARACTERS = f"may contain only {ALPHABET} (either case), spaces and dashes"


class CodeFormatError(ValueError):
    """The text cannot be a code the gateway issued; the message says why (safe to show the caller)."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where a code lives: its campaign and the campaign shard (hash tag) holding its state."""

    campaign_id: int
    shard: int


def normalise(raw: str) -> str:
    """Uppercase and drop the separators people type (U+0020 space, U+002D hyphen-minus); nothing else is
    forgiven: any other character (a tab, a look-alike, a letter outside the alphabet) is CodeFormatError."""
    if not _ACCEPTED.fullmatch(raw):
        raise CodeFormatError(ACCEPTED_CHARACTERS)
    return raw.translate(_DROP_SEPARATORS).upper()


# Codes a brand supplied (`rgw codes import`): ASCII letters and digits, any case, spaces and dashes ignored.
IMPORTED_MIN, IMPORTED_MAX = 4, 64
_IMPORTED = re.compile(f"[A-Z0-9]{{{IMPORTED_MIN},{IMPORTED_MAX}}}")


def normalise_imported(raw: str) -> str | None:
    """An imported code's canonical text (uppercase, separators dropped), or None when the text cannot be one."""
    if not raw.isascii():
        return None
    text = raw.strip().translate(_DROP_SEPARATORS).upper()
    return text if _IMPORTED.fullmatch(text) else None


def is_generated(code: str) -> bool:
    """True when a normalised text is a well-formed code of the gateway's own layout (it routes itself)."""
    try:
        parse(code)
    except CodeFormatError:
        return False
    return True


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, BASE)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def _decode(text: str) -> int:
    value = 0
    for ch in text:
        value = value * BASE + _INDEX[ch]
    return value


def _width(value: int) -> int:
    width = 1
    while value >= BASE**width:
        width += 1
    return width


def check_character(payload: str) -> str:
    """Luhn mod 32 check character for `payload` (all characters must be in the alphabet)."""
    total, factor = 0, 2
    for ch in reversed(payload):
        addend = factor * _INDEX[ch]
        total += addend // BASE + addend % BASE
        factor = 3 - factor
    return ALPHABET[(BASE - total % BASE) % BASE]


def has_valid_check(code: str) -> bool:
    """True when the last character is the check character of the rest."""
    return len(code) > 1 and check_character(code[:-1]) == code[-1]


def generate(route: Route, randbits: int | None = None) -> str:
    """A new code for `route`; the random part comes from `secrets` unless given (tests only)."""
    if not 0 < route.campaign_id <= MAX_CAMPAIGN_ID:
        raise ValueError(f"campaign id must be 1..{MAX_CAMPAIGN_ID}")
    if not 0 <= route.shard < MAX_SHARDS:
        raise ValueError(f"shard must be 0..{MAX_SHARDS - 1}")
    c_len, s_len = _width(route.campaign_id), _width(route.shard)
    header = ALPHABET[(c_len - 1) * 4 + (s_len - 1)]
    random_part = secrets.randbits(5 * RANDOM_CHARS) if randbits is None else randbits
    payload = (
        header + _encode(route.campaign_id, c_len) + _encode(route.shard, s_len) + _encode(random_part, RANDOM_CHARS)
    )
    return payload + check_character(payload)


def is_code_shaped(code: str) -> bool:
    """True for a normalised text of an issued code's length and alphabet: a wrong one is a guess or a typo, which
    the lockout counts (anything else is garbage, refused as such)."""
    return MIN_LENGTH <= len(code) <= MAX_LENGTH and all(ch in _INDEX for ch in code)


def parse(code: str) -> Route:
    """The route of a normalised code; raises CodeFormatError when it is not a well-formed issued code."""
    if not MIN_LENGTH <= len(code) <= MAX_LENGTH:
        raise CodeFormatError(f"must be {MIN_LENGTH} to {MAX_LENGTH} characters without separators")
    if any(ch not in _INDEX for ch in code):
        raise CodeFormatError(ACCEPTED_CHARACTERS)
    if not has_valid_check(code):
        raise CodeFormatError("check character does not match: the code was mistyped")
    header = _INDEX[code[0]]
    c_len, s_len = header // 4 + 1, header % 4 + 1
    if c_len > MAX_CAMPAIGN_CHARS or len(code) != 1 + c_len + s_len + RANDOM_CHARS + 1:
        raise CodeFormatError("unknown code layout")
    campaign_id = _decode(code[1 : 1 + c_len])
    if campaign_id == 0:
        raise CodeFormatError("unknown code layout")
    return Route(campaign_id, _decode(code[1 + c_len : 1 + c_len + s_len]))
