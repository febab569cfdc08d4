# ruff: noqa: RUF001, RUF003 -- this module is about characters that look like others: they are the test data.
"""Hypothesis strategies for the gateway's request fields, and the independent oracle that says which are bad.

The oracle is written from the API contract (README, redemption.proto), not from `gateway.validation`: it names
the bad fields of a request message, and the strategies produce values on both sides of every rule (empty,
maximum length, one over, control characters, look-alikes, other scripts, NaN, infinities, boundary floats).
The only gateway code it uses is what the contract names for a code: `codes.has_valid_check` (the Luhn mod 32
check character) and `codes.parse` (the layout).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from gateway import codes
from gateway.pb.redemption.v1 import redemption_pb2 as pb

T = TypeVar("T")

# -- The contract ------------------------------------------------------------------------------------------------

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # written out, not imported: the oracle does not trust the gateway
CODE_CHARACTERS = frozenset(ALPHABET + ALPHABET.lower() + " -")
MAX_RAW_CODE_CHARS = 64
CODE_LENGTHS = range(17, 29)
ID_CHARACTERS = string.ascii_letters + string.digits + "._:-"
_ID = re.compile(r"[A-Za-z0-9._:-]*")
ID_LIMITS = {"idempotency_key": 128, "store_id": 64, "terminal_id": 64, "customer_device_id": 128}
REQUIRED_IDS = frozenset({"idempotency_key", "store_id", "terminal_id"})
MAX_BATCH_ID_CHARS = 128
STREAM_MAX_ITEMS = 64
MAX_MESSAGE_BYTES = 16384
LOCATION_BOUNDS = {"latitude": (-90.0, 90.0), "longitude": (-180.0, 180.0), "accuracy_m": (0.0, 100_000.0)}


def normalised(raw: str) -> str:
    """A code without its separators, upper case (meaningful only for a code the oracle accepts)."""
    return raw.replace(" ", "").replace("-", "").upper()


def code_is_bad(raw: str) -> bool:
    """Required, at most 64 characters raw, only the alphabet (either case) and U+0020 / U+002D, then a
    17..28-character code with a valid check character and layout."""
    if not raw or len(raw) > MAX_RAW_CODE_CHARS or not set(raw) <= CODE_CHARACTERS:
        return True
    code = normalised(raw)
    if len(code) not in CODE_LENGTHS or not codes.has_valid_check(code):
        return True
    try:
        codes.parse(code)
    except codes.CodeFormatError:
        return True
    return False


def id_is_bad(value: str, max_len: int, *, required: bool) -> bool:
    if not value:
        return required
    return len(value) > max_len or not _ID.fullmatch(value)


def location_bad_fields(location: pb.Location) -> set[str]:
    return {
        f"location.{name}"
        for name, (low, high) in LOCATION_BOUNDS.items()
        if not (math.isfinite(value := getattr(location, name)) and low <= value <= high)
    }


Request = pb.RedeemRequest | pb.ValidateRequest | pb.GetCodeRequest


def bad_fields(request: Request) -> set[str]:
    """The fields of a RedeemRequest, ValidateRequest or GetCodeRequest that break the contract."""
    present = request.DESCRIPTOR.fields_by_name
    bad = {"code"} if code_is_bad(request.code) else set()
    for name, max_len in ID_LIMITS.items():
        if name in present and id_is_bad(getattr(request, name), max_len, required=name in REQUIRED_IDS):
            bad.add(name)
    if not isinstance(request, pb.GetCodeRequest) and request.HasField("location"):
        bad |= location_bad_fields(request.location)
    return bad


def batch_bad_fields(message: pb.RedeemStreamRequest) -> set[str]:
    """What ends a stream: a bad batch_id (0..128 of [A-Za-z0-9._:-]) or more than 64 items."""
    bad = set()
    if id_is_bad(message.batch_id, MAX_BATCH_ID_CHARS, required=False):
        bad.add("batch_id")
    if len(message.items) > STREAM_MAX_ITEMS:
        bad.add("items")
    return bad


# -- Characters that must never pass for part of a code or an id --------------------------------------------------

CONTROL = ["\t", "\n", "\r", "\x00", "\x01", "\x0b", "\x1b", "\x1f", "\x7f", "\x85", "\u2028", "\u2029"]
INVISIBLE = ["\u00a0", "\u200b", "\u200d", "\u2060", "\u3000", "\ufeff", "\u0301"]
DASHES = ["\u2010", "\u2011", "\u2013", "\u2212", "\ufe63", "\uff0d", "_", "/", "+", ".", ":"]
# str.upper() maps these onto the alphabet ("ſ" → "S", "ﬀ" → "FF", "ﬆ" → "ST", "ß" → "SS"): the classic hole.
UPPERCASE_TRAPS = ["ſ", "ﬀ", "ﬅ", "ﬆ", "ß", "ﬃ", "ﬄ", "ŉ", "ǰ", "ı", "K", "Å"]
CONFUSED_DIGITS = ["0", "O", "o", "1", "I", "i", "l1"]
CYRILLIC = dict(zip("ABCEHKMPTXY", "АВСЕНКМРТХУ", strict=True))
GREEK = dict(zip("ABEHKMNPTXYZ", "ΑΒΕΗΚΜΝΡΤΧΥΖ", strict=True))
OTHER_SCRIPTS = ["日本", "ع", "א", "ก", "한", "Ω", "ж", "ü", "é", "ﷺ", "𝐀", "𝟚"]
EMOJI = ["😀", "🎟️", "👍🏽", "🇺🇸", "👨‍👩‍👧", "\U0001f9ff"]
NASTY = [*CONTROL, *INVISIBLE, *DASHES, *UPPERCASE_TRAPS, *CONFUSED_DIGITS, *OTHER_SCRIPTS, *EMOJI,
         *CYRILLIC.values(), *GREEK.values()]  # fmt: skip
LIGATURES = {"FF": "ﬀ", "ST": "ﬆ", "SS": "ß", "FFL": "ﬄ"}


def fullwidth(ch: str) -> str:
    return chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch


def look_alikes(ch: str) -> list[str]:
    """Characters a human (or str.upper) takes for `ch`, none of them acceptable."""
    upper = ch.upper()
    found = [fullwidth(upper), fullwidth(ch.lower())]
    found += [table[upper] for table in (CYRILLIC, GREEK) if upper in table]
    if upper == "S":
        found.append("ſ")
    return found


# -- Generic building blocks (built once: Hypothesis strategies are cheap to draw from, not to construct) -------


@st.composite
def inserted(draw: st.DrawFn, base: SearchStrategy[str], extra: SearchStrategy[str]) -> str:
    """A string from `base` with a string from `extra` inserted at a drawn position."""
    text, piece = draw(base), draw(extra)
    at = draw(st.integers(0, len(text)))
    return text[:at] + piece + text[at:]


NASTY_PIECES: SearchStrategy[str] = st.one_of(st.sampled_from(NASTY), st.text(min_size=1, max_size=3))


def _good_ids(max_len: int, *, required: bool) -> SearchStrategy[str]:
    """Ids of [A-Za-z0-9._:-]: mostly short, sometimes exactly the maximum length."""
    return st.one_of(
        st.text(ID_CHARACTERS, min_size=1 if required else 0, max_size=12),
        st.text(ID_CHARACTERS, min_size=max_len, max_size=max_len),
    )


def _bad_ids(max_len: int) -> SearchStrategy[str]:
    """Mostly bad ids: empty, one over the limit, far over it, control characters, look-alikes, any Unicode."""
    return st.one_of(
        st.just(""),
        st.text(ID_CHARACTERS, min_size=max_len + 1, max_size=max_len + 2),
        st.text(ID_CHARACTERS, min_size=2 * max_len, max_size=1000),
        inserted(st.text(ID_CHARACTERS, max_size=12), NASTY_PIECES),
        st.text(max_size=20),  # any Unicode (no surrogates: protobuf strings are UTF-8)
        st.sampled_from([" ", "a b", "a\tb", "x\n", "\x00", "ſtore", "ﬆore", "Ｓ", "Тill", "é", "😀", "a/b"]),
    )


GOOD_IDS = {(n, required): _good_ids(n, required=required) for n in (64, 128) for required in (True, False)}
BAD_IDS = {n: _bad_ids(n) for n in (64, 128)}


def _coordinates(low: float, high: float, *, good: bool) -> SearchStrategy[float]:
    """Good: anything in [low, high] (both ends, ±0.0 included). Bad: NaN, infinities, just outside, anything."""
    if good:
        return st.one_of(st.floats(low, high), st.sampled_from([low, high, 0.0, -0.0]))
    edges = [math.nextafter(low, -math.inf), math.nextafter(high, math.inf), math.nan, -math.nan, math.inf,
             -math.inf, 1e308, -1e308, low - 1, high + 1]  # fmt: skip
    return st.one_of(st.sampled_from(edges), st.floats(), st.floats(low, high))


Coordinates = tuple[float, float, float]
_GOOD_COORDINATES = st.tuples(*(_coordinates(low, high, good=True) for low, high in LOCATION_BOUNDS.values()))
GOOD_LOCATIONS: SearchStrategy[Coordinates | None] = st.one_of(st.none(), _GOOD_COORDINATES)
BAD_LOCATIONS: SearchStrategy[Coordinates | None] = st.tuples(
    *(_coordinates(low, high, good=False) for low, high in LOCATION_BOUNDS.values())
)
_SURELY_BAD = st.sampled_from([math.nan, math.inf, -math.inf, -1e300, 1e300])
SURELY_BAD_LOCATIONS: SearchStrategy[Coordinates | None] = st.tuples(_SURELY_BAD, _SURELY_BAD, _SURELY_BAD)
SURELY_BAD_IDS = st.one_of(
    st.sampled_from(["!", "a b", "\x00", "ſ", "Ｓ", "😀", "é" * 3]), st.text(ID_CHARACTERS, min_size=129, max_size=140)
)


# -- Codes --------------------------------------------------------------------------------------------------------

ROUTES = st.builds(
    codes.Route,
    st.one_of(st.integers(1, 6), st.integers(1, codes.MAX_CAMPAIGN_ID)),
    st.one_of(st.just(0), st.integers(0, codes.MAX_SHARDS - 1)),
)
UNISSUED = st.builds(codes.generate, ROUTES, st.integers(0, 2**65 - 1))
SEPARATIONS = st.lists(st.tuples(st.integers(0, 28), st.sampled_from([" ", "-", "  ", " - ", "--"])), max_size=6)
MUTATIONS = st.sampled_from(["shift", "swap", "delete", "double", "look-alike", "ligature", "nasty"])


@st.composite
def decorated(draw: st.DrawFn, source: SearchStrategy[str]) -> str:
    """A code in random case with random spaces and dashes inserted (what people type)."""
    code = draw(source)
    lower = draw(st.integers(0, 2 ** len(code) - 1))
    chars = [ch.lower() if lower >> n & 1 else ch for n, ch in enumerate(code)]
    for at, separator in sorted(draw(SEPARATIONS), reverse=True):
        chars.insert(min(at, len(chars)), separator)
    return "".join(chars)


@st.composite
def mutated(draw: st.DrawFn, source: SearchStrategy[str]) -> str:
    """A code with one thing wrong: a character changed, swapped, lost or doubled, or a look-alike."""
    code = draw(source)
    at, kind = draw(st.integers(0, len(code) - 1)), draw(MUTATIONS)
    head, ch, tail = code[:at], code[at], code[at + 1 :]
    if kind == "shift":  # another alphabet character: Luhn mod 32 catches every single substitution
        return head + ALPHABET[(ALPHABET.index(ch.upper()) + draw(st.integers(1, 31))) % 32] + tail
    if kind == "swap":
        return head + tail[:1] + ch + tail[1:] if tail else code[:-2] + code[-1] + code[-2]
    if kind == "delete":
        return head + tail
    if kind == "double":
        return head + ch + ch + tail
    if kind == "look-alike":
        return head + draw(st.sampled_from(look_alikes(ch))) + tail
    if kind == "ligature":
        pair = code[at : at + 2].upper()
        return head + LIGATURES[pair] + code[at + 2 :] if pair in LIGATURES else head + "ſ" + tail
    return head + draw(NASTY_PIECES) + tail


@st.composite
def ligature_codes(draw: st.DrawFn) -> str:
    """A well-formed never-issued code whose random part contains FF, ST, SS or FFL, written as the ligature
    (which str.upper() turns back into the well-formed code)."""
    pair, base = draw(st.sampled_from(sorted(LIGATURES))), draw(UNISSUED)
    at = draw(st.integers(len(base) - 14, len(base) - 1 - len(pair)))
    payload = base[:at] + pair + base[at + len(pair) : -1]
    return (payload + codes.check_character(payload)).replace(pair, LIGATURES[pair], 1)


CHECKED_NOISE = st.text(ALPHABET, min_size=16, max_size=27).map(lambda p: p + codes.check_character(p))


@dataclass(frozen=True)
class CodeStrategies:
    """Code values around the codes of one test's campaigns."""

    good: SearchStrategy[str]
    bad: SearchStrategy[str]
    surely_bad: SearchStrategy[str]

    @classmethod
    def around(cls, known: Sequence[str]) -> CodeStrategies:
        issued = st.sampled_from(known)
        at_limit = issued.map(lambda code: code + " " * (MAX_RAW_CODE_CHARS - len(code)))  # exactly 64 raw
        over_limit = issued.map(lambda code: code + " " * (MAX_RAW_CODE_CHARS + 1 - len(code)))  # 65 raw
        good = st.one_of(decorated(issued), decorated(issued), decorated(UNISSUED), at_limit)
        bad = st.one_of(
            mutated(issued), mutated(issued), inserted(issued, NASTY_PIECES), over_limit, mutated(UNISSUED),
            ligature_codes(),
            CHECKED_NOISE,  # a valid check character, but mostly not a valid layout
            st.text(ALPHABET + ALPHABET.lower() + " -", max_size=80),
            st.text(max_size=70),
            st.sampled_from(["", " ", "-", " - ", "\t", "\x00" * 17, "O" * 17, "0" * 20, "X" * 65, "ſ" * 17]),
        )  # fmt: skip
        surely_bad = st.one_of(  # bad whatever was issued: a character no code may contain, or the wrong length
            inserted(issued, st.sampled_from(NASTY)),
            st.sampled_from(["", "0" * 17, "ſ" * 17, "X" * 65, "ﬆ" * 20, "\t\n", "АВСЕ" * 5]),
            st.text(ALPHABET, min_size=29, max_size=40),
        )
        return cls(good, bad, surely_bad)


