"""The container image and the Kubernetes manifests, checked without Docker or a cluster.

The manifests are rendered for real (`kubectl kustomize` of deploy/k8s/base and each overlay) and the built-in kinds
validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate); the Prometheus Operator's custom
resources have no bundled schema, so their required fields are checked here. Then the operational properties the
gateway depends on are asserted on the rendered objects (probes, security context, shutdown timing, scrape jobs,
secrets, durability of the development Redis...). The image: the project's wheel is built for real and inspected,
the Dockerfile, .dockerignore and the runtime lock file are parsed.
"""

from __future__ import annotations

import ast
import base64
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.settings import SPECS, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE, DEV, PROD = "base", "overlays/dev", "overlays/prod"
ALL = (BASE, DEV, PROD)
OVERLAYS = (DEV, PROD)

# The oldest Kubernetes the manifests are for (native gRPC probes are GA since 1.27; matchLabelKeys, nodeTaintsPolicy
# and unhealthyPodEvictionPolicy are on by default since 1.27-1.28) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# The operations contract (issue 10): gRPC health service names and Prometheus job labels.
READY_SERVICE = "redemption.v1.RedemptionService"
LIVE_SERVICE = "rgw.live"
WRITER_READY_SERVICE = ""
JOBS = {"rgw-gateway", "rgw-writer"}

# What only a placeholder contains (base and prod Secrets) and what the dev overlay's demo values say about
# themselves.
PLACEHOLDER = "REPLACE_ME"
DEV_MARKERS = ("dev-only", "dev-demo")

DEV_TOOLS = {"pytest", "ruff", "mypy", "locust", "hypothesis", "hatchling", "grpcio-tools", "py-spy", "buf-bin"}

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


