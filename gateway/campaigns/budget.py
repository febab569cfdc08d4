"""Budget shares: a campaign's budget (a count and/or a face value) is split between its shards, and the redeem
script grants from a shard only within that shard's share - so the budget is never exceeded, under any
concurrency, with one atomic script call per redemption.

Shares only move by lua/budget_move.lua's steps, each atomic on one shard: `take` lowers a donor's share by at
most what it has not granted and records the transfer in flight (o:<id>), `give` raises the receiver's once per
id, `done` forgets the record. So at every instant the shares plus the transfers in flight add up to no more than
the budget, while redemptions continue. A crash between steps leaves o:<id> records, which `rebalance` completes
first (give is idempotent), so nothing is lost or given twice.

Postgres is the system of record of the budget itself: a budget raised is committed there first and then given
to the shards; a budget lowered is first taken from the shards' unused shares, then committed (`change_budget`).
`rebalance` also brings the shares back to the Postgres budget after a crash in between. Callers serialise the
budget operations of one campaign (gateway/campaigns/admin.py `campaign_lock`): two top-ups of one deficit at once
would give it twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway import keys
from gateway.campaigns.model import Campaign, split
from gateway.redis_client import RedisClient
from gateway.script_calls import load_lua
from gateway.validation import FieldViolation, InvalidRequest

T = TypeVar("T")
NOWHERE = -1  # a take to no shard lowers the budget; a give from none raises it
_TAKE_PASSES = 3  # a lowering racing redemptions tries again this many times before it gives up


@dataclass(frozen=True, slots=True)
class Dimension:
    """One budget: the campaign's field, the share and granted fields of the shards' budget hashes."""

    field: str  # budget_count | budget_value
    share: str  # n | v
    used: str  # un | uv
    unit: str  # how its figures read

    def of(self, campaign: Campaign) -> int | None:
        """The campaign's budget of this kind (None: no limit)."""
        return campaign.budget_count if self.share == "n" else campaign.budget_value

    def amounts(self, amount: int) -> tuple[int, int]:
        """`amount` as a (count, value) pair of a transfer."""
        return (amount, 0) if self.share == "n" else (0, amount)


COUNT = Dimension("budget_count", "n", "un", "redemptions")
VALUE = Dimension("budget_value", "v", "uv", "in face value")
DIMENSIONS = (COUNT, VALUE)


@dataclass(frozen=True, slots=True)
class InFlight:
    """A transfer taken from `donor` and not yet done: o:<id> = "count|value|to"."""

    id: str
    donor: int
    count: int
    value: int
    to: int


@dataclass(frozen=True, slots=True)
class Share:
    """One shard's budget hash: its shares (None: no limit), what it granted, its transfers in flight."""

    shard: int
    count: int | None
    value: int | None
    count_used: int
    value_used: int
    out: tuple[InFlight, ...]

    def share(self, dim: Dimension) -> int | None:
        return self.count if dim is COUNT else self.value

    def used(self, dim: Dimension) -> int:
        return self.count_used if dim is COUNT else self.value_used

    def unused(self, dim: Dimension) -> int:
        """What the shard may still grant (0 without a share: nothing to move)."""
        share = self.share(dim)
        return 0 if share is None else max(share - self.used(dim), 0)


def _int(fields: Mapping[str, str], name: str) -> int | None:
    value = fields.get(name)
    return int(value) if value not in (None, "") else None


def _share(shard: int, fields: Mapping[str, str]) -> Share:
    out = []
    for name, record in fields.items():
        if name.startswith("o:"):
            count, value, to = record.split("|")
            out.append(InFlight(name[2:], shard, int(count), int(value), int(to)))
    return Share(
        shard, _int(fields, "n"), _int(fields, "v"), _int(fields, "un") or 0, _int(fields, "uv") or 0, tuple(out)
    )


