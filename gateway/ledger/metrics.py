"""Prometheus metrics of the ledger writer (no per-campaign, per-order or per-secret labels: cardinality stays
bounded). The inventory stock gauges carry (brand, sku) labels: SKUs are few per brand, and the exporter
(gateway/inventory/status.py export_stock_metrics) caps the series, summing the rest under sku="_other"."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROWS_WRITTEN = Counter("rgw_ledger_rows_written_total", "Redemptions newly recorded in the ledger")
REVERSALS_WRITTEN = Counter("rgw_ledger_reversals_written_total", "Reversals newly recorded in the ledger")
RISK_EVENTS_WRITTEN = Counter("rgw_ledger_risk_events_written_total", "Risk events newly recorded in risk_events")
DUPLICATES = Counter(
    "rgw_ledger_duplicates_total",
    "Redelivered outbox events (redemptions, reversals or risk events) that were already recorded",
)
DOUBLE_SPENDS = Counter(
    "rgw_ledger_double_spend_alarms_total", "Different redemption ids recorded for one code use (double spend)"
)
REVERSAL_ALARMS = Counter(
    "rgw_ledger_reversal_alarms_total",
    "Different reversal ids recorded for one redemption (the second is an alarm row, never a second reversal)",
)
INVENTORY_EVENTS_WRITTEN = Counter(
    "rgw_ledger_inventory_events_written_total", "Inventory events (holds, dispenses, ...) newly recorded"
)
DISPENSES_WRITTEN = Counter("rgw_ledger_dispenses_written_total", "Secret uses newly recorded as given to an order")
DISPENSE_ALARMS = Counter(
    "rgw_ledger_dispense_alarms_total",
    "A secret use recorded for a second, different order (an alarm row, never a second dispense)",
)
INVENTORY_AVAILABLE = Gauge(
    "rgw_inventory_available", "Secrets that can be dispensed now, by brand and SKU", ["brand", "sku"]
)
INVENTORY_LOW = Gauge(
    "rgw_inventory_low", "1 while a SKU's available stock is at or below its low_stock threshold", ["brand", "sku"]
)
INVENTORY_STOCK_AGE = Gauge(
    "rgw_inventory_stock_refreshed_timestamp_seconds", "Unix time the inventory stock gauges were last refreshed"
)
DEAD_LETTERS = Counter("rgw_ledger_dead_letters_total", "Outbox entries moved to a dead-letter stream")
WRITE_RETRIES = Counter("rgw_ledger_write_retries_total", "Batches retried because Postgres failed")
RECLAIMED = Counter("rgw_ledger_reclaimed_entries_total", "Entries reclaimed from consumers that stopped")
LAST_PROGRESS = Gauge(
    "rgw_ledger_last_progress_timestamp_seconds",
    "Unix time of the writer's last completed round (a written batch or an empty poll); stops moving when stuck",
)
POSTGRES_UP = Gauge("rgw_ledger_postgres_up", "1 while the writer's last Postgres write succeeded")
BATCH_ROWS = Histogram(
    "rgw_ledger_batch_rows", "Entries per written batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
)
BATCH_SECONDS = Histogram(
    "rgw_ledger_batch_seconds",
    "Time to write one batch to Postgres and acknowledge it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
OUTBOX_ENTRIES = Gauge(
    "rgw_outbox_entries", "Entries waiting in all outbox and risk-event streams (not yet in the ledger)"
)
OUTBOX_OLDEST_AGE = Gauge(
    "rgw_outbox_oldest_entry_age_seconds", "Age of the oldest outbox entry not yet in the ledger (0 when empty)"
)