def rgw_config(docs: list[Doc]) -> dict[str, str]:
    [config] = [doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"].startswith("rgw-config")]
    return dict(config["data"])


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


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_FACTORS = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: str | int | float) -> float:
    match = _QUANTITY.match(str(value))
    assert match and match.group(2) in _FACTORS, f"not a quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


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
# Pods: security, resources, commands, probes, shutdown
# ---------------------------------------------------------------------------------------------------------------

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("kustomization", ALL)
def test_every_container_meets_the_restricted_pod_security_standard(kustomization: str) -> None:
    docs = render(kustomization)
    found = list(all_containers(docs))
    assert found
    for where, template, container in found:
        pod = template["spec"]
        pod_context = pod.get("securityContext", {})
        context = container.get("securityContext", {})

        def setting(key: str, context: Doc = context, pod_context: Doc = pod_context) -> Any:
            return context.get(key, pod_context.get(key))

        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers")), where
        assert setting("runAsNonRoot") is True, where
        assert setting("runAsUser") not in (None, 0), f"{where}: needs a numeric non-root runAsUser"
        assert setting("runAsGroup") not in (None, 0), where
        assert setting("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("privileged", False) is False, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not context.get("capabilities", {}).get("add"), where
        assert not any(port.get("hostPort") for port in container.get("ports", [])), where
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{where}: volume {volume['name']} is {kinds}"


@pytest.mark.parametrize("kustomization", ALL)
def test_a_read_only_root_filesystem_still_has_a_writable_tmp(kustomization: str) -> None:
    for where, template, container in all_containers(render(kustomization)):
        empty_dirs = {v["name"] for v in template["spec"].get("volumes", []) if "emptyDir" in v}
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and tmp[0]["name"] in empty_dirs and not tmp[0].get("readOnly"), where


@pytest.mark.parametrize("kustomization", ALL)
def test_every_container_has_cpu_and_memory_requests_and_limits(kustomization: str) -> None:
    for where, _, container in all_containers(render(kustomization)):
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{where}: {resource} request and limit"
            assert 0 < quantity(request) <= quantity(limit), f"{where}: {resource} {request} > {limit}"


@pytest.mark.parametrize("kustomization", ALL)
def test_the_rgw_processes_run_the_right_commands(kustomization: str) -> None:
    docs = render(kustomization)
    for kind, name, command in (
        ("Deployment", "rgw-gateway", "serve"),
        ("Deployment", "rgw-writer", "writer"),
        ("Job", "rgw-migrate", "migrate"),
    ):
        _, container = workload_container(docs, kind, name)
        assert [*container.get("command", []), *container.get("args", [])] == ["rgw", command], name
        assert container["image"].rpartition("/")[2].split(":")[0].split("@")[0] == "redemption-gateway"
    assert named(docs, "Job", "rgw-migrate")["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def grpc_probe(container: Doc, kind: str) -> Doc:
    probe = container.get(kind)
    assert probe is not None, f"{container['name']}: no {kind}"
    assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind} is not a gRPC probe"
    return dict(probe["grpc"])


@pytest.mark.parametrize("kustomization", ALL)
def test_gateway_probes_are_grpc_health_checks_of_the_contract_services(kustomization: str) -> None:
    docs = render(kustomization)
    _, container = workload_container(docs, "Deployment", "rgw-gateway")
    grpc_port = port_of(container_env(docs, container)["RGW_GRPC_ADDR"])
    assert container_port(container, "grpc") == grpc_port == 50051
    ready, live, startup = (grpc_probe(container, kind) for kind in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert ready == {"port": grpc_port, "service": READY_SERVICE}
    # Liveness never depends on Redis: a Redis outage must not restart every gateway.
    assert live == {"port": grpc_port, "service": LIVE_SERVICE}
    assert startup == {"port": grpc_port, "service": LIVE_SERVICE}


@pytest.mark.parametrize("kustomization", ALL)
def test_writer_probes_are_grpc_health_checks_on_its_health_port(kustomization: str) -> None:
    docs = render(kustomization)
    _, container = workload_container(docs, "Deployment", "rgw-writer")
    health_port = port_of(container_env(docs, container)["RGW_WRITER_HEALTH_ADDR"])
    assert container_port(container, "health") == health_port == 50052
    ready, live, startup = (grpc_probe(container, kind) for kind in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert ready["port"] == health_port and ready.get("service", "") == WRITER_READY_SERVICE
    assert live == {"port": health_port, "service": LIVE_SERVICE}
    assert startup == {"port": health_port, "service": LIVE_SERVICE}


def prestop_seconds(container: Doc) -> float:
    handler = container.get("lifecycle", {}).get("preStop")
    if handler is None:
        return 0.0
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep") and len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("kustomization", ALL)
def test_termination_grace_outlasts_prestop_drain_and_shutdown_grace(kustomization: str) -> None:
    docs = render(kustomization)
    for name in ("rgw-gateway", "rgw-writer"):
        template, container = workload_container(docs, "Deployment", name)
        shutdown_grace = float(container_env(docs, container)["RGW_SHUTDOWN_GRACE_SECONDS"])
        period = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert period > prestop_seconds(container) + shutdown_grace, (name, period, shutdown_grace)
    # The gateway keeps serving while its endpoint is removed everywhere, then gets SIGTERM.
    _, gateway = workload_container(docs, "Deployment", "rgw-gateway")
    assert prestop_seconds(gateway) >= 3


@pytest.mark.parametrize("kustomization", ALL)
def test_gateway_pods_spread_over_zones_and_nodes(kustomization: str) -> None:
    template, _ = workload_container(render(kustomization), "Deployment", "rgw-gateway")
    constraints = template["spec"].get("topologySpreadConstraints", [])
    keys = {c["topologyKey"] for c in constraints if matches(c["labelSelector"]["matchLabels"], labels(template))}
    assert keys >= {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


# ---------------------------------------------------------------------------------------------------------------
# Metrics: one port per worker, ServiceMonitors with the contract's job labels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", ALL)
def test_gateway_has_one_metrics_port_per_worker(kustomization: str) -> None:
    docs = render(kustomization)
    _, container = workload_container(docs, "Deployment", "rgw-gateway")
    env = container_env(docs, container)
    workers = int(env["RGW_WORKERS"])
    assert workers == 2
    first = port_of(env["RGW_METRICS_ADDR"])
    metrics = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")}
    assert metrics == {f"metrics-{i}": first + i for i in range(workers)}
    _, writer = workload_container(docs, "Deployment", "rgw-writer")
    assert container_port(writer, "metrics") == port_of(container_env(docs, writer)["RGW_WRITER_METRICS_ADDR"])


def scraped_ports(docs: list[Doc]) -> dict[str, set[tuple[str, str, int]]]:
    """job label -> {(workload, container, container port)} the ServiceMonitors scrape, resolved the way the
    Prometheus Operator does: ServiceMonitor -> Services by label -> endpoint port by name -> targetPort -> pods."""
    scraped: dict[str, set[tuple[str, str, int]]] = {}
    for monitor in of_kind(docs, "ServiceMonitor"):
        spec = monitor["spec"]
        assert not spec.get("namespaceSelector"), "base is namespace-agnostic: scrape the monitor's own namespace"
        services = [s for s in of_kind(docs, "Service") if matches(spec["selector"]["matchLabels"], labels(s))]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for service in services:
            # The job label: the Service's label named by jobLabel (else the Service's name), unless relabeled.
            service_job = labels(service).get(spec.get("jobLabel", ""), service["metadata"]["name"])
            for endpoint in spec["endpoints"]:
                relabeled = [r["replacement"] for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
                job = relabeled[-1] if relabeled else service_job
                [port] = [p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]]
                scraped.setdefault(job, set()).update(_targets(docs, service, port.get("targetPort", port["port"])))
    return scraped


def _targets(docs: list[Doc], service: Doc, target_port: str | int) -> set[tuple[str, str, int]]:
    """(workload, container, container port) a Service port's targetPort reaches."""
    return {
        (workload["metadata"]["name"], container["name"], cport["containerPort"])
        for workload, template in pod_templates(docs)
        if matches(service["spec"]["selector"], labels(template))
        for container in containers(template)
        for cport in container.get("ports", [])
        if target_port in (cport.get("name"), cport["containerPort"])
    }


@pytest.mark.parametrize("kustomization", ALL)
def test_servicemonitors_scrape_every_metrics_port_under_the_contract_job_labels(kustomization: str) -> None:
    docs = render(kustomization)
    _, gateway = workload_container(docs, "Deployment", "rgw-gateway")
    _, writer = workload_container(docs, "Deployment", "rgw-writer")
    expected = {
        "rgw-gateway": {
            ("rgw-gateway", "gateway", p["containerPort"]) for p in gateway["ports"] if p["name"].startswith("metrics")
        },
        "rgw-writer": {("rgw-writer", "writer", container_port(writer, "metrics"))},
    }
    assert set(expected) == JOBS
    assert scraped_ports(docs) == expected
    for monitor in of_kind(docs, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"


# ---------------------------------------------------------------------------------------------------------------
# Services, autoscaling, disruption budget
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", ALL)
def test_grpc_services_reach_the_gateway_port(kustomization: str) -> None:
    docs = render(kustomization)
    template, container = workload_container(docs, "Deployment", "rgw-gateway")
    for name, headless in (("rgw-gateway", False), ("rgw-gateway-headless", True)):
        service = named(docs, "Service", name)
        assert (service["spec"].get("clusterIP") == "None") is headless, name
        assert matches(service["spec"]["selector"], labels(template)), name
        [port] = service["spec"]["ports"]
        assert port["port"] == 50051 and port["targetPort"] in ("grpc", container_port(container, "grpc")), name
    # No Service selects the gateway together with another workload's pods.
    for service in of_kind(docs, "Service"):
        selected = [w for w, t in pod_templates(docs) if matches(service["spec"].get("selector", {}), labels(t))]
        assert len(selected) <= 1, service["metadata"]["name"]


@pytest.mark.parametrize("kustomization", ALL)
def test_gateway_autoscales_on_cpu_and_keeps_replicas_through_disruptions(kustomization: str) -> None:
    docs = render(kustomization)
    template, _ = workload_container(docs, "Deployment", "rgw-gateway")
    assert "replicas" not in named(docs, "Deployment", "rgw-gateway")["spec"], "the HPA owns the replica count"
    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rgw-gateway"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    [pdb] = of_kind(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels(template))
    # A budget that allows no eviction at the minimum replica count would block every node drain.
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]
    else:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_prod_runs_more_gateways_than_dev() -> None:
    def bounds(overlay: str) -> tuple[int, int]:
        [hpa] = of_kind(render(overlay), "HorizontalPodAutoscaler")
        return hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]

    assert bounds(DEV) == (1, 2)
    assert bounds(PROD)[0] >= 3 and bounds(PROD)[1] > bounds(BASE)[1]
    assert named(render(PROD), "Deployment", "rgw-writer")["spec"]["replicas"] >= 2


# ---------------------------------------------------------------------------------------------------------------
# Configuration and secrets
# ---------------------------------------------------------------------------------------------------------------

SECRET_SETTINGS = {"RGW_CODE_KEYS", "RGW_DATABASE_URL", "RGW_API_KEY"}


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
        password = re.match(r"^postgres(?:ql)?://[^:/@]+:([^@]*)@", values["RGW_DATABASE_URL"])
        assert password and password.group(1) == PLACEHOLDER
        assert PLACEHOLDER in json.dumps(secret["metadata"].get("annotations", {}))


@pytest.mark.parametrize("kustomization", (BASE, PROD))
def test_placeholder_secrets_fail_closed(kustomization: str) -> None:
    """Deployed unfilled, the rgw processes refuse to start instead of running with a made-up key."""
    docs = render(kustomization)
    _, container = workload_container(docs, "Deployment", "rgw-gateway")
    with pytest.raises(SettingsError, match="RGW_CODE_KEYS"):
        Settings.from_env(container_env(docs, container))


def test_dev_configuration_is_complete_and_valid() -> None:
    """The dev overlay runs as rendered: every rgw container's environment passes the settings validation."""
    docs = render(DEV)
    for kind, name in (("Deployment", "rgw-gateway"), ("Deployment", "rgw-writer"), ("Job", "rgw-migrate")):
        _, container = workload_container(docs, kind, name)
        settings = Settings.from_env(container_env(docs, container))
        assert settings.keyring()
    [secret] = of_kind(docs, "Secret")
    values = secret_values(secret)
    assert all(any(marker in value for marker in DEV_MARKERS) for value in values.values()), values
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


# ---------------------------------------------------------------------------------------------------------------
# Data stores: StatefulSets in dev only, a durable non-evicting Redis
# ---------------------------------------------------------------------------------------------------------------


def test_statefulsets_only_in_dev() -> None:
    assert {s["metadata"]["name"] for s in of_kind(render(DEV), "StatefulSet")} == {"rgw-redis", "rgw-postgres"}
    for kustomization in (BASE, PROD):
        docs = render(kustomization)
        assert of_kind(docs, "StatefulSet") == []
        images = [container["image"] for _, _, container in all_containers(docs)]
        assert not [image for image in images if re.match(r"^(.*/)?(redis|postgres)(:|@|$)", image)]


def flags(args: list[str]) -> dict[str, str]:
    """--name value pairs of a redis-server command line."""
    pairs: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            pairs[arg[2:]] = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
    return pairs


def test_dev_redis_is_durable_and_never_evicts() -> None:
    docs = render(DEV)
    redis = named(docs, "StatefulSet", "rgw-redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"].split(":")[0] == "redis" and container["image"].split(":")[1].startswith("7")
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[0] == "redis-server"
    options = flags(command)
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] == "always"
    assert options["maxmemory-policy"] == "noeviction"
    # The append-only file lives on the claimed volume.
    claims = {claim["metadata"]["name"] for claim in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[options.get("dir", "/data")] in claims
    postgres = named(docs, "StatefulSet", "rgw-postgres")
    [pg] = postgres["spec"]["template"]["spec"]["containers"]
    assert pg["image"] == "postgres:15"
    pgdata = {var["name"]: var.get("value") for var in pg["env"]}["PGDATA"]
    pg_mounts = {m["mountPath"]: m["name"] for m in pg["volumeMounts"]}
    claim_mounts = [
        path
        for path, name in pg_mounts.items()
        if name in {c["metadata"]["name"] for c in postgres["spec"]["volumeClaimTemplates"]}
    ]
    assert any(pgdata.startswith(path.rstrip("/") + "/") for path in claim_mounts)


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


# ---------------------------------------------------------------------------------------------------------------
# Network policies
# ---------------------------------------------------------------------------------------------------------------

MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def policies_for(docs: list[Doc], template: Doc) -> list[Doc]:
    return [
        p for p in of_kind(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"]["matchLabels"], labels(template))
    ]


def rule_ports(rule: Doc) -> set[tuple[str, int]]:
    return {(port.get("protocol", "TCP"), int(port["port"])) for port in rule.get("ports", [])}


@pytest.mark.parametrize("kustomization", ALL)
def test_network_policies_allow_only_what_each_process_needs(kustomization: str) -> None:
    docs = render(kustomization)
    needs = {
        "rgw-gateway": {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 5432)},
        "rgw-writer": {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 5432)},
        "rgw-migrate": {("UDP", 53), ("TCP", 53), ("TCP", 5432)},
    }
    for workload, template in pod_templates(docs):
        name = workload["metadata"]["name"]
        if name not in needs:
            continue
        policies = policies_for(docs, template)
        assert policies, f"{name}: no NetworkPolicy (default allow)"
        assert all(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies), name
        ingress = [rule for p in policies for rule in p["spec"].get("ingress", [])]
        egress = [rule for p in policies for rule in p["spec"].get("egress", [])]
        # Every rule names its ports: none opens everything.
        assert all(rule.get("ports") for rule in [*ingress, *egress]), name
        assert set().union(*(rule_ports(rule) for rule in egress)) == needs[name], name
        metrics = {
            ("TCP", p["containerPort"])
            for c in containers(template)
            for p in c.get("ports", [])
            if p["name"].startswith("metrics")
        }
        for rule in ingress:
            if rule_ports(rule) & metrics:
                # Metrics ports only from the monitoring namespace, in rules that open nothing else.
                assert rule_ports(rule) <= metrics and rule.get("from") == [MONITORING], (name, rule)
        opened = set().union(set(), *(rule_ports(rule) for rule in ingress))
        assert opened >= metrics, name
        if name == "rgw-gateway":
            grpc = [rule for rule in ingress if rule_ports(rule) == {("TCP", 50051)}]
            assert grpc and all(rule.get("from") for rule in grpc), "gRPC ingress must name its sources"
            assert opened == metrics | {("TCP", 50051)}
        else:
            assert opened == metrics, name


def test_prod_lets_the_pos_networks_reach_grpc() -> None:
    [policy] = [p for p in of_kind(render(PROD), "NetworkPolicy") if p["metadata"]["name"] == "rgw-gateway"]
    blocks = [
        peer["ipBlock"]["cidr"]
        for rule in policy["spec"]["ingress"]
        if rule_ports(rule) == {("TCP", 50051)}
        for peer in rule["from"]
        if "ipBlock" in peer
    ]
    assert blocks and "0.0.0.0/0" not in blocks


# ---------------------------------------------------------------------------------------------------------------
# The container image: the wheel, the Dockerfile, .dockerignore, the runtime lock
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The project's wheel, built the way the Dockerfile builds it."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [built] = out.glob("redemption_gateway-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_the_runtime_files_and_no_dev_stack_or_tests(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert not [n for n in names if n.startswith(("gateway/dev/", "tests/", "loadtest/", "scripts/"))]
    lua = {path.name for path in (ROOT / "gateway" / "lua").glob("*.lua")}
    assert lua and {f"gateway/lua/{name}" for name in lua} <= names
    migrations = {path.name for path in (ROOT / "gateway" / "db" / "migrations").glob("*.sql")}
    assert migrations and {f"gateway/db/migrations/{name}" for name in migrations} <= names
    generated = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "gateway" / "pb").rglob("*")
        if path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts
    }
    assert any(name.endswith("_pb2.py") for name in generated) and any(
        name.endswith("_pb2_grpc.py") for name in generated
    )
    assert generated <= names
    assert {"gateway/cli.py", "risk/engine.py"} <= names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "rgw = gateway.cli:main" in wheel.read(entry_points).decode()