async def read_shares(redis: RedisClient, campaign_id: int, shards: int) -> list[Share]:
    """Every shard's budget hash, in one pipelined round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            pipe.hgetall(keys.budget_key(campaign_id, shard))
        replies: list[dict[str, str]] = await pipe.execute()
    return [_share(shard, fields) for shard, fields in enumerate(replies)]


def in_flight_total(shares: Sequence[Share], dim: Dimension) -> int:
    """Taken from a shard, not yet received by another (lowerings in flight excluded: they leave the budget)."""
    return sum(t.count if dim is COUNT else t.value for s in shares for t in s.out if t.to != NOWHERE)


class Moves:
    """The steps of lua/budget_move.lua on the shards of one campaign."""

    def __init__(self, redis: RedisClient, campaign_id: int) -> None:
        self._script = redis.register_script(load_lua("budget_move.lua"))
        self._campaign_id = campaign_id

    async def _call(self, shard: int, *args: str | int) -> object:
        return await self._script(keys=[keys.budget_key(self._campaign_id, shard)], args=list(args))

    async def take(self, shard: int, transfer_id: str, count: int, value: int, to: int) -> tuple[int, int]:
        """Lower the shard's shares by up to (count, value) of what it has not granted; what was taken."""
        taken = await self._call(shard, "take", transfer_id, count, value, to)
        assert isinstance(taken, list)
        return int(taken[0]), int(taken[1])

    async def give(self, shard: int, transfer_id: str, count: int, value: int) -> bool:
        """Raise the shard's shares, once per id; False: that id was already received."""
        return bool(await self._call(shard, "give", transfer_id, count, value))

    async def done(self, shard: int, transfer_id: str) -> None:
        """Forget the donor's record of a transfer received (or of a lowering committed)."""
        await self._call(shard, "done", transfer_id)

    async def cap(self, shard: int, dim: Dimension) -> int:
        """Give a shard without a share one of exactly what it granted; its share after the call."""
        return int(str(await self._call(shard, "cap", dim.share)))

    async def move(self, donor: int, receiver: int, count: int, value: int) -> tuple[int, int]:
        """Take from `donor` (at most its unused share) and give what was taken to `receiver` (NOWHERE: the
        budget is lowered by it); what moved."""
        transfer_id = uuid.uuid4().hex
        count, value = await self.take(donor, transfer_id, count, value, receiver)
        if count or value:
            if receiver != NOWHERE:
                await self.give(receiver, transfer_id, count, value)
            await self.done(donor, transfer_id)
        return count, value

    async def top_up(self, shard: int, count: int, value: int) -> None:
        """Give budget that no shard holds (a budget raised, or restored after a crash)."""
        await self.give(shard, uuid.uuid4().hex, count, value)


# -- Rebalance ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One move of a rebalance: `amount` of a budget from shard `donor` to `receiver` (NOWHERE as the donor: a
    top-up to the Postgres budget; as the receiver: the shares were above it)."""

    dimension: str
    donor: int
    receiver: int
    amount: int


@dataclass(frozen=True, slots=True)
class RebalanceReport:
    """What a rebalance did, and the shares after it."""

    completed: int  # transfers left in flight by an earlier, interrupted operation, completed first
    steps: tuple[Step, ...]
    shares: tuple[Share, ...]
    over_granted: Mapping[str, int]  # by budget field: granted beyond the budget (shares could not be lowered)


def targets(unused: Sequence[int], extra: int) -> list[int]:
    """The unused share each shard should hold: the total (plus `extra`, minus a negative one) split evenly,
    the odd units to the shards holding most now (fewest moves)."""
    total = max(sum(unused) + extra, 0)
    order = sorted(range(len(unused)), key=lambda shard: (-unused[shard], shard))
    shares = split(total, len(unused))  # descending: the larger shares first
    wanted = [0] * len(unused)
    for rank, shard in enumerate(order):
        wanted[shard] = shares[rank]
    return wanted


def plan(unused: Sequence[int], extra: int) -> list[tuple[int, int, int]]:
    """The (donor, receiver, amount) moves that bring every shard's unused share to `targets`, a positive
    `extra` coming from NOWHERE and a negative one going there; donors' takes first, top-ups last."""
    wanted = targets(unused, extra)
    donors = [(s, have - want) for s, (have, want) in enumerate(zip(unused, wanted, strict=True)) if have > want]
    receivers = [(s, want - have) for s, (have, want) in enumerate(zip(unused, wanted, strict=True)) if want > have]
    if extra > 0:
        donors.append((NOWHERE, extra))
    elif extra < 0:
        receivers.append((NOWHERE, min(-extra, sum(unused))))
    moves: list[tuple[int, int, int]] = []
    d = r = 0
    while d < len(donors) and r < len(receivers):
        (donor, supply), (receiver, need) = donors[d], receivers[r]
        amount = min(supply, need)
        if amount > 0:
            moves.append((donor, receiver, amount))
        donors[d], receivers[r] = (donor, supply - amount), (receiver, need - amount)
        if supply == amount:
            d += 1
        if need == amount:
            r += 1
    return moves


