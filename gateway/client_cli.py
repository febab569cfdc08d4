"""`rgw redeem|validate|get-code`: a small gRPC client for operators and the Quick start (grpcurl is not always
at hand). Prints the response as JSON; a failed call prints its status and google.rpc details and exits 1."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.grpc_api.client_auth import authenticated_channel
from gateway.settings import Settings

_DETAIL_TYPES = (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def _print_error(error: grpc.aio.AioRpcError) -> None:
    print(f"{error.code().name}: {error.details()}", file=sys.stderr)
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        for kind in _DETAIL_TYPES:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                print(json_format.MessageToJson(message), file=sys.stderr)


def _location(args: argparse.Namespace) -> dict[str, Any]:
    if args.lat is None or args.lon is None:
        return {}
    return {"location": {"latitude": args.lat, "longitude": args.lon, "accuracy_m": args.accuracy}}


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    from gateway.pb.redemption.v1 import redemption_pb2 as pb

    if args.command == "get-code":
        return "GetCode", pb.GetCodeRequest(code=args.code)
    common: dict[str, Any] = {
        "code": args.code,
        "store_id": args.store,
        "terminal_id": args.terminal,
        "customer_device_id": args.device,
        **_location(args),
    }
    if args.command == "validate":
        return "Validate", json_format.ParseDict(common, pb.ValidateRequest())
    key = args.idempotency_key or uuid.uuid4().hex
    return "Redeem", json_format.ParseDict({**common, "idempotency_key": key}, pb.RedeemRequest())


async def _call(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc

    method, request = _request(args)
    key = args.key or settings.api_key
    if not key:
        print("rgw: an API key is needed: --key or RGW_API_KEY", file=sys.stderr)
        return 2
    extra = (("x-rgw-brand", args.brand),) if args.brand else ()
    target = args.addr or settings.grpc_addr
    async with authenticated_channel(target, key, extra=extra, credentials=_tls(args)) as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        try:
            response = await getattr(stub, method)(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as error:
            _print_error(error)
            return 1
    print(json_format.MessageToJson(response, always_print_fields_with_no_presence=True))
    return 0


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the client subcommands."""
    for name, text in (("redeem", "redeem a code"), ("validate", "check a code without using it")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--code", required=True)
        cmd.add_argument("--store", required=True, help="store id")
        cmd.add_argument("--terminal", required=True, help="terminal id")
        cmd.add_argument("--device", default="", help="customer device id")
        cmd.add_argument("--lat", type=float)
        cmd.add_argument("--lon", type=float)
        cmd.add_argument("--accuracy", type=float, default=0.0, help="metres")
        if name == "redeem":
            cmd.add_argument("--idempotency-key", default="", help="default: a new random key")
        _client_options(cmd)
    get = sub.add_parser("get-code", help="a code's state")
    get.add_argument("--code", required=True)
    _client_options(get)


def _tls(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not args.tls_ca:
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


def _client_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--addr", default="", help="gateway host:port (default: RGW_GRPC_ADDR)")
    cmd.add_argument("--timeout", type=float, default=5.0, help="seconds")
    cmd.add_argument("--key", default="", help="API key (default: RGW_API_KEY; prefer the variable: argv is visible)")
    cmd.add_argument("--brand", default="", help="the brand a platform key acts for (id or slug)")
    cmd.add_argument("--tls-ca", default="", help="CA certificate (PEM): connect over TLS")
    cmd.add_argument("--tls-cert", default="", help="client certificate (PEM), for mTLS")
    cmd.add_argument("--tls-key", default="", help="client private key (PEM), for mTLS")
    cmd.set_defaults(run=_call)
