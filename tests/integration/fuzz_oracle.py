"""The fuzz suite's oracle: a model of the campaigns' state, what the gateway must answer to each request (written
from the contract, not from gateway.validation), how an answer is observed and judged, and the `Fuzz` harness that
sends requests with a Redis snapshot around each. The tests are in test_fuzz.py."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from hypothesis import event
from redis.asyncio import Redis

from gateway.grpc_api.stream_replies import worst_reply_bytes
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.integration.conftest import RunningGateway
from tests.integration.fuzz_strategies import (
    MAX_MESSAGE_BYTES,
    CodeStrategies,
    bad_fields,
    batch_bad_fields,
    code_is_bad,
    normalised,
)
from tests.integration.grpc_helpers import decision_counts, redis_snapshot, without_decision_counts

SERVICE = "redemption.v1.RedemptionService"
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
CALL_TIMEOUT_S = 30

SENT: Counter[str] = Counter()
FAILED: set[str] = set()

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


# What a Redeem answer adds to its campaign's decision counters (lua/redeem.lua "Decision counters"): one decided
# attempt under its reason - never a replay, an unknown code (not attributable to a campaign) or an error.
COUNTED_REASONS = frozenset({"REDEEMED", "NO_USES_LEFT", "CODE_EXPIRED", "CODE_NOT_YET_VALID"})


def decided(observed: Observed) -> Counter[str]:
    """The decision a Redeem answer (or stream item) must have counted."""
    reply = observed.reply
    if observed.status != OK or reply is None or reply.replayed or reply.reason not in COUNTED_REASONS:
        return Counter()
    return Counter({reply.reason: 1})


def state_changes(before: dict[str, object], after: dict[str, object], fresh: int, counted: Counter[str]) -> list[str]:
    """Redis must be unchanged, but for one outbox event (and the code's state) per new redemption and the
    decision counters by exactly the decided Redeem answers (`counted`; none for invalid input, Validate,
    GetCode or health)."""
    moved = decision_counts(after)
    moved.subtract(decision_counts(before))
    moved_by = {reason: n for reason, n in moved.items() if n}
    problems = [] if moved_by == dict(counted) else [f"decision counters moved by {moved_by}, expected {dict(counted)}"]
    return problems + _other_changes(without_decision_counts(before), without_decision_counts(after), fresh)


def _other_changes(before: dict[str, object], after: dict[str, object], fresh: int) -> list[str]:
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
        counted = decided(observed) if rpc_name == "Redeem" else Counter[str]()
        problems += state_changes(before, await redis_snapshot(self.redis), int(fresh), counted)
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
        counted: Counter[str] = Counter()
        if refusal is not None:
            problems, fresh = mismatches(refusal, step if isinstance(step, Observed) else Observed(OK)), 0
        else:
            assert message is not None
            problems, fresh = check_reply(self.fuzz.model, message, step)
            if not isinstance(step, Observed):
                for result in step.results:
                    counted += decided(observed_item(result))
        event(f"stream message: {describe(step)}")
        problems += state_changes(before, await redis_snapshot(self.fuzz.redis), fresh, counted)
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
