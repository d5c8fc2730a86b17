-- listen_clear_cache on FreshPorts' own database.  Load it after schema.sql,
-- both as the role that owns the queue tables (dan), never as a superuser,
-- naming the roles it grants to (each optional: a role it is not given gets
-- nothing):
--
--   psql -U dan -d freshports -v ON_ERROR_STOP=1 -v daemon=cache_clearer \
--        -v commits=commits -v www=www -f contrib/freshports/adopt.sql
--
-- daemon: the role listen_clear_cache connects as; commits: the commit
-- import's, which fills the port, date and commit queues; www: the web
-- site's, whose changes (a watch list's, say) queue port pages.  The
-- packages import only raises NOTIFY packages_imported: it needs nothing.
-- FreshPorts' own triggers and import scripts keep filling its queues as
-- they do; their NOTIFYs (port_updated, date_updated, ...) do no harm.

\set VERBOSITY terse
SET client_min_messages = warning;
BEGIN;

-- Every queue must be the loader's: one line says what to run, and as whom.
DO $$
DECLARE
    queue record;
BEGIN
    FOR queue IN SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
                 WHERE c.oid IN ('cache_clearing_ports'::regclass,
                                 'cache_clearing_dates'::regclass,
                                 'cache_clearing_commits'::regclass)
                   AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
                 ORDER BY c.relname LIMIT 1 LOOP
        RAISE EXCEPTION 'as %, run: ALTER TABLE % OWNER TO %; then run adopt.sql again',
            queue.owner, queue.relname, current_user;
    END LOOP;
END
$$;

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

-- What FreshPorts' roles need, and no more (see the top of this file).
\if :{?daemon}
GRANT SELECT, INSERT, DELETE ON cache_clearing_ports, cache_clearing_dates,
    cache_clearing_commits, packages_cache_clearing, news_cache_clearing TO :"daemon";
GRANT USAGE ON SEQUENCE cache_clearing_ports_id_seq, cache_clearing_dates_id_seq,
    cache_clearing_commits_id_seq, packages_cache_clearing_id_seq,
    news_cache_clearing_id_seq TO :"daemon";
GRANT SELECT ON cache_consumers TO :"daemon";
GRANT SELECT, INSERT, UPDATE, DELETE ON cache_clearing_failures TO :"daemon";
\endif
-- ON CONFLICT ON CONSTRAINT needs SELECT on the constraint's columns.
\if :{?commits}
GRANT INSERT ON cache_clearing_ports, cache_clearing_dates, cache_clearing_commits
    TO :"commits";
GRANT SELECT (category, port, id) ON cache_clearing_ports TO :"commits";
GRANT SELECT (commit_to_clear, id) ON cache_clearing_commits TO :"commits";
GRANT USAGE ON SEQUENCE cache_clearing_ports_id_seq, cache_clearing_dates_id_seq,
    cache_clearing_commits_id_seq TO :"commits";
\endif
\if :{?www}
GRANT INSERT ON cache_clearing_ports TO :"www";
GRANT SELECT (category, port, id) ON cache_clearing_ports TO :"www";
GRANT USAGE ON SEQUENCE cache_clearing_ports_id_seq TO :"www";
\endif
