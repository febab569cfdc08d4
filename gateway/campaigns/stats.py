"""A campaign's live figures from Redis counters only - never a scan of codes: each shard's budget hash (codes
issued, redemptions granted and reversed, budget shares and what they granted; layout.BUDGET and
BUDGET_COUNTERS) and the redeem script's per-minute decision counters of the last hour (keys.stats_key, by
layout.DECISION_REASONS), all in one pipelined round trip. GetCampaignStats and `rgw campaign stats` show them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway import keys
from gateway.campaigns.layout import DECISION_REASONS
from gateway.campaigns.model import Campaign
from gateway.redis_client import RedisClient

HOUR_MINUTES = 60
# HMGET order of a budget hash: n, v, un, uv, rev, iss (redemptions granted = un + rev)
_BUDGET_FIELDS = ("n", "v", "un", "uv", "rev", "iss")


@dataclass(frozen=True, slots=True)
class Counters:
    """The figures of one shard, or of the whole campaign. `*_left` is None without such a budget."""

    issued: int
    redeemed: int
    reversed: int
    budget_count_used: int
    budget_count_left: int | None
    budget_value_used: int
    budget_value_left: int | None


@dataclass(frozen=True, slots=True)
class CampaignStats:
    """A campaign's live figures: in all, per shard (by shard number), and Redeem's decisions over the last hour
    (the current minute and the 59 before it, by the decision counters' minutes) by reason."""

    campaign_id: int
    total: Counters
    shards: tuple[Counters, ...]
    decisions_last_hour: Mapping[str, int]


def _number(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _left(share: int | None, used: int) -> int | None:
    return None if share is None else max(share - used, 0)


def shard_counters(fields: Sequence[str | None]) -> Counters:
    """One shard's figures from its budget hash (HMGET of n, v, un, uv, rev, iss): what is left is of the
    shard's own share."""
    n, v, un, uv, rev, iss = (_number(value) for value in fields)
    return Counters(
        issued=iss or 0, redeemed=(un or 0) + (rev or 0), reversed=rev or 0, budget_count_used=un or 0,
        budget_count_left=_left(n, un or 0), budget_value_used=uv or 0, budget_value_left=_left(v, uv or 0),
    )  # fmt: skip


def total_counters(campaign: Campaign, shards: Sequence[Counters]) -> Counters:
    """The campaign's figures: sums over its shards; what is left is of the campaign's budget (so a transfer
    between shards in flight is not missing from it)."""
    count_used = sum(s.budget_count_used for s in shards)
    value_used = sum(s.budget_value_used for s in shards)
    return Counters(
        issued=sum(s.issued for s in shards), redeemed=sum(s.redeemed for s in shards),
        reversed=sum(s.reversed for s in shards), budget_count_used=count_used,
        budget_count_left=_left(campaign.budget_count, count_used), budget_value_used=value_used,
        budget_value_left=_left(campaign.budget_value, value_used),
    )  # fmt: skip


def hour_minutes(now_ms: int) -> range:
    """The decision counters' minutes of the last hour: the current one and the 59 before it."""
    current = keys.stats_minute(now_ms)
    return range(current - HOUR_MINUTES + 1, current + 1)


async def campaign_stats(redis: RedisClient, campaign: Campaign, *, now_ms: int) -> CampaignStats:
    """The campaign's live figures as of `now_ms` (the minute of the decision counters), in one round trip."""
    minutes = hour_minutes(now_ms)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(campaign.shards):
            pipe.hmget(keys.budget_key(campaign.id, shard), list(_BUDGET_FIELDS))
        for shard in range(campaign.shards):
            for minute in minutes:
                pipe.hgetall(keys.stats_key(campaign.id, shard, minute))
        replies = await pipe.execute()
    shards = tuple(shard_counters(fields) for fields in replies[: campaign.shards])
    decisions: Counter[str] = Counter(dict.fromkeys(DECISION_REASONS, 0))
    for counts in replies[campaign.shards :]:
        decisions.update({str(reason): int(n) for reason, n in counts.items()})
    return CampaignStats(campaign.id, total_counters(campaign, shards), shards, dict(decisions))


def to_json(stats: CampaignStats, campaign: Campaign) -> dict[str, object]:
    """The figures as plain JSON data (`rgw campaign stats --json`)."""
    return {
        "campaign": campaign.id, "brand_id": campaign.brand_id, "name": campaign.name, "status": campaign.status,
        "budget_count": campaign.budget_count, "budget_value": campaign.budget_value, "currency": campaign.currency,
        "total": counters_json(stats.total), "shards": [counters_json(s) for s in stats.shards],
        "decisions_last_hour": dict(stats.decisions_last_hour),
    }  # fmt: skip


def counters_json(counters: Counters) -> dict[str, int | None]:
    """One shard's (or the campaign's) figures as JSON data."""
    return {
        "issued": counters.issued, "redeemed": counters.redeemed, "reversed": counters.reversed,
        "budget_count_used": counters.budget_count_used, "budget_count_left": counters.budget_count_left,
        "budget_value_used": counters.budget_value_used, "budget_value_left": counters.budget_value_left,
    }  # fmt: skip


def _figure(used: int, left: int | None) -> str:
    return f"{used:,} used" if left is None else f"{used:,} used, {left:,} left"


def render(stats: CampaignStats, campaign: Campaign) -> str:
    """The figures as an operator reads them."""
    t = stats.total
    value = _figure(t.budget_value_used, t.budget_value_left) + (f" ({campaign.currency})" if campaign.currency else "")
    lines = [
        f"campaign {campaign.id} {campaign.name!r}   brand {campaign.brand_id}   {campaign.status}",
        f"  issued codes     {t.issued:,}",
        f"  redeemed         {t.redeemed:,} (reversed {t.reversed:,})",
        f"  budget count     {_figure(t.budget_count_used, t.budget_count_left)}"
        + ("" if campaign.budget_count is None else f" of {campaign.budget_count:,}"),
        f"  budget value     {value}" + ("" if campaign.budget_value is None else f" of {campaign.budget_value:,}"),
        "",
        "shards           issued   redeemed   reversed   count used (left)   value used (left)",
    ]
    for shard, s in enumerate(stats.shards):
        count = f"{s.budget_count_used:,} ({'-' if s.budget_count_left is None else f'{s.budget_count_left:,}'})"
        val = f"{s.budget_value_used:,} ({'-' if s.budget_value_left is None else f'{s.budget_value_left:,}'})"
        lines.append(f"  {shard:<10}{s.issued:>12,}{s.redeemed:>11,}{s.reversed:>11,}{count:>20}{val:>20}")
    lines += ["", "decisions, last hour (Redeem; live counters)"]
    lines += [f"  {reason:<34}{n:>10,}" for reason, n in stats.decisions_last_hour.items()]
    return "\n".join(lines)
