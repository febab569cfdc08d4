from __future__ import annotations

import base64

import pytest

from gateway.settings import SPECS, Settings, SettingsError

KEY = base64.b64encode(b"k" * 32).decode()


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.grpc_addr == "127.0.0.1:50051"
    assert settings.max_message_bytes == 16384
    assert settings.max_concurrent_rpcs > 0
    with pytest.raises(SettingsError, match="RGW_CODE_KEYS is required"):
        settings.keyring()


def test_keys_and_active_key() -> None:
    other = base64.b64encode(b"o" * 32).decode()
    settings = Settings.from_env({"RGW_CODE_KEYS": f"old:{KEY},new:{other}", "RGW_CODE_KEY_ID": "new"})
    assert settings.keyring().active_id == "new"
    assert Settings.from_env({"RGW_CODE_KEYS": f"old:{KEY},new:{other}"}).keyring().active_id == "old"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RGW_GRPC_ADDR", "nope"),
        ("RGW_REDIS_URL", "http://x"),
        ("RGW_DATABASE_URL", "mysql://x"),
        ("RGW_MAX_MESSAGE_BYTES", "-1"),
        ("RGW_MAX_CONCURRENT_RPCS", "many"),
        ("RGW_SHUTDOWN_GRACE_SECONDS", "0"),
        ("RGW_CODE_KEYS", "a:c2hvcnQ="),
        ("RGW_CODE_KEYS", "nocolon"),
        ("RGW_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_bad_variable_is_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RGW_GRPC_ADDR": "x", "RGW_REDIS_POOL_SIZE": "0"})
    assert "RGW_GRPC_ADDR" in str(info.value) and "RGW_REDIS_POOL_SIZE" in str(info.value)


def test_key_material_is_never_echoed() -> None:
    secret = base64.b64encode(b"s" * 8).decode()
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RGW_CODE_KEYS": f"a:{secret}"})
    assert secret not in str(info.value)


def test_unknown_active_key_id() -> None:
    with pytest.raises(SettingsError, match="RGW_CODE_KEY_ID"):
        Settings.from_env({"RGW_CODE_KEYS": f"a:{KEY}", "RGW_CODE_KEY_ID": "b"})


def test_every_variable_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [spec.name for spec in SPECS if spec.name not in readme]
    assert not missing


def test_connection_age_defaults_and_off() -> None:
    settings = Settings.from_env({})
    assert settings.grpc_max_connection_age_seconds == 300
    assert settings.grpc_max_connection_age_grace_seconds == 30
    off = Settings.from_env(
        {"RGW_GRPC_MAX_CONNECTION_AGE_SECONDS": "0", "RGW_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS": "0"}
    )
    assert off.grpc_max_connection_age_seconds == 0 and off.grpc_max_connection_age_grace_seconds == 0


@pytest.mark.parametrize("name", ["RGW_GRPC_MAX_CONNECTION_AGE_SECONDS", "RGW_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS"])
@pytest.mark.parametrize("value", ["-1", "soon", "", "nan", "inf", "3000000"])
def test_a_bad_connection_age_is_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_connection_age_becomes_server_options() -> None:
    from gateway.grpc_api.server import server_options

    aged = dict(server_options(Settings.from_env({"RGW_GRPC_MAX_CONNECTION_AGE_SECONDS": "1.5"})))
    assert aged["grpc.max_connection_age_ms"] == 1500
    assert aged["grpc.max_connection_age_grace_ms"] == 30_000
    off = dict(server_options(Settings.from_env({"RGW_GRPC_MAX_CONNECTION_AGE_SECONDS": "0"})))
    assert "grpc.max_connection_age_ms" not in off and "grpc.max_connection_age_grace_ms" not in off
