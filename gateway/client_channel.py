"""A channel for internal callers that balances every call over the gateway's pods, not every connection.

gRPC keeps one HTTP/2 connection and sends all calls over it, so a caller going through the ClusterIP Service
`rgw-gateway` stays on one pod for the life of its connection. Internal services use the headless Service
instead: its DNS name resolves to every ready pod, and the `round_robin` policy of deploy/grpc-service-config.json
keeps a connection to each and spreads the calls over them::

    from gateway.client_channel import internal_channel
    from gateway.grpc_api.client_auth import bearer_interceptors

    channel = internal_channel(
        "dns:///rgw-gateway-headless.rgw.svc:50051",
        service_config_path=Path("/etc/rgw/grpc-service-config.json"),
        interceptors=bearer_interceptors(api_key),
    )

The same file also retries UNAVAILABLE (a pod going away, a dependency not ready) on the methods where repeating
the call is safe: Redeem and Reverse (the retry sends the same bytes, so the same idempotency key, and gets the
first answer back with `replayed = true` if the first attempt had happened), Validate and GetCode (they change
nothing), Dispense, Hold, Confirm and Release (idempotent per order id: a repeat changes nothing and says
`replayed = true`) and the health check. Not the streams (a batch is the caller's to resend, item by item) and not
AdminService (creating a brand twice is not the same as once). Only UNAVAILABLE: RESOURCE_EXHAUSTED and
DEADLINE_EXCEEDED are left to the caller, so an overloaded or slow gateway is not sent more. A caller still sets a
deadline on every call; the retries happen within it, at most 3 attempts, and stop (retryThrottling) while more
than about one call in ten fails, so a broken gateway is not sent three times the traffic.

New pods are found when the resolver asks DNS again, which it does when a connection goes away: the gateway's
maximum connection age (RGW_GRPC_MAX_CONNECTION_AGE_SECONDS) makes that happen regularly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

# Present in a source checkout only: the wheel does not carry deploy/, so an installed caller passes the path (a
# ConfigMap mounted into its pod, say).
DEFAULT_SERVICE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "grpc-service-config.json"


def load_service_config(path: Path | None = None) -> str:
    """The service config as the compact JSON text gRPC takes; ValueError when it is no JSON object."""
    config = json.loads((path or DEFAULT_SERVICE_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{path or DEFAULT_SERVICE_CONFIG}: a gRPC service config is a JSON object")
    return json.dumps(config, separators=(",", ":"))


def internal_channel(
    target: str,
    *,
    service_config_path: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` (normally `dns:///rgw-gateway-headless.<namespace>.svc:50051`) with the service config
    of `service_config_path` (default: deploy/grpc-service-config.json): round_robin over every address the target
    resolves to, and retries of UNAVAILABLE where they are safe. TLS when `credentials` are given; `interceptors`
    e.g. gateway.grpc_api.client_auth.bearer_interceptors(key) to authenticate every call."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", load_service_config(service_config_path)),
        ("grpc.enable_retries", 1),
        # The config above is the only one: a DNS TXT record cannot replace it.
        ("grpc.service_config_disable_resolution", 1),
    ]
    chain = list(interceptors or ())
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=chain)
