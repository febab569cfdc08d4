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

import asyncio
import math
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway import codes
from gateway.grpc_api.stream_replies import worst_reply_bytes
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, RunningGateway
from tests.integration.fuzz_strategies import (
    MALFORMED_CASES,
    MAX_MESSAGE_BYTES,
    CodeStrategies,
    Fields,
    bad_fields,
    batch_bad_fields,
    batch_ids,
    code_is_bad,
    normalised,
    padded_message,
    raw_payloads,
    request_fields,
    stream_items,
)
from tests.integration.grpc_helpers import outbox_events, redis_snapshot

SERVICE = "redemption.v1.RedemptionService"
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
CALL_TIMEOUT_S = 30

# Function-scoped fixtures (the gateway, the campaigns and the model of their state) are shared by all examples of
# a test on purpose: the model follows every change, so an example may meet state earlier examples left.
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SENT: Counter[str] = Counter()
FAILED: set[str] = set()
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


# -- The model: what the campaigns hold, and what the gateway must answer --------------------------------------


@dataclass
class CodeState:
    campaign_id: int
    uses_total: int
    uses_left: int
    window: str  # "open", "expired", "not yet valid"


Scope = tuple[str, str, str]  # terminal, idempotency key, normalised code
Fingerprint = tuple[str, str, bytes | None]  # store, device, location


@dataclass(frozen=True)
class FirstAnswer:
    """The answer to the first redemption under an idempotency key, which a retry gets again."""

    fingerprint: Fingerprint
    redemption_id: str
    use_number: int
    uses_left: int


@dataclass
class Model:
    codes: dict[str, CodeState] = field(default_factory=dict)
    # By (terminal, key, code), in order: the first answers, of every store that used that scope.
    first_answers: dict[Scope, list[FirstAnswer]] = field(default_factory=dict)


FRESH_ID = "<a new redemption id>"
NOT_FOUND_ANSWER = {"outcome": pb.OUTCOME_NOT_FOUND, "reason": "CODE_NOT_FOUND", "campaign_id": 0, "uses_left": 0}
WINDOW_ANSWERS = {"expired": (pb.OUTCOME_EXPIRED, "CODE_EXPIRED"), "not yet valid": (pb.OUTCOME_NOT_YET_VALID,
                  "CODE_NOT_YET_VALID")}  # fmt: skip
CODE_STATUSES = {"expired": pb.CODE_STATUS_EXPIRED, "not yet valid": pb.CODE_STATUS_NOT_YET_VALID}


@dataclass(frozen=True)
class Expected:
    status: grpc.StatusCode = OK
    fields: frozenset[str] = frozenset()  # the BadRequest fields of an INVALID_ARGUMENT (empty: not checked)
    reason: str = ""  # the ErrorInfo reason (empty: not checked)
    reply: Mapping[str, object] = field(default_factory=dict)  # fields the reply must have
    fresh: bool = False  # a new redemption: one outbox event
    or_else: Expected | None = None  # another answer that is right too


def invalid(fields: set[str]) -> Expected:
    return Expected(INVALID, frozenset(fields))


MALFORMED = Expected(INVALID, reason="MALFORMED_REQUEST")
TOO_LARGE = Expected(grpc.StatusCode.RESOURCE_EXHAUSTED)
KEY_REUSED = Expected(INVALID, frozenset({"idempotency_key"}), "IDEMPOTENCY_KEY_REUSED")


def scope(request: pb.RedeemRequest) -> Scope:
    return request.terminal_id, request.idempotency_key, normalised(request.code)


def fingerprint(request: pb.RedeemRequest) -> Fingerprint:
    """What makes a retry the same request (besides terminal, key and code, which are its scope): store, device
    and location, bit for bit (so -0.0 is not 0.0)."""
    loc = request.location
    where = struct.pack("<3d", loc.latitude, loc.longitude, loc.accuracy_m) if request.HasField("location") else None
    return request.store_id, request.customer_device_id, where


def expect_redeem(model: Model, request: pb.RedeemRequest) -> Expected:
    if bad := bad_fields(request):
        return invalid(bad)
    state = model.codes.get(normalised(request.code))
    if state is None:
        return Expected(reply={**NOT_FOUND_ANSWER, "redemption_id": "", "replayed": False})
    if state.window in WINDOW_ANSWERS:
        outcome, reason = WINDOW_ANSWERS[state.window]
        return Expected(reply={"outcome": outcome, "reason": reason, "campaign_id": state.campaign_id})
    # Whose key it is: the README says store_id/terminal_id "until authentication exists", after which it is the
    # API client's terminal. The two differ only for one terminal, key and code used from two stores: either
    # answer is right then.
    answers = model.first_answers.get(scope(request), [])
    by_store = decide(state, request, next((a for a in answers if a.fingerprint[0] == request.store_id), None))
    by_terminal = decide(state, request, answers[0] if answers else None)
    return by_store if by_store == by_terminal else replace(by_store, or_else=by_terminal)


