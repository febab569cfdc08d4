"""AdminService's campaign RPCs through the real server stack, Postgres and Redis: create with every rule,
update by field mask (and what cannot change), pause and resume, list, live statistics, store groups; brand
isolation (another brand's campaign answers exactly like a missing one); bad input named field by field, with
nothing changed in Postgres or Redis; a pause seen by every redemption answered after it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from redis.asyncio import Redis

from gateway import keys
from gateway.campaigns.layout import DECISION_REASONS
from gateway.grpc_api.admin_messages import timestamp
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2 as rpb
from tests.conftest import T0_MS
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import field_violations, redeem_request, redis_snapshot
from tests.integration.test_admin_service import admin_as, failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
T0 = datetime.fromtimestamp(T0_MS / 1000, UTC)
DAY = timedelta(days=1)


def rules(**changes: Any) -> pb.Campaign:
    """A campaign with every rule set; `changes` replace fields."""
    fields: dict[str, Any] = {
        "name": "Spring coffee", "valid_from": timestamp(T0 - DAY), "valid_until": timestamp(T0 + 30 * DAY),
        "valid_days": 10, "uses_per_code": 2, "shards": 4, "budget_count": 100, "budget_value": 50_000,
        "face_value": 500, "currency": "CNY", "time_zone": "Asia/Shanghai",
        "redemption_hours": [pb.HoursWindow(days=[1, 2, 3, 4, 5], start="07:00", end="10:30"),
                             pb.HoursWindow(start="22:00", end="02:00")],
        "allowed_stores": ["store-1", "store-9"], "reversal_window": duration_pb2.Duration(seconds=86_400),
    }  # fmt: skip
    fields.update(changes)
    return pb.Campaign(**fields)


async def state(db: asyncpg.Connection, redis: Redis) -> tuple[Any, ...]:
    """Everything a refused change must leave as it was."""
    tables = [[tuple(r) for r in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")]
              for table in ("campaigns", "store_groups", "audit_log", "registry_version")]  # fmt: skip
    return (*tables, await redis_snapshot(redis))


async def create(gateway: RunningGateway, campaign: pb.Campaign, who: str = "admin", **extra: str) -> pb.Campaign:
    async with admin_as(gateway, who, **extra) as stub:
        made: pb.CreateCampaignResponse = await stub.CreateCampaign(pb.CreateCampaignRequest(campaign=campaign))
        return made.campaign


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def meta(redis: Redis, campaign_id: int, shard: int = 0) -> dict[str, str]:
    found = await redis.hgetall(keys.meta_key(campaign_id, shard))
    return {str(k): str(v) for k, v in found.items()}


async def shares(redis: Redis, campaign_id: int, shards: int, field: str = "n") -> list[int]:
    return [int(await redis.hget(keys.budget_key(campaign_id, s), field) or 0) for s in range(shards)]


# -- Create -----------------------------------------------------------------------------------------------------


async def test_create_records_every_rule_publishes_it_and_audits_it(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules())

    assert made.id > 0 and made.brand_id == 1 and made.status == pb.CAMPAIGN_STATUS_ACTIVE
    assert (made.name, made.shards, made.uses_per_code, made.valid_days) == ("Spring coffee", 4, 2, 10)
    assert (made.budget_count, made.budget_value, made.face_value, made.currency) == (100, 50_000, 500, "CNY")
    assert [(list(w.days), w.start, w.end) for w in made.redemption_hours] == [
        ([1, 2, 3, 4, 5], "07:00", "10:30"), ([], "22:00", "02:00")]  # fmt: skip
    assert list(made.allowed_stores) == ["store-1", "store-9"] and made.reversal_window.seconds == 86_400
    row = await db.fetchrow("SELECT * FROM campaigns WHERE id = $1", made.id)
    assert (row["time_zone"], row["reversal_window_seconds"], row["status"]) == ("Asia/Shanghai", 86_400, "active")
    assert json.loads(row["redemption_hours"])[0] == {"days": [1, 2, 3, 4, 5], "start": "07:00", "end": "10:30"}

    published = await meta(redis, made.id, 3)
    assert {k: published[k] for k in ("brand", "uses", "p", "fv", "st", "rw", "shards", "cur", "vd")} == {
        "brand": "1", "uses": "2", "p": "0", "fv": "500", "st": "1", "rw": "86400000", "shards": "4", "cur": "CNY",
        "vd": str(10 * 86_400_000),
    }  # fmt: skip
    assert published["win"] == "31:420:630,127:1320:120" and published["tz"]
    assert await shares(redis, made.id, 4) == [25, 25, 25, 25]
    assert sum(await shares(redis, made.id, 4, "v")) == 50_000
    assert await redis.smembers(keys.stores_key(made.id, 2)) == {"", "store-1", "store-9"}
    audit = await db.fetchrow("SELECT * FROM audit_log ORDER BY id DESC LIMIT 1")
    assert (audit["action"], audit["entity"], audit["entity_id"], audit["brand_id"]) == (
        "campaign.create", "campaign", str(made.id), 1)  # fmt: skip
    assert audit["actor"] == f"client:{gateway.tenants.clients['admin']}"


async def test_create_takes_defaults_and_a_platform_client_names_the_brand(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    plain = pb.Campaign(name="Plain", valid_from=timestamp(T0), valid_until=timestamp(T0 + DAY))
    made = await create(gateway, plain, "platform", x_rgw_brand="other")
    assert made.brand_id == gateway.tenants.other_brand
    assert (made.uses_per_code, made.shards, made.time_zone, made.reversal_window.seconds) == (1, 1, "UTC", 604_800)
    assert not made.HasField("budget_count") and not made.HasField("budget_value") and made.currency == ""

    before = await db.fetchval("SELECT count(*) FROM campaigns")
    async with admin_as(gateway, "platform") as stub:
        error = await failure(stub.CreateCampaign(pb.CreateCampaignRequest(campaign=plain)))
    assert error.code() == INVALID and set(field_violations(error)) == {"metadata.x-rgw-brand"}
    assert await db.fetchval("SELECT count(*) FROM campaigns") == before


BAD_CREATES: list[tuple[dict[str, Any], set[str]]] = [
    ({"name": ""}, {"campaign.name"}),
    ({"name": "x" * 201}, {"campaign.name"}),
    ({"valid_until": timestamp(T0 - DAY)}, {"campaign.valid_until"}),
    ({"uses_per_code": 1_000_001}, {"campaign.uses_per_code"}),
    ({"shards": 1025}, {"campaign.shards"}),
    ({"budget_count": 0}, {"campaign.budget_count"}),
    ({"budget_value": -5}, {"campaign.budget_value"}),
    ({"face_value": -1}, {"campaign.face_value"}),
    ({"currency": "cny"}, {"campaign.currency"}),
    ({"currency": ""}, {"campaign.currency"}),  # a face value and a value budget need one
    ({"time_zone": "Mars/Olympus_Mons"}, {"campaign.time_zone"}),
    ({"valid_days": -1}, {"campaign.valid_days"}),
    ({"redemption_hours": [pb.HoursWindow(start="25:00", end="10:00")]}, {"campaign.redemption_hours[0].start"}),
    ({"redemption_hours": [pb.HoursWindow(days=[8], start="07:00", end="10:00")]},
     {"campaign.redemption_hours[0].days[0]"}),
    ({"allowed_stores": ["store 1!"]}, {"campaign.allowed_stores[0]"}),
    ({"allowed_store_groups": ["nobody"]}, {"campaign.allowed_store_groups[0]"}),
    ({"reversal_window": duration_pb2.Duration(seconds=367 * 86_400)}, {"campaign.reversal_window"}),
    ({"reversal_window": duration_pb2.Duration(seconds=-1)}, {"campaign.reversal_window"}),
]  # fmt: skip


async def test_every_bad_rule_is_named_and_nothing_is_created(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    before = await state(db, redis)
    async with admin_as(gateway, "admin") as stub:
        for changes, fields in BAD_CREATES:
            error = await failure(stub.CreateCampaign(pb.CreateCampaignRequest(campaign=rules(**changes))))
            assert error.code() == INVALID, changes
            assert set(field_violations(error)) == fields, (changes, field_violations(error))
        everything = {k: v for changes, _ in BAD_CREATES[1:13] for k, v in changes.items()}
        error = await failure(stub.CreateCampaign(pb.CreateCampaignRequest(campaign=rules(**everything))))
        assert set(field_violations(error)) == set().union(*(fields for _, fields in BAD_CREATES[1:13]))
        missing = await failure(stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign())))
        assert set(field_violations(missing)) == {"campaign.name", "campaign.valid_from", "campaign.valid_until"}
    assert await state(db, redis) == before


# -- Update -----------------------------------------------------------------------------------------------------


async def test_update_changes_only_the_masked_rules_live(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules())
    values = pb.Campaign(
        id=made.id, name="Renamed", valid_until=timestamp(T0 + 60 * DAY), uses_per_code=99, allowed_stores=[],
        redemption_hours=[pb.HoursWindow(days=[6, 7], start="09:00", end="12:00")], budget_count=160,
    )  # fmt: skip
    paths = ("name", "valid_until", "allowed_stores", "redemption_hours", "budget_count", "budget_value")
    async with admin_as(gateway, "admin") as stub:
        changed = (
            await stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=values, update_mask=mask(*paths)))
        ).campaign

    assert (changed.name, changed.uses_per_code, changed.budget_count) == ("Renamed", 2, 160)  # uses: not masked
    assert not changed.HasField("budget_value")  # named but unset: the limit is removed
    assert list(changed.allowed_stores) == [] and changed.face_value == 500 and changed.time_zone == "Asia/Shanghai"
    published = await meta(redis, made.id, 1)
    assert (published["st"], published["win"], published["vu"]) == ("0", "96:540:720", str(T0_MS + 60 * 86_400_000))
    assert not await redis.exists(keys.stores_key(made.id, 1))
    assert await shares(redis, made.id, 4) == [40, 40, 40, 40]
    assert [await redis.hget(keys.budget_key(made.id, s), "v") for s in range(4)] == [None] * 4
    row = await db.fetchrow("SELECT name, budget_count, budget_value, updated_at, created_at FROM campaigns")
    assert (row["name"], row["budget_count"], row["budget_value"]) == ("Renamed", 160, None)
    assert row["updated_at"] > row["created_at"]
    audit = await db.fetchrow("SELECT action, before, after FROM audit_log ORDER BY id DESC LIMIT 1")
    assert audit["action"] == "campaign.update"
    assert (json.loads(audit["before"])["name"], json.loads(audit["after"])["name"]) == ("Spring coffee", "Renamed")


async def test_update_lowers_a_budget_within_what_is_unused_and_refuses_below_what_was_granted(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules())
    for shard, used in enumerate((25, 5, 0, 0)):  # 30 granted
        await redis.hset(keys.budget_key(made.id, shard), "un", used)
    lower = pb.UpdateCampaignRequest(
        campaign=pb.Campaign(id=made.id, budget_count=50), update_mask=mask("budget_count")
    )
    async with admin_as(gateway, "admin") as stub:
        changed = (await stub.UpdateCampaign(lower)).campaign
        assert changed.budget_count == 50 and sum(await shares(redis, made.id, 4)) == 50

        before = await state(db, redis)
        too_low = pb.UpdateCampaignRequest(campaign=pb.Campaign(id=made.id, budget_count=29),
                                           update_mask=mask("budget_count"))  # fmt: skip
        error = await failure(stub.UpdateCampaign(too_low))
    violations = field_violations(error)
    assert error.code() == INVALID and set(violations) == {"campaign.budget_count"}
    assert "29" in violations["campaign.budget_count"] and "30" in violations["campaign.budget_count"]
    assert await state(db, redis) == before


async def test_what_cannot_change_is_refused_by_name_and_nothing_changes(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules())
    before = await state(db, redis)
    cases: list[tuple[pb.Campaign, Sequence[str], set[str]]] = [
        (pb.Campaign(id=made.id, shards=8), ["shards"], {"campaign.shards"}),
        (pb.Campaign(id=made.id, currency="EUR"), ["currency"], {"campaign.currency"}),
        (pb.Campaign(id=made.id, status=pb.CAMPAIGN_STATUS_PAUSED), ["status"], {"update_mask"}),
        (pb.Campaign(id=made.id, name="x"), [], {"update_mask"}),
        (pb.Campaign(id=made.id, valid_until=timestamp(T0 - 2 * DAY)), ["valid_until"], {"campaign.valid_until"}),
        (pb.Campaign(id=made.id, time_zone="Nowhere/Special", face_value=-3), ["time_zone", "face_value"],
         {"campaign.time_zone", "campaign.face_value"}),
        (pb.Campaign(id=made.id), ["currency"], {"campaign.currency"}),  # clearing it: a change too
    ]  # fmt: skip
    async with admin_as(gateway, "admin") as stub:
        for values, paths, fields in cases:
            error = await failure(
                stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=values, update_mask=mask(*paths)))
            )
            assert error.code() == INVALID and set(field_violations(error)) == fields, (paths, field_violations(error))
        assert await state(db, redis) == before
        same = pb.UpdateCampaignRequest(campaign=pb.Campaign(id=made.id, shards=4, currency="CNY"),
                                        update_mask=mask("shards", "currency"))  # fmt: skip
        assert (await stub.UpdateCampaign(same)).campaign.shards == 4  # naming them unchanged is no change


# -- Brand isolation --------------------------------------------------------------------------------------------


def _trailers(error: grpc.aio.AioRpcError) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in error.trailing_metadata() or () if k != "x-request-id"]


async def test_another_brands_campaign_answers_exactly_like_a_missing_one(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    theirs = await create(gateway, rules(), "platform", x_rgw_brand="other")
    mine = await create(gateway, rules(name="Mine"))
    before = await state(db, redis)
    missing = theirs.id + 1000

    def requests(campaign_id: int) -> list[Any]:
        return [
            pb.UpdateCampaignRequest(campaign=pb.Campaign(id=campaign_id, name="x"), update_mask=mask("name")),
            pb.SetCampaignStatusRequest(campaign_id=campaign_id, status=pb.CAMPAIGN_STATUS_PAUSED),
            pb.GetCampaignStatsRequest(campaign_id=campaign_id),
        ]

    async with admin_as(gateway, "admin") as stub:
        for their_request, missing_request in zip(requests(theirs.id), requests(missing), strict=True):
            method = getattr(stub, type(their_request).__name__.removesuffix("Request"))
            a, b = await failure(method(their_request)), await failure(method(missing_request))
            assert (a.code(), a.details(), _trailers(a)) == (b.code(), b.details(), _trailers(b))
            assert a.code() == NOT_FOUND
        listed = await stub.ListCampaigns(pb.ListCampaignsRequest())
    assert [c.id for c in listed.campaigns] == [mine.id]
    assert await state(db, redis) == before
    async with admin_as(gateway, "platform") as stub:  # the platform, naming no brand: every brand's
        everything = await stub.ListCampaigns(pb.ListCampaignsRequest())
    assert [c.id for c in everything.campaigns] == [theirs.id, mine.id]


async def test_list_pages_by_id(gateway: RunningGateway) -> None:
    ids = [(await create(gateway, rules(name=f"c{i}", shards=1))).id for i in range(5)]
    seen: list[int] = []
    token = ""
    async with admin_as(gateway, "admin") as stub:
        for _ in range(3):
            page = await stub.ListCampaigns(pb.ListCampaignsRequest(page_size=2, page_token=token))
            seen += [c.id for c in page.campaigns]
            token = page.next_page_token
        assert token == ""
        error = await failure(stub.ListCampaigns(pb.ListCampaignsRequest(page_token="not-a-token")))
    assert seen == ids and set(field_violations(error)) == {"page_token"}


# -- Pause ------------------------------------------------------------------------------------------------------


async def test_pause_and_resume_flip_the_flag_every_shard_reads(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules())
    async with admin_as(gateway, "admin") as stub:
        pause = pb.SetCampaignStatusRequest(campaign_id=made.id, status=pb.CAMPAIGN_STATUS_PAUSED)
        paused = await stub.SetCampaignStatus(pause)
        assert paused.campaign.status == pb.CAMPAIGN_STATUS_PAUSED
        assert [(await meta(redis, made.id, s))["p"] for s in range(4)] == ["1"] * 4
        resume = pb.SetCampaignStatusRequest(campaign_id=made.id, status=pb.CAMPAIGN_STATUS_ACTIVE)
        resumed = await stub.SetCampaignStatus(resume)
        assert resumed.campaign.status == pb.CAMPAIGN_STATUS_ACTIVE
        assert [(await meta(redis, made.id, s))["p"] for s in range(4)] == ["0"] * 4
        error = await failure(stub.SetCampaignStatus(pb.SetCampaignStatusRequest(campaign_id=made.id)))
    assert error.code() == INVALID and set(field_violations(error)) == {"status"}
    actions = [
        r["action"] for r in await db.fetch("SELECT action FROM audit_log WHERE entity = 'campaign' ORDER BY id")
    ]
    assert actions == ["campaign.create", "campaign.pause", "campaign.resume"]


async def test_every_redemption_answered_after_a_pause_is_campaign_paused(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(400)
    cid = issued.campaign.id
    before_pause: list[int] = []
    after_pause: list[int] = []
    paused_at: list[float] = []

    async def redeem(code: str) -> None:
        started = time.monotonic()
        reply = await gateway.stub.Redeem(redeem_request(code, f"k-{code}"), timeout=10)
        (after_pause if paused_at and started > paused_at[0] else before_pause).append(reply.outcome)

    async def pause() -> None:
        await asyncio.sleep(0.05)
        async with admin_as(gateway, "admin") as stub:
            await stub.SetCampaignStatus(pb.SetCampaignStatusRequest(campaign_id=cid, status=pb.CAMPAIGN_STATUS_PAUSED))
        paused_at.append(time.monotonic())

    async def stream() -> None:
        for start in range(0, len(issued.codes), 20):
            await asyncio.gather(*(redeem(code) for code in issued.codes[start : start + 20]))

    await asyncio.gather(stream(), pause())
    assert [(await meta(redis, cid, s))["p"] for s in range(issued.campaign.shards)] == ["1"] * issued.campaign.shards
    assert rpb.OUTCOME_REDEEMED in before_pause  # the stream was under way when the pause came
    assert after_pause and set(after_pause) == {rpb.OUTCOME_CAMPAIGN_PAUSED}


# -- Statistics -------------------------------------------------------------------------------------------------


async def test_stats_are_the_redis_counters(gateway: RunningGateway, redis: Redis) -> None:
    made = await create(gateway, rules(shards=2, budget_count=100, budget_value=10_000))
    for shard, fields in enumerate((
        {"iss": 50, "red": 12, "rev": 2, "un": 10, "uv": 5_000},
        {"iss": 40, "red": 3, "rev": 0, "un": 3, "uv": 1_500},
    )):  # fmt: skip
        await redis.hset(keys.budget_key(made.id, shard), mapping=fields)  # type: ignore[arg-type]
    # decisions counted in the minute of whichever clock the server runs on (the test clock or the wall clock),
    # one counted outside the hour
    for now_ms in {T0_MS, int(time.time() * 1000)}:
        minute = keys.stats_minute(now_ms)
        await redis.hset(keys.stats_key(made.id, 0, minute), mapping={"REDEEMED": 7, "CAMPAIGN_PAUSED": 2})
        await redis.hset(keys.stats_key(made.id, 1, minute - 59), mapping={"REDEEMED": 1, "STORE_NOT_ALLOWED": 4})
        await redis.hset(keys.stats_key(made.id, 1, minute - 60), mapping={"REDEEMED": 100})
    async with admin_as(gateway, "admin") as stub:
        figures = await stub.GetCampaignStats(pb.GetCampaignStatsRequest(campaign_id=made.id))

    t = figures.total
    assert (t.issued, t.redeemed, t.reversed, t.budget_count_used, t.budget_value_used) == (90, 15, 2, 13, 6_500)
    assert (t.budget_count_left, t.budget_value_left) == (87, 3_500)
    s0, s1 = figures.shards
    assert (s0.budget_count_left, s1.budget_count_left, s0.budget_value_left) == (40, 47, 0)
    assert (s0.issued, s1.redeemed) == (50, 3)
    assert dict(figures.decisions_last_hour) == {
        **dict.fromkeys(DECISION_REASONS, 0),
        "REDEEMED": 8,
        "CAMPAIGN_PAUSED": 2,
        "STORE_NOT_ALLOWED": 4,
    }
    assert figures.status == pb.CAMPAIGN_STATUS_ACTIVE


async def test_stats_without_a_budget_leave_what_is_left_unset(gateway: RunningGateway) -> None:
    plain = pb.Campaign(name="Plain", valid_from=timestamp(T0), valid_until=timestamp(T0 + DAY))
    made = await create(gateway, plain)
    async with admin_as(gateway, "admin") as stub:
        figures = await stub.GetCampaignStats(pb.GetCampaignStatsRequest(campaign_id=made.id))
    assert not figures.total.HasField("budget_count_left") and not figures.total.HasField("budget_value_left")
    assert len(figures.shards) == 1 and figures.total.issued == 0


# -- Store groups -----------------------------------------------------------------------------------------------


async def test_a_store_group_is_published_to_every_campaign_allowing_it(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    async with admin_as(gateway, "admin") as stub:
        group = await stub.SetStoreGroup(pb.SetStoreGroupRequest(name="downtown", stores=["s-2", "s-1", "s-2"]))
        assert (group.name, list(group.stores), list(group.campaign_ids)) == ("downtown", ["s-1", "s-2"], [])
        made = await create(gateway, rules(shards=2, allowed_stores=["store-1"], allowed_store_groups=["downtown"]))
        assert await redis.smembers(keys.stores_key(made.id, 1)) == {"", "store-1", "s-1", "s-2"}

        group = await stub.SetStoreGroup(pb.SetStoreGroupRequest(name="downtown", stores=["s-3"]))
        assert list(group.campaign_ids) == [made.id]
        assert await redis.smembers(keys.stores_key(made.id, 0)) == {"", "store-1", "s-3"}

        before = await state(db, redis)
        error = await failure(stub.SetStoreGroup(pb.SetStoreGroupRequest(name="bad name", stores=["ok", "not ok"])))
        assert error.code() == INVALID and set(field_violations(error)) == {"name", "stores[1]"}
        assert await state(db, redis) == before
    async with admin_as(gateway, "platform") as stub:
        error = await failure(stub.SetStoreGroup(pb.SetStoreGroupRequest(name="g")))
    assert set(field_violations(error)) == {"metadata.x-rgw-brand"}
    async with admin_as(gateway, "platform", x_rgw_brand="other") as stub:  # another brand's group of that name
        await stub.SetStoreGroup(pb.SetStoreGroupRequest(name="downtown", stores=["theirs"]))
    assert await redis.smembers(keys.stores_key(made.id, 0)) == {"", "store-1", "s-3"}
    audit = await db.fetch("SELECT action, brand_id FROM audit_log WHERE entity = 'store_group' ORDER BY id")
    assert [(r["action"], r["brand_id"]) for r in audit] == [("store_group.set", 1)] * 2 + [
        ("store_group.set", gateway.tenants.other_brand)]  # fmt: skip


# -- Generation -------------------------------------------------------------------------------------------------


async def test_generate_codes_streams_chunks_then_done_and_every_code_is_issued(
    gateway: RunningGateway, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    made = await create(gateway, rules(shards=2, valid_from=timestamp(T0 - DAY), allowed_stores=[]))
    chunks: list[list[str]] = []
    done: list[pb.GenerationDone] = []
    async with admin_as(gateway, "admin") as stub:
        async for reply in stub.GenerateCodes(pb.GenerateCodesRequest(campaign_id=made.id, count=2500)):
            if reply.HasField("codes"):
                chunks.append(list(reply.codes.codes))
            else:
                done.append(reply.done)

    codes = [code for chunk in chunks for code in chunk]
    assert [len(chunk) for chunk in chunks] == [1000, 1000, 500] and len(set(codes)) == 2500
    assert len(done) == 1 and done[0].count == 2500
    batch = await db.fetchrow("SELECT * FROM code_batches WHERE id = $1::uuid", done[0].batch_id)
    assert (batch["campaign_id"], batch["codes"], batch["state"]) == (made.id, 2500, "active")
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", made.id) == 2500
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert not any(code in logged for code in codes)  # never a code in the logs
    reply = await gateway.stub.Redeem(redeem_request(codes[0], "gen-1"), timeout=10)
    assert reply.outcome in (rpb.OUTCOME_REDEEMED, rpb.OUTCOME_NOT_ALLOWED)  # issued: found (hours may close it)


async def test_generate_codes_refuses_bad_input_and_another_brands_campaign(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    theirs = await create(gateway, rules(), "platform", x_rgw_brand="other")
    plain = await create(gateway, pb.Campaign(name="Plain", valid_from=timestamp(T0), valid_until=timestamp(T0 + DAY)))

    async def error_of(request: pb.GenerateCodesRequest) -> grpc.aio.AioRpcError:
        async with admin_as(gateway, "admin") as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.GenerateCodes(request):
                    pass
        return info.value

    theirs_error = await error_of(pb.GenerateCodesRequest(campaign_id=theirs.id, count=1))
    missing_error = await error_of(pb.GenerateCodesRequest(campaign_id=theirs.id + 1000, count=1))
    assert theirs_error.code() == missing_error.code() == NOT_FOUND
    assert theirs_error.details() == missing_error.details()
    assert set(field_violations(await error_of(pb.GenerateCodesRequest(campaign_id=plain.id)))) == {"count"}
    no_currency = await error_of(pb.GenerateCodesRequest(campaign_id=plain.id, count=1, face_value=100))
    assert no_currency.code() == INVALID and set(field_violations(no_currency)) == {"face_value"}
    assert await db.fetchval("SELECT count(*) FROM code_batches") == 0


async def test_a_generation_cancelled_before_its_end_issues_nothing(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    made = await create(gateway, rules(shards=1))
    async with admin_as(gateway, "admin") as stub:
        call = stub.GenerateCodes(pb.GenerateCodesRequest(campaign_id=made.id, count=200_000))
        async for reply in call:
            assert reply.HasField("codes")
            break  # the first chunk is in hand: cancel the rest
        call.cancel()

    # the batch's transaction ends (rolled back, or - wrongly - committed) before anything is compared
    in_transaction = """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                        AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"""
    for _ in range(200):
        if await db.fetchval(in_transaction) == 0:
            break
        await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", made.id) == 0
    assert await db.fetchval("SELECT count(*) FROM code_batches") == 0
    assert not [k async for k in redis.scan_iter(match=f"rgw:{{c{made.id}.0}}:b:*")]
