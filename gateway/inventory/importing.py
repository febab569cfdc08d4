"""Importing card secrets for one brand: `rgw inventory import` (a CSV file) and AdminService.ImportSecrets (a
stream of records).

Each record - SKU code, supplier, secret, cost, currency, expiry - is checked: MALFORMED(<field>) (supplier not
[A-Za-z0-9._:-]{1,64}, secret not 1..256 printable ASCII once surrounding blanks are dropped, cost not a whole
number 0..10^12, currency not ISO 4217-shaped, expiry not a time), UNKNOWN_SKU (the brand has no such SKU),
EXPIRED (expiry not after now), DUPLICATE (the same secret earlier in this import, or imported before into the
brand: its dedup_ref, crypto.py). A refused record is named by its position (the CSV's line) and reason, never by
its secret. The caller chooses: `all_or_nothing` refuses everything when any record is refused; otherwise the good
records are imported and the bad ones listed.

The good records are one batch: its `secret_batches` row (state 'loading') and every `secrets` row (COPY, each
secret sealed under the active key, its shard random among the SKU's) commit in ONE transaction, under the brand's
import lock (duplicates are checked inside it, so two concurrent imports cannot both take one secret). Only then is
Redis loaded (loader.load_batch) and the batch marked 'active'. A run killed after the commit leaves a 'loading'
batch that `rgw inventory resume` finishes (loading is idempotent); one killed before leaves nothing.

Nothing here logs or raises a secret.
"""

from __future__ import annotations

import csv
import logging
import re
import secrets as random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from gateway.inventory import loader
from gateway.inventory.crypto import SecretRing, associated_data, normalise
from gateway.inventory.model import Sku, is_code, skus_by_code
from gateway.redis_client import RedisClient

log = logging.getLogger("rgw.inventory")

COLUMNS = ("sku", "supplier", "secret", "cost", "currency", "expires_at")
MAX_SECRET = 256
MAX_COST = 10**12
MAX_RECORDS = 1_000_000  # per import
MALFORMED, DUPLICATE, UNKNOWN_SKU, EXPIRED = "MALFORMED", "DUPLICATE", "UNKNOWN_SKU", "EXPIRED"
_SUPPLIER = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_PRINTABLE = re.compile(rf"[\x20-\x7e]{{1,{MAX_SECRET}}}")
_COST = re.compile(r"[0-9]{1,13}")
_LOCK_CLASS = 0x72676B73  # "rgks": one import of a brand at a time
_COPY_CHUNK = 50_000
_DEDUP_CHUNK = 10_000
_SECRET_COLUMNS = ["brand_id", "sku_id", "shard", "supplier", "cost", "currency", "expires_at", "batch_id", "key_id",
                   "nonce", "ciphertext", "dedup_ref"]  # fmt: skip
_INSERT_BATCH = """INSERT INTO secret_batches (id, brand_id, secrets, refused, state, actor)
                   VALUES ($1, $2, $3, $4, 'loading', $5)"""
_ACTIVATE = "UPDATE secret_batches SET state = 'active', loaded_at = now() WHERE id = $1 AND state = 'loading'"
_LOADING = """SELECT id, brand_id, secrets FROM secret_batches
              WHERE state = 'loading' AND ($1::bigint IS NULL OR brand_id = $1) ORDER BY created_at"""
_KNOWN = "SELECT dedup_ref FROM secrets WHERE brand_id = $1 AND dedup_ref = ANY($2::bytea[])"


class SecretImportError(RuntimeError):
    """An import could not be done; the message says why and what to do (safe to show an operator)."""


class ImportIncomplete(SecretImportError):
    """The batch committed in Postgres but Redis could not be loaded: `rgw inventory resume` finishes it."""


class BadFile(SecretImportError):
    """The CSV file cannot be read as an import at all (its header); nothing was imported."""


