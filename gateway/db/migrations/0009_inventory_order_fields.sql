-- Each inventory event carries its order's own fields (the inventory script's order hash: fp, exp, strat, sup), so
-- an order's last event restores it after a Redis loss (gateway/inventory/rebuild.py): a retried request gets its
-- first answer, a hold keeps its expiry, a late confirm takes stock the way the hold did. Events recorded before
-- this migration (and events of older gateways) have '' and NULL: their orders are restored failing closed.
-- Deploy order: the ledger writer that reads the longer events before the gateways that write them.
ALTER TABLE inventory_events
    ADD COLUMN fingerprint     text        NOT NULL DEFAULT '',
    -- the order's hold expiry; NULL: not a hold (or not carried by the event)
    ADD COLUMN hold_expires_at timestamptz NULL,
    -- expiry | cost | supplier ('': not carried by the event)
    ADD COLUMN strategy        text        NOT NULL DEFAULT '',
    ADD COLUMN supplier        text        NOT NULL DEFAULT '';
