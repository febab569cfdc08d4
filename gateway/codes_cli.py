"""`rgw codes generate|import|resume|load`: issuing codes (gateway/campaigns/issuance.py, importing.py) straight
against Postgres (RGW_DATABASE_URL) and Redis (RGW_REDIS_URL), with a progress bar on a terminal.

The plaintext of generated codes goes only to `--out` (mode 0600, never overwritten, renamed from
`<out>.partial` once the batch committed); nothing here prints or logs a code. Exit codes: 0 done; 1 the batch
could not be issued (or was issued but not loaded: run `rgw codes resume`); 2 an import file refused (every bad
row named by its line, nothing imported); 143 stopped by SIGTERM (before the commit: nothing issued).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from gateway import issuance
from gateway.campaigns import importing
from gateway.campaigns import issuance as batches
from gateway.durability import is_initialised
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


class _Failed(Exception):
    """A command's failure, to print as `rgw: <message>` and exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in the environment nor in the password database
        return "cli:unknown"


@asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, RedisClient]]:
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        if not await is_initialised(redis):
            raise _Failed("Redis is not initialised from Postgres; run `rgw rebuild-redis` first")
        yield conn, redis
    finally:
        await redis.aclose()
        await conn.close()


class _Bars:
    """Progress bars on stderr (nothing when stderr is not a terminal): codes made, codes loaded into Redis."""

    def __init__(self, total: int, *, made: str | None) -> None:
        from rich.console import Console  # imported by the commands that draw bars only
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=not console.is_terminal,
        )  # fmt: skip
        self._made = self._progress.add_task(made, total=total) if made else None
        self._loaded = self._progress.add_task("loaded into Redis", total=total or None)

    def made(self, count: int) -> None:
        if self._made is not None:
            self._progress.advance(self._made, count)

    def loaded(self, count: int) -> None:
        self._progress.advance(self._loaded, count)

    @contextmanager
    def shown(self) -> Iterator[_Bars]:
        with self._progress:
            yield self


def _run(body: Callable[[], Awaitable[int]]) -> Awaitable[int]:
    """Run a command body: its failures as `rgw: ...` lines and exit codes, SIGTERM as a cancellation (so an
    uncommitted batch rolls back and its partial file is removed)."""

    async def run() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await body()
        except _Failed as exc:
            print(f"rgw: {exc}", file=sys.stderr)
            return exc.code
        except importing.ImportRefused as exc:
            print(f"rgw: import refused - {exc}", file=sys.stderr)
            return 2
        except (LookupError, FileExistsError, ValueError, batches.IssuanceError) as exc:
            print(f"rgw: {exc}", file=sys.stderr)
            return 1
        except asyncio.CancelledError:
            print("rgw: stopped (a batch not yet committed was rolled back)", file=sys.stderr)
            return 143
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return run()


async def _generate(args: argparse.Namespace, settings: Settings) -> int:
    keyring = settings.keyring()

    async def body() -> int:
        async with _stores(settings) as (conn, redis):
            campaign = await issuance.get_campaign(conn, args.campaign)
            with _Bars(args.count, made="codes made").shown() as bars:
                done = await issuance.issue_to_file(
                    conn, redis, keyring, campaign, count=args.count, out=args.out, face_value=args.face_value,
                    bound_device=args.device, actor=_actor(), on_generated=bars.made, on_loaded=bars.loaded,
                )  # fmt: skip
        print(f"issued {done.codes} codes for campaign {campaign.id} into {args.out} (batch {done.batch_id})",
              file=sys.stderr)  # fmt: skip
        return 0

    return await _run(body)


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    keyring = settings.keyring()

    async def body() -> int:
        async with _stores(settings) as (conn, redis):
            campaign = await issuance.get_campaign(conn, args.campaign)
            rows = _read(args.file, campaign)
            with _Bars(len(rows), made=None).shown() as bars:
                done = await importing.import_rows(conn, redis, keyring, campaign, rows, actor=_actor(),
                                                   progress=bars.loaded)  # fmt: skip
        print(f"imported {done.codes} codes into campaign {campaign.id} (batch {done.batch_id})", file=sys.stderr)
        return 0

    return await _run(body)


