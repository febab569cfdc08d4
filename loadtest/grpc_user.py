"""A Locust User for the gateway's gRPC API, after Locust's documented gRPC pattern (`examples/grpc/grpc_user.py`):
a plain synchronous grpc channel made cooperative with gevent, and a client interceptor that reports every call
to Locust through `events.request`, with its response time and length.

How calls are reported (request type = the scenario, i.e. the User class name; name = method and result):
- an OK answer is named by its outcome, e.g. `Redeem:OUTCOME_REDEEMED`, `Redeem:OUTCOME_ALREADY_REDEEMED`; a
  replayed answer (a retry with the same idempotency key) gets `:replayed`, a risk decline its reason
  (`Redeem:OUTCOME_RISK_DENIED:LOCKED_OUT`), so each rule's declines are counted apart. Declines are answers, not
  failures.
- a gRPC error is named by its status, e.g. `Redeem:UNAVAILABLE`, and is a failure - unless the scenario lists
  the status in `expected_codes` (the attacker expects INVALID_ARGUMENT for mistyped codes).
- a scenario may attach a check to one call (`redeem(..., check=...)`); an answer the check rejects is a failure.

Only import this module in a Locust process: importing locust monkey-patches the standard library with gevent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import grpc
import grpc.experimental.gevent as grpc_gevent
from google.protobuf.message import Message
from locust import User
from locust.env import Environment
from locust.exception import LocustError

from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc

# grpc polls its completion queue in blocking C calls; this routes that through gevent so a call in flight lets the
# other users run. It must run before any channel exists.
grpc_gevent.init_gevent()

# Every call has a deadline, so a hung gateway shows up as DEADLINE_EXCEEDED failures instead of stuck users.
DEFAULT_TIMEOUT_S = 10.0

Check = Callable[[Any], str | None]
"""Looks at an OK answer; returns what is wrong with it, or None."""


class GrpcFailure(Exception):
    """A call that ended with a gRPC status the scenario does not expect (a short, stable message: Locust groups
    failures by it, and the RpcError's own text carries timestamps and peers)."""


class CheckFailed(Exception):
    """An OK answer that breaks what the scenario expects of it (e.g. a retry that was not replayed)."""


def request_name(method: str, response: Message | None, error: grpc.RpcError | None) -> str:
    """`Method:OUTCOME[:replayed]` for an answer, `Method:STATUS` for an error, `Method` for anything else."""
    if error is not None:
        return f"{method}:{error.code().name}"
    if response is None or "outcome" not in response.DESCRIPTOR.fields_by_name:
        return method
    outcome = getattr(response, "outcome")  # noqa: B009 - Message has no typed field
    name = f"{method}:{pb.Outcome.Name(outcome)}"
    if outcome == pb.OUTCOME_RISK_DENIED:
        name += f":{getattr(response, 'reason', '')}"
    return name + (":replayed" if getattr(response, "replayed", False) else "")


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Fires one Locust request event per unary call. One per user: `check` applies to that user's next call, and
    a user runs in a single greenlet, so nothing else can race for it."""

    def __init__(self, environment: Environment, *, request_type: str, expected_codes: frozenset[Any]) -> None:
        self._events = environment.events
        self._request_type = request_type
        self._expected = expected_codes
        self.check: Check | None = None

    def intercept_unary_unary(self, continuation: Any, call_details: Any, request: Message) -> Any:
        started = time.perf_counter()
        call = continuation(call_details, request)
        response: Message | None = None
        error: grpc.RpcError | None = None
        try:
            response = call.result()
        except grpc.RpcError as exc:  # returned by continuation, raised by result(); the stub re-raises it
            error = exc
        elapsed_ms = (time.perf_counter() - started) * 1000
        method = str(call_details.method).rsplit("/", 1)[-1]
        self._events.request.fire(  # type: ignore[no-untyped-call]  # locust's EventHook is untyped
            request_type=self._request_type,
            name=request_name(method, response, error),
            response_time=elapsed_ms,
            response_length=response.ByteSize() if response is not None else 0,
            response=response,
            context={},
            exception=self._failure(response, error),
        )
        return call

    def _failure(self, response: Message | None, error: grpc.RpcError | None) -> Exception | None:
        if error is not None:
            code = error.code()
            return None if code in self._expected else GrpcFailure(f"{code.name}: {error.details()}")
        problem = self.check(response) if self.check is not None else None
        return CheckFailed(problem) if problem else None


class GrpcUser(User):
    """A terminal talking to the gateway at Locust's `--host` (HOST:PORT, no scheme) over its own channel."""

    abstract = True
    expected_codes: ClassVar[frozenset[Any]] = frozenset()
    timeout_s: ClassVar[float] = DEFAULT_TIMEOUT_S

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host or "://" in self.host:
            raise LocustError(f"--host must be the gateway's HOST:PORT (e.g. 127.0.0.1:50051), not {self.host!r}")
        self._interceptor = LocustInterceptor(
            environment, request_type=type(self).__name__, expected_codes=self.expected_codes
        )
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self.api_key = ""  # set before on_start: every call carries it, as a real client's do

    def on_start(self) -> None:
        # Opened here, not in __init__: on_stop (which closes it) only runs for users that started.
        self._channel = grpc.intercept_channel(grpc.insecure_channel(self.host), self._interceptor)
        self._stub = pb_grpc.RedemptionServiceStub(self._channel)

    def on_stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def redeem(self, request: pb.RedeemRequest, *, check: Check | None = None) -> pb.RedeemResponse | None:
        """The answer, or None after a gRPC error (which the interceptor reported)."""
        response: pb.RedeemResponse | None = self._call("Redeem", request, check)
        return response

    def validate(self, request: pb.ValidateRequest) -> pb.ValidateResponse | None:
        """The answer, or None after a gRPC error (which the interceptor reported)."""
        response: pb.ValidateResponse | None = self._call("Validate", request, None)
        return response

    def _call(self, method: str, request: Message, check: Check | None) -> Any:
        if self._stub is None:
            raise LocustError("the channel is opened in on_start: call super().on_start() when overriding it")
        self._interceptor.check = check
        try:
            metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None
            return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.RpcError:
            return None
        finally:
            self._interceptor.check = None
