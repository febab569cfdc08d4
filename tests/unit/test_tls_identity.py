"""The client id in a client certificate's URI SANs, its cache, and the development PKI that issues them."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.dev import certs
from gateway.grpc_api import tls
from gateway.settings import Settings
from tests.conftest import gateway_environ

CLIENT = "cl_abcdefghij"


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    tls.client_id_from_pem.cache_clear()
    yield
    tls.client_id_from_pem.cache_clear()


def pem_with(names: Sequence[x509.GeneralName] | None) -> bytes:
    """A self-signed certificate with exactly these SANs (None: no SAN extension at all)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "urn:rgw:client:from-the-cn")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=1))
    )  # fmt: skip
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([uri(f"urn:rgw:client:{CLIENT}")], CLIENT),
        ([x509.DNSName("till-1.example"), uri("spiffe://brand/till"), uri(f"urn:rgw:client:{CLIENT}")], CLIENT),
        ([uri("urn:rgw:client:A-z.0_9:x")], "A-z.0_9:x"),
        ([uri("urn:rgw:client:" + "a" * 64)], "a" * 64),
        (None, None),  # no SAN extension (the CN is never an identity)
        ([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], None),
        ([uri(f"urn:rgw:client:{CLIENT}"), uri("urn:rgw:client:cl_234567abcd")], None),  # two: ambiguous
        ([uri(f"urn:rgw:client:{CLIENT}"), uri(f"urn:rgw:client:{CLIENT}")], None),  # the same twice: still two
        ([uri(f"urn:rgw:client:{CLIENT}"), uri("urn:rgw:client:bad id")], None),  # a bad second claim too
        ([uri(f"URN:RGW:CLIENT:{CLIENT}")], None),  # the prefix is matched exactly
        ([uri(f"urn:rgw:clients:{CLIENT}")], None),
        ([uri(f"https://rgw/client/{CLIENT}")], None),
        ([x509.DNSName(f"urn:rgw:client:{CLIENT}")], None),  # looks right, but it is not a URI SAN
        ([x509.RFC822Name(f"urn:rgw:client:{CLIENT}@x")], None),
        ([uri("urn:rgw:client:")], None),  # empty id
        ([uri("urn:rgw:client:" + "a" * 65)], None),  # too long
        ([uri("urn:rgw:client:cl/abc")], None),
        ([uri("urn:rgw:client:cl abc")], None),
        ([uri("urn:rgw:client:cl_abc%20")], None),
        ([uri("urn:rgw:client:cl_abc\n")], None),
    ],
)
def test_client_id_from_uri_sans(names: Sequence[x509.GeneralName] | None, expected: str | None) -> None:
    assert tls.client_id_from_pem(pem_with(names)) == expected


