-- listen_clear_cache on FreshPorts' own database.  Load it after schema.sql,
-- both as the role that owns the queue tables, never as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -f schema.sql -f contrib/freshports/adopt.sql
--
-- FreshPorts' own triggers and import scripts keep filling its queues as
-- they do; their NOTIFYs (port_updated, date_updated, ...) do no harm.

SET client_min_messages = warning;
BEGIN;

-- A unique key made of a queue's keys drops a change that arrives while an
-- older row is queued (ON CONFLICT DO NOTHING), or fails its INSERT:
-- cache_clearing_ports_category_port_idx, UNIQUE (category, port), since
-- 2022, and cache_clearing_commits_idx, the primary key of
-- cache_clearing_commits.  FreshPorts' triggers name them (INSERT ... ON
-- CONFLICT ON CONSTRAINT ... DO NOTHING), so each keeps its name and kind and
-- takes the queue's id too: unique per queued row, it never conflicts, and
-- those statements run as published.  cache_clearing_commits gets an id.
--
-- A queued port's rows reference ports ON DELETE CASCADE: a port updated,
-- then deleted, in one transaction would take its rows, and its pages would
-- stay.  Queued rows outlive what they name: the reference goes.
DO $$
DECLARE
    queue text;
    doomed record;
BEGIN
    ALTER TABLE cache_clearing_commits ADD COLUMN IF NOT EXISTS id bigserial;
    -- A commit's directory as FreshPorts' PHP names it (classes/cache.php,
    -- _CleanKey): lower case, every run of characters outside [a-z0-9] one
    -- '-'.  A git hash is itself; an svn-era message id is not.  Generated
    -- from the key, so the .ini's placeholder {commit_dir} can name it.
    ALTER TABLE cache_clearing_commits ADD COLUMN IF NOT EXISTS commit_dir text
        GENERATED ALWAYS AS (regexp_replace(lower(commit_to_clear), '[^a-z0-9]+', '-', 'g'))
        STORED;
    FOR doomed IN
        SELECT c.conname FROM pg_constraint c
        WHERE c.conrelid = 'cache_clearing_ports'::regclass AND c.contype = 'f'
          AND c.confrelid = 'ports'::regclass
    LOOP
        EXECUTE format('ALTER TABLE cache_clearing_ports DROP CONSTRAINT %I', doomed.conname);
    END LOOP;
    FOREACH queue IN ARRAY ARRAY['cache_clearing_ports', 'cache_clearing_dates',
                                 'cache_clearing_commits'] LOOP
        FOR doomed IN
            SELECT c.conname, CASE c.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END
                              AS kind,
                   (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.i)
                    FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, i)
                    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum)
                   AS columns
            FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
            WHERE c.conrelid = queue::regclass AND c.contype IN ('p', 'u')
              AND NOT EXISTS (SELECT FROM unnest(i.indkey) AS k(attnum)
                              WHERE k.attnum NOT IN (
                                  SELECT a.attnum FROM pg_attribute a
                                  JOIN cache_clearing_keys(queue::regclass) ck
                                    ON ck.name = a.attname
                                  WHERE a.attrelid = queue::regclass))
        LOOP
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I %s (%s, id)',
                           queue, doomed.conname, doomed.conname, doomed.kind, doomed.columns);
        END LOOP;
        PERFORM cache_clearing_queue(queue::regclass);
    END LOOP;
END
$$;

-- Queues without keys, meaning "all of it", for the jobs fp-listen does on
-- channels that have no queue: the daemon listens on them (listen = in
-- listen_clear_cache.ini) and queues a row here on each notification.  The
-- packages import's NOTIFY packages_imported rolls the packages cache back
-- with zfs, a command; category_new, ports_updating, ports_moved and vuxml
-- clear news/.  So the import and the triggers run unchanged.
CREATE TABLE IF NOT EXISTS packages_cache_clearing (
    id         bigserial,
    date_added timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS news_cache_clearing (
    id         bigserial,
    date_added timestamptz NOT NULL DEFAULT now()
);
DO $$ BEGIN
    PERFORM cache_clearing_queue('packages_cache_clearing');
    PERFORM cache_clearing_queue('news_cache_clearing');
END $$;

COMMIT;
