"""Tests for listen_clear_cache: a real PostgreSQL, real files, real processes.

    make test

The suite creates a scratch database, loads schema.sql into it with psql,
and drops it at the end.  Without a reachable PostgreSQL it fails; it never
skips.  Every wait is a poll with a deadline.
"""

import configparser
import glob
import json
import os
import random
import re
import select
import signal
import socket
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from clear_cache import valid_port

HERE = Path(__file__).resolve().parent
CLEAR = str(HERE / "clear_cache.py")
LISTEN = str(HERE / "listen_clear_cache.py")
SCHEMA = str(HERE / "schema.sql")
ADMIN_DSNS = [os.environ.get("TEST_ADMIN_DSN", "dbname=postgres"),
              "dbname=postgres user=postgres",
              "host=/var/run/postgresql dbname=postgres user=postgres"]
PAGE = "Detail.Part1.head.PageSize100.PageNum1.html"


# ---------------------------------------------------------------- helpers

def wait_for(predicate, timeout=15.0, what="condition"):
    """Poll predicate until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(0.02)


def sql(dsn, query, args=None):
    """Run one statement in autocommit mode; return its rows or row count."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else cur.rowcount
    finally:
        conn.close()


def queued(dsn):
    """The queue's due (category, port) rows, sorted."""
    return sorted(sql(dsn, "SELECT category, port FROM ports_cache_clearing"
                      " WHERE due_at <= now()"))


def all_queued(dsn):
    """The queue's (category, port, reclear) rows, due or not, sorted."""
    return sorted(sql(dsn, "SELECT category, port, reclear FROM ports_cache_clearing"))


def queue_quietly(dsn, category, port):
    """Queue a row without the NOTIFY that an INSERT raises."""
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE ports_cache_clearing DISABLE TRIGGER"
                    " ports_cache_clearing_notify")
        cur.execute("INSERT INTO ports_cache_clearing (category, port) VALUES (%s, %s)",
                    (category, port))
        cur.execute("ALTER TABLE ports_cache_clearing ENABLE TRIGGER"
                    " ports_cache_clearing_notify")
    conn.close()


def add_ports(dsn, *names):
    """Insert ports named 'category/port'."""
    for name in names:
        category, port = name.split("/")
        sql(dsn, "INSERT INTO ports (category, name, version) VALUES (%s, %s, '1')",
            (category, port))


def touch_port(dsn, name, version="2"):
    """Commit a one-row UPDATE of port 'category/port'."""
    category, port = name.split("/")
    assert sql(dsn, "UPDATE ports SET version = %s WHERE category = %s AND name = %s",
               (version, category, port)) == 1


def make_page(cache, name, page=PAGE):
    """Create a cached page for 'category/port'; return its path."""
    path = cache / name / page
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<html>%s</html>" % name)
    return path


def tree(root):
    """Every path below root with its kind and content, for before/after checks."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found[path] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                found[path] = "dir"
            else:
                found[path] = Path(path).read_bytes()
    return found


def clear(*args, dsn, cache=None, env=None):
    """Run clear_cache.py; return the CompletedProcess with text output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLEAR_CACHE_")}
    full_env.update(env or {})
    argv = [sys.executable, CLEAR, "--dsn", dsn]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    return subprocess.run(argv + list(args), env=full_env, capture_output=True,
                          text=True, timeout=60)


def libpq_env(dsn):
    """The environment without PG* and CLEAR_* settings, then PG* naming dsn's database."""
    params = psycopg2.extensions.parse_dsn(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CLEAR_"))}
    env.update(PGDATABASE=params["dbname"], PGUSER=params.get("user", ""))
    if "host" in params:
        env["PGHOST"] = params["host"]
    return env


def assert_one_line_error(result, code):
    """The process failed with the given code, one line on stderr, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_dsn(dsn, port):
    """dsn, reached over TCP on 127.0.0.1:port."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(host="127.0.0.1", port=str(port))
    params.setdefault("user", sql(dsn, "SELECT current_user")[0][0])
    return psycopg2.extensions.make_dsn(**params)


def backends(dsn, application):
    """Pids of this database's backends with the given application_name."""
    return [pid for pid, in sql(dsn, "SELECT pid FROM pg_stat_activity WHERE datname ="
                                " current_database() AND application_name = %s",
                                (application,))]


def waiting_on_lock(dsn, application):
    """Is a backend of this application (or its warm variant) waiting for a lock?"""
    return sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name IN"
               " (%s, %s || ' (warm)') AND wait_event_type = 'Lock'",
               (application, application))[0][0] > 0


