"""`rgw codes import`: codes a brand supplied, from a CSV file, issued like generated ones plus a directory entry.

The file has a header row; columns `code` (required) and, optionally, `uses`, `face_value`, `valid_from`,
`valid_until` (ISO 8601; without an offset: UTC) and `bound_device`; an empty cell is the campaign's rule. A code
is normalised like the gateway normalises a request's (codes.normalise_imported: surrounding blanks, spaces and
dashes dropped, ASCII uppercased) and must then be 4 to 64 characters of A-Z and 0-9.

The whole file is refused (ImportRefused, nothing imported) when any row is bad - each named by its line number,
never by its code: malformed, a duplicate of an earlier row, already in the brand's directory, or readable as a
code the gateway generates (its own characters would route it to a campaign, so it could never reach the
directory). An accepted file is one batch with the guarantees of gateway/campaigns/issuance.py: its issued_codes
and code_directory rows commit together or not at all, Redis is loaded after the commit (codes, then directory
entries), and an interrupted load is finished by `rgw codes resume`.
"""

from __future__ import annotations

import csv
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import asyncpg

from gateway import codes as code_format
from gateway.campaigns import directory
from gateway.campaigns.issuance import (
    IMPORTED,
    BatchDone,
    IssuanceError,
    IssuanceIncomplete,
    activate,
    check_face_value,
    insert_batch,
    refuse_if_loading,
)
from gateway.campaigns.loader import BucketLoader, Overrides, Progress
from gateway.campaigns.model import Campaign
from gateway.coderefs import KeyRing
from gateway.redis_client import RedisClient

log = logging.getLogger("rgw.issuance")
T = TypeVar("T")

COLUMNS = ("code", "uses", "face_value", "valid_from", "valid_until", "bound_device")
MAX_USES = 1_000_000
_DEVICE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_COPY_CHUNK = 50_000
_CODE_COLUMNS = ["code_ref", "key_id", "campaign_id", "shard", "batch_id", "uses", "valid_from", "valid_until",
                 "face_value", "bound_device"]  # fmt: skip


