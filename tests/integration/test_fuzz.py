"""Fuzzing the gRPC API with Hypothesis against the real server stack, Redis and Postgres.

Every generated request is judged by an oracle written from the contract (tests/integration/fuzz_strategies.py,
not gateway.validation) and by a model of the campaigns' state (uses left, first answers to idempotency keys):

- a request with bad fields is INVALID_ARGUMENT naming exactly those fields, and changes nothing in Redis;
- a good one is OK with the outcome the model predicts (or NOT_FOUND for GetCode of an unknown code), and
  Redis changes only by the one outbox event of a new redemption;
- bytes protobuf cannot parse are INVALID_ARGUMENT with ErrorInfo MALFORMED_REQUEST, for every RPC (health too)
  and every stream message; a message over 16384 bytes is RESOURCE_EXHAUSTED; never UNKNOWN or INTERNAL;
- a stream message with a bad batch_id or over 64 items ends the stream; any other is answered item by item,
  in a reply no larger than `worst_reply_bytes(items)`, and the stream stays open.

Runs are reproducible: `derandomize=True` and no example database, so every run draws the same examples (the
codes issued, and so the codes in them, differ from run to run). A passing run sends exactly 1,658 requests (RPC
calls plus stream messages), counted in `SENT` and checked by the last test, `test_request_budget`; a failing
test sends more while Hypothesis shrinks its example.

    test                              examples                  requests per example               requests
    test_redeem_fields                250                       1 Redeem                                250
    test_validate_fields              120                       1 Validate                              120
    test_get_code_fields              120                       1 GetCode                               120
    test_unparseable_bytes            25 hand-picked + 100      4 (Redeem, Validate, GetCode, health)   500
    test_unparseable_stream_message   25 hand-picked + 100      3 stream messages (good, fuzzed, ping)  375
    test_message_size_limit           4 hand-picked + 4         3 unary + 3 stream messages              48
    test_stream_mixed_items           120                       2 stream messages (fuzzed, ping)        240
    test_regression_* (2 tests)       -                         2 and 3 stream messages                   5

About a minute in all: Redis snapshots around every request cost ~4 ms each, and gRPC takes 0.1-1 s to refuse
an oversized message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway import codes
from gateway.grpc_api.stream_replies import worst_reply_bytes
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, RunningGateway
from tests.integration.fuzz_oracle import (
    CALL_TIMEOUT_S,
    FAILED,
    PING,
    SENT,
    CodeState,
    Fuzz,
    Model,
)
from tests.integration.fuzz_strategies import (
    MALFORMED_CASES,
    MAX_MESSAGE_BYTES,
    CodeStrategies,
    Fields,
    bad_fields,
    batch_ids,
    padded_message,
    raw_payloads,
    request_fields,
    stream_items,
)
from tests.integration.grpc_helpers import outbox_events

# Function-scoped fixtures (the gateway, the campaigns and the model of their state) are shared by all examples of
# a test on purpose: the model follows every change, so an example may meet state earlier examples left.
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
EXPECTED_SENT = {
    "test_redeem_fields": 250,
    "test_validate_fields": 120,
    "test_get_code_fields": 120,
    "test_unparseable_bytes": (len(MALFORMED_CASES) + 100) * 4,
    "test_unparseable_stream_message": (len(MALFORMED_CASES) + 100) * 3,
    "test_message_size_limit": (4 + 4) * 6,
    "test_stream_mixed_items": 120 * 2,
    "test_regression_one_valid_item_among_60_all_bad": 2,
    "test_regression_128_char_batch_id_and_64_all_bad_items": 3,
}


# -- Fixtures ---------------------------------------------------------------------------------------------------

# (codes, rules, window): a few codes with many uses, two single-use ones, one expired, one not yet valid.
CAMPAIGNS: list[tuple[int, dict[str, int], str]] = [
    (3, {"uses_per_code": 100}, "open"),
    (2, {"uses_per_code": 1}, "open"),
    (1, {"valid_from_ms": T0_MS - 2 * DAY_MS, "valid_until_ms": T0_MS - DAY_MS}, "expired"),
    (1, {"valid_from_ms": T0_MS + DAY_MS, "valid_until_ms": T0_MS + 2 * DAY_MS}, "not yet valid"),
]


@pytest_asyncio.fixture(loop_scope="session")
async def fuzz(gateway: RunningGateway, redis: Redis, issue: Issue, request: pytest.FixtureRequest) -> Fuzz:
    model = Model()
    for count, rules, window in CAMPAIGNS:
        issued = await issue(count, **rules)
        uses = rules.get("uses_per_code", 1)
        model.codes.update({code: CodeState(issued.campaign.id, uses, uses, window) for code in issued.codes})
    return Fuzz(gateway, redis, model, CodeStrategies.around(list(model.codes)), request.node.originalname)


# -- 1. Every field of Redeem, Validate and GetCode -------------------------------------------------------------


@settings(FUZZ, max_examples=250)
@given(data=st.data())
async def test_redeem_fields(fuzz: Fuzz, data: st.DataObject) -> None:
    fields = data.draw(request_fields(fuzz.codes), label="request")
    fuzz.verify(await fuzz.unary("Redeem", fields.redeem().SerializeToString()))


@settings(FUZZ, max_examples=120)
@given(data=st.data())
async def test_validate_fields(fuzz: Fuzz, data: st.DataObject) -> None:
    fields = data.draw(request_fields(fuzz.codes), label="request")
    fuzz.verify(await fuzz.unary("Validate", fields.validate().SerializeToString()))


@settings(FUZZ, max_examples=120)
@given(data=st.data())
async def test_get_code_fields(fuzz: Fuzz, data: st.DataObject) -> None:
    code = data.draw(st.one_of(fuzz.codes.good, fuzz.codes.bad), label="code")
    fuzz.verify(await fuzz.unary("GetCode", Fields(code).get_code().SerializeToString()))


# -- 2. Bytes protobuf cannot parse -----------------------------------------------------------------------------


def with_hand_picked(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run `test` on every hand-picked malformed case first (explicit examples, outside max_examples)."""
    for case in reversed(MALFORMED_CASES):
        test = example(payload=case)(test)
    return test


