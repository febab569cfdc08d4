"""Optional TLS / mutual TLS for the gRPC server, and the client id a verified client certificate names.

RGW_TLS_CLIENT_AUTH, as grpcio really implements it (grpcio 1.85; tests/integration/test_tls.py asserts each line):

- `none`: server TLS only. The server sends no CertificateRequest, so a client never presents a certificate.
- `require`: every client must present a certificate that chains to RGW_TLS_CLIENT_CA_FILE and allows clientAuth
  (BoringSSL checks the extended key usage: a server certificate is refused as a client one), or the handshake
  fails and the client's call ends UNAVAILABLE. Every call that reaches a handler has a verified client certificate.
  Whether its client is still active is the caller's check (the registry), not the handshake's.
- There is no `optional`: grpcio offers no "request, verify if sent" mode. Its Python API maps
  require_client_auth=False to GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE whatever root certificates are passed
  (ssl_server_credentials and dynamic_ssl_server_credentials alike), so such a mode would never see a client
  certificate - a false sense of mTLS. Settings refuse it.

So wherever a client certificate appears in a call's auth context, the handshake verified it against the client
CA (`require`): client_id_from_context() relies on that and does not re-verify the chain.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import grpc
from cryptography import x509

from gateway.settings import Settings

CLIENT_ID_URI_PREFIX = "urn:rgw:client:"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Distinct client certificates whose parsed client id is kept (LRU). An entry is a ~0.7 KB PEM key plus a short
# string: about 4 MB when full. A client whose certificate fell out is parsed again (~25 µs), nothing worse.
PEM_CACHE_SIZE = 4096


def valid_client_id(client_id: str) -> bool:
    """1-64 characters of [A-Za-z0-9._:-] (issued ids look like `cl_` + 10 characters of [a-z2-7])."""
    return _CLIENT_ID.fullmatch(client_id) is not None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for `server.add_secure_port`, or None when no server certificate is configured (plaintext).

    Reads the PEM files now, so a missing or unreadable file stops start-up (OSError) instead of the first
    handshake. The client CA is passed only when client certificates are required.
    """
    if not settings.tls_cert_file:
        return None
    chain = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    wants_clients = settings.tls_client_auth == "require"
    root = Path(settings.tls_client_ca_file).read_bytes() if wants_clients and settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=root, require_client_auth=settings.tls_client_auth == "require"
    )


def client_id_from_context(context: grpc.aio.ServicerContext) -> str | None:
    """The client id of the call's verified client certificate (its one `urn:rgw:client:<id>` URI SAN), else None.

    None: no TLS, no client certificate, no such SAN, more than one (ambiguous), a malformed id, or anything
    unexpected: this never raises.

    Cost per call, measured on grpcio 1.85.1 / CPython 3.11 / a 2-core x86-64 VM: ~4.5 µs with a client certificate,
    of which `auth_context()` (gRPC building a dict of every TLS property, the PEM included) is ~3.5 µs and the
    LRU hit ~0.2 µs; 0.3-0.7 µs without one, plaintext included (the pre-check below). A certificate's first call
    parses it (~25 µs); every later call with the same certificate, on any connection, is a cache hit. grpc.aio
    exposes no connection object, so the PEM is the cheapest key that is certainly right.
    """
    try:
        # Cheap pre-check (~0.3 µs against several for auth_context()): gRPC names a peer identity whenever the
        # peer's certificate has a SAN or a CN, so None here means no client certificate or one without SANs.
        if context.peer_identities() is None:
            return None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems or len(pems) != 1:
            return None
        return client_id_from_pem(pems[0])
    except Exception:  # a handler must get None, not an error, whatever the context holds
        return None


@functools.lru_cache(maxsize=PEM_CACHE_SIZE)
def client_id_from_pem(pem: bytes) -> str | None:
    """The client id in a PEM certificate's URI SANs (see client_id_from_context); cached by the PEM bytes."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except Exception:  # garbage PEM, no SAN extension, an undecodable SAN: no identity
        return None
    # Every URI with our prefix is a claim: exactly one is allowed, so two (even one valid) mean "ambiguous".
    claims = [uri[len(CLIENT_ID_URI_PREFIX) :] for uri in uris if uri.startswith(CLIENT_ID_URI_PREFIX)]
    if len(claims) != 1 or not valid_client_id(claims[0]):
        return None
    return claims[0]
