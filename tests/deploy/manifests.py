"""Rendering the Kubernetes manifests and reading the rendered objects: shared by the tests/deploy test modules.

The manifests are rendered for real (`kubectl kustomize` of deploy/k8s/base and each overlay), once per
kustomization and test session (the rendering is cached).
"""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE, DEV, PROD = "base", "overlays/dev", "overlays/prod"
ALL = (BASE, DEV, PROD)
OVERLAYS = (DEV, PROD)


Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Rendering and small helpers
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _render(kustomization: str) -> tuple[Doc, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the manifests (scripts/system_deps.sh says how to get it)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert docs, f"{kustomization} renders nothing"
    return docs


def render(kustomization: str) -> list[Doc]:
    return list(_render(kustomization))


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def labels(doc: Doc) -> dict[str, str]:
    return dict(doc.get("metadata", {}).get("labels") or {})


def matches(selector: dict[str, str], target: dict[str, str]) -> bool:
    return bool(selector) and all(target.get(key) == value for key, value in selector.items())


WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet")


def pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) of every pod-making object; a CronJob would add one more level."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]


def containers(template: Doc) -> list[Doc]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def all_containers(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(workload/container, pod template, container)."""
    for workload, template in pod_templates(docs):
        for container in containers(template):
            yield f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}", template, container


def workload_container(docs: list[Doc], kind: str, name: str) -> tuple[Doc, Doc]:
    """The pod template and (only) container of one workload."""
    template = named(docs, kind, name)["spec"]["template"]
    [container] = template["spec"]["containers"]
    return template, container


def secret_values(secret: Doc) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets: envFrom sources in order (later ones win), then env with plain values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if ref := source.get("configMapRef"):
            env.update(named(docs, "ConfigMap", ref["name"])["data"])
        if ref := source.get("secretRef"):
            env.update(secret_values(named(docs, "Secret", ref["name"])))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_port(container: Doc, name: str) -> int:
    [port] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    return int(port)
