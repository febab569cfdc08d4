"""One table maps each decision to the proto enum and the machine reason a caller sees."""

from __future__ import annotations

from gateway.domain import Outcome
from gateway.grpc_api.servicer import ANSWERS
from gateway.pb.redemption.v1 import redemption_pb2 as pb


def test_every_outcome_has_one_answer_and_every_answer_an_outcome() -> None:
    assert set(ANSWERS) == set(Outcome)
    assert {enum for enum, _ in ANSWERS.values()} == set(pb.Outcome.values()) - {pb.OUTCOME_UNSPECIFIED}
    fixed = [reason for _, reason in ANSWERS.values() if reason]
    assert len(set(fixed)) == len(fixed)
    # the outcomes whose reason is the rule's (the risk engine's, a campaign rule's) take it from the result
    assert {o for o, (_, reason) in ANSWERS.items() if not reason} == {
        Outcome.RISK_DENIED, Outcome.NOT_ALLOWED, Outcome.BUDGET_EXHAUSTED}  # fmt: skip
