"""`rgw writer`: moves redemption and reversal events from the Redis outboxes into the Postgres ledger, risk
events from the brands' risk-event streams into risk_events, and inventory events from the SKU shards' outboxes
into inventory_events and dispenses (the directory lists them all; an entry's field says its kind).

At-least-once delivery (consumer groups; entries of dead consumers reclaimed with XAUTOCLAIM) plus idempotent
inserts make the ledger exactly-once. An entry is acknowledged only after its batch committed. While Postgres is
unreachable the batch in hand is retried with capped exponential backoff and jitter - the gateway keeps
redeeming and the outbox grows. An entry that cannot be written after retries goes to the dead-letter stream.
Several writers can run at once; each batch is one Postgres transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from redis import exceptions as redis_errors

from gateway.ledger import metrics
from gateway.ledger.events import LedgerRow, PoisonEntry, ReversalRow, is_reversal_entry, parse, parse_reversal
from gateway.ledger.inventory_events import InventoryEntry, is_inventory_entry, parse_inventory_event
from gateway.ledger.outbox import Entry, Outbox
from gateway.ledger.risk_events import RiskEventRow, is_risk_entry, parse_risk_event
from gateway.ledger.store import BatchResult, write_batch

log = logging.getLogger("rgw.writer")
# Failures of the connection (retry the same batch later) versus failures of the data (isolate the bad row).
_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError)  # fmt: skip
Row = LedgerRow | ReversalRow | RiskEventRow | InventoryEntry
Batch = tuple[list[LedgerRow], list[RiskEventRow], list[ReversalRow], list[InventoryEntry]]


@dataclass(frozen=True, slots=True)
class WriterConfig:
    """Batching, retry and reclaim knobs (see settings for the variables)."""

    batch_size: int = 2000
    batch_wait_s: float = 0.2
    poll_s: float = 0.02
    claim_idle_ms: int = 30_000
    max_attempts: int = 5
    backoff_base_s: float = 0.1
    backoff_max_s: float = 10.0
    directory_refresh_s: float = 5.0
    backlog_refresh_s: float = 1.0


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter (attempt 0 is the first retry)."""
    # The exponent is capped: 2**1024 overflows a float, and an outage may well last that many retries.
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 32)))  # noqa: S311 - jitter, not a secret