# -- Requests -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """The fields of one request, as plain Python values (readable when Hypothesis prints a failing example)."""

    code: str
    idempotency_key: str = ""
    store_id: str = ""
    terminal_id: str = ""
    customer_device_id: str = ""
    location: Coordinates | None = None

    def _location(self) -> pb.Location | None:
        if self.location is None:
            return None
        latitude, longitude, accuracy_m = self.location
        return pb.Location(latitude=latitude, longitude=longitude, accuracy_m=accuracy_m)

    def redeem(self) -> pb.RedeemRequest:
        return pb.RedeemRequest(
            code=self.code, idempotency_key=self.idempotency_key, store_id=self.store_id,
            terminal_id=self.terminal_id, customer_device_id=self.customer_device_id, location=self._location(),
        )  # fmt: skip

    def validate(self) -> pb.ValidateRequest:
        return pb.ValidateRequest(
            code=self.code, store_id=self.store_id, terminal_id=self.terminal_id,
            customer_device_id=self.customer_device_id, location=self._location(),
        )  # fmt: skip

    def get_code(self) -> pb.GetCodeRequest:
        return pb.GetCodeRequest(code=self.code)


FIELD_NAMES = ("code", "idempotency_key", "store_id", "terminal_id", "customer_device_id", "location")
SPOILS = st.one_of(st.just(frozenset[str]()), st.frozensets(st.sampled_from(FIELD_NAMES), min_size=1))