def decide(state: CodeState, request: pb.RedeemRequest, first: FirstAnswer | None) -> Expected:
    """The answer to a good request for an open code, given the first answer in its idempotency scope."""
    answer = {"outcome": pb.OUTCOME_REDEEMED, "reason": "REDEEMED", "campaign_id": state.campaign_id}
    if first is not None and first.fingerprint != fingerprint(request):
        return KEY_REUSED
    if first is not None:
        return Expected(reply={**answer, "replayed": True, "redemption_id": first.redemption_id,
                               "use_number": first.use_number, "uses_left": first.uses_left})  # fmt: skip
    if state.uses_left == 0:
        return Expected(reply={"outcome": pb.OUTCOME_ALREADY_REDEEMED, "reason": "NO_USES_LEFT", "uses_left": 0,
                               "redemption_id": "", "campaign_id": state.campaign_id})  # fmt: skip
    use_number = state.uses_total - state.uses_left + 1
    return Expected(reply={**answer, "replayed": False, "redemption_id": FRESH_ID, "use_number": use_number,
                           "uses_left": state.uses_left - 1}, fresh=True)  # fmt: skip


def expect_validate(model: Model, request: pb.ValidateRequest) -> Expected:
    if bad := bad_fields(request):
        return invalid(bad)
    state = model.codes.get(normalised(request.code))
    if state is None:
        return Expected(reply=NOT_FOUND_ANSWER)
    if state.window in WINDOW_ANSWERS:
        outcome, reason = WINDOW_ANSWERS[state.window]
        return Expected(reply={"outcome": outcome, "reason": reason, "campaign_id": state.campaign_id})
    if state.uses_left == 0:
        answer = {"outcome": pb.OUTCOME_ALREADY_REDEEMED, "reason": "NO_USES_LEFT", "uses_left": 0}
    else:
        answer = {"outcome": pb.OUTCOME_REDEEMABLE, "reason": "REDEEMABLE", "uses_left": state.uses_left}
    return Expected(reply={**answer, "campaign_id": state.campaign_id})


def expect_get_code(model: Model, request: pb.GetCodeRequest) -> Expected:
    if bad := bad_fields(request):
        return invalid(bad)
    state = model.codes.get(normalised(request.code))
    if state is None:
        return Expected(NOT_FOUND)
    in_window = pb.CODE_STATUS_ACTIVE if state.uses_left else pb.CODE_STATUS_FULLY_REDEEMED
    status = CODE_STATUSES.get(state.window, in_window)
    return Expected(reply={"campaign_id": state.campaign_id, "status": status, "uses_total": state.uses_total,
                           "uses_left": state.uses_left})  # fmt: skip


def expect_health(model: Model, request: health_pb2.HealthCheckRequest) -> Expected:
    if request.service in ("", SERVICE):
        return Expected(reply={"status": health_pb2.HealthCheckResponse.SERVING})
    return Expected(NOT_FOUND)


# -- What the gateway answered ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    status: grpc.StatusCode
    fields: frozenset[str] = frozenset()  # BadRequest / ItemError field violations
    reason: str = ""  # ErrorInfo / ItemError reason
    reply: Any = None  # the response message when OK
    text: str = ""  # the status message, for failure reports


def observed_error(error: grpc.aio.AioRpcError) -> Observed:
    fields: set[str] = set()
    reason = ""
    try:
        status = rpc_status.from_call(error)
    except ValueError as exc:  # the google.rpc.Status in the trailers disagrees with the call's status
        return Observed(error.code(), text=f"{error.details()} ({exc})")
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    return Observed(error.code(), frozenset(fields), reason, text=error.details() or "")


def observed_item(result: pb.RedeemStreamResult) -> Observed:
    if result.HasField("response"):
        return Observed(OK, reply=result.response)
    if not result.HasField("error"):
        return Observed(grpc.StatusCode.UNKNOWN, text="a result with neither response nor error")
    error = result.error
    status = STATUS_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    return Observed(status, frozenset(v.field for v in error.field_violations), error.reason, text=error.message)


