"""Code uses and their reversals as both sides record them - Redis use and reversal records, ledger rows - and the
repairs between them: re-enqueue what the ledger is missing, apply in Redis what Redis is missing (fail closed: a
use the ledger knows is never granted again; a reversal it knows gives its use and budget back exactly once)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

import asyncpg
from redis import exceptions as redis_errors
from redis.commands.core import AsyncScript

from gateway import keys
from gateway.campaigns import layout
from gateway.ledger.events import encode_event, encode_reversal_event
from gateway.redis_client import RedisClient, ScriptCall, evalsha_many
from gateway.script_calls import load_lua

# Script calls per pipelined round trip when repairing (a rebuild replays every use of the ledger).
REPAIR_BATCH = 500

_LEDGER_USES = """
SELECT cu.code_ref, cu.use_number, r.redemption_id, r.redeemed_at, r.fingerprint, r.caller, r.store_id,
       r.terminal_id, r.customer_device_id, r.latitude, r.longitude, r.accuracy_m, r.idempotency_scope,
       r.client_id, r.brand_id, r.key_id, r.campaign_id, r.shard, r.face_value,
       COALESCE(ic.uses, c.uses_per_code) AS uses
FROM code_uses cu
JOIN redemptions r ON r.redemption_id = cu.redemption_id
JOIN campaigns c ON c.id = r.campaign_id
LEFT JOIN issued_codes ic ON ic.code_ref = cu.code_ref
WHERE r.campaign_id = $1"""

_LEDGER_REVERSALS = """
SELECT reversal_id, redemption_id, code_ref, key_id, use_number, campaign_id, shard, face_value, reason, caller,
       client_id, brand_id, reversed_at, idempotency_scope, fingerprint