@st.composite
def request_fields(draw: st.DrawFn, code: CodeStrategies) -> Fields:
    """A request whose fields in a drawn set (empty about half the time) take their bad values and the rest their
    good values; the oracle then decides (a "bad" draw can be good, e.g. 64 characters raw)."""
    spoilt = draw(SPOILS)

    def pick(name: str, good: SearchStrategy[T], bad: SearchStrategy[T]) -> T:
        return draw(bad if name in spoilt else good)

    return Fields(
        code=pick("code", code.good, code.bad),
        idempotency_key=pick("idempotency_key", GOOD_IDS[128, True], BAD_IDS[128]),
        store_id=pick("store_id", GOOD_IDS[64, True], BAD_IDS[64]),
        terminal_id=pick("terminal_id", GOOD_IDS[64, True], BAD_IDS[64]),
        customer_device_id=pick("customer_device_id", GOOD_IDS[128, False], BAD_IDS[128]),
        location=pick("location", GOOD_LOCATIONS, BAD_LOCATIONS),
    )


def all_bad_fields(code: CodeStrategies) -> SearchStrategy[Fields]:
    """Every field of a RedeemRequest bad at once, by construction: the largest error a stream item can get."""
    return st.builds(
        Fields, code=code.surely_bad, idempotency_key=st.one_of(st.just(""), SURELY_BAD_IDS),
        store_id=SURELY_BAD_IDS, terminal_id=SURELY_BAD_IDS, customer_device_id=SURELY_BAD_IDS,
        location=SURELY_BAD_LOCATIONS,
    )  # fmt: skip


