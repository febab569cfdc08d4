-- The tenant registry: brands, their stores and terminals, API clients and their hashed keys, the audit log.
-- Postgres is its system of record; every gateway process holds a copy in memory (gateway/tenancy/snapshot.py).
--
-- Incremental refresh: each change bumps the single `registry_version` row and stamps the new version into the
-- `row_version` of every row it wrote, in one transaction. The bump takes that row's lock until commit, so
-- changes commit in version order, and a snapshot that sees version V sees every row stamped <= V: a process
-- holding version V reads `row_version > V` and misses nothing. Rows are never deleted (revoke and disable are
-- updates), so there are no tombstones to carry.
--
-- The default brand (id 1, slug `default`) owns every campaign that existed before brands did.

CREATE TABLE registry_version (
    -- at most one row: the primary key can only be true
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint  NOT NULL CHECK (version >= 1)
);

INSERT INTO registry_version (version) VALUES (1);

CREATE TABLE brands (
    -- START WITH 2: id 1 is the default brand, inserted below; a TRUNCATE ... RESTART IDENTITY comes back here too
    id          bigint GENERATED ALWAYS AS IDENTITY (START WITH 2) PRIMARY KEY,
    slug        text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    row_version bigint      NOT NULL
);

INSERT INTO brands (id, slug, name, status, row_version) OVERRIDING SYSTEM VALUE
VALUES (1, 'default', 'Default brand', 'active', 1);

-- Existing campaigns get the default brand; until campaign creation names a brand, new ones do too.
ALTER TABLE campaigns ADD COLUMN brand_id bigint NOT NULL DEFAULT 1 REFERENCES brands (id);
CREATE INDEX campaigns_brand ON campaigns (brand_id);

CREATE TABLE stores (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand_id    bigint           NOT NULL REFERENCES brands (id),
    external_id text             NOT NULL CHECK (external_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    name        text             NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    latitude    double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude   double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    time_zone   text             NOT NULL,
    status      text             NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at  timestamptz      NOT NULL DEFAULT now(),
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    row_version bigint           NOT NULL,
    UNIQUE (brand_id, external_id),
    -- the target of composite foreign keys that keep a terminal or client binding inside the store's brand
    UNIQUE (id, brand_id)
);

-- updated_at follows every change, whoever makes it
CREATE FUNCTION registry_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER stores_updated_at BEFORE UPDATE ON stores
    FOR EACH ROW EXECUTE FUNCTION registry_touch_updated_at();

CREATE TABLE terminals (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand_id      bigint      NOT NULL REFERENCES brands (id),
    store_id      bigint      NOT NULL,
    external_id   text        NOT NULL CHECK (external_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    status        text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    first_seen_at timestamptz,
    last_seen_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    row_version   bigint      NOT NULL,
    UNIQUE (store_id, external_id),
    -- a terminal belongs to its store's brand
    FOREIGN KEY (store_id, brand_id) REFERENCES stores (id, brand_id),
    UNIQUE (id, store_id, brand_id)
);

CREATE INDEX terminals_brand ON terminals (brand_id);

CREATE TABLE api_clients (
    id          text        PRIMARY KEY CHECK (id ~ '^cl_[a-z2-7]{10}$'),
    brand_id    bigint      REFERENCES brands (id),
    role        text        NOT NULL CHECK (role IN ('pos', 'internal', 'admin', 'platform')),
    store_id    bigint,
    terminal_id bigint,
    label       text        NOT NULL CHECK (length(label) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    row_version bigint      NOT NULL,
    -- platform clients act for every brand and belong to none; every other client belongs to exactly one
    CHECK ((role = 'platform') = (brand_id IS NULL)),
    -- only a pos or internal client is bound to a store or terminal, and a terminal binding names its store
    CHECK ((store_id IS NULL AND terminal_id IS NULL) OR role IN ('pos', 'internal')),
    CHECK (terminal_id IS NULL OR store_id IS NOT NULL),
    FOREIGN KEY (store_id, brand_id) REFERENCES stores (id, brand_id),
    FOREIGN KEY (terminal_id, store_id, brand_id) REFERENCES terminals (id, store_id, brand_id)
);

CREATE INDEX api_clients_brand ON api_clients (brand_id);

-- Only a hash of each key's secret: SHA-256 over a domain prefix, the key id and the 160-bit random secret
-- (gateway/tenancy/api_keys.py). A rotated-out key keeps working until expires_at (the end of its grace).
CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY CHECK (key_id ~ '^[a-z2-7]{12}$'),
    client_id   text        NOT NULL REFERENCES api_clients (id),
    secret_hash bytea       NOT NULL CHECK (length(secret_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    row_version bigint      NOT NULL
);

CREATE INDEX api_keys_client ON api_keys (client_id);

-- Who changed what, when, from what to what. Never a key's secret or its hash.
CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,
    brand_id  bigint      REFERENCES brands (id),
    action    text        NOT NULL,
    entity    text        NOT NULL,
    entity_id text        NOT NULL,
    before    jsonb,
    after     jsonb,
    -- the registry version this change produced
    version   bigint      NOT NULL
);

CREATE INDEX audit_log_brand ON audit_log (brand_id, id);

-- The loader reads `row_version > V` per table.
CREATE INDEX brands_row_version ON brands (row_version);
CREATE INDEX stores_row_version ON stores (row_version);
CREATE INDEX terminals_row_version ON terminals (row_version);
CREATE INDEX api_clients_row_version ON api_clients (row_version);
CREATE INDEX api_keys_row_version ON api_keys (row_version);