@settings(FUZZ, max_examples=100)
@with_hand_picked
@given(payload=raw_payloads())
async def test_unparseable_bytes(fuzz: Fuzz, payload: bytes) -> None:
    problems = []
    for rpc_name in ("Redeem", "Validate", "GetCode", "Health"):
        problems += await fuzz.unary(rpc_name, payload)
    fuzz.verify(problems)


GOOD_FIRST = pb.RedeemStreamRequest(
    batch_id="first",
    items=[Fields(codes.generate(codes.Route(999, 0), 12345), "k", "s", "t").redeem()],  # a campaign never issued
).SerializeToString()


async def converse(fuzz: Fuzz, payloads: list[bytes]) -> list[str]:
    """Send the messages on one stream until it ends; then a ping, on a new stream if it has ended."""
    conversation, problems = fuzz.stream(), []
    for payload in payloads:
        found, still_open = await conversation.exchange(payload)
        problems += found
        if not still_open:
            conversation = fuzz.stream()
            break
    found, _ = await conversation.exchange(PING)
    return problems + found + await conversation.close()


@settings(FUZZ, max_examples=100)
@with_hand_picked
@given(payload=raw_payloads())
async def test_unparseable_stream_message(fuzz: Fuzz, payload: bytes) -> None:
    fuzz.verify(await converse(fuzz, [GOOD_FIRST, payload]))


# -- 3. Messages over the size limit ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=4)  # gRPC takes 0.1-1 s to refuse an oversized message
@example(size=MAX_MESSAGE_BYTES)  # exactly at the limit: accepted (and judged on its content)
@example(size=MAX_MESSAGE_BYTES + 1)
@example(size=4 * MAX_MESSAGE_BYTES)
@example(size=1 << 20)
@given(size=st.one_of(st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 64), st.integers(16385, 1 << 20)))
async def test_message_size_limit(fuzz: Fuzz, size: int) -> None:
    payload, problems = padded_message(size), []
    for rpc_name in ("Redeem", "Validate", "GetCode"):
        problems += await fuzz.unary(rpc_name, payload)
    fuzz.verify(problems + await converse(fuzz, [GOOD_FIRST, payload]))


# -- 4. Streams mixing good and bad items -----------------------------------------------------------------------