@dataclass(frozen=True, slots=True)
class Record:
    """One secret as a supplier sent it. `cost` None: not a whole number; `expires_at` None: not a time. The
    secret never appears in a repr."""

    position: int  # the CSV line, or the position in the stream (from 1)
    sku: str
    supplier: str
    secret: str = field(repr=False)
    cost: int | None
    currency: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Refused:
    """A record not imported: its position, reason (MALFORMED, DUPLICATE, UNKNOWN_SKU, EXPIRED) and, for
    MALFORMED, the field at fault."""

    position: int
    reason: str
    field: str = ""

    def describe(self, unit: str = "line") -> str:
        """E.g. `line 7: MALFORMED(cost)`."""
        return f"{unit} {self.position}: {self.reason}" + (f"({self.field})" if self.field else "")


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did: its batch (None: nothing imported), secrets imported, records refused."""

    batch_id: uuid.UUID | None
    imported: int
    refused: list[Refused]
    all_or_nothing: bool = False


@dataclass(frozen=True, slots=True)
class _Good:
    record: Record
    sku: Sku
    dedup_ref: bytes


def malformed_field(record: Record) -> str | None:
    """The first field of `record` that is malformed (None: well-formed)."""
    checks = (
        ("sku", is_code(record.sku)),
        ("supplier", _SUPPLIER.fullmatch(record.supplier) is not None),
        ("secret", _PRINTABLE.fullmatch(normalise(record.secret)) is not None),
        ("cost", record.cost is not None and 0 <= record.cost <= MAX_COST),
        ("currency", _CURRENCY.fullmatch(record.currency) is not None),
        ("expires_at", record.expires_at is not None and record.expires_at.tzinfo is not None),
    )
    return next((name for name, ok in checks if not ok), None)


async def check_records(
    conn: asyncpg.Connection, ring: SecretRing, brand_id: int, records: list[Record], now: datetime
) -> tuple[list[_Good], list[Refused]]:
    """The records that may be imported and those refused (by position). Duplicates against Postgres are checked
    here and again under the import lock."""
    known_skus = await skus_by_code(conn, brand_id, [r.sku for r in records])
    good: list[_Good] = []
    refused: list[Refused] = []
    seen: set[bytes] = set()
    for record in records:
        bad = malformed_field(record)
        if bad is not None:
            refused.append(Refused(record.position, MALFORMED, bad))
            continue
        sku = known_skus.get(record.sku)
        if sku is None:
            refused.append(Refused(record.position, UNKNOWN_SKU))
            continue
        assert record.expires_at is not None  # malformed_field checked it
        if record.expires_at <= now:
            refused.append(Refused(record.position, EXPIRED))
            continue
        ref = ring.dedup_ref(record.secret)
        if ref in seen:
            refused.append(Refused(record.position, DUPLICATE))
            continue
        seen.add(ref)
        good.append(_Good(record, sku, ref))
    return await _drop_known(conn, brand_id, good, refused)


async def _drop_known(
    conn: asyncpg.Connection, brand_id: int, good: list[_Good], refused: list[Refused]
) -> tuple[list[_Good], list[Refused]]:
    """`good` without the secrets the brand has imported before (added to `refused` as DUPLICATE)."""
    known: set[bytes] = set()
    refs = [g.dedup_ref for g in good]
    for start in range(0, len(refs), _DEDUP_CHUNK):
        rows = await conn.fetch(_KNOWN, brand_id, refs[start : start + _DEDUP_CHUNK])
        known.update(bytes(row["dedup_ref"]) for row in rows)
    if not known:
        return good, refused
    refused = refused + [Refused(g.record.position, DUPLICATE) for g in good if g.dedup_ref in known]
    return [g for g in good if g.dedup_ref not in known], refused


def _rows(ring: SecretRing, brand_id: int, batch_id: uuid.UUID, good: list[_Good]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for g in good:
        r, sku = g.record, g.sku
        sealed = ring.encrypt(normalise(r.secret), associated_data(brand_id, sku.id))
        rows.append((brand_id, sku.id, random.randbelow(sku.shards), r.supplier, r.cost, r.currency, r.expires_at,
                     batch_id, sealed.key_id, sealed.nonce, sealed.ciphertext, g.dedup_ref))  # fmt: skip
    return rows


async def import_records(
    conn: asyncpg.Connection,
    redis: RedisClient,
    ring: SecretRing,
    brand_id: int,
    records: list[Record],
    *,
    all_or_nothing: bool,
    actor: str = "",
    now: datetime | None = None,
    progress: loader.Progress | None = None,
    refused_before: list[Refused] | None = None,
) -> ImportResult:
    """Check and import `records` for `brand_id` (see the module's docstring). `refused_before`: records refused
    already (a CSV row of the wrong width), counted and listed with the others. ImportIncomplete when the batch
    committed but Redis could not be loaded (then `rgw inventory resume`)."""
    if len(records) > MAX_RECORDS:
        raise SecretImportError(f"at most {MAX_RECORDS:,} records an import; split the file")
    moment = now or datetime.now(UTC)
    good, refused = await check_records(conn, ring, brand_id, records, moment)
    refused = (refused_before or []) + refused
    if (refused and all_or_nothing) or not good:
        return ImportResult(None, 0, _sorted(refused), all_or_nothing)
    batch_id = uuid.uuid4()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS, brand_id)
        good, refused = await _drop_known(conn, brand_id, good, refused)  # an import that committed meanwhile
        if (refused and all_or_nothing) or not good:
            return ImportResult(None, 0, _sorted(refused), all_or_nothing)
        await conn.execute(_INSERT_BATCH, batch_id, brand_id, len(good), len(refused), actor)
        rows = _rows(ring, brand_id, batch_id, good)
        for start in range(0, len(rows), _COPY_CHUNK):
            await conn.copy_records_to_table("secrets", records=rows[start : start + _COPY_CHUNK],
                                             columns=_SECRET_COLUMNS)  # fmt: skip
    log.info("secret batch %s of brand %d: %d secrets committed, %d refused", batch_id, brand_id, len(good),
             len(refused))  # fmt: skip
    try:
        await loader.load_batch(conn, redis, batch_id, progress=progress)
        await activate(conn, batch_id)
    except Exception as exc:
        raise ImportIncomplete(
            f"secret batch {batch_id}: {len(good)} secrets were imported, but loading them into Redis failed "
            f"({type(exc).__name__}); run `rgw inventory resume` to finish"
        ) from exc
    return ImportResult(batch_id, len(good), _sorted(refused), all_or_nothing)


def _sorted(refused: list[Refused]) -> list[Refused]:
    return sorted(refused, key=lambda r: r.position)


async def activate(conn: asyncpg.Connection, batch_id: uuid.UUID) -> None:
    """Mark a batch active: Redis holds every secret of it."""
    await conn.execute(_ACTIVATE, batch_id)


@dataclass(frozen=True, slots=True)
class Resumed:
    """A 'loading' batch finished by resume."""

    batch_id: uuid.UUID
    brand_id: int
    secrets: int
    added: int


async def resume(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    brand_id: int | None = None,
    progress: loader.Progress | None = None,
) -> list[Resumed]:
    """Load every 'loading' batch (of one brand, or all) into Redis and mark it active. Idempotent."""
    done = []
    for row in await conn.fetch(_LOADING, brand_id):
        loaded = await loader.load_batch(conn, redis, row["id"], progress=progress)
        await activate(conn, row["id"])
        log.info("secret batch %s of brand %d resumed: %d secrets loaded", row["id"], row["brand_id"], loaded.secrets)
        done.append(Resumed(row["id"], row["brand_id"], loaded.secrets, loaded.added))
    return done


async def loading_batches(conn: asyncpg.Connection, brand_id: int | None = None) -> list[tuple[uuid.UUID, int]]:
    """The 'loading' batches (id, secrets), oldest first."""
    return [(row["id"], row["secrets"]) for row in await conn.fetch(_LOADING, brand_id)]


# -- CSV ------------------------------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time (no offset: UTC); None when it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _header(reader: Iterator[list[str]]) -> list[str]:
    header = [name.strip().lower() for name in next(reader, [])]
    problems = [f"line 1: unknown column {name[:40]!r}" for name in header if name not in COLUMNS]
    problems += [f"line 1: column {name!r} appears twice" for name in sorted(set(header)) if header.count(name) > 1]
    problems += [f"line 1: the header has no `{name}` column" for name in COLUMNS if name not in header]
    if problems:
        raise BadFile("the file's header must be " + ",".join(COLUMNS) + ":\n" + "\n".join(problems))
    return header


def read_csv_rows(lines: Iterable[str]) -> list[Record | Refused]:
    """Every data row of a CSV file as a Record, or as Refused(MALFORMED, "columns") when its number of cells is
    not the header's. Blank lines are skipped. BadFile for a bad header."""
    reader = csv.reader(lines)
    header = _header(reader)
    rows: list[Record | Refused] = []
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            rows.append(Refused(line, MALFORMED, "columns"))
            continue
        named = dict(zip(header, cells, strict=True))
        cost_text = named["cost"].strip()
        rows.append(Record(
            position=line, sku=named["sku"].strip(), supplier=named["supplier"].strip(), secret=named["secret"],
            cost=int(cost_text) if _COST.fullmatch(cost_text) else None, currency=named["currency"].strip(),
            expires_at=parse_time(named["expires_at"].strip()),
        ))  # fmt: skip
    return rows


async def import_csv(
    conn: asyncpg.Connection,
    redis: RedisClient,
    ring: SecretRing,
    brand_id: int,
    lines: Iterable[str],
    *,
    all_or_nothing: bool,
    actor: str = "",
    now: datetime | None = None,
    progress: loader.Progress | None = None,
) -> ImportResult:
    """Read and import a CSV file's lines (import_records; rows of the wrong width are refused as
    MALFORMED(columns))."""
    rows = read_csv_rows(lines)
    records = [r for r in rows if isinstance(r, Record)]
    bad = [r for r in rows if isinstance(r, Refused)]
    return await import_records(conn, redis, ring, brand_id, records, all_or_nothing=all_or_nothing, actor=actor,
                                now=now, progress=progress, refused_before=bad)  # fmt: skip
