"""What SRE sees of a running gateway: the RED metrics and outcome counters move as calls are answered, the
request id comes back in trailing metadata, every RPC gets one access-log line, and health names the component
that is down (the live scrape of real processes is in test_metrics_live.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from gateway import codes
from gateway.clock import ManualClock
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.logs import JsonFormatter
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.integration.conftest import Issue, RunningGateway, Tenants
from tests.integration.grpc_helpers import gateway_on_own_redis, health_status, initialise, redeem_request, until_health

SERVICE = "redemption.v1.RedemptionService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def value(name: str, **labels: str) -> float:
    """The current value of one series in this process's registry (0 when it has no sample yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """Series values before a step; `moved()` says how each changed."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self._series = series
        self._before = [value(name, **labels) for name, labels in series]

    def moved(self) -> list[float]:
        return [
            value(name, **labels) - before for (name, labels), before in zip(self._series, self._before, strict=True)
        ]


def handled(method: str, code: str, grpc_type: str = "unary") -> tuple[str, dict[str, str]]:
    labels = {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return "grpc_server_handled_total", labels


def outcome(method: str, name: str, reason: str) -> tuple[str, dict[str, str]]:
    return "rgw_redemption_outcomes_total", {"method": method, "outcome": name, "reason": reason}


def per_method(metric: str, method: str, grpc_type: str = "unary") -> tuple[str, dict[str, str]]:
    return metric, {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method}


async def test_a_redemption_a_decline_a_risk_denial_and_a_bad_request_move_their_series(
    gateway: RunningGateway, issue: Issue
) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    first = Deltas(
        handled("Redeem", "OK"),
        outcome("Redeem", "redeemed", "REDEEMED"),
        per_method("grpc_server_started_total", "Redeem"),
        per_method("grpc_server_msg_received_total", "Redeem"),
        per_method("grpc_server_msg_sent_total", "Redeem"),
        per_method("grpc_server_handling_seconds_count", "Redeem"),
        ("rgw_redis_script_seconds_count", {"script": "redeem"}),
    )
    assert (await gateway.stub.Redeem(redeem_request(code, "k1"))).outcome == pb.OUTCOME_REDEEMED
    assert first.moved() == [1, 1, 1, 1, 1, 1, 1]

    decline = Deltas(handled("Redeem", "OK"), outcome("Redeem", "already_redeemed", "NO_USES_LEFT"))
    assert (await gateway.stub.Redeem(redeem_request(code, "k2"))).outcome == pb.OUTCOME_ALREADY_REDEEMED
    assert decline.moved() == [1, 1]

    # till-1 is registered at store-1: presenting it at store-2 is denied by the default policy
    denial = Deltas(
        outcome("Redeem", "risk_denied", "TERMINAL_STORE_MISMATCH"),
        (
            "rgw_risk_decisions_total",
            {"rule": "terminal_store", "reason": "TERMINAL_STORE_MISMATCH", "mode": "enforce"},
        ),
    )
    denied = await gateway.stub.Redeem(redeem_request(issued.codes[0], "k3", store="store-2"))
    assert denied.outcome == pb.OUTCOME_RISK_DENIED
    assert denial.moved() == [1, 1]

    bad = Deltas(handled("Redeem", "InvalidArgument"), handled("Redeem", "OK"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Redeem(redeem_request("", "k4"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.moved() == [1, 0]


async def test_an_unknown_key_counts_as_an_auth_failure(gateway: RunningGateway) -> None:
    refused = Deltas(("rgw_auth_failures_total", {"kind": "unauthenticated"}), handled("Redeem", "Unauthenticated"))
    channel = authenticated_channel(gateway.target, "rgw_test_" + "a" * 12 + "_" + "b" * 32)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RedemptionServiceStub(channel).Redeem(redeem_request("x", "k"))
    finally:
        await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.moved() == [1, 1]


async def test_stream_items_are_counted_one_by_one(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(2)
    unknown = codes.generate(codes.Route(issued.campaign.id, 0))
    items = [redeem_request(c, f"s{i}") for i, c in enumerate([*issued.codes, unknown])]
    items.append(redeem_request(issued.codes[0], "bad key!"))  # an item the gateway refuses: an ItemError
    moved = Deltas(
        outcome("RedeemStream", "redeemed", "REDEEMED"),
        outcome("RedeemStream", "not_found", "CODE_NOT_FOUND"),
        ("rgw_stream_item_errors_total", {"grpc_code": "InvalidArgument"}),
        per_method("grpc_server_msg_received_total", "RedeemStream", "bidi_stream"),
        per_method("grpc_server_msg_sent_total", "RedeemStream", "bidi_stream"),
        handled("RedeemStream", "OK", "bidi_stream"),
    )

    async def requests() -> object:
        yield pb.RedeemStreamRequest(batch_id="b1", items=items[:2])
        yield pb.RedeemStreamRequest(batch_id="b2", items=items[2:])

    replies = [reply async for reply in gateway.stub.RedeemStream(requests())]
    assert [len(r.results) for r in replies] == [2, 2]
    assert moved.moved() == [2, 1, 1, 2, 2, 1]


async def test_the_request_id_comes_back_in_trailing_metadata_on_answers_and_faults(
    gateway: RunningGateway, issue: Issue
) -> None:
    issued = await issue(1)
    channel = gateway.channel_as("internal", x_request_id="pos-42.till-1:7")
    try:
        stub = pb_grpc.RedemptionServiceStub(channel)
        call = stub.Redeem(redeem_request(issued.codes[0], "k1"))
        await call
        assert ("x-request-id", "pos-42.till-1:7") in tuple(await call.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Redeem(redeem_request("", "k2"))  # an abort replaces the trailers: the id must survive it
        assert ("x-request-id", "pos-42.till-1:7") in tuple(info.value.trailing_metadata())
    finally:
        await channel.close()
    call = gateway.stub.Validate(pb.ValidateRequest(code=issued.codes[0], store_id="store-1", terminal_id="till-1"))
    await call
    generated = dict(tuple(await call.trailing_metadata()))["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    odd = gateway.channel_as("internal", x_request_id="not an id; " + "x" * 80)
    try:
        call = pb_grpc.RedemptionServiceStub(odd).Validate(pb.ValidateRequest(code=issued.codes[0]))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        replaced = dict(tuple(await call.trailing_metadata()))["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced)  # never echoed into logs or trailers
    finally:
        await odd.close()


async def test_one_access_log_line_per_rpc_without_codes_or_keys(
    gateway: RunningGateway, issue: Issue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rgw.access")
    issued = await issue(2)
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "k1"))
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "k2"))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Redeem(redeem_request(issued.codes[1], "bad key!"))
    lines = [r for r in caplog.records if r.name == "rgw.access"]
    assert len(lines) == 3
    docs = [json.loads(JsonFormatter().format(r)) for r in lines]
    assert [(d["method"], d["code"], d["outcome"], d["reason"]) for d in docs] == [
        ("Redeem", "OK", "redeemed", "REDEEMED"),
        ("Redeem", "OK", "already_redeemed", "NO_USES_LEFT"),
        ("Redeem", "InvalidArgument", "", ""),
    ]
    internal = gateway.tenants.clients["internal"]
    assert all(d["brand"] == 1 and d["client"] == internal and d["duration_ms"] > 0 for d in docs)
    assert all(re.fullmatch(r"[0-9a-f]{32}", d["request_id"]) for d in docs)
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert not any(c in text for c in issued.codes)
    assert gateway.tenants.keys["internal"] not in text


@pytest.mark.slow
async def test_health_names_the_component_that_is_down_and_a_fault_is_counted(
    tmp_path: Path, migrated: str, clock: ManualClock, tenants: Tenants
) -> None:
    async with gateway_on_own_redis(tmp_path / "redis", migrated, clock, tenants.keys["internal"]) as (
        server,
        channel,
    ):
        for name in ("", SERVICE, "rgw.live", "rgw.redis", "rgw.redis_hot", "rgw.registry"):
            assert await health_status(channel, name) == SERVING, name
        assert value("rgw_dependency_up", dependency="redis") == 1
        server.kill()
        await until_health(channel, NOT_SERVING, "rgw.redis")
        assert await health_status(channel, "") == NOT_SERVING
        assert await health_status(channel, SERVICE) == NOT_SERVING
        assert await health_status(channel, "rgw.registry") == SERVING  # the registry is in memory: not what broke
        assert await health_status(channel, "rgw.live") == SERVING  # a liveness probe must not restart the pod for this
        assert value("rgw_dependency_up", dependency="redis") == 0
        fault = Deltas(handled("Redeem", "Unavailable"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RedemptionServiceStub(channel).Redeem(redeem_request(codes.generate(codes.Route(1, 0)), "k"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fault.moved() == [1]
        server.restart()
        await until_health(channel, NOT_SERVING, "rgw.redis")  # back, but empty: not initialised from Postgres
        await initialise(server.url)
        await until_health(channel, SERVING, "")
        assert value("rgw_dependency_up", dependency="redis") == 1
