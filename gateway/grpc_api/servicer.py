"""redemption.v1.RedemptionService: translates protobuf to domain objects and back, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2

from gateway.campaigns.reversal import ReversalOutcome, ReverseInput
from gateway.domain import CodeState, ItemFailure, Location, Outcome, RedeemInput, RedeemResult
from gateway.grpc_api.auth import current_caller
from gateway.grpc_api.errors import fault_for, request_id_of, rpc_boundary, status_for
from gateway.grpc_api.observe import item_failed, note
from gateway.grpc_api.stream_replies import item_error, retry_after_ms
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.service import RedemptionService
from gateway.validation import check_stream_message

# The one table from a decision to what a caller sees: the proto enum and the stable machine reason (documented
# in the proto). The script's statuses are the Outcome values (redis_store.to_result).
ANSWERS: dict[Outcome, tuple[pb.Outcome.ValueType, str]] = {
    Outcome.REDEEMED: (pb.OUTCOME_REDEEMED, "REDEEMED"),
    Outcome.ALREADY_REDEEMED: (pb.OUTCOME_ALREADY_REDEEMED, "NO_USES_LEFT"),
    Outcome.NOT_FOUND: (pb.OUTCOME_NOT_FOUND, "CODE_NOT_FOUND"),
    Outcome.EXPIRED: (pb.OUTCOME_EXPIRED, "CODE_EXPIRED"),
    Outcome.NOT_YET_VALID: (pb.OUTCOME_NOT_YET_VALID, "CODE_NOT_YET_VALID"),
    Outcome.REDEEMABLE: (pb.OUTCOME_REDEEMABLE, "REDEEMABLE"),
    # the reason is the risk engine's (risk.model.Reason): answer() takes it from the result
    Outcome.RISK_DENIED: (pb.OUTCOME_RISK_DENIED, ""),
    Outcome.CAMPAIGN_PAUSED: (pb.OUTCOME_CAMPAIGN_PAUSED, "CAMPAIGN_PAUSED"),
    # the campaign rule's reason (STORE_NOT_ALLOWED, BUDGET_VALUE_EXHAUSTED, ...): answer() takes it from the result
    Outcome.NOT_ALLOWED: (pb.OUTCOME_NOT_ALLOWED, ""),
    Outcome.BUDGET_EXHAUSTED: (pb.OUTCOME_BUDGET_EXHAUSTED, ""),
}


REVERSAL_OUTCOMES: dict[ReversalOutcome, pb.ReversalOutcome.ValueType] = {
    ReversalOutcome.REVERSED: pb.REVERSAL_OUTCOME_REVERSED,
    ReversalOutcome.ALREADY_REVERSED: pb.REVERSAL_OUTCOME_ALREADY_REVERSED,
    ReversalOutcome.NOT_FOUND: pb.REVERSAL_OUTCOME_NOT_FOUND,
    ReversalOutcome.WINDOW_CLOSED: pb.REVERSAL_OUTCOME_WINDOW_CLOSED,
}

_LABELS = {outcome: outcome.value.lower() for outcome in Outcome}


def answer(result: RedeemResult, method: str) -> tuple[pb.Outcome.ValueType, str]:
    """The proto outcome and the machine reason of a result (counted and noted for the access log)."""
    outcome, reason = ANSWERS[result.outcome]
    reason = reason or result.rule_reason or result.risk_reason
    note(method, _LABELS[result.outcome], reason)
    return outcome, reason


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _location(request: pb.RedeemRequest | pb.ValidateRequest) -> Location | None:
    if not request.HasField("location"):
        return None
    loc = request.location
    return Location(loc.latitude, loc.longitude, loc.accuracy_m)


def redeem_input(request: pb.RedeemRequest) -> RedeemInput:
    """The domain view of a RedeemRequest."""
    return RedeemInput(
        code=request.code,
        idempotency_key=request.idempotency_key,
        store_id=request.store_id,
        terminal_id=request.terminal_id,
        customer_device_id=request.customer_device_id,
        location=_location(request),
    )


def redeem_response(result: RedeemResult, method: str = "Redeem") -> pb.RedeemResponse:
    """The RedeemResponse for a domain result."""
    outcome, reason = answer(result, method)
    response = pb.RedeemResponse(
        outcome=outcome,
        reason=reason,
        campaign_id=result.campaign_id,
        uses_left=result.uses_left,
        replayed=result.replayed,
    )
    if result.retry_after_ms:
        response.retry_after.FromMilliseconds(retry_after_ms(result.retry_after_ms))
    if result.outcome is Outcome.REDEEMED:
        response.redemption_id = result.redemption_id
        response.use_number = result.use_number
        response.redeemed_at.FromMilliseconds(result.redeemed_at_ms)
    return response


def _code_status(state: CodeState, now_ms: int) -> pb.CodeStatus.ValueType:
    if now_ms < state.valid_from_ms:
        return pb.CODE_STATUS_NOT_YET_VALID
    if state.uses_used >= state.uses_total:
        return pb.CODE_STATUS_FULLY_REDEEMED
    if now_ms >= state.valid_until_ms:
        return pb.CODE_STATUS_EXPIRED
    return pb.CODE_STATUS_ACTIVE


class RedemptionServicer(pb_grpc.RedemptionServiceServicer):
    """The gRPC face of RedemptionService."""

    def __init__(self, service: RedemptionService, *, stream_max_items: int = 64) -> None:
        self._service = service
        self._stream_max_items = stream_max_items

    @rpc_boundary
    async def Redeem(self, request: pb.RedeemRequest, context: grpc.aio.ServicerContext) -> pb.RedeemResponse:
        return redeem_response(await self._service.redeem(redeem_input(request), current_caller()))

    @rpc_boundary
    async def Reverse(self, request: pb.ReverseRequest, context: grpc.aio.ServicerContext) -> pb.ReverseResponse:
        result = await self._service.reverse(
            ReverseInput(
                redemption_id=request.redemption_id,
                reason=request.reason,
                idempotency_key=request.idempotency_key,
                store_id=request.store_id,
                terminal_id=request.terminal_id,
            ),
            current_caller(),
        )
        note("Reverse", result.outcome.value.lower(), result.reason)
        response = pb.ReverseResponse(
            outcome=REVERSAL_OUTCOMES[result.outcome],
            reason=result.reason,
            reversal_id=result.reversal_id,
            campaign_id=result.campaign_id,
            uses_left=result.uses_left,
            replayed=result.replayed,
            use_number=result.use_number,
        )
        if result.reversed_at_ms:
            response.reversed_at.CopyFrom(_timestamp(result.reversed_at_ms))
        return response

    @rpc_boundary
    async def Validate(self, request: pb.ValidateRequest, context: grpc.aio.ServicerContext) -> pb.ValidateResponse:
        query = RedeemInput(
            code=request.code,
            idempotency_key="",
            store_id=request.store_id,
            terminal_id=request.terminal_id,
            customer_device_id=request.customer_device_id,
            location=_location(request),
        )
        result = await self._service.validate(query, current_caller())
        outcome, reason = answer(result, "Validate")
        response = pb.ValidateResponse(
            outcome=outcome,
            reason=reason,
            campaign_id=result.campaign_id,
            uses_left=result.uses_left,
        )
        if result.retry_after_ms:
            response.retry_after.FromMilliseconds(retry_after_ms(result.retry_after_ms))
        return response

    @rpc_boundary
    async def GetCode(self, request: pb.GetCodeRequest, context: grpc.aio.ServicerContext) -> pb.GetCodeResponse:
        state, now_ms = await self._service.get_code(request.code, current_caller())
        response = pb.GetCodeResponse(
            campaign_id=state.campaign_id,
            status=_code_status(state, now_ms),
            uses_total=state.uses_total,
            uses_left=max(state.uses_total - state.uses_used, 0),
            valid_from=_timestamp(state.valid_from_ms),
            valid_until=_timestamp(state.valid_until_ms),
            code_ref_prefix=state.code_ref_prefix,
        )
        if state.last_redeemed_ms:
            response.last_redeemed_at.CopyFrom(_timestamp(state.last_redeemed_ms))
        return response

    async def RedeemStream(
        self, request_iterator: AsyncIterator[pb.RedeemStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RedeemStreamResponse]:
        request_id = request_id_of(context)
        caller = current_caller()
        try:
            async for message in request_iterator:
                check_stream_message(message.batch_id, len(message.items), self._stream_max_items)
                outcomes = await self._service.redeem_many([redeem_input(item) for item in message.items], caller)
                yield pb.RedeemStreamResponse(
                    batch_id=message.batch_id, results=[self._stream_result(o, request_id) for o in outcomes]
                )
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the stream's boundary: every failure leaves as a precise status
            await context.abort_with_status(status_for(fault_for(exc, request_id)))

    @staticmethod
    def _stream_result(outcome: RedeemResult | ItemFailure, request_id: Callable[[], str]) -> pb.RedeemStreamResult:
        if isinstance(outcome, ItemFailure):
            error = item_error(fault_for(outcome.error, request_id))
            item_failed(error.code)
            return pb.RedeemStreamResult(error=error)
        return pb.RedeemStreamResult(response=redeem_response(outcome, "RedeemStream"))
