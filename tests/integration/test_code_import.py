"""`rgw codes import` (gateway/campaigns/importing.py, directory.py): brand-supplied codes are checked row by row
(refused whole, by line number, never echoing a code), stored like generated ones plus a directory entry, redeem
like generated ones, and - with generated codes beside them - never leave plaintext in Redis, Postgres or logs."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import codes, issuance, keys
from gateway.campaigns import issuance as batches
from gateway.campaigns.directory import find_route
from gateway.campaigns.importing import ImportRefused, import_file, read_rows
from gateway.coderefs import KeyRing
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import T0_MS, gateway_environ
from tests.integration.conftest import DAY_MS, RunningGateway, at
from tests.integration.grpc_helpers import redeem_request
from tests.integration.issuance_helpers import bucket_fields, issued, postgres_refs, redis_refs, rgw

GOOD = """code,uses,face_value,valid_from,valid_until,bound_device
summer-2026-AAAA,,,,,
 summer 2026 bbbb ,3,,,,
SUMMER2026CCCC,,700,,,
SUMMER2026DDDD,,,,2026-06-15T00:00:00,
SUMMER2026EEEE,,,,,till-phone.7
"""


async def _campaign(db: asyncpg.Connection, redis: Redis, keyring: KeyRing, **rules: Any) -> issuance.Campaign:
    return await issuance.create_campaign(
        db, redis, keyring, name=f"import-{uuid.uuid4().hex[:8]}", valid_from=at(T0_MS - DAY_MS),
        valid_until=at(T0_MS + 30 * DAY_MS), **rules,
    )  # fmt: skip


def _file(tmp_path: Path, text: str, name: str = "codes.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _campaign_stub(**rules: Any) -> issuance.Campaign:
    return issuance.Campaign(7, "c", at(T0_MS - DAY_MS), at(T0_MS + DAY_MS), 1, 1, "k2", 1, **rules)


def test_rows_are_normalised_and_only_differences_from_the_campaign_kept() -> None:
    rows = read_rows(io.StringIO(GOOD + "summer2026ffff,1,0,,,\n"), _campaign_stub(currency="CNY"))
    assert [r.code for r in rows] == ["SUMMER2026AAAA", "SUMMER2026BBBB", "SUMMER2026CCCC", "SUMMER2026DDDD",
                                      "SUMMER2026EEEE", "SUMMER2026FFFF"]  # fmt: skip
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7]
    assert rows[1].own.spec() == "uses=3" and rows[2].own.spec() == "fv=700"
    assert rows[3].own.valid_until == at(T0_MS + 14 * DAY_MS) and rows[4].own.spec() == "dev=till-phone.7"
    assert rows[0].own.spec() == rows[5].own.spec() == ""  # uses 1 and face value 0 are the campaign's


def test_every_bad_row_is_named_by_its_line_and_never_shown() -> None:
    generated = codes.generate(codes.Route(5, 0))
    lines = [
        "code,uses,face_value,valid_until",
        "GOOD-CODE-0001,,,",  # 2: fine
        "AB1,,,",  # 3: too short
        "CAFÉ-CODE-0001,,,",  # 4: not ASCII
        "good code 0001,,,",  # 5: the same code as line 2, once normalised
        f"{generated.lower()},,,",  # 6: reads as a generated code
        "SECRET-CODE-0002,0,,",  # 7: uses
        "SECRET-CODE-0003,,5,",  # 8: a face value without the campaign's currency
        "SECRET-CODE-0004,,,yesterday",  # 9: not a time
        "SECRET-CODE-0005,,,2020-01-01",  # 10: ends before it starts
        "SECRET-CODE-0006,1",  # 11: a cell short
        "",  # 12: blank, skipped
        "SECRET-CODE-0007,,,",  # 13: fine
    ]
    with pytest.raises(ImportRefused) as refused:
        read_rows(io.StringIO("\n".join(lines) + "\n"), _campaign_stub())
    problems = refused.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10, 11)]
    assert "the same code as line 2" in problems[2]
    assert "generates" in problems[3] and "route" in problems[3]
    text = str(refused.value).upper().replace("-", "").replace(" ", "")
    for line in lines[1:]:
        code = line.split(",")[0].upper().replace("-", "").replace(" ", "")
        assert len(code) < 4 or code not in text


@pytest.mark.parametrize(
    ("header", "problem"),
    [("uses,face_value", "no `code` column"), ("code,colour", "unknown column 'colour'"), ("code,code", "twice")],
)
def test_a_bad_header_is_refused(header: str, problem: str) -> None:
    with pytest.raises(ImportRefused, match=problem):
        read_rows(io.StringIO(header + "\nABCD-1234\n"), _campaign_stub())


async def test_import_records_codes_and_directory_and_tells_every_gateway(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, shards=2, currency="CNY", face_value=100)
    version = await db.fetchval("SELECT version FROM registry_version")
    done = await import_file(db, redis, keyring, campaign, _file(tmp_path, GOOD), actor="tests")

    assert (done.codes, done.added) == (5, 5)
    assert await db.fetchval("SELECT state FROM code_batches WHERE id = $1", done.batch_id) == "active"
    assert await db.fetchval("SELECT kind FROM code_batches WHERE id = $1", done.batch_id) == "imported"
    assert await db.fetchval("SELECT imports_codes FROM brands WHERE id = 1")
    assert await db.fetchval("SELECT version FROM registry_version") == version + 1
    assert await db.fetchval("SELECT action FROM audit_log ORDER BY id DESC LIMIT 1") == "brand.imports_codes"
    assert await redis.get(keys.REGISTRY_VERSION) == str(version + 1)
    for shard in range(2):
        assert set(await redis_refs(redis, campaign.id, shard)) == await postgres_refs(db, campaign.id, shard)
    assert sum([await issued(redis, campaign.id, shard) for shard in range(2)]) == 5
    rows = {r["code_ref"].hex(): r for r in await db.fetch("SELECT * FROM issued_codes WHERE batch_id = $1",
                                                           done.batch_id)}  # fmt: skip
    for code, own in [("SUMMER2026AAAA", {}), ("SUMMER2026BBBB", {"uses": "3"}), ("SUMMER2026CCCC", {"fv": "700"}),
                      ("SUMMER2026DDDD", {"vu": str(T0_MS + 14 * DAY_MS)}),
                      ("SUMMER2026EEEE", {"dev": "till-phone.7"})]:  # fmt: skip
        ref = keyring.ref(campaign.key_id, campaign.id, code).ref
        shard = rows[ref]["shard"]
        assert await find_route(redis, keyring, 1, code) == codes.Route(campaign.id, shard)
        assert await redis.hgetall(keys.code_key(campaign.id, shard, ref)) == own
        entry = await db.fetchrow("SELECT * FROM code_directory WHERE code_ref = $1", bytes.fromhex(ref))
        assert (entry["brand_id"], entry["campaign_id"], entry["shard"], entry["key_id"]) == (1, campaign.id, shard,
                                                                                              "k2")  # fmt: skip
        assert entry["dir_ref"].hex() == keyring.dir_ref("k2", 1, code).ref
    assert await find_route(redis, keyring, 1, "SUMMER2026ZZZZ") is None
    assert await find_route(redis, keyring, 2, "SUMMER2026AAAA") is None  # another brand's directory


async def test_a_rotated_key_still_finds_codes_imported_before(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring)
    await import_file(db, redis, keyring, campaign, _file(tmp_path, "code\nOLD-KEY-0001\n"))
    rotated = KeyRing({"k1": bytes(range(100, 132)), "k2": bytes(range(32))}, "k1")
    assert await find_route(redis, rotated, 1, "OLDKEY0001") == codes.Route(campaign.id, 0)


async def test_codes_the_brand_has_already_are_refused_by_line(
    db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, keyring: KeyRing, tmp_path: Path
) -> None:
    first = await _campaign(db, redis, keyring)
    await import_file(db, redis, keyring, first, _file(tmp_path, "code\nKEEP-0001\nKEEP-0002\n"))
    second = await _campaign(db, redis, keyring)
    path = _file(tmp_path, "code\nNEW-0001\nkeep 0002\nNEW-0002\n", "again.csv")

    result = rgw(gateway_environ(redis_url, migrated), "codes", "import", "--campaign", str(second.id), "--file",
                 str(path))  # fmt: skip

    assert result.returncode == 2
    assert "line 3: the brand has imported this code already" in result.stderr
    assert "KEEP" not in result.stderr.upper() and "NEW" not in result.stderr.upper().replace("NEWLINE", "")
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", second.id) == 0
    assert await db.fetchval("SELECT count(*) FROM code_batches WHERE campaign_id = $1", second.id) == 0


async def test_cli_import_refuses_a_bad_file_whole(
    db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring)
    path = _file(tmp_path, "code,uses\nFINE-CODE-1,\nXY,\nFINE-CODE-2,lots\n")
    result = rgw(gateway_environ(redis_url, migrated), "codes", "import", "--campaign", str(campaign.id), "--file",
                 str(path))  # fmt: skip
    assert result.returncode == 2
    assert "line 3:" in result.stderr and "line 4: uses must be" in result.stderr and "line 2" not in result.stderr
    assert "FINE" not in result.stderr
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 0
    assert not await db.fetchval("SELECT imports_codes FROM brands WHERE id = 1")


async def test_an_interrupted_import_is_resumed_with_its_directory(
    db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, currency="CNY")
    done = await import_file(db, redis, keyring, campaign, _file(tmp_path, GOOD))
    # as if the run was killed after its commit, before Redis had anything
    await db.execute("UPDATE code_batches SET state = 'loading' WHERE id = $1", done.batch_id)
    doomed = [k async for k in redis.scan_iter(match=f"rgw:{{c{campaign.id}.0}}:*")]
    await redis.delete(*doomed, *[k async for k in redis.scan_iter(match="rgw:{d1}:dir:*")])

    result = rgw(gateway_environ(redis_url, migrated), "codes", "resume")

    assert result.returncode == 0, result.stderr
    assert await db.fetchval("SELECT state FROM code_batches WHERE id = $1", done.batch_id) == "active"
    assert await issued(redis, campaign.id, 0) == await bucket_fields(redis, campaign.id, 0) == 5
    assert await find_route(redis, keyring, 1, "SUMMER2026BBBB") == codes.Route(campaign.id, 0)
    ref = keyring.ref(campaign.key_id, campaign.id, "SUMMER2026BBBB").ref
    assert await redis.hget(keys.code_key(campaign.id, 0, ref), "uses") == "3"


async def _once_the_gateway_knows(gateway: RunningGateway, request: pb.RedeemRequest) -> pb.RedeemResponse:
    """The gateway learns that the brand imports codes through the registry (pub/sub, or its poll): until then an
    imported code is not even well-formed to it."""
    for _ in range(100):
        try:
            reply: pb.RedeemResponse = await gateway.stub.Redeem(request)
            return reply
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never learnt that the brand imports codes")


async def test_imported_codes_redeem_like_generated_ones(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring)
    await import_file(db, redis, keyring, campaign, _file(tmp_path, "code,uses\nwelcome-0042,\nTWICE-0001,2\n"))
    first = await _once_the_gateway_knows(gateway, redeem_request("Welcome 0042", "imp-1"))
    again = await gateway.stub.Redeem(redeem_request("WELCOME0042", "imp-2"))
    twice = [await gateway.stub.Redeem(redeem_request("twice-0001", f"t-{n}")) for n in range(3)]
    unknown = await gateway.stub.Redeem(redeem_request("NEVER-IMPORTED", "imp-3"))

    assert first.outcome == pb.OUTCOME_REDEEMED and first.campaign_id == campaign.id
    assert again.outcome == pb.OUTCOME_ALREADY_REDEEMED
    assert [r.outcome for r in twice] == [pb.OUTCOME_REDEEMED, pb.OUTCOME_REDEEMED, pb.OUTCOME_ALREADY_REDEEMED]
    assert twice[1].uses_left == 0
    assert unknown.outcome == pb.OUTCOME_NOT_FOUND


async def _redis_value(redis: Redis, key: str) -> object:
    kind = await redis.type(key)
    if kind == "hash":
        return await redis.hgetall(key)
    if kind == "set":
        return await redis.smembers(key)
    if kind == "stream":
        return await redis.xrange(key)
    if kind == "list":
        return await redis.lrange(key, 0, -1)
    if kind == "zset":
        return await redis.zrange(key, 0, -1, withscores=True)
    return await redis.get(key)


async def _redis_dump(redis: Redis) -> str:
    """Every key and its value, as text."""
    return "\n".join([f"{key} {await _redis_value(redis, key)}" async for key in redis.scan_iter(count=1000)])


async def _postgres_dump(db: asyncpg.Connection) -> str:
    columns = await db.fetch(
        """SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'
           AND data_type IN ('text', 'bytea', 'jsonb', 'json', 'character varying', 'ARRAY', 'uuid')"""
    )
    parts = []
    for column in columns:
        query = f'SELECT "{column["column_name"]}"::text AS v FROM "{column["table_name"]}"'  # names from the catalogue
        parts += [str(row["v"]) for row in await db.fetch(query)]
    return "\n".join(parts)


async def test_no_plaintext_code_in_redis_postgres_or_logs(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    campaign = await _campaign(db, redis, keyring, currency="CNY")
    await import_file(db, redis, keyring, campaign, _file(tmp_path, GOOD))
    out = tmp_path / "generated.txt"
    await issuance.issue_to_file(db, redis, keyring, campaign, count=300, out=out, face_value=5, bound_device="d-1")
    await batches.resume(db, redis)
    plaintext = [row.code for row in read_rows(io.StringIO(GOOD), campaign)] + out.read_text().split()

    in_redis, in_postgres, in_logs = await _redis_dump(redis), await _postgres_dump(db), caplog.text
    assert len(in_redis) > 10_000 and len(in_postgres) > 10_000  # the dumps hold the codes' refs
    for code in plaintext:
        hexed = code.encode().hex()
        for dump in (in_redis, in_postgres, in_logs):
            assert code not in dump.upper() and hexed not in dump
