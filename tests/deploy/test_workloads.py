"""The rendered workloads: security context, resources, commands, probes, shutdown timing, spreading, autoscaling
and disruption budget, and the development data stores (StatefulSets, a durable non-evicting Redis).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.manifests import (
    ALL,
    BASE,
    DEV,
    PROD,
    Doc,
    all_containers,
    container_env,
    container_port,
    labels,
    matches,
    named,
    of_kind,
    port_of,
    render,
    workload_container,
)

# The operations contract (issue 10): gRPC health service names.
READY_SERVICE = "redemption.v1.RedemptionService"
LIVE_SERVICE = "rgw.live"
WRITER_READY_SERVICE = ""


# ---------------------------------------------------------------------------------------------------------------
# Pods: security, resources, commands, probes, shutdown
# ---------------------------------------------------------------------------------------------------------------


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
# Autoscaling, disruption budget
# ---------------------------------------------------------------------------------------------------------------


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
