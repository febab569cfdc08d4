-- Partition the redemption ledger by month. NOT APPLIED: this is the migration docs/SCALING.md plans for when the
-- ledger grows (see "Ledger partitioning" there for when). It will become two numbered migrations in
-- gateway/db/migrations/, one per step below: gateway/db/migrate.py runs each file in one transaction, and the
-- point of step 1 is to run in its own, under a lock that lets the writer keep inserting.
-- tests/integration/test_partition_plan.py applies it (split at the STEP 2 line) to a fresh database.
--
-- The key is the one migration 0002 decided: `redemptions` is range-partitioned by `redemption_id`, a UUIDv7 whose
-- leading 48 bits are the redemption time in ms (gateway/ids.py; the gateway makes the id and `redeemed_at` from
-- the same clock reading, gateway/service.py), so a month is a range of ids. A unique constraint on a partitioned
-- table must contain the partition key (Postgres 15); with the id as the key the primary key stays
-- (redemption_id) and the writer's `INSERT ... ON CONFLICT (redemption_id) DO NOTHING` (gateway/ledger/store.py)
-- is unchanged. Partitioning by `redeemed_at` instead would make the key (redemption_id, redeemed_at) and the
-- writer's conflict target `ON CONFLICT (redemption_id, redeemed_at)`: still idempotent (a redelivered event
-- carries the same time) but a second source of truth for uniqueness, for nothing the id does not give.
--
-- What stays unpartitioned: `code_uses` (PRIMARY KEY (code_ref, use_number): a code use is granted once, whatever
-- the month; if it must be split, by HASH (code_ref)), `double_spend_alarms`, and `reversals` (UNIQUE
-- (redemption_id): at most one reversal per redemption; a small fraction of the redemptions).
--
-- Month boundaries are UTC. Every id of a month M is >= ledger_uuid7_floor(start of M): the floor is the month's
-- first millisecond with the version and variant bits set and every random bit zero.

