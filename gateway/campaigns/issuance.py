"""Batches of codes: generated (`rgw codes generate`, AdminService.GenerateCodes) or imported (`rgw codes import`,
gateway/campaigns/importing.py), and resumed (`rgw codes resume`).

A batch is one Postgres transaction: its `code_batches` row (state 'loading') and every issued_codes row (COPY,
one savepoint per chunk) commit together, or nothing does. Only then is Redis loaded (gateway/campaigns/loader.py)
and the batch marked 'active'. So Redis never holds a code of an uncommitted batch, and a run killed after the
commit leaves a 'loading' batch that `rgw codes resume` finishes (loading is idempotent); a run killed before it
leaves nothing at all. A campaign with a 'loading' batch gets no new batch until it is resumed.

The plaintext leaves this module once, to the caller of `generate_stream` (a file, or the RPC's stream); Postgres
and Redis only ever see code_refs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import asyncpg

from gateway import codes as code_format
from gateway.campaigns import loader
from gateway.campaigns.codegen import CodeFactory
from gateway.campaigns.loader import BucketLoader, Overrides, Progress
from gateway.campaigns.model import Campaign
from gateway.coderefs import KeyRing
from gateway.redis_client import RedisClient

log = logging.getLogger("rgw.issuance")

MAX_CODES = 10_000_000  # per batch
COPY_CHUNK = 50_000  # codes per COPY, each in a savepoint (a duplicate code_ref regenerates this chunk only)
STREAM_CHUNK = 10_000  # codes per chunk yielded by generate_stream
_SLICE = 5_000  # codes generated between two yields to the event loop, so the COPY in flight keeps streaming
# Regenerations of one chunk after a duplicate code_ref: 65 random bits a code make a repeat within a campaign of
# n codes a ~n^2 / 2^66 event (10^-6 at ten million), so one retry is rare and five in a row mean a broken source.
_RETRIES = 5
GENERATED, IMPORTED = "generated", "imported"  # code_batches.kind

_INSERT_BATCH = """INSERT INTO code_batches (id, campaign_id, kind, codes, state, actor)
                   VALUES ($1, $2, $3, $4, 'loading', $5) RETURNING created_at"""
_ACTIVATE = "UPDATE code_batches SET state = 'active', loaded_at = now() WHERE id = $1 AND state = 'loading'"
_LOADING = """SELECT id, campaign_id, kind, codes, created_at FROM code_batches
              WHERE state = 'loading' AND ($1::bigint IS NULL OR campaign_id = $1) ORDER BY created_at"""
_BASE_COLUMNS = ["code_ref", "key_id", "campaign_id", "shard", "batch_id"]
_FULL_REF = 32


class IssuanceError(RuntimeError):
    """A batch could not be issued; the message says why and what to do (safe to show an operator)."""


class IssuanceIncomplete(IssuanceError):
    """Codes were recorded in Postgres (and handed out) but are not all redeemable until Redis is loaded."""


class BatchesLoading(IssuanceError):
    """The campaign has a batch committed but not (yet) loaded into Redis."""


@dataclass(frozen=True, slots=True)
class BatchCommitted:
    """generate_stream: the batch's Postgres transaction committed; its codes are issued (Redis loads next)."""

    batch_id: uuid.UUID
    campaign_id: int
    codes: int


@dataclass(frozen=True, slots=True)
class BatchDone:
    """The batch is active: Redis holds every code of it. `added` counts the bucket fields that were new."""

    batch_id: uuid.UUID
    campaign_id: int
    codes: int
    added: int


StreamItem = list[str] | BatchCommitted | BatchDone


@dataclass(frozen=True, slots=True)
class LoadingBatch:
    """A batch committed to Postgres and not known to be fully loaded into Redis."""

    id: uuid.UUID
    campaign_id: int
    kind: str
    codes: int


