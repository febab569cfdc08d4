"""mTLS through the real server stack: the client id comes from the certificate and must name an active client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.dev import certs
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.settings import Settings
from gateway.tenancy import admin_store, notify
from tests.conftest import gateway_environ
from tests.integration.conftest import Issue, Tenants


async def _validate(channel: grpc.aio.Channel, code: str) -> grpc.StatusCode:
    request = pb.ValidateRequest(code=code, store_id="store-1", terminal_id="till-1")
    try:
        reply = await pb_grpc.RedemptionServiceStub(channel).Validate(request, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    assert reply.outcome == pb.OUTCOME_REDEEMABLE
    return grpc.StatusCode.OK


def _credentials(pki: dict[str, Path], client: str | None) -> grpc.ChannelCredentials:
    root = pki["ca"].read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(
        root, pki[f"client_key:{client}"].read_bytes(), pki[f"client:{client}"].read_bytes()
    )


@pytest.fixture
async def tls_gateway(
    tmp_path: Path, redis_url: str, migrated: str, clock: ManualClock, tenants: Tenants
) -> AsyncIterator[tuple[str, dict[str, Path]]]:
    pki = certs.write_dev_pki(tmp_path / "pki", [tenants.clients["pos"], tenants.clients["admin"]])
    environ = gateway_environ(
        redis_url, migrated, RGW_TLS_CERT_FILE=str(pki["server"]), RGW_TLS_KEY_FILE=str(pki["server_key"]),
        RGW_TLS_CLIENT_CA_FILE=str(pki["ca"]), RGW_TLS_CLIENT_AUTH="require",
    )  # fmt: skip
    settings = Settings.from_env(environ)
    gateway = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gateway.start()
    yield f"localhost:{port}", pki
    await gateway.stop()


async def test_the_certificate_names_the_client(
    tls_gateway: tuple[str, dict[str, Path]], tenants: Tenants, issue: Issue
) -> None:
    target, pki = tls_gateway
    issued = await issue(1)
    async with grpc.aio.secure_channel(target, _credentials(pki, tenants.clients["pos"])) as channel:
        assert await _validate(channel, issued.codes[0]) == grpc.StatusCode.OK  # no API key: the certificate
    async with grpc.aio.secure_channel(target, _credentials(pki, tenants.clients["admin"])) as channel:
        assert await _validate(channel, issued.codes[0]) == grpc.StatusCode.PERMISSION_DENIED  # its role's rules
    mismatched = authenticated_channel(
        target, tenants.keys["internal"], credentials=_credentials(pki, tenants.clients["pos"])
    )
    async with mismatched as channel:  # a key of another client than the certificate's
        assert await _validate(channel, issued.codes[0]) == grpc.StatusCode.UNAUTHENTICATED


async def test_another_cas_certificate_and_no_certificate_are_refused(
    tls_gateway: tuple[str, dict[str, Path]], tenants: Tenants, tmp_path: Path, issue: Issue
) -> None:
    target, pki = tls_gateway
    issued = await issue(1)
    stranger = certs.write_dev_pki(tmp_path / "other-ca", [tenants.clients["pos"]])
    foreign = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(),
        stranger[f"client_key:{tenants.clients['pos']}"].read_bytes(),
        stranger[f"client:{tenants.clients['pos']}"].read_bytes(),
    )
    for credentials in (foreign, _credentials(pki, None)):
        async with grpc.aio.secure_channel(target, credentials) as channel:
            assert await _validate(channel, issued.codes[0]) == grpc.StatusCode.UNAVAILABLE  # handshake refused


async def test_a_valid_certificate_of_a_revoked_client_is_refused(
    tls_gateway: tuple[str, dict[str, Path]], tenants: Tenants, db: asyncpg.Connection, redis: Redis, issue: Issue
) -> None:
    target, pki = tls_gateway
    issued = await issue(1)
    client = tenants.clients["pos"]
    async with grpc.aio.secure_channel(target, _credentials(pki, client)) as channel:
        assert await _validate(channel, issued.codes[0]) == grpc.StatusCode.OK
        revoked = await admin_store.revoke_client(db, actor="tests", brand_id=1, client_id=client)
        await notify.publish(redis, revoked.version)
        started = time.monotonic()
        while await _validate(channel, issued.codes[0]) != grpc.StatusCode.UNAUTHENTICATED:
            assert time.monotonic() - started < 2.0, "the revoked certificate was still accepted after 2 s"
            await asyncio.sleep(0.02)
