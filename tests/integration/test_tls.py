"""TLS and mutual TLS with real handshakes: grpc.aio servers on 127.0.0.1 built from RGW_TLS_* settings, whose one
handler answers the client id client_id_from_context() finds ("" for None: a client id is never empty)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import wrappers_pb2

from gateway.dev import certs
from gateway.grpc_api import tls
from gateway.settings import Settings, SettingsError
from tests.conftest import gateway_environ

CLIENT = "cl_abcdefghij"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Pki:
    dir: Path
    paths: dict[str, Path]
    client: certs.CertKey  # issued by the gateway's CA
    stranger: certs.CertKey  # the same client id, issued by another CA
    server_only: certs.CertKey  # the gateway CA's server certificate presented as a client certificate
    two_ids: certs.CertKey  # a client certificate of the gateway's CA with two client id SANs
    no_id: certs.CertKey  # a client certificate of the gateway's CA without a client id SAN

    @property
    def root(self) -> bytes:
        return self.paths["ca"].read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    paths = certs.write_dev_pki(directory, [CLIENT])
    ca = certs.CertKey(paths["ca"].read_bytes(), paths["ca_key"].read_bytes())
    client = certs.CertKey(paths[f"client:{CLIENT}"].read_bytes(), paths[f"client_key:{CLIENT}"].read_bytes())
    stranger = certs.make_client_cert(certs.make_ca("another CA"), CLIENT)
    two = [
        x509.UniformResourceIdentifier(f"urn:rgw:client:{CLIENT}"),
        x509.UniformResourceIdentifier("urn:rgw:client:b"),
    ]
    two_ids = certs.issue_cert(ca, CLIENT, two, ExtendedKeyUsageOID.CLIENT_AUTH)
    no_id = certs.issue_cert(ca, CLIENT, [x509.DNSName("till-1.example")], ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(directory, paths, client, stranger, certs.make_server_cert(ca), two_ids, no_id)


def settings(pki: Pki, client_auth: str, server_cert: Path | None = None, server_key: Path | None = None) -> Settings:
    return Settings.from_env(
        gateway_environ(
            "redis://unused", "postgresql://unused",
            RGW_TLS_CERT_FILE=str(server_cert or pki.paths["server"]),
            RGW_TLS_KEY_FILE=str(server_key or pki.paths["server_key"]),
            RGW_TLS_CLIENT_CA_FILE=str(pki.paths["ca"]),
            RGW_TLS_CLIENT_AUTH=client_auth,
        )
    )  # fmt: skip


async def who_am_i(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=tls.client_id_from_context(context) or "")


HANDLER = grpc.unary_unary_rpc_method_handler(
    who_am_i,
    request_deserializer=wrappers_pb2.StringValue.FromString,
    response_serializer=wrappers_pb2.StringValue.SerializeToString,
)


@asynccontextmanager
async def serving(config: Settings) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 with the gateway's credentials; yields its port."""
    credentials = tls.server_credentials(config)
    assert credentials is not None
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Tls", {"WhoAmI": HANDLER})])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def creds(root: bytes, client: certs.CertKey | None = None) -> grpc.ChannelCredentials:
    """What a client passes: the CA it trusts, and its key and certificate for mTLS."""
    if client is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(root, client.key_pem, client.cert_pem)


async def who(channel: grpc.aio.Channel) -> str | None:
    method = channel.unary_unary(
        "/t.Tls/WhoAmI",
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )
    reply: wrappers_pb2.StringValue = await method(wrappers_pb2.StringValue(), timeout=5)
    return reply.value or None


async def who_over_tls(
    port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, str]] | None = None
) -> str | None:
    # The dev server certificate carries the IP SAN 127.0.0.1, so the client verifies the address it dials.
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        return await who(channel)


async def refused(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a call that must not get through (None: a plaintext client)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if credentials is None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await who(channel)
        else:
            await who_over_tls(port, credentials)
    return info.value.code()


# RGW_TLS_CLIENT_AUTH=none: server TLS only.


async def test_server_tls_serves_a_client_that_trusts_its_ca(pki: Pki) -> None:
    async with serving(settings(pki, "none")) as port:
        assert await who_over_tls(port, creds(pki.root)) is None


async def test_server_tls_refuses_a_plaintext_client(pki: Pki) -> None:
    async with serving(settings(pki, "none")) as port:
        assert await refused(port, None) == UNAVAILABLE


async def test_server_tls_is_refused_by_a_client_that_trusts_another_ca(pki: Pki) -> None:
    async with serving(settings(pki, "none")) as port:
        assert await refused(port, creds(certs.make_ca("another CA").cert_pem)) == UNAVAILABLE


async def test_server_tls_ignores_a_client_certificate(pki: Pki) -> None:
    async with serving(settings(pki, "none")) as port:  # never requested, so never sent
        assert await who_over_tls(port, creds(pki.root, pki.client)) is None


async def test_the_client_checks_the_server_name(pki: Pki, tmp_path: Path) -> None:
    named = certs.write_dev_pki(tmp_path, [], hosts=["gateway.internal"])  # reuses no CA: tmp_path is fresh
    config = settings(pki, "none", named["server"], named["server_key"])
    root = named["ca"].read_bytes()
    async with serving(config) as port:
        assert await refused(port, creds(root)) == UNAVAILABLE  # dials 127.0.0.1: not a name in the certificate
        override = [("grpc.ssl_target_name_override", "gateway.internal")]
        assert await who_over_tls(port, creds(root), override) is None


# RGW_TLS_CLIENT_AUTH=require: mutual TLS.


async def test_require_gives_the_handler_the_client_id(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:
        assert await who_over_tls(port, creds(pki.root, pki.client)) == CLIENT


async def test_require_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:
        assert await refused(port, creds(pki.root)) == UNAVAILABLE


async def test_require_refuses_a_certificate_from_another_ca(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:
        assert await refused(port, creds(pki.root, pki.stranger)) == UNAVAILABLE


async def test_require_refuses_a_plaintext_client(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:
        assert await refused(port, None) == UNAVAILABLE


async def test_require_refuses_a_server_certificate_as_a_client_certificate(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:  # the right CA, but no clientAuth extended key usage
        assert await refused(port, creds(pki.root, pki.server_only)) == UNAVAILABLE


async def test_require_a_verified_certificate_without_one_client_id_is_no_identity(pki: Pki) -> None:
    async with serving(settings(pki, "require")) as port:  # the handshake passes; the identity is the SAN's to give
        assert await who_over_tls(port, creds(pki.root, pki.no_id)) is None
        assert await who_over_tls(port, creds(pki.root, pki.two_ids)) is None  # ambiguous


async def test_require_parses_a_connection_certificate_once(pki: Pki) -> None:
    tls.client_id_from_pem.cache_clear()
    async with serving(settings(pki, "require")) as port:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds(pki.root, pki.client)) as channel:
            assert [await who(channel) for _ in range(3)] == [CLIENT] * 3
    info = tls.client_id_from_pem.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_optional_is_refused_as_a_setting(pki: Pki) -> None:
    """grpcio cannot ask for a client certificate without requiring one: an "optional" mode would never see one."""
    with pytest.raises(SettingsError, match="RGW_TLS_CLIENT_AUTH"):
        settings(pki, "optional")