class Daemon:
    """listen_clear_cache.py as a real subprocess, its stderr in a file."""

    def __init__(self, tmp_path, dsn, cache, *args, env=None):
        self.log_path = tmp_path / ("daemon-%d.log" % time.monotonic_ns())
        self.log_file = open(self.log_path, "w")
        full_env = dict(os.environ, CLEAR_CACHE_DSN=dsn, **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, LISTEN, "--cache-dir", str(cache), "-v"] + list(args),
            env=full_env, stdin=subprocess.DEVNULL, stdout=self.log_file,
            stderr=self.log_file)

    def log(self):
        return self.log_path.read_text()

    def count(self, pattern):
        """How many log lines match pattern."""
        return len(re.findall(pattern, self.log(), re.M))

    def wait_log(self, pattern, count=1, timeout=15.0):
        """Wait until pattern has matched count log lines."""
        wait_for(lambda: self.count(pattern) >= count, timeout,
                 "%d x %r in the daemon log:\n%s" % (count, pattern, self.log()))

    def wait_ready(self, timeout=15.0):
        """Wait until it listens, has looked at the queue, and its catch-up run has ended."""
        self.wait_log("listening", timeout=timeout)
        wait_for(lambda: re.search(r"listening(.|\n)*queue: (nothing|next rows) due",
                                   self.log()), timeout, "the daemon's first look")
        self.wait_idle()

    def runs(self):
        """Clearer runs started so far."""
        return self.count(r"clearer pid \d+ started")

    def wait_idle(self):
        """Wait until every clearer started so far has ended."""
        wait_for(lambda: self.runs() == self.count(r"clearer pid \d+ (done|exited)"),
                 what="the clearer runs to end")

    def assert_runs_never_overlapped(self):
        """Each clearer ended before the next one started."""
        events = re.findall(r"clearer pid (\d+) (started|done|exited)", self.log())
        running = None
        for pid, event in events:
            if event == "started":
                assert running is None, "pid %s started while %s ran" % (pid, running)
                running = pid
            else:
                assert running == pid
                running = None

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=20.0):
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def clearer_children(pid):
    """Pids of the clear_cache.py processes started by pid."""
    try:
        children = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()
    except FileNotFoundError:
        return []
    found = []
    for child in children:
        try:
            if CLEAR.encode() in Path("/proc/%s/cmdline" % child).read_bytes():
                found.append(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass        # it exited while we looked
    return found


class Proxy:
    """A TCP proxy to PostgreSQL that can freeze: sockets stay open, nothing moves."""

    def __init__(self, upstream_port=5432, port=0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.links = []                 # [client, server, frozen directions]
        self.delay = 0.0                # seconds added to every chunk forwarded
        self.stall_new = False          # new connections start frozen too
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                continue
            link = [client, server, {"up", "down"} if self.stall_new else set()]
            self.links.append(link)
            threading.Thread(target=self.pump, args=(link,), daemon=True).start()

    def pump(self, link):
        client, server, frozen = link
        try:
            while not self.closed:
                wanted = [s for s, d in ((client, "up"), (server, "down")) if d not in frozen]
                readable, _, _ = select.select(wanted, [], [], 0.05)
                for sock in readable:
                    if ("up" if sock is client else "down") in frozen:
                        continue
                    data = sock.recv(65536)
                    if not data:
                        return self.cut(link)
                    if self.delay:
                        time.sleep(self.delay)
                    (server if sock is client else client).sendall(data)
        except OSError:
            self.cut(link)

    def cut(self, link):
        for sock in link[:2]:
            sock.close()

    def freeze(self, directions=("up", "down")):
        """Stop forwarding on every open connection; new ones still work."""
        for link in self.links:
            link[2].update(directions)

    def close(self):
        self.closed = True
        self.listener.close()
        for link in self.links:
            self.cut(link)


def make_undeletable(path):
    """Make unlinking path fail, as root (immutable flag) or not (read-only directory)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    path.parent.chmod(0o555)
    return lambda: path.parent.chmod(0o755)


# --------------------------------------------------------------- fixtures

def find_admin_dsn():
    """A connection string for a role that may create databases, or fail saying why."""
    errors = []
    for dsn in ADMIN_DSNS:
        try:
            rows = sql(dsn, "SELECT rolcreatedb OR rolsuper FROM pg_roles"
                       " WHERE rolname = current_user")
        except psycopg2.OperationalError as e:
            errors.append("%r: %s" % (dsn, " ".join(str(e).split())))
            continue
        if rows and rows[0][0]:
            return dsn
        errors.append("%r: role may not create databases" % dsn)
    raise RuntimeError("no PostgreSQL reachable (set PGHOST/PGPORT/PGUSER or"
                       " TEST_ADMIN_DSN): " + "; ".join(errors))


@pytest.fixture(scope="session")
def admin_dsn():
    try:
        return find_admin_dsn()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


def create_database(admin_dsn, name):
    """Create database name, load schema.sql with psql; return its DSN."""
    drop_database(admin_dsn, name)
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE %s" % name)
    conn.close()
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    load_schema(dsn)
    return dsn


def load_schema(dsn):
    """Load schema.sql the way the README says: psql -v ON_ERROR_STOP=1 -f."""
    result = subprocess.run(["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                             "-f", SCHEMA], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def drop_database(admin_dsn, name):
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    conn.cursor().execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
    conn.close()


@pytest.fixture(scope="session")
def database(admin_dsn):
    """A scratch database with the schema, dropped at the end."""
    name = "lcc_test_%d" % os.getpid()
    yield create_database(admin_dsn, name)
    drop_database(admin_dsn, name)


@pytest.fixture
def db(database):
    """The scratch database, emptied for this test."""
    sql(database, "TRUNCATE ports, ports_cache_clearing RESTART IDENTITY")
    yield database


@pytest.fixture
def cache(tmp_path):
    """An empty cache directory, beside a directory that must never change."""
    (tmp_path / "cache").mkdir()
    outside = tmp_path / "outside"
    (outside / "p").mkdir(parents=True)
    (outside / "victim").write_text("must survive")
    (outside / "p" / PAGE).write_text("must survive")
    return tmp_path / "cache"


@pytest.fixture
def outside(cache):
    """The directory beside the cache, and its contents before the test."""
    path = cache.parent / "outside"
    before = tree(path)
    yield path
    assert tree(path) == before, "something outside the cache directory changed"


@pytest.fixture
def daemon(tmp_path, db):
    """Start listen_clear_cache.py daemons; kill what is left at the end."""
    started = []

    def start(cache, *args, dsn=db, env=None):
        d = Daemon(tmp_path, dsn, cache, *args, env=env)
        started.append(d)
        return d
    yield start
    for d in started:
        d.kill()
        assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def proxy():
    """A freezable TCP proxy in front of the local PostgreSQL."""
    p = Proxy()
    yield p
    p.close()


# ----------------------------------------------------------------- schema

def test_schema_loads_twice_and_keeps_data(admin_dsn):
    name = "lcc_schema_%d" % os.getpid()
    dsn = create_database(admin_dsn, name)
    try:
        add_ports(dsn, "www/a")
        load_schema(dsn)
        assert sql(dsn, "SELECT category, name FROM ports") == [("www", "a")]
        assert queued(dsn) == [("www", "a")]
        add_ports(dsn, "www/b")     # the trigger still works, once
        assert queued(dsn) == [("www", "a"), ("www", "b")]
    finally:
        drop_database(admin_dsn, name)


def test_trigger_queues_insert_update_delete(db):
    add_ports(db, "www/a")
    assert queued(db) == [("www", "a")]
    sql(db, "TRUNCATE ports_cache_clearing")
    touch_port(db, "www/a")
    assert queued(db) == [("www", "a")]
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "DELETE FROM ports WHERE name = 'a'")
    assert queued(db) == [("www", "a")]


def test_trigger_queues_old_and_new_pair_on_rename_and_move(db):
    add_ports(db, "www/a")
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "UPDATE ports SET name = 'b' WHERE name = 'a'")
    assert queued(db) == [("www", "a"), ("www", "b")]
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "UPDATE ports SET category = 'net' WHERE name = 'b'")
    assert queued(db) == [("net", "b"), ("www", "b")]


def test_trigger_inserts_unconditionally(db):
    add_ports(db, "www/a")
    touch_port(db, "www/a")
    touch_port(db, "www/a", "3")
    assert queued(db) == [("www", "a")] * 3


class Listening:
    """A plain LISTEN connection, for watching what the trigger notifies."""

    def __init__(self, dsn):
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.conn.cursor().execute("LISTEN clear_ports_cache")

    def received(self):
        """Notifications received so far; a round trip first flushes in-flight ones."""
        self.conn.cursor().execute("SELECT 1")
        self.conn.poll()
        return list(self.conn.notifies)


def test_rollback_queues_and_notifies_nothing(db):
    listening = Listening(db)
    add_ports(db, "www/a")
    wait_for(listening.received, what="the INSERT's notification")
    listening.conn.notifies.clear()
    sql(db, "TRUNCATE ports_cache_clearing")
    conn = psycopg2.connect(db)
    with conn.cursor() as cur:
        cur.execute("UPDATE ports SET version = 'x'")
        cur.execute("INSERT INTO ports (category, name) VALUES ('www', 'b')")
    conn.rollback()
    conn.close()
    assert queued(db) == []
    assert listening.received() == []


def test_one_notification_per_transaction_without_payload(db):
    add_ports(db, "www/a", "www/b", "www/c")
    listening = Listening(db)
    conn = psycopg2.connect(db)
    with conn, conn.cursor() as cur:
        for name in "abc":
            cur.execute("UPDATE ports SET version = '9' WHERE name = %s", (name,))
    conn.close()
    notes = wait_for(listening.received, what="a notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "")]


def test_statement_changing_nothing_notifies_nobody(db):
    add_ports(db, "www/a")
    sql(db, "TRUNCATE ports_cache_clearing")
    listening = Listening(db)
    assert sql(db, "UPDATE ports SET version = 'x' WHERE false") == 0
    assert queued(db) == []
    assert listening.received() == []


def test_schema_upgrade_keeps_queued_rows(admin_dsn):
    name = "lcc_upgrade_%d" % os.getpid()
    drop_database(admin_dsn, name)
    sql(admin_dsn, "CREATE DATABASE %s" % name)
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    try:
        # The queue as the previous schema.sql made it.
        sql(dsn, "CREATE TABLE ports_cache_clearing (id bigserial PRIMARY KEY, category"
            " text NOT NULL, port text NOT NULL, queued_at timestamptz NOT NULL DEFAULT"
            " now()); INSERT INTO ports_cache_clearing (category, port)"
            " VALUES ('www', 'a'), ('net', 'b')")
        load_schema(dsn)
        assert all_queued(dsn) == [("net", "b", False), ("www", "a", False)]
        assert queued(dsn) == [("net", "b"), ("www", "a")]
        load_schema(dsn)
        assert len(all_queued(dsn)) == 2
    finally:
        drop_database(admin_dsn, name)


def test_truncate_ports_queues_every_port(db):
    add_ports(db, "www/a", "net/b")
    sql(db, "TRUNCATE ports_cache_clearing")
    listening = Listening(db)
    sql(db, "TRUNCATE ports")
    assert queued(db) == [("net", "b"), ("www", "a")]
    wait_for(listening.received, what="TRUNCATE's notification")


def test_any_insert_into_the_queue_notifies_and_an_empty_one_does_not(db):
    listening = Listening(db)
    sql(db, "INSERT INTO ports_cache_clearing (category, port) SELECT 'www', 'a' WHERE false")
    assert listening.received() == []
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'nginx', now() + interval '10 days')")
    notes = wait_for(listening.received, what="the INSERT's notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "later")]
    listening.conn.notifies.clear()
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'a', now() + interval '1 h'), ('www', 'b', now())")
    notes = wait_for(listening.received, what="the INSERT's notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "")]


# ------------------------------------------------------------ the clearer

def test_flush_clears_queued_ports_only(db, cache, outside):
    add_ports(db, "www/a", "www/b")
    a, b = make_page(cache, "www/a"), make_page(cache, "www/b")
    extra = make_page(cache, "www/a", "Other.html")
    untouched = make_page(cache, "www/zz")
    sql(db, "DELETE FROM ports_cache_clearing WHERE port = 'b'")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not a.exists() and not extra.exists()
    assert a.parent.is_dir(), "the port directory itself stays"
    assert b.exists() and untouched.exists()
    assert queued(db) == []
    assert re.search(r"cleared 1 port, deleted 1 row, removed 2 files in \d+ ms",
                     result.stderr), result.stderr


def test_each_port_cleared_once_per_run(db, cache):
    add_ports(db, "www/a")
    for version in "234":
        touch_port(db, "www/a", version)
    make_page(cache, "www/a")
    result = clear("-v", dsn=db, cache=cache)
    assert result.returncode == 0
    assert result.stderr.count("www/a/*: removed") == 1, result.stderr
    assert "cleared 1 port, deleted 4 rows, removed 1 file" in result.stderr


def test_flush_of_an_empty_queue_succeeds(db, cache):
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0
    assert "cleared 0 ports, deleted 0 rows" in result.stderr


def test_quiet_prints_nothing_on_success(db, cache):
    add_ports(db, "www/a")
    make_page(cache, "www/a")
    result = clear("-q", dsn=db, cache=cache)
    assert result.returncode == 0
    assert result.stderr == "" and result.stdout == ""


def test_dry_run_changes_nothing(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    result = clear("--dry-run", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert str(page) in result.stdout
    assert page.exists()
    assert queued(db) == [("www", "a")]


def test_explicit_ports_leave_the_queue_alone(db, cache):
    add_ports(db, "www/a", "www/b")
    a, b, c = (make_page(cache, n) for n in ("www/a", "www/b", "net/c"))
    result = clear("www/b", "net/c", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert a.exists() and not b.exists() and not c.exists()
    assert queued(db) == [("www", "a"), ("www", "b")]


def test_explicit_ports_need_no_database_and_no_valid_dsn(cache):
    page = make_page(cache, "www/a")
    result = clear("www/a", dsn="host='unterminated", cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_explicit_port_that_is_not_a_plain_name_is_a_usage_error(db, cache, outside):
    for arg in ("www", "../outside", "www/a/b", "/p"):
        assert_one_line_error(clear(arg, dsn=db, cache=cache), 2)


@pytest.mark.parametrize("cache_arg", [None, "missing"])
def test_missing_cache_directory_exits_2_and_keeps_queue(db, tmp_path, cache_arg):
    add_ports(db, "www/a")
    result = clear(dsn=db, cache=cache_arg and tmp_path / cache_arg)
    assert_one_line_error(result, 2)
    assert queued(db) == [("www", "a")]


def test_cache_directory_from_environment(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    result = clear(dsn=db, env={"CLEAR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_dsn_from_environment_then_libpq_defaults(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    env = dict(os.environ, CLEAR_CACHE_DSN=db)
    result = subprocess.run([sys.executable, CLEAR, "--cache-dir", str(cache)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not page.exists()
    # With neither --dsn nor CLEAR_CACHE_DSN, libpq's PG* variables decide.
    add_ports(db, "www/b")
    page = make_page(cache, "www/b")
    result = subprocess.run([sys.executable, CLEAR, "--cache-dir", str(cache)], env=libpq_env(db),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not page.exists()


HOSTILE = ["", ".", "..", "/", "a/b", "../outside", "x" * 256, "é" * 128,
           "line\nbreak", "tab\there", "\x7f"]


def test_hostile_names_never_touch_anything_outside(db, cache, outside):
    good = make_page(cache, "www/good")
    inside_before = tree(cache)
    rows = [(name, "p") for name in HOSTILE] + [("www", name) for name in HOSTILE]
    rows += [(str(outside), "p"), ("..", "outside"), ("www", str(outside / "p"))]
    for category, port in rows:
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES (%s, %s)",
            (category, port))
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'good')")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert queued(db) == [], "hostile rows go with the batch"
    assert result.stderr.count("invalid name") == len(rows)
    ids = re.findall(r"row (\d+) ", result.stderr)
    assert len(ids) == len(rows)
    assert not good.exists()
    del inside_before[str(good)]
    assert tree(cache) == inside_before


def test_odd_but_plain_names_are_literal(db, cache):
    odd = ["*", "[a-z]?", "..\\..", "-rf", "é" * 127, "x" * 255]
    pages = [make_page(cache, "www/" + name) for name in odd]
    other = make_page(cache, "www/other")
    for name in odd:
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', %s)",
            (name,))
    assert clear(dsn=db, cache=cache).returncode == 0
    assert not any(p.exists() for p in pages) and other.exists()


def test_symlinked_category_is_not_entered(db, cache, outside):
    (cache / "evil").symlink_to(outside)
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('evil', 'p')")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert re.search(r"evil: is a symlink, not entered", result.stderr), result.stderr
    assert (cache / "evil").is_symlink()


def test_symlinked_port_is_not_entered(db, cache, outside):
    (cache / "www").mkdir()
    (cache / "www" / "evil").symlink_to(outside / "p")
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'evil')")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "www/evil: is a symlink, not entered" in result.stderr
    assert (cache / "www" / "evil").is_symlink()


def test_symlinked_page_goes_as_a_link(db, cache, outside):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    link = page.parent / "link.html"
    link.symlink_to(outside / "victim")
    dangling = page.parent / "dangling.html"
    dangling.symlink_to(cache.parent / "nowhere")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists() and not os.path.lexists(link)
    assert not os.path.lexists(dangling)
    assert "removed 3 files" in result.stderr


def test_undeletable_file_keeps_its_port_queued(db, cache):
    add_ports(db, "www/stuck", "www/fine")
    stuck, fine = make_page(cache, "www/stuck"), make_page(cache, "www/fine")
    undo = make_undeletable(stuck)
    try:
        result = clear(dsn=db, cache=cache)
    finally:
        undo()
    assert result.returncode == 1, result.stderr
    assert "cannot remove %s" % stuck in result.stderr
    assert stuck.exists() and not fine.exists()
    assert queued(db) == [("www", "stuck")]
    assert clear(dsn=db, cache=cache).returncode == 0
    assert queued(db) == [] and not stuck.exists()


def test_a_large_batch_is_cleared_in_parts_and_each_failed_port_stays_queued(db, cache):
    """Past 1,000 targets the clearer unlinks in threads; each part's failures count."""
    sql(db, "INSERT INTO ports (category, name, version)"
        " SELECT 'c' || i % 4, 'p' || i, '1' FROM generate_series(1, 4000) AS i")
    ports = sorted(sql(db, "SELECT category, name FROM ports"))
    pages = [make_page(cache, "%s/%s" % port) for port in ports]
    stuck = [ports[0], ports[2000], ports[-1]]   # in the first part, a middle one, the last
    undo = [make_undeletable(cache / c / p / PAGE) for c, p in stuck]
    try:
        result = clear(dsn=db, cache=cache)
    finally:
        for u in undo:
            u()
    assert result.returncode == 1, result.stderr
    assert sorted(queued(db)) == stuck
    assert [p for p in pages if p.exists()] == [cache / c / p / PAGE for c, p in stuck]
    assert "removed 3997 files" in result.stderr


def test_serialization_failure_retries_the_transaction(db, cache):
    """A concurrent flush deletes the rows under our feet: 40001, then a clean retry."""
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    other = psycopg2.connect(db)
    other.set_session(isolation_level="REPEATABLE READ")
    other.cursor().execute("DELETE FROM ports_cache_clearing")
    proc = subprocess.Popen([sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(cache)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: waiting_on_lock(db, "clear_cache.py"),
                 what="the clearer to wait on the other transaction's row lock")
        # SIRead locks exist only in SERIALIZABLE transactions.
        assert sql(db, "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                   " WHERE mode = 'SIReadLock' AND application_name = 'clear_cache.py'")[0][0]
        touch_port(db, "www/a")     # queued again: the retry clears the port once more
        other.commit()
        _, stderr = proc.communicate(timeout=30)
    finally:
        other.close()
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "retrying after could not serialize access" in stderr
    assert "cleared 1 port, deleted 1 row" in stderr, "the summary counts the last attempt"
    assert not page.exists()
    assert queued(db) == []


def test_files_go_before_commit_and_a_crash_keeps_the_rows(db, cache):
    """Killed between the unlinks and COMMIT, a clearer leaves its rows for the next run."""
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    blocker = psycopg2.connect(db)      # holds the row: the clearer cannot commit its DELETE
    blocker.cursor().execute("SELECT * FROM ports_cache_clearing FOR UPDATE")
    proc = subprocess.Popen([sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(cache)],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not page.exists() and waiting_on_lock(db, "clear_cache.py"),
                 what="the page gone while the clearer waits to delete its rows")
        proc.kill()
        proc.wait()
    finally:
        blocker.rollback()
        blocker.close()
    assert queued(db) == [("www", "a")]
    page = make_page(cache, "www/a")
    assert clear(dsn=db, cache=cache).returncode == 0
    assert not page.exists() and queued(db) == []


def test_concurrent_clearers_both_succeed(db, cache):
    names = ["www/p%d" % i for i in range(40)]
    add_ports(db, *names)
    for round_ in range(5):
        for name in names:
            make_page(cache, name)
            touch_port(db, name, str(round_))
        procs = [subprocess.Popen([sys.executable, CLEAR, "--dsn", db, "--cache-dir",
                                   str(cache)], stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
    assert queued(db) == []
    assert not any((cache / name / PAGE).exists() for name in names)


def test_unparsable_dsn_and_bad_database_leave_the_queue(db, cache):
    add_ports(db, "www/a")
    result = clear(dsn="host='unterminated", cache=cache)
    assert_one_line_error(result, 2)
    assert "invalid DSN: unterminated quoted string" in result.stderr, result.stderr
    assert_one_line_error(clear(dsn=psycopg2.extensions.make_dsn(db, dbname="no_such_db"),
                                cache=cache), 1)
    assert queued(db) == [("www", "a")]


def test_missing_queue_table_is_one_line(admin_dsn, cache):
    assert_one_line_error(clear(dsn=admin_dsn, cache=cache), 1)


# ------------------------------------------------------------ page templates

FRESHPORTS = ["--pages", "ports/{category}/{port}/*", "--pages", "categories/{category}/*"]

BAD_TEMPLATES = ["", "a b", "/abs/{port}", "a//{port}", "./{port}", "{category}/../x",
                 "{category}/./{port}", "{category}/", "{version}/{port}", "{category/x",
                 "x}/{port}", "*/{port}", "{category}*/{port}/x", "[ab]/{port}/*"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_bad_templates_are_refused_before_any_database_access(tmp_path, cache, template):
    # The port is closed: a script that tried to connect would fail otherwise.
    dsn = "host=127.0.0.1 port=%d connect_timeout=1" % free_port()
    for script in (CLEAR, LISTEN):
        for how in ("option", "environment"):
            args, env = (["--pages", template], {}) if how == "option" else (
                [], {"CLEAR_CACHE_PAGES": "{category}/{port}/* " + template})
            if how == "environment" and (not template or " " in template):
                continue        # the variable's white space separates templates
            result = subprocess.run([sys.executable, script, "--dsn", dsn, "--cache-dir",
                                     str(cache)] + args, capture_output=True, text=True,
                                    timeout=30, env=dict(os.environ, **env))
            assert_one_line_error(result, 2)
            assert "template" in result.stderr, result.stderr


def test_pages_from_environment_and_empty_means_default(db, cache):
    add_ports(db, "www/a")
    page, listing = make_page(cache, "www/a"), make_page(cache, "categories/www", "a.html")
    single = make_page(cache, "solo", "a.html")
    env = {"CLEAR_CACHE_PAGES": "  categories/{category}/*\tsolo/{port}.html\n"}
    result = clear(dsn=db, cache=cache, env=env)
    assert result.returncode == 0, result.stderr
    assert page.exists() and not listing.exists() and not single.exists()
    add_ports(db, "www/b")
    page_b = make_page(cache, "www/b")
    result = clear(dsn=db, cache=cache, env={"CLEAR_CACHE_PAGES": ""})
    assert result.returncode == 0, result.stderr
    assert not page_b.exists()


def test_freshports_layout_clears_the_port_and_its_category(db, cache, outside):
    add_ports(db, "www/a", "net/b")
    port_pages = [make_page(cache, "ports/www/a", n) for n in (PAGE, ".hidden", "x.html")]
    listing = make_page(cache, "categories/www", "index.html")
    (cache / "categories/www/subdir").mkdir()
    (cache / "categories/www/link.html").symlink_to(outside / "victim")
    others = [make_page(cache, "ports/www/z"), make_page(cache, "categories/net/i.html"),
              make_page(cache, "www/a")]
    sql(db, "DELETE FROM ports_cache_clearing WHERE port = 'b'")
    result = clear(*FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in port_pages + [listing])
    assert not os.path.lexists(cache / "categories/www/link.html")
    assert (cache / "categories/www/subdir").is_dir()
    assert all(p.exists() for p in others)
    assert "removed 5 files" in result.stderr, result.stderr


def test_literal_last_component_names_one_entry(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "flat", "a.html")
    others = [make_page(cache, "flat", n) for n in ("a.htm", "a.html.gz", "b.html")]
    (cache / "flat" / "dir.html").mkdir()
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'dir')")
    result = clear("--pages", "flat/{port}.html", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists() and all(p.exists() for p in others)
    assert (cache / "flat" / "dir.html").is_dir()
    assert "flat/dir.html: is a directory, left alone" in result.stderr


def test_values_in_a_glob_match_only_themselves(db, cache):
    pages = {n: make_page(cache, "flat", n + "-1.html")
             for n in ("a*", "ab", "[x]", "x", "?", "q", "a")}
    for port in ("a*", "[x]", "?"):
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', %s)",
            (port,))
    result = clear("--pages", "flat/{port}-*", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert sorted(n for n, p in pages.items() if not p.exists()) == ["?", "[x]", "a*"]


def test_glob_characters_in_the_template_match_as_fnmatch_does(db, cache):
    add_ports(db, "www/a")
    gone = [make_page(cache, "www/a", n) for n in ("p1.html", "p2.html", ".p3.html")]
    kept = [make_page(cache, "www/a", n) for n in ("p10.html", "q1.html")]
    result = clear("--pages", "{category}/{port}/[p.]?.html", "--pages",
                   "{category}/{port}/.p*", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


def test_over_long_expansion_is_reported_and_deleted(db, cache, outside):
    long_port = "p" * 250     # a valid name, but www-<port>.html is 259 bytes
    page = make_page(cache, "flat", "www-ok.html")
    before = tree(cache)
    for port in (long_port, "ok"):
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', %s)",
            (port,))
    result = clear("--pages", "flat/{category}-{port}.html", "--pages",
                   "{category}/{port}/*", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"row \d+ \(1 row\): invalid name", result.stderr)) == 1
    assert not page.exists()
    del before[str(page)]
    assert tree(cache) == before
    assert all_queued(db) == [("www", "ok", True)]
    assert_one_line_error(clear("--pages", "flat/{category}-{port}.html",
                                "www/" + long_port, dsn=db, cache=cache), 2)


def test_each_target_cleared_once_per_run(db, cache):
    names = ["www/p%d" % i for i in range(50)]
    add_ports(db, *names)
    listing = make_page(cache, "categories/www", "index.html")
    make_page(cache, "ports/www/p7")
    result = clear("-v", *FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not listing.exists()
    assert result.stderr.count("categories/www/*: removed") == 1, result.stderr
    assert result.stderr.count("ports/www/p7/*: removed") == 1, result.stderr


def test_explicit_ports_apply_every_template(db, cache):
    pages = [make_page(cache, "ports/www/a"), make_page(cache, "categories/www", "i.html")]
    result = clear(*FRESHPORTS, "www/a", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in pages)
    assert all_queued(db) == []


def test_symlinked_template_directory_is_not_entered(db, cache, outside):
    (cache / "ports").symlink_to(outside)
    (outside / "www").mkdir()
    (outside / "www" / "a").symlink_to(outside / "p")
    add_ports(db, "www/a")
    result = clear(*FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "ports: is a symlink, not entered" in result.stderr
    shutil.rmtree(outside / "www")      # ours, made above: the fixture compares the rest


# ------------------------------------------------- re-clears and due rows

def test_a_change_queues_one_reclear_that_queues_nothing(db, cache):
    add_ports(db, "www/a")
    touch_port(db, "www/a")
    result = clear("--again-after", "0.5", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "deleted 2 rows" in result.stderr
    assert queued(db) == [] and all_queued(db) == [("www", "a", True)]
    due = sql(db, "SELECT due_at - now() > interval '0.3 s' FROM ports_cache_clearing")
    assert due == [(True,)]
    wait_for(lambda: queued(db) == [("www", "a")], what="the re-clear to fall due")
    page = make_page(cache, "www/a")    # a render that raced the first clear
    result = clear("--again-after", "0.5", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists()
    assert all_queued(db) == [], "a re-clear queues no other"


def test_due_later_row_is_untouched_uncounted_then_cleared(db, cache):
    page = make_page(cache, "www/nginx")
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'nginx', now() + interval '1 s'), ('www', '..', now() + '1 h')")
    result = clear(dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "cleared 0 ports, deleted 0 rows, removed 0 files" in result.stderr
    assert "invalid" not in result.stderr
    assert page.exists() and len(all_queued(db)) == 2
    wait_for(lambda: queued(db), what="the row to fall due")
    result = clear(dsn=db, cache=cache)
    assert "cleared 1 port, deleted 1 row, removed 1 file" in result.stderr
    assert not page.exists()
    # A clear queued for later races renders as well: it is cleared again.
    assert all_queued(db) == [("www", "..", False), ("www", "nginx", True)]


def test_again_after_0_dry_run_and_explicit_ports_queue_nothing(db, cache):
    add_ports(db, "www/a")
    assert clear("--dry-run", dsn=db, cache=cache).returncode == 0
    assert clear("www/a", dsn=db, cache=cache).returncode == 0
    assert all_queued(db) == [("www", "a", False)]
    result = clear("--again-after", "0", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert all_queued(db) == []
    add_ports(db, "www/b")
    assert clear(dsn=db, cache=cache, env={"CLEAR_CACHE_AGAIN_AFTER": "0"}).returncode == 0
    assert all_queued(db) == []


@pytest.mark.parametrize("args, env", [(["--again-after", "-1"], {}),
                                       (["--again-after", "soon"], {}),
                                       ([], {"CLEAR_CACHE_AGAIN_AFTER": "-0.5"})])
def test_bad_again_after_is_a_usage_error(db, cache, args, env):
    add_ports(db, "www/a")
    for script in (CLEAR, LISTEN):
        result = subprocess.run([sys.executable, script, "--dsn", db, "--cache-dir",
                                 str(cache)] + args, capture_output=True, text=True,
                                timeout=30, env=dict(os.environ, **env))
        assert_one_line_error(result, 2)
    assert all_queued(db) == [("www", "a", False)]


def test_dry_run_says_invalid_rows_would_be_deleted(db, cache):
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('..', 'x')")
    result = clear("--dry-run", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "invalid name '..'/'x', would be deleted" in result.stderr
    assert queued(db) == [("..", "x")]


# ------------------------------------------------------------- the daemon

def test_daemon_clears_a_committed_change(db, cache, daemon):
    add_ports(db, "www/a", "www/b")
    d = daemon(cache, "--again-after", "0")     # www/b's catch-up queues no re-clear
    d.wait_log("listening on channel clear_ports_cache")
    d.wait_ready()
    a, b = make_page(cache, "www/a"), make_page(cache, "www/b")
    touch_port(db, "www/a")
    wait_for(lambda: not a.exists(), what="www/a's page to go")
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    assert b.exists()


def test_daemon_catches_up_at_start(db, cache, daemon):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    d = daemon(cache)
    wait_for(lambda: not page.exists(), what="the catch-up run")
    # files go before COMMIT, so the rows may outlive the page by a moment
    wait_for(lambda: queued(db) == [], what="the catch-up run's commit")
    d.wait_log("listening")


def bare(script, *args):
    """Run script under this interpreter without site-packages (so without psycopg2)."""
    return subprocess.run([sys.executable, "-S", script] + list(args), capture_output=True,
                          text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")})


def test_scripts_run_directly_and_help_needs_no_psycopg2():
    for script in (CLEAR, LISTEN):
        assert os.access(script, os.X_OK)
        assert Path(script).read_text().startswith("#!/usr/bin/env python3\n")
        # -S: an interpreter without the venv's site-packages, as the system's.
        result = bare(script, "--help")
        assert result.returncode == 0 and result.stdout.count("usage:") == 1, result
        assert "psycopg2" not in result.stderr


def test_a_script_that_needs_psycopg2_says_so_in_one_line(cache):
    for script in (CLEAR, LISTEN):
        result = bare(script, "--cache-dir", str(cache))
        assert_one_line_error(result, 2)
        assert "psycopg2 is not installed for %s: run `make venv`" % sys.executable \
            in result.stderr


def test_explicit_ports_need_no_psycopg2(cache):
    page = make_page(cache, "www/a")
    result = bare(CLEAR, "--cache-dir", str(cache), "www/a")
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_check_without_psycopg2_is_unknown_on_stdout():
    result = bare(CLEAR, "--check")
    assert result.returncode == 3, result
    assert result.stdout.startswith("CLEAR_CACHE UNKNOWN - psycopg2 is not installed")
    assert len(result.stdout.splitlines()) == 1 and result.stderr == ""


def test_runtime_requirements_are_psycopg2_alone():
    lines = [line for line in (HERE / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(line.startswith("psycopg2-binary==") for line in lines), lines
    dev = (HERE / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and "pytest==" in dev


def test_a_bad_number_of_seconds_says_what_was_expected(cache):
    result = subprocess.run([sys.executable, LISTEN, "--cache-dir", str(cache),
                             "--heartbeat", "abc"], capture_output=True, text=True, timeout=30)
    assert_one_line_error(result, 2)
    assert "argument --heartbeat: expected a number of seconds > 0, got 'abc'" in \
        result.stderr, result.stderr


def test_daemon_config_errors_exit_2_before_connecting(tmp_path, cache):
    cases = [["--cache-dir", str(tmp_path / "missing")],
             ["--cache-dir", str(cache), "--dsn", "host='unterminated"],
             ["--cache-dir", str(cache), "--heartbeat", "0"],
             ["--cache-dir", str(cache), "--heartbeat", "0"],
             ["--cache-dir", str(cache), "--bogus"]]
    for args in cases:
        # The port is closed: a daemon that tried to connect would retry forever.
        dsn = "host=127.0.0.1 port=%d connect_timeout=1" % free_port()
        result = subprocess.run([sys.executable, LISTEN, "--dsn", dsn] + args,
                                capture_output=True, text=True, timeout=30)
        assert_one_line_error(result, 2)
    result = subprocess.run([sys.executable, LISTEN], capture_output=True, text=True,
                            timeout=30, env={k: v for k, v in os.environ.items()
                                             if k != "CLEAR_CACHE_DIR"})
    assert_one_line_error(result, 2)


def test_daemon_reconnects_after_pg_terminate_backend(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "60")
    d.wait_ready()
    page = make_page(cache, "www/a")
    pids = wait_for(lambda: backends(db, "listen_clear_cache.py"), what="the backend")
    sql(db, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    touch_port(db, "www/a")     # committed while the daemon is disconnected
    wait_for(lambda: not page.exists(), what="the change to be cleared after reconnecting")
    # The server's own reason, not libpq's "server closed the connection".
    d.wait_log("connection lost: terminating connection due to administrator command")
    d.wait_log("listening", 2)
    wait_for(lambda: queued(db) == [], what="the queue to drain")


def test_idle_session_timeout_closes_neither_listener_nor_waiting_clearer(db, cache, daemon):
    add_ports(db, "www/a")
    sql(db, "ALTER DATABASE %s SET idle_session_timeout = '1s'"
        % psycopg2.extensions.parse_dsn(db)["dbname"])
    try:
        d = daemon(cache, "--heartbeat", "600", "--again-after", "0")
        d.wait_ready()
        waiting_clearer(d)

        def idle_for(application, seconds):
            return sql(db, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                       " AND state = 'idle' AND state_change < now() - %s * interval '1 s'",
                       (application, seconds))[0][0] == 1
        # Three times the server's timeout, and both sessions are still there.
        wait_for(lambda: idle_for("listen_clear_cache.py", 3), what="an idle listener")
        wait_for(lambda: idle_for("clear_cache.py (warm)", 3), what="an idle waiter")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="the change to be cleared")
        assert "connection lost" not in d.log() and d.count("listening") == 1
    finally:
        sql(db, "ALTER DATABASE %s RESET idle_session_timeout"
            % psycopg2.extensions.parse_dsn(db)["dbname"])


def test_daemon_retries_the_first_connection_forever(db, cache, daemon):
    port = free_port()
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    d = daemon(cache, dsn=tcp_dsn(db, port))
    d.wait_log("cannot listen: .*retrying in", 3)
    delays = [float(x) for x in re.findall(r"retrying in ([\d.]+) s", d.log())]
    assert delays[0] < 1 and delays[2] > delays[0], "backoff must grow"
    assert d.proc.poll() is None
    p = Proxy(port=port)
    try:
        wait_for(lambda: not page.exists(), timeout=30, what="the catch-up after connecting")
        d.wait_log("listening")
        d.wait_log(r"the server answers again, after [\d.]+ s and \d+ failures")
    finally:
        p.close()


def test_daemon_sighup_flushes_rows_without_notify(db, cache, daemon):
    d = daemon(cache, "--heartbeat", "600")
    d.wait_ready()
    page = make_page(cache, "www/a")
    queue_quietly(db, "www", "a")
    d.signal(signal.SIGHUP)
    wait_for(lambda: not page.exists(), what="SIGHUP's flush")
    wait_for(lambda: queued(db) == [], what="the flush's commit")     # files go first
    d.wait_log("SIGHUP")


def test_daemon_heartbeat_sweeps_unannounced_rows(db, cache, daemon):
    d = daemon(cache, "--heartbeat", "0.5")
    d.wait_ready()
    page = make_page(cache, "www/a")
    queue_quietly(db, "www", "a")
    wait_for(lambda: not page.exists(), what="the heartbeat's sweep")
    d.wait_log("heartbeat found rows due")


def test_daemon_sigterm_exits_0(db, cache, daemon):
    d = daemon(cache)
    d.wait_log("listening")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert "stopped" in d.log()


def test_daemon_sigint_exits_0(db, cache, daemon):
    d = daemon(cache)
    d.wait_log("listening")
    d.signal(signal.SIGINT)
    assert d.wait() == 0


def test_daemon_lets_a_running_clearer_finish_and_keeps_secrets_off_argv(db, cache, daemon):
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    blocker = psycopg2.connect(db)      # holds the queue row: the clearer's DELETE waits
    blocker.cursor().execute("SELECT * FROM ports_cache_clearing FOR UPDATE")
    secret_dsn = db + " options='-c work_mem=4MB'"
    d = daemon(cache, dsn=secret_dsn)
    try:
        wait_for(lambda: waiting_on_lock(db, "clear_cache.py"), what="a blocked clearer")
        (child,) = clearer_children(d.proc.pid)
        argv = Path("/proc/%d/cmdline" % child).read_bytes().split(b"\0")
        environ = Path("/proc/%d/environ" % child).read_bytes().split(b"\0")
        assert argv[0] == sys.executable.encode()
        assert not any(b"work_mem" in arg or b"dbname" in arg for arg in argv)
        assert b"CLEAR_CACHE_DSN=" + secret_dsn.encode() in environ
        assert b"CLEAR_CACHE_DIR=" + str(cache).encode() in environ
        d.signal(signal.SIGTERM)
        d.wait_log("stopping")
        assert d.proc.poll() is None, "the daemon must wait for its clearer"
    finally:
        blocker.rollback()
        blocker.close()
    assert d.wait() == 0
    assert not page.exists() and queued(db) == []
    log = d.log()
    assert log.index("stopping") < log.index("cleared 1 port") < log.index("stopped")


def test_notifications_during_a_run_lead_to_exactly_one_more(db, cache, daemon):
    names = ["www/p%d" % i for i in range(20)]
    add_ports(db, *names)
    d = daemon(cache, "--heartbeat", "600")
    d.wait_ready()
    # A run that holds its snapshot while it waits for a row lock: the row is
    # queued and locked before any notification starts the run.
    queue_quietly(db, "www", "blocker")
    blocker = psycopg2.connect(db)
    blocker.cursor().execute("SELECT * FROM ports_cache_clearing FOR UPDATE")
    try:
        runs_before = d.runs()
        sql(db, "NOTIFY clear_ports_cache")
        wait_for(lambda: waiting_on_lock(db, "clear_cache.py"), what="a blocked clearer")
        pages = [make_page(cache, n) for n in names]
        for name in names:
            touch_port(db, name)
    finally:
        blocker.rollback()
        blocker.close()
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    d.wait_idle()
    assert not any(p.exists() for p in pages)
    assert d.runs() - runs_before == 2, d.log()
    d.assert_runs_never_overlapped()


def test_daemon_retries_while_the_cache_directory_is_missing(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "600")
    d.wait_ready()
    aside = cache.parent / "aside"
    cache.rename(aside)
    touch_port(db, "www/a")
    d.wait_log(r"clearer pid \d+ exited with 2; retrying in", 2)
    assert queued(db) == [("www", "a")]
    page = make_page(aside, "www/a")
    aside.rename(cache)
    wait_for(lambda: not (cache / "www/a" / PAGE).exists(), timeout=30,
             what="the retried clear once the directory is back")
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    assert not page.exists()


def test_daemon_waits_for_rows_due_later_then_clears_them(db, cache, daemon):
    d = daemon(cache, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    runs = d.runs()
    page = make_page(cache, "www/nginx")
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'nginx', now() + interval '2 s')")
    d.wait_log(r"queue: next rows due in [12]\.\d s")
    assert d.runs() == runs, "a notification about rows not due started a clearer"
    assert page.exists()
    wait_for(lambda: not page.exists(), what="the row cleared once due")
    wait_for(lambda: all_queued(db) == [], what="the queue to empty")
    d.wait_idle()
    assert d.runs() == runs + 1


def test_isolated_change_costs_exactly_two_runs(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "600", "--again-after", "1")
    d.wait_ready()
    wait_for(lambda: all_queued(db) == [], what="the insert's re-clear to go")
    d.wait_idle()
    runs, looks = d.runs(), d.count("queue: nothing due")
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="the first clear")
    page = make_page(cache, "www/a")            # a render that raced the first clear
    wait_for(lambda: not page.exists(), what="the re-clear")
    wait_for(lambda: all_queued(db) == [], what="the queue to empty")
    d.wait_log("queue: nothing due", looks + 1)     # the look after the re-clear
    d.wait_idle()
    assert d.runs() - runs == 2, d.log()
    d.assert_runs_never_overlapped()


def test_daemon_hands_its_templates_to_its_clearer(db, cache, daemon):
    add_ports(db, "www/a", "net/b")
    d = daemon(cache, *FRESHPORTS, "--again-after", "0")
    d.wait_ready()
    pages = [make_page(cache, "ports/www/a"), make_page(cache, "categories/www", "i.html")]
    others = [make_page(cache, "ports/net/b"), make_page(cache, "www/a")]
    touch_port(db, "www/a")
    wait_for(lambda: not any(p.exists() for p in pages), what="port and category pages")
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    assert all(p.exists() for p in others)


def test_a_locked_queue_means_look_again_not_a_dead_connection(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "1", "--again-after", "0")
    d.wait_ready()
    locker = psycopg2.connect(db)
    locker.cursor().execute("LOCK TABLE ports_cache_clearing IN ACCESS EXCLUSIVE MODE")
    try:
        d.wait_log("cannot look at the queue: .*lock timeout; again in", timeout=20)
    finally:
        locker.rollback()
        locker.close()
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="a change cleared after the lock")
    assert "connection lost" not in d.log()
    assert d.count("listening") == 1


RENDERER = r"""
import os, random, sys, threading, time, psycopg2
dsn, cache, stop, names, slowest = sys.argv[1:6]

def render(n):
    rng = random.Random(n)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    while not os.path.exists(stop):
        category, port = rng.choice(names.split()).split("/")
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM ports WHERE category = %s AND name = %s",
                        (category, port))
            version = cur.fetchone()[0]
        time.sleep(rng.uniform(0, float(slowest)))     # rendering takes this long
        tmp = os.path.join(cache, ".render-%d" % n)
        with open(tmp, "w") as f:
            f.write(version)
        os.makedirs(os.path.join(cache, category, port), exist_ok=True)
        os.replace(tmp, os.path.join(cache, category, port, "page.html"))

threads = [threading.Thread(target=render, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def stale_pages(dsn, cache, names):
    """Pages that show another version than their port's current one."""
    stale = []
    for name in names:
        category, port = name.split("/")
        page = cache / name / "page.html"
        current = sql(dsn, "SELECT version FROM ports WHERE category = %s AND name = %s",
                      (category, port))[0][0]
        if page.exists() and page.read_text() != current:
            stale.append(name)
    return stale


@pytest.mark.parametrize("again_after", ["1.5", "0"], ids=["reclear", "reclear-off"])
def test_renders_racing_the_clear_leave_no_stale_page(db, cache, daemon, figures,
                                                      again_after):
    names = ["race/p%d" % i for i in range(6)]
    add_ports(db, *names)
    d = daemon(cache, "--again-after", again_after)
    d.wait_ready()
    stop = cache.parent / "stop-rendering"
    # Every render reads, then writes within 1 s: shorter than the 1.5 s re-clear delay.
    renderer = subprocess.Popen([sys.executable, "-c", RENDERER, db, str(cache), str(stop),
                                 " ".join(names), "1.0"])
    conn = psycopg2.connect(db)
    try:
        rng = random.Random(11)
        for i in range(150):
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE ports SET version = %s WHERE category || '/' || name = %s",
                            ("v%d" % i, rng.choice(names)))
            time.sleep(0.02)    # pacing the writer, not synchronisation
    finally:
        conn.close()
        stop.touch()            # no render starts after the last commit
        renderer.wait(timeout=30)
    assert renderer.returncode == 0
    wait_for(lambda: all_queued(db) == [], timeout=30, what="every clear and re-clear done")
    d.wait_idle()
    stale = stale_pages(db, cache, names)
    if again_after == "0":
        assert stale, "the race never happened: the test proves nothing"
    else:
        assert stale == []
    figures["renders racing the clear, re-clear %s" % (
        "after 1.5 s" if again_after != "0" else "off")] = {
        "committed": 150, "notes": "%d stale pages of %d at the end" % (
            len(stale), len(names))}


def test_burst_is_cleared_with_far_fewer_runs(db, cache, daemon):
    names = ["www/p%d" % i for i in range(50)]
    add_ports(db, *names)
    d = daemon(cache, "--heartbeat", "600")
    d.wait_ready()
    runs_before = d.runs()
    commits = 4 * 250
    errors = []

    def writer(offset):
        conn = psycopg2.connect(db)
        try:
            for i in range(commits // 4):
                name = names[(i + offset) % len(names)]
                make_page(cache, name, "w%d-%d.html" % (offset, i))
                with conn, conn.cursor() as cur:
                    cur.execute("UPDATE ports SET version = %s WHERE category || '/' || name"
                                " = %s", (str(i), name))
        except Exception as e:
            errors.append(e)
        finally:
            conn.close()
    threads = [threading.Thread(target=writer, args=(w * 7,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    wait_for(lambda: not any(os.listdir(cache / n) for n in names), what="every page to go")
    d.wait_idle()
    runs = d.runs() - runs_before
    assert 1 <= runs <= commits // 10, "%d runs for %d commits" % (runs, commits)
    d.assert_runs_never_overlapped()


# ------------------------------------------------ several web servers

@pytest.fixture
def consumers(db):
    """Register web1 and web2; unregister them at the end."""
    sql(db, "INSERT INTO cache_consumers VALUES ('web1'), ('web2')")
    yield ["web1", "web2"]
    sql(db, "DELETE FROM cache_consumers")


def test_trigger_queues_one_row_per_registered_consumer(db, consumers):
    add_ports(db, "www/a")
    assert all_queued(db) == [("www", "a", False)] * 2
    assert sorted(sql(db, "SELECT consumer FROM ports_cache_clearing")) == [
        ("web1",), ("web2",)]
    sql(db, "TRUNCATE ports_cache_clearing")
    # A program's own row for '' is fanned out to every name.
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'nginx', now() + interval '1 h')")
    assert sorted(sql(db, "SELECT consumer, port FROM ports_cache_clearing")) == [
        ("web1", "nginx"), ("web2", "nginx")]


@pytest.mark.parametrize("change", ["UPDATE ports SET version = '2'", "DELETE FROM ports",
                                    "TRUNCATE ports"])
def test_each_kind_of_change_queues_one_row_per_registered_consumer(db, consumers, change):
    add_ports(db, "www/a")
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, change)
    assert sorted(sql(db, "SELECT consumer, category, port FROM ports_cache_clearing")) == [
        ("web1", "www", "a"), ("web2", "www", "a")]


def test_a_manual_flush_for_an_unregistered_consumer_exits_2(db, cache, consumers):
    add_ports(db, "www/a")
    for args in ([], ["--consumer", "web3"]):
        assert_one_line_error(clear(*args, dsn=db, cache=cache), 2)
    result = clear("--consumer", "web1", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "deleted 1 row" in result.stderr
    assert sql(db, "SELECT consumer FROM ports_cache_clearing WHERE NOT reclear") == [
        ("web2",)]


def test_two_web_servers_each_clear_their_own_cache(db, tmp_path, daemon, consumers, figures):
    add_ports(db, "www/a", "www/b")
    caches = {name: tmp_path / name for name in consumers}
    for cache in caches.values():
        cache.mkdir()
    start = {name: (lambda name=name: daemon(caches[name], "--consumer", name,
                                             "--again-after", "0", "--heartbeat", "600"))
             for name in consumers}
    web1, web2 = start["web1"](), start["web2"]()
    web1.wait_ready()
    web2.wait_ready()
    pages = {name: make_page(caches[name], "www/a") for name in consumers}
    touch_port(db, "www/a")
    wait_for(lambda: not any(p.exists() for p in pages.values()), what="both caches")
    web1.wait_idle()
    web2.wait_idle()
    # A notification for web1's rows starts no clearer for web2.
    runs2 = web2.runs()
    sql(db, "INSERT INTO ports_cache_clearing (category, port, consumer)"
        " VALUES ('www', 'b', 'web1')")
    wait_for(lambda: web1.count(r"clearer pid \d+ done") > 1 and not sql(
        db, "SELECT FROM ports_cache_clearing WHERE consumer = 'web1'"),
        what="web1 to clear its row")
    assert web2.runs() == runs2
    # With web2 stopped, web1 drains its rows and web2's wait for it.
    web2.signal(signal.SIGTERM)
    assert web2.wait() == 0
    pages = {name: make_page(caches[name], "www/b") for name in consumers}
    touch_port(db, "www/b")
    wait_for(lambda: not pages["web1"].exists(), what="web1's page")
    wait_for(lambda: sql(db, "SELECT consumer FROM ports_cache_clearing") == [("web2",)],
             what="web1's rows gone, web2's waiting")
    assert pages["web2"].exists()
    start["web2"]()
    wait_for(lambda: not pages["web2"].exists(), what="web2's page once it is back")
    wait_for(lambda: all_queued(db) == [], what="the queue to empty")
    figures["two web servers (consumers web1, web2), one stopped a while"] = {
        "committed": 2, "cleared": "2 of 2 caches, each change", "wrongly deleted": 0,
        "notes": "web2's rows waited while it was stopped"}


def test_an_unregistered_daemon_says_so_and_starts_once_registered(db, cache, daemon):
    sql(db, "INSERT INTO cache_consumers VALUES ('web1')")
    try:
        add_ports(db, "www/a")
        d = daemon(cache, "--consumer", "web2", "--heartbeat", "0.5", "--again-after", "0")
        d.wait_log(r"ERROR: consumer 'web2' is not registered in cache_consumers")
        d.wait_log(r"consumer 'web2' is not registered", 3)      # it keeps looking
        assert d.count(r"ERROR: consumer 'web2'") == 1, "at most one line a minute"
        assert d.runs() == 0
        sql(db, "INSERT INTO cache_consumers VALUES ('web2')")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="web2's page once it is registered")
        d.wait_log(r"consumer 'web2' is registered, after")
    finally:
        sql(db, "DELETE FROM cache_consumers")


def test_a_clearer_waiting_on_a_lock_gives_up(db, cache):
    add_ports(db, "www/a")
    locker = psycopg2.connect(db)
    locker.cursor().execute("LOCK TABLE ports_cache_clearing IN ACCESS EXCLUSIVE MODE")
    try:
        result = clear("--give-up-after", "1", dsn=db, cache=cache)
    finally:
        locker.rollback()
        locker.close()
    assert result.returncode == 1, result.stderr
    # The server answered BEGIN; the lock wait after it ends with lock_timeout.
    assert "canceling statement due to lock timeout" in result.stderr, result.stderr
    assert_one_line_error(result, 1)
    assert queued(db) == [("www", "a")]


# -------------------------------------------------------- the monitoring check

def check(*args, dsn):
    """Run clear_cache.py --check, without a cache directory; return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEAR_CACHE_")}
    return subprocess.run([sys.executable, CLEAR, "--check", "--dsn", dsn] + list(args),
                          env=env, capture_output=True, text=True, timeout=60)


def queue_due_ago(dsn, seconds, consumer=""):
    """Queue a row that fell due seconds ago, with no NOTIFY to clear it."""
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE ports_cache_clearing DISABLE TRIGGER"
                    " ports_cache_clearing_notify")
        cur.execute("INSERT INTO ports_cache_clearing (category, port, consumer, due_at)"
                    " VALUES ('www', 'old', %s, now() - %s * interval '1 s')",
                    (consumer, seconds))
        cur.execute("ALTER TABLE ports_cache_clearing ENABLE TRIGGER"
                    " ports_cache_clearing_notify")
    conn.close()


def test_check_reports_ok_warning_and_critical(db, cache, daemon):
    result = check(dsn=db)
    assert result.returncode == 2, result                   # no daemon listens
    assert result.stdout.startswith("CLEAR_CACHE CRITICAL - 0 rows due, oldest due 0 s,"
                                    " 0 listeners | due=0 oldest=0s;60;300 listeners=0")
    # A DSN's application_name does not rename the daemon: it names itself.
    d = daemon(cache, "--heartbeat", "600", dsn=db + " application_name=renamed")
    d.wait_ready()
    result = check(dsn=db)
    assert result.returncode == 0, result
    assert result.stdout == ("CLEAR_CACHE OK - 0 rows due, oldest due 0 s, 1 listener |"
                             " due=0 oldest=0s;60;300 listeners=1\n")
    queue_due_ago(db, 90)
    result = check(dsn=db)
    assert result.returncode == 1, result
    assert re.match(r"CLEAR_CACHE WARNING - 1 row due, oldest due 9\d s", result.stdout)
    assert check("--warn", "100", dsn=db).returncode == 0
    assert check("--warn", "30", "--crit", "80", dsn=db).returncode == 2
    assert len(all_queued(db)) == 1, "the check changes nothing"
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1


def test_check_counts_the_daemon_of_its_consumer(db, cache, daemon, consumers):
    d = daemon(cache, "--consumer", "web1", "--heartbeat", "600")
    d.wait_ready()
    assert backends(db, "listen_clear_cache.py web1")
    assert check("--consumer", "web1", dsn=db).returncode == 0
    result = check("--consumer", "web2", dsn=db)
    assert result.returncode == 2 and "0 listeners" in result.stdout, result


def test_check_says_unknown_for_what_it_cannot_know(db, admin_dsn):
    for args, dsn in ((["--warn", "400"], db),                  # above --crit
                      (["--crit", "soon"], db),
                      ([], psycopg2.extensions.make_dsn(db, dbname="no_such_db")),
                      ([], admin_dsn)):                          # no schema there
        result = check(*args, dsn=dsn)
        assert result.returncode == 3, result
        assert "Traceback" not in result.stderr
    assert check(dsn=admin_dsn).stdout.startswith("CLEAR_CACHE UNKNOWN - ")


# ---------------------------------------------------------- least privilege

GRANTS = [line[len("--   "):] for line in Path(SCHEMA).read_text().splitlines()
          if line.startswith("--   ") and line.rstrip().endswith(";")]


@pytest.fixture
def least(db):
    """A role with exactly schema.sql's grants; its DSN."""
    role = "lcc_least_%d" % os.getpid()
    sql(db, "DROP ROLE IF EXISTS %s" % role)
    for grant in GRANTS:
        sql(db, grant.replace("freshports_cache", role))
    yield psycopg2.extensions.make_dsn(db, user=role)
    sql(db, "DROP OWNED BY %s; DROP ROLE %s" % (role, role))


def test_least_privilege_is_enough_and_no_more(db, cache, daemon, least):
    assert len(GRANTS) == 4, GRANTS
    add_ports(db, "www/a", "www/b")
    page = make_page(cache, "www/a")
    result = clear(dsn=least, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists() and queued(db) == []
    d = daemon(cache, "--heartbeat", "1", dsn=least)
    d.wait_ready()
    page = make_page(cache, "www/b")
    touch_port(db, "www/b")
    wait_for(lambda: not page.exists(), what="a change cleared by the daemon as that role")
    wait_for(lambda: all_queued(db) == [], timeout=30, what="its re-clear too")
    assert check(dsn=least).returncode == 0
    assert "ERROR" not in d.log() and "WARNING" not in d.log(), d.log()
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        sql(least, "UPDATE ports SET version = 'x'")


# ------------------------------------------------------- the warm clearer

def waiting_clearer(d, count=1):
    """The pid of the count-th waiting clearer the daemon started, once it is connected."""
    d.wait_log(r"started waiting clearer pid \d+", count)
    pid = int(re.findall(r"started waiting clearer pid (\d+)", d.log())[count - 1])
    return pid


def warm_backends(dsn):
    """Pids of the backends of waiting (warm) clearers."""
    return backends(dsn, "clear_cache.py (warm)")


def alive(pid):
    """Is process pid running (not a zombie)?"""
    try:
        return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_change_is_cleared_by_the_clearer_started_ahead(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    pid = waiting_clearer(d)
    wait_for(lambda: warm_backends(db), what="the waiting clearer's connection")
    assert clearer_children(d.proc.pid) == [pid]
    argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    assert b"--warm" in argv
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="the change to be cleared")
    d.wait_log(r"clearer pid %d started: word given to the waiting clearer" % pid)
    d.wait_log(r"clearer pid %d done" % pid)
    waiting_clearer(d, 2)       # and the next one waits


def test_a_killed_waiting_clearer_is_replaced_and_nothing_is_lost(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    pid = waiting_clearer(d)
    os.kill(pid, signal.SIGKILL)
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")     # while there is no waiting clearer: a cold one clears it
    wait_for(lambda: not page.exists(), what="the change to be cleared")
    d.wait_log(r"lost the waiting clearer \(pid %d, exit signal 9\)" % pid)
    new = waiting_clearer(d, 2)
    assert new != pid and alive(new)
    wait_for(lambda: queued(db) == [], what="the queue to drain")


def test_a_waiting_clearer_whose_backend_died_connects_again(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    pid = waiting_clearer(d)
    backend = wait_for(lambda: warm_backends(db), what="the waiting clearer's connection")
    sql(db, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (backend,))
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="the change to be cleared")
    d.wait_log(r"clearer pid %d done" % pid)        # exit 0
    assert "exited with" not in d.log()


def test_a_waiting_clearer_leaves_when_its_daemon_is_killed(db, cache, daemon):
    d = daemon(cache, "--heartbeat", "2")
    d.wait_ready()
    pid = waiting_clearer(d)
    d.proc.kill()
    d.proc.wait()
    wait_for(lambda: not alive(pid), timeout=2 + 5, what="the orphaned waiting clearer to exit")
    assert not warm_backends(db) or wait_for(lambda: not warm_backends(db))


def test_no_warm_keeps_no_clearer_while_idle(db, cache, daemon):
    add_ports(db, "www/a")
    for args, env in ((["--no-warm"], None), ([], {"CLEAR_CACHE_WARM": "0"})):
        d = daemon(cache, "--heartbeat", "600", "--again-after", "0", *args, env=env)
        d.wait_ready()
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="the change to be cleared")
        d.wait_log(r"queue: nothing due", 2)
        d.wait_idle()
        assert clearer_children(d.proc.pid) == []
        assert "waiting clearer" not in d.log() and not warm_backends(db)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_sigterm_sends_the_waiting_clearer_away_too(db, cache, daemon):
    d = daemon(cache)
    d.wait_ready()
    pid = waiting_clearer(d)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert not alive(pid)
    wait_for(lambda: not warm_backends(db), what="its connection to close")



# ------------------------------------------- reliability (make reliability)
#
# These push hard and record their figures in reliability.json, which
# `make reliability` prints as the README's table.

FIGURES = HERE / "reliability.json"
reliability = pytest.mark.reliability


@pytest.fixture(scope="session")
def figures():
    """Scenario -> figures, written to reliability.json at the end."""
    found = {}
    yield found
    if found:
        old = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
        old.update(found)
        FIGURES.write_text(json.dumps(old, indent=1, sort_keys=True))


def print_reliability_table():
    """Print reliability.json as a Markdown table."""
    rows = json.loads(FIGURES.read_text())
    columns = ["committed", "cleared", "wrongly deleted", "restarts survived",
               "reconnect s", "notes"]
    print("| scenario | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in sorted(rows.items()):
        print("| %s | %s |" % (name, " | ".join(str(row.get(c, "")) for c in columns)))


class Writers:
    """Writer connections committing changes while recording what committed."""

    def __init__(self, dsn, cache):
        self.dsn, self.cache = dsn, cache
        self.committed = {}         # port name -> pages whose change committed
        self.rolled_back = {}
        self.uncertain = 0          # COMMITs that failed: committed or not, unknown
        self.lock = threading.Lock()

    def run(self, writer, names, count, rollback=(), every=10):
        """Write a page, update its port, commit; each every-th on rollback ports rolls back."""
        conn = None
        for i in range(count):
            back = bool(rollback) and i % every == every - 1
            pool = rollback if back else names
            name = pool[(i * 7 + writer) % len(pool)]
            page = make_page(self.cache, name, "w%d-%d.html" % (writer, i))
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsn, connect_timeout=5)
                category, port = name.split("/")
                with conn.cursor() as cur:
                    cur.execute("UPDATE ports SET version = %s WHERE category = %s"
                                " AND name = %s", (str(i), category, port))
                if back:
                    conn.rollback()
                    target = self.rolled_back
                else:
                    conn.commit()
                    target = self.committed
            except psycopg2.Error:
                with self.lock:
                    self.uncertain += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)    # the server is restarting: back off a little
                continue
            with self.lock:
                target.setdefault(name, []).append(page)
        if conn is not None:
            conn.close()

    def start(self, *args_per_writer):
        threads = [threading.Thread(target=self.run, args=args)
                   for args in args_per_writer]
        for t in threads:
            t.start()
        return threads

    def lost(self):
        """Pages of committed changes that still exist."""
        return [p for pages in self.committed.values() for p in pages if p.exists()]


def drained(dsn, writers):
    """Is the queue empty and every committed change's page gone?"""
    return queued(dsn) == [] and not writers.lost()


KILLS = 4


def clearer_killer(daemon_pid, stop, kills):
    """SIGKILL each of the daemon's clearers as soon as it appears, KILLS times."""
    while not stop.is_set() and len(kills) < KILLS:
        for pid in clearer_children(daemon_pid):
            if pid not in kills:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.002)


def random_manual_flushes(dsn, cache, stop, results):
    """Run clear_cache.py by hand at random moments."""
    rng = random.Random(7)
    while not stop.is_set():
        time.sleep(rng.uniform(0.05, 0.3))
        results.append(clear(dsn=dsn, cache=cache).returncode)


@reliability
@pytest.mark.parametrize("kill_clearers", [False, True], ids=["plain", "sigkill"])
def test_no_lost_invalidation_under_load(db, cache, daemon, figures, kill_clearers):
    committed_ports = ["load/p%d" % i for i in range(100)]
    rollback_ports = ["back/p%d" % i for i in range(10)]
    untouched = ["calm/p%d" % i for i in range(10)]
    add_ports(db, *committed_ports, *rollback_ports, *untouched)
    # No re-clears of these inserts, due while pages that must stay are written.
    sql(db, "TRUNCATE ports_cache_clearing")
    d = daemon(cache)
    d.wait_ready()
    calm_pages = [make_page(cache, name) for name in untouched]
    writers = Writers(db, cache)
    stop = threading.Event()
    flushes, kills = [], []
    helpers = [threading.Thread(target=random_manual_flushes, args=(db, cache, stop, flushes))]
    if kill_clearers:
        helpers.append(threading.Thread(target=clearer_killer,
                                        args=(d.proc.pid, stop, kills)))
    for h in helpers:
        h.start()
    try:
        threads = writers.start(*[(w, committed_ports, 500, rollback_ports)
                                  for w in range(8)])
        for t in threads:
            t.join()
        if kill_clearers:
            # A killed run is retried, so the killer always finds its clearers.
            wait_for(lambda: len(kills) == KILLS, timeout=120,
                     what="%d clearers killed" % KILLS)
    finally:
        stop.set()      # never leave a flusher behind: it would empty later tests' queue
        for h in helpers:
            h.join()
    wait_for(lambda: drained(db, writers), timeout=120, what="every committed change cleared")
    committed = sum(len(p) for p in writers.committed.values())
    assert committed >= 8 * 450 - writers.uncertain
    assert writers.uncertain == 0
    kept = [p for pages in writers.rolled_back.values() for p in pages]
    assert kept and all(p.exists() for p in kept), "a rolled-back change was cleared"
    assert all(p.exists() for p in calm_pages), "an untouched port was cleared"
    assert all(code == 0 for code in flushes), flushes
    assert d.proc.poll() is None
    if kill_clearers:
        assert len(kills) == KILLS
        assert d.count(r"clearer pid \d+ exited with signal 9|lost the waiting clearer"
                       r" \(pid \d+, exit signal 9\)") == KILLS, d.log()
    figures["load, 8 writers x 500" + (", clearers SIGKILLed" if kill_clearers else "")] = {
        "committed": committed, "cleared": committed - len(writers.lost()),
        "wrongly deleted": len(kept) + len(calm_pages) - sum(
            p.exists() for p in kept + calm_pages),
        "notes": "%d rolled back kept, %d manual flushes%s" % (
            len(kept), len(flushes), ", %d clearers killed" % len(kills) if kills else "")}


def postgres_bindir():
    """Where initdb and pg_ctl are."""
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    return sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]


class Cluster:
    """A private PostgreSQL cluster in a temporary directory, on a spare port."""

    def __init__(self):
        # Not below pytest's tmp_path: the postgres account could not reach it.
        self.root = root = Path(tempfile.mkdtemp(prefix="lcc-cluster-"))
        self.dir = root / "pgdata"
        self.port = free_port()
        self.bindir = postgres_bindir()
        self.as_owner = []
        if os.geteuid() == 0:   # PostgreSQL refuses to run as root
            shutil.chown(root, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.pg("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.dir), "--no-sync")
        self.pg_ctl("start", "-o", "-p %d -k %s -c listen_addresses=127.0.0.1"
                    % (self.port, root))
        self.admin = "host=127.0.0.1 port=%d user=postgres dbname=postgres" % self.port
        sql(self.admin, "CREATE DATABASE lcc")
        self.dsn = "host=127.0.0.1 port=%d user=postgres dbname=lcc" % self.port
        load_schema(self.dsn)

    def pg(self, program, *args):
        # No pipes: the postmaster would inherit them and hold them open.
        subprocess.run(self.as_owner + [os.path.join(self.bindir, program)] + list(args),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120)

    def pg_ctl(self, action, *args):
        self.pg("pg_ctl", action, "-w", "-D", str(self.dir), "-l",
                str(self.root / "server.log"), *args)

    def restart(self, mode):
        self.pg_ctl("restart", "-m", mode)

    def stop(self):
        try:
            self.pg_ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    """A private PostgreSQL that the test may restart."""
    c = Cluster()
    yield c
    c.stop()


@reliability
def test_server_restarts_lose_nothing(cluster, cache, daemon, figures):
    names = ["www/p%d" % i for i in range(30)]
    add_ports(cluster.dsn, *names)
    d = daemon(cache, "--heartbeat", "1", dsn=cluster.dsn)
    d.wait_ready()
    writers = Writers(cluster.dsn, cache)
    restarts = []
    threads = writers.start(*[(w, names, 300) for w in range(4)])
    for mode in ("fast", "immediate", "fast"):
        wait_for(lambda: sum(map(len, writers.committed.values())) > 100 * (len(restarts) + 1),
                 timeout=60, what="writers to commit before a restart")
        before = d.count("listening")
        started = time.monotonic()
        cluster.restart(mode)
        d.wait_log("listening", before + 1, timeout=60)
        restarts.append(time.monotonic() - started)
    for t in threads:
        t.join()
    wait_for(lambda: drained(cluster.dsn, writers), timeout=120,
             what="every committed change cleared after the restarts")
    assert d.proc.poll() is None, "the daemon exited"
    committed = sum(len(p) for p in writers.committed.values())
    figures["server restarts (fast, immediate, fast) under load"] = {
        "committed": committed, "cleared": committed - len(writers.lost()),
        "wrongly deleted": 0, "restarts survived": len(restarts),
        "reconnect s": "%.1f max" % max(restarts),
        "notes": "%d commits failed during restarts" % writers.uncertain}


class Standby(Cluster):
    """A streaming replica of primary (pg_basebackup -R), on a spare port."""

    def __init__(self, primary):
        self.root = root = Path(tempfile.mkdtemp(prefix="lcc-standby-"))
        self.dir = root / "pgdata"
        self.port = free_port()
        self.bindir = primary.bindir
        self.as_owner = primary.as_owner
        if self.as_owner:
            shutil.chown(root, "postgres")
        self.pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-D", str(self.dir), "-R", "-X", "stream", "-c", "fast")
        self.pg_ctl("start", "-o", "-p %d -k %s -c listen_addresses=127.0.0.1"
                    % (self.port, root))
        self.dsn = "host=127.0.0.1 port=%d user=postgres dbname=lcc" % self.port

    def promote(self):
        self.pg_ctl("promote")


def replayed(standby, category, port, version):
    """Has the standby replayed the change that set this port's version?"""
    return sql(standby.dsn, "SELECT count(*) FROM ports WHERE category = %s AND name = %s"
               " AND version = %s", (category, port, version))[0][0] == 1


@reliability
def test_failover_to_a_promoted_standby(cluster, cache, daemon, figures):
    standby = Standby(cluster)
    try:
        add_ports(cluster.dsn, "www/a", "www/b")
        wait_for(lambda: replayed(standby, "www", "b", "1"), what="the standby to catch up")
        both = ("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=lcc"
                " target_session_attrs=read-write connect_timeout=2"
                % (cluster.port, standby.port))
        d = daemon(cache, "--heartbeat", "1", "--again-after", "0", dsn=both)
        d.wait_ready()
        lone = daemon(cache, "--heartbeat", "1", dsn=standby.dsn)      # a standby only
        lone.wait_log("cannot listen: connected to a standby, which cannot LISTEN: point the"
                      " DSN at the primary, or list all hosts with"
                      " target_session_attrs=read-write")
        lone.kill()
        # A change committed and replicated while the daemon cannot act on it.
        old = make_page(cache, "www/a")
        d.proc.send_signal(signal.SIGSTOP)
        try:
            touch_port(cluster.dsn, "www/a")
            wait_for(lambda: replayed(standby, "www", "a", "2"), what="replication")
            cluster.pg_ctl("stop", "-m", "immediate")
            promoted = time.monotonic()
            standby.promote()
        finally:
            d.proc.send_signal(signal.SIGCONT)
        d.wait_log("listening", 2, timeout=60)
        took = time.monotonic() - promoted
        assert "(127.0.0.1:%d)" % standby.port in d.log(), "it names the host it reached"
        wait_for(lambda: not old.exists(), what="the change made before the failover")
        new = make_page(cache, "www/b")
        touch_port(standby.dsn, "www/b")
        wait_for(lambda: not new.exists(), what="a change on the new primary")
    finally:
        standby.stop()
    figures["failover: primary stopped (immediate), standby promoted"] = {
        "committed": 2, "cleared": 2, "wrongly deleted": 0, "restarts survived": 1,
        "reconnect s": "%.1f" % took, "notes": "from promotion to listening; two-host DSN"}


class Bouncer:
    """A real PgBouncer in front of the local PostgreSQL, run as postgres."""

    def __init__(self, dsn, mode):
        self.root = root = Path(tempfile.mkdtemp(prefix="lcc-bouncer-"))
        self.port = free_port()
        user = sql(dsn, "SELECT current_user")[0][0]
        self.dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
        (root / "userlist.txt").write_text('"%s" ""\n' % user)
        (root / "pgbouncer.ini").write_text(
            "[databases]\n* = host=127.0.0.1 port=5432\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\nlisten_port = %d\nunix_socket_dir =\n"
            "auth_type = trust\nauth_file = %s/userlist.txt\npool_mode = %s\n"
            "admin_users = %s\nlogfile = %s/pgbouncer.log\n"
            % (self.port, root, mode, user, root))
        self.as_owner = []
        if os.geteuid() == 0:   # PgBouncer refuses to run as root
            for path in (root, root / "userlist.txt", root / "pgbouncer.ini"):
                shutil.chown(path, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.dsn = "host=127.0.0.1 port=%d user=%s dbname=%s" % (self.port, user, self.dbname)
        self.admin = "host=127.0.0.1 port=%d user=%s dbname=pgbouncer" % (self.port, user)
        self.start()

    def start(self):
        if shutil.which("pgbouncer") is None:
            pytest.fail("PgBouncer is missing: apt-get install pgbouncer", pytrace=False)
        self.proc = subprocess.Popen(self.as_owner + ["pgbouncer", str(self.root /
                                                                     "pgbouncer.ini")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, what="PgBouncer to accept connections")

    def answers(self):
        try:
            sql(self.admin, "SHOW VERSION")
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self):
        """SIGTERM: immediate shutdown (SIGINT would wait for every session)."""
        self.proc.terminate()
        self.proc.wait(timeout=20)

    def close(self):
        if self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def bouncer(db):
    """Start PgBouncers in a given pool mode; stop them at the end."""
    started = []

    def start(mode):
        b = Bouncer(db, mode)
        started.append(b)
        return b
    yield start
    for b in started:
        b.close()


@reliability
def test_session_pooling_carries_listen_and_survives_a_restart(db, cache, daemon, bouncer,
                                                               figures):
    add_ports(db, "www/a")
    b = bouncer("session")
    d = daemon(cache, "--heartbeat", "1", "--again-after", "0", dsn=b.dsn)
    d.wait_ready()
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="a change cleared through PgBouncer")
    b.stop()
    d.wait_log("connection lost")
    b.start()
    back = time.monotonic()
    d.wait_log("listening", 2, timeout=30)
    took = time.monotonic() - back
    page = make_page(cache, "www/a")
    touch_port(db, "www/a", "3")
    wait_for(lambda: not page.exists(), what="a change cleared after the restart")
    assert "rows were due that no notification announced" not in d.log()
    figures["PgBouncer (session pooling) restarted"] = {
        "committed": 2, "cleared": 2, "wrongly deleted": 0, "restarts survived": 1,
        "reconnect s": "%.1f" % took, "notes": "from PgBouncer accepting to listening"}


@reliability
def test_transaction_pooling_is_said_out_loud_and_the_heartbeat_clears(db, cache, daemon,
                                                                       bouncer):
    add_ports(db, "www/a")
    b = bouncer("transaction")
    d = daemon(cache, "--heartbeat", "0.5", "--again-after", "0", dsn=b.dsn)
    d.wait_ready()
    warning = (r"WARNING: rows were due that no notification announced:"
               r" is LISTEN going through PgBouncer in transaction pooling")
    # Now and then a notification still gets through, on whichever server
    # connection the daemon's query lands: changes until two were not.
    for i in range(20):
        page = make_page(cache, "www/a")
        touch_port(db, "www/a", str(i + 5))
        wait_for(lambda: not page.exists(), what="change %d cleared" % i)
        if d.count(warning):
            break
    d.wait_log(warning)
    assert d.count("heartbeat found rows due") >= 2
    assert d.count("WARNING: rows were due that no notification") == 1


def pause(admin, dbname):
    """PAUSE on PgBouncer's console; it returns once resumed, or fails when it stops."""
    try:
        admin.cursor().execute("PAUSE %s" % dbname)
    except psycopg2.Error:
        pass


@reliability
def test_a_paused_pooler_makes_the_clearer_give_up_then_resume(db, cache, daemon, bouncer,
                                                               figures):
    add_ports(db, "www/a")
    b = bouncer("session")
    # Cold clearers: each connects anew, and a paused PgBouncer holds new connections.
    d = daemon(cache, "--heartbeat", "1", "--again-after", "0", "--no-warm", dsn=b.dsn)
    d.wait_ready()
    admin = psycopg2.connect(b.admin)
    admin.autocommit = True
    # PAUSE returns only when every server connection is released, never here:
    # the daemon's session keeps its own.
    threading.Thread(target=pause, args=(admin, b.dbname), daemon=True).start()
    wait_for(lambda: "PAUSE" in (b.root / "pgbouncer.log").read_text() or
             d.proc.poll() is not None, what="PgBouncer to pause")
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    d.wait_log(r"gave up: the server did not answer in 1 s", timeout=20)
    d.wait_log(r"clearer pid \d+ exited with 1; retrying in")
    paused = time.monotonic()
    sql(b.admin, "RESUME %s" % b.dbname)
    wait_for(lambda: not page.exists(), timeout=30, what="the change cleared after RESUME")
    took = time.monotonic() - paused
    figures["PgBouncer paused, then resumed"] = {
        "committed": 1, "cleared": 1, "wrongly deleted": 0,
        "reconnect s": "%.1f" % took, "notes": "clearer gave up after 1 s (heartbeat 1 s);"
        " seconds from RESUME to the page gone"}


@reliability
def test_daemon_killed_and_restarted(db, cache, daemon, figures):
    names = ["www/p%d" % i for i in range(20)]
    add_ports(db, *names)
    d = daemon(cache)
    d.wait_ready()
    d.proc.kill()
    d.proc.wait()
    pages = [make_page(cache, n) for n in names]
    for name in names:
        touch_port(db, name)
    started = time.monotonic()
    again = daemon(cache)
    wait_for(lambda: not any(p.exists() for p in pages), what="changes made while it was down")
    took = time.monotonic() - started
    wait_for(lambda: queued(db) == [], what="the run's commit")     # files go first
    again.wait_log("listening")
    figures["daemon SIGKILLed, changes while down"] = {
        "committed": len(names), "cleared": sum(not p.exists() for p in pages),
        "wrongly deleted": 0, "restarts survived": 1, "reconnect s": "%.2f" % took}


def listening_through(proxy, db, cache, daemon, heartbeat):
    """Five ports, and a daemon reaching the server through proxy, idle after catching up."""
    names = ["www/p%d" % i for i in range(5)]
    add_ports(db, *names)
    d = daemon(cache, "--heartbeat", str(heartbeat), dsn=tcp_dsn(db, proxy.port))
    d.wait_ready(timeout=30)
    return names, d


def assert_recovers(db, cache, d, names, what, timeout=60):
    """Commit a change to each port; all must be cleared.  Returns seconds taken."""
    pages = [make_page(cache, n) for n in names]
    started = time.monotonic()
    for name in names:
        touch_port(db, name)
    wait_for(lambda: not any(p.exists() for p in pages), timeout=timeout, what=what)
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    assert d.proc.poll() is None
    return time.monotonic() - started


@reliability       # also issue 2's frozen-proxy test: both ways, within two heartbeats
@pytest.mark.parametrize("directions", [("up", "down"), ("down",)],
                         ids=["both-ways", "server-to-client"])
def test_frozen_network_is_replaced(db, cache, daemon, proxy, figures, directions):
    names, d = listening_through(proxy, db, cache, daemon, heartbeat=1)
    proxy.freeze(directions)
    # Two heartbeats to notice, the first reconnect's backoff, and slack for a busy machine.
    took = assert_recovers(db, cache, d, names, "recovery from a frozen connection",
                           timeout=2 * 1 + 0.6 + 10)
    assert "no answer from the server" in d.log()
    d.wait_log("listening", 2)
    figures["network frozen, " + " and ".join(
        {"up": "client-to-server", "down": "server-to-client"}[x] for x in directions)] = {
        "committed": len(names), "cleared": len(names), "wrongly deleted": 0,
        "reconnect s": "%.1f" % took, "notes": "heartbeat 1 s"}


@reliability
def test_network_that_stalls_new_connections_too(db, cache, daemon, proxy, figures):
    names, d = listening_through(proxy, db, cache, daemon, heartbeat=1)
    proxy.stall_new = True
    proxy.freeze()
    d.wait_log("cannot listen: no answer", 2, timeout=30)     # connecting never hangs
    proxy.stall_new = False
    took = assert_recovers(db, cache, d, names, "recovery once the network is back")
    figures["network stalled, new connections too, then back"] = {
        "committed": len(names), "cleared": len(names), "wrongly deleted": 0,
        "reconnect s": "%.1f" % took, "notes": "connect attempts time out, then succeed"}


@reliability
def test_slow_network_keeps_working(db, cache, daemon, proxy, figures):
    proxy.delay = 0.2
    names, d = listening_through(proxy, db, cache, daemon, heartbeat=3)
    took = assert_recovers(db, cache, d, names, "changes over a slow network")
    assert "connection lost" not in d.log()
    figures["network with 200 ms latency"] = {
        "committed": len(names), "cleared": len(names), "wrongly deleted": 0,
        "notes": "no reconnect; cleared in %.1f s" % took}


NAME_PARTS = st.sampled_from(["", ".", "..", "/", "//", "../..", "*", "?", "[a]", "www",
                              "a", "\n", "~", "$HOME", "-v", "\\", "é", "x" * 255,
                              "x" * 256])
# Neither PostgreSQL's text nor an argv can hold a NUL or a lone surrogate.
NO_NUL = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
HOSTILE_NAMES = st.one_of(st.text(NO_NUL, max_size=300),
                          st.lists(NAME_PARTS, max_size=4).map("".join),
                          st.builds(lambda p: "/" + p, st.text(NO_NUL, max_size=20)))


@reliability
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(HOSTILE_NAMES, HOSTILE_NAMES), min_size=1, max_size=6),
       explicit=st.booleans())
def test_hostile_names_property(database, pairs, explicit):
    sql(database, "TRUNCATE ports_cache_clearing")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        for name in ("www/a", "a/www", "x/y"):
            make_page(cache, name)
        (root / "outside").mkdir()
        (root / "outside" / "victim").write_text("keep")
        (cache / "www" / "evil").symlink_to(root / "outside")
        before = tree(root)
        if explicit:
            result = clear(*["%s/%s" % p for p in pairs], dsn=database, cache=cache)
        else:
            for category, port in pairs:
                sql(database, "INSERT INTO ports_cache_clearing (category, port)"
                    " VALUES (%s, %s)", (category, port))
            result = clear(dsn=database, cache=cache)
        after = tree(root)
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2) and result.stderr.strip(), result
    allowed = {str(cache / c / p) for c, p in pairs if valid_port(c, p)}
    for path in set(before) | set(after):
        if before.get(path) != after.get(path):
            assert os.path.dirname(path) in allowed, "changed: %r" % path
    if not explicit:
        assert queued(database) == []


@reliability
def test_hostile_filesystem(db, cache, outside, figures):
    (cache / "cat").mkdir()
    odd = {
        "cat/symport": lambda p: p.symlink_to(outside / "p"),
        "cat/fileport": lambda p: p.write_text("a port that is a file"),
        "catlink/p": lambda p: p.parent.symlink_to(outside),
        "catfile/p": lambda p: p.parent.write_text("a category that is a file"),
    }
    for name, make in odd.items():
        make(cache / name)
    page = make_page(cache, "cat/ok")
    (page.parent / "subdir").mkdir()
    (page.parent / "subdir" / "kept.html").write_text("a page inside a directory")
    (page.parent / "link.html").symlink_to(outside / "victim")
    names = list(odd) + ["cat/ok"]
    for name in names:
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES (%s, %s)",
            tuple(name.split("/")))
    # The administrator's symlink to the cache directory is followed.
    admin_link = cache.parent / "cache-link"
    admin_link.symlink_to(cache)
    result = clear(dsn=db, cache=admin_link)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not page.exists() and not os.path.lexists(page.parent / "link.html")
    assert (page.parent / "subdir" / "kept.html").exists()
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == len(odd) + 1, result.stderr     # each oddity, one line
    for expected in ("cat/symport: is a symlink", "cat/fileport: is not a directory",
                     "catlink: is a symlink", "catfile: is not a directory",
                     "cat/ok/subdir: is a directory"):
        assert expected in result.stderr, result.stderr
    assert queued(db) == []
    figures["hostile filesystem (symlinks, files for directories)"] = {
        "committed": len(names), "cleared": len(names), "wrongly deleted": 0,
        "notes": "%d oddities, one warning line each" % len(warnings)}


@reliability
def test_bad_configuration_leaves_the_queue(db, cache, tmp_path, figures):
    add_ports(db, "www/a")
    cache_file = tmp_path / "a-file"
    cache_file.write_text("not a directory")
    cases = {
        "unparsable DSN": (dict(dsn="host='unterminated"), 2),
        "no such database": (dict(dsn=psycopg2.extensions.make_dsn(db, dbname="nope")), 1),
        "no such role": (dict(dsn=psycopg2.extensions.make_dsn(db, user="no_such_role")), 1),
        "cache directory is a file": (dict(dsn=db, cache=cache_file), 2),
    }
    for what, (kwargs, code) in cases.items():
        kwargs.setdefault("cache", cache)
        result = clear(**kwargs)
        assert_one_line_error(result, code)
        assert queued(db) == [("www", "a")], what
    name = "lcc_noschema_%d" % os.getpid()
    sql(db, "CREATE DATABASE %s" % name)
    try:
        assert_one_line_error(clear(dsn=psycopg2.extensions.make_dsn(db, dbname=name),
                                    cache=cache), 1)
    finally:
        drop_database(db, name)
    figures["bad configuration (5 kinds)"] = {
        "wrongly deleted": 0, "notes": "one line and its exit code each, queue untouched"}


@reliability
def test_daemon_retries_database_errors_calmly_without_spinning(db, cache, daemon):
    bad = psycopg2.extensions.make_dsn(db, dbname="no_such_db")
    d = daemon(cache, dsn=bad)
    d.wait_log("cannot listen", 6, timeout=30)
    lines = d.log().strip().splitlines()
    assert all("cannot listen" in line for line in lines), lines
    # One line for the outage, then at most one a minute; each attempt at -v.
    assert len([line for line in lines if "ERROR" in line]) == 1, lines
    delays = [float(x) for x in re.findall(r"retrying in ([\d.]+) s", d.log())]
    assert delays[0] < 1 and min(delays) >= 0.4, delays         # never spins
    assert max(delays) <= 1.6 * 1.2 + 0.05, delays     # back within 2.5 s once it answers
    assert d.proc.poll() is None



# ------------------------------------------------- deployment recipes (contrib/)

def test_the_commands_make_run_prints_show_a_page_go(db, tmp_path):
    """Run as printed, the second after the re-clear: page listed, then the UPDATE clears it."""
    cache, out, err = tmp_path / "cache", tmp_path / "out", tmp_path / "err"
    env = libpq_env(db)
    venv = Path(sys.executable).parent.parent       # the one this suite runs in
    with out.open("w") as stdout, err.open("w") as stderr:
        make = subprocess.Popen(["make", "-s", "run", "CACHE_DIR=%s" % cache,
                                 "VENV=%s" % venv], cwd=HERE, env=env, stdout=stdout,
                                stderr=stderr, start_new_session=True)
    try:
        wait_for(lambda: "listening" in err.read_text(), what="make run's daemon")
        commands = [line.strip() for line in out.read_text().splitlines()
                    if line.startswith("  ")]
        assert len(commands) == 2, out.read_text()
        assert "after those 5 s" in out.read_text()     # the user is told to wait
        subprocess.run(["bash", "-c", commands[0]], cwd=HERE, env=env, check=True)
        # "after those 5 s": the new port's clear and re-clear are done
        wait_for(lambda: not all_queued(db), what="the new port's re-clear")
        page = cache / "www" / "nginx" / "index.html"
        shown = subprocess.run(["bash", "-c", commands[1]], cwd=HERE, env=env, check=True,
                               capture_output=True, text=True).stdout
        assert shown.splitlines()[:2] == ["index.html", "UPDATE 1"]
        wait_for(lambda: not page.exists(), what="the page to go")
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=15)


CONTRIB = HERE / "contrib"


def svstat(service):
    """svstat's one-line report on a service directory."""
    return subprocess.run(["svstat", str(service)], capture_output=True, text=True,
                          check=True).stdout


def up_pid(service):
    """The pid svstat reports for a service that is up, else None."""
    found = re.search(r": up \(pid (\d+)\)", svstat(service))
    return int(found.group(1)) if found else None


def clearers_of(cache):
    """Live clear_cache.py processes working on this cache directory."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path("/proc/%s/cmdline" % pid).read_bytes()
            environ = Path("/proc/%s/environ" % pid).read_bytes()
        except (FileNotFoundError, PermissionError, NotADirectoryError, ProcessLookupError):
            continue
        if CLEAR.encode() in cmdline and ("CLEAR_CACHE_DIR=%s" % cache).encode() in environ:
            found.append(int(pid))
    return found


@pytest.fixture
def service(tmp_path, db, cache):
    """contrib's daemontools service under real supervise processes, log service piped."""
    if shutil.which("supervise") is None:
        pytest.fail("daemontools is missing: apt-get install daemontools", pytrace=False)
    svc = tmp_path / "listen-clear-cache"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    (svc / "env" / "CLEAR_CACHE_DSN").write_text(db + "\n")
    (svc / "env" / "CLEAR_CACHE_DIR").write_text(str(cache) + "\n")
    (svc / "env" / "LCC_HOME").write_text(str(HERE) + "\n")
    (svc / "env" / "LCC_ACCOUNT").write_text("")       # empty: no setuidgid
    assert "categories/{category}/*" in (svc / "env" / "CLEAR_CACHE_PAGES").read_text()
    (svc / "env" / "CLEAR_CACHE_PAGES").write_text("\n")  # empty: the default layout
    reader, writer = os.pipe()      # as svscan connects a service to its log
    env = {"PATH": os.environ["PATH"]}
    log = subprocess.Popen(["supervise", str(svc / "log")], stdin=reader, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main = subprocess.Popen(["supervise", str(svc)], stdout=writer, stderr=writer, env=env)
    os.close(reader)
    os.close(writer)
    yield svc
    for s in (svc, svc / "log"):
        subprocess.run(["svc", "-dx", str(s)], check=False)
    for proc in (main, log):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_daemontools_service_end_to_end(db, cache, service):
    add_ports(db, "www/a")
    current = service / "log" / "main" / "current"
    wait_for(lambda: up_pid(service), what="svstat to report the service up")
    wait_for(lambda: current.exists() and "listening" in current.read_text(),
             what="the daemon's first lines in log/main/current")
    wait_for(lambda: queued(db) == [], what="the catch-up run")

    page = make_page(cache, "www/a")                    # a committed change clears it
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="the change to be cleared")

    page = make_page(cache, "www/b")                    # svc -h flushes without NOTIFY
    queue_quietly(db, "www", "b")
    subprocess.run(["svc", "-h", str(service)], check=True)
    wait_for(lambda: not page.exists(), what="svc -h to flush")

    first = up_pid(service)                             # kill -9: supervise restarts it
    os.kill(first, signal.SIGKILL)
    page = make_page(cache, "www/a", "while-down.html")
    touch_port(db, "www/a", "3")
    wait_for(lambda: up_pid(service) not in (None, first), what="supervise to restart it")
    wait_for(lambda: not page.exists(), what="the change made while it was down")

    subprocess.run(["svc", "-d", str(service)], check=True)     # svc -d stops it
    wait_for(lambda: ": down " in svstat(service), what="svstat to report it down")
    wait_for(lambda: current.read_text().count("stopped") == 1,
             what="the daemon's clean exit (status 0) in the log")
    assert clearers_of(cache) == [], "a clearer was left behind"

    lines = current.read_text().splitlines()
    assert lines and all(re.match(r"@[0-9a-f]{24} \S", line) for line in lines), lines
    ours = [line for line in lines if "listen_clear_cache: " in line]
    assert ours, lines
    for line in lines:      # multilog's stamp, and no second one of the daemon's
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line


def cron_command():
    """The command of contrib's @reboot line."""
    lines = [line for line in (CONTRIB / "cron" / "listen-clear-cache").read_text()
             .splitlines() if line.startswith("@reboot")]
    assert len(lines) == 1
    return lines[0][len("@reboot"):].strip()


def test_cron_line_runs_in_crons_bare_environment(db, cache, tmp_path):
    command = cron_command()
    assert "%" not in command, "cron turns % into a newline"
    log = tmp_path / "logs" / "cron.log"      # the line makes its directory
    for example, real in (("/usr/local/listen_clear_cache", str(HERE)),
                          ("dbname=freshports user=freshports host=/var/run/postgresql",
                           db.replace("'", "")),
                          ("/var/db/freshports/cache", str(cache)),
                          ("/var/log/freshports/listen_clear_cache.log", str(log))):
        assert example in command
        command = command.replace(example, real)
    add_ports(db, "www/a")
    proc = subprocess.Popen(["env", "-i", "PATH=/usr/bin:/bin", "sh", "-c", command], cwd="/")
    lookalike = None
    try:
        wait_for(lambda: log.exists() and "listening" in log.read_text(),
                 what="the daemon started from the cron line")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="a change cleared by the cron-started daemon")
        # The README's pkill commands pick out this daemon alone (env and sh
        # exec'd into it), even beside a younger process with its command
        # line, as a clearer it has forked has until its exec.
        lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                      "listen_clear_cache.py", "--cache-dir", str(cache)])
        flush, stop = readme_pkill("-HUP", cache), readme_pkill("-TERM", cache)
        pgrep = ["pgrep"] + flush[2:]
        assert subprocess.run(pgrep, capture_output=True, text=True).stdout.split() == [
            str(proc.pid)]
        page = make_page(cache, "www/b")
        queue_quietly(db, "www", "b")
        subprocess.run(flush, check=True)
        wait_for(lambda: not page.exists(), what="pkill -HUP to flush")
        subprocess.run(stop, check=True)
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert lookalike.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if lookalike:
            lookalike.kill()
            lookalike.wait()


def readme_pkill(signal_option, cache):
    """The README's cron pkill command for one signal, aimed at this cache directory."""
    lines = [line.split("#")[0] for line in (HERE / "README.md").read_text().splitlines()
             if line.strip().startswith("pkill %s " % signal_option)]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].replace("/var/db/freshports/cache", str(cache)))


def test_systemd_unit_settings():
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str      # systemd keys are case-sensitive
    unit.read(CONTRIB / "systemd" / "listen-clear-cache.service")
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["Restart"] == "always"
    assert 0 < float(service["RestartSec"]) <= 5
    assert service["EnvironmentFile"].startswith("/")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/db/freshports/cache"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["ExecStart"].split()[1].endswith("/listen_clear_cache.py")
    assert "Install" in unit and unit["Install"]["WantedBy"]
    env = (CONTRIB / "systemd" / "listen-clear-cache.env").read_text()
    assert re.search(r"^CLEAR_CACHE_DSN=", env, re.M)
    assert re.search(r"^CLEAR_CACHE_DIR=/var/db/freshports/cache$", env, re.M)
    assert re.search(r"^CLEAR_CACHE_PAGES=ports/\{category\}/\{port\}/\*"
                     r" categories/\{category\}/\*$", env, re.M)
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(
            CONTRIB / "systemd" / "listen-clear-cache.service")], capture_output=True,
            text=True)
        assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr, \
            result.stderr


def run_script(tmp_path, **env):
    """contrib's daemontools run script, run once with env/ holding env; its result."""
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for name, value in env.items():
        (svc / "env" / name).write_text(value + "\n")
    return subprocess.run(["./run"], cwd=svc, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})


def test_daemontools_run_script_says_what_is_wrong_before_starting(tmp_path, cache):
    cases = [({"LCC_ACCOUNT": "no_such_account_lcc"}, "no account no_such_account_lcc"),
             ({"LCC_ACCOUNT": "", "LCC_HOME": str(tmp_path / "nowhere")},
              "cannot run %s/nowhere/.venv/bin/python" % tmp_path),
             ({"LCC_ACCOUNT": "", "LCC_HOME": str(HERE),
               "CLEAR_CACHE_DIR": str(tmp_path / "missing")},
              "cannot write the cache directory %s/missing" % tmp_path)]
    for env, says in cases:
        result = run_script(tmp_path / str(len(says)), **env)
        assert result.returncode == 1, result
        assert len(result.stdout.strip().splitlines()) == 1, result.stdout     # one line
        assert result.stdout.startswith("listen-clear-cache run: ") and says in result.stdout, \
            result.stdout


def test_daemontools_run_script_warns_about_a_readable_secret(tmp_path, cache):
    svc_env = {"LCC_ACCOUNT": "", "LCC_HOME": str(HERE), "CLEAR_CACHE_DIR": str(cache),
               "CLEAR_CACHE_DSN": "host=127.0.0.1 port=%d connect_timeout=1" % free_port()}
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for name, value in svc_env.items():
        (svc / "env" / name).write_text(value + "\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        (svc / "env" / "CLEAR_CACHE_DSN").chmod(mode)
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=subprocess.PIPE, text=True,
                                env={"PATH": os.environ["PATH"]})
        try:
            first = proc.stdout.readline()      # the warning, or the daemon's first line
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        assert ("env/CLEAR_CACHE_DSN is readable by everyone; chmod 600 it" in first) == warned, \
            first


@pytest.fixture
def account(db, tmp_path):
    """An unprivileged account with a role of least privilege, and a checkout it can run."""
    if os.geteuid() != 0:
        pytest.fail("creating an account needs root", pytrace=False)
    name = "lcc_acct_%d" % os.getpid()
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)
    for grant in ["CREATE ROLE %s LOGIN" % name] + GRANTS[1:]:
        sql(db, grant.replace("freshports_cache", name))
    # pyenv's interpreters live in root's mode-700 home: Debian's python3 it is,
    # in a directory the account can read.
    home = Path(tempfile.mkdtemp(prefix="lcc-checkout-"))
    home.chmod(0o755)
    for script in ("clear_cache.py", "listen_clear_cache.py", "requirements.txt"):
        shutil.copy(HERE / script, home / script)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(home / ".venv")], check=True)
    subprocess.run([str(home / ".venv/bin/python"), "-m", "pip", "install", "-q", "-r",
                    str(home / "requirements.txt")], check=True, capture_output=True)
    yield name, home
    shutil.rmtree(home, ignore_errors=True)
    sql(db, "DROP OWNED BY %s; DROP ROLE %s" % (name, name))
    subprocess.run(["userdel", name], check=False)