def judge(expected: Expected, observed: Observed) -> tuple[list[str], bool]:
    """What is wrong with the answer (nothing if it is one of the right ones), and whether the right answer it is
    made a new redemption."""
    problems = mismatches(expected, observed)
    if problems and expected.or_else is not None and not mismatches(expected.or_else, observed):
        return [], expected.or_else.fresh
    return problems, expected.fresh


def mismatches(expected: Expected, observed: Observed) -> list[str]:
    if observed.status != expected.status:
        wanted = f"{expected.status.name} {sorted(expected.fields) or expected.reason or expected.reply}"
        got = f"{observed.status.name} {sorted(observed.fields)} {observed.reason} {observed.text!r}"
        return [f"expected {wanted}, got {got}"]
    problems = []
    if expected.fields and observed.fields != expected.fields:
        problems.append(f"bad fields named {sorted(observed.fields)}, expected {sorted(expected.fields)}")
    if expected.reason and observed.reason != expected.reason:
        problems.append(f"ErrorInfo reason {observed.reason!r}, expected {expected.reason!r}")
    for name, want in expected.reply.items():
        got = getattr(observed.reply, name)
        if (len(got) != 36) if want == FRESH_ID else (got != want):
            problems.append(f"reply {name} = {got!r}, expected {want!r}")
    return problems


def observe_redeem(model: Model, request: pb.RedeemRequest, observed: Observed) -> None:
    """Follow a new redemption the gateway reports (even a wrong one, so one bug does not cascade)."""
    reply = observed.reply
    if observed.status != OK or reply.outcome != pb.OUTCOME_REDEEMED or reply.replayed:
        return
    lenient = "".join(request.code.upper().replace("-", " ").split())  # what a lax gateway might have redeemed
    code = normalised(request.code) if not code_is_bad(request.code) else lenient
    if (state := model.codes.get(code)) is not None:
        state.uses_left = reply.uses_left
        first = FirstAnswer(fingerprint(request), reply.redemption_id, reply.use_number, reply.uses_left)
        model.first_answers.setdefault(scope(request), []).append(first)


# -- Calling the gateway with bytes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    response: type[Message]
    expect: Callable[[Model, Any], Expected]
    observe: Callable[[Model, Any, Observed], None] = lambda model, request, observed: None


RPCS = {
    "Redeem": Rpc(f"/{SERVICE}/Redeem", pb.RedeemRequest, pb.RedeemResponse, expect_redeem, observe_redeem),
    "Validate": Rpc(f"/{SERVICE}/Validate", pb.ValidateRequest, pb.ValidateResponse, expect_validate),
    "GetCode": Rpc(f"/{SERVICE}/GetCode", pb.GetCodeRequest, pb.GetCodeResponse, expect_get_code),
    "Health": Rpc(
        "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, expect_health
    ),
}
STREAM_PATH = f"/{SERVICE}/RedeemStream"
PING = pb.RedeemStreamRequest(batch_id="ping").SerializeToString()


def outboxes(snapshot: dict[str, object]) -> list[str]:
    return [key for key in snapshot if key.endswith(":outbox")]


def state_changes(before: dict[str, object], after: dict[str, object], fresh: int) -> list[str]:
    """Redis must be unchanged, but for one outbox event (and the code's state) per new redemption."""
    if fresh == 0:
        changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
        return [f"Redis changed: {changed}"] if changed else []
    added = sum(len(cast(list[Any], after[k])) - len(cast(list[Any], before.get(k, []))) for k in outboxes(after))
    return [] if added == fresh else [f"{added} outbox events appended, expected {fresh}"]


class Fuzz:
    """One test's gateway, Redis, campaigns and model; counts the requests it sends. (Not a dataclass: Hypothesis
    prints a dataclass argument field by field in its report of a failing example.)"""

    def __init__(self, gateway: RunningGateway, redis: Redis, model: Model, codes: CodeStrategies, name: str) -> None:
        self.gateway, self.redis, self.model, self.codes, self.name = gateway, redis, model, codes, name

    def __repr__(self) -> str:
        return f"<gateway on {self.gateway.target}, {len(self.model.codes)} codes issued>"

    def verify(self, problems: list[str]) -> None:
        if problems:
            FAILED.add(self.name)
            raise AssertionError("\n".join(problems))

    async def unary(self, rpc_name: str, payload: bytes) -> list[str]:
        """Send `payload` as the request of an RPC; check the answer and Redis against the oracle and model."""
        rpc, request = RPCS[rpc_name], None
        if len(payload) > MAX_MESSAGE_BYTES:
            expected = TOO_LARGE
        else:
            try:
                request = rpc.request.FromString(payload)
                expected = rpc.expect(self.model, request)
            except DecodeError:
                expected = MALFORMED
        before = await redis_snapshot(self.redis)
        SENT[self.name] += 1
        try:
            answer = await self.gateway.channel.unary_unary(rpc.path)(payload, timeout=CALL_TIMEOUT_S)
            observed = Observed(OK, reply=rpc.response.FromString(answer))
        except grpc.aio.AioRpcError as error:
            observed = observed_error(error)
        outcome = getattr(observed.reply, "outcome", None)
        event(f"{rpc_name}: {observed.status.name} {'' if outcome is None else pb.Outcome.Name(outcome)}")
        if request is not None:
            rpc.observe(self.model, request, observed)
        problems, fresh = judge(expected, observed)
        problems += state_changes(before, await redis_snapshot(self.redis), int(fresh))
        return [f"{rpc_name}: {problem}" for problem in problems]

    def stream(self) -> Conversation:
        return Conversation(self, self.gateway.channel.stream_stream(STREAM_PATH)(timeout=CALL_TIMEOUT_S))


