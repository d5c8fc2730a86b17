"""Fixtures and helpers for the tests: a real PostgreSQL, real files, real processes.

    make test

The suite creates a scratch database, loads schema.sql into it with psql,
and drops it at the end.  Without a reachable PostgreSQL it fails; it never
skips.  Every wait is a poll with a deadline.
"""

import importlib.util
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

HERE = Path(__file__).resolve().parent
CLEAR = str(HERE / "clear_cache.py")
LISTEN = str(HERE / "listen_clear_cache.py")
SCHEMA = str(HERE / "schema.sql")
ADMIN_DSNS = [os.environ.get("TEST_ADMIN_DSN", "dbname=postgres"),
              "dbname=postgres user=postgres"]
PAGE = "Detail.Part1.head.PageSize100.PageNum1.html"
# make's helper for the checkout's own PostgreSQL: where its binaries are, and
# whom a server belongs to when we are root.
_spec = importlib.util.spec_from_file_location("make_pg", HERE / "contrib" / "make" / "pg.py")
make_pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_pg)
CI = os.environ.get("CI") == "true"     # .ci/run sets it: there, every test must run


# ---------------------------------------------------------------- helpers

def require(available, what, how):
    """Skip a test that needs a missing system tool, saying so; under CI=true, fail it."""
    if not available:
        message = "%s is missing: %s" % (what, how)
        if CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


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


def typed(env):
    """env as a user's shell would hold it: nothing of the make that runs this suite."""
    return {k: v for k, v in env.items() if not k.startswith(("MAKE", "MFLAGS", ".MAKE"))
            and k not in ("VENV", "PYTHON", "ARGS", "PG")}


def copy_checkout(dest):
    """Copy what git would ship, as it stands in the working tree, to dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=HERE,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (HERE / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / name, dest / name)
    return dest


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


def server_location(dsn):
    """The host (or socket directory) and port at which dsn reached its server."""
    conn = psycopg2.connect(dsn)
    try:
        return conn.info.host, conn.info.port
    finally:
        conn.close()


class Proxy:
    """A TCP proxy to dsn's PostgreSQL that can freeze: sockets stay open, nothing moves."""

    def __init__(self, dsn, port=0):
        host, server_port = server_location(dsn)
        if host.startswith("/"):
            self.upstream = socket.AF_UNIX, "%s/.s.PGSQL.%d" % (host, server_port)
        else:
            self.upstream = (socket.AF_INET6 if ":" in host else socket.AF_INET,
                             (host, server_port))
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
                server = socket.socket(self.upstream[0])
                server.connect(self.upstream[1])
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


def server_bindir(dsn):
    """Where initdb, pg_ctl and pg_basebackup of the server under test's major version are."""
    major = int(sql(dsn, "SHOW server_version_num")[0][0]) // 10000
    found = [shutil.which(p) for p in ("pg_ctl", "pg_config")]
    for bindir in [str(make_pg.BINDIR), "/usr/lib/postgresql/%d/bin" % major] + [
            os.path.dirname(os.path.realpath(p)) for p in found if p]:
        try:
            version = subprocess.run([os.path.join(bindir, "postgres"), "--version"],
                                     capture_output=True, text=True).stdout
        except OSError:
            continue
        if re.search(r"\(PostgreSQL\) %d\b" % major, version):
            return bindir
    require(False, "PostgreSQL %d's initdb, pg_ctl and pg_basebackup" % major,
            "install the server's own binaries, or test against the checkout's (PG=embedded)")


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
            # Named in full, so that a child with another environment reaches the same server.
            host, port = server_location(dsn)
            return psycopg2.extensions.make_dsn(dsn, host=host, port=port)
        errors.append("%r: role may not create databases" % dsn)
    raise RuntimeError("no PostgreSQL reachable (set PGHOST/PGPORT/PGUSER or"
                       " TEST_ADMIN_DSN): " + "; ".join(errors))


@pytest.fixture(scope="session")
def admin_dsn():
    try:
        return find_admin_dsn()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


def create_database(admin_dsn, name, *files, site=None):
    """Create database name with the site's own SQL, then schema.sql and files; its DSN."""
    drop_database(admin_dsn, name)
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE %s" % name)
    conn.close()
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    if site:
        sql(dsn, site)
    load_schema(dsn, *files)
    return dsn


def load_schema(dsn, *files):
    """Load schema.sql (and files) the way the README says: psql -v ON_ERROR_STOP=1 -f."""
    argv = ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", SCHEMA]
    for name in files:
        argv += ["-f", str(name)]
    result = subprocess.run(argv, capture_output=True, text=True)
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
    """The scratch database, emptied for this test, and no consumer left registered after it."""
    sql(database, "TRUNCATE ports, ports_cache_clearing, cache_consumers RESTART IDENTITY")
    yield database
    sql(database, "DELETE FROM cache_consumers")


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
def proxy(database):
    """A freezable TCP proxy in front of the PostgreSQL under test."""
    p = Proxy(database)
    yield p
    p.close()


# ------------------------------------------------ shared by several files

FRESHPORTS = ["--pages", "ports/{category}/{port}/*", "--pages", "categories/{category}/*"]


GRANTS = [line[len("--   "):] for line in Path(SCHEMA).read_text().splitlines()
          if line.startswith("--   ") and line.rstrip().endswith(";")]


def check(*args, dsn):
    """Run clear_cache.py --check, without a cache directory; return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEAR_CACHE_")}
    return subprocess.run([sys.executable, CLEAR, "--check", "--dsn", dsn] + list(args),
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def consumers(db):
    """Register web1 and web2 (db unregisters them at the end)."""
    sql(db, "INSERT INTO cache_consumers VALUES ('web1'), ('web2')")
    return ["web1", "web2"]


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
