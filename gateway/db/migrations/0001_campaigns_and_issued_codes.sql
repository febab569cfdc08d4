-- Campaigns and the codes issued for them: the system of record that Redis is rebuilt from (invariant 8).
-- Codes are stored only as code_ref = HMAC-SHA256(key, campaign || 0x00 || normalised code), never in plaintext.

CREATE TABLE campaigns (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    valid_from    timestamptz NOT NULL,
    valid_until   timestamptz NOT NULL,
    uses_per_code integer     NOT NULL CHECK (uses_per_code BETWEEN 1 AND 1000000),
    shards        integer     NOT NULL DEFAULT 1 CHECK (shards BETWEEN 1 AND 1024),
    key_id        text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until > valid_from)
);

CREATE TABLE issued_codes (
    code_ref    bytea       PRIMARY KEY CHECK (length(code_ref) = 32),
    key_id      text        NOT NULL,
    campaign_id bigint      NOT NULL REFERENCES campaigns (id),
    shard       integer     NOT NULL CHECK (shard >= 0),
    uses        integer     NOT NULL CHECK (uses >= 1),
    valid_from  timestamptz NOT NULL,
    valid_until timestamptz NOT NULL,
    batch_id    uuid        NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until > valid_from)
);

CREATE INDEX issued_codes_campaign_shard ON issued_codes (campaign_id, shard);