Step = pb.RedeemStreamResponse | Observed  # a reply, or how the stream ended


@dataclass
class Conversation:
    """One RedeemStream call, driven one message at a time (bytes in, bytes out)."""

    fuzz: Fuzz
    call: Any

    async def send(self, payload: bytes) -> Step:
        SENT[self.fuzz.name] += 1
        try:
            await self.call.write(payload)
            reply = await self.call.read()
        except grpc.aio.AioRpcError as error:
            return observed_error(error)
        except asyncio.InvalidStateError:  # the call had already ended (wrongly, or the test would not write)
            return Observed(await self.call.code(), text="the stream had ended before this message")
        if reply is grpc.aio.EOF:
            return Observed(await self.call.code(), text="the stream ended without a reply")
        return pb.RedeemStreamResponse.FromString(reply)

    async def close(self) -> list[str]:
        """End an open stream; it must end OK."""
        await self.call.done_writing()
        status = await self.call.code()
        return [] if status == OK else [f"the stream ended {status.name}: {await self.call.details()}"]

    async def exchange(self, payload: bytes) -> tuple[list[str], bool]:
        """Send one message and check its fate and Redis; returns the problems and whether the stream is open."""
        refusal, message = refusal_of(payload)
        before = await redis_snapshot(self.fuzz.redis)
        step = await self.send(payload)
        if refusal is not None:
            problems, fresh = mismatches(refusal, step if isinstance(step, Observed) else Observed(OK)), 0
        else:
            assert message is not None
            problems, fresh = check_reply(self.fuzz.model, message, step)
        event(f"stream message: {describe(step)}")
        problems += state_changes(before, await redis_snapshot(self.fuzz.redis), fresh)
        return problems, not isinstance(step, Observed)


def describe(step: Step) -> str:
    if isinstance(step, Observed):
        return f"ended {step.status.name}"
    errors = sum(result.HasField("error") for result in step.results)
    count = len(step.results)
    return f"answered, {'0' if not count else '1-9' if count < 10 else '10-59' if count < 60 else '60-64'} items" + (
        f", {'some' if errors < count else 'all'} with errors" if errors else ""
    )


def refusal_of(payload: bytes) -> tuple[Expected | None, pb.RedeemStreamRequest | None]:
    """How a stream message must be refused (None: it must be answered), and the message if it parses."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return TOO_LARGE, None
    try:
        message = pb.RedeemStreamRequest.FromString(payload)
    except DecodeError:
        return MALFORMED, None
    bad = batch_bad_fields(message)
    return (invalid(bad) if bad else None), message


def check_reply(model: Model, message: pb.RedeemStreamRequest, step: Step) -> tuple[list[str], int]:
    """Problems with the reply to an accepted message, and how many new redemptions it should have made."""
    items = list(message.items)
    if isinstance(step, Observed):
        return [f"an accepted message of {len(items)} items got {step.status.name}: {step.text!r}"], 0
    problems, fresh = [], 0
    if step.batch_id != message.batch_id or len(step.results) != len(items):
        problems.append(f"reply: batch_id {step.batch_id!r}, {len(step.results)} results for {len(items)} items")
    if step.ByteSize() > worst_reply_bytes(len(items)):
        problems.append(f"reply of {step.ByteSize()} bytes > worst_reply_bytes({len(items)})")
    for n, (item, result) in enumerate(zip(items, step.results, strict=False)):
        found, new = judge(expect_redeem(model, item), observed := observed_item(result))
        problems += [f"item {n}: {problem}" for problem in found]
        observe_redeem(model, item, observed)
        fresh += new
    return problems, fresh


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
