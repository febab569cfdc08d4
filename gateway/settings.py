"""All configuration: RGW_-prefixed environment variables, read here and nowhere else, validated at start-up.

Every variable, its default and meaning is listed in SPECS (the README's configuration table restates it).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import redis_client
from gateway.coderefs import MIN_KEY_BYTES, KeyRing
from gateway.inventory import crypto


class SettingsError(ValueError):
    """One or more variables are invalid; the message names each one."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One variable: its default (None: required when used) and what it means."""

    name: str
    default: str | None
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("RGW_GRPC_ADDR", "127.0.0.1:50051", "host:port the gRPC server listens on"),
    Spec(
        "RGW_REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis holding live code state and the outboxes; for a Redis Cluster, seed nodes: redis://HOST:PORT,HOST:PORT",
    ),
    Spec(
        "RGW_REDIS_MODE",
        "auto",
        "single, cluster, or auto (several seeds in RGW_REDIS_URL: a cluster); cluster with one seed works too",
    ),
    Spec("RGW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres", "Postgres: the system of record"),
    Spec("RGW_CODE_KEYS", None, "HMAC keys for code_refs: comma-separated KEY_ID:BASE64 (32+ bytes each)"),
    Spec("RGW_CODE_KEY_ID", "", "key id that hashes new campaigns' codes (default: the first of RGW_CODE_KEYS)"),
    Spec(
        "RGW_SECRET_KEYS",
        "",
        "AES-256-GCM keys encrypting card secrets: comma-separated KEY_ID:BASE64 (exactly 32 bytes each)",
    ),
    Spec("RGW_SECRET_KEYS_FILE", "", "a mounted file holding RGW_SECRET_KEYS' value instead (entries by , or line)"),
    Spec("RGW_SECRET_KEY_ID", "", "key id that encrypts new secrets (default: the first of RGW_SECRET_KEYS)"),
    Spec(
        "RGW_SECRET_DEDUP_KEY",
        "",
        "HMAC key (BASE64, 32+ bytes) that detects a card secret imported twice; never change it",
    ),
    Spec("RGW_SECRET_DEDUP_KEY_FILE", "", "a mounted file holding RGW_SECRET_DEDUP_KEY's value instead"),
    Spec("RGW_WORKERS", "1", "server processes sharing RGW_GRPC_ADDR (SO_REUSEPORT); needs a fixed port when > 1"),
    Spec("RGW_MAX_MESSAGE_BYTES", "16384", "largest gRPC message accepted or sent"),
    Spec("RGW_MAX_CONCURRENT_RPCS", "1000", "calls in progress at once; more get RESOURCE_EXHAUSTED"),
    Spec(
        "RGW_GRPC_MAX_CONNECTION_AGE_SECONDS",
        "300",
        "a client connection older than this is asked to reconnect (GOAWAY), so connections spread over new "
        "replicas after a scale-up; 0: never",
    ),
    Spec(
        "RGW_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS",
        "30",
        "how long calls in flight on such a connection may still take before it is closed",
    ),
    Spec("RGW_STREAM_MAX_ITEMS", "64", "most items in one RedeemStream or DispenseStream message"),
    Spec("RGW_SHUTDOWN_GRACE_SECONDS", "10", "on SIGTERM, how long in-flight calls may take to finish"),
    Spec(
        "RGW_REDIS_POOL_SIZE", "64", "redis-py connections per process for everything but the hot path (callers queue)"
    ),
    Spec("RGW_REDIS_HOT_CONNECTIONS", "4", "pipelined connections per process that carry the redeem script calls"),
    Spec("RGW_REDIS_TIMEOUT_SECONDS", "2", "Redis connect/read timeout and pool wait; beyond it: UNAVAILABLE"),
    Spec("RGW_HEALTH_INTERVAL_SECONDS", "2", "how often health checking pings Redis"),
    Spec("RGW_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Spec("RGW_LOG_FORMAT", "json", "json (one JSON object per line, for production) or text (development)"),
    Spec("RGW_ACCESS_LOG", "true", "one log line per RPC (logger rgw.access, INFO): method, status, outcome, time"),
    Spec("RGW_REDIS_DURABILITY", "always", "required Redis persistence: always, everysec or none (see Durability)"),
    Spec("RGW_METRICS_ADDR", "127.0.0.1:9108", "host:port of the gateway's Prometheus /metrics (empty: off)"),
    Spec("RGW_SERVE_WRITER", "false", "also run a ledger writer inside `rgw serve` (development)"),
    Spec("RGW_WRITER_METRICS_ADDR", "127.0.0.1:9109", "host:port of the writer's Prometheus /metrics (empty: off)"),
    Spec("RGW_WRITER_HEALTH_ADDR", "127.0.0.1:50052", "host:port of the writer's gRPC health service (empty: off)"),
    Spec("RGW_WRITER_BATCH_SIZE", "2000", "most outbox entries written to Postgres in one transaction"),
    Spec("RGW_WRITER_BATCH_WAIT_MS", "200", "longest wait for a batch to fill once its first entry arrived"),
    Spec("RGW_INVENTORY_STOCK_SECONDS", "30", "how often the writer refreshes the card-secret stock gauges"),
    Spec("RGW_WRITER_CLAIM_IDLE_MS", "30000", "entries unacknowledged this long by a consumer are reclaimed"),
    Spec("RGW_WRITER_MAX_ATTEMPTS", "5", "tries for an entry Postgres rejects before it is dead-lettered"),
    Spec("RGW_WRITER_BACKOFF_MAX_SECONDS", "10", "cap of the retry backoff while Postgres is unreachable"),
    Spec("RGW_WRITER_CONSUMER", "", "consumer name in the outbox groups (default: hostname-pid)"),
    Spec("RGW_API_KEY", "", "the API key `rgw redeem|validate|get-code` sends (or --key); never logged"),
    Spec("RGW_KEY_ENV", "dev", "environment tag of new API keys (rgw_<env>_...): live, test or dev"),
    Spec("RGW_KEY_ROTATION_GRACE_SECONDS", "86400", "how long a rotated-out API key stays valid"),
    Spec("RGW_REGISTRY_POLL_SECONDS", "1", "how often each process checks the registry version (the backstop)"),
    Spec("RGW_REGISTRY_MAX_STALE_SECONDS", "5", "a known-stale registry not refreshed this long fails closed"),
    Spec("RGW_TERMINAL_SEEN_FLUSH_SECONDS", "30", "how often terminals' first/last seen times are written"),
    Spec("RGW_RISK_ENGINE", "true", "run the risk engine on Redeem, Validate and RedeemStream (false: benchmarks)"),
    Spec(
        "RGW_RISK_REDIS_URL",
        "",
        "where the risk counters live; empty: in the code Redis, checked inside the redeem "
        "script (one call); a URL (even the same one): their own call before the redemption, as on Redis Cluster",
    ),
    Spec("RGW_RISK_UPKEEP_SECONDS", "1", "how often bind_first terminals are registered and event streams listed"),
    Spec("RGW_TLS_CERT_FILE", "", "server certificate chain (PEM); empty: plaintext gRPC"),
    Spec("RGW_TLS_KEY_FILE", "", "server private key (PEM)"),
    Spec("RGW_TLS_CLIENT_CA_FILE", "", "CA bundle (PEM) that client certificates must chain to"),
    Spec("RGW_TLS_CLIENT_AUTH", "none", "client certificates: none or require (needs the CA file)"),
)

