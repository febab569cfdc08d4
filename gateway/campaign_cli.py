"""`rgw campaign create|update|pause|resume|list|stats|status|rebalance` and `rgw store-group set`: campaign
administration (gateway/campaigns/admin.py, the operations of AdminService's campaign RPCs) straight against
Postgres (RGW_DATABASE_URL) and Redis (RGW_REDIS_URL), for operators with database access. It sees every brand;
`--brand` (an id or a slug) narrows or names one. The audit actor is `cli:<login>`.

`campaign create` prints the new campaign's id (`--json`: the campaign); the other changes print the campaign (or
the group) as one JSON object. Bad input prints every bad field by its option and exits 2, having changed nothing;
a campaign that does not exist (or is not the `--brand`'s) exits 2 as well; an unreachable Redis or Postgres
exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
from redis import exceptions as redis_errors

from gateway.campaigns import admin, stats
from gateway.campaigns.budget import NOWHERE, RebalanceReport
from gateway.campaigns.model import ACTIVE, PAUSED, Campaign
from gateway.campaigns.schedule import hours_to_json
from gateway.clock import SystemClock
from gateway.domain import StoreUnavailable
from gateway.durability import is_initialised
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings
from gateway.tenancy import notify
from gateway.tenancy.admin_tx import Committed
from gateway.tenancy.model import DEFAULT_BRAND_ID, NotFoundError
from gateway.validation import FieldViolation, InvalidRequest

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Work = Callable[["_Session", argparse.Namespace], Awaitable[None]]

BAD_INPUT = 2
_REDIS_DOWN = (redis_errors.RedisError, OSError, TimeoutError)
# The rules' field names as this command line spells them, so a violation names what to change.
_OPTIONS = {
    "name": "--name", "valid_from": "--valid-from", "valid_until": "--valid-until", "valid_days": "--valid-days",
    "uses_per_code": "--uses-per-code", "shards": "--shards", "budget_count": "--budget-count",
    "budget_value": "--budget-value", "face_value": "--face-value", "currency": "--currency",
    "time_zone": "--time-zone", "redemption_hours": "--hours", "allowed_stores": "--store",
    "allowed_store_groups": "--store-group", "reversal_window": "--reversal-window", "stores": "--store",
    "brand_id": "--brand",
}  # fmt: skip
_DURATION = re.compile(r"([0-9]+)([dhms]?)")
_UNIT_S = {"d": 86_400, "h": 3_600, "m": 60, "s": 1, "": 1}
_TIMES = re.compile(r"([0-9]{1,2}:[0-9]{2})-([0-9]{1,2}:[0-9]{2})")


class NotInitialised(RuntimeError):
    """Redis must be rebuilt from Postgres before campaigns are published to it."""


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in the environment nor in the password database
        return "cli:unknown"


# -- Option types -----------------------------------------------------------------------------------------------


def _when(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 moment: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _duration_s(text: str) -> int:
    """7d, 12h, 30m, 90s or plain seconds (0: none)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration like 7d, 12h, 30m, 90s or 0: {text!r}")
    return int(match[1]) * _UNIT_S[match[2]]


def _days(text: str) -> list[int]:
    if text == "all":
        return []
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or not (last or first).isdigit():
            raise argparse.ArgumentTypeError(f"days must be 'all' or ISO weekdays and ranges like 1-5,7: {text!r}")
        low, high = int(first), int(last or first)
        if not 1 <= low <= high <= 7:
            raise argparse.ArgumentTypeError(f"weekdays run from 1 (Monday) to 7 (Sunday), low to high: {part!r}")
        days.update(range(low, high + 1))
    return sorted(days)


def _hours(text: str) -> dict[str, object]:
    """'1-5 07:00-10:30', 'all 22:00-02:00' (across midnight) or '07:00-10:30' (every day)."""
    days, _, times = text.strip().rpartition(" ")
    match = _TIMES.fullmatch(times)
    if match is None:
        raise argparse.ArgumentTypeError(f"hours must look like '1-5 07:00-10:30' or 'all 22:00-02:00': {text!r}")
    window: dict[str, object] = {"start": match[1].zfill(5), "end": match[2].zfill(5)}
    chosen = _days(days.strip()) if days.strip() else []
    if chosen:
        window["days"] = chosen
    return window


