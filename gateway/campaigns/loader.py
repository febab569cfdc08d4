"""Loading issued codes into Redis in the compact bucket layout (gateway/keys.py): used by issuance (generated
and imported batches, after their Postgres commit), `rgw codes resume|load`, `rgw rebuild-redis` and
`rgw reconcile --repair` - one loader, so issuing and restoring cannot drift apart.

A code is loaded as one field of its bucket hash (`bucket_field(ref)` = its issue time in seconds) and, only when
its rules differ from its campaign's, its own state hash with those overrides (uses, vf, vu in ms, fv, dev). Codes
are grouped by bucket and sent through lua/load_codes.lua, ~1,000 codes a call and several calls a round trip:
a call sets absent fields only and counts what it added into the shard's budget `iss` in the same atomic step,
so loading is idempotent and `iss` stays exact whatever was loaded before or interrupted half way. Overrides go
in calls before their bucket's: a code is never issued without its own rules. Directory entries of imported codes
(brand directory buckets: "<campaign>.<shard>") go after every code of the load.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from gateway import keys
from gateway.campaigns.model import Campaign, get_campaign
from gateway.redis_client import RedisClient, evalsha_many
from gateway.script_calls import load_lua

ISSUED_COUNTER = "iss"
CALL_CODES = 1_000  # codes (or entries) per script call: ~1.5 ms of Redis time, so redemptions wait little
ROUND_CALLS = 8  # script calls per round trip
WINDOW = 1_000_000  # codes grouped before sending: the more codes a bucket gets in one call, the fewer arguments
FETCH = 20_000  # rows a Postgres cursor fetch
REF_BYTES = keys.REF_CHARS // 2  # of a code_ref, what Redis keeps (bucket and field)
BUCKET_BYTES = keys.BUCKET_CHARS // 2

Progress = Callable[[int], None]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def own_spec(fields: Mapping[str, object]) -> str:
    """A code's overrides as the script takes them: "uses=3,fv=500" ("" when it has none)."""
    return ",".join(f"{name}={value}" for name, value in fields.items() if value is not None)


@dataclass(frozen=True, slots=True)
class Overrides:
    """A code's own rules, where they differ from its campaign's (None: the campaign's)."""

    uses: int | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    face_value: int | None = None
    bound_device: str | None = None

    def spec(self) -> str:
        """The code hash fields (layout.CODE names), as own_spec gives them."""
        return own_spec({
            "uses": self.uses,
            "vf": None if self.valid_from is None else _ms(self.valid_from),
            "vu": None if self.valid_until is None else _ms(self.valid_until),
            "fv": self.face_value,
            "dev": self.bound_device,
        })  # fmt: skip

    @classmethod
    def of_row(cls, campaign: Campaign, row: Mapping[str, Any]) -> Overrides:
        """What an issued_codes row sets that its campaign does not (NULL columns, and values equal to the
        campaign's in rows written before migration 0007, are the campaign's)."""

        def differs(value: Any, campaign_value: Any) -> Any:
            return None if value is None or value == campaign_value else value

        return cls(
            uses=differs(row["uses"], campaign.uses_per_code),
            valid_from=differs(row["valid_from"], campaign.valid_from),
            valid_until=differs(row["valid_until"], campaign.valid_until),
            face_value=differs(row["face_value"], campaign.face_value),
            bound_device=row["bound_device"],
        )


Call = tuple[list[str], list[str]]  # one script call: KEYS, ARGV
Part = tuple[str, int]  # a bucket's spec for one call, and the entries in it


