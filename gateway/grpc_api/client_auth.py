"""The client side of authentication: every call on a channel carries `authorization: Bearer <API key>`.

Used by `rgw redeem|validate|get-code` and the tests. grpc.aio sorts client interceptors by the one kind each
implements, so there is one small class per kind of call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call with `key`."""
    return (("authorization", f"Bearer {key}"),)


class _WithKey:
    def __init__(self, key: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        self._added = (*bearer(key), *extra)

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *self._added)
        return details._replace(metadata=metadata)


class _UnaryUnary(_WithKey, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_WithKey, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_WithKey, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_WithKey, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(key: str, extra: Sequence[tuple[str, str]] = ()) -> list[Any]:
    """Client interceptors adding the key (and `extra` metadata, e.g. a platform client's x-rgw-brand)."""
    return [kind(key, extra) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def authenticated_channel(
    target: str,
    key: str,
    *,
    extra: Sequence[tuple[str, str]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel whose every call is authenticated with `key` (TLS when `credentials` are given)."""
    interceptors = bearer_interceptors(key, extra)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=list(options), interceptors=interceptors)
