"""The rendered configuration and secrets: the ConfigMap holds known non-secret settings, every rgw container gets
the config and the Secret, base and prod Secrets are placeholders that fail closed, the dev overlay is complete.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import pytest

from gateway.settings import SPECS, Settings, SettingsError
from tests.deploy.manifests import (
    ALL,
    BASE,
    DEV,
    PROD,
    Doc,
    container_env,
    named,
    of_kind,
    render,
    secret_values,
    workload_container,
)

# What only a placeholder contains (base and prod Secrets) and what the dev overlay's demo values say about
# themselves.
PLACEHOLDER = "REPLACE_ME"
DEV_MARKERS = ("dev-only", "dev-demo")


# ---------------------------------------------------------------------------------------------------------------
# Configuration and secrets
# ---------------------------------------------------------------------------------------------------------------


def rgw_config(docs: list[Doc]) -> dict[str, str]:
    [config] = [doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"].startswith("rgw-config")]
    return dict(config["data"])


SECRET_SETTINGS = {"RGW_CODE_KEYS", "RGW_SECRET_KEYS", "RGW_SECRET_DEDUP_KEY", "RGW_DATABASE_URL", "RGW_API_KEY"}


@pytest.mark.parametrize("kustomization", ALL)
def test_configmap_holds_known_non_secret_settings_for_kubernetes(kustomization: str) -> None:
    config = rgw_config(render(kustomization))
    known = {spec.name for spec in SPECS}
    assert set(config) <= known, f"not settings: {set(config) - known}"
    assert not set(config) & SECRET_SETTINGS
    assert config["RGW_GRPC_ADDR"] == "0.0.0.0:50051"
    assert config["RGW_METRICS_ADDR"] == "0.0.0.0:9108"
    assert config["RGW_WRITER_METRICS_ADDR"] == "0.0.0.0:9109"
    assert config["RGW_WRITER_HEALTH_ADDR"] == "0.0.0.0:50052"
    assert config["RGW_REDIS_DURABILITY"] == "always"
    assert config["RGW_LOG_FORMAT"] == ("text" if kustomization == DEV else "json")


@pytest.mark.parametrize("kustomization", ALL)
def test_every_rgw_container_gets_the_config_and_the_secret(kustomization: str) -> None:
    docs = render(kustomization)
    for kind, name in (("Deployment", "rgw-gateway"), ("Deployment", "rgw-writer"), ("Job", "rgw-migrate")):
        _, container = workload_container(docs, kind, name)
        sources = [next(iter(source)) for source in container["envFrom"]]
        # The Secret comes last, so that it wins over the ConfigMap (e.g. an RGW_REDIS_URL with a password).
        assert sources == ["configMapRef", "secretRef"], name
        env = container_env(docs, container)  # every referenced object exists
        assert SECRET_SETTINGS - {"RGW_API_KEY"} <= set(env), name


@pytest.mark.parametrize("kustomization", (BASE, PROD))
def test_base_and_prod_secrets_hold_placeholders_only(kustomization: str) -> None:
    docs = render(kustomization)
    secrets = of_kind(docs, "Secret")
    assert secrets
    for secret in secrets:
        values = secret_values(secret)
        assert values, secret["metadata"]["name"]
        for key, value in values.items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
        assert values["RGW_CODE_KEYS"] == PLACEHOLDER
        assert values["RGW_SECRET_KEYS"] == PLACEHOLDER
        assert values["RGW_SECRET_DEDUP_KEY"] == PLACEHOLDER
        password = re.match(r"^postgres(?:ql)?://[^:/@]+:([^@]*)@", values["RGW_DATABASE_URL"])
        assert password and password.group(1) == PLACEHOLDER
        assert PLACEHOLDER in json.dumps(secret["metadata"].get("annotations", {}))


@pytest.mark.parametrize("kustomization", (BASE, PROD))
def test_placeholder_secrets_fail_closed(kustomization: str) -> None:
    """Deployed unfilled, the rgw processes refuse to start instead of running with a made-up key."""
    docs = render(kustomization)
    _, container = workload_container(docs, "Deployment", "rgw-gateway")
    with pytest.raises(SettingsError, match="RGW_CODE_KEYS") as refused:
        Settings.from_env(container_env(docs, container))
    # the card-secret keys too: an unfilled template never runs with a made-up inventory key
    assert "RGW_SECRET_KEYS:" in str(refused.value)
    assert "RGW_SECRET_DEDUP_KEY:" in str(refused.value)
    assert PLACEHOLDER not in str(refused.value)  # secret settings' values are never repeated


def _says_dev(value: str) -> bool:
    """A demo value names itself: in its text, or (a bare base64 key) in the text it decodes to."""
    if any(marker in value for marker in DEV_MARKERS):
        return True
    try:
        decoded = base64.b64decode(value, validate=True).decode("ascii").lower()
    except (binascii.Error, UnicodeDecodeError):
        return False
    return any(marker in decoded for marker in DEV_MARKERS) and "not-a-secret" in decoded


def test_dev_configuration_is_complete_and_valid() -> None:
    """The dev overlay runs as rendered: every rgw container's environment passes the settings validation."""
    docs = render(DEV)
    for kind, name in (("Deployment", "rgw-gateway"), ("Deployment", "rgw-writer"), ("Job", "rgw-migrate")):
        _, container = workload_container(docs, kind, name)
        settings = Settings.from_env(container_env(docs, container))
        assert settings.keyring()
        assert settings.secret_ring()  # the inventory's card-secret keys are demo keys too
    [secret] = of_kind(docs, "Secret")
    values = secret_values(secret)
    assert all(_says_dev(value) for value in values.values()), values
    for entry in values["RGW_SECRET_KEYS"].split(","):
        _, key = entry.split(":", 1)
        assert "NOT-A-SECRET" in base64.b64decode(key).decode("ascii"), entry
    url = re.match(r"^postgresql://([^:]+):([^@]+)@([^:/]+):5432/(\w+)$", values["RGW_DATABASE_URL"])
    assert url, values["RGW_DATABASE_URL"]
    user, password, host, database = url.groups()
    assert password == values["POSTGRES_PASSWORD"]
    _, postgres = workload_container(docs, "StatefulSet", "rgw-postgres")
    env = {var["name"]: var for var in postgres["env"]}
    assert env["POSTGRES_USER"]["value"] == user and env["POSTGRES_DB"]["value"] == database
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "POSTGRES_PASSWORD",
    }
    assert host == "rgw-postgres" and named(docs, "Service", "rgw-postgres")
    redis_host = re.match(r"^redis://([^:/]+):6379/\d+$", rgw_config(docs)["RGW_REDIS_URL"])
    assert redis_host and named(docs, "Service", redis_host.group(1))
