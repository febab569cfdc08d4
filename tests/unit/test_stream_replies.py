"""The size of a RedeemStream or DispenseStream reply is bounded by construction
(gateway/grpc_api/stream_replies.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.grpc_api.errors import Fault
from gateway.grpc_api.stream_replies import (
    DISPENSE_STREAM_MAX_SECRETS,
    item_error,
    send_limit,
    worst_dispense_reply_bytes,
    worst_item_bytes,
    worst_reply_bytes,
)
from gateway.inventory.importing import MAX_SECRET as MAX_SECRET_BYTES
from gateway.pb.redemption.v1 import inventory_pb2 as inventory_pb
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.validation import MAX_BATCH_ID_CHARS, FieldViolation

_texts = st.text(max_size=600)
_violations = st.lists(st.builds(FieldViolation, _texts, _texts), max_size=20)
faults = st.builds(Fault, st.integers(-(2**31), 2**31 - 1), _texts, _texts, _violations)
responses = st.builds(
    pb.RedeemResponse,
    outcome=st.sampled_from(pb.Outcome.values()),
    reason=st.sampled_from(["REDEEMED", "NO_USES_LEFT", "CODE_NOT_FOUND", "CODE_NOT_YET_VALID"]),
    redemption_id=st.uuids().map(str),
    campaign_id=st.integers(-(2**63), 2**63 - 1),
    uses_left=st.integers(-(2**31), 2**31 - 1),
    replayed=st.booleans(),
    use_number=st.integers(-(2**31), 2**31 - 1),
)
results = st.one_of(
    faults.map(lambda f: pb.RedeemStreamResult(error=item_error(f))),
    responses.map(lambda r: pb.RedeemStreamResult(response=r)),
)
batch_ids = st.text(alphabet="AZaz09._:-", max_size=MAX_BATCH_ID_CHARS)


@settings(max_examples=300, deadline=None)
@given(faults)
def test_an_item_error_never_exceeds_the_worst_case(fault: Fault) -> None:
    size = pb.RedeemStreamResponse(results=[pb.RedeemStreamResult(error=item_error(fault))]).ByteSize()
    assert size <= worst_item_bytes()


@settings(max_examples=100, deadline=None)
@given(batch_ids, st.lists(results, max_size=64))
def test_every_reply_to_an_accepted_message_fits_the_send_limit(
    batch_id: str, items: list[pb.RedeemStreamResult]
) -> None:
    reply = pb.RedeemStreamResponse(batch_id=batch_id, results=items)
    assert reply.ByteSize() <= worst_reply_bytes(len(items)) <= send_limit(16_384, 64)


def test_the_bound_is_tight_for_the_worst_error() -> None:
    """All-bad items (every field violated, long texts) reach the bound exactly: it is not a loose guess."""
    worst = Fault(8, "m" * 1000, "r" * 100, [FieldViolation("f" * 50, "d" * 500)] * 12, quota_subject="s" * 500,
                  retry_after_ms=604_799_999)  # fmt: skip
    reply = pb.RedeemStreamResponse(
        batch_id="b" * MAX_BATCH_ID_CHARS, results=[pb.RedeemStreamResult(error=item_error(worst))] * 64
    )
    assert worst_reply_bytes(64) - reply.ByteSize() <= 64 * 10  # only the int32 code's varint (-1 vs 8) differs


def test_captions_are_cut_on_character_boundaries() -> None:
    error = item_error(Fault(3, "卡密" * 200, "R", [FieldViolation("字段" * 20, "说明" * 100)]))
    assert error.message.endswith("...") and len(error.message.encode()) <= 160
    assert error.field_violations[0].description.endswith("...")


def test_the_send_limit_grows_with_the_item_limit_and_never_falls_below_the_configured_one() -> None:
    # a DispenseStream message may carry up to 1,000 secrets whatever its item count: that reply is the larger
    assert send_limit(16_384, 1) == worst_dispense_reply_bytes(1) > 16_384
    assert send_limit(16_384, 64) == max(worst_reply_bytes(64), worst_dispense_reply_bytes(64)) > 16_384
    assert send_limit(500_000, 1) == 500_000
    assert send_limit(10_000_000, 64) == 10_000_000


def _secret(n: int) -> inventory_pb.DispensedSecret:
    secret = inventory_pb.DispensedSecret(secret_id=2**63 - 1 - n, secret="卡" * (MAX_SECRET_BYTES // 3) + "x",
                                          supplier="s" * 64, use_number=2**31 - 1)  # fmt: skip
    secret.expires_at.seconds, secret.expires_at.nanos = 253402300799, 999_999_999
    return secret


def test_the_largest_dispense_stream_reply_fits_its_bound() -> None:
    """64 orders sharing the most secrets a message may ask for, every secret as long as the import allows, with
    the largest ids and times: within worst_dispense_reply_bytes, and the bound is not loose beyond what it
    reserves per order for an error."""
    per_order = DISPENSE_STREAM_MAX_SECRETS // 64
    results = []
    for order in range(64):
        count = per_order + (1 if order < DISPENSE_STREAM_MAX_SECRETS % 64 else 0)
        response = inventory_pb.DispenseResponse(outcome=inventory_pb.INVENTORY_OUTCOME_DISPENSED, reason="DISPENSED",
                                                 replayed=True, secrets=[_secret(n) for n in range(count)])  # fmt: skip
        results.append(inventory_pb.DispenseStreamResult(response=response))
    reply = inventory_pb.DispenseStreamResponse(batch_id="b" * MAX_BATCH_ID_CHARS, results=results)
    assert sum(len(r.response.secrets) for r in reply.results) == DISPENSE_STREAM_MAX_SECRETS
    assert reply.ByteSize() <= worst_dispense_reply_bytes(64) <= send_limit(16_384, 64)
    # loose by each order's room for a worst-case error (~1.2 KB) it did not use, and a few varint bytes per secret
    assert worst_dispense_reply_bytes(64) - reply.ByteSize() < 64 * 1_300 + DISPENSE_STREAM_MAX_SECRETS * 20


@settings(max_examples=100, deadline=None)
@given(st.lists(faults, max_size=64))
def test_dispense_stream_item_errors_fit_the_bound(faults_: list[Fault]) -> None:
    reply = inventory_pb.DispenseStreamResponse(
        batch_id="b" * MAX_BATCH_ID_CHARS,
        results=[inventory_pb.DispenseStreamResult(error=item_error(f)) for f in faults_],
    )
    assert reply.ByteSize() <= worst_dispense_reply_bytes(len(faults_), 0)