# -- Sessions ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Session:
    conn: asyncpg.Connection
    redis: RedisClient
    settings: Settings
    actor: str

    async def brand_id(self, named: str | None) -> int | None:
        """The brand `--brand` names, by id or slug (None: not given)."""
        if named is None:
            return None
        found = await self.conn.fetchval("SELECT id FROM brands WHERE id::text = $1 OR slug = $1", named)
        if found is None:
            raise InvalidRequest([FieldViolation("brand_id", f"names no brand: {named[:64]!r}")])
        return int(found)

    async def announce(self, committed: Committed[Any]) -> None:
        """Announce the registry version the change produced, as every administration change does."""
        try:
            await notify.publish(self.redis, committed.version)
        except _REDIS_DOWN:
            print(f"rgw: committed as registry version {committed.version}, not announced (Redis)", file=sys.stderr)


def _print_violations(violations: Sequence[FieldViolation]) -> None:
    print("rgw: invalid request, nothing was changed:", file=sys.stderr)
    for v in violations:
        option = _OPTIONS.get(re.split(r"[\[.]", v.field, maxsplit=1)[0])
        print(f"  {option} ({v.field})" if option else f"  {v.field}", v.description, sep=": ", file=sys.stderr)


async def _outcome(session: _Session, args: argparse.Namespace, work: Work) -> int:
    try:
        await work(session, args)
    except InvalidRequest as exc:
        _print_violations(exc.violations)
        return BAD_INPUT
    except NotFoundError as exc:
        print(f"rgw: {exc}; nothing was changed", file=sys.stderr)
        return BAD_INPUT
    except (*_REDIS_DOWN, StoreUnavailable, NotInitialised) as exc:
        print(f"rgw: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def _command(work: Work, *, changes: bool = True) -> Callable[[argparse.Namespace, Settings], Awaitable[int]]:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            conn = await asyncpg.connect(settings.database_url, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            print(f"rgw: cannot reach Postgres (RGW_DATABASE_URL): {type(exc).__name__}", file=sys.stderr)
            return 1
        redis = connect(*settings.redis_target, pool_size=2, timeout_s=max(settings.redis_timeout_seconds, 10))
        try:
            session = _Session(conn, redis, settings, _actor())
            if changes and not await is_initialised(redis):
                raise NotInitialised("Redis is not initialised from Postgres; run `rgw rebuild-redis` first")
            return await _outcome(session, args, work)
        except (*_REDIS_DOWN, NotInitialised) as exc:
            print(f"rgw: {exc or type(exc).__name__}", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()
            await conn.close()

    return run


# -- Output -----------------------------------------------------------------------------------------------------


def campaign_json(c: Campaign) -> dict[str, object]:
    """A campaign as one JSON object (the API's field names)."""
    data = dataclasses.asdict(c)
    data["redemption_hours"] = hours_to_json(c.redemption_hours)
    data["reversal_window"] = data.pop("reversal_window_s")
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


def _print_campaign(c: Campaign) -> None:
    print(json.dumps(campaign_json(c)))


# -- The work ---------------------------------------------------------------------------------------------------

# (option dest, API field) of the rules both create and update take
_RULES = (
    ("name", "name"), ("valid_from", "valid_from"), ("valid_until", "valid_until"), ("valid_days", "valid_days"),
    ("uses_per_code", "uses_per_code"), ("budget_count", "budget_count"), ("budget_value", "budget_value"),
    ("face_value", "face_value"), ("currency", "currency"), ("time_zone", "time_zone"),
    ("hours", "redemption_hours"), ("stores", "allowed_stores"), ("store_groups", "allowed_store_groups"),
    ("reversal_window", "reversal_window"),
)  # fmt: skip
# update's --no-<x>: the field, and the value that clears it
_CLEARED: dict[str, tuple[str, object]] = {
    "no_budget_count": ("budget_count", None), "no_budget_value": ("budget_value", None),
    "no_valid_days": ("valid_days", None), "no_hours": ("redemption_hours", []), "no_stores": ("allowed_stores", []),
    "no_store_groups": ("allowed_store_groups", []),
}  # fmt: skip


def _given(args: argparse.Namespace) -> dict[str, object]:
    changes = {field: getattr(args, dest) for dest, field in _RULES if getattr(args, dest) is not None}
    for flag, (field, cleared) in _CLEARED.items():
        if getattr(args, flag, False):
            if field in changes:
                raise InvalidRequest([FieldViolation(field, f"given and cleared (--{flag.replace('_', '-')}) at once")])
            changes[field] = cleared
    return changes


async def _create(s: _Session, args: argparse.Namespace) -> None:
    fields = _given(args)
    fields["shards"] = args.shards
    brand_id = await s.brand_id(args.brand)
    made = await admin.create_campaign(
        s.conn, s.redis, actor=s.actor, brand_id=DEFAULT_BRAND_ID if brand_id is None else brand_id,
        key_id=s.settings.keyring().active_id, fields=fields,
    )  # fmt: skip
    await s.announce(made)
    if made.value.shards != args.shards:  # a Redis Cluster: the count that spreads over its masters
        print(f"rgw: campaign {made.value.id} has {made.value.shards} shards ({args.shards} asked): that many "
              "spread evenly over the cluster's masters", file=sys.stderr)  # fmt: skip
    if args.json:
        _print_campaign(made.value)
    else:
        print(made.value.id)


async def _update(s: _Session, args: argparse.Namespace) -> None:
    changed = await admin.update_campaign(
        s.conn, s.redis, actor=s.actor, brand_id=await s.brand_id(args.brand), campaign_id=args.campaign,
        changes=_given(args),
    )  # fmt: skip
    await s.announce(changed)
    _print_campaign(changed.value)


def _status_work(status: str) -> Work:
    async def work(s: _Session, args: argparse.Namespace) -> None:
        changed = await admin.set_status(
            s.conn, s.redis, actor=s.actor, brand_id=await s.brand_id(args.brand), campaign_id=args.campaign,
            status=status,
        )  # fmt: skip
        await s.announce(changed)
        _print_campaign(changed.value)

    return work


async def _list(s: _Session, args: argparse.Namespace) -> None:
    found = await admin.list_campaigns(s.conn, brand_id=await s.brand_id(args.brand), limit=1_000_000)
    if args.json:
        for c in found:
            _print_campaign(c)
        return
    print(f"{'id':>8}  {'brand':>6}  {'status':<7} {'shards':>6}  {'budget count':>13}  {'valid until':<26} name")
    for c in found:
        count = "-" if c.budget_count is None else f"{c.budget_count:,}"
        print(f"{c.id:>8}  {c.brand_id:>6}  {c.status:<7} {c.shards:>6}  {count:>13}  "
              f"{c.valid_until.isoformat():<26} {c.name}")  # fmt: skip


async def _stats(s: _Session, args: argparse.Namespace) -> None:
    campaign = await admin.get_campaign(s.conn, args.campaign, await s.brand_id(args.brand))
    figures = await stats.campaign_stats(s.redis, campaign, now_ms=SystemClock().now_ms())
    print(json.dumps(stats.to_json(figures, campaign), indent=2) if args.json else stats.render(figures, campaign))


def _report_json(report: RebalanceReport) -> dict[str, object]:
    return {
        "completed_transfers": report.completed,
        "moves": [dataclasses.asdict(step) for step in report.steps],
        "shares": [
            {"shard": s.shard, "budget_count": s.count, "count_used": s.count_used, "budget_value": s.value,
             "value_used": s.value_used}
            for s in report.shares
        ],
        "over_granted": dict(report.over_granted),
    }  # fmt: skip


def _render_report(report: RebalanceReport) -> str:
    lines = [f"completed {report.completed} interrupted transfer(s); {len(report.steps)} move(s)"]
    for step in report.steps:
        donor = "(the budget)" if step.donor == NOWHERE else f"shard {step.donor}"
        receiver = "(out of the budget)" if step.receiver == NOWHERE else f"shard {step.receiver}"
        lines.append(f"  {step.dimension}: {step.amount:,} from {donor} to {receiver}")
    for s in report.shares:
        count = "-" if s.count is None else f"{s.count - s.count_used:,} unused of {s.count:,}"
        value = "-" if s.value is None else f"{s.value - s.value_used:,} unused of {s.value:,}"
        lines.append(f"  shard {s.shard}: count {count}; value {value}")
    lines += [f"  over budget: {field} {n:,} granted beyond it" for field, n in report.over_granted.items() if n]
    return "\n".join(lines)


async def _rebalance(s: _Session, args: argparse.Namespace) -> None:
    report = await admin.rebalance(s.conn, s.redis, brand_id=await s.brand_id(args.brand), campaign_id=args.campaign)
    print(json.dumps(_report_json(report)) if args.json else _render_report(report))


async def _store_group_set(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    assert brand_id is not None  # argparse required it
    group = await admin.set_store_group(
        s.conn, s.redis, actor=s.actor, brand_id=brand_id, name=args.name, stores=args.stores or []
    )
    await s.announce(group)
    print(json.dumps({"brand_id": brand_id, "name": group.value.name, "stores": list(group.value.stores),
                      "campaign_ids": list(group.value.campaign_ids)}))  # fmt: skip


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.campaigns.status import show

    async def work(s: _Session, args: argparse.Namespace) -> None:
        print(await show(s.conn, s.redis, args.campaign, now_ms=SystemClock().now_ms(), as_json=args.json))

    return await _command(work, changes=False)(args, settings)


# -- Parser -----------------------------------------------------------------------------------------------------


def _rule_options(cmd: argparse.ArgumentParser, *, creating: bool) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    cmd.add_argument("--name", required=creating, help="1 to 200 characters")
    cmd.add_argument("--valid-from", type=_when, default=now if creating else None,
                     help="ISO 8601" + (" (default: now)" if creating else ""))  # fmt: skip
    cmd.add_argument("--valid-until", type=_when, default=now + timedelta(days=30) if creating else None,
                     help="ISO 8601" + (" (default: +30 days)" if creating else ""))  # fmt: skip
    cmd.add_argument("--valid-days", type=_whole, help="a code is valid this many days after its issue")
    cmd.add_argument("--uses-per-code", type=_whole, default=1 if creating else None)
    cmd.add_argument("--budget-count", type=_whole, help="redemptions the campaign may grant in all")
    cmd.add_argument("--budget-value", type=_whole, help="face value (minor units) it may grant in all")
    cmd.add_argument("--face-value", type=_whole, help="each code's face value, minor units of --currency")
    cmd.add_argument("--currency", help="ISO 4217, e.g. CNY (needed with a face value or value budget)")
    cmd.add_argument("--time-zone", help="IANA name the hours are read in (default UTC)")
    cmd.add_argument("--hours", type=_hours, action="append",
                     help="redemption hours (repeatable), e.g. '1-5 07:00-10:30': ISO weekdays or 'all'")  # fmt: skip
    cmd.add_argument("--store", dest="stores", action="append", help="an allowed store's external id (repeatable)")
    cmd.add_argument("--store-group", dest="store_groups", action="append", help="an allowed store group (repeatable)")
    cmd.add_argument("--reversal-window", type=_duration_s, help="e.g. 7d, 12h, 0 (no reversals); default 7d")
    cmd.add_argument("--brand", help="the brand, by id or slug" + (" (default: 1)" if creating else ""))


def _campaign_action(group: Sub, name: str, text: str, work: Work, *, changes: bool = True) -> argparse.ArgumentParser:
    cmd = group.add_parser(name, help=text)
    cmd.add_argument("campaign", type=_whole, help="the campaign's id")
    cmd.add_argument("--brand", help="only if it is this brand's (id or slug)")
    cmd.set_defaults(run=_command(work, changes=changes))
    return cmd


def add_campaign_commands(sub: Sub) -> None:
    """Register `rgw campaign ...` and `rgw store-group ...`."""
    group = sub.add_parser("campaign", help="campaigns").add_subparsers(dest="action", required=True)
    create = group.add_parser("create", help="create a campaign with its rules; prints its id")
    _rule_options(create, creating=True)
    create.add_argument("--shards", type=_whole, default=1, help="campaign shards (Redis hash tags), fixed")
    create.add_argument("--json", action="store_true", help="print the campaign as JSON instead of its id")
    create.set_defaults(run=_command(_create))
    update = group.add_parser("update", help="change a live campaign's rules (only the options given)")
    update.add_argument("campaign", type=_whole, help="the campaign's id")
    _rule_options(update, creating=False)
    for flag in _CLEARED:
        update.add_argument("--" + flag.replace("_", "-"), action="store_true")
    update.set_defaults(run=_command(_update))
    _campaign_action(group, "pause", "pause: every redemption is CAMPAIGN_PAUSED at once", _status_work(PAUSED))
    _campaign_action(group, "resume", "resume a paused campaign", _status_work(ACTIVE))
    listing = group.add_parser("list", help="list campaigns")
    listing.add_argument("--brand", help="only this brand's (id or slug)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=_command(_list, changes=False))
    figures = _campaign_action(group, "stats", "live figures from Redis counters", _stats, changes=False)
    figures.add_argument("--json", action="store_true", help="machine output: one JSON object")
    moves = _campaign_action(group, "rebalance", "even out the shards' unused budget", _rebalance)
    moves.add_argument("--json", action="store_true", help="machine output: one JSON object")
    status = group.add_parser("status", help="a launch's figures: budget, rate, declines, risk denials, outbox lag")
    status.add_argument("campaign", type=_whole, help="the campaign's id")
    status.add_argument("--json", action="store_true", help="machine output: one JSON object")
    status.set_defaults(run=_status)
    groups = sub.add_parser("store-group", help="a brand's store groups").add_subparsers(dest="action", required=True)
    put = groups.add_parser("set", help="create or replace a store group; campaigns allowing it follow at once")
    put.add_argument("name", help="1 to 64 characters of [A-Za-z0-9._:-]")
    put.add_argument("--brand", required=True, help="the brand, by id or slug")
    put.add_argument("--store", dest="stores", action="append", help="a store's external id (repeatable)")
    put.set_defaults(run=_command(_store_group_set))