class ImportRefused(IssuanceError):
    """The file was refused as a whole; `problems` name each bad row by its line (never its code)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s); nothing was imported:\n" + "\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ImportRow:
    """One accepted row: its line in the file, the normalised code and its own rules."""

    line: int
    code: str
    own: Overrides


class _RowError(ValueError):
    pass


def _int(text: str, name: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,16}", text) or not low <= int(text) <= high:
        raise _RowError(f"{name} must be a whole number from {low:,} to {high:,}")
    return int(text)


def _moment(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _RowError(f"{name} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _differs(value: T | None, campaign_value: T) -> T | None:
    """A row's value, None when it is the campaign's (stored NULL: the campaign's rule)."""
    return None if value == campaign_value else value


def _overrides(campaign: Campaign, cells: dict[str, str]) -> Overrides:
    uses = _int(cells["uses"], "uses", 1, MAX_USES) if cells.get("uses") else None
    face_value = _int(cells["face_value"], "face_value", 0, 10**12) if cells.get("face_value") else None
    try:
        check_face_value(campaign, face_value)
    except ValueError as exc:
        raise _RowError(str(exc)) from None
    valid_from = _moment(cells["valid_from"], "valid_from") if cells.get("valid_from") else None
    valid_until = _moment(cells["valid_until"], "valid_until") if cells.get("valid_until") else None
    if (valid_until or campaign.valid_until) <= (valid_from or campaign.valid_from):
        raise _RowError("valid_until must be after valid_from (the campaign's where the row has none)")
    device = cells.get("bound_device") or None
    if device is not None and not _DEVICE.fullmatch(device):
        raise _RowError("bound_device must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return Overrides(
        uses=_differs(uses, campaign.uses_per_code),
        valid_from=_differs(valid_from, campaign.valid_from),
        valid_until=_differs(valid_until, campaign.valid_until),
        face_value=_differs(face_value, campaign.face_value),
        bound_device=device,
    )


def _code(raw: str) -> str:
    text = code_format.normalise_imported(raw)
    if text is None:
        raise _RowError(
            f"the code must be {code_format.IMPORTED_MIN} to {code_format.IMPORTED_MAX} characters of A-Z and 0-9 "
            "once blanks, spaces and dashes are dropped"
        )
    if code_format.is_generated(text):
        raise _RowError(
            "the code reads as one the gateway generates (valid layout and check character): its own characters "
            "would route it to a campaign, so it cannot be imported"
        )
    return text


def _header(reader: Iterator[list[str]]) -> list[str]:
    header = [name.strip().lower() for name in next(reader, [])]
    problems = [f"line 1: unknown column {name!r}" for name in header if name not in COLUMNS]
    problems += [f"line 1: column {name!r} appears twice" for name in set(header) if header.count(name) > 1]
    if "code" not in header:
        problems.append("line 1: the header has no `code` column")
    if problems:
        raise ImportRefused(problems)
    return header


def read_rows(lines: Iterable[str], campaign: Campaign) -> list[ImportRow]:
    """The rows of a CSV file (its lines), checked; ImportRefused naming every malformed or repeated row."""
    reader = csv.reader(lines)
    header = _header(reader)
    rows: list[ImportRow] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        if len(cells) != len(header):
            problems.append(f"line {line}: {len(cells)} cells, the header has {len(header)}")
            continue
        named = {name: cell.strip() for name, cell in zip(header, cells, strict=True)}
        try:
            code = _code(named["code"])
            own = _overrides(campaign, named)
        except _RowError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        if code in first_line:
            problems.append(f"line {line}: the same code as line {first_line[code]}")
            continue
        first_line[code] = line
        rows.append(ImportRow(line, code, own))
    if problems:
        raise ImportRefused(problems)
    if not rows:
        raise ImportRefused(["the file has no codes"])
    return rows


async def check_directory(
    conn: asyncpg.Connection, keyring: KeyRing, campaign: Campaign, rows: list[ImportRow]
) -> None:
    """ImportRefused naming every row whose code the brand's directory has already."""
    found = await directory.existing(conn, keyring, campaign.brand_id, [row.code for row in rows])
    if found:
        raise ImportRefused([f"line {rows[i].line}: the brand has imported this code already" for i in sorted(found)])


@dataclass(frozen=True, slots=True)
class _Prepared:
    """An accepted row as it is stored: shard, code_ref, dir_ref, overrides."""

    shard: int
    code_ref: bytes
    dir_ref: bytes
    own: Overrides


def _prepare(keyring: KeyRing, campaign: Campaign, rows: list[ImportRow]) -> list[_Prepared]:
    code_refs = keyring.refs_of(campaign.key_id, campaign.id, [row.code.encode() for row in rows])
    prepared = []
    for row, code_ref in zip(rows, code_refs, strict=True):
        dir_ref = keyring.dir_ref(campaign.key_id, campaign.brand_id, row.code).ref
        prepared.append(_Prepared(secrets.randbelow(campaign.shards), code_ref, bytes.fromhex(dir_ref), row.own))
    return prepared


async def _record(conn: asyncpg.Connection, campaign: Campaign, batch_id: uuid.UUID, codes: list[_Prepared]) -> None:
    kid, cid = campaign.key_id, campaign.id
    records = [(c.code_ref, kid, cid, c.shard, batch_id, c.own.uses, c.own.valid_from, c.own.valid_until,
                c.own.face_value, c.own.bound_device) for c in codes]  # fmt: skip
    for start in range(0, len(records), _COPY_CHUNK):
        await conn.copy_records_to_table("issued_codes", records=records[start : start + _COPY_CHUNK],
                                         columns=_CODE_COLUMNS)  # fmt: skip
    entries = (directory.Entry(campaign.brand_id, c.dir_ref, kid, cid, c.shard, c.code_ref) for c in codes)
    await directory.copy_entries(conn, entries)


async def _load(redis: RedisClient, campaign: Campaign, codes: list[_Prepared], issued_s: int,
                progress: Progress | None) -> int:  # fmt: skip
    batch_loader = BucketLoader(redis, campaign.id, progress=progress)
    for c in codes:
        batch_loader.add(c.shard, c.code_ref.hex(), issued_s, c.own.spec())
        batch_loader.add_directory(campaign.brand_id, c.dir_ref.hex(), c.shard)
        if batch_loader.full:
            await batch_loader.flush()
    await batch_loader.close()
    return batch_loader.added


async def import_rows(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    campaign: Campaign,
    rows: list[ImportRow],
    *,
    actor: str = "",
    progress: Progress | None = None,
) -> BatchDone:
    """Import checked rows (read_rows) as one batch: ImportRefused when the brand's directory has any of them
    already, BatchesLoading when the campaign has a 'loading' batch, IssuanceIncomplete when Redis could not be
    loaded after the commit (then `rgw codes resume`)."""
    if campaign.key_id not in keyring.key_ids:
        raise IssuanceError(f"campaign {campaign.id} hashes with key {campaign.key_id!r}, which is not configured")
    await check_directory(conn, keyring, campaign, rows)
    await refuse_if_loading(conn, campaign.id)
    await directory.mark_brand_imports(conn, redis, brand_id=campaign.brand_id, actor=actor or "rgw codes import")
    prepared = _prepare(keyring, campaign, rows)
    batch_id = uuid.uuid4()
    try:
        async with conn.transaction():
            issued_s = await insert_batch(conn, batch_id, campaign.id, IMPORTED, len(rows), actor)
            await _record(conn, campaign, batch_id, prepared)
    except asyncpg.UniqueViolationError:
        raise ImportRefused(["a code of the file was issued or imported by another run meanwhile; "
                             "run the import again to see which"]) from None  # fmt: skip
    log.info("batch %s of campaign %d: %d imported codes committed", batch_id, campaign.id, len(rows))
    try:
        added = await _load(redis, campaign, prepared, issued_s, progress)
        await activate(conn, batch_id)
    except Exception as exc:
        raise IssuanceIncomplete(
            f"batch {batch_id}: {len(rows)} codes were imported, but loading them into Redis failed ({exc}); "
            f"run `rgw codes resume --campaign {campaign.id}` to finish"
        ) from exc
    return BatchDone(batch_id, campaign.id, len(rows), added)


async def import_file(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    campaign: Campaign,
    path: Path,
    *,
    actor: str = "",
    progress: Progress | None = None,
) -> BatchDone:
    """Read, check and import a CSV file of codes (see the module's docstring)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = read_rows(handle, campaign)
    return await import_rows(conn, redis, keyring, campaign, rows, actor=actor, progress=progress)
