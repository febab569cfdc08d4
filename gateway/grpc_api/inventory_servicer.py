"""redemption.v1.InventoryService: translates protobuf to the inventory's domain objects and back, nothing more.
A plaintext secret goes into the response of its own order and nowhere else (never a log line or a note)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from gateway.domain import Caller, ItemFailure
from gateway.grpc_api.auth import current_caller
from gateway.grpc_api.errors import fault_for, request_id_of, rpc_boundary, status_for
from gateway.grpc_api.observe import item_failed, note
from gateway.grpc_api.stream_replies import DISPENSE_STREAM_MAX_SECRETS, item_error
from gateway.inventory.service import InventoryOutcome, InventoryService, OrderInput, OrderResult, Strategy
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from gateway.settings import Settings
from gateway.validation import check_stream_message

OUTCOMES: dict[InventoryOutcome, pb.InventoryOutcome.ValueType] = {
    InventoryOutcome.DISPENSED: pb.INVENTORY_OUTCOME_DISPENSED,
    InventoryOutcome.HELD: pb.INVENTORY_OUTCOME_HELD,
    InventoryOutcome.OUT_OF_STOCK: pb.INVENTORY_OUTCOME_OUT_OF_STOCK,
    InventoryOutcome.UNKNOWN_SKU: pb.INVENTORY_OUTCOME_UNKNOWN_SKU,
    InventoryOutcome.QUANTITY_ABOVE_LIMIT: pb.INVENTORY_OUTCOME_QUANTITY_ABOVE_LIMIT,
    InventoryOutcome.HOLD_EXPIRED: pb.INVENTORY_OUTCOME_HOLD_EXPIRED,
    InventoryOutcome.ORDER_NOT_FOUND: pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND,
    InventoryOutcome.RELEASED: pb.INVENTORY_OUTCOME_RELEASED,
}
STRATEGIES: dict[int, Strategy] = {
    pb.STRATEGY_UNSPECIFIED: Strategy.EARLIEST_EXPIRY,
    pb.STRATEGY_EARLIEST_EXPIRY: Strategy.EARLIEST_EXPIRY,
    pb.STRATEGY_CHEAPEST: Strategy.CHEAPEST,
    pb.STRATEGY_SUPPLIER: Strategy.SUPPLIER,
}


def order_input(request: pb.DispenseRequest | pb.HoldRequest) -> OrderInput:
    """The domain view of a DispenseRequest or HoldRequest."""
    ttl_ms = None
    if isinstance(request, pb.HoldRequest) and request.HasField("ttl"):
        ttl_ms = request.ttl.ToMilliseconds()
    return OrderInput(
        order_id=request.order_id,
        sku=request.sku,
        quantity=request.quantity,
        strategy=STRATEGIES.get(request.strategy),
        supplier=request.supplier,
        ttl_ms=ttl_ms,
    )


def _noted(method: str, result: OrderResult) -> pb.InventoryOutcome.ValueType:
    note(method, result.outcome.value.lower(), result.reason)
    return OUTCOMES[result.outcome]


def dispense_response(result: OrderResult, method: str) -> pb.DispenseResponse:
    """The DispenseResponse of a result."""
    response = pb.DispenseResponse(outcome=_noted(method, result), reason=result.reason, replayed=result.replayed)
    _add_secrets(response, result)
    return response


def confirm_response(result: OrderResult) -> pb.ConfirmResponse:
    """The ConfirmResponse of a result."""
    response = pb.ConfirmResponse(
        outcome=_noted("Confirm", result), reason=result.reason, replayed=result.replayed, late=result.late
    )
    _add_secrets(response, result)
    return response


def _add_secrets(response: pb.DispenseResponse | pb.ConfirmResponse, result: OrderResult) -> None:
    add = response.secrets.add
    for secret in result.secrets:
        item = add(secret_id=secret.secret_id, secret=secret.secret, supplier=secret.supplier,
                   use_number=secret.use_number)  # fmt: skip
        ms = secret.expires_at_ms  # as Timestamp.FromMilliseconds, without its call per secret
        item.expires_at.seconds, item.expires_at.nanos = ms // 1000, ms % 1000 * 1_000_000


class InventoryServicer(pb_grpc.InventoryServiceServicer):
    """The gRPC face of InventoryService."""

    def __init__(self, service: InventoryService, *, stream_max_items: int = 64) -> None:
        self._service = service
        self._stream_max_items = stream_max_items

    @rpc_boundary
    async def Dispense(self, request: pb.DispenseRequest, context: grpc.aio.ServicerContext) -> pb.DispenseResponse:
        result = await self._service.dispense(order_input(request), current_caller())
        return dispense_response(result, "Dispense")

    async def DispenseStream(
        self, request_iterator: AsyncIterator[pb.DispenseStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DispenseStreamResponse]:
        replies = dispense_stream(request_iterator, context, self._service.dispense_many, self._stream_max_items)
        async for reply in replies:
            yield reply

    @rpc_boundary
    async def Hold(self, request: pb.HoldRequest, context: grpc.aio.ServicerContext) -> pb.HoldResponse:
        result = await self._service.hold(order_input(request), current_caller())
        response = pb.HoldResponse(outcome=_noted("Hold", result), reason=result.reason, replayed=result.replayed)
        if result.hold_expires_ms:
            response.expires_at.FromMilliseconds(result.hold_expires_ms)
        return response

    @rpc_boundary
    async def Confirm(self, request: pb.ConfirmRequest, context: grpc.aio.ServicerContext) -> pb.ConfirmResponse:
        return confirm_response(await self._service.confirm(request.order_id, current_caller()))

    @rpc_boundary
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        result = await self._service.release(request.order_id, current_caller())
        return pb.ReleaseResponse(
            outcome=_noted("Release", result), reason=result.reason, released=result.released,
            replayed=result.replayed,
        )  # fmt: skip


DecideMany = Callable[[list[OrderInput], Caller], Awaitable[list[OrderResult | ItemFailure]]]


async def dispense_stream(
    request_iterator: AsyncIterator[pb.DispenseStreamRequest], context: grpc.aio.ServicerContext,
    decide: DecideMany, max_items: int,
) -> AsyncIterator[pb.DispenseStreamResponse]:  # fmt: skip
    """DispenseStream's protocol around `decide` (a message's orders -> one result each): each message checked as a
    whole first (a bad one ends the stream, nothing of it decided), then answered in order."""
    request_id = request_id_of(context)
    caller = current_caller()
    try:
        async for message in request_iterator:
            asked = sum(max(item.quantity, 0) for item in message.items)
            check_stream_message(message.batch_id, len(message.items), max_items, secrets=asked,
                                 max_secrets=DISPENSE_STREAM_MAX_SECRETS)  # fmt: skip
            results = await decide([order_input(item) for item in message.items], caller)
            yield pb.DispenseStreamResponse(
                batch_id=message.batch_id, results=[stream_result(r, request_id) for r in results]
            )
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # the stream's boundary: every failure leaves as a precise status
        await context.abort_with_status(status_for(fault_for(exc, request_id)))


def stream_result(result: OrderResult | ItemFailure, request_id: Callable[[], str]) -> pb.DispenseStreamResult:
    """One order's result in a DispenseStream reply: its DispenseResponse, or the error Dispense would raise."""
    if isinstance(result, ItemFailure):
        error = item_error(fault_for(result.error, request_id))
        item_failed(error.code)
        return pb.DispenseStreamResult(error=error)
    return pb.DispenseStreamResult(response=dispense_response(result, "DispenseStream"))


def register_inventory_service(server: grpc.aio.Server, service: InventoryService, settings: Settings) -> None:
    """InventoryService on the gateway's server."""
    servicer = InventoryServicer(service, stream_max_items=settings.stream_max_items)
    pb_grpc.add_InventoryServiceServicer_to_server(servicer, server)