@st.composite
def batch_ids(draw: st.DrawFn) -> str:
    """0..128 characters of [A-Za-z0-9._:-] (empty and exactly 128 included), or, one time in four, not."""
    if draw(st.sampled_from([True, True, True, False])):
        return draw(st.one_of(st.text(ID_CHARACTERS, max_size=16), st.text(ID_CHARACTERS, min_size=128, max_size=128)))
    tainted = inserted(st.text(ID_CHARACTERS, max_size=8), NASTY_PIECES)
    return draw(st.one_of(st.text(ID_CHARACTERS, min_size=129, max_size=200), tainted, st.sampled_from(["b 1", "ſ"])))


ITEM_COUNTS = st.one_of(st.integers(0, 8), st.integers(9, 64), st.sampled_from([60, 63, 64, 64, 65, 66]))


@st.composite
def stream_items(draw: st.DrawFn, code: CodeStrategies) -> list[Fields]:
    """Up to 64 items (sometimes 65 or 66) picked from a small drawn pool of good items, items with some bad
    fields and items with every field bad. Repeats are on purpose: the same item twice in a message is a retry
    (a replay, or for a decline a second decision); and drawing 64 fresh items each time would be slow."""
    pool = draw(st.lists(st.one_of(request_fields(code), all_bad_fields(code)), min_size=1, max_size=10))
    count = draw(ITEM_COUNTS)
    return [pool[n] for n in draw(st.lists(st.integers(0, len(pool) - 1), min_size=count, max_size=count))]


