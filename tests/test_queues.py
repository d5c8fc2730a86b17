"""Queues of any shape: cache_clearing_queue(), --config, placeholders, commands."""

import os
import re
import subprocess
import sys

import psycopg2
import psycopg2.errors
import pytest

from tests.fixtures.common import SCHEMA, wait_for
from tests.fixtures.daemon import (CLEAR, LISTEN, assert_one_line_error, check, clean_env,
                                   clear)
from tests.fixtures.database import add_ports, create_database, drop_database, sql
from tests.fixtures.files import make_page
from tests.fixtures.proxy import free_port


@pytest.fixture
def queues(db):
    """Two queues beside ports_cache_clearing: dates, and one without keys."""
    sql(db, "DROP TABLE IF EXISTS q_dates, q_all, q_nums, q_plain")
    sql(db, "CREATE TABLE q_dates (id serial PRIMARY KEY, day date, added timestamp DEFAULT now())")
    sql(db, "CREATE TABLE q_all (id bigserial)")
    sql(db, "CREATE TABLE q_nums (n integer)")
    for table in ("q_dates", "q_all", "q_nums"):
        sql(db, "SELECT cache_clearing_queue(%s)", (table,))
    yield db
    sql(db, "DROP TABLE IF EXISTS q_dates, q_all, q_nums, q_plain")