def test_no_module_in_the_wheel_imports_the_dev_stack(wheel: zipfile.ZipFile) -> None:
    offenders = []
    for name in wheel.namelist():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(wheel.read(name), filename=name)):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            if any(m == "gateway.dev" or m.startswith("gateway.dev.") for m in modules):
                offenders.append(name)
    assert offenders == [], "the image has no gateway.dev"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def dockerfile_stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(image, stage name, instructions) per FROM, with ARG defaults given before the first FROM substituted."""
    args: dict[str, str] = {}
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            args[name] = default
        elif instruction == "FROM":
            words = arguments.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {arguments}"
            stages.append((image, words[2], []))
        else:
            assert stages or instruction in ("ARG",), instruction
            stages[-1][2].append((instruction, arguments))
    return stages


def test_dockerfile_is_multi_stage_and_the_runtime_gets_only_the_venv() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    names = [name for _, name, _ in stages]
    image, _, instructions = stages[-1]
    assert image == "python:3.11-slim"
    assert all(stage_image == "python:3.11-slim" for stage_image, _, _ in stages), "the venv needs the same Python"
    copies = [args for instruction, args in instructions if instruction in ("COPY", "ADD")]
    assert copies, "the runtime stage copies the venv"
    for args in copies:
        words = args.split()
        assert words[0].startswith("--from=") and words[0].removeprefix("--from=") in names[:-1], args
        assert words[1:] == ["/opt/venv", "/opt/venv"], args
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert not re.search(r"\bpip\b|\buv\b|apt-get install", runs), "nothing is installed into the runtime stage"


def test_dockerfile_builder_installs_hash_checked_locks_and_the_wheel() -> None:
    stages = dockerfile_stages()
    builder = " ".join(args for _, _, instructions in stages[:-1] for i, args in instructions if i == "RUN")
    installs = [shlex.split(cmd) for cmd in re.split(r"&&|;", builder) if re.search(r"\bpip\b.*\binstall\b", cmd)]
    locked = [words for words in installs if "-r" in words]
    assert {words[words.index("-r") + 1] for words in locked} == {"requirements.lock", "requirements-runtime.lock"}
    assert all("--require-hashes" in words for words in locked)
    # The runtime venv gets the runtime lock only (the dev lock is for the throw-away build venv).
    runtime = [w for w in locked if "/opt/venv/bin/python" in w]
    assert [w[w.index("-r") + 1] for w in runtime] == ["requirements-runtime.lock"]
    assert re.search(r"pip wheel --no-deps --no-build-isolation", builder)
    assert re.search(r"--python /opt/venv/bin/python install --no-deps /wheels/\*\.whl", builder)
    assert "--group" not in builder and "-e ." not in builder


def test_dockerfile_runs_rgw_as_a_numeric_non_root_user() -> None:
    instructions = dockerfile_stages()[-1][2]
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) > 0, "USER must be numeric (runAsNonRoot can only verify a number)"
    assert not group or (group.isdigit() and int(group) > 0)
    # The Kubernetes manifests run as that very user.
    for _, template, container in all_containers(render(BASE)):
        context = {**template["spec"].get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsUser"] == int(user)
    commands = dict((i, a) for i, a in instructions if i in ("ENTRYPOINT", "CMD"))
    assert json.loads(commands["ENTRYPOINT"]) == ["rgw"]
    assert json.loads(commands["CMD"]) == ["serve"]
    exposed = {int(port.split("/")[0]) for i, a in instructions if i == "EXPOSE" for port in a.split()}
    assert exposed >= {50051, 9108}
    all_args = " ".join(a for _, _, stage in dockerfile_stages() for i, a in stage if i in ("COPY", "ADD"))
    assert "gateway/dev" not in all_args and "tests" not in all_args.split()


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins; a pattern that matches a
    parent directory matches everything under it)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    for path in (
        "tests/conftest.py",
        "gateway/dev/run.py",
        ".venv/bin/python",
        ".git/HEAD",
        "loadtest/run_loadtest.py",
        "deploy/k8s/base/kustomization.yaml",
        ".local/code-keys",
        "gateway/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(path), path
    copied = [
        args.split()[:-1]
        for _, _, stage in dockerfile_stages()
        for instruction, args in stage
        if instruction in ("COPY", "ADD") and not args.startswith("--from")
    ]
    for sources in copied:
        for source in sources:
            paths = (
                [source]
                if (ROOT / source).is_file()
                else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
            )
            assert paths
            for path in paths:
                if "/dev/" not in path and "__pycache__" not in path:
                    assert not dockerignored(path), f"{path} is copied but not in the build context"
    assert not dockerignored("gateway/lua/redeem.lua") and not dockerignored("gateway/db/migrations/0001_x.sql")


def lock_pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.MULTILINE))
    # Every pinned requirement has hashes (pip --require-hashes).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    assert all("--hash=sha256:" in block for block in blocks), f"{path.name}: a requirement without hashes"
    return {canonicalize_name(name): version for name, version in pins.items()}


def test_runtime_lock_has_the_runtime_dependencies_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = lock_pins(ROOT / "requirements-runtime.lock")
    full = lock_pins(ROOT / "requirements.lock")
    dependencies = {canonicalize_name(Requirement(r).name) for r in project["project"]["dependencies"]}
    dev = {canonicalize_name(Requirement(r).name) for r in project["dependency-groups"]["dev"]}
    assert dependencies <= set(runtime)
    assert not (dev | DEV_TOOLS) & set(runtime), (dev | DEV_TOOLS) & set(runtime)
    # The image runs the very versions the tests run.
    assert {name: full.get(name) for name in runtime} == runtime
    assert "requirements-runtime.lock" in (ROOT / "Makefile").read_text().split("\nlock:", 1)[1].split("\n\n")[0]


def test_wheel_leaves_out_gateway_dev_but_the_editable_install_keeps_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "hatchling.build"
    assert "gateway/dev" in project["tool"]["hatch"]["build"]["targets"]["wheel"]["exclude"]
    import gateway.dev.run  # noqa: F401 - `make run` and the test fixtures need it
