"""redemption.v1.InventoryService: translates protobuf to the inventory's domain objects and back, nothing more.
A plaintext secret goes into the response of its own order and nowhere else (never a log line or a note)."""

from __future__ import annotations

import grpc

from gateway.grpc_api.auth import current_caller
from gateway.grpc_api.errors import rpc_boundary
from gateway.grpc_api.observe import note
from gateway.inventory.service import InventoryOutcome, InventoryService, OrderInput, OrderResult, Strategy
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc

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
    for secret in result.secrets:
        item = response.secrets.add(
            secret_id=secret.secret_id, secret=secret.secret, supplier=secret.supplier, use_number=secret.use_number
        )
        item.expires_at.FromMilliseconds(secret.expires_at_ms)


class InventoryServicer(pb_grpc.InventoryServiceServicer):
    """The gRPC face of InventoryService."""

    def __init__(self, service: InventoryService) -> None:
        self._service = service

    @rpc_boundary
    async def Dispense(self, request: pb.DispenseRequest, context: grpc.aio.ServicerContext) -> pb.DispenseResponse:
        result = await self._service.dispense(order_input(request), current_caller())
        return dispense_response(result, "Dispense")

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


def register_inventory_service(server: grpc.aio.Server, service: InventoryService) -> None:
    """InventoryService on the gateway's server."""
    pb_grpc.add_InventoryServiceServicer_to_server(InventoryServicer(service), server)
