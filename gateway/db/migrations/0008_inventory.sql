-- Card-secret inventory (卡密, gateway/inventory/): SKUs of a brand, secrets bought from suppliers (encrypted at
-- rest, AES-256-GCM, never plaintext), and the ledger of what was held for and dispensed to which order. Postgres
-- is the system of record; Redis holds the live stock and decides atomically, per SKU shard.

CREATE TABLE skus (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand_id      bigint      NOT NULL REFERENCES brands (id),
    code          text        NOT NULL CHECK (code ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    name          text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- a reusable secret (循环卡) is dispensed up to this many times; 1: each secret once
    reuse         integer     NOT NULL DEFAULT 1 CHECK (reuse BETWEEN 1 AND 1000),
    shards        integer     NOT NULL DEFAULT 1 CHECK (shards BETWEEN 1 AND 64),
    -- secrets one order may take
    max_per_order integer     NOT NULL DEFAULT 100 CHECK (max_per_order BETWEEN 1 AND 1000),
    -- stock at or below this is "low" (status, metric); 0: no threshold
    low_stock     integer     NOT NULL DEFAULT 0 CHECK (low_stock >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (brand_id, code)
);

CREATE TABLE secret_batches (
    id          uuid        PRIMARY KEY,
    brand_id    bigint      NOT NULL REFERENCES brands (id),
    secrets     integer     NOT NULL CHECK (secrets >= 0),
    refused     integer     NOT NULL DEFAULT 0 CHECK (refused >= 0),
    state       text        NOT NULL CHECK (state IN ('loading', 'active')),
    actor       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    loaded_at   timestamptz
);

CREATE TABLE secrets (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand_id    bigint      NOT NULL REFERENCES brands (id),
    sku_id      bigint      NOT NULL REFERENCES skus (id),
    shard       integer     NOT NULL CHECK (shard >= 0),
    supplier    text        NOT NULL CHECK (supplier ~ '^[A-Za-z0-9._:-]{1,64}$'),
    cost        bigint      NOT NULL CHECK (cost BETWEEN 0 AND 1000000000000),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    expires_at  timestamptz NOT NULL,
    batch_id    uuid        NOT NULL REFERENCES secret_batches (id),
    -- AES-256-GCM under the key named by key_id (RGW_SECRET_KEYS); the associated data binds the ciphertext to
    -- its brand and SKU, so a ciphertext moved to another SKU or brand does not decrypt
    key_id      text        NOT NULL,
    nonce       bytea       NOT NULL CHECK (length(nonce) = 12),
    ciphertext  bytea       NOT NULL,
    -- HMAC-SHA256 of the normalised secret under the dedup key: the same secret imported twice is refused
    -- without storing it in plaintext
    dedup_ref   bytea       NOT NULL CHECK (length(dedup_ref) = 32),
    imported_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (brand_id, dedup_ref)
);

CREATE INDEX secrets_sku ON secrets (sku_id, shard);

-- The inventory ledger: every hold, dispense, confirm, release and expiry, from the SKU shards' outboxes.
CREATE TABLE inventory_events (
    event_id    uuid        PRIMARY KEY,
    brand_id    bigint      NOT NULL,
    sku_id      bigint      NOT NULL,
    shard       integer     NOT NULL,
    order_id    text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('dispense', 'hold', 'confirm', 'release', 'expire')),
    secrets     text        NOT NULL DEFAULT '',
    client_id   text        NOT NULL DEFAULT '',
    at          timestamptz NOT NULL,
    outbox_id   text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX inventory_events_order ON inventory_events (brand_id, order_id);

-- One row per secret use given to an order. A secret use is never given to two orders: a second order for one is
-- recorded as an alarm, never as a second row.
CREATE TABLE dispenses (
    secret_id    bigint      NOT NULL,
    use_number   integer     NOT NULL CHECK (use_number >= 1),
    order_id     text        NOT NULL,
    brand_id     bigint      NOT NULL,
    sku_id       bigint      NOT NULL,
    supplier     text        NOT NULL,
    cost         bigint      NOT NULL,
    currency     text        NOT NULL,
    dispensed_at timestamptz NOT NULL,
    event_id     uuid        NOT NULL,
    PRIMARY KEY (secret_id, use_number)
);

CREATE INDEX dispenses_order ON dispenses (brand_id, order_id);

CREATE TABLE dispense_alarms (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    secret_id          bigint      NOT NULL,
    use_number         integer     NOT NULL,
    first_order_id     text        NOT NULL,
    conflicting_order  text        NOT NULL,
    detected_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (secret_id, use_number, conflicting_order)
);
