"""One table maps each decision to the proto enum and the machine reason a caller sees."""

from __future__ import annotations

from gateway.domain import Outcome
from gateway.grpc_api.servicer import ANSWERS
from gateway.pb.redemption.v1 import redemption_pb2 as pb


def test_every_outcome_has_one_answer_and_every_answer_an_outcome() -> None:
    assert set(ANSWERS) == set(Outcome)
    assert {enum for enum, _ in ANSWERS.values()} == set(pb.Outcome.values()) - {pb.OUTCOME_UNSPECIFIED}
    assert len({reason for _, reason in ANSWERS.values()}) == len(ANSWERS)
