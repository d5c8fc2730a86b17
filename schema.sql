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
    id        bigserial,
    category  text NOT NULL,
    port      text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);
-- Ids name rows in messages; the sequence keeps them unique.  No index: the
-- clearer reads the whole due queue anyway, and a primary key was more than
-- half of what the trigger cost an UPDATE of ports.
ALTER TABLE ports_cache_clearing DROP CONSTRAINT IF EXISTS ports_cache_clearing_pkey;
-- A row is due once due_at has passed; any program may queue a clear for
-- later.  reclear marks the second clear that follows a change, for renders
-- that raced the first: clearing it queues nothing.  Added here so that an
-- older queue keeps its rows.
ALTER TABLE ports_cache_clearing
    ADD COLUMN IF NOT EXISTS due_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS reclear boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT '';

-- Several web servers, each with its own cache and daemon (--consumer NAME):
-- while this table is empty every change is queued once, for consumer '';
-- once it holds names, once for each name.  'later' is a notification's
-- payload, so no consumer may be called that.
CREATE TABLE IF NOT EXISTS cache_consumers (
    name text PRIMARY KEY CHECK (name NOT IN ('', 'later'))
);

-- The sequence hands each session ids a hundred at a time: a 30,000-row
-- statement then queues its rows much faster.  Ids only need to be unique.
ALTER SEQUENCE ports_cache_clearing_id_seq CACHE 100;

-- Statement-level, with transition tables: one INSERT ... SELECT per
-- statement instead of one per row.  The pairs are distinct already, since
-- (category, name) is UNIQUE.  The changed rows are named by the event, hence
-- EXECUTE: a transition table exists only in the trigger made for its event.
-- No LEFT JOIN for consumer '': on an empty cache_consumers it made an UPDATE
-- of 30,000 ports cost 15-20 ms more.
CREATE OR REPLACE FUNCTION ports_queue_cache_clearing() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed text := CASE TG_OP WHEN 'DELETE' THEN 'old_rows'
                               WHEN 'TRUNCATE' THEN 'ports' ELSE 'new_rows' END;
    queued bigint := 0;
BEGIN
    IF EXISTS (SELECT FROM cache_consumers) THEN
        EXECUTE format('INSERT INTO ports_cache_clearing (category, port, consumer)'
                       ' SELECT r.category, r.name, c.name'
                       ' FROM %I r CROSS JOIN cache_consumers c', changed);
        GET DIAGNOSTICS queued = ROW_COUNT;
    END IF;
    -- None registered, or the last one retired since the line above.
    IF queued = 0 THEN
        EXECUTE format('INSERT INTO ports_cache_clearing (category, port)'
                       ' SELECT category, name FROM %I', changed);
    END IF;
    RETURN NULL;
END
$$;

-- Whoever inserts into the queue wakes the daemon: the trigger above, a
-- clear queued for later, the clearer's own re-clears.  Rows due now notify
-- with their consumer as payload (none, in single-server mode), so that a
-- transaction's notifications fold into one per consumer and that consumer's
-- daemon starts a run at once; rows due later only with 'later', on which
-- every daemon looks when its rows fall due.  A statement that inserted no
-- rows wakes nobody.
CREATE OR REPLACE FUNCTION ports_cache_clearing_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM cache_consumers) THEN
        IF EXISTS (SELECT FROM inserted WHERE due_at <= now()) THEN
            NOTIFY clear_ports_cache;
        ELSIF EXISTS (SELECT FROM inserted) THEN
            NOTIFY clear_ports_cache, 'later';
        END IF;
        RETURN NULL;
    END IF;
    -- Names are registered: a row for '' (a program's "clear later", say)
    -- becomes one row for each name, whose INSERT notifies in turn.
    IF EXISTS (SELECT FROM inserted WHERE consumer = '') THEN
        DELETE FROM ports_cache_clearing q USING inserted i
            WHERE q.id = i.id AND i.consumer = '';
        INSERT INTO ports_cache_clearing (category, port, consumer, due_at, reclear)
            SELECT i.category, i.port, c.name, i.due_at, i.reclear
            FROM inserted i CROSS JOIN cache_consumers c WHERE i.consumer = '';
    END IF;
    PERFORM pg_notify('clear_ports_cache', consumer)
        FROM (SELECT DISTINCT consumer FROM inserted
              WHERE due_at <= now() AND consumer <> '') AS due;
    IF NOT FOUND AND EXISTS (SELECT FROM inserted WHERE consumer <> '') THEN
        NOTIFY clear_ports_cache, 'later';
    END IF;
    RETURN NULL;
END
$$;

-- A rename or a move also queues the old pair, for consumer '': the queue's
-- trigger fans it out to the registered names.  A row trigger whose WHEN
-- holds only then costs nothing to an UPDATE that changes other columns.
CREATE OR REPLACE FUNCTION ports_queue_old_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ports_cache_clearing (category, port) VALUES (OLD.category, OLD.name);
    RETURN NULL;
END
$$;

-- Transition tables allow one event per trigger, hence one trigger each.
DROP TRIGGER IF EXISTS ports_cache_clearing_insert ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_update ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_delete ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_rename ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_truncate ON ports;
DROP TRIGGER IF EXISTS ports_cache_clearing_notify ON ports_cache_clearing;

CREATE TRIGGER ports_cache_clearing_insert
    AFTER INSERT ON ports REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_update
    AFTER UPDATE ON ports REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_delete
    AFTER DELETE ON ports REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_rename
    AFTER UPDATE OF category, name ON ports
    FOR EACH ROW WHEN (OLD.category IS DISTINCT FROM NEW.category
                       OR OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION ports_queue_old_name();
-- TRUNCATE has no transition table: queue every port before it goes.
CREATE TRIGGER ports_cache_clearing_truncate
    BEFORE TRUNCATE ON ports
    FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
CREATE TRIGGER ports_cache_clearing_notify
    AFTER INSERT ON ports_cache_clearing REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION ports_cache_clearing_notify();

COMMIT;

-- Least privilege: the daemon and the clearer need these, and nothing more
-- (the queue's trigger, which they fire when they queue re-clears, runs with
-- their rights).  Connecting also needs CONNECT on the database and USAGE on
-- the schema, which PostgreSQL grants to PUBLIC by default; a hardened
-- cluster must grant them too.
--
--   CREATE ROLE freshports_cache LOGIN;
--   GRANT SELECT, INSERT, DELETE ON ports_cache_clearing TO freshports_cache;
--   GRANT USAGE ON SEQUENCE ports_cache_clearing_id_seq TO freshports_cache;
--   GRANT SELECT ON cache_consumers TO freshports_cache;
