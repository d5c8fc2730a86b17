-- listen_clear_cache schema: the machinery that makes any table a
-- cache-clearing queue, the queue ports_cache_clearing, and (where the
-- database has no ports of its own, or one with text columns category and
-- name) the ports table and the triggers that fill the queue.  Safe to load
-- again: it keeps existing data.  Load it as the role that owns the queues
-- (cache_owner in the recipes), never as a superuser (see "Adopting on an
-- existing database" in README.md), naming the daemon's role for its grants:
--
--   psql -v ON_ERROR_STOP=1 -v daemon_role=cache_clearer -f schema.sql

SET client_min_messages = warning;
BEGIN;

-- The functions below take this schema's search_path, pg_temp last, from the
-- session (FROM CURRENT); pg_catalog, not named, comes first.  Still, whoever
-- may CREATE in this schema could add an overload that PostgreSQL prefers to
-- pg_catalog's, quote_ident(name) to quote_ident(text), and have the
-- machinery's owner run it: so every built-in function they call is named
-- pg_catalog.f, and every other call and operator has its exact types.
DO $$ BEGIN
    PERFORM pg_catalog.set_config('search_path',
        pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp', true);
END $$;

-- Several web servers, each with its own cache and daemon (--consumer NAME):
-- while this table is empty every change is queued once, for consumer '';
-- once it holds names, once for each name.  'later' is a notification's
-- payload, so no consumer may be called that.
CREATE TABLE IF NOT EXISTS cache_consumers (
    name text PRIMARY KEY CHECK (name NOT IN ('', 'later'))
);

-- Keys whose pages or command keep failing.  The daemon's clearer queues a
-- failed key again, due after a backoff of its own (0.5 s doubling to a
-- minute), so that it holds up no other change; here it counts the attempts
-- and keeps when a line last said so, so that the log stays calm across its
-- runs.  A key cleared at last leaves it.  --check reads it.
CREATE TABLE IF NOT EXISTS cache_clearing_failures (
    queue    text NOT NULL,
    consumer text NOT NULL,
    key      text NOT NULL,
    since    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    attempts integer NOT NULL DEFAULT 1,
    said_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (queue, consumer, key)
);

-- A queue's keys: its columns without a default, an identity or a generation
-- expression.  The clearer's placeholders name them; a re-clear copies them
-- and lets the defaults fill the rest.
CREATE OR REPLACE FUNCTION cache_clearing_keys(queue regclass)
RETURNS TABLE (name name, type text)
LANGUAGE sql STABLE AS $$
    SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = queue::oid AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.atthasdef
      AND a.attidentity = '' AND a.attgenerated = ''
    ORDER BY a.attnum
$$;

-- Whoever inserts into a queue wakes the daemon: a trigger, a program's
-- "clear later", the clearer's own re-clears.  Rows due now notify with their
-- consumer as payload (none, in single-server mode), so that a transaction's
-- notifications fold into one per consumer and that consumer's daemon starts
-- a run at once; rows due later only with 'later', on which every daemon
-- looks when its rows fall due.  A statement that inserted no rows wakes
-- nobody.  One channel for every queue: a run reads them all.
CREATE OR REPLACE FUNCTION cache_clearing_notify() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM cache_consumers) THEN
        IF EXISTS (SELECT FROM inserted WHERE due_at <= pg_catalog.now()) THEN
            NOTIFY clear_ports_cache;
        ELSIF EXISTS (SELECT FROM inserted) THEN
            NOTIFY clear_ports_cache, 'later';
        END IF;
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.pg_notify('clear_ports_cache', consumer)
        FROM (SELECT DISTINCT consumer FROM inserted
              WHERE due_at <= pg_catalog.now() AND consumer <> '') AS due;
    IF NOT FOUND AND EXISTS (SELECT FROM inserted WHERE consumer <> '') THEN
        NOTIFY clear_ports_cache, 'later';
    END IF;
    RETURN NULL;
END
$$;

-- Names are registered: a row for '' (a program's "clear later", a rename's
-- old name) becomes one row for each name instead.  Before each statement
-- that inserts into a queue, one look at cache_consumers, kept for the
-- statement in a setting; a row trigger whose WHEN reads that setting then
-- costs a row nothing while no name is registered.  Nothing here reads the
-- queue itself: a writer's transaction that read it would form read/write
-- cycles with a clearer's SERIALIZABLE run, and starve it.
CREATE OR REPLACE FUNCTION cache_clearing_look_for_consumers() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_catalog.set_config('cache_clearing.fan_out',
                       CASE WHEN EXISTS (SELECT FROM cache_consumers) THEN 'on' ELSE '' END, true);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION cache_clearing_fan_out() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    names text;
    keys text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(k.name) || ', ', ''), pg_catalog.string_agg(pg_catalog.format('($1).%I, ', k.name), '')
        INTO names, keys FROM cache_clearing_keys(TG_RELID::regclass) k;
    EXECUTE pg_catalog.format('INSERT INTO %I.%I (%s due_at, reclear, consumer)'
                   ' SELECT %s ($1).due_at, ($1).reclear, c.name FROM cache_consumers c',
                   TG_TABLE_SCHEMA, TG_TABLE_NAME, coalesce(names, ''), coalesce(keys, ''))
        USING NEW;
    RETURN NULL;
