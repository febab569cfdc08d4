"""The rendered kustomizations: base and each overlay render, and the built-in kinds validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate); the Prometheus Operator's custom resources have no bundled schema,
so their required fields are checked here. Then what each overlay sets: namespaces, the generated dashboard
ConfigMap, image references.
"""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import (
    ALL,
    BASE,
    K8S,
    OVERLAYS,
    PROD,
    Doc,
    all_containers,
    labels,
    of_kind,
    render,
)

# The oldest Kubernetes the manifests are for (native gRPC probes are GA since 1.27; matchLabelKeys, nodeTaintsPolicy
# and unhealthyPodEvictionPolicy are on by default since 1.27-1.28) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


# ---------------------------------------------------------------------------------------------------------------
# Rendering and schema validation
# ---------------------------------------------------------------------------------------------------------------


CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def check_crd(doc: Doc) -> list[str]:
    """The fields the Prometheus Operator requires of its resources (no schema ships for them)."""
    where = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
    problems = [f"{where}: no {key}" for key in ("apiVersion", "kind", "metadata", "spec") if not doc.get(key)]
    if problems:
        return problems
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", str(doc["metadata"].get("name", ""))):
        problems.append(f"{where}: metadata.name is not a DNS subdomain")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    problems += [f"{where}: unexpected top-level field {key}" for key in sorted(unknown)]
    check = _check_servicemonitor if doc["kind"] == "ServiceMonitor" else _check_prometheusrule
    return problems + [f"{where}: {problem}" for problem in check(doc["spec"])]


def _check_servicemonitor(spec: Doc) -> list[str]:
    problems = [] if isinstance(spec.get("selector"), dict) else ["spec.selector missing"]
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problems.append("spec.endpoints missing")
    problems += ["an endpoint names no port" for e in endpoints if not (e.get("port") or e.get("targetPort"))]
    return problems


def _check_prometheusrule(spec: Doc) -> list[str]:
    groups = spec.get("groups") or []
    problems = [] if groups else ["spec.groups missing"]
    for group in groups:
        if not group.get("name") or not group.get("rules"):
            problems.append(f"group {group.get('name')!r} lacks a name or rules")
        problems += [
            f"rule {rule} needs expr and exactly one of record/alert"
            for rule in group.get("rules") or []
            if not rule.get("expr") or ("record" in rule) == ("alert" in rule)
        ]
    return problems


@pytest.mark.parametrize("kustomization", ALL)
def test_renders_and_every_object_validates_strictly(kustomization: str) -> None:
    docs = render(kustomization)
    problems: list[str] = []
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            problems += check_crd(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(exc.message)  # an unknown kind or apiVersion is an error, not a warning
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kustomization", ALL)
def test_both_crd_kinds_are_rendered_and_checked(kustomization: str) -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in render(kustomization)}
    assert kinds >= CRD_KINDS


def test_crd_check_finds_missing_fields() -> None:
    """The hand-written CRD check is not vacuous."""
    monitor = next(doc for doc in render(BASE) if doc["kind"] == "ServiceMonitor")
    assert check_crd(monitor) == []
    assert check_crd({**monitor, "spec": {"selector": {}}})
    assert check_crd({key: value for key, value in monitor.items() if key != "spec"})
    rule = next(doc for doc in render(BASE) if doc["kind"] == "PrometheusRule")
    assert check_crd(rule) == []
    assert check_crd({**rule, "spec": {"groups": [{"name": "g", "rules": [{"record": "r"}]}]}})


def test_base_is_namespace_agnostic_and_overlays_set_a_restricted_namespace() -> None:
    assert [doc["metadata"]["name"] for doc in render(BASE) if "namespace" in doc["metadata"]] == []
    for overlay in OVERLAYS:
        docs = render(overlay)
        [namespace] = of_kind(docs, "Namespace")
        name = namespace["metadata"]["name"]
        assert labels(namespace)["pod-security.kubernetes.io/enforce"] == "restricted"
        stray = [doc["metadata"]["name"] for doc in docs if doc["kind"] != "Namespace"]
        assert stray and all(doc["metadata"].get("namespace") == name for doc in docs if doc["kind"] != "Namespace"), (
            f"{overlay}: not everything is in namespace {name}"
        )


def test_base_lists_the_alert_rules_and_generates_the_dashboard_configmap() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in kustomization["resources"]
    for overlay in ALL:
        docs = render(overlay)
        assert of_kind(docs, "PrometheusRule"), overlay
        dashboards = [doc for doc in of_kind(docs, "ConfigMap") if labels(doc).get("grafana_dashboard") == "1"]
        assert len(dashboards) == 1, overlay
        assert list(dashboards[0]["data"]) == ["rgw-cockpit.json"]
        assert isinstance(json.loads(dashboards[0]["data"]["rgw-cockpit.json"]), dict)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None: untagged, i.e. latest); a digest counts as pinned."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    name = image.rpartition("/")[2]
    return name.split(":", 1)[1] if ":" in name else None


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_overlay_images_are_tagged_and_never_latest(kustomization: str) -> None:
    for where, _, container in all_containers(render(kustomization)):
        tag = image_tag(container["image"])
        assert tag is not None and tag != "latest", f"{where}: {container['image']}"


def test_prod_pins_a_release_of_the_gateway_image_from_a_registry() -> None:
    docs = render(PROD)
    images = {container["image"] for _, _, container in all_containers(docs)}
    [image] = images
    assert "/" in image and "." in image.split("/")[0], f"{image}: no registry"
    tag = image_tag(image)
    assert tag and (tag.startswith("sha256:") or re.fullmatch(r"v?\d+\.\d+\.\d+", tag)), image
    assert all(c.get("imagePullPolicy") == "IfNotPresent" for _, _, c in all_containers(docs))