@settings(FUZZ, max_examples=120)
@given(data=st.data())
async def test_stream_mixed_items(fuzz: Fuzz, data: st.DataObject) -> None:
    batch_id = data.draw(batch_ids(), label="batch_id")
    items = data.draw(stream_items(fuzz.codes), label="items")
    message = pb.RedeemStreamRequest(batch_id=batch_id, items=[item.redeem() for item in items])
    fuzz.verify(await converse(fuzz, [message.SerializeToString()]))


# -- The bug report: replies with many all-bad items were larger than the send limit ----------------------------


LONG_S, FULLWIDTH_S, CYRILLIC_T = "\N{LATIN SMALL LETTER LONG S}", "\uff33", "\N{CYRILLIC CAPITAL LETTER TE}"
ALL_BAD = [  # every field bad: 8 field violations per item
    Fields(LONG_S * 17, "", "a b", "!" * 65, "😀", (math.nan, math.inf, -1.0)),
    Fields("0" * 64, "k\x00", f"{FULLWIDTH_S}tore", "\t", "é" * 129, (91.0, -math.inf, math.nan)),
    Fields("\N{LATIN SMALL LIGATURE ST}" * 20, "x" * 129, "", "", "a/b", (-math.nan, 181.0, 100_000.5)),
    Fields("\t\n", LONG_S, "s" * 65, f"{CYRILLIC_T}ill", " ", (math.inf, math.nan, math.inf)),
]


def all_bad_items(count: int) -> list[pb.RedeemRequest]:
    items = [ALL_BAD[n % len(ALL_BAD)].redeem() for n in range(count)]
    assert all(len(bad_fields(item)) == 8 for item in items)
    return items


def assert_all_bad_results(results: list[pb.RedeemStreamResult]) -> None:
    for result in results:
        assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert len({v.field for v in result.error.field_violations}) == 8


async def stream_replies(gateway: RunningGateway, test: str, messages: list[pb.RedeemStreamRequest]) -> list[Any]:
    SENT[test] += len(messages)
    return [reply async for reply in gateway.stub.RedeemStream(iter(messages), timeout=CALL_TIMEOUT_S)]


async def test_regression_one_valid_item_among_60_all_bad(gateway: RunningGateway, issue: Issue, redis: Redis) -> None:
    issued = await issue(1)
    valid = Fields(issued.codes[0], "k1", "store-1", "till-1").redeem()
    message = pb.RedeemStreamRequest(batch_id="b1", items=[valid, *all_bad_items(60)])
    assert message.ByteSize() <= MAX_MESSAGE_BYTES

    reply, ping = await stream_replies(
        gateway, "test_regression_one_valid_item_among_60_all_bad", [message, pb.RedeemStreamRequest(batch_id="ping")]
    )

    assert reply.ByteSize() <= worst_reply_bytes(61) and len(reply.results) == 61
    assert reply.results[0].response.outcome == pb.OUTCOME_REDEEMED
    assert_all_bad_results(list(reply.results)[1:])
    assert ping.batch_id == "ping" and not ping.results
    assert len(await outbox_events(redis, issued.campaign.id)) == 1


async def test_regression_128_char_batch_id_and_64_all_bad_items(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(1)
    message = pb.RedeemStreamRequest(batch_id="b" * 128, items=all_bad_items(64))
    valid = pb.RedeemStreamRequest(batch_id="next", items=[Fields(issued.codes[0], "k", "s", "t").redeem()])
    assert message.ByteSize() <= MAX_MESSAGE_BYTES

    replies = await stream_replies(
        gateway, "test_regression_128_char_batch_id_and_64_all_bad_items", [message, message, valid]
    )

    assert [reply.batch_id for reply in replies] == ["b" * 128, "b" * 128, "next"]
    for reply in replies[:2]:
        assert len(reply.results) == 64 and reply.ByteSize() <= worst_reply_bytes(64)
        assert_all_bad_results(list(reply.results))
    assert replies[2].results[0].response.outcome == pb.OUTCOME_REDEEMED
    assert len(await outbox_events(redis, issued.campaign.id)) == 1


# -- The budget -------------------------------------------------------------------------------------------------


def test_request_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """Every test that ran and passed sent exactly the requests the module docstring counts."""
    with capsys.disabled():
        print("\nfuzz requests sent:", dict(SENT), "failed (counts include shrinking):", sorted(FAILED))
    assert sum(EXPECTED_SENT.values()) == 1658  # as the module docstring says
    for name, sent in SENT.items():
        if name not in FAILED:
            assert sent == EXPECTED_SENT[name], name
