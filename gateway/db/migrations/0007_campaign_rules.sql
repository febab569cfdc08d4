-- Campaigns as brands run them (gateway/campaigns/): rules, budgets, pause, reversals, batches of codes, imported
-- codes. Postgres stays the system of record Redis is rebuilt from (invariant 8): every rule is a column here and
-- is published into each shard's meta hash (gateway/campaigns/layout.py).

ALTER TABLE campaigns
    -- paused: every gateway answers OUTCOME_CAMPAIGN_PAUSED at once (the flag is in the shards' meta)
    ADD COLUMN status                  text        NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'paused')),
    -- a code is valid for this many days after its issue (within valid_from/valid_until); NULL: fixed dates only
    ADD COLUMN valid_days              integer     CHECK (valid_days BETWEEN 1 AND 3650),
    -- the over-issuance guard: redemptions (count) and face value (minor units) the campaign may grant in all;
    -- NULL: no limit. Split between the shards in Redis; `rgw campaign rebalance` moves unused shares.
    ADD COLUMN budget_count            bigint      CHECK (budget_count BETWEEN 1 AND 1000000000000),
    ADD COLUMN budget_value            bigint      CHECK (budget_value BETWEEN 1 AND 1000000000000000),
    -- every code's face value unless the code has its own (issued_codes.face_value), in minor units of currency
    ADD COLUMN face_value              bigint      NOT NULL DEFAULT 0 CHECK (face_value BETWEEN 0 AND 1000000000000),
    ADD COLUMN currency                text        CHECK (currency ~ '^[A-Z]{3}$'),
    -- redemption hours are read in this IANA zone
    ADD COLUMN time_zone               text        NOT NULL DEFAULT 'UTC',
    -- [{"days": [1..7 (ISO, Monday = 1)], "start": "HH:MM", "end": "HH:MM"}, ...]; end <= start runs across
    -- midnight into the next day. []: any time.
    ADD COLUMN redemption_hours        jsonb       NOT NULL DEFAULT '[]',
    -- redeemable only at these stores (external ids) and the stores of these groups; both empty: every store
    ADD COLUMN allowed_stores          text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN allowed_store_groups    text[]      NOT NULL DEFAULT '{}',
    -- how long after a redemption it may be reversed; 0: never
    ADD COLUMN reversal_window_seconds integer     NOT NULL DEFAULT 604800
        CHECK (reversal_window_seconds BETWEEN 0 AND 31622400),
    ADD COLUMN updated_at              timestamptz NOT NULL DEFAULT now(),
    -- a face value, and so a value budget, is money: it has a currency
    ADD CHECK (face_value = 0 OR currency IS NOT NULL),
    ADD CHECK (budget_value IS NULL OR currency IS NOT NULL);

-- A brand's named set of stores (external ids), which campaigns may allow as a whole.
CREATE TABLE store_groups (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand_id   bigint      NOT NULL REFERENCES brands (id),
    name       text        NOT NULL CHECK (name ~ '^[A-Za-z0-9._:-]{1,64}$'),
    stores     text[]      NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (brand_id, name)
);

-- One call of `rgw codes generate|import` / GenerateCodes. A batch is 'active' only once Redis holds every code of
-- it; 'loading' after Postgres committed and before Redis finished (resumed by `rgw codes resume`, idempotently).
-- A batch that never committed leaves no row and no code.
CREATE TABLE code_batches (
    id          uuid        PRIMARY KEY,
    campaign_id bigint      NOT NULL REFERENCES campaigns (id),
    kind        text        NOT NULL CHECK (kind IN ('generated', 'imported')),
    codes       bigint      NOT NULL CHECK (codes >= 0),
    state       text        NOT NULL CHECK (state IN ('loading', 'active')),
    actor       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    loaded_at   timestamptz
);

CREATE INDEX code_batches_loading ON code_batches (campaign_id) WHERE state = 'loading';

-- A code's own rules, when they differ from its campaign's: NULL means the campaign's (uses_per_code,
-- valid_from/valid_until, face_value). Codes generated from now on leave them NULL: narrower rows, faster COPY.
ALTER TABLE issued_codes
    ALTER COLUMN uses DROP NOT NULL,
    ALTER COLUMN valid_from DROP NOT NULL,
    ALTER COLUMN valid_until DROP NOT NULL,
    ADD COLUMN face_value bigint CHECK (face_value BETWEEN 0 AND 1000000000000);

-- Codes issued before this migration copied their campaign's rules (campaigns could not change then): they are the
-- campaign's, so a later change of the campaign's dates or uses applies to them too.
UPDATE issued_codes ic SET uses = NULL, valid_from = NULL, valid_until = NULL
FROM campaigns c
WHERE ic.campaign_id = c.id AND ic.uses = c.uses_per_code AND ic.valid_from = c.valid_from
  AND ic.valid_until = c.valid_until;

-- Codes a brand supplied (imported): they carry no route, so a redemption finds them by their directory entry,
-- dir_ref = HMAC(key, brand || 0x00 || normalised code) - never the plaintext. Unique per brand and key.
CREATE TABLE code_directory (
    brand_id    bigint  NOT NULL REFERENCES brands (id),
    dir_ref     bytea   NOT NULL CHECK (length(dir_ref) = 32),
    key_id      text    NOT NULL,
    campaign_id bigint  NOT NULL REFERENCES campaigns (id),
    shard       integer NOT NULL CHECK (shard >= 0),
    code_ref    bytea   NOT NULL CHECK (length(code_ref) = 32),
    PRIMARY KEY (brand_id, dir_ref)
);

CREATE INDEX code_directory_campaign ON code_directory (campaign_id);

-- Brands with imported codes: only their requests pay the directory's extra round trip for a code that is not a
-- generated one (a mistyped generated code of any other brand is still refused offline).
ALTER TABLE brands ADD COLUMN imports_codes boolean NOT NULL DEFAULT false;

-- Reversals (voids, refunds at the till): a redemption reversed gives its use and budget back, exactly once.
-- Written by the ledger writer from the outbox, like redemptions. A redemption is reversed at most once
-- (UNIQUE redemption_id); a second, different reversal of it is an alarm, never a second row.
CREATE TABLE reversals (
    reversal_id       uuid        PRIMARY KEY,
    redemption_id     uuid        NOT NULL UNIQUE,
    code_ref          bytea       NOT NULL CHECK (length(code_ref) = 32),
    key_id            text        NOT NULL,
    use_number        integer     NOT NULL CHECK (use_number >= 1),
    campaign_id       bigint      NOT NULL,
    shard             integer     NOT NULL,
    face_value        bigint      NOT NULL DEFAULT 0,
    reason            text        NOT NULL,
    caller            text        NOT NULL,
    client_id         text        NOT NULL,
    brand_id          bigint      NOT NULL,
    reversed_at       timestamptz NOT NULL,
    idempotency_scope text        NOT NULL DEFAULT '',
    fingerprint       text        NOT NULL DEFAULT '',
    outbox_id         text        NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX reversals_campaign_time ON reversals (campaign_id, reversed_at);

CREATE TABLE reversal_alarms (
    id                        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    redemption_id             uuid        NOT NULL,
    first_reversal_id         uuid        NOT NULL,
    conflicting_reversal_id   uuid        NOT NULL UNIQUE,
    detected_at               timestamptz NOT NULL DEFAULT now()
);

-- The ledger also keeps each redemption's face value (what the budget counted), for settlement.
ALTER TABLE redemptions ADD COLUMN face_value bigint NOT NULL DEFAULT 0;