# No "optional": grpcio cannot ask for a client certificate without requiring one (gateway/grpc_api/tls.py).
TLS_CLIENT_AUTH = ("none", "require")
KEY_ENVIRONMENTS = ("live", "test", "dev")

DURABILITY_LEVELS = ("always", "everysec", "none")


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration."""

    grpc_addr: str
    redis_url: str
    redis_mode: str
    database_url: str
    code_keys: Mapping[str, bytes]
    code_key_id: str
    secret_keys: Mapping[str, bytes]
    secret_key_id: str
    secret_dedup_key: bytes
    workers: int
    max_message_bytes: int
    max_concurrent_rpcs: int
    grpc_max_connection_age_seconds: float
    grpc_max_connection_age_grace_seconds: float
    stream_max_items: int
    shutdown_grace_seconds: float
    redis_pool_size: int
    redis_hot_connections: int
    redis_timeout_seconds: float
    health_interval_seconds: float
    log_level: str
    log_format: str
    access_log: bool
    redis_durability: str
    metrics_addr: str
    serve_writer: bool
    writer_metrics_addr: str
    writer_health_addr: str
    writer_batch_size: int
    writer_batch_wait_ms: int
    inventory_stock_seconds: float
    writer_claim_idle_ms: int
    writer_max_attempts: int
    writer_backoff_max_seconds: float
    writer_consumer: str
    api_key: str
    key_env: str
    key_rotation_grace_seconds: float
    registry_poll_seconds: float
    registry_max_stale_seconds: float
    terminal_seen_flush_seconds: float
    risk_engine: bool
    risk_redis_url: str
    risk_upkeep_seconds: float
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    tls_client_auth: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; SettingsError lists all bad ones at once."""
        return _Reader(os.environ if environ is None else environ).settings()

    @property
    def redis_target(self) -> tuple[str, str]:
        """(RGW_REDIS_URL, RGW_REDIS_MODE): where the code Redis is and whether it is a cluster."""
        return self.redis_url, self.redis_mode

    @property
    def redis_cluster(self) -> bool:
        """Whether the code Redis is a Redis Cluster (RGW_REDIS_MODE, or a list of seeds)."""
        return redis_client.is_cluster(self.redis_url, self.redis_mode)

    def keyring(self) -> KeyRing:
        """The code_ref keys; SettingsError when none are configured."""
        if not self.code_keys:
            raise SettingsError("RGW_CODE_KEYS is required: comma-separated KEY_ID:BASE64 (32+ random bytes each)")
        return KeyRing(self.code_keys, self.code_key_id or next(iter(self.code_keys)))

    def secret_ring(self) -> crypto.SecretRing:
        """The card-secret keys (gateway/inventory/crypto.py); SettingsError when they are not configured."""
        if not self.secret_keys or not self.secret_dedup_key:
            raise SettingsError(
                "card secrets need RGW_SECRET_KEYS (or RGW_SECRET_KEYS_FILE): comma-separated KEY_ID:BASE64 of 32 "
                "random bytes each, and RGW_SECRET_DEDUP_KEY (or RGW_SECRET_DEDUP_KEY_FILE): BASE64 of 32+ bytes"
            )
        active = self.secret_key_id or next(iter(self.secret_keys))
        return crypto.SecretRing(self.secret_keys, active, self.secret_dedup_key)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("must be HOST:PORT")
    return text


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return text

    return parse