async def complete_in_flight(moves: Moves, campaign: Campaign, shares: Sequence[Share]) -> int:
    """Finish the transfers an interrupted operation left (give - skipped if already received - then done); the
    number completed. A budget the campaign no longer has is not given (it would put a limit back)."""
    completed = 0
    for share in shares:
        for transfer in share.out:
            if 0 <= transfer.to < campaign.shards:
                count = transfer.count if campaign.budget_count is not None else 0
                value = transfer.value if campaign.budget_value is not None else 0
                await moves.give(transfer.to, transfer.id, count, value)
            await moves.done(transfer.donor, transfer.id)
            completed += 1
    return completed


async def _limit_every_shard(redis: RedisClient, moves: Moves, campaign: Campaign, dim: Dimension) -> None:
    """Match the shards to the campaign's budget of this kind: no budget, no shares; a budget, a share on every
    shard (a shard found without one is capped at what it granted)."""
    shares = await read_shares(redis, campaign.id, campaign.shards)
    if dim.of(campaign) is None:
        async with redis.pipeline(transaction=False) as pipe:
            for share in shares:
                if share.share(dim) is not None:
                    pipe.hdel(keys.budget_key(campaign.id, share.shard), dim.share)
            await pipe.execute()
        return
    for share in shares:
        if share.share(dim) is None:
            await moves.cap(share.shard, dim)


async def _settle(redis: RedisClient, moves: Moves, campaign: Campaign, dim: Dimension) -> tuple[list[Step], int]:
    """Even out one budget's unused shares, and bring their sum to the campaign's budget; the steps, and what
    was granted beyond the budget (0 but after a budget lowered below what was granted meanwhile)."""
    await _limit_every_shard(redis, moves, campaign, dim)
    budget = dim.of(campaign)
    if budget is None:
        return [], 0
    shares = await read_shares(redis, campaign.id, campaign.shards)
    unused = [share.unused(dim) for share in shares]
    extra = budget - sum(share.share(dim) or 0 for share in shares)
    steps = []
    for donor, receiver, amount in plan(unused, extra):
        if donor == NOWHERE:
            await moves.top_up(receiver, *dim.amounts(amount))
            moved = amount
        else:
            count, value = await moves.move(donor, receiver, *dim.amounts(amount))
            moved = count or value
        if moved:
            steps.append(Step(dim.field, donor, receiver, moved))
    return steps, max(-(extra + sum(unused)), 0)


