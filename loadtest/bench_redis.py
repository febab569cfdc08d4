"""Redis' own ceiling for the redeem script: redis-benchmark EVALSHA, unpipelined and pipelined, on preloaded
codes (random refs; most calls redeem a fresh code, repeats decline), against the benchmark's Redis (AOF
appendfsync always) - once with a campaign without rules and once with every campaign rule on (paused flag, a
life after issue, allowed stores, redemption hours in a DST zone, count and value budgets): the rules' cost."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import redis as redis_sync

from gateway import keys
from gateway.campaigns.model import Campaign
from gateway.campaigns.publish import meta_fields
from gateway.campaigns.schedule import HoursWindow, offset_table
from gateway.dev.servers import RedisServer
from gateway.script_calls import ITEM_ARGS, SCRIPT_ARGS, load_lua, script_head
from loadtest.procstat import cpu_seconds

CAMPAIGN = 999_999
KEYSPACE = 200_000
# redis-benchmark fills each __rand_int__ with its own random 12 digits, so a code's bucket cannot follow its ref:
# every benchmark code lives in bucket "0000" (a hashtable of KEYSPACE fields here, a listpack of ~15 in
# production - a hash lookup either way) with ref "0000" + 12 digits + padding.
REF = "0000__rand_int__" + "0" * 48
# Issues KEYSPACE codes (their bucket fields) in one call.
PRELOAD = """
for i = 0, tonumber(ARGV[1]) - 1 do
  redis.call('HSET', KEYS[1], string.format('%012d', i) .. '00000000', ARGV[2])
end
return 1"""
STORE = "s"


def meta(rules: bool, now_ms: int) -> dict[str, str | int]:
    """The campaign's meta hash (layout.META), published as gateway/campaigns/publish.py does."""
    campaign = Campaign(CAMPAIGN, "bench", datetime(2020, 1, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC), 1, 1,
                        "bench", 1)  # fmt: skip
    if rules:
        every_day = HoursWindow(days=(), start_min=0, end_min=1440)
        campaign = replace(campaign, valid_days=3650, budget_count=10**12, budget_value=10**15, face_value=100,
                           currency="CNY", time_zone="Europe/London", redemption_hours=(every_day,),
                           allowed_stores=(STORE,))  # fmt: skip
    fields = {name: value for name, value in meta_fields(campaign).items() if isinstance(name, str)}
    if rules:  # the offsets over the whole century would be long; a real campaign's are a few entries
        fields["tz"] = offset_table(campaign.time_zone, now_ms - 86_400_000, now_ms + 86_400_000)
    return {name: value for name, value in fields.items() if isinstance(value, str | int)}


def script_args(now_ms: int) -> list[str]:
    """One redemption's ARGV in the layout gateway/redis_store.py defines (random parts filled by redis-benchmark)."""
    scalar = {"mode": "redeem", "now_ms": str(now_ms), "candidates": "1",
              "campaign": str(CAMPAIGN), "shard": "0", "brand": "1", "key_ids": "bench"}  # fmt: skip
    item = {"idem": "i:__rand_int__", "legacy_idem": "i:none", "fp": "fp", "rid": "rid-__rand_int__",
            "caller": "cl/t", "client": "cl", "store": STORE, "term": "t", "dev": "d", "lat": "31.2", "lon": "121.4",
            "acc": "10", "risk": ""}  # fmt: skip  # no risk plan: the script alone, as with RGW_RISK_ENGINE=false
    return [scalar[name] for name in SCRIPT_ARGS] + [item[name] for name in ITEM_ARGS]


def _run(port: int, sha: str, requests: int, pipeline: int, now_ms: int) -> dict[str, Any]:
    script_keys = [
        *script_head(CAMPAIGN, 0, now_ms),
        keys.bucket_key(CAMPAIGN, 0, REF),
        keys.code_key(CAMPAIGN, 0, REF),
    ]
    command = [
        "redis-benchmark", "-p", str(port), "-n", str(requests), "-c", "50", "-P", str(pipeline), "-r", str(KEYSPACE),
        "--csv", "EVALSHA", sha, str(len(script_keys)), *script_keys, *script_args(now_ms),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)  # noqa: S603
    rows = [line for line in done.stdout.splitlines() if line.startswith('"EVALSHA')]
    values = re.findall(r'"([\d.]+)"', rows[-1]) if rows else []
    # --csv columns: rps, avg, min, p50, p95, p99, max (latencies in ms)
    numbers = [float(v) for v in values] + [0.0] * 7
    return {"pipeline": pipeline, "requests": requests, "rps": numbers[0], "p50_ms": numbers[3], "p99_ms": numbers[5]}


def redis_ceiling(server: RedisServer, requests: int) -> dict[str, Any]:
    """Throughput and Redis CPU per call of EVALSHA redeem, with and without pipelining, without campaign rules
    and with every rule on (alternating, so both see the same machine)."""
    if shutil.which("redis-benchmark") is None:
        return {"skipped": "redis-benchmark is not installed"}
    client = redis_sync.Redis(port=server.port, decode_responses=True)
    try:
        sha = client.script_load(load_lua("redeem.lua"))
        results = []
        for pipeline in (1, 32):
            for rules in (False, True):
                now_ms = int(time.time() * 1000)
                _reset(client, rules, now_ms)
                before = cpu_seconds(server.pid)
                result = _run(server.port, sha, requests, pipeline, now_ms)
                result["rules"] = rules
                result["redis_cpu_us_per_call"] = round((cpu_seconds(server.pid) - before) / requests * 1e6, 1)
                results.append(result)
        return {"runs": results, "keyspace": KEYSPACE, "rules_cpu_ratio": _rules_ratio(results)}
    finally:
        client.close()


def _reset(client: redis_sync.Redis, rules: bool, now_ms: int) -> None:
    """A fresh campaign shard: its meta, KEYSPACE unredeemed codes, an empty outbox and budget."""
    tag = keys.shard_tag(CAMPAIGN, 0)
    stale = list(client.scan_iter(match=f"{keys.PREFIX}:{tag}:*", count=10_000))
    for start in range(0, len(stale), 10_000):
        client.delete(*stale[start : start + 10_000])
    client.hset(keys.meta_key(CAMPAIGN, 0), mapping=meta(rules, now_ms))  # type: ignore[arg-type]
    if rules:
        client.hset(keys.budget_key(CAMPAIGN, 0), mapping={"n": 10**12, "v": 10**15})
        client.sadd(keys.stores_key(CAMPAIGN, 0), "", STORE)
    client.eval(PRELOAD, 1, keys.bucket_key(CAMPAIGN, 0, REF), KEYSPACE, now_ms // 1000)


def _rules_ratio(results: list[dict[str, Any]]) -> dict[str, float]:
    """Redis CPU per call with every rule on / without rules, per pipeline depth."""
    by = {(r["pipeline"], r["rules"]): r["redis_cpu_us_per_call"] for r in results}
    return {str(p): round(by[(p, True)] / by[(p, False)], 2) for p in (1, 32) if by.get((p, False))}