END
$$;

-- Makes an existing table a cache-clearing queue; idempotent, keeps its rows.
-- Rows are inserted unconditionally: a UNIQUE or PRIMARY KEY made of keys
-- only would drop a change arriving while a clearer holds an older row (or
-- fail its INSERT), and collide with the re-clears, so it is refused.
CREATE OR REPLACE FUNCTION cache_clearing_queue(queue regclass) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    refused record;
    trigger record;
    base text;
    name text;
BEGIN
    -- A row is due once due_at has passed; any program may queue a clear for
    -- later.  reclear marks the second clear that follows a change, for
    -- renders that raced the first: clearing it queues nothing.  Columns of
    -- those names that the table has already must be just that.
    SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
           pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS def, w.type AS wanted_type,
           w.def AS wanted_def
        INTO refused
        FROM pg_attribute a
        JOIN (VALUES ('due_at', 'timestamp with time zone', 'now()'),
                     ('reclear', 'boolean', 'false'),
                     ('consumer', 'text', '''''::text')) AS w(name, type, def)
          ON a.attname = w.name
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = queue::oid AND NOT a.attisdropped
          AND (pg_catalog.format_type(a.atttypid, a.atttypmod) <> w.type
               OR pg_catalog.pg_get_expr(d.adbin, d.adrelid) IS DISTINCT FROM w.def)
        ORDER BY a.attnum LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cache_clearing_queue(%): column % is % DEFAULT %, not % DEFAULT %:'
            ' rename or alter it first', queue, refused.attname, refused.type,
            coalesce(refused.def, 'NULL'), refused.wanted_type, refused.wanted_def;
    END IF;
    EXECUTE pg_catalog.format('ALTER TABLE %s'
                   ' ADD COLUMN IF NOT EXISTS due_at timestamptz NOT NULL DEFAULT pg_catalog.now(),'
                   ' ADD COLUMN IF NOT EXISTS reclear boolean NOT NULL DEFAULT false,'
                   ' ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT %L', queue, '');
    SELECT coalesce(c.conname, i.indexrelid::regclass::text) AS what,
           CASE c.contype WHEN 'p' THEN 'PRIMARY KEY' WHEN 'u' THEN 'UNIQUE constraint'
                ELSE 'unique index' END AS kind,
           (SELECT pg_catalog.string_agg(a.attname, ', ') FROM pg_attribute a
            WHERE a.attrelid = queue::oid AND a.attnum = ANY (i.indkey)) AS columns
        INTO refused
        FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid
                                                AND c.conrelid = queue::oid
        WHERE i.indrelid = queue::oid AND i.indisunique AND i.indexprs IS NULL
          AND NOT EXISTS (SELECT FROM pg_catalog.unnest(i.indkey) AS k(attnum)
                          WHERE k.attnum NOT IN (
                              SELECT a.attnum FROM pg_attribute a
                              JOIN cache_clearing_keys(queue) ck ON ck.name = a.attname
                              WHERE a.attrelid = queue::oid))
        LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cache_clearing_queue(%): % % is made of key columns only (%):'
            ' a change queued while an older row is would be dropped or fail, and'
            ' re-clears would collide; drop it first', queue, refused.kind, refused.what,
            refused.columns;
    END IF;
    -- Its three triggers, each TABLE_suffix, the table's name cut to fit 63
    -- bytes: (suffix, event, what follows ON TABLE, the function).  A trigger
    -- of that name that runs another function is the site's: left alone.
    FOR trigger IN SELECT * FROM (VALUES
        ('_notify', 'AFTER INSERT', ' REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT'
                    ' EXECUTE FUNCTION cache_clearing_notify()',
         'cache_clearing_notify()'::regprocedure),
        ('_consumers', 'BEFORE INSERT',
                    ' FOR EACH STATEMENT EXECUTE FUNCTION cache_clearing_look_for_consumers()',
         'cache_clearing_look_for_consumers()'::regprocedure),
        ('_fan_out', 'BEFORE INSERT',
                    pg_catalog.format(' FOR EACH ROW WHEN (NEW.consumer = %L AND'
                                      ' pg_catalog.current_setting(%L, true) = %L)'
                                      ' EXECUTE FUNCTION cache_clearing_fan_out()',
                                      '', 'cache_clearing.fan_out', 'on'),
         'cache_clearing_fan_out()'::regprocedure)) AS t(suffix, event, rest, fn) LOOP
        base := (SELECT relname::text FROM pg_class WHERE oid = queue::oid);
        WHILE pg_catalog.octet_length(base || trigger.suffix) > 63 LOOP
            base := pg_catalog.left(base, -1);
        END LOOP;
        name := base || trigger.suffix;
        IF EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = queue::oid AND t.tgname = name
                   AND t.tgfoid <> trigger.fn::oid) THEN
            RAISE EXCEPTION 'cache_clearing_queue(%): it has a trigger % of its own, which'
                ' this would replace: rename it first', queue, name;
        END IF;
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', name, queue);
        EXECUTE pg_catalog.format('CREATE TRIGGER %I %s ON %s', name, trigger.event, queue)
            || trigger.rest;
    END LOOP;
END
$$;

-- From one web server to several: registers the names and gives each the
-- rows queued for '' so far, in every queue.  It first waits for the open
-- transactions of writers (each holds ROW EXCLUSIVE on a queue it filled),
-- so that no row of theirs for '' commits after the copy; writers that come
-- after wait for this transaction, then see the names, and the queues'
-- trigger fans their rows out.  READ COMMITTED, so that it sees what the
-- writers it waited for committed.
CREATE OR REPLACE FUNCTION cache_clearing_add_consumers(VARIADIC names text[])
RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    queues regclass[] := ARRAY(SELECT t.tgrelid::regclass FROM pg_trigger t
                               WHERE t.tgfoid = 'cache_clearing_notify()'::regprocedure::oid
                               ORDER BY t.tgrelid);
    queue regclass;
    keys text;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cache_clearing_add_consumers() must run under READ COMMITTED,'
            ' to see the rows of the writers it waits for';
    END IF;
    FOREACH queue IN ARRAY queues LOOP
        EXECUTE pg_catalog.format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', queue);
    END LOOP;
    INSERT INTO cache_consumers SELECT DISTINCT pg_catalog.unnest(names) ON CONFLICT DO NOTHING;
    FOREACH queue IN ARRAY queues LOOP
        SELECT pg_catalog.string_agg(pg_catalog.quote_ident(k.name) || ', ', '') INTO keys
            FROM cache_clearing_keys(queue) k;
        EXECUTE pg_catalog.format('WITH d AS (DELETE FROM %1$s WHERE consumer = %2$L RETURNING *)'
                       ' INSERT INTO %1$s (%3$s due_at, reclear, consumer)'
                       ' SELECT %3$s d.due_at, d.reclear, c.name'
                       ' FROM d CROSS JOIN cache_consumers c', queue, '', coalesce(keys, ''));
    END LOOP;
END
$$;

DROP FUNCTION IF EXISTS ports_cache_clearing_notify();     -- the seed's, replaced

-- Statement-level, with transition tables: one INSERT ... SELECT per
-- statement instead of one per row.  The pairs are distinct already, since
-- (category, name) is UNIQUE.  The changed rows are named by the event, hence
-- EXECUTE: a transition table exists only in the trigger made for its event.
-- While no consumer is registered, no join.
CREATE OR REPLACE FUNCTION ports_queue_cache_clearing() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    changed text := CASE TG_OP WHEN 'DELETE' THEN 'old_rows'
                               WHEN 'TRUNCATE' THEN 'ports' ELSE 'new_rows' END;
    queued bigint := 0;
BEGIN
    IF EXISTS (SELECT FROM cache_consumers) THEN
        EXECUTE pg_catalog.format('INSERT INTO ports_cache_clearing (category, port, consumer)'
                       ' SELECT r.category, r.name, c.name'
                       ' FROM %I r CROSS JOIN cache_consumers c', changed);
        GET DIAGNOSTICS queued = ROW_COUNT;
    END IF;
    -- None registered, or the last one retired since the line above.
    IF queued = 0 THEN
        EXECUTE pg_catalog.format('INSERT INTO ports_cache_clearing (category, port)'
                       ' SELECT category, name FROM %I', changed);
    END IF;
    RETURN NULL;
END
$$;

-- A rename or a move also queues the old pair, for consumer '': the queue's
-- trigger fans it out to the registered names.
CREATE OR REPLACE FUNCTION ports_queue_old_name() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO ports_cache_clearing (category, port) VALUES (OLD.category, OLD.name);
    RETURN NULL;
END
$$;

-- Writers need only INSERT on a queue (and its sequence): the machinery runs
-- as its owner.  So that nobody else attaches it to a table of their own and
-- runs as that owner, only the owner may use it.  PostgreSQL checks EXECUTE
-- on a trigger function only at CREATE TRIGGER: writers lose nothing.
REVOKE EXECUTE ON FUNCTION cache_clearing_notify(), cache_clearing_look_for_consumers(),
    cache_clearing_fan_out(), cache_clearing_queue(regclass),
    cache_clearing_add_consumers(text[]), ports_queue_cache_clearing(), ports_queue_old_name()
    FROM PUBLIC;

-- The example ports, its queue and its triggers: created where the database
-- has no ports, installed where its ports has the text columns category and
-- name.  Any other ports is the site's own: the machinery alone, said once.
DO $$
BEGIN
    IF pg_catalog.to_regclass('ports') IS NOT NULL
       AND (SELECT pg_catalog.count(*) FROM pg_attribute
            WHERE attrelid = pg_catalog.to_regclass('ports')::oid
              AND attname IN ('category', 'name')
              AND atttypid = 'text'::regtype::oid AND NOT attisdropped) < 2 THEN
        PERFORM pg_catalog.set_config('client_min_messages', 'notice', true);
        RAISE NOTICE 'this database''s ports is its own (no text columns category and'
            ' name): schema.sql installed the machinery alone; make its queues with'
            ' cache_clearing_queue() (see "Adopting on an existing database" in README.md)';
        RETURN;
    END IF;
    IF pg_catalog.to_regclass('ports') IS NULL THEN
        PERFORM pg_catalog.set_config('client_min_messages', 'notice', true);
        RAISE NOTICE 'this database had no ports: schema.sql made the example''s, for'
            ' trying, with ports_cache_clearing and its triggers (see "Adopting on an'
            ' existing database" in README.md)';
        PERFORM pg_catalog.set_config('client_min_messages', 'warning', true);
        CREATE TABLE ports (
            id       serial PRIMARY KEY,
            category text NOT NULL,
            name     text NOT NULL,
            version  text,
            UNIQUE (category, name)
        );
    END IF;
    -- The queue of port pages.  Ids name rows in messages; the sequence keeps
    -- them unique.  No index: the clearer reads the whole due queue anyway, and
    -- a primary key was more than half of what the trigger cost an UPDATE of
    -- ports.
    CREATE TABLE IF NOT EXISTS ports_cache_clearing (
        id        bigserial,
        category  text NOT NULL,
        port      text NOT NULL,
        queued_at timestamptz NOT NULL DEFAULT pg_catalog.now()
    );
    ALTER TABLE ports_cache_clearing DROP CONSTRAINT IF EXISTS ports_cache_clearing_pkey;
    -- The sequence hands each session ids a hundred at a time: a 30,000-row
    -- statement then queues its rows much faster.  Ids only need to be unique.
    ALTER SEQUENCE ports_cache_clearing_id_seq CACHE 100;
    PERFORM cache_clearing_queue('ports_cache_clearing');
    -- Transition tables allow one event per trigger, hence one trigger each.
    DROP TRIGGER IF EXISTS ports_cache_clearing_insert ON ports;
    DROP TRIGGER IF EXISTS ports_cache_clearing_update ON ports;
    DROP TRIGGER IF EXISTS ports_cache_clearing_delete ON ports;
    DROP TRIGGER IF EXISTS ports_cache_clearing_rename ON ports;
    DROP TRIGGER IF EXISTS ports_cache_clearing_truncate ON ports;
    CREATE TRIGGER ports_cache_clearing_insert
        AFTER INSERT ON ports REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
    CREATE TRIGGER ports_cache_clearing_update
        AFTER UPDATE ON ports REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
    CREATE TRIGGER ports_cache_clearing_delete
        AFTER DELETE ON ports REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
    -- A row trigger whose WHEN holds only on a rename costs nothing to an
    -- UPDATE that changes other columns.
    CREATE TRIGGER ports_cache_clearing_rename
        AFTER UPDATE OF category, name ON ports
        FOR EACH ROW WHEN (OLD.category IS DISTINCT FROM NEW.category
                           OR OLD.name IS DISTINCT FROM NEW.name)
        EXECUTE FUNCTION ports_queue_old_name();
    -- TRUNCATE has no transition table: queue every port before it goes.
    CREATE TRIGGER ports_cache_clearing_truncate
        BEFORE TRUNCATE ON ports
        FOR EACH STATEMENT EXECUTE FUNCTION ports_queue_cache_clearing();
END
$$;

COMMIT;

-- Whoever else may CREATE in this schema could still put a table or a
-- function before the site's own, or the machinery's if it were not careful:
-- said once, with the fix.  Superusers aside; pg_database_owner is the
-- database's owner.
DO $$
DECLARE
    grantees text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT CASE WHEN a.grantee = 0::oid THEN 'PUBLIC'
                                               ELSE pg_catalog.quote_ident(r.rolname) END, ', ')
        INTO grantees
        FROM pg_namespace n
        CROSS JOIN pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        LEFT JOIN pg_database d ON d.datname = pg_catalog.current_database()
        LEFT JOIN pg_roles o ON o.oid = d.datdba
        WHERE n.nspname = pg_catalog.current_schema() AND a.privilege_type = 'CREATE'
          AND a.grantee <> (SELECT oid FROM pg_roles WHERE rolname = CURRENT_USER)
          AND NOT coalesce(r.rolsuper, false)
          AND (r.rolname IS DISTINCT FROM 'pg_database_owner'
               OR NOT (o.rolname = CURRENT_USER OR o.rolsuper));
    IF grantees IS NOT NULL THEN
        RAISE WARNING 'others may CREATE in schema %, and shadow what the site''s code calls:'
            ' REVOKE CREATE ON SCHEMA % FROM %', pg_catalog.current_schema(),
            pg_catalog.quote_ident(pg_catalog.current_schema()), grantees;
    END IF;
END
$$;

-- Least privilege: the daemon and the clearer need these, and nothing more.
-- Given the daemon's role, created beforehand, psql grants them:
--
--   psql -v ON_ERROR_STOP=1 -v daemon_role=cache_clearer -f schema.sql
--
-- Connecting also needs CONNECT on the database and USAGE on the schema,
-- which PostgreSQL grants to PUBLIC by default; a hardened cluster must
-- grant them too.  For every other queue a configuration names, the same
-- three rights on it and its sequence.
\if :{?daemon_role}
GRANT SELECT, INSERT, DELETE ON ports_cache_clearing TO :"daemon_role";
GRANT USAGE ON SEQUENCE ports_cache_clearing_id_seq TO :"daemon_role";
GRANT SELECT ON cache_consumers TO :"daemon_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON cache_clearing_failures TO :"daemon_role";
\endif
