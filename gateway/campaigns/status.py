"""`rgw campaign status C`: what an operator watches during a launch - the campaign, its budget used so far, the
redemption rate, declines and risk denials by reason, and how far the ledger writer is behind.

Where each figure comes from:

- the campaign and the codes issued: Postgres (`campaigns`, `issued_codes`);
- uses redeemed: the ledger (`redemptions`) plus the redemptions still in the campaign's outbox streams (and
  dead-letter streams) - the ids read from Redis first, then counted against the ledger in one snapshot, so an
  entry the writer committed but has not yet deleted is counted once;
- the rate and the declines: the redeem script's per-minute decision counters (gateway/keys.py `stats_key`),
  live - the ledger holds only redemptions, and lags. Their resolution is the minute: a window "last N min" runs
  from the start of the minute N minutes before the current one to now (N to N+1 minutes long, so never a few
  noisy seconds), and a rate divides by its exact length;
- risk denials: `risk_events` (enforced denials of Redeem attempts on the campaign's codes), as far as the
  ledger writer has recorded them;
- the outbox lag: the campaign shards' outbox streams and the writer's consumer group, ages by Redis' own clock
  (the clock that stamped the entry ids);
- the campaign's status (active or paused) and its live counters - codes loaded, redemptions granted and
  reversed, budget used and left - from the shards' budget hashes (gateway/campaigns/stats.py, as
  GetCampaignStats shows them).

An unknown code (CODE_NOT_FOUND) is not attributable to a campaign: a code that was never issued names only the
campaign its text claims (a guesser chooses it), so the script does not count it anywhere here.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from gateway import keys
from gateway.campaigns import stats
from gateway.campaigns.model import Campaign, get_campaign
from gateway.ledger.events import FORMATS, PoisonEntry, decode_event
from gateway.redis_client import RedisClient

# The reasons the decision counters hold, declines after the redemption (lua/redeem.lua "Decision counters").
REDEEMED = "REDEEMED"
DECLINES = ("NO_USES_LEFT", "CODE_EXPIRED", "CODE_NOT_YET_VALID")
NOT_ATTRIBUTABLE = {
    "CODE_NOT_FOUND": "not attributable: an unknown code names only the campaign its text claims",
}
RATE_WINDOWS = (1, 5)  # minutes
DECLINE_WINDOWS = (5, 60)  # minutes, also the risk denials'
# Outbox entries read per call to count the redemptions waiting exactly; beyond it (a long Postgres outage) the
# rest are counted as redemptions without reading them, and the figure is marked approximate.
MAX_ENTRIES_READ = 100_000
# The outbox fields of a redemption event, current format first (a reversal event is not a redemption).
_REDEMPTION_FORMATS = tuple(FORMATS)  # every redemption event format (a reversal "x1" is not one)
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Window:
    """Counts by reason over [since, now]: the whole minutes from `minutes` before the current one to now."""

    minutes: int
    since_ms: int
    seconds: float
    counts: Mapping[str, int]

    def rate(self, reason: str) -> float:
        return self.counts.get(reason, 0) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Budget:
    """Uses issued and used so far."""

    issued_codes: int
    uses_issued: int
    in_ledger: int
    in_outbox: int  # redemptions waiting in the outbox streams that the ledger does not hold yet
    dead_lettered: int  # redemptions in the dead-letter streams that the ledger does not hold
    approximate: bool  # the outbox was too long to read whole: in_outbox counts the unread entries as redemptions

    @property
    def uses_redeemed(self) -> int:
        return self.in_ledger + self.in_outbox + self.dead_lettered

    @property
    def percent(self) -> float | None:
        return 100 * self.uses_redeemed / self.uses_issued if self.uses_issued else None


@dataclass(frozen=True, slots=True)
class OutboxLag:
    """Entries of the campaign's outbox streams not yet in Postgres (redemptions, and risk events when the risk
    counters are their own call), across its shards."""

    shards: int
    entries: int
    pending: int  # delivered to a writer, not yet acknowledged
    oldest_age_seconds: float | None  # None: nothing waiting
    dead_letters: int

    @property
    def unread(self) -> int:
        return max(self.entries - self.pending, 0)


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    campaign: Campaign
    brand_slug: str
    brand_name: str
    now_ms: int
    budget: Budget
    rates: tuple[Window, ...]
    declines: tuple[Window, ...]
    risk_denials: tuple[Window, ...]
    outbox: OutboxLag
    live: stats.CampaignStats

    @property
    def state(self) -> str:
        if self.now_ms < _ms(self.campaign.valid_from):
            return "not started"
        return "ended" if self.now_ms >= _ms(self.campaign.valid_until) else "open"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def campaign_status(
    conn: asyncpg.Connection, redis: RedisClient, campaign_id: int, *, now_ms: int
) -> CampaignStatus:
    """The status of a campaign as of `now_ms`; LookupError when there is no such campaign."""
    campaign = await get_campaign(conn, campaign_id)
    brand = await conn.fetchrow("SELECT slug, name FROM brands WHERE id = $1", campaign.brand_id)
    shards = range(campaign.shards)
    # Redis before Postgres: an outbox entry read here and committed by the writer since is found in the ledger
    # snapshot below and counted once; an entry appended since is a redemption after this status.
    waiting, unread, dead = await _outbox_redemptions(redis, campaign.id, campaign.shards)
    lag = await _outbox_lag(redis, campaign.id, campaign.shards)
    minutes = await _minute_counts(redis, campaign.id, shards, now_ms)
    live = await stats.campaign_stats(redis, campaign, now_ms=now_ms)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        issued = await conn.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id)
        in_ledger = await conn.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", campaign.id)
        recorded = await _recorded(conn, [*waiting, *dead])
        risk = await _risk_denials(conn, campaign, now_ms)
    budget = Budget(
        issued_codes=issued,
        uses_issued=issued * campaign.uses_per_code,
        in_ledger=in_ledger,
        in_outbox=len(waiting - recorded) + unread,
        dead_lettered=len(dead - recorded),
        approximate=unread > 0,
    )
    return CampaignStatus(
        campaign=campaign,
        brand_slug=brand["slug"] if brand else "",
        brand_name=brand["name"] if brand else "",
        now_ms=now_ms,
        budget=budget,
        rates=tuple(_window(minutes, n, now_ms) for n in RATE_WINDOWS),
        declines=tuple(_window(minutes, n, now_ms) for n in DECLINE_WINDOWS),
        risk_denials=tuple(_risk_window(risk, n, now_ms) for n in DECLINE_WINDOWS),
        outbox=lag,
        live=live,
    )


def _since_ms(minutes: int, now_ms: int) -> int:
    return (keys.stats_minute(now_ms) - minutes) * keys.STATS_MINUTE_MS


def _window(by_minute: Mapping[int, Counter[str]], minutes: int, now_ms: int) -> Window:
    current = keys.stats_minute(now_ms)
    total: Counter[str] = Counter()
    for minute in range(current - minutes, current + 1):
        total.update(by_minute.get(minute, Counter()))
    since = _since_ms(minutes, now_ms)
    return Window(minutes, since, (now_ms - since) / 1000, dict(total))


def _risk_window(rows: Sequence[tuple[str, datetime]], minutes: int, now_ms: int) -> Window:
    since = _since_ms(minutes, now_ms)
    counts = Counter(reason for reason, at in rows if _ms(at) >= since)
    return Window(minutes, since, (now_ms - since) / 1000, dict(counts))


async def _minute_counts(redis: RedisClient, campaign_id: int, shards: range, now_ms: int) -> dict[int, Counter[str]]:
    """The decision counters of every shard for the minutes the widest window needs, summed per minute."""
    current = keys.stats_minute(now_ms)
    minutes = range(current - max(*RATE_WINDOWS, *DECLINE_WINDOWS), current + 1)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            for minute in minutes:
                pipe.hgetall(keys.stats_key(campaign_id, shard, minute))
        replies: list[dict[str, str]] = await pipe.execute()
    by_minute: dict[int, Counter[str]] = {}
    for position, fields in enumerate(replies):
        if fields:
            minute = minutes[position % len(minutes)]
            by_minute.setdefault(minute, Counter()).update({k: int(v) for k, v in fields.items()})
    return by_minute


async def _outbox_redemptions(redis: RedisClient, campaign_id: int, shards: int) -> tuple[set[str], int, set[str]]:
    """The redemption ids waiting in the campaign's outbox streams, the number of entries left unread (past
    MAX_ENTRIES_READ), and the ids in its dead-letter streams. Entries that are not redemptions (risk events)
    are skipped; a redemption entry that cannot be parsed is counted under an id of its own (it is waiting, and
    cannot be in the ledger)."""
    waiting: set[str] = set()
    dead: set[str] = set()
    budget = MAX_ENTRIES_READ
    unread = 0
    for shard in range(shards):
        budget, left = await _read_ids(redis, keys.outbox_key(campaign_id, shard), waiting, budget)
        unread += left
        budget, left = await _read_ids(redis, keys.deadletter_key(campaign_id, shard), dead, budget)
        unread += left
    return waiting, unread, dead


async def _read_ids(redis: RedisClient, stream: str, into: set[str], budget: int) -> tuple[int, int]:
    """Read up to `budget` entries of a stream, adding the redemption ids to `into`; the budget left and the
    number of entries not read."""
    start, read = "-", 0
    while budget > 0:
        count = min(_PAGE, budget)
        entries: Any = await redis.xrange(stream, min=start, count=count)
        for entry_id, fields in entries:
            if any(version in fields for version in _REDEMPTION_FORMATS):
                into.add(_redemption_id(stream, entry_id, fields))
        budget -= len(entries)
        read += len(entries)
        if len(entries) < count:
            return budget, 0
        start = "(" + entries[-1][0]
    return 0, max(int(await redis.xlen(stream)) - read, 0)


def _redemption_id(stream: str, entry_id: str, fields: Mapping[str, str]) -> str:
    try:
        return str(uuid.UUID(decode_event(fields)["rid"]))
    except (PoisonEntry, ValueError):
        return f"{stream}/{entry_id}"  # not a UUID: never in the ledger, counted once as waiting


async def _recorded(conn: asyncpg.Connection, ids: Sequence[str]) -> set[str]:
    """Which of these redemption ids the ledger holds."""
    valid = [i for i in ids if "/" not in i]
    if not valid:
        return set()
    rows = await conn.fetch(
        "SELECT redemption_id::text AS id FROM redemptions WHERE redemption_id = ANY($1::uuid[])", valid
    )
    return {row["id"] for row in rows}


async def _risk_denials(conn: asyncpg.Connection, campaign: Campaign, now_ms: int) -> list[tuple[str, datetime]]:
    """Enforced risk denials of Redeem attempts on the campaign's codes (by its brand's callers) in the widest
    window, as (reason, at)."""
    since = _at(_since_ms(max(DECLINE_WINDOWS), now_ms))
    rows = await conn.fetch(
        """SELECT reason, at FROM risk_events
           WHERE brand_id = $1 AND campaign_id = $2 AND at >= $3 AND mode = 'enforce' AND kind = 'redeem'""",
        campaign.brand_id, campaign.id, since,
    )  # fmt: skip
    return [(row["reason"], row["at"]) for row in rows]


async def _outbox_lag(redis: RedisClient, campaign_id: int, shards: int) -> OutboxLag:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for shard in range(shards):
            stream = keys.outbox_key(campaign_id, shard)
            pipe.xlen(stream)
            pipe.xrange(stream, count=1)
            pipe.xpending(stream, keys.LEDGER_GROUP)
            pipe.xlen(keys.deadletter_key(campaign_id, shard))
        replies = await pipe.execute(raise_on_error=False)
    if isinstance(replies[0], Exception):
        raise replies[0]
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    entries = pending = dead = 0
    oldest: int | None = None
    for shard in range(shards):
        length, first, summary, dead_letters = replies[1 + 4 * shard : 5 + 4 * shard]
        for reply in (length, first, dead_letters):
            if isinstance(reply, Exception):
                raise reply
        entries += int(length)
        dead += int(dead_letters)
        if first:
            first_ms = int(str(first[0][0]).split("-", 1)[0])
            oldest = first_ms if oldest is None else min(oldest, first_ms)
        if isinstance(summary, redis_errors.ResponseError) and "NOGROUP" in str(summary):
            continue  # no writer has read this stream yet: nothing is pending
        if isinstance(summary, Exception):
            raise summary
        pending += int(summary["pending"])
    age = None if oldest is None else max(now_ms - oldest, 0) / 1000
    return OutboxLag(shards, entries, pending, age, dead)


# -- Output ---------------------------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return _at(ms).isoformat().replace("+00:00", "Z")


def _window_json(window: Window, reasons: Sequence[str] | None = None) -> dict[str, object]:
    counts = dict(window.counts) if reasons is None else {r: window.counts.get(r, 0) for r in reasons}
    return {"since": _iso(window.since_ms), "seconds": window.seconds, "by_reason": counts}


def to_json(status: CampaignStatus) -> dict[str, object]:
    """The status as plain JSON data (`rgw campaign status --json`)."""
    c, b, lag = status.campaign, status.budget, status.outbox
    return {
        "as_of": _iso(status.now_ms),
        "campaign": {
            "id": c.id, "name": c.name, "brand_id": c.brand_id, "brand_slug": status.brand_slug,
            "brand_name": status.brand_name, "valid_from": _iso(_ms(c.valid_from)),
            "valid_until": _iso(_ms(c.valid_until)), "state": status.state, "uses_per_code": c.uses_per_code,
            "shards": c.shards, "status": c.status, "budget_count": c.budget_count, "budget_value": c.budget_value,
            "currency": c.currency,
        },
        "counters": stats.counters_json(status.live.total),
        "budget": {
            "issued_codes": b.issued_codes, "uses_issued": b.uses_issued, "uses_redeemed": b.uses_redeemed,
            "percent": b.percent, "in_ledger": b.in_ledger, "in_outbox": b.in_outbox,
            "dead_lettered": b.dead_lettered, "approximate": b.approximate,
        },
        "rate": {
            **{f"{w.minutes}m": {"since": _iso(w.since_ms), "seconds": w.seconds, "redemptions": w.counts.get(
                REDEEMED, 0), "per_second": w.rate(REDEEMED)} for w in status.rates},
            "total_redemptions": b.uses_redeemed,
        },
        "declines": {
            **{f"{w.minutes}m": _window_json(w, DECLINES) for w in status.declines},
            "not_attributable": NOT_ATTRIBUTABLE,
        },
        "risk_denials": {f"{w.minutes}m": _window_json(w) for w in status.risk_denials},
        "outbox": {
            "shards": lag.shards, "entries": lag.entries, "pending": lag.pending, "unread": lag.unread,
            "oldest_age_seconds": lag.oldest_age_seconds, "dead_letters": lag.dead_letters,
        },
    }  # fmt: skip


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{seconds:.0f} s"
    hours, rest = divmod(whole, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _plural(n: int, word: str, words: str = "") -> str:
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def _per_second(rate: float) -> str:
    return f"{rate:,.1f}/s" if rate >= 10 else f"{rate:.3f}/s"


def _counts_table(
    title: str, windows: Sequence[Window], reasons: Sequence[str], notes: Mapping[str, str] | None = None
) -> list[str]:
    lines = [f"{title:<36}" + "".join(f"{'last ' + str(w.minutes) + ' min':>14}" for w in windows)]
    for reason in reasons:
        lines.append(f"  {reason:<34}" + "".join(f"{w.counts.get(reason, 0):>14,}" for w in windows))
    if not reasons:
        lines.append("  none")
    lines += [f"  {reason:<34}{why}" for reason, why in (notes or {}).items()]
    return lines


def _windows(windows: Sequence[Window]) -> str:
    return "; ".join(f"{w.minutes} min since {_iso(w.since_ms)} ({_duration(w.seconds)})" for w in windows)


def _live_lines(status: CampaignStatus) -> list[str]:
    c, t = status.campaign, status.live.total
    count = "no limit" if c.budget_count is None else f"{t.budget_count_left:,} left of {c.budget_count:,}"
    value = "no limit" if c.budget_value is None else f"{t.budget_value_left:,} left of {c.budget_value:,}"
    return [
        "live counters (Redis)",
        f"  codes loaded   {t.issued:,}",
        f"  redeemed       {t.redeemed:,} (reversed {t.reversed:,})",
        f"  budget count   {t.budget_count_used:,} used; {count}",
        f"  budget value   {t.budget_value_used:,} used; {value}" + (f" ({c.currency})" if c.currency else ""),
    ]


def render(status: CampaignStatus) -> str:
    """The status as an operator reads it."""
    c, b, lag = status.campaign, status.budget, status.outbox
    percent = "n/a (no codes issued)" if b.percent is None else f"{b.percent:.2f}% of the uses issued"
    approx = " (approximate: the outbox was too long to read whole)" if b.approximate else ""
    lines = [
        f"campaign {c.id} {c.name!r}   brand {c.brand_id} {status.brand_slug} ({status.brand_name})   "
        f"as of {_iso(status.now_ms)}",
        f"  valid          {_iso(_ms(c.valid_from))} .. {_iso(_ms(c.valid_until))} ({status.state})",
        f"  status         {c.status}",
        f"  uses per code  {c.uses_per_code}",
        f"  shards         {c.shards}",
        "",
        *_live_lines(status),
        "",
        "budget",
        f"  issued codes   {b.issued_codes:,}",
        f"  uses issued    {b.uses_issued:,} ({_plural(b.issued_codes, 'code')} x {c.uses_per_code})",
        f"  uses redeemed  {b.uses_redeemed:,} = {percent}{approx}",
        f"                 in the ledger {b.in_ledger:,}, waiting in the outbox {b.in_outbox:,}, "
        f"dead-lettered {b.dead_lettered:,}",
        "",
        "redemption rate (Redeem; live counters)",
    ]
    for w in status.rates:
        lines.append(f"  last {w.minutes} min{'':<{4 - len(str(w.minutes))}}{_per_second(w.rate(REDEEMED)):>14}   "
                     f"{_plural(w.counts.get(REDEEMED, 0), 'redemption')} since {_iso(w.since_ms)} "
                     f"({_duration(w.seconds)})")  # fmt: skip
    lines.append(f"  total          {_plural(b.uses_redeemed, 'redemption')} (the uses redeemed)")
    lines += ["", *_counts_table("declines (Redeem; live counters)", status.declines, DECLINES, NOT_ATTRIBUTABLE)]
    risk_reasons = sorted({r for w in status.risk_denials for r in w.counts})
    lines += ["", *_counts_table("risk denials (Redeem; risk_events)", status.risk_denials, risk_reasons)]
    lines += [
        "  (risk denials as far as the ledger writer has recorded them: see the outbox lag)",
        f"  windows: {_windows(status.declines)}",
    ]
    oldest = "-" if lag.oldest_age_seconds is None else f"{lag.oldest_age_seconds:.1f} s"
    lines += [
        "",
        f"outbox (ledger writer lag, {_plural(lag.shards, 'shard')})",
        f"  waiting        {_plural(lag.entries, 'entry', 'entries')}: pending at the writer "
        f"{lag.pending:,}, not yet read {lag.unread:,}",
        f"  oldest         {oldest}",
        f"  dead letters   {lag.dead_letters:,}",
    ]
    return "\n".join(lines)


async def show(conn: asyncpg.Connection, redis: RedisClient, campaign_id: int, *, now_ms: int, as_json: bool) -> str:
    """What `rgw campaign status` prints; LookupError when there is no such campaign."""
    status = await campaign_status(conn, redis, campaign_id, now_ms=now_ms)
    return json.dumps(to_json(status), indent=2) if as_json else render(status)