class LedgerWriter:
    """One writer process's loop; run several for throughput or availability."""

    def __init__(self, outbox: Outbox, connect: Callable[[], Awaitable[asyncpg.Connection]], config: WriterConfig):
        self.outbox = outbox
        self.config = config
        self._connect = connect
        self._conn: asyncpg.Connection | None = None
        self._next_refresh = self._next_reclaim = self._next_backlog = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Write batches until `stop` is set; the batch in hand is finished (or left unacknowledged) first."""
        log.info("writer %s started", self.outbox.consumer)
        try:
            failures = 0
            while not stop.is_set():
                try:
                    handled = await self.run_once(stop)
                    failures = 0
                    metrics.LAST_PROGRESS.set(time.time())
                except redis_errors.RedisError as exc:
                    # Redis down: nothing is lost (unacknowledged entries are delivered again); wait and retry.
                    self.outbox.reread_pending()
                    delay = backoff(failures, base=self.config.backoff_base_s, cap=self.config.backoff_max_s)
                    log.warning("redis error (%s); retrying in %.2fs", type(exc).__name__, delay)
                    failures += 1
                    await _sleep_unless(stop, delay)
                    continue
                if handled == 0:
                    await _sleep_unless(stop, self.config.poll_s)
        finally:
            await self.close()
            log.info("writer %s stopped", self.outbox.consumer)

    async def close(self) -> None:
        """Close the Postgres connection."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate() if conn.is_closed() else await conn.close(timeout=5)

    async def run_once(self, stop: asyncio.Event | None = None) -> int:
        """Collect one batch, record it, acknowledge it; returns the number of entries handled."""
        await self._housekeeping()
        entries = await self._collect(stop)
        if not entries:
            return 0
        rows, poison = _parse_all(entries)
        for entry, reason in poison:
            await self._dead_letter(entry, reason)
        if rows:
            await self._write_until_done([e for e in entries if e.key in rows], rows, stop)
        return len(entries)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh:
            await self.outbox.refresh()
            self._next_refresh = now + self.config.directory_refresh_s
        if now >= self._next_backlog:
            await self._refresh_backlog()

    async def _refresh_backlog(self) -> None:
        """Sample the outbox size and age into the metrics (at most once per backlog_refresh_s)."""
        now = time.monotonic()
        if now < self._next_backlog:
            return
        self._next_backlog = now + self.config.backlog_refresh_s
        try:
            backlog = await self.outbox.backlog()
        except redis_errors.RedisError:
            return  # Redis trouble is handled by the main loop; metrics just stay as they were
        metrics.OUTBOX_ENTRIES.set(backlog.entries)
        metrics.OUTBOX_OLDEST_AGE.set(backlog.oldest_age_seconds)

    async def _collect(self, stop: asyncio.Event | None) -> list[Entry]:
        """Up to batch_size entries, waiting at most batch_wait_s after the first arrives."""
        cfg = self.config
        batch = await self._reclaim_due()
        deadline = time.monotonic() + cfg.batch_wait_s
        while len(batch) < cfg.batch_size and (stop is None or not stop.is_set()):
            got = await self.outbox.read(cfg.batch_size - len(batch))
            batch += got
            if not batch or time.monotonic() >= deadline:
                break
            if not got:
                await asyncio.sleep(min(cfg.poll_s, max(0.0, deadline - time.monotonic())))
        return _distinct(batch)

    async def _reclaim_due(self) -> list[Entry]:
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self.config.claim_idle_ms / 2000
        claimed = await self.outbox.reclaim(min_idle_ms=self.config.claim_idle_ms, limit=self.config.batch_size)
        if claimed:
            metrics.RECLAIMED.inc(len(claimed))
            log.warning("reclaimed %d entries from stopped consumers", len(claimed))
        return claimed

    async def _write_until_done(
        self, entries: list[Entry], rows: dict[tuple[str, str], Row], stop: asyncio.Event | None
    ) -> None:
        attempt = 0
        while True:
            try:
                await self._write_and_ack(entries, rows)
                metrics.POSTGRES_UP.set(1)
                return
            except _CONNECTION_ERRORS as exc:
                await self.close()
                metrics.POSTGRES_UP.set(0)
                metrics.WRITE_RETRIES.inc()
                delay = backoff(attempt, base=self.config.backoff_base_s, cap=self.config.backoff_max_s)
                log.warning(
                    "postgres unavailable (%s); retrying %d entries in %.2fs", type(exc).__name__, len(entries), delay
                )
                attempt += 1
                await self._refresh_backlog()  # the outbox keeps growing: the alert must see it
                if stop is not None and stop.is_set():
                    log.info("stopping with %d entries unacknowledged; they will be redelivered", len(entries))
                    return
                await _sleep_unless(stop, delay)
            except asyncpg.PostgresError as exc:
                log.error("batch of %d rejected by postgres (%s); writing one by one", len(entries), exc)
                await self._write_one_by_one(entries, rows)
                return

    async def _write_and_ack(self, entries: Sequence[Entry], rows: dict[tuple[str, str], Row]) -> None:
        started = time.perf_counter()
        if self._conn is None:
            self._conn = await self._connect()
        result = await write_batch(self._conn, *_by_kind([rows[e.key] for e in entries]))
        await self.outbox.ack(entries)
        self._account(result, len(entries), time.perf_counter() - started)

    def _account(self, result: BatchResult, size: int, seconds: float) -> None:
        metrics.ROWS_WRITTEN.inc(result.inserted)
        metrics.DUPLICATES.inc(result.duplicates + result.risk_duplicates + result.reversals.duplicates)
        metrics.RISK_EVENTS_WRITTEN.inc(result.risk_inserted)
        metrics.REVERSALS_WRITTEN.inc(result.reversals.inserted)
        metrics.BATCH_ROWS.observe(size)
        metrics.BATCH_SECONDS.observe(seconds)
        for alarm in result.alarms:
            metrics.DOUBLE_SPENDS.inc()
            log.error(
                "DOUBLE SPEND: code_ref %s use %d of campaign %d has redemptions %s and %s",
                alarm.code_ref.hex()[:12], alarm.use_number, alarm.campaign_id,
                alarm.first_redemption_id, alarm.conflicting_redemption_id,
            )  # fmt: skip
        for reversal in result.reversals.alarms:
            metrics.REVERSAL_ALARMS.inc()
            log.error(
                "SECOND REVERSAL: redemption %s is reversed by %s; reversal %s was not applied twice",
                reversal.redemption_id, reversal.first_reversal_id, reversal.conflicting_reversal_id,
            )  # fmt: skip
        _account_inventory(result)

    async def _write_one_by_one(self, entries: Sequence[Entry], rows: dict[tuple[str, str], Row]) -> None:
        """Isolate the entries Postgres rejects; each gets max_attempts tries before the dead-letter stream."""
        for entry in entries:
            for attempt in range(self.config.max_attempts):
                try:
                    await self._write_and_ack([entry], rows)
                    break
                except _CONNECTION_ERRORS:
                    await self.close()
                    self.outbox.reread_pending()  # the rest stays pending and is read again
                    return
                except asyncpg.PostgresError as exc:
                    reason = f"rejected by postgres {attempt + 1} times: {exc}"
                    await asyncio.sleep(backoff(attempt, base=self.config.backoff_base_s, cap=1.0))
            else:
                await self._dead_letter(entry, reason)

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        await self.outbox.dead_letter(entry, reason)
        metrics.DEAD_LETTERS.inc()
        log.error("dead-lettered outbox entry %s of %s: %s", entry.id, entry.stream, reason)