async def rebalance(redis: RedisClient, campaign: Campaign) -> RebalanceReport:
    """Move unused budget between the campaign's shards until every shard's unused share is equal (to one unit),
    for the count and the value budget, while redemptions continue: first complete what an interrupted operation
    left in flight, then match the shares to `campaign`'s budgets (as Postgres holds them), then even them out.
    Redemptions granted meanwhile only make a take smaller: the shares never exceed the budget."""
    moves = Moves(redis, campaign.id)
    completed = await complete_in_flight(moves, campaign, await read_shares(redis, campaign.id, campaign.shards))
    steps: list[Step] = []
    over: dict[str, int] = {}
    for dim in DIMENSIONS:
        settled, over[dim.field] = await _settle(redis, moves, campaign, dim)
        steps += settled
    shares = await read_shares(redis, campaign.id, campaign.shards)
    return RebalanceReport(completed, tuple(steps), tuple(shares), over)


# -- A budget changed while live ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taken:
    """Shares taken out of the budget (a take to NOWHERE), not yet committed: (shard, transfer id, amount)."""

    dim: Dimension
    parts: tuple[tuple[int, str, int], ...]

    @property
    def total(self) -> int:
        return sum(amount for _, _, amount in self.parts)


def levelled_takes(unused: Sequence[int], amount: int) -> list[int]:
    """How much to take from each shard to take `amount` (at most all there is) so that the unused shares left
    are as level as possible: the fullest shards give first."""
    total = min(max(amount, 0), sum(unused))

    def above(level: int) -> int:
        return sum(max(u - level, 0) for u in unused)

    low, high = 0, max(unused, default=0)  # the highest level L with above(L) >= total
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if above(middle) >= total else (low, middle - 1)
    takes = [max(u - (low + 1), 0) for u in unused]
    rest = total - sum(takes)
    for shard, u in enumerate(unused):  # one more from as many of the shards above the level as needed
        if rest and u > low:
            takes[shard] += 1
            rest -= 1
    return takes


async def take_out(redis: RedisClient, campaign: Campaign, dim: Dimension, amount: int) -> Taken:
    """Take `amount` of unused share out of the shards - the fullest first, so their unused shares stay level -
    retrying while redemptions race it; fewer if the shards do not have it (the caller gives it back)."""
    moves = Moves(redis, campaign.id)
    parts: list[tuple[int, str, int]] = []
    for _ in range(_TAKE_PASSES):
        missing = amount - sum(part[2] for part in parts)
        unused = [s.unused(dim) for s in await read_shares(redis, campaign.id, campaign.shards)]
        if missing <= 0 or not any(unused):
            break
        for donor, asked in enumerate(levelled_takes(unused, missing)):
            if not asked:
                continue
            transfer_id = uuid.uuid4().hex
            count, value = await moves.take(donor, transfer_id, *dim.amounts(asked), NOWHERE)
            if count or value:
                parts.append((donor, transfer_id, count or value))
    return Taken(dim, tuple(parts))


async def give_back(redis: RedisClient, campaign: Campaign, taken: Taken) -> None:
    """Undo take_out: each part back to its shard (under its own transfer id, so never twice), then done."""
    moves = Moves(redis, campaign.id)
    for shard, transfer_id, amount in taken.parts:
        await moves.give(shard, transfer_id, *taken.dim.amounts(amount))
        await moves.done(shard, transfer_id)


async def settle_taken(redis: RedisClient, campaign: Campaign, taken: Taken) -> None:
    """take_out is committed (the budget was lowered in Postgres): forget its records."""
    moves = Moves(redis, campaign.id)
    for shard, transfer_id, _ in taken.parts:
        await moves.done(shard, transfer_id)


async def give_out(redis: RedisClient, campaign: Campaign, dim: Dimension, amount: int) -> None:
    """Give `amount` of new budget to the shards, split evenly (a budget raised, once Postgres holds it)."""
    moves = Moves(redis, campaign.id)
    for shard, part in enumerate(split(amount, campaign.shards)):
        if part:
            await moves.top_up(shard, *dim.amounts(part))


def _refuse(dim: Dimension, message: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation(dim.field, message)])


