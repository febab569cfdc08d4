-- Identity in every ledger row: the authenticated API client and the brand it acted for (issue 8). Rows written
-- before authentication existed have no client ('') and belong to the default brand (1), as migration 0003
-- assigns their campaigns. `caller` keeps naming the idempotency scope's owner: "store/terminal" before,
-- "client/terminal" after.

ALTER TABLE redemptions
    ADD COLUMN client_id text   NOT NULL DEFAULT '',
    ADD COLUMN brand_id  bigint NOT NULL DEFAULT 1;
