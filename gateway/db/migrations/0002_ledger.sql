-- The redemption ledger: every redemption acknowledged to a POS, exactly once (invariant 2).
--
-- Partitioning decision (for when the ledger grows): `redemptions` will be range-partitioned by its primary key,
-- `redemption_id`, a UUIDv7 whose leading 48 bits are the redemption time in ms, so monthly partitions are
-- ranges of ids (e.g. FROM ('019a5f3c-0000-7000-8000-000000000000') TO (...)). The primary key then still
-- contains the partition key, as Postgres 15 requires, and `ON CONFLICT (redemption_id)` keeps working. The
-- per-code-use uniqueness cannot include the time, so it lives in its own small table, `code_uses`, which is
-- never partitioned by time (it can be hash-partitioned by code_ref if it must be split).

CREATE TABLE redemptions (
    redemption_id      uuid             PRIMARY KEY,
    code_ref           bytea            NOT NULL CHECK (length(code_ref) = 32),
    key_id             text             NOT NULL,
    use_number         integer          NOT NULL CHECK (use_number >= 1),
    campaign_id        bigint           NOT NULL,
    shard              integer          NOT NULL,
    caller             text             NOT NULL,
    store_id           text             NOT NULL,
    terminal_id        text             NOT NULL,
    customer_device_id text             NOT NULL DEFAULT '',
    latitude           double precision,
    longitude          double precision,
    accuracy_m         double precision,
    redeemed_at        timestamptz      NOT NULL,
    fingerprint        text             NOT NULL,
    -- the code-hash field of the caller's idempotency key (a hash of caller and key), so a rebuilt Redis still
    -- replays the first answer to a retry
    idempotency_scope  text             NOT NULL DEFAULT '',
    outbox_id          text             NOT NULL,
    recorded_at        timestamptz      NOT NULL DEFAULT now()
);

CREATE INDEX redemptions_campaign_time ON redemptions (campaign_id, redeemed_at);

-- One row per code use: (code, use number) is never granted twice. Its primary key also answers "every
-- redemption of this code" (redemptions has no code_ref index: a random-key index costs the writer ~25%).
-- A second redemption id for the same code use is a double spend: it is recorded in `redemptions` (it was
-- acknowledged, so it happened) and raised in double_spend_alarms.
CREATE TABLE code_uses (
    code_ref      bytea   NOT NULL,
    use_number    integer NOT NULL,
    redemption_id uuid    NOT NULL,
    PRIMARY KEY (code_ref, use_number)
);

CREATE TABLE double_spend_alarms (
    id                        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code_ref                  bytea       NOT NULL,
    use_number                integer     NOT NULL,
    campaign_id               bigint      NOT NULL,
    first_redemption_id       uuid        NOT NULL,
    conflicting_redemption_id uuid        NOT NULL UNIQUE,
    detected_at               timestamptz NOT NULL DEFAULT now()
);