@pytest.mark.parametrize(
    "pem",
    [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\xff" * 700],
)
def test_garbage_is_no_identity(pem: bytes) -> None:
    assert tls.client_id_from_pem(pem) is None


def test_the_dev_client_certificate_names_its_client() -> None:
    ca = certs.make_ca("test CA")
    assert tls.client_id_from_pem(certs.make_client_cert(ca, CLIENT).cert_pem) == CLIENT
    assert tls.client_id_from_pem(certs.make_server_cert(ca).cert_pem) is None


def test_a_certificate_is_parsed_once_then_looked_up() -> None:
    pem = pem_with([uri(f"urn:rgw:client:{CLIENT}")])
    results = [tls.client_id_from_pem(bytes(pem)) for _ in range(5)]  # equal bytes, distinct objects: as per call
    assert results == [CLIENT] * 5
    info = tls.client_id_from_pem.cache_info()
    assert (info.misses, info.hits, info.currsize, info.maxsize) == (1, 4, 1, tls.PEM_CACHE_SIZE)


class FakeContext:
    """The two ServicerContext methods client_id_from_context reads (the real ones: tests/integration/test_tls.py)."""

    def __init__(self, auth: dict[str, list[bytes]] | Exception, identities: list[bytes] | None = None) -> None:
        self.auth, self.identities = auth, identities

    def peer_identities(self) -> list[bytes] | None:
        return self.identities

    def auth_context(self) -> dict[str, list[bytes]]:
        if isinstance(self.auth, Exception):
            raise self.auth
        return self.auth


@pytest.mark.parametrize(
    "context",
    [
        FakeContext({}),  # plaintext: no peer identity
        FakeContext({"transport_security_type": [b"ssl"]}, [b"x"]),  # identity but no certificate
        FakeContext({"x509_pem_cert": []}, [b"x"]),
        FakeContext({"x509_pem_cert": [b"a", b"b"]}, [b"x"]),  # two leaf certificates: not ours to pick
        FakeContext({"x509_pem_cert": [b"garbage"]}, [b"x"]),
        FakeContext(RuntimeError("call already finished"), [b"x"]),
        FakeContext({"x509_pem_cert": "not bytes"}, [b"x"]),  # type: ignore[dict-item]
    ],
)
def test_client_id_from_context_never_raises(context: Any) -> None:
    assert tls.client_id_from_context(context) is None


def test_client_id_from_context_reads_the_leaf_pem() -> None:
    pem = certs.make_client_cert(certs.make_ca("test CA"), CLIENT).cert_pem
    context: Any = FakeContext({"x509_pem_cert": [pem]}, [b"urn:rgw:client:" + CLIENT.encode()])
    assert tls.client_id_from_context(context) == CLIENT
    # gRPC names no peer identity: the certificate is not even looked at.
    assert tls.client_id_from_context(FakeContext({"x509_pem_cert": [pem]}, None)) is None


def test_no_server_certificate_means_plaintext() -> None:
    settings = Settings.from_env(gateway_environ("redis://x", "postgresql://x"))
    assert tls.server_credentials(settings) is None


@pytest.mark.parametrize("client_id", ["", "a" * 65, "cl abc", "cl/abc", "é"])
def test_no_client_certificate_for_a_bad_id(client_id: str) -> None:
    with pytest.raises(ValueError, match="not a client id"):
        certs.make_client_cert(certs.make_ca("test CA"), client_id)


def test_dev_pki_files_and_modes(tmp_path: Path) -> None:
    paths = certs.write_dev_pki(tmp_path / "pki", [CLIENT])
    modes = {role: stat.S_IMODE(path.stat().st_mode) for role, path in paths.items()}
    assert modes == {
        "ca": 0o644, "ca_key": 0o600, "server": 0o644, "server_key": 0o600,
        f"client:{CLIENT}": 0o644, f"client_key:{CLIENT}": 0o600,
    }  # fmt: skip
    server = x509.load_pem_x509_certificate(paths["server"].read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate(paths[f"client:{CLIENT}"].read_bytes())
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    client.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)


def test_dev_pki_keeps_its_ca_when_adding_a_client(tmp_path: Path) -> None:
    first = certs.write_dev_pki(tmp_path, [CLIENT])
    ca_pem = first["ca"].read_bytes()
    second = certs.write_dev_pki(tmp_path, ["cl_234567abcd"])
    assert second["ca"].read_bytes() == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    x509.load_pem_x509_certificate(first[f"client:{CLIENT}"].read_bytes()).verify_directly_issued_by(ca)


def test_dev_pki_refuses_half_a_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(certs.make_ca("lone").cert_pem)
    with pytest.raises(ValueError, match="only one of"):
        certs.write_dev_pki(tmp_path, [CLIENT])


def test_main_prints_the_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["--out", str(tmp_path), "--client", CLIENT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"export RGW_TLS_CERT_FILE={tmp_path / 'server.pem'}",
        f"export RGW_TLS_KEY_FILE={tmp_path / 'server-key.pem'}",
        f"export RGW_TLS_CLIENT_CA_FILE={tmp_path / 'ca.pem'}",
        "export RGW_TLS_CLIENT_AUTH=require",
    ]
    assert lines[4].startswith(f"# client {CLIENT}: certificate {tmp_path / f'client-{CLIENT}.pem'}")
    settings = Settings.from_env(
        gateway_environ("redis://x", "postgresql://x", **dict(line[7:].split("=", 1) for line in lines[:4]))
    )
    assert settings.tls_client_auth == "require"
    assert tls.server_credentials(settings) is not None


def test_main_refuses_a_bad_client_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["--out", str(tmp_path), "--client", "bad id"]) == 2
    assert "not a client id" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
