"""Redis' own ceiling for the redeem script: redis-benchmark EVALSHA, unpipelined and pipelined, on preloaded
code hashes (random keys; most calls redeem a fresh code, repeats decline), against the benchmark's Redis
(AOF appendfsync always)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Any

import redis as redis_sync

from gateway import keys
from gateway.dev.servers import RedisServer
from gateway.redis_store import ITEM_ARGS, SCRIPT_ARGS, load_lua
from loadtest.procstat import cpu_seconds

CAMPAIGN = 999_999
KEYSPACE = 200_000
# Creates KEYSPACE code hashes named like redis-benchmark's __rand_int__ (12 digits) in one call.
PRELOAD = """
for i = 0, tonumber(ARGV[1]) - 1 do
  redis.call('HSET', KEYS[1] .. string.format('%012d', i), 'cid', ARGV[2], 'kid', 'bench', 'uses', 1,
    'used', 0, 'seq', 0, 'vf', 0, 'vu', 9999999999999)
end
return 1"""


def script_args(now_ms: int) -> list[str]:
    """One redemption's ARGV in the layout gateway/redis_store.py defines (random parts filled by redis-benchmark)."""
    scalar = {"mode": "redeem", "now_ms": str(now_ms), "candidates": "1",
              "campaign": str(CAMPAIGN), "shard": "0", "brand": "1"}  # fmt: skip
    item = {"idem": "i:__rand_int__", "legacy_idem": "i:none", "fp": "fp", "rid": "rid-__rand_int__",
            "caller": "cl/t", "client": "cl", "store": "s", "term": "t", "dev": "d", "lat": "31.2", "lon": "121.4",
            "acc": "10", "risk": ""}  # fmt: skip  # no risk plan: the script alone, as with RGW_RISK_ENGINE=false
    return [scalar[name] for name in SCRIPT_ARGS] + [item[name] for name in ITEM_ARGS]


def _run(port: int, sha: str, requests: int, pipeline: int) -> dict[str, Any]:
    code_prefix = keys.code_key(CAMPAIGN, 0, "")
    now_ms = int(time.time() * 1000)
    stats = keys.stats_key(CAMPAIGN, 0, keys.stats_minute(now_ms))  # KEYS: meta, outbox, counters, the code
    command = [
        "redis-benchmark", "-p", str(port), "-n", str(requests), "-c", "50", "-P", str(pipeline), "-r", str(KEYSPACE),
        "--csv", "EVALSHA", sha, "4", keys.meta_key(CAMPAIGN, 0), keys.outbox_key(CAMPAIGN, 0), stats,
        code_prefix + "__rand_int__", *script_args(now_ms),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)  # noqa: S603
    rows = [line for line in done.stdout.splitlines() if line.startswith('"EVALSHA')]
    values = re.findall(r'"([\d.]+)"', rows[-1]) if rows else []
    # --csv columns: rps, avg, min, p50, p95, p99, max (latencies in ms)
    numbers = [float(v) for v in values] + [0.0] * 7
    return {"pipeline": pipeline, "requests": requests, "rps": numbers[0], "p50_ms": numbers[3], "p99_ms": numbers[5]}


def redis_ceiling(server: RedisServer, requests: int) -> dict[str, Any]:
    """Throughput and Redis CPU per call of EVALSHA redeem, with and without pipelining."""
    if shutil.which("redis-benchmark") is None:
        return {"skipped": "redis-benchmark is not installed"}
    client = redis_sync.Redis(port=server.port)
    try:
        sha = client.script_load(load_lua("redeem.lua"))
        client.hset(keys.meta_key(CAMPAIGN, 0), mapping={"vf": 0, "vu": 9_999_999_999_999})
        results = []
        for pipeline in (1, 32):
            client.eval(PRELOAD, 1, keys.code_key(CAMPAIGN, 0, ""), KEYSPACE, CAMPAIGN)
            before = cpu_seconds(server.pid)
            result = _run(server.port, sha, requests, pipeline)
            result["redis_cpu_us_per_call"] = round((cpu_seconds(server.pid) - before) / requests * 1e6, 1)
            results.append(result)
            client.delete(keys.outbox_key(CAMPAIGN, 0))
        return {"runs": results, "keyspace": KEYSPACE}
    finally:
        client.close()
