-- The risk engine (issue 9): each store's geofence radius, the brands' risk policies, and the record of every
-- risk denial and shadow hit.
--
-- radius_m and risk_policies are registry data, versioned as migration 0003 describes: every change bumps
-- `registry_version` and stamps it into `row_version`, so gateways load them incrementally. Rows are never
-- deleted: clearing a policy stores the empty document `{}`.

-- Existing stores get the default geofence radius.
ALTER TABLE stores
    ADD COLUMN radius_m double precision NOT NULL DEFAULT 300 CHECK (radius_m > 0 AND radius_m <= 100000);

-- One policy document per brand (campaign_id 0: brand-wide) and per campaign of the brand; what the gateway
-- enforces is the campaign's document over the brand's over the built-in defaults (risk/policy.py validates and
-- merges them). campaign_id has no foreign key because 0 names no campaign; the administration checks that any
-- other id is a campaign of the brand.
CREATE TABLE risk_policies (
    brand_id    bigint      NOT NULL REFERENCES brands (id),
    campaign_id bigint      NOT NULL DEFAULT 0 CHECK (campaign_id >= 0),
    document    jsonb       NOT NULL CHECK (jsonb_typeof(document) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    row_version bigint      NOT NULL,
    PRIMARY KEY (brand_id, campaign_id)
);

CREATE TRIGGER risk_policies_updated_at BEFORE UPDATE ON risk_policies
    FOR EACH ROW EXECUTE FUNCTION registry_touch_updated_at();

CREATE INDEX risk_policies_row_version ON risk_policies (row_version);

-- Every risk denial and shadow hit, moved here by the ledger writer from each brand's Redis stream
-- (risk/keys.py: rgw:{r<brand>}:events). It never holds a code, not even a code_ref: only who asked, where, and
-- which rule said what. (brand_id, stream_id) makes a re-delivered entry a no-op.
CREATE TABLE risk_events (
    brand_id           bigint           NOT NULL,
    -- the Redis stream entry id
    stream_id          text             NOT NULL,
    at                 timestamptz      NOT NULL,
    campaign_id        bigint           NOT NULL,
    store_id           text             NOT NULL,
    terminal_id        text             NOT NULL,
    client_id          text             NOT NULL,
    customer_device_id text             NOT NULL,
    rule               text             NOT NULL,
    reason             text             NOT NULL,
    mode               text             NOT NULL CHECK (mode IN ('enforce', 'shadow')),
    scope              text             NOT NULL,
    latitude           double precision,
    longitude          double precision,
    accuracy_m         double precision,
    kind               text             NOT NULL CHECK (kind IN ('redeem', 'validate')),
    recorded_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (brand_id, stream_id)
);

CREATE INDEX risk_events_brand_at ON risk_events (brand_id, at);
CREATE INDEX risk_events_rule_reason_at ON risk_events (rule, reason, at);
