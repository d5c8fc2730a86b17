-- listen_clear_cache schema: the ports table, the cache-clearing queue and
-- the trigger that fills it.  Safe to load again: it keeps existing data.
--
--   psql -v ON_ERROR_STOP=1 -f schema.sql

SET client_min_messages = warning;
BEGIN;

CREATE TABLE IF NOT EXISTS ports (
    id       serial PRIMARY KEY,
    category text NOT NULL,
    name     text NOT NULL,
    version  text,
    UNIQUE (category, name)
);

-- The queue is the source of truth; NOTIFY is only a wake-up.  Rows are
-- inserted unconditionally (no UNIQUE, no ON CONFLICT): a change arriving
-- while a clearer holds an older row for the same port must not be dropped.
-- The clearer deduplicates when it reads.
CREATE TABLE IF NOT EXISTS ports_cache_clearing (
    id        bigserial PRIMARY KEY,
    category  text NOT NULL,
    port      text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- Statement-level, with transition tables: one INSERT ... SELECT per
-- statement instead of one per row, and one (category, name) per distinct
-- pair.  A rename queues both the old and the new pair.
CREATE OR REPLACE FUNCTION ports_queue_cache_clearing() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    queued bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ports_cache_clearing (category, port)
            SELECT DISTINCT category, name FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO ports_cache_clearing (category, port)
            SELECT DISTINCT category, name FROM old_rows;
    ELSE
        INSERT INTO ports_cache_clearing (category, port)
            SELECT category, name FROM new_rows
            UNION
            SELECT category, name FROM old_rows;
    END IF;
    GET DIAGNOSTICS queued = ROW_COUNT;
    -- No payload, so that a transaction's notifications fold into one.
    -- A statement that touched no rows wakes nobody.
    IF queued > 0 THEN
        NOTIFY clear_ports_cache;
    END IF;
    RETURN NULL;
END
$$;

-- Transition tables allow one event per trigger, hence three triggers.
DROP TRIGGER IF EXISTS ports_cache_clearing_insert ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_update ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_delete ON ports;

CREATE TRIGGER ports_cache_clearing_insert
    AFTER INSERT ON ports REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_update
    AFTER UPDATE ON ports REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_delete
    AFTER DELETE ON ports REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();

COMMIT;