async def _cap_all(redis: RedisClient, campaign: Campaign, dim: Dimension) -> tuple[list[int], int, int]:
    """Put a limit on every shard of a campaign that had none: each share becomes what the shard granted (so the
    sum is exact: no shard grants more meanwhile). The shards capped here, the shares' sum, and what they granted."""
    moves = Moves(redis, campaign.id)
    capped = [s.shard for s in await read_shares(redis, campaign.id, campaign.shards) if s.share(dim) is None]
    for shard in capped:
        await moves.cap(shard, dim)
    shares = await read_shares(redis, campaign.id, campaign.shards)
    return capped, sum(s.share(dim) or 0 for s in shares), sum(s.used(dim) for s in shares)


async def _uncap(redis: RedisClient, campaign: Campaign, dim: Dimension, shards: Sequence[int]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pipe.hdel(keys.budget_key(campaign.id, shard), dim.share)
        await pipe.execute()


async def _add_limit(
    redis: RedisClient, campaign: Campaign, dim: Dimension, new: int, commit: Callable[[], Awaitable[T]]
) -> T:
    capped, total, granted = await _cap_all(redis, campaign, dim)
    # shares left by an earlier limit (an interrupted removal) count too: above the new budget, they are taken
    taken = await take_out(redis, campaign, dim, total - new) if total > new else Taken(dim, ())
    try:
        if granted > new or taken.total < total - new:
            raise _refuse(dim, f"cannot be {new}: the campaign has already granted {granted} {dim.unit}")
        result = await commit()
    except BaseException:
        await give_back(redis, campaign, taken)
        await _uncap(redis, campaign, dim, capped)
        raise
    await settle_taken(redis, campaign, taken)
    await give_out(redis, campaign, dim, max(new - total, 0))
    return result


async def _lower(
    redis: RedisClient, campaign: Campaign, dim: Dimension, old: int, new: int, commit: Callable[[], Awaitable[T]]
) -> T:
    shares = await read_shares(redis, campaign.id, campaign.shards)
    granted = sum(share.used(dim) for share in shares)
    if granted > new:
        raise _refuse(dim, f"cannot be {new}: the campaign has already granted {granted} {dim.unit}")
    taken = await take_out(redis, campaign, dim, old - new)
    if taken.total < old - new:
        await give_back(redis, campaign, taken)
        raise _refuse(dim, f"cannot be lowered from {old} to {new} now: the shards had only {taken.total} of the "
                      f"{old - new} unused (granted {granted} {dim.unit}, or in a transfer); run a rebalance or "
                      "try again")  # fmt: skip
    try:
        result = await commit()
    except BaseException:
        await give_back(redis, campaign, taken)
        raise
    await settle_taken(redis, campaign, taken)
    return result


async def change_budget(
    redis: RedisClient, before: Campaign, after: Campaign, dim: Dimension, commit: Callable[[], Awaitable[T]]
) -> T:
    """Change one budget of a live campaign from `before`'s to `after`'s around `commit` (the Postgres change),
    never letting the shards' shares exceed either: a budget raised or removed is committed first and then given
    (or its shares dropped); a budget lowered or added is first taken from the shards' unused shares (capped at
    what each granted, for a new one), then committed - and given back if it cannot be taken whole (refused,
    naming the field with the figures) or the commit fails."""
    old, new = dim.of(before), dim.of(after)
    if old == new:
        return await commit()
    if new is None:
        result = await commit()
        await _limit_every_shard(redis, Moves(redis, after.id), after, dim)
        return result
    if old is None:
        return await _add_limit(redis, after, dim, new, commit)
    if new < old:
        return await _lower(redis, after, dim, old, new, commit)
    result = await commit()
    await give_out(redis, after, dim, new - old)
    return result


async def change_budgets(
    redis: RedisClient, before: Campaign, after: Campaign, commit: Callable[[], Awaitable[T]]
) -> T:
    """change_budget for the count and the value budget, around one commit."""

    async def value_then_commit() -> T:
        return await change_budget(redis, before, after, VALUE, commit)

    return await change_budget(redis, before, after, COUNT, value_then_commit)