# -- Bytes --------------------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded_message(size: int, *, field_number: int = 15) -> bytes:
    """Exactly `size` bytes that parse as any of the API's messages: one unknown length-delimited field."""
    tag = varint(field_number << 3 | 2)
    length = size - len(tag) - 1
    while len(tag) + len(varint(length)) + length > size:
        length -= 1
    data = tag + varint(length) + b"x" * length
    assert len(data) == size, (len(data), size)
    return data


# Hand-picked: invalid UTF-8, truncations, lone tags, bad varints, wrong wire types, huge length prefixes.
MALFORMED_CASES = [bytes.fromhex(h) for h in (
    "0a01ff", "0a0561626364", "d2", "0a", "08", "0880", "12", "0d", "0b", "0c", "0f", "00", "0a02c080", "0a03eda080",
    "0affffffff0f", "0a80808080808080808001", "ffffffffffffffffffff01", "3205090000", "32ff01", "0a01",
    "2a0541424344ff", "0a0161ff", "120100", "0a0100", "320308960108",
)]  # fmt: skip


@st.composite
def corrupted(draw: st.DrawFn, messages: SearchStrategy[bytes]) -> bytes:
    """A serialized message cut short, with a byte flipped, or with junk appended."""
    message = draw(messages)
    kind = draw(st.sampled_from(["cut", "flip", "append"]))
    if kind == "cut" and message:
        return message[: draw(st.integers(0, len(message) - 1))]
    if kind == "flip" and message:
        at = draw(st.integers(0, len(message) - 1))
        return message[:at] + bytes([message[at] ^ draw(st.integers(1, 255))]) + message[at + 1 :]
    return message + draw(st.binary(min_size=1, max_size=8))


def raw_payloads() -> SearchStrategy[bytes]:
    """Mostly bytes that do not parse: random, corrupted real requests, hand-picked cases."""
    real = request_fields(CodeStrategies.around(["232PXT26F26XDX2WJ"])).map(lambda f: f.redeem().SerializeToString())
    return st.one_of(st.binary(max_size=48), corrupted(real), st.sampled_from(MALFORMED_CASES))
