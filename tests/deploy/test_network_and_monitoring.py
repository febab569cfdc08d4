"""The rendered networking and monitoring objects: metrics ports, ServiceMonitors and their job labels, Services,
NetworkPolicies.
"""

from __future__ import annotations

import pytest

from tests.deploy.manifests import (
    ALL,
    PROD,
    Doc,
    container_env,
    container_port,
    containers,
    labels,
    matches,
    named,
    of_kind,
    pod_templates,
    port_of,
    render,
    workload_container,
)

# The operations contract (issue 10): Prometheus job labels.
JOBS = {"rgw-gateway", "rgw-writer"}


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
# Services
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