async def loading_batches(conn: asyncpg.Connection, campaign_id: int | None = None) -> list[LoadingBatch]:
    """The batches in state 'loading' (of one campaign, or of all), oldest first."""
    rows = await conn.fetch(_LOADING, campaign_id)
    return [LoadingBatch(r["id"], r["campaign_id"], r["kind"], r["codes"]) for r in rows]


async def refuse_if_loading(conn: asyncpg.Connection, campaign_id: int) -> None:
    """BatchesLoading when the campaign has a 'loading' batch (resume it first)."""
    batches = await loading_batches(conn, campaign_id)
    if batches:
        raise BatchesLoading(
            f"campaign {campaign_id} has {len(batches)} batch(es) committed but not loaded into Redis "
            f"(an interrupted run, or one still loading): run `rgw codes resume --campaign {campaign_id}` first"
        )


async def insert_batch(
    conn: asyncpg.Connection, batch_id: uuid.UUID, campaign_id: int, kind: str, count: int, actor: str
) -> int:
    """The batch's row (inside its transaction); returns the codes' issue time, seconds (the transaction's start,
    as issued_codes.issued_at records it)."""
    created = await conn.fetchval(_INSERT_BATCH, batch_id, campaign_id, kind, count, actor)
    return int(created.timestamp())


async def activate(conn: asyncpg.Connection, batch_id: uuid.UUID) -> None:
    """Mark a batch active: Redis holds every code of it."""
    await conn.execute(_ACTIVATE, batch_id)


def check_face_value(campaign: Campaign, face_value: int | None) -> None:
    """A code's own face value: 0..10^12 minor units, and money needs the campaign's currency."""
    if face_value is None:
        return
    if not 0 <= face_value <= 10**12:
        raise ValueError("face value must be 0 to 10^12 minor units")
    if face_value and campaign.currency is None:
        raise ValueError(f"campaign {campaign.id} has no currency: its codes cannot have a face value")


# -- generation ---------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """One COPY's codes: plaintext, shards and code_refs."""

    plain: list[bytes]
    shards: list[int]
    refs: list[bytes]


