-- A faithful subset of FreshPorts' schema (FreshPorts/databases,
-- freshports.org.sql): ports keyed by ids, its names in element and
-- categories, the ports_all view, port_dependencies, commit_log, the four
-- cache-clearing queues with their real columns and constraints (and their
-- names), and triggers that fill them row by row as FreshPorts' own do
-- today (branches/git/ri.txt: INSERT ... ON CONFLICT ON CONSTRAINT).  For trying
-- adopt.sql and the .ini on a scratch database; the tests and the bench use
-- it too.
--
--   createdb fp_try; psql -d fp_try -f contrib/freshports/subset.sql
--   psql -d fp_try -v ON_ERROR_STOP=1 -f schema.sql -f contrib/freshports/adopt.sql
CREATE TABLE element (id serial PRIMARY KEY, name text NOT NULL, parent_id integer,
                      status character(1) NOT NULL DEFAULT 'A');
CREATE TABLE categories (id serial PRIMARY KEY, name text NOT NULL, element_id integer);
CREATE TABLE ports (id serial PRIMARY KEY, element_id integer NOT NULL REFERENCES element,
                    category_id integer NOT NULL REFERENCES categories, version text);
CREATE VIEW ports_all AS
    SELECT P.id, E.name, C.name AS category, P.version
    FROM ports P JOIN element E ON E.id = P.element_id JOIN categories C ON C.id = P.category_id;
CREATE TABLE port_dependencies (port_id integer NOT NULL REFERENCES ports,
                                port_id_dependent_upon integer NOT NULL REFERENCES ports,
                                dependency_type character(1) NOT NULL);
CREATE TABLE commit_log (id serial PRIMARY KEY, message_id text NOT NULL,
                         commit_date timestamp with time zone NOT NULL);
CREATE TABLE cache_clearing_ports (id serial PRIMARY KEY,
    port_id integer NOT NULL REFERENCES ports ON DELETE CASCADE, category text NOT NULL,
    port text NOT NULL, date_added timestamp without time zone DEFAULT now(),
    CONSTRAINT cache_clearing_ports_category_port_idx UNIQUE (category, port));
CREATE TABLE cache_clearing_dates (id serial PRIMARY KEY, date_to_clear date,
    date_added timestamp without time zone DEFAULT now());
CREATE TABLE cache_clearing_commits (commit_to_clear text,
    date_added timestamp without time zone DEFAULT now(),
    CONSTRAINT cache_clearing_commits_idx PRIMARY KEY (commit_to_clear));
CREATE TABLE cache_clearing_files (id serial PRIMARY KEY, pathname text NOT NULL UNIQUE,
    date_added timestamp without time zone DEFAULT now());

CREATE FUNCTION ports_clear_cache() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cache_clearing_ports (port_id, category, port)
        SELECT PA.id, PA.category, PA.name FROM ports_all PA WHERE PA.id = NEW.id
        ON CONFLICT ON CONSTRAINT cache_clearing_ports_category_port_idx DO NOTHING;
    NOTIFY port_updated;
    RETURN NEW;
END $$;
CREATE TRIGGER ports_clear_cache AFTER UPDATE ON ports
    FOR EACH ROW EXECUTE FUNCTION ports_clear_cache();

CREATE FUNCTION port_dependencies_clear_cache() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cache_clearing_ports (port_id, category, port)
        SELECT PA.id, PA.category, PA.name FROM ports_all PA
        WHERE PA.id IN (NEW.port_id, NEW.port_id_dependent_upon)
        ON CONFLICT ON CONSTRAINT cache_clearing_ports_category_port_idx DO NOTHING;
    NOTIFY port_updated;
    RETURN NEW;
END $$;
CREATE TRIGGER port_dependencies_insert_clear_cache AFTER INSERT ON port_dependencies
    FOR EACH ROW EXECUTE FUNCTION port_dependencies_clear_cache();

CREATE FUNCTION commit_log_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cache_clearing_dates (date_to_clear)
        SELECT new.commit_date
        WHERE NOT EXISTS (SELECT date_to_clear FROM cache_clearing_dates
                          WHERE date_to_clear = new.commit_date);
    IF FOUND THEN
        NOTIFY date_updated;
    END IF;
    RETURN new;
END $$;
CREATE TRIGGER commit_log_insert AFTER INSERT ON commit_log
    FOR EACH ROW EXECUTE FUNCTION commit_log_insert();

INSERT INTO element (name) VALUES ('www'), ('net'), ('nginx'), ('curl'), ('wget');
INSERT INTO categories (name, element_id) VALUES ('www', 1), ('net', 2);
INSERT INTO ports (element_id, category_id) VALUES (3, 1), (4, 2), (5, 2);
