"""Pre-encoded gRPC request frames for loadtest/h2gen.mjs: a 5-byte prefix (compressed flag 0, big-endian
length) and the serialized request, one frame per call (unary) or per stream message (stream)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.pb.redemption.v1 import redemption_pb2 as pb

STORES = 7
TERMINALS = 50  # till-k belongs to store-(k % STORES), as loadtest/bench_risk.py registers them


def grpc_frame(message: pb.RedeemRequest | pb.RedeemStreamRequest) -> bytes:
    """One length-prefixed gRPC message."""
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def redeem_request(code: str, n: int, *, tag: str = "b") -> pb.RedeemRequest:
    """A realistic Redeem request: its own idempotency key, one of the tills (each always in its own store), a
    customer device and its location. Device `dev-n` is always at the same place, within 6 km of the stores'
    registered location, so every risk rule passes (no impossible travel, inside the geofence and region)."""
    till = n % TERMINALS
    return pb.RedeemRequest(
        code=code,
        idempotency_key=f"{tag}-{n}",
        store_id=f"store-{till % STORES}",
        terminal_id=f"till-{till}",
        customer_device_id=f"dev-{n}",
        location=pb.Location(latitude=31.23 + (n % 100) / 1000, longitude=121.47, accuracy_m=15),
    )


def unary_frames(codes: Iterable[str], *, tag: str = "b") -> list[bytes]:
    """One Redeem call per code."""
    return [grpc_frame(redeem_request(code, n, tag=tag)) for n, code in enumerate(codes)]


def stream_frames(codes: Sequence[str], *, items: int, tag: str = "s") -> list[bytes]:
    """One RedeemStream message per `items` codes."""
    frames = []
    for start in range(0, len(codes) - items + 1, items):
        batch = [redeem_request(code, start + i, tag=tag) for i, code in enumerate(codes[start : start + items])]
        frames.append(grpc_frame(pb.RedeemStreamRequest(batch_id=str(start), items=batch)))
    return frames


def write_frames(path: Path, frames: Iterable[bytes]) -> Path:
    """Write frames back to back, as h2gen reads them."""
    path.write_bytes(b"".join(frames))
    return path