@dataclass
class _Generation:
    """A generated batch in the making: its codes are made, hashed and COPYed chunk by chunk (the next chunk is
    made while the previous one's COPY runs), and what Redis needs is kept compactly for the load after commit."""

    campaign: Campaign
    keyring: KeyRing
    batch_id: uuid.UUID
    own: Overrides
    factory: CodeFactory
    # What Redis will need, grouped by shard and bucket (the first BUCKET_BYTES of the code_ref) while Postgres
    # copies: the rest of each code_ref Redis keeps (or all of it, for codes with overrides), concatenated.
    kept: dict[int, dict[bytes, bytearray]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        extra = [name for name in ("face_value", "bound_device") if getattr(self.own, name) is not None]
        return _BASE_COLUMNS + extra

    async def make(self, count: int) -> _Chunk:
        chunk = _Chunk([], [], [])
        for start in range(0, count, _SLICE):
            plain, shards = self.factory.make(min(_SLICE, count - start))
            chunk.plain += plain
            chunk.shards += shards
            chunk.refs += self.keyring.refs_of(self.campaign.key_id, self.campaign.id, plain)
            await asyncio.sleep(0)
        return chunk

    def records(self, chunk: _Chunk) -> list[tuple[object, ...]]:
        """The chunk's issued_codes rows (`columns`): the rules the batch shares with its campaign stay NULL."""
        kid, cid, batch_id = self.campaign.key_id, self.campaign.id, self.batch_id
        own = tuple(v for v in (self.own.face_value, self.own.bound_device) if v is not None)
        return [(ref, kid, cid, shard, batch_id, *own) for ref, shard in zip(chunk.refs, chunk.shards, strict=True)]

    async def copy(self, conn: asyncpg.Connection, chunk: _Chunk) -> _Chunk:
        """COPY the chunk in a savepoint; on a duplicate code_ref (in the chunk, or issued before), a new chunk."""
        for _ in range(_RETRIES):
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table("issued_codes", records=self.records(chunk),
                                                     columns=self.columns)  # fmt: skip
                self._keep(chunk)
                return chunk
            except asyncpg.UniqueViolationError:
                log.warning("batch %s: a generated code_ref exists already; regenerating its chunk", self.batch_id)
                chunk = await self.make(len(chunk.plain))
        raise IssuanceError(f"batch {self.batch_id}: code_refs keep colliding; is the random source broken?")

    def _keep(self, chunk: _Chunk) -> None:
        whole = bool(self.own.spec())  # a code with overrides needs its whole code_ref (its code hash)
        start, stop = (0, _FULL_REF) if whole else (loader.BUCKET_BYTES, loader.REF_BYTES)
        kept = self.kept
        for ref, shard in zip(chunk.refs, chunk.shards, strict=True):
            buckets = kept.get(shard)
            if buckets is None:
                buckets = kept[shard] = {}
            bucket = ref[: loader.BUCKET_BYTES]
            tails = buckets.get(bucket)
            if tails is None:
                buckets[bucket] = bytearray(ref[start:stop])
            else:
                tails += ref[start:stop]

    async def copied(self, conn: asyncpg.Connection, count: int) -> AsyncGenerator[list[bytes], None]:
        """The batch's plaintext, chunk by chunk, each once its COPY succeeded; the next chunk is made while the
        previous one's COPY runs. Closing this generator cancels the COPY in flight."""
        sizes = [min(COPY_CHUNK, count - start) for start in range(0, count, COPY_CHUNK)]
        pending = asyncio.create_task(self.copy(conn, await self.make(sizes[0])))
        try:
            for size in sizes[1:]:
                following = await self.make(size)
                done = await pending
                pending = asyncio.create_task(self.copy(conn, following))
                yield done.plain
            yield (await pending).plain
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                    await pending

    async def load(self, redis: RedisClient, issued_s: int, progress: Progress | None) -> int:
        """Load the kept code_refs into Redis (after the commit); the bucket fields added."""
        batch_loader = BucketLoader(redis, self.campaign.id, progress=progress)
        own = self.own.spec()
        for shard, buckets in self.kept.items():
            for bucket, tails in buckets.items():
                if own:
                    for start in range(0, len(tails), _FULL_REF):
                        batch_loader.add(shard, tails[start : start + _FULL_REF].hex(), issued_s, own)
                else:
                    batch_loader.add_packed(shard, bucket.hex(), tails.hex(), issued_s)
                if batch_loader.full:
                    await batch_loader.flush()
        await batch_loader.close()
        return batch_loader.added


def _texts(plain: list[bytes]) -> list[str]:
    return b"\n".join(plain).decode("ascii").split("\n") if plain else []


def _check_generation(campaign: Campaign, keyring: KeyRing, count: int, face_value: int | None) -> None:
    if not 1 <= count <= MAX_CODES:
        raise ValueError(f"count must be 1 to {MAX_CODES:,} codes a batch")
    if campaign.key_id not in keyring.key_ids:
        raise IssuanceError(f"campaign {campaign.id} hashes with key {campaign.key_id!r}, which is not configured")
    if campaign.id > code_format.MAX_CAMPAIGN_ID:
        raise IssuanceError("campaign ids are exhausted for this code layout")
    check_face_value(campaign, face_value)


async def generate_stream(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    campaign: Campaign,
    count: int,
    *,
    face_value: int | None = None,
    bound_device: str | None = None,
    chunk: int = STREAM_CHUNK,
    actor: str = "",
    progress: Progress | None = None,
    factory: CodeFactory | None = None,
) -> AsyncGenerator[StreamItem, None]:
    """Generate a batch of `count` new codes (1..MAX_CODES) for `campaign`, and hand their plaintext out once.

    Yields, in order:
    - `list[str]`: the plaintext codes, `chunk` at a time, each chunk already COPYed into issued_codes, all of it
      INSIDE the batch's Postgres transaction (nothing is committed, nothing is in Redis yet);
    - `BatchCommitted`: once the consumer has taken every chunk and asked for more, the transaction committed:
      the codes exist from here on (hand them out for good, e.g. rename the file);
    - `BatchDone`: RedisClient holds every code (loaded after the commit) and the batch is 'active'.
    A consumer that stops before BatchCommitted - closing the generator (`aclose()`, best with
    `contextlib.aclosing`), an exception thrown into it, or a cancelled task - rolls the batch back: no row, no
    code, nothing in Redis. A failure after BatchCommitted raises IssuanceIncomplete (the batch stays 'loading';
    `rgw codes resume` finishes it). Raises BatchesLoading before starting when the campaign has a 'loading' batch,
    ValueError / IssuanceError on a bad request. `conn` is used by this generator alone until it ends.

    `face_value` and `bound_device` apply to every code of the batch (stored per code only when they differ from
    the campaign's). `progress` is called with the number of codes loaded into Redis, as they are.
    """
    _check_generation(campaign, keyring, count, face_value)
    if chunk < 1:
        raise ValueError("chunk must be positive")
    await refuse_if_loading(conn, campaign.id)
    own = Overrides(face_value=None if face_value == campaign.face_value else face_value, bound_device=bound_device)
    batch = _Generation(campaign, keyring, uuid.uuid4(), own, factory or CodeFactory(campaign.id, campaign.shards))
    async with conn.transaction():
        issued_s = await insert_batch(conn, batch.batch_id, campaign.id, GENERATED, count, actor)
        async with contextlib.aclosing(batch.copied(conn, count)) as copied:
            async for plain in copied:
                for start in range(0, len(plain), chunk):
                    yield _texts(plain[start : start + chunk])
    log.info("batch %s of campaign %d: %d codes committed", batch.batch_id, campaign.id, count)
    yield BatchCommitted(batch.batch_id, campaign.id, count)
    try:
        added = await batch.load(redis, issued_s, progress)
        await activate(conn, batch.batch_id)
    except Exception as exc:
        raise IssuanceIncomplete(
            f"batch {batch.batch_id}: {count} codes were issued, but loading them into Redis failed ({exc}); "
            f"run `rgw codes resume --campaign {campaign.id}` to finish"
        ) from exc
    log.info("batch %s of campaign %d: active (%d codes in Redis)", batch.batch_id, campaign.id, count)
    yield BatchDone(batch.batch_id, campaign.id, count, added)


# -- resuming -----------------------------------------------------------------------------------------------------


async def resume(
    conn: asyncpg.Connection, redis: RedisClient, *, campaign_id: int | None = None, progress: Progress | None = None
) -> list[BatchDone]:
    """Load every 'loading' batch (of one campaign, or all) from Postgres into Redis and mark it active.
    Idempotent: a batch partly (or wholly) loaded before is completed without counting a code twice."""
    done = []
    for batch in await loading_batches(conn, campaign_id):
        loaded = await loader.load_from_postgres(
            conn, redis, campaign_id=batch.campaign_id, batch_id=batch.id, progress=progress
        )
        await activate(conn, batch.id)
        log.info("batch %s of campaign %d resumed: %d codes loaded", batch.id, batch.campaign_id, loaded.codes)
        done.append(BatchDone(batch.id, batch.campaign_id, loaded.codes, loaded.added))
    return done


async def load_campaign_codes(
    conn: asyncpg.Connection, redis: RedisClient, campaign_id: int, *, progress: Progress | None = None
) -> int:
    """Load every code of the campaign (`rgw codes load`); the batches that were 'loading' before become active."""
    waiting = await loading_batches(conn, campaign_id)
    loaded = await loader.load_from_postgres(conn, redis, campaign_id=campaign_id, progress=progress)
    for batch in waiting:  # committed before the load read the campaign's codes, so all of theirs were loaded
        await activate(conn, batch.id)
    return loaded.codes