def _read(path: Path, campaign: Any) -> list[importing.ImportRow]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return importing.read_rows(handle, campaign)
    except (OSError, UnicodeDecodeError) as exc:
        raise _Failed(f"cannot read {path}: {exc}", 2) from None


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async def body() -> int:
        async with _stores(settings) as (conn, redis):
            waiting = await batches.loading_batches(conn, args.campaign)
            with _Bars(sum(b.codes for b in waiting), made=None).shown() as bars:
                done = await batches.resume(conn, redis, campaign_id=args.campaign, progress=bars.loaded)
        for batch in done:
            print(f"batch {batch.batch_id} of campaign {batch.campaign_id}: {batch.codes} codes loaded "
                  f"({batch.added} were missing from Redis); active", file=sys.stderr)  # fmt: skip
        if not done:
            print("no batch was waiting to be loaded", file=sys.stderr)
        return 0

    return await _run(body)


async def _load(args: argparse.Namespace, settings: Settings) -> int:
    async def body() -> int:
        from gateway.campaigns.publish import publish_from_postgres

        async with _stores(settings) as (conn, redis):
            campaign = await issuance.get_campaign(conn, args.campaign)
            await publish_from_postgres(conn, redis, campaign)
            with _Bars(0, made=None).shown() as bars:
                n = await batches.load_campaign_codes(conn, redis, campaign.id, progress=bars.loaded)
        print(f"loaded {n} codes of campaign {campaign.id} into Redis", file=sys.stderr)
        return 0

    return await _run(body)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def _count(text: str) -> int:
    value = _positive(text)
    if value > batches.MAX_CODES:
        raise argparse.ArgumentTypeError(f"at most {batches.MAX_CODES:,} codes a batch")
    return value


def _face_value(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,13}", text) or int(text) > 10**12:
        raise argparse.ArgumentTypeError("a whole number of minor units from 0 to 10^12")
    return int(text)


def _device_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", text):
        raise argparse.ArgumentTypeError("1 to 128 characters of [A-Za-z0-9._:-]")
    return text


def add_codes_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`rgw codes ...`."""
    code_cmds = sub.add_parser("codes", help="codes").add_subparsers(dest="action", required=True)
    gen = code_cmds.add_parser("generate", help="issue new codes; plaintext goes only to --out (mode 0600)")
    gen.add_argument("--campaign", type=_positive, required=True)
    gen.add_argument("--count", type=_count, required=True, help=f"1 to {batches.MAX_CODES:,}")
    gen.add_argument("--out", type=Path, required=True, help="a new file (never overwritten)")
    gen.add_argument("--face-value", type=_face_value, help="every code's face value, minor units")
    gen.add_argument("--bound-device", "--device", dest="device", type=_device_id,
                     help="bind every code of this batch to one customer device")  # fmt: skip
    gen.set_defaults(run=_generate)
    imp = code_cmds.add_parser("import", help="import brand-supplied codes from a CSV file (see the README)")
    imp.add_argument("--campaign", type=_positive, required=True)
    imp.add_argument("--file", type=Path, required=True, help="CSV with a header: code[,uses,face_value,...]")
    imp.set_defaults(run=_import)
    res = code_cmds.add_parser("resume", help="finish loading batches an interrupted run left 'loading'")
    res.add_argument("--campaign", type=_positive, help="only this campaign's (default: every campaign's)")
    res.set_defaults(run=_resume)
    load = code_cmds.add_parser("load", help="(re)load a campaign's issued codes from Postgres into Redis")
    load.add_argument("--campaign", type=_positive, required=True)
    load.set_defaults(run=_load)