def write_config(tmp_path, text, name="queues.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------- the machinery

def test_a_queue_gets_the_clearers_columns_and_its_notify_trigger(queues):
    columns = sql(queues, "SELECT column_name FROM information_schema.columns"
                  " WHERE table_name = 'q_dates' ORDER BY ordinal_position")
    assert [c for c, in columns] == ["id", "day", "added", "due_at", "reclear", "consumer"]
    assert sql(queues, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'q_dates'::regclass"
               " ORDER BY tgname") == [("q_dates_consumers",), ("q_dates_fan_out",),
                                       ("q_dates_notify",)]
    assert sql(queues, "SELECT * FROM cache_clearing_keys('q_dates')") == [("day", "date")]
    assert sql(queues, "SELECT * FROM cache_clearing_keys('q_all')") == []


def test_making_a_queue_twice_keeps_its_rows(queues):
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    sql(queues, "SELECT cache_clearing_queue('q_dates')")
    assert sql(queues, "SELECT day::text, consumer FROM q_dates") == [("2026-11-30", "")]


@pytest.mark.parametrize("constraint, named", [
    ("UNIQUE (day)", "UNIQUE constraint q_plain_day_key"),
    ("PRIMARY KEY (day)", "PRIMARY KEY q_plain_pkey"),
    (None, "unique index q_plain_day_idx")])
def test_a_unique_key_of_key_columns_only_is_refused(db, constraint, named):
    sql(db, "DROP TABLE IF EXISTS q_plain")
    sql(db, "CREATE TABLE q_plain (id serial, day date%s)" % (
        ", " + constraint if constraint else ""))
    if constraint is None:
        sql(db, "CREATE UNIQUE INDEX q_plain_day_idx ON q_plain (day)")
    with pytest.raises(psycopg2.Error) as caught:
        sql(db, "SELECT cache_clearing_queue('q_plain')")
    message = caught.value.diag.message_primary
    assert named in message and "(day)" in message and "dropped" in message, message
    assert sql(db, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'q_plain'::regclass") == [
        (0,)]
    sql(db, "DROP TABLE q_plain")


def test_a_unique_key_with_a_defaulted_column_is_fine(queues):
    # q_dates has PRIMARY KEY (id), a serial: each row its own, so the same
    # day queued twice is two rows, and making it a queue again keeps both.
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30'), ('2026-11-30')")
    sql(queues, "SELECT cache_clearing_queue('q_dates')")
    assert sql(queues, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'q_dates'::regclass"
               " ORDER BY tgname") == [("q_dates_consumers",), ("q_dates_fan_out",),
                                       ("q_dates_notify",)]
    assert sql(queues, "SELECT day::text FROM q_dates") == [("2026-11-30",), ("2026-11-30",)]


INCOMPATIBLE = """
CREATE TABLE element (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE ports (id serial PRIMARY KEY, element_id integer NOT NULL, category_id integer);
CREATE FUNCTION ports_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN NEW; END $$;
CREATE TRIGGER ports_touch BEFORE UPDATE ON ports FOR EACH ROW EXECUTE FUNCTION ports_touch();
INSERT INTO ports (element_id, category_id) VALUES (1, 1);
"""


def test_schema_sql_leaves_an_incompatible_ports_alone(admin_dsn):
    name = "lcc_incompatible_%d" % os.getpid()
    dsn = create_database(admin_dsn, name, site=INCOMPATIBLE)
    try:
        before = sql(dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'ports'::regclass"
                     " AND NOT tgisinternal ORDER BY 1")
        result = subprocess.run(["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f",
                                 SCHEMA], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        said = result.stderr.strip().splitlines()
        assert len(said) == 1 and "NOTICE:  this database's ports is its own" in said[0] \
            and "Adopting on an existing database" in said[0], result.stderr
        assert sql(dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'ports'::regclass"
                   " AND NOT tgisinternal ORDER BY 1") == before == [("ports_touch",)]
        assert sql(dsn, "UPDATE ports SET category_id = 2") == 1
        # The machinery alone: no queue nobody uses.
        assert sql(dsn, "SELECT to_regclass('ports_cache_clearing') IS NULL") == [(True,)]
    finally:
        drop_database(admin_dsn, name)


# ---------------------------------------------------------- who may do what

@pytest.fixture
def roles(queues):
    """A writer with INSERT on q_dates alone, one with UPDATE on ports alone, an outsider."""
    names = {kind: "lcc_%s_%d" % (kind, os.getpid()) for kind in ("writer", "porter", "outsider")}
    for name in names.values():
        sql(queues, "DROP ROLE IF EXISTS %s" % name)
        sql(queues, "CREATE ROLE %s LOGIN" % name)
    sql(queues, "GRANT INSERT ON q_dates TO %s" % names["writer"])
    sql(queues, "GRANT USAGE ON SEQUENCE q_dates_id_seq TO %s" % names["writer"])
    sql(queues, "GRANT SELECT, UPDATE ON ports TO %s" % names["porter"])
    sql(queues, "GRANT CREATE ON SCHEMA public TO %s" % names["outsider"])
    sql(queues, "INSERT INTO cache_consumers VALUES ('web1'), ('web2')")
    yield {kind: psycopg2.extensions.make_dsn(queues, user=name) for kind, name in names.items()}
    for name in names.values():
        sql(queues, "DROP OWNED BY %s; DROP ROLE %s" % (name, name))


def test_a_writer_needs_only_insert_for_the_fan_out_and_the_notify(queues, roles):
    sql(roles["writer"], "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    assert sorted(sql(queues, "SELECT consumer, day::text FROM q_dates")) == [
        ("web1", "2026-11-30"), ("web2", "2026-11-30")]


def test_a_writer_of_ports_needs_no_right_on_the_queue(queues, roles):
    add_ports(queues, "www/a")
    sql(queues, "DELETE FROM ports_cache_clearing")
    assert sql(roles["porter"], "UPDATE ports SET version = '2'") == 1
    assert sorted(sql(queues, "SELECT consumer FROM ports_cache_clearing")) == [
        ("web1",), ("web2",)]
    sql(queues, "DELETE FROM ports_cache_clearing")
    assert sql(roles["porter"], "UPDATE ports SET name = 'b'") == 1     # the rename too
    assert sql(queues, "SELECT count(*) FROM ports_cache_clearing") == [(4,)]


def test_nobody_else_may_use_the_machinery_on_a_table_of_their_own(roles):
    outsider = roles["outsider"]
    sql(outsider, "CREATE TABLE mine (x text)")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        sql(outsider, "CREATE TRIGGER mine_notify AFTER INSERT ON mine REFERENCING NEW TABLE"
            " AS inserted FOR EACH STATEMENT EXECUTE FUNCTION cache_clearing_notify()")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        sql(outsider, "SELECT cache_clearing_queue('mine')")


# ------------------------------------------------------------- --config

@pytest.mark.parametrize("text, says", [
    ("[q_dates]\nbogus = 1\n", "[q_dates]: unknown option bogus"),
    ("[q_dates]\n", "[q_dates]: needs pages or command"),
    ("[q_dates]\npages = a/{day\n", "[q_dates] pages: template 'a/{day'"),
    ("[q_dates]\npages = {day:%Y/%m}.html\n", "[q_dates] pages: template"),
    ("[q_dates]\npages = d/{day}\nagain_after = soon\n", "[q_dates] again_after: expected"),
    ("[q_dates]\ncommand = /bin/true\ntimeout = 0\n", "[q_dates] timeout: expected"),
    ("[q_dates]\ncommand = 'unterminated\n", "[q_dates] command: No closing quotation"),
    ("[q-dates]\npages = x\n", "[q-dates]: not a table name"),
    ("[]]\ncommand = /bin/true\n[q_dates]\npages = d/{day}\n", "[]]: not a table name"),
    ("[DEFAULT]\npages = x/*\n", "[DEFAULT]: not a table name"),
    ("[default]\npages = x/*\n", "[default]: not a table name"),
    ("[q_dates]\npages = d/{day}\n[]\npages = x/*\n", "[]: not a table name"),
    ("[q_dates]\npages = a/{}\n", "{} names no key column"),
    ("[q_dates]\ncommand = /bin/echo {0}\n", "{0} names no key column"),
    ("[q_all]\ncommand = /bin/true\nlisten = news bad-name\n",
     "[q_all] listen: 'bad-name' is not a channel name"),
    ("[q_all]\ncommand = /bin/true\nlisten = clear_ports_cache\n",
     "[q_all] listen: clear_ports_cache is the queues' own channel"),
    ("no section\n", "File contains no section headers"),
    ("", "no queue"),
])
def test_a_bad_configuration_is_one_line_before_any_database_access(tmp_path, cache, text,
                                                                      says):
    config = write_config(tmp_path, text)
    dsn = "host=127.0.0.1 port=%d connect_timeout=1" % free_port()
    for script in (CLEAR, LISTEN):
        result = subprocess.run([sys.executable, script, "--dsn", dsn, "--cache-dir",
                                 str(cache), "--config", config], capture_output=True,
                                text=True, timeout=30)
        assert_one_line_error(result, 2)
        assert config in result.stderr and says in result.stderr, result.stderr


def test_config_and_pages_together_are_a_usage_error(tmp_path, cache):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}\n")
    for args, env in ((["--pages", "x/{port}"], {}), ([], {"CLEAR_CACHE_PAGES": "x/{port}"})):
        result = subprocess.run([sys.executable, CLEAR, "--cache-dir", str(cache), "--config",
                                 config] + args, capture_output=True, text=True, timeout=30,
                                env=dict(os.environ, **env))
        assert_one_line_error(result, 2)


def test_the_configuration_comes_from_the_environment_and_percent_is_literal(
        queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/%{day:%Y}%.html\n")
    page = cache / "d" / "%2026%.html"
    page.parent.mkdir()
    page.write_text("x")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear(dsn=queues, cache=cache, env={"CLEAR_CACHE_CONFIG": config})
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_table_names_are_quoted_so_user_and_order_work(queues, cache, tmp_path, daemon):
    sql(queues, 'DROP TABLE IF EXISTS "user", "order"; CREATE TABLE "user" (name text);'
        ' CREATE TABLE "order" (n integer)')
    sql(queues, """SELECT cache_clearing_queue('"user"'), cache_clearing_queue('"order"')""")
    config = write_config(tmp_path, "[user]\npages = u/{name}\n[order]\npages = o/{n}\n")
    d = daemon(cache, "--config", config, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    pages = [make_page(cache, "u", "bob"), make_page(cache, "o", "7")]
    sql(queues, 'INSERT INTO "user" VALUES (\'bob\'); INSERT INTO "order" VALUES (7)')
    wait_for(lambda: not any(p.exists() for p in pages), what="both tables' pages")
    assert "ERROR" not in d.log(), d.log()
    sql(queues, 'DROP TABLE "user", "order"')


def test_one_table_under_two_names_is_exit_2(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}\n"
                          "[public.q_dates]\ncommand = /bin/true\n")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert_one_line_error(result, 2)
    assert "the same table as queue q_dates" in result.stderr, result.stderr
    assert sql(queues, "SELECT count(*) FROM q_dates") == [(1,)]


@pytest.mark.parametrize("length", [56, 57, 63])
def test_a_table_name_of_any_length_works_end_to_end(queues, cache, tmp_path, length):
    table = ("q_long_" + "x" * 63)[:length]
    sql(queues, "DROP TABLE IF EXISTS %s; CREATE TABLE %s (k text)" % (table, table))
    sql(queues, "SELECT cache_clearing_queue(%s)", (table,))
    assert sql(queues, "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass",
               (table,)) == [(3,)]
    config = write_config(tmp_path, "[%s]\npages = l/{k}\n" % table)
    page = make_page(cache, "l", "a")
    sql(queues, "INSERT INTO %s (k) VALUES ('a')" % table)
    result = clear("--config", config, "--again-after", "0", dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists()
    assert check("--config", config, dsn=queues).stdout.startswith(
        "CLEAR_CACHE CRITICAL - 0 rows due"), "no listener, and nothing left due"
    sql(queues, "DROP TABLE %s" % table)


def test_a_configuration_of_any_size_reaches_the_daemons_clearers(queues, cache, tmp_path,
                                                                  daemon):
    config = write_config(tmp_path, "# %s\n[q_dates]\npages = d/{day}.html\n"
                          % ("padding " * 40_000))       # 320 KB
    d = daemon(cache, "--config", config, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    page = make_page(cache, "d", "2026-11-30.html")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    wait_for(lambda: not page.exists(), what="the page, by a clearer the daemon started")
    assert "Argument list too long" not in d.log(), d.log()


def test_the_machinery_never_replaces_a_trigger_of_the_sites_own(queues):
    sql(queues, "DROP TABLE IF EXISTS q_plain; CREATE TABLE q_plain (k text)")
    sql(queues, "CREATE OR REPLACE FUNCTION site_audit() RETURNS trigger LANGUAGE plpgsql AS"
        " 'BEGIN RETURN NULL; END'; CREATE TRIGGER q_plain_notify AFTER INSERT ON q_plain"
        " FOR EACH STATEMENT EXECUTE FUNCTION site_audit()")
    with pytest.raises(psycopg2.errors.RaiseException,
                       match="has a trigger q_plain_notify of its own"):
        sql(queues, "SELECT cache_clearing_queue('q_plain')")
    assert sql(queues, "SELECT t.tgname, p.proname FROM pg_trigger t JOIN pg_proc p"
               " ON p.oid = t.tgfoid WHERE t.tgrelid = 'q_plain'::regclass") == [
        ("q_plain_notify", "site_audit")]
    sql(queues, "DROP FUNCTION site_audit() CASCADE")


@pytest.mark.parametrize("column", ["consumer integer", "consumer text DEFAULT 'web1'",
                                    "due_at timestamp DEFAULT now()", "reclear text",
                                    "due_at timestamptz DEFAULT now() + interval '1 s'"])
def test_the_machinery_refuses_its_columns_of_another_kind(queues, column):
    sql(queues, "DROP TABLE IF EXISTS q_plain; CREATE TABLE q_plain (k text, %s)" % column)
    before = sql(queues, "SELECT attname FROM pg_attribute WHERE attrelid = 'q_plain'::regclass"
                 " AND attnum > 0 ORDER BY attnum")
    with pytest.raises(psycopg2.errors.RaiseException,
                       match=r"column %s is .* not " % column.split()[0]):
        sql(queues, "SELECT cache_clearing_queue('q_plain')")
    assert sql(queues, "SELECT attname FROM pg_attribute WHERE attrelid = 'q_plain'::regclass"
               " AND attnum > 0 ORDER BY attnum") == before
    assert sql(queues, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'q_plain'::regclass"
               ) == [(0,)]


@pytest.mark.parametrize("text, says", [
    ("[q_missing]\npages = d/{day}\n", "queue q_missing: no such table"),
    ("[ports]\npages = d/{category}\n", "queue ports: not a queue"),
    ("[q_dates]\npages = d/{date}\n", "queue q_dates: placeholder {date} is not one of its key"
     " columns (day)"),
])
def test_a_queue_the_database_cannot_serve_exits_2_and_deletes_nothing(queues, cache, tmp_path,
                                                                       text, says):
    config = write_config(tmp_path, text + "[ports_cache_clearing]\npages = {category}/*\n")
    add_ports(queues, "www/a")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert_one_line_error(result, 2)
    assert says in result.stderr, result.stderr
    assert sql(queues, "SELECT count(*) FROM ports_cache_clearing") == [(1,)]


def test_the_daemon_says_once_a_minute_and_clears_once_the_table_exists(queues, cache, daemon,
                                                                        tmp_path):
    config = write_config(tmp_path, "[q_later]\npages = later/{day}/\n")
    d = daemon(cache, "--config", config, "--heartbeat", "0.5", "--again-after", "0")
    d.wait_log(r"ERROR: queue q_later: no such table")
    d.wait_log(r"queue q_later: no such table", 3)
    assert d.count(r"ERROR: queue q_later") == 1 and d.runs() == 0
    sql(queues, "CREATE TABLE q_later (day date)")
    sql(queues, "SELECT cache_clearing_queue('q_later')")
    d.wait_log("the queues are as configured")
    page = make_page(cache, "later/2026-11-30", "index.html")
    sql(queues, "INSERT INTO q_later VALUES ('2026-11-30')")
    wait_for(lambda: not page.parent.exists(), what="the directory to go")
    sql(queues, "DROP TABLE q_later")


# --------------------------------------------------- templates and targets

def test_format_specs_put_a_date_where_the_layout_wants_it(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = daily/{day:%Y}/{day:%m}/{day:%d}.*\n")
    gone = [make_page(cache, "daily/2026/11", "30.daily.head"),
            make_page(cache, "daily/2026/11", "30.weekly")]
    kept = [make_page(cache, "daily/2026/11", "29.daily.head"),
            make_page(cache, "daily/2026/11", "300.x")]
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


@pytest.mark.parametrize("table, column, value, template", [
    ("q_dates", "day", "2026-11-30", "d/{day:%x}.html"),      # 11/30/26: a slash
    ("q_nums", "n", "7", "n/{n:%Y}.html"),                    # no such spec for an int
])
def test_a_spec_that_fails_for_a_usable_value_exits_2_and_keeps_every_row(
        queues, cache, tmp_path, table, column, value, template):
    config = write_config(tmp_path, "[%s]\npages = %s\n" % (table, template))
    sql(queues, "INSERT INTO %s (%s) VALUES (%%s), (%%s)" % (table, column), (value, value))
    result = clear("--config", config, dsn=queues, cache=cache)
    assert_one_line_error(result, 2)
    assert template in result.stderr, result.stderr
    assert sql(queues, "SELECT count(*) FROM %s" % table) == [(2,)]


def test_a_null_key_is_reported_and_deleted(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}.html\n")
    sql(queues, "INSERT INTO q_dates (day) VALUES (NULL)")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "q_dates: 1 key with a value no page can use, deleted unused: day=None" in \
        result.stderr, result.stderr
    assert sql(queues, "SELECT count(*) FROM q_dates") == [(0,)]


def test_a_directory_template_removes_its_files_then_the_directory(db, cache, tmp_path, outside):
    add_ports(db, "www/a")
    made = [make_page(cache, "c/www-a", name) for name in ("x.html", "y.html")]
    (cache / "c" / "www-a" / "link").symlink_to(outside / "victim")
    result = clear("--pages", "c/{category}-{port}/", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not (cache / "c" / "www-a").exists() and not any(p.exists() for p in made)


def test_a_directory_template_leaves_a_subdirectory_and_the_directory(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "c/www-a/sub", "x.html")
    top = make_page(cache, "c/www-a", "y.html")
    result = clear("--pages", "c/{category}-{port}/", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "c/www-a/sub: is a directory, left alone" in result.stderr
    assert page.exists() and not top.exists()


def test_a_template_naming_a_directory_gets_the_hint(db, cache):
    add_ports(db, "www/a")
    make_page(cache, "www/a", "x.html")
    result = clear("--pages", "{category}/{port}", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "www/a: is a directory, left alone (a template ends in /* for its files, or in /" \
        in result.stderr, result.stderr


def test_each_target_is_cleared_once_per_run_across_queues(queues, cache, tmp_path):
    config = write_config(tmp_path, "[ports_cache_clearing]\npages = {category}/{port}/* news/*\n"
                          "[q_dates]\npages = d/{day}.html news/*\n"
                          "[q_all]\npages = news/*\n")
    add_ports(queues, "www/a")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30'); INSERT INTO q_all DEFAULT VALUES")
    make_page(cache, "news", "index.html")
    result = clear("-v", "--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("news/*: removed") == 1, result.stderr
    assert "cleared 3 keys, deleted 3 rows" in result.stderr
    assert sql(queues, "SELECT count(*) FROM ports_cache_clearing") == [(1,)]   # its re-clear


# ---------------------------------------------------------------- commands

def command_config(tmp_path, command, **options):
    extra = "".join("%s = %s\n" % kv for kv in options.items())
    return write_config(tmp_path, "[q_dates]\ncommand = %s\n%s" % (command, extra))


def test_a_command_runs_once_per_distinct_key_with_its_values(queues, cache, tmp_path):
    log = tmp_path / "ran"
    script = tmp_path / "record.sh"
    script.write_text('#!/bin/sh\nread -r line; echo "$2 [$line] ${CLEAR_CACHE_DSN-no dsn}"'
                      ' >> %s\necho to-stdout\n' % log)
    script.chmod(0o755)
    config = command_config(tmp_path, "%s -- {day:%%d.%%m.%%Y}" % script)
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30'), ('2026-11-30'), ('2026-11-29')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    lines = sorted(log.read_text().splitlines())
    assert lines == ["29.11.2026 [] no dsn", "30.11.2026 [] no dsn"], lines
    assert "to-stdout" in result.stderr and result.stdout == ""
    assert sql(queues, "SELECT count(*) FROM q_dates WHERE NOT reclear") == [(0,)]


def test_a_failing_command_keeps_the_rows_of_its_key(queues, cache, tmp_path):
    config = command_config(tmp_path, "/bin/sh -c 'test $0 != 2026-11-29' {day}")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30'), ('2026-11-29')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 1, result.stderr
    assert "exited with 1" in result.stderr
    assert sql(queues, "SELECT day::text FROM q_dates WHERE NOT reclear") == [("2026-11-29",)]


def test_a_command_still_running_at_its_timeout_is_killed_and_keeps_its_rows(queues, cache,
                                                                            tmp_path):
    config = command_config(tmp_path, "/bin/sleep 30", timeout="0.5")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 1, result.stderr
    assert "still running after 0.5 s: killed" in result.stderr
    assert sql(queues, "SELECT count(*) FROM q_dates") == [(1,)]


def running(pid):
    """Whether pid is a live process (not gone, not a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("timeout, ending", [("0.5", "& wait"), ("20", "")])
def test_nothing_a_command_started_outlives_it(queues, cache, tmp_path, timeout, ending):
    pids = tmp_path / "pids"
    config = command_config(tmp_path, "/bin/sh -c 'sleep 47 >/dev/null 2>&1 & echo $! > %s %s'"
                            % (pids, ending), timeout=timeout)
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == (1 if ending else 0), result.stderr
    pid = int(pids.read_text())
    wait_for(lambda: not running(pid), timeout=5, what="the sleep it started to be gone")


def test_a_command_gets_nothing_of_the_connection(queues, cache, tmp_path):
    seen = tmp_path / "env"
    config = command_config(tmp_path, "/bin/sh -c 'env > %s'" % seen)
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache,
                   env={"PGPASSWORD": "secret", "PGPASSFILE": str(tmp_path / "pgpass"),
                        "PGAPPNAME": "clearer", "PGCONNECT_TIMEOUT": "10"})
    assert result.returncode == 0, result.stderr
    names = [line.split("=", 1)[0] for line in seen.read_text().splitlines()]
    assert "PATH" in names
    assert [n for n in names if n.startswith(("PG", "CLEAR_CACHE"))] == [], names


def test_a_queue_without_keys_runs_its_command_once_per_run(queues, cache, tmp_path):
    log = tmp_path / "ran"
    config = write_config(tmp_path, "[q_all]\ncommand = /bin/sh -c 'echo x >> %s'\n"
                          "again_after = 0\n" % log)
    sql(queues, "INSERT INTO q_all DEFAULT VALUES; INSERT INTO q_all DEFAULT VALUES")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == "x\n"
    assert sql(queues, "SELECT count(*) FROM q_all") == [(0,)]
    assert clear("--config", config, dsn=queues, cache=cache).returncode == 0
    assert log.read_text() == "x\n", "no due rows, no run of the command"


def test_a_listen_channel_makes_its_queue_due_once_and_again_after_a_reconnect(
        queues, cache, tmp_path, daemon):
    ran = tmp_path / "ran"
    config = write_config(tmp_path, "[q_all]\ncommand = /bin/sh -c 'echo x >> %s'\n"
                          "listen = news_a News_B\nagain_after = 0\n" % ran)
    runs = lambda: len(ran.read_text().splitlines()) if ran.exists() else 0   # noqa: E731
    d = daemon(cache, "--config", config, "--heartbeat", "600")
    d.wait_ready()
    # A notification may have been missed before it listened: due once at start.
    wait_for(lambda: runs() == 1, what="the command, once at start")
    for channel in ("news_a", "news_b"):
        d.wait_idle()
        before = runs()
        sql(queues, "NOTIFY %s" % channel)
        wait_for(lambda: runs() == before + 1, what="the command, for NOTIFY " + channel)
    d.wait_idle()
    sql(queues, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'listen_clear_cache.py'")
    wait_for(lambda: runs() == 4, timeout=20, what="the command, once more after reconnecting")
    assert sql(queues, "SELECT count(*) FROM q_all") == [(0,)]
    assert "cannot queue" not in d.log() and "Traceback" not in d.log(), d.log()


def test_listen_is_for_a_queue_without_keys(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}\nlisten = news\n")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert_one_line_error(result, 2)
    assert "listen is for a queue without keys; it has day" in result.stderr, result.stderr


def test_a_clear_by_hand_needs_every_placeholder(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}.html\n")
    for args in (["--queue", "q_dates"], ["--queue", "q_dates", "other=1"],
                 ["--queue", "q_missing", "day=1"], ["--queue", "q_dates", "day=a/b"]):
        result = clear("--config", config, *args, dsn=queues, cache=cache)
        assert_one_line_error(result, 2)


def test_check_covers_every_queue(queues, cache, tmp_path, daemon):
    config = write_config(tmp_path, "[ports_cache_clearing]\npages = {category}/*\n"
                          "[q_dates]\npages = d/{day}.html\n")
    sql(queues, "ALTER TABLE q_dates DISABLE TRIGGER q_dates_notify")
    sql(queues, "INSERT INTO q_dates (day, due_at) VALUES ('2026-11-30', now() - interval '100 s')")
    sql(queues, "ALTER TABLE q_dates ENABLE TRIGGER q_dates_notify")
    env = clean_env()
    result = subprocess.run([sys.executable, CLEAR, "--check", "--dsn", queues, "--config",
                             config], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result      # no listener, and 100 s old
    assert re.match(r"CLEAR_CACHE CRITICAL - 1 row due, oldest due 1\d\d s", result.stdout)


def test_the_daemon_hands_its_clearers_the_configuration_it_read(queues, cache, daemon,
                                                                 tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}.html\n")
    d = daemon(cache, "--config", config, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    with open(config, "w") as f:        # edited after the start: it waits for a restart
        f.write("[q_dates]\npages = e/{day}.html\n")
    read, edited = make_page(cache, "d", "2026-11-30.html"), make_page(cache, "e", "2026-11-30.html")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    wait_for(lambda: not read.exists(), what="the page the configuration read names")
    d.wait_idle()
    assert edited.exists()


def test_braces_are_written_twice(queues, cache, tmp_path):
    config = write_config(tmp_path, "[q_dates]\npages = d/{{{day:%Y}}}.html\n")
    page = make_page(cache, "d", "{2026}.html")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_the_daemon_says_at_start_what_it_clears(queues, cache, tmp_path, daemon):
    from cache_clearing import __version__
    config = write_config(tmp_path, "[q_dates]\npages = d/{day}.html e/{day:%Y}/\n"
                          "[q_all]\ncommand = /bin/echo all\nlisten = news\n")
    d = daemon(cache, "--config", config, "--heartbeat", "600")
    d.wait_ready()
    first = d.log().splitlines()[0]
    assert first.endswith("INFO: listen_clear_cache %s: cache %s, consumer '', 2 queues:"
                          " q_dates (d/{day}.html e/{day:%%Y}/), q_all (command /bin/echo all;"
                          " on news)" % (__version__, cache)), first


def test_a_commands_output_is_logged_as_ours_stamped_named_and_quiet_under_q(queues, cache,
                                                                              tmp_path):
    config = command_config(tmp_path, "/bin/sh -c 'echo out $0; echo err >&2' {day}")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache, env={
        "CLEAR_CACHE_TIMESTAMPS": "1"})
    assert result.returncode == 0 and result.stdout == "", result
    said = result.stderr.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} clear_cache: INFO: command sh: "
    assert [line for line in said if re.match(stamp + "out 2026-11-30$", line)], said
    assert [line for line in said if re.match(stamp + "err$", line)], said
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-29')")
    result = clear("--config", config, "-q", dsn=queues, cache=cache)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result


def test_a_commands_output_is_bounded_per_run(queues, cache, tmp_path):
    config = command_config(tmp_path, "/bin/sh -c 'seq 1000; seq 200000 | tr -d \"\\n\"'")
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30')")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if "command sh: " in line]
    assert len(ours) == 101 and ours[-1].endswith("command sh: 901 lines more not shown"), ours
    assert len(result.stderr) < 64 * 1024


def test_each_runs_line_names_its_queues_and_a_few_keys(queues, cache, tmp_path):
    config = write_config(tmp_path, "[ports_cache_clearing]\npages = {category}/{port}/*\n"
                          "[q_dates]\npages = d/{day}.html\n[q_all]\npages = news/*\n")
    add_ports(queues, *["www/p%d" % i for i in range(10)])
    sql(queues, "INSERT INTO q_dates (day) VALUES ('2026-11-30'); INSERT INTO q_all"
        " DEFAULT VALUES")
    result = clear("--config", config, dsn=queues, cache=cache)
    assert result.returncode == 0, result.stderr
    line = [line for line in result.stderr.splitlines() if "cleared 12 keys" in line][0]
    found = re.search(r" ms, 12 re-clears due in 5 s: ports_cache_clearing (.*) and 7 more; q_dates \["
                      r"\"2026-11-30\"\]; q_all$", line)
    assert found, line
    assert len(re.findall(r'\["www", "p\d"\]', found.group(1))) == 3, line


def test_the_daemons_runs_name_their_keys_at_the_default_level(db, cache, tmp_path):
    add_ports(db, "www/a")
    log = tmp_path / "daemon.log"
    with log.open("w") as err:      # neither -v nor -q
        proc = subprocess.Popen([sys.executable, LISTEN, "--cache-dir", str(cache),
                                 "--heartbeat", "600"], stderr=err, env=dict(
                                     clean_env(), CLEAR_CACHE_DSN=db))
    try:
        wait_for(lambda: "listening" in log.read_text(), what="the daemon")
        page = make_page(cache, "www/a")
        sql(db, "UPDATE ports SET version = 'x' WHERE category = 'www' AND name = 'a'")
        wait_for(lambda: not page.exists(), what="the change")
        wait_for(lambda: re.search(r'clear_cache: INFO: cleared 1 port, deleted \d+ rows?, removed'
                                   r' 1 file in \d+ ms, 1 re-clear due in 5 s:'
                                   r' ports_cache_clearing \["www", "a"\]$',
                                   log.read_text(), re.M), what="the run's line:\n"
                 + log.read_text())
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, log.read_text()
