"""A development CA and certificates for the gateway's TLS / mutual TLS (EC P-256, SHA-256, `cryptography` only).

    python -m gateway.dev.certs --out .local/pki --client cl_abcdefghij

writes, into --out:

    ca.pem / ca-key.pem                      the development CA (reused when already there, so earlier
                                             certificates stay valid); clients trust ca.pem, the server
                                             verifies client certificates against it
    server.pem / server-key.pem              the gateway's certificate (DNS/IP SANs of --host) and key
    client-<id>.pem / client-<id>-key.pem    one per --client: URI SAN urn:rgw:client:<id>, clientAuth

and prints the RGW_TLS_* lines to export. Keys are written 0600, certificates 0644. For development only: the CA
key sits next to the certificates, unencrypted.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.grpc_api.tls import CLIENT_ID_URI_PREFIX, valid_client_id
from gateway.settings import TLS_CLIENT_AUTH

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825  # about two years: development certificates should not outlive a laptop
CLOCK_SKEW = timedelta(minutes=5)  # backdate not_valid_before so a peer whose clock is behind still accepts


class CertKey(NamedTuple):
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes


def make_ca(name: str, *, days: int = CA_DAYS) -> CertKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)
    builder = (
        _base(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return CertKey(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def make_server_cert(ca: CertKey, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = LEAF_DAYS) -> CertKey:
    """A server certificate for `hosts` (IP literals become IP SANs, the rest DNS SANs), signed by `ca`."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    names = [_general_name(host) for host in hosts]
    return issue_cert(ca, hosts[0], names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def make_client_cert(ca: CertKey, client_id: str, *, days: int = LEAF_DAYS) -> CertKey:
    """A client certificate whose only SAN is the URI `urn:rgw:client:<client_id>`, for clientAuth, signed by `ca`."""
    _check_client_id(client_id)
    names = [x509.UniformResourceIdentifier(CLIENT_ID_URI_PREFIX + client_id)]
    return issue_cert(ca, client_id, names, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def issue_cert(
    ca: CertKey,
    common_name: str,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int = LEAF_DAYS,
) -> CertKey:
    """A leaf certificate for exactly these SANs and one extended key usage (TLS peers check it), signed by `ca`."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _base(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        # Not critical: RFC 5280 asks for a critical SAN only when the subject is empty, and ours carries the CN.
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    return CertKey(_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def write_dev_pki(directory: Path, client_ids: Iterable[str], hosts: Sequence[str] = DEFAULT_HOSTS) -> dict[str, Path]:
    """Write (or reuse) the CA, a server certificate and one client certificate per id; return the paths by role:
    "ca", "ca_key", "server", "server_key", "client:<id>", "client_key:<id>"."""
    client_ids = list(client_ids)
    for client_id in client_ids:  # check them all before writing anything
        _check_client_id(client_id)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem"}
    ca = _load_or_make_ca(paths["ca"], paths["ca_key"])
    paths["server"], paths["server_key"] = _write_pair(make_server_cert(ca, hosts), directory / "server")
    for client_id in client_ids:
        pair = make_client_cert(ca, client_id)
        paths[f"client:{client_id}"], paths[f"client_key:{client_id}"] = _write_pair(
            pair, directory / f"client-{client_id}"
        )
    return paths


def exports(paths: dict[str, Path], client_auth: str = "require") -> list[str]:
    """The shell lines that point a gateway at `paths` (as written by write_dev_pki)."""
    values = {
        "RGW_TLS_CERT_FILE": paths["server"],
        "RGW_TLS_KEY_FILE": paths["server_key"],
        "RGW_TLS_CLIENT_CA_FILE": paths["ca"],
        "RGW_TLS_CLIENT_AUTH": client_auth,
    }
    return [f"export {name}={shlex.quote(str(value))}" for name, value in values.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (shared by `python -m gateway.dev.certs` and any CLI wiring)."""
    parser.add_argument("--out", type=Path, required=True, help="directory for the CA, server and client files")
    parser.add_argument(
        "--client", action="append", default=[], metavar="ID", help="issue a client certificate for ID (repeatable)"
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="server DNS name or IP (default: localhost, 127.0.0.1)",
    )
    parser.add_argument("--client-auth", choices=TLS_CLIENT_AUTH, default="require", help="printed RGW_TLS_CLIENT_AUTH")


def run(args: argparse.Namespace) -> int:
    """Write the files and print the exports (stdout, so `eval "$(...)"` works) and the client files (as comments)."""
    try:
        paths = write_dev_pki(args.out.resolve(), args.client, args.host or DEFAULT_HOSTS)
    except ValueError as exc:
        print(f"certs: {exc}", file=sys.stderr)
        return 2
    print("\n".join(exports(paths, args.client_auth)))
    for client_id in args.client:
        cert, key = paths[f"client:{client_id}"], paths[f"client_key:{client_id}"]
        print(f"# client {client_id}: certificate {shlex.quote(str(cert))}, key {shlex.quote(str(key))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gateway.dev.certs`."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.dev.certs", description="Write a development CA, server and client certificates."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _check_client_id(client_id: str) -> None:
    if not valid_client_id(client_id):
        raise ValueError(f"{client_id!r} is not a client id: 1-64 characters of [A-Za-z0-9._:-]")


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_or_make_ca(cert_path: Path, key_path: Path) -> CertKey:
    """Reuse the directory's CA, so adding a client does not invalidate the certificates already handed out."""
    if cert_path.exists() and key_path.exists():
        return CertKey(cert_path.read_bytes(), key_path.read_bytes())
    if cert_path.exists() or key_path.exists():  # half a CA: replacing it could orphan certificates handed out
        raise ValueError(f"{cert_path.parent}: found only one of {cert_path.name} and {key_path.name}")
    ca = make_ca("rgw development CA")
    _write(key_path, ca.key_pem, 0o600)
    _write(cert_path, ca.cert_pem, 0o644)
    return ca


def _write_pair(pair: CertKey, stem: Path) -> tuple[Path, Path]:
    """Write `<stem>.pem` (0644) and `<stem>-key.pem` (0600); return their paths."""
    cert_path, key_path = stem.with_name(f"{stem.name}.pem"), stem.with_name(f"{stem.name}-key.pem")
    _write(key_path, pair.key_pem, 0o600)
    _write(cert_path, pair.cert_pem, 0o644)
    return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` at `mode`: written to a private temporary file and renamed, so a key is never
    readable by others, not even for a moment, whatever the umask or the old file's mode."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        os.fchmod(handle.fileno(), mode)  # the umask may have narrowed 0644; set exactly what was asked
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
