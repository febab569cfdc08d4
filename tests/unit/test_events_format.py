"""The outbox event formats the ledger writer reads: v3 redemptions (v2 and v1 still read), x1 reversals, and the
Redis records reconcile rebuilds events from - held against gateway/campaigns/layout.py."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from gateway.campaigns import layout
from gateway.ledger.events import (
    EVENT_FIELDS,
    EVENT_FIELDS_V1,
    EVENT_FIELDS_V2,
    REVERSAL_COLUMNS,
    VERSION_FIELD,
    PoisonEntry,
    decode_event,
    decode_reversal_event,
    encode_event,
    encode_reversal_event,
    is_reversal_entry,
    parse,
    parse_reversal,
)
from gateway.uses import History, Reversal, Use, from_record, reversal_from_record

REF = "ab" * 32
USE = Use(7, 1, REF, "k2", 3, str(uuid.uuid4()), 1_780_272_000_123, "f" * 32, "cl_1/till-1", "store-1", "till-1",
          "dev-9", "31.2", "121.4", "5.0", "i:scope", "cl_1", "4", 250, 5)  # fmt: skip
REVERSAL = Reversal(7, 1, REF, "k2", 3, str(uuid.uuid4()), USE.redemption_id, 1_780_272_100_000, 250, "till-void",
                    "cl_1/till-2", "cl_1", "4", "r:scope", "e" * 32)  # fmt: skip


def test_formats_follow_the_layout() -> None:
    assert (VERSION_FIELD, EVENT_FIELDS) == ("v3", layout.EVENT_V3)
    assert EVENT_FIELDS_V2 == EVENT_FIELDS[:-1] and EVENT_FIELDS_V1 == EVENT_FIELDS_V2[:-2]
    assert set(layout.USE_RECORD) <= set(layout.EVENT_V3)
    assert set(layout.REVERSAL_RECORD) - {"xid"} <= set(layout.REVERSAL_EVENT)
    assert layout.REVERSAL_FORMAT == "x1" and len(REVERSAL_COLUMNS) == len(layout.REVERSAL_EVENT) + 1  # + outbox_id


def test_a_use_round_trips_through_its_event_and_its_record() -> None:
    row = parse("1-0", USE.event())
    assert (str(row.redemption_id), row.code_ref.hex()) == (USE.redemption_id, REF)
    assert (row.use_number, row.face_value) == (3, 250)
    assert (row.campaign_id, row.shard, row.brand_id, row.latitude, row.outbox_id) == (7, 1, 4, 31.2, "1-0")
    again = from_record(7, 1, REF, "k2", 3, USE.record())
    assert again == dataclasses.replace(USE, uses_total=0)
    assert USE.record().split("|") == [decode_event(USE.event())[name] for name in layout.USE_RECORD]


def test_older_records_and_events_count_no_face_value() -> None:
    event = decode_event(USE.event())
    v2 = {"v2": "|".join(event[name] for name in EVENT_FIELDS_V2)}
    v1 = {"v1": "|".join(event[name] for name in EVENT_FIELDS_V1)}
    assert parse("1-0", v2).face_value == 0 and parse("1-0", v2).brand_id == 4
    assert (parse("1-0", v1).face_value, parse("1-0", v1).brand_id, parse("1-0", v1).client_id) == (0, 1, "")
    record = "|".join(USE.record().split("|")[:13])  # a use record from before face values
    assert from_record(7, 1, REF, "k2", 3, record).face_value == 0


def test_a_reversal_round_trips_through_its_event_and_its_record() -> None:
    fields = REVERSAL.event()
    assert is_reversal_entry(fields) and not is_reversal_entry(USE.event())
    row = parse_reversal("2-5", fields)
    assert (str(row.reversal_id), str(row.redemption_id), row.code_ref.hex()) == (
        REVERSAL.reversal_id, USE.redemption_id, REF,
    )  # fmt: skip
    assert (row.use_number, row.campaign_id, row.shard, row.face_value, row.brand_id) == (3, 7, 1, 250, 4)
    assert (row.reason, row.caller, row.client_id, row.idempotency_scope, row.fingerprint, row.outbox_id) == (
        "till-void", "cl_1/till-2", "cl_1", "r:scope", "e" * 32, "2-5",
    )  # fmt: skip
    assert int(row.reversed_at.timestamp() * 1000) == REVERSAL.at_ms
    # From the Redis records, everything but the reverse call's idempotency scope and fingerprint.
    assert reversal_from_record(USE, REVERSAL.record()) == dataclasses.replace(REVERSAL, idem="", fingerprint="")


def test_a_reversal_is_never_read_as_a_redemption() -> None:
    with pytest.raises(PoisonEntry, match="unknown entry format"):
        decode_event(REVERSAL.event())
    with pytest.raises(PoisonEntry, match="not a reversal event"):
        decode_reversal_event(USE.event())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"xid": "nope"}, "malformed reversal entry"),
        ({"rid": ""}, "missing fields: rid"),
        ({"ref": "abcd"}, "malformed reversal entry"),
        ({"fv": "-5"}, "malformed reversal entry"),
        ({"at": "soon"}, "malformed reversal entry"),
        ({"brand": "x"}, "malformed reversal entry"),
    ],
)
def test_malformed_reversal_entries_are_poison(change: dict[str, str], message: str) -> None:
    fields = {**decode_reversal_event(REVERSAL.event()), **change}
    with pytest.raises(PoisonEntry, match=message):
        parse_reversal("1-0", {"x1": "|".join(fields[name] for name in layout.REVERSAL_EVENT)})
    with pytest.raises(PoisonEntry, match="expected 15 reversal values, found 2"):
        parse_reversal("1-0", {"x1": "a|b"})


def test_an_event_value_with_the_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="contains"):
        encode_reversal_event({"xid": str(uuid.uuid4()), "reason": "a|b"})
    with pytest.raises(ValueError, match="contains"):
        encode_event({"store": "a|b"})


def test_history_replays_the_uses_left_each_answer_reported() -> None:
    def use(n: int, at: int) -> Use:
        return Use(7, 0, REF, "k2", n, f"r{n}", at, "", "", "", "", "", "", "", "", "", "", "1", 0, 3)

    def reversal(n: int, at: int) -> Reversal:
        return Reversal(7, 0, REF, "k2", n, f"x{n}", f"r{n}", at, 0, "", "", "", "1")

    # uses 1 and 2, use 1 reversed, use 3, use 4 and its reversal in the same ms (the use comes first)
    history = History.replay([use(1, 10), use(2, 20), use(3, 40), use(4, 50)], [reversal(4, 50), reversal(1, 30)])
    assert history.after_use == {(REF, 1): 2, (REF, 2): 1, (REF, 3): 1, (REF, 4): 0}
    assert history.after_reversal == {(REF, 1): 2, (REF, 4): 1}