def _optional(parse: Callable[[str], str]) -> Callable[[str], str]:
    def optional(text: str) -> str:
        return parse(text) if text else ""

    return optional


def _code_keys(text: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key_id, sep, encoded = item.partition(":")
        if not sep or not key_id:
            raise ValueError("each entry must be KEY_ID:BASE64")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError(f"key {key_id!r} is not valid base64") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key {key_id!r} must decode to at least {MIN_KEY_BYTES} bytes")
        keys[key_id] = key
    return keys


def _secret_keys(text: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        key_id, sep, encoded = item.partition(":")
        if not sep or not crypto.is_key_id(key_id):
            raise ValueError(f"each entry must be KEY_ID:BASE64, the id {crypto.KEY_ID_RULE}")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError(f"key {key_id!r} is not valid base64") from None
        if len(key) != crypto.KEY_BYTES:
            raise ValueError(f"key {key_id!r} must decode to exactly {crypto.KEY_BYTES} bytes (AES-256)")
        if key_id in keys:
            raise ValueError(f"key id {key_id!r} appears twice")
        keys[key_id] = key
    return keys


def _dedup_key(text: str) -> bytes:
    if not text.strip():
        return b""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("is not valid base64") from None
    if len(key) < crypto.MIN_DEDUP_KEY_BYTES:
        raise ValueError(f"must decode to at least {crypto.MIN_DEDUP_KEY_BYTES} bytes")
    return key


def _file_text(text: str) -> str:
    if not text:
        return ""
    try:
        with open(text, encoding="ascii") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot be read ({type(exc).__name__})") from None


def _optional_host_port(text: str) -> str:
    return _host_port(text) if text else ""


def _bool(text: str) -> bool:
    if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return text.lower() in {"true", "1", "yes"}


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number >= 0")
    return value


# gRPC takes the connection age as a C int of milliseconds.
_GRPC_MAX_SECONDS = (2**31 - 1) // 1000


def _grpc_seconds(text: str) -> float:
    value = _non_negative_float(text)
    if value > _GRPC_MAX_SECONDS:
        raise ValueError(f"must be at most {_GRPC_MAX_SECONDS} (gRPC counts it in 32-bit milliseconds)")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _optional_file(text: str) -> str:
    if text and not os.path.isfile(text):
        raise ValueError("no such file")
    return text


def _durability(text: str) -> str:
    if text not in DURABILITY_LEVELS:
        raise ValueError(f"must be one of {', '.join(DURABILITY_LEVELS)}")
    return text


def _log_level(text: str) -> str:
    if text.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return text.upper()


# Variables whose value is never repeated in an error message.
_SECRET_VALUES = frozenset({"RGW_CODE_KEYS", "RGW_API_KEY", "RGW_SECRET_KEYS", "RGW_SECRET_DEDUP_KEY"})


class _Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._defaults = {s.name: s.default or "" for s in SPECS}
        self.errors: list[str] = []

    def get(self, name: str, parse: Callable[[str], Any]) -> Any:
        text = self._environ.get(name, self._defaults[name])
        try:
            return parse(text)
        except ValueError as exc:
            secret = name in _SECRET_VALUES
            self.errors.append(f"{name}: {exc}" if secret else f"{name}={text[:40]!r}: {exc}")
            return None

    def _from_env_or_file(self, name: str, parse: Callable[[str], Any]) -> Any:
        """A secret from the variable `name` or from the file `name`_FILE names (one of them, never both)."""
        path = self.get(f"{name}_FILE", str)
        if path and self._environ.get(name):
            self.errors.append(f"{name} and {name}_FILE: set one of them, not both")
            return parse("")
        if not path:
            return self.get(name, parse)
        try:
            return parse(_file_text(path))
        except ValueError as exc:
            self.errors.append(f"{name}_FILE={path[:80]!r}: {exc}")
            return None

    def settings(self) -> Settings:
        values = Settings(
            grpc_addr=self.get("RGW_GRPC_ADDR", _host_port),
            redis_url=self.get("RGW_REDIS_URL", _url("redis", "rediss", "unix")),
            redis_mode=self.get("RGW_REDIS_MODE", _one_of(*redis_client.MODES)),
            database_url=self.get("RGW_DATABASE_URL", _url("postgresql", "postgres")),
            code_keys=self.get("RGW_CODE_KEYS", _code_keys),
            code_key_id=self.get("RGW_CODE_KEY_ID", str),
            secret_keys=self._from_env_or_file("RGW_SECRET_KEYS", _secret_keys),
            secret_key_id=self.get("RGW_SECRET_KEY_ID", str),
            secret_dedup_key=self._from_env_or_file("RGW_SECRET_DEDUP_KEY", _dedup_key),
            workers=self.get("RGW_WORKERS", _positive_int),
            max_message_bytes=self.get("RGW_MAX_MESSAGE_BYTES", _positive_int),
            max_concurrent_rpcs=self.get("RGW_MAX_CONCURRENT_RPCS", _positive_int),
            grpc_max_connection_age_seconds=self.get("RGW_GRPC_MAX_CONNECTION_AGE_SECONDS", _grpc_seconds),
            grpc_max_connection_age_grace_seconds=self.get("RGW_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", _grpc_seconds),
            stream_max_items=self.get("RGW_STREAM_MAX_ITEMS", _positive_int),
            shutdown_grace_seconds=self.get("RGW_SHUTDOWN_GRACE_SECONDS", _positive_float),
            redis_pool_size=self.get("RGW_REDIS_POOL_SIZE", _positive_int),
            redis_hot_connections=self.get("RGW_REDIS_HOT_CONNECTIONS", _positive_int),
            redis_timeout_seconds=self.get("RGW_REDIS_TIMEOUT_SECONDS", _positive_float),
            health_interval_seconds=self.get("RGW_HEALTH_INTERVAL_SECONDS", _positive_float),
            log_level=self.get("RGW_LOG_LEVEL", _log_level),
            log_format=self.get("RGW_LOG_FORMAT", _one_of("json", "text")),
            access_log=self.get("RGW_ACCESS_LOG", _bool),
            redis_durability=self.get("RGW_REDIS_DURABILITY", _durability),
            metrics_addr=self.get("RGW_METRICS_ADDR", _optional_host_port),
            serve_writer=self.get("RGW_SERVE_WRITER", _bool),
            writer_metrics_addr=self.get("RGW_WRITER_METRICS_ADDR", _optional_host_port),
            writer_health_addr=self.get("RGW_WRITER_HEALTH_ADDR", _optional_host_port),
            writer_batch_size=self.get("RGW_WRITER_BATCH_SIZE", _positive_int),
            writer_batch_wait_ms=self.get("RGW_WRITER_BATCH_WAIT_MS", _positive_int),
            inventory_stock_seconds=self.get("RGW_INVENTORY_STOCK_SECONDS", _positive_float),
            writer_claim_idle_ms=self.get("RGW_WRITER_CLAIM_IDLE_MS", _positive_int),
            writer_max_attempts=self.get("RGW_WRITER_MAX_ATTEMPTS", _positive_int),
            writer_backoff_max_seconds=self.get("RGW_WRITER_BACKOFF_MAX_SECONDS", _positive_float),
            writer_consumer=self.get("RGW_WRITER_CONSUMER", str),
            api_key=self.get("RGW_API_KEY", str),
            key_env=self.get("RGW_KEY_ENV", _one_of(*KEY_ENVIRONMENTS)),
            key_rotation_grace_seconds=self.get("RGW_KEY_ROTATION_GRACE_SECONDS", _non_negative_float),
            registry_poll_seconds=self.get("RGW_REGISTRY_POLL_SECONDS", _positive_float),
            registry_max_stale_seconds=self.get("RGW_REGISTRY_MAX_STALE_SECONDS", _positive_float),
            terminal_seen_flush_seconds=self.get("RGW_TERMINAL_SEEN_FLUSH_SECONDS", _positive_float),
            risk_engine=self.get("RGW_RISK_ENGINE", _bool),
            risk_redis_url=self.get("RGW_RISK_REDIS_URL", _optional(_url("redis", "rediss", "unix"))),
            risk_upkeep_seconds=self.get("RGW_RISK_UPKEEP_SECONDS", _positive_float),
            tls_cert_file=self.get("RGW_TLS_CERT_FILE", _optional_file),
            tls_key_file=self.get("RGW_TLS_KEY_FILE", _optional_file),
            tls_client_ca_file=self.get("RGW_TLS_CLIENT_CA_FILE", _optional_file),
            tls_client_auth=self.get("RGW_TLS_CLIENT_AUTH", _one_of(*TLS_CLIENT_AUTH)),
        )
        self._check_tls(values)
        if values.redis_url and values.redis_mode and (problem := redis_client.url_problem(*values.redis_target)):
            self.errors.append(f"RGW_REDIS_URL={values.redis_url[:80]!r}: {problem}")
        if values.code_keys and values.code_key_id and values.code_key_id not in values.code_keys:
            self.errors.append(f"RGW_CODE_KEY_ID={values.code_key_id!r}: not a key id of RGW_CODE_KEYS")
        if values.secret_keys and values.secret_key_id and values.secret_key_id not in values.secret_keys:
            self.errors.append(f"RGW_SECRET_KEY_ID={values.secret_key_id[:40]!r}: not a key id of RGW_SECRET_KEYS")
        if values.workers and values.workers > 1 and values.grpc_addr and values.grpc_addr.endswith(":0"):
            self.errors.append("RGW_WORKERS > 1 needs a fixed port in RGW_GRPC_ADDR (port 0 differs per process)")
        if self.errors:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(self.errors))
        return values

    def _check_tls(self, values: Settings) -> None:
        if bool(values.tls_cert_file) != bool(values.tls_key_file):
            self.errors.append("RGW_TLS_CERT_FILE and RGW_TLS_KEY_FILE must be set together")
        if values.tls_client_auth not in (None, "none") and not (values.tls_client_ca_file and values.tls_cert_file):
            self.errors.append("RGW_TLS_CLIENT_AUTH needs RGW_TLS_CLIENT_CA_FILE and the server certificate")