CREATE FUNCTION ledger_uuid7_floor(t timestamptz) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (lpad(to_hex(floor(extract(epoch FROM t) * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid;

-- The first instant of the UTC month `months` after the one holding `t`.
CREATE FUNCTION ledger_month_start(t timestamptz, months integer) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (date_trunc('month', t AT TIME ZONE 'UTC') + make_interval(months => months)) AT TIME ZONE 'UTC';

-- STEP 1 (its own transaction, online): bound the existing table. ADD ... NOT VALID takes a brief lock;
-- VALIDATE scans the table (no rewrite) under SHARE UPDATE EXCLUSIVE, which lets the writer keep inserting. The
-- bound is the start of the month after next, so step 2 has at least a month to run; until then every new row is
-- below it. If step 2 is not run in time, inserts of the later month fail this check: the writer retries and the
-- outboxes grow (the designed "Postgres unavailable" mode, with its alert) - nothing is lost, and step 2 is due.
-- Its name carries its month, so step 2 reads the bound back from the catalog.
DO $step1$
DECLARE
    bound_month timestamptz := ledger_month_start(now(), 2);
    check_name text := format('redemptions_before_p%s', to_char(bound_month AT TIME ZONE 'UTC', 'YYYY_MM'));
BEGIN
    EXECUTE format('ALTER TABLE redemptions ADD CONSTRAINT %I CHECK (redemption_id < %L::uuid) NOT VALID',
                   check_name, ledger_uuid7_floor(bound_month));
    EXECUTE format('ALTER TABLE redemptions VALIDATE CONSTRAINT %I', check_name);
END
$step1$;

-- STEP 2 (its own transaction, a short ACCESS EXCLUSIVE lock; no scan, no rewrite): the table becomes the first
-- partition, [MINVALUE, the bound); the validated CHECK implies that range, so ATTACH skips its scan (the server
-- says "partition constraint ... is implied by existing constraints" at DEBUG1). Its indexes are attached to the
-- parent's equivalents, not rebuilt; its rows keep their files.
DO $step2$
DECLARE
    check_name text;
    bound_month timestamptz;
BEGIN
    SELECT conname INTO check_name FROM pg_constraint
    WHERE conrelid = 'redemptions'::regclass AND contype = 'c' AND convalidated
      AND conname LIKE 'redemptions\_before\_p%';
    IF check_name IS NULL THEN
        RAISE EXCEPTION 'run step 1 first: redemptions has no validated redemptions_before_p<YYYY_MM> check';
    END IF;
    bound_month := to_date(right(check_name, 7), 'YYYY_MM')::timestamp AT TIME ZONE 'UTC';
    IF bound_month <= ledger_month_start(now(), 0) THEN
        RAISE EXCEPTION 'the bound of % has passed: drop it and run step 1 again', check_name;
    END IF;

    ALTER TABLE redemptions RENAME TO redemptions_legacy;
    ALTER INDEX redemptions_pkey RENAME TO redemptions_legacy_pkey;
    ALTER INDEX redemptions_campaign_time RENAME TO redemptions_legacy_campaign_time;

    -- Same columns, defaults, NOT NULLs and CHECKs (code_ref length, use_number >= 1), in the same order, so
    -- the writer's `CREATE TEMP TABLE ... (LIKE redemptions ...)` staging table keeps matching its COPY.
    CREATE TABLE redemptions (LIKE redemptions_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (redemption_id);
    EXECUTE format('ALTER TABLE redemptions DROP CONSTRAINT %I', check_name);  -- copied by LIKE; not the parent's
    ALTER TABLE redemptions ADD CONSTRAINT redemptions_pkey PRIMARY KEY (redemption_id);
    CREATE INDEX redemptions_campaign_time ON redemptions (campaign_id, redeemed_at);

    EXECUTE format('ALTER TABLE redemptions ATTACH PARTITION redemptions_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
                   ledger_uuid7_floor(bound_month));
    EXECUTE format('ALTER TABLE redemptions_legacy DROP CONSTRAINT %I', check_name);  -- the partition bound holds
END
$step2$;

-- A safety net, kept empty: a row no monthly partition takes (the job below did not run) lands here instead of
-- failing the writer's batch. Alert on any row in it; while it holds rows of a month, that month's partition
-- cannot be created until they are moved (CREATE ... PARTITION OF checks the default partition).
CREATE TABLE redemptions_default PARTITION OF redemptions DEFAULT;

-- Monthly partitions from the bound on, `months_ahead` months past the current one; returns how many it created.
-- Idempotent: run by the migration, then daily by a job (a Kubernetes CronJob running
-- `SELECT ledger_create_month_partitions(3)` with the migrate Job's credentials), so a month's partition exists
-- months before its first row. A month already covered (by redemptions_legacy or an earlier run) is skipped.
CREATE FUNCTION ledger_create_month_partitions(months_ahead integer DEFAULT 3) RETURNS integer
    LANGUAGE plpgsql AS $fn$
DECLARE
    created integer := 0;
    month_start timestamptz;
    part_name text;
BEGIN
    FOR i IN 0 .. months_ahead LOOP
        month_start := ledger_month_start(now(), i);
        part_name := format('redemptions_p%s', to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM'));
        CONTINUE WHEN to_regclass(part_name) IS NOT NULL;
        BEGIN
            EXECUTE format('CREATE TABLE %I PARTITION OF redemptions FOR VALUES FROM (%L) TO (%L)', part_name,
                           ledger_uuid7_floor(month_start), ledger_uuid7_floor(ledger_month_start(month_start, 1)));
            created := created + 1;
        EXCEPTION WHEN invalid_object_definition THEN  -- 42P17: overlaps a partition that covers the month
            NULL;
        END;
    END LOOP;
    RETURN created;
END
$fn$;

SELECT ledger_create_month_partitions(3);

-- Reports that select by time should say it in ids too, so only the months concerned are read:
--   WHERE redemption_id >= ledger_uuid7_floor($from) AND redemption_id < ledger_uuid7_floor($to)
--     AND redeemed_at >= $from AND redeemed_at < $to
-- Retention: ALTER TABLE redemptions DETACH PARTITION redemptions_pYYYY_MM CONCURRENTLY, archive, drop.