def _account_inventory(result: BatchResult) -> None:
    stock = result.inventory
    metrics.DUPLICATES.inc(stock.event_duplicates)
    metrics.INVENTORY_EVENTS_WRITTEN.inc(stock.events_inserted)
    metrics.DISPENSES_WRITTEN.inc(stock.dispenses_inserted)
    for alarm in stock.alarms:
        metrics.DISPENSE_ALARMS.inc()
        log.error("SECRET IN TWO ORDERS: secret %d use %d belongs to order %s; order %s was recorded as an alarm",
                  alarm.secret_id, alarm.use_number, alarm.first_order_id, alarm.conflicting_order)  # fmt: skip


def _distinct(entries: list[Entry]) -> list[Entry]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry in entries:
        if (entry.stream, entry.id) not in seen:
            seen.add((entry.stream, entry.id))
            unique.append(entry)
    return unique


def _parse_all(entries: Sequence[Entry]) -> tuple[dict[tuple[str, str], Row], list[tuple[Entry, str]]]:
    rows: dict[tuple[str, str], Row] = {}
    poison: list[tuple[Entry, str]] = []
    for entry in entries:
        try:
            rows[entry.key] = _parse(entry)
        except PoisonEntry as exc:
            poison.append((entry, str(exc)))
    return rows, poison


def _parse(entry: Entry) -> Row:
    """An entry's row by its format field: any stream in the directory may hold any kind."""
    if is_risk_entry(entry.fields):
        return parse_risk_event(entry.id, entry.fields)
    if is_reversal_entry(entry.fields):
        return parse_reversal(entry.id, entry.fields)
    if is_inventory_entry(entry.fields):
        return parse_inventory_event(entry.id, entry.fields)
    return parse(entry.id, entry.fields)


def _by_kind(rows: list[Row]) -> Batch:
    """Redemptions, risk events, reversals and inventory events apart, each in batch order (write_batch's
    argument order)."""
    batch: Batch = ([], [], [], [])
    ledger, risk, reversals, inventory = batch
    for row in rows:
        if isinstance(row, LedgerRow):
            ledger.append(row)
        elif isinstance(row, ReversalRow):
            reversals.append(row)
        elif isinstance(row, InventoryEntry):
            inventory.append(row)
        else:
            risk.append(row)
    return batch


async def _sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