FROM reversals
WHERE campaign_id = $1"""

Key = tuple[str, int]  # (code_ref hex, use number): one use of one code, and its reversal
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Use:
    """One use of one code, with what its outbox event carries."""

    campaign_id: int
    shard: int
    code_ref: str  # hex
    key_id: str
    use_number: int
    redemption_id: str
    at_ms: int
    fingerprint: str
    caller: str
    store_id: str
    terminal_id: str
    device: str
    lat: str
    lon: str
    acc: str
    idem: str
    client_id: str
    brand_id: str
    face_value: int = 0  # what the budget counted for this use (minor units)
    uses_total: int = 0

    @property
    def key(self) -> Key:
        return (self.code_ref, self.use_number)

    def record(self) -> str:
        """The Redis use record (layout.USE_RECORD)."""
        return "|".join((self.redemption_id, str(self.at_ms), self.fingerprint, self.caller, self.store_id,
                         self.terminal_id, self.device, self.lat, self.lon, self.acc, self.idem, self.client_id,
                         self.brand_id, str(self.face_value)))  # fmt: skip

    def event(self) -> dict[str, str]:
        """The outbox entry, as the redeem script writes it."""
        return encode_event({
            "rid": self.redemption_id, "ref": self.code_ref, "kid": self.key_id, "cid": str(self.campaign_id),
            "shard": str(self.shard), "use": str(self.use_number), "at": str(self.at_ms), "fp": self.fingerprint,
            "caller": self.caller, "store": self.store_id, "term": self.terminal_id, "dev": self.device,
            "lat": self.lat, "lon": self.lon, "acc": self.acc, "idem": self.idem, "client": self.client_id,
            "brand": self.brand_id, "fv": str(self.face_value),
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class Reversal:
    """The reversal of one use of one code, with what its outbox event carries."""

    campaign_id: int
    shard: int
    code_ref: str  # hex
    key_id: str
    use_number: int
    reversal_id: str
    redemption_id: str
    at_ms: int
    face_value: int  # given back to the value budget: the use's
    reason: str
    caller: str
    client_id: str
    brand_id: str
    idem: str = ""  # the reverse call's idempotency field (r:<scope>) and fingerprint: not in the Redis record
    fingerprint: str = ""

    @property
    def key(self) -> Key:
        return (self.code_ref, self.use_number)

    def record(self) -> str:
        """The Redis reversal record (layout.REVERSAL_RECORD)."""
        return "|".join((self.reversal_id, str(self.at_ms), self.reason, self.caller, self.client_id))

    def event(self) -> dict[str, str]:
        """The outbox entry, as the reverse script writes it."""
        return encode_reversal_event({
            "xid": self.reversal_id, "rid": self.redemption_id, "ref": self.code_ref, "kid": self.key_id,
            "cid": str(self.campaign_id), "shard": str(self.shard), "use": str(self.use_number),
            "at": str(self.at_ms), "fv": str(self.face_value), "reason": self.reason, "caller": self.caller,
            "client": self.client_id, "brand": self.brand_id, "idem": self.idem, "fp": self.fingerprint,
        })  # fmt: skip


def _fields(record: str, names: Sequence[str]) -> dict[str, str]:
    """A "|"-joined record by field name; fields an older record lacks are empty."""
    values = record.split("|")
    return {name: values[i] if i < len(values) else "" for i, name in enumerate(names)}


def from_record(campaign_id: int, shard: int, code_ref: str, key_id: str, use_number: int, record: str) -> Use:
    """A Use from a Redis use record. One written before brands has no client and belongs to the default brand;
    one written before face values counted none (0)."""
    f = _fields(record, layout.USE_RECORD)
    return Use(campaign_id, shard, code_ref, key_id, use_number, f["rid"], int(f["at"] or 0), f["fp"], f["caller"],
               f["store"], f["term"], f["dev"], f["lat"], f["lon"], f["acc"], f["idem"], f["client"],
               f["brand"] or "1", int(f["fv"] or 0))  # fmt: skip


def reversal_from_record(use: Use, record: str) -> Reversal:
    """A Reversal from a Redis reversal record of `use` (the redemption it reverses, and the face value and
    brand, come from the use record; the reverse call's idempotency scope and fingerprint are not kept there)."""
    f = _fields(record, layout.REVERSAL_RECORD)
    return Reversal(use.campaign_id, use.shard, use.code_ref, use.key_id, use.use_number, f["xid"], use.redemption_id,
                    int(f["at"] or 0), use.face_value, f["reason"], f["caller"], f["client"], use.brand_id)  # fmt: skip


def _coordinate(value: float | None) -> str:
    return "" if value is None else repr(value)


def _ms(record: asyncpg.Record, column: str) -> int:
    return int(record[column].timestamp() * 1000)


async def ledger_uses(conn: asyncpg.Connection, campaign_id: int) -> dict[Key, Use]:
    """Every code use of a campaign the ledger holds (the first redemption of each use)."""
    uses = {}
    for r in await conn.fetch(_LEDGER_USES, campaign_id):
        use = Use(
            r["campaign_id"], r["shard"], r["code_ref"].hex(), r["key_id"], r["use_number"], str(r["redemption_id"]),
            _ms(r, "redeemed_at"), r["fingerprint"], r["caller"], r["store_id"], r["terminal_id"],
            r["customer_device_id"], _coordinate(r["latitude"]), _coordinate(r["longitude"]),
            _coordinate(r["accuracy_m"]), r["idempotency_scope"], r["client_id"], str(r["brand_id"]), r["face_value"],
            r["uses"] or 0,
        )  # fmt: skip
        uses[use.key] = use
    return uses


async def ledger_reversals(conn: asyncpg.Connection, campaign_id: int) -> dict[Key, Reversal]:
    """Every reversal of a campaign the ledger holds (at most one per redemption, so per code use)."""
    reversals = {}
    for r in await conn.fetch(_LEDGER_REVERSALS, campaign_id):
        reversal = Reversal(
            r["campaign_id"], r["shard"], r["code_ref"].hex(), r["key_id"], r["use_number"], str(r["reversal_id"]),
            str(r["redemption_id"]), _ms(r, "reversed_at"), r["face_value"], r["reason"], r["caller"],
            r["client_id"], str(r["brand_id"]), r["idempotency_scope"], r["fingerprint"],
        )  # fmt: skip
        reversals[reversal.key] = reversal
    return reversals


@dataclass(frozen=True, slots=True)
class History:
    """Uses left after each use and each reversal, replayed per code in time order from the ledger: the last value
    of the idempotency record each answer left (i:<scope> for a use, r:<scope> for a reversal)."""

    after_use: dict[Key, int] = field(default_factory=dict)
    after_reversal: dict[Key, int] = field(default_factory=dict)

    @classmethod
    def replay(cls, uses: Iterable[Use], reversals: Iterable[Reversal]) -> History:
        by_code: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
        totals: dict[str, int] = {}
        for use in uses:
            by_code[use.code_ref].append((use.at_ms, use.use_number, False))
            totals[use.code_ref] = use.uses_total
        for reversal in reversals:
            by_code[reversal.code_ref].append((reversal.at_ms, reversal.use_number, True))
        history = cls()
        for code_ref, events in by_code.items():
            used = 0
            for _, number, reversed_ in sorted(events):  # a use sorts before its reversal in the same ms
                used += -1 if reversed_ else 1
                left = max(totals.get(code_ref, 0) - used, 0)
                (history.after_reversal if reversed_ else history.after_use)[(code_ref, number)] = left
        return history


@dataclass
class ReversalRepairs:
    """What applying ledger reversals in Redis did: how many were applied, and those that could not be (their use
    not recorded in Redis, or recorded there under another redemption id)."""

    applied: int = 0
    skipped: list[tuple[Reversal, str]] = field(default_factory=list)


_SKIPPED = {-1: "its use is not recorded in Redis", -2: "its use carries another redemption id in Redis"}


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class UseRepairs:
    """Writes that bring Redis and the outbox in line with the ledger, and the other way round."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._mark_used = redis.register_script(load_lua("mark_used.lua"))
        self._mark_reversed = redis.register_script(load_lua("mark_reversed.lua"))

    async def mark_used(self, uses: Iterable[Use], history: History | None = None) -> int:
        """Record ledger uses in Redis and count them in their shard's budget (fail closed); returns how many were
        new. Their codes must be issued in Redis (LookupError otherwise, after the rest were recorded)."""
        history = history or History()
        added, missing = 0, []
        for chunk in _chunks(uses, REPAIR_BATCH):
            results = await self._run(self._mark_used, [_mark_used_call(use, history) for use in chunk])
            added += sum(1 for r in results if r == 1)
            missing += [use for use, r in zip(chunk, results, strict=True) if r == -1]
        if missing:
            use = missing[0]
            raise LookupError(f"{len(missing)} used codes of campaign {use.campaign_id} are not issued in Redis "
                              f"(code_ref {use.code_ref[:12]}, …): load the codes first")  # fmt: skip
        return added

    async def mark_reversed(self, reversals: Iterable[Reversal], history: History | None = None) -> ReversalRepairs:
        """Apply ledger reversals in Redis (their uses must be recorded: mark them used first): each gives its use
        and budget back once; one already applied is left alone."""
        history = history or History()
        outcome = ReversalRepairs()
        for chunk in _chunks(reversals, REPAIR_BATCH):
            results = await self._run(self._mark_reversed, [_mark_reversed_call(x, history) for x in chunk])
            outcome.applied += sum(1 for r in results if r == 1)
            outcome.skipped += [(x, _SKIPPED[r]) for x, r in zip(chunk, results, strict=True) if r in _SKIPPED]
        return outcome

    async def _run(self, script: AsyncScript, calls: list[ScriptCall]) -> list[Any]:
        """One pipelined round of script calls (per master on a cluster); a Redis that forgot the script (it
        restarted) gets it again and the round is repeated - the scripts are idempotent."""
        try:
            return await evalsha_many(self.redis, script.sha, calls)
        except redis_errors.NoScriptError:
            await self.redis.script_load(script.script)
            return await evalsha_many(self.redis, script.sha, calls)

    async def reenqueue(self, uses: Iterable[Use]) -> int:
        """Append the outbox events of uses the ledger is missing (the writer inserts them idempotently)."""
        return await self._append((keys.outbox_key(u.campaign_id, u.shard), u.event()) for u in uses)

    async def reenqueue_reversals(self, reversals: Iterable[Reversal]) -> int:
        """Append the outbox events of reversals the ledger is missing (inserted idempotently, by reversal id)."""
        return await self._append((keys.outbox_key(x.campaign_id, x.shard), x.event()) for x in reversals)

    async def _append(self, events: Iterable[tuple[str, Mapping[str, str]]]) -> int:
        count = 0
        for stream, fields in events:
            await self.redis.xadd(stream, dict(fields))  # type: ignore[arg-type]
            count += 1
        return count


def _mark_used_call(use: Use, history: History) -> ScriptCall:
    left = history.after_use.get(use.key, max(use.uses_total - use.use_number, 0))
    idem_record = f"{use.fingerprint}|{use.redemption_id}|{use.at_ms}|{use.use_number}|{left}"
    script_keys = [
        keys.bucket_key(use.campaign_id, use.shard, use.code_ref),
        keys.code_key(use.campaign_id, use.shard, use.code_ref),
        keys.budget_key(use.campaign_id, use.shard),
    ]
    args: list[str | int] = [keys.bucket_field(use.code_ref), use.use_number, use.record(), use.at_ms,
                             use.idem, idem_record, use.face_value]  # fmt: skip
    return script_keys, args


def _mark_reversed_call(reversal: Reversal, history: History) -> ScriptCall:
    left = history.after_reversal.get(reversal.key, 0)
    idem_record = f"{reversal.fingerprint}|{reversal.reversal_id}|{reversal.at_ms}|{reversal.use_number}|{left}"
    script_keys = [
        keys.code_key(reversal.campaign_id, reversal.shard, reversal.code_ref),
        keys.budget_key(reversal.campaign_id, reversal.shard),
    ]
    record = reversal.record()
    args: list[str | int] = [reversal.use_number, reversal.redemption_id, record, reversal.idem, idem_record]
    return script_keys, args