def test_daemontools_run_script_runs_the_daemon_as_its_account(db, tmp_path, account):
    name, home = account
    add_ports(db, "www/a")
    # Beside the checkout: pytest's own temporary directories are root's alone.
    # setuidgid sets the primary group only: the cache is writable through it.
    cache = home / "cache"
    cache.mkdir()
    shutil.chown(cache, group=name)
    cache.chmod(0o775)
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for var, value in {"LCC_ACCOUNT": name, "LCC_HOME": str(home),
                       "CLEAR_CACHE_DIR": str(cache), "CLEAR_CACHE_PAGES": "",
                       "CLEAR_CACHE_DSN": psycopg2.extensions.make_dsn(db, user=name)}.items():
        (svc / "env" / var).write_text(value + "\n")
    (svc / "env" / "CLEAR_CACHE_DSN").chmod(0o600)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=out, stderr=out,
                                env={"PATH": os.environ["PATH"]})
    try:
        wait_for(lambda: "listening" in log.read_text(), what="the daemon as " + name)
        pid = wait_for(lambda: backends(db, "listen_clear_cache.py"), what="its backend")
        assert sql(db, "SELECT usename FROM pg_stat_activity WHERE pid = %s",
                   (pid[0],)) == [(name,)]
        assert Path("/proc/%d/status" % proc.pid).read_text().count(
            "Uid:\t%d\t" % int(subprocess.run(["id", "-u", name], capture_output=True,
                                               text=True).stdout)) == 1
        page = make_page(cache, "www/a")
        page.parent.chmod(0o777)
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="a change cleared by the account's daemon")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text() and "warning" not in log.read_text(), \
        log.read_text()


def test_daemontools_files_are_complete():
    svc = CONTRIB / "daemontools" / "listen-clear-cache"
    run = (svc / "run").read_text()
    assert os.access(svc / "run", os.X_OK) and os.access(svc / "log" / "run", os.X_OK)
    assert run.index("exec 2>&1") < run.index("exec envdir ./env")
    assert "setuidgid" in run
    assert "exec multilog t" in (svc / "log" / "run").read_text()
    for name in ("CLEAR_CACHE_DSN", "CLEAR_CACHE_DIR", "CLEAR_CACHE_TIMESTAMPS"):
        assert (svc / "env" / name).read_text().strip()


if __name__ == "__main__":
    print_reliability_table()