class BucketLoader:
    """Codes and directory entries added, grouped by bucket, and sent in script calls on `flush` (also due when
    `full`). `loaded` counts the codes sent, `added` the bucket fields that were new."""

    def __init__(
        self, redis: RedisClient, campaign_id: int, *, window: int = WINDOW, progress: Progress | None = None
    ) -> None:
        self._redis = redis
        self._campaign_id = campaign_id
        self._window = window
        self._progress = progress
        self._sha = ""
        self._entries: dict[int, dict[str, list[str]]] = {}  # shard -> bucket key -> "field=issued_s" entries
        self._packed: dict[int, dict[str, list[Part]]] = {}  # shard -> bucket key -> packed specs
        self._own: dict[str, str] = {}  # code key -> overrides spec
        self._directory: dict[str, list[str]] = {}  # directory bucket key -> "field=campaign.shard" entries
        self._pending = 0
        self.loaded = 0
        self.added = 0

    @property
    def full(self) -> bool:
        return self._pending >= self._window

    def add(self, shard: int, ref: str, issued_s: int, own: str = "") -> None:
        """Queue a code: its shard, code_ref (hex, at least REF_CHARS), issue time and overrides (own_spec)."""
        buckets = self._entries.setdefault(shard, {})
        buckets.setdefault(keys.bucket_key(self._campaign_id, shard, ref), []).append(
            f"{keys.bucket_field(ref)}={issued_s}"
        )
        if own:
            self._own[keys.code_key(self._campaign_id, shard, ref)] = own
        self._pending += 1

    def add_packed(self, shard: int, bucket: str, fields: str, issued_s: int) -> None:
        """Queue codes of one bucket (its BUCKET_CHARS hex characters) that share an issue time and have no
        overrides, given as their bucket fields concatenated: the fast path of a generated batch, which groups
        its codes by bucket while Postgres copies them (no per-code work is left for after the commit)."""
        width = keys.REF_CHARS - keys.BUCKET_CHARS
        count = len(fields) // width
        parts = self._packed.setdefault(shard, {}).setdefault(keys.bucket_key(self._campaign_id, shard, bucket), [])
        step = CALL_CODES * width
        for start in range(0, len(fields), step):
            part = fields[start : start + step]
            parts.append((f"*{issued_s}*{part}", len(part) // width))
        self._pending += count

    def add_directory(self, brand_id: int, dir_ref: str, shard: int) -> None:
        """Queue an imported code's directory entry (sent by `close`, after every code of the load)."""
        self._directory.setdefault(keys.directory_key(brand_id, dir_ref), []).append(
            f"{keys.bucket_field(dir_ref)}={self._campaign_id}.{shard}"
        )

    async def flush(self) -> None:
        """Send every queued code: overrides first, then the buckets."""
        own, entries, packed, pending = self._own, self._entries, self._packed, self._pending
        self._own, self._entries, self._packed, self._pending = {}, {}, {}, 0
        await self._send([_own_call(key, spec) for key, spec in own.items()])
        calls: list[Call] = []
        for shard in sorted({*entries, *packed}):
            parts = _parts(entries.get(shard, {}))
            for key, more in packed.get(shard, {}).items():
                parts.setdefault(key, []).extend(more)
            calls += _bucket_calls(keys.budget_key(self._campaign_id, shard), ISSUED_COUNTER, parts)
        self.added += await self._send(calls)
        self.loaded += pending
        if self._progress is not None and pending:
            self._progress(pending)

    async def close(self) -> int:
        """Flush the codes, then the directory entries; returns the codes loaded."""
        await self.flush()
        directory, self._directory = self._directory, {}
        by_tag: dict[str, dict[str, list[str]]] = {}
        for key, entries in directory.items():
            by_tag.setdefault(key[: key.index("}") + 1], {})[key] = entries
        await self._send([call for by_key in by_tag.values() for call in _bucket_calls("", "", _parts(by_key))])
        return self.loaded

    async def _send(self, calls: list[Call]) -> int:
        """Run the calls, ROUND_CALLS a round trip; the bucket fields they added."""
        added = 0
        for start in range(0, len(calls), ROUND_CALLS):
            added += await self._round(calls[start : start + ROUND_CALLS])
        return added

    async def _round(self, calls: list[Call]) -> int:
        if not self._sha:
            self._sha = await self._redis.script_load(load_lua("load_codes.lua"))
        try:
            return await self._pipelined(calls)
        except redis_errors.NoScriptError:  # a restarted Redis: load the script again (calls are idempotent)
            self._sha = await self._redis.script_load(load_lua("load_codes.lua"))
            return await self._pipelined(calls)

    async def _pipelined(self, calls: list[Call]) -> int:
        replies = await evalsha_many(self._redis, self._sha, calls)
        return sum(int(reply) for reply in replies)


def _own_call(key: str, spec: str) -> Call:
    return [key, key], ["", "1", spec]


def _parts(entries: Mapping[str, list[str]]) -> dict[str, list[Part]]:
    """Each bucket's "field=value" entries as specs of at most CALL_CODES entries."""
    return {
        key: [(",".join(listed[start : start + CALL_CODES]), len(listed[start : start + CALL_CODES]))
              for start in range(0, len(listed), CALL_CODES)]
        for key, listed in entries.items()
    }  # fmt: skip


def _bucket_calls(counter_key: str, counter: str, buckets: Mapping[str, list[Part]]) -> list[Call]:
    """Calls of ~CALL_CODES entries each over buckets of one hash tag (KEYS[1]: `counter_key`, or the call's first
    bucket when there is no counter)."""
    calls: list[Call] = []
    call_keys: list[str] = []
    call_args: list[str] = []
    size = 0
    for key, parts in buckets.items():
        for spec, count in parts:
            call_keys.append(key)
            call_args.append(spec)
            size += count
            if size >= CALL_CODES:
                calls.append(_call(counter_key, counter, call_keys, call_args))
                call_keys, call_args, size = [], [], 0
    if call_keys:
        calls.append(_call(counter_key, counter, call_keys, call_args))
    return calls


def _call(counter_key: str, counter: str, bucket_keys: list[str], specs: list[str]) -> Call:
    return [counter_key or bucket_keys[0], *bucket_keys], [counter, "0", *specs]


# Rows a load reads; with a batch, only that batch's (the campaign index narrows the scan to the campaign).
_CODES = """SELECT code_ref, shard, uses, valid_from, valid_until, face_value, bound_device, issued_at
            FROM issued_codes WHERE campaign_id = $1 AND ($2::uuid IS NULL OR batch_id = $2)"""
_DIRECTORY = """SELECT d.brand_id, d.dir_ref, d.shard FROM code_directory d
                WHERE d.campaign_id = $1 AND ($2::uuid IS NULL OR EXISTS (
                    SELECT 1 FROM issued_codes i WHERE i.code_ref = d.code_ref AND i.batch_id = $2))"""
_OVERRIDE_COLUMNS = ("uses", "valid_from", "valid_until", "face_value", "bound_device")


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a load sent: codes, and the bucket fields among them that were new."""

    codes: int
    added: int


def _own_of_row(campaign: Campaign, row: asyncpg.Record) -> str:
    if all(row[column] is None for column in _OVERRIDE_COLUMNS):
        return ""  # the common case since migration 0007: the campaign's rules
    return Overrides.of_row(campaign, row).spec()


async def load_from_postgres(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    campaign_id: int,
    batch_id: uuid.UUID | None = None,
    progress: Progress | None = None,
) -> Loaded:
    """Load every code of the campaign (or of one batch) from issued_codes into its buckets, with its overrides,
    then the directory entries of its imported codes. Idempotent."""
    campaign = await get_campaign(conn, campaign_id)
    loader = BucketLoader(redis, campaign_id, progress=progress)
    async with conn.transaction():  # a cursor lives in a transaction
        cursor = await conn.cursor(_CODES, campaign_id, batch_id)
        while rows := await cursor.fetch(FETCH):
            for row in rows:
                loader.add(row["shard"], row["code_ref"].hex(), int(row["issued_at"].timestamp()),
                           _own_of_row(campaign, row))  # fmt: skip
            if loader.full:
                await loader.flush()
        await loader.flush()
        cursor = await conn.cursor(_DIRECTORY, campaign_id, batch_id)
        while rows := await cursor.fetch(FETCH):
            for row in rows:
                loader.add_directory(row["brand_id"], row["dir_ref"].hex(), row["shard"])
    await loader.close()
    return Loaded(loader.loaded, loader.added)
