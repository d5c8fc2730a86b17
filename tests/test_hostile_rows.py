"""Nothing one row, one file or one writer does stops the rest: values the
clearer cannot use, names in the database's own bytes, a key that keeps
failing, times at the ends of the line, and a log that stays bounded."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from tests.fixtures.common import reliability, wait_for
from tests.fixtures.daemon import (CLEAR, check, clean_env, clear, waiting_clearer,
                                   warm_backends)
from tests.fixtures.database import (add_ports, drop_database, load_schema,
                                     queued, sql, touch_port, waiting_on_lock)
from tests.fixtures.files import PAGE, make_immutable, make_page


@pytest.fixture
def days(db):
    """A queue of days and one of numbers beside ports_cache_clearing."""
    sql(db, "DROP TABLE IF EXISTS q_days, q_nums")
    sql(db, "CREATE TABLE q_days (day date)")
    sql(db, "CREATE TABLE q_nums (n bigint)")
    sql(db, "SELECT cache_clearing_queue('q_days'), cache_clearing_queue('q_nums')")
    yield db
    sql(db, "DROP TABLE IF EXISTS q_days, q_nums")


def config(tmp_path, text):
    path = tmp_path / "queues.ini"
    path.write_text("[ports_cache_clearing]\npages = {category}/{port}/*\n" + text)
    return str(path)


# ------------------------------------------------- values the clearer cannot use

@reliability
@pytest.mark.parametrize("poison", ["10000-01-01", "0044-03-15 BC", "infinity", "-infinity"])
def test_a_date_python_cannot_hold_is_reported_and_the_rest_is_cleared(days, cache, tmp_path,
                                                                       poison, figures):
    add_ports(days, "www/nginx")
    nginx = make_page(cache, "www/nginx")
    fine = make_page(cache, "daily/2026", "2026-11-30.html")
    sql(days, "INSERT INTO q_days (day) VALUES (%s), ('2026-11-30')", (poison,))
    result = clear("--config", config(tmp_path, "[q_days]\npages = daily/{day:%Y}/{day}.html\n"),
                   dsn=days, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # One line, naming the queue and the value as the database prints it.
    said = [line for line in result.stderr.splitlines() if "no page can use" in line]
    assert len(said) == 1 and "q_days:" in said[0] and "day=%s" % poison in said[0], said
    assert not nginx.exists() and not fine.exists()
    assert sql(days, "SELECT count(*) FROM q_days WHERE NOT reclear") == [(0,)]
    # infinity is no day: nothing was named 9999-12-31.
    assert not (cache / "daily" / "9999").exists()
    figures["poison row: date %s beside a port and a day" % poison] = {
        "committed": 3, "cleared": 2, "wrongly deleted": 0,
        "notes": "one line naming q_days and the value; the other two cleared, exit 0"}


def test_a_value_out_of_a_specs_range_is_reported_and_the_rest_is_cleared(days, cache,
                                                                         tmp_path):
    add_ports(days, "www/nginx")
    nginx = make_page(cache, "www/nginx")
    fine = make_page(cache, "chars", "A.html")
    sql(days, "INSERT INTO q_nums (n) VALUES (9999999999), (65)")
    result = clear("--config", config(tmp_path, "[q_nums]\npages = chars/{n:c}.html\n"),
                   dsn=days, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "q_nums: 1 key with a value no page can use, deleted unused: n=9999999999" in \
        result.stderr, result.stderr
    assert not nginx.exists() and not fine.exists()


# ------------------------------------------------------ the database's own bytes

@pytest.fixture
def sql_ascii(admin_dsn):
    """A database whose encoding is SQL_ASCII, as FreshPorts' is, with the schema."""
    name = "lcc_ascii_%d" % os.getpid()
    drop_database(admin_dsn, name)
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE %s ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
                          " TEMPLATE template0" % name)
    conn.close()
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    load_schema(dsn)
    yield dsn
    drop_database(admin_dsn, name)


def test_on_sql_ascii_a_name_with_high_bytes_names_the_file_with_those_bytes(sql_ascii,
                                                                            cache):
    conn = psycopg2.connect(sql_ascii)
    conn.set_client_encoding("LATIN1")      # the bytes as they are
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO ports (category, name) VALUES ('www', %s), ('www', 'nginx')",
                    (b"caf\xe9".decode("latin-1"),))
    conn.close()
    page = cache / "www" / os.fsdecode(b"caf\xe9") / PAGE   # as a PHP renderer writes it
    page.parent.mkdir(parents=True)
    page.write_text("stale")
    nginx = make_page(cache, "www/nginx")
    result = clear(dsn=sql_ascii, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists() and not nginx.exists()
    assert queued(sql_ascii) == []


# ------------------------------------------------------ a key that keeps failing

@reliability
def test_a_failing_key_is_retried_alone_and_the_rest_clears_at_full_speed(db, cache, daemon,
                                                                          figures):
    add_ports(db, "www/stuck", "www/a", "www/b")
    d = daemon(cache, "--heartbeat", "60", "--again-after", "0")
    d.wait_ready()
    stuck = make_page(cache, "www/stuck")
    undo = make_immutable(stuck)
    try:
        touch_port(db, "www/stuck")
        d.wait_log(r'ports_cache_clearing \["www", "stuck"\] failing: cannot remove .*; retrying'
                   r" it alone in")
        took = []
        for name in ("www/a", "www/b"):    # not held up by the failing key's backoff
            page = make_page(cache, name)
            touch_port(db, name)
            started = time.monotonic()
            wait_for(lambda: not page.exists(), timeout=3, what=name + "'s page to go")
            took.append((time.monotonic() - started) * 1000)
        # Its next attempts come on its own backoff, and say nothing more within the minute.
        wait_for(lambda: sql(db, "SELECT coalesce(max(attempts), 0)"
                             " FROM cache_clearing_failures")[0][0] >= 4,
                 timeout=20, what="four attempts")
        assert d.count(r"ERROR.*stuck") == 1, d.log()    # once, counting every clearer's
        assert d.count(r"clearer pid \d+ exited with") == 0, d.log()
        result = check("--warn", "1", "--crit", "3600", dsn=db)
        assert result.returncode == 1, result.stdout
        assert re.search(r'ports_cache_clearing key \["www", "stuck"\] failing for \d+ s',
                         result.stdout), result.stdout
    finally:
        undo()
    # Its cause fixed, it is cleared at its next retry, and said once.
    wait_for(lambda: not stuck.exists(), timeout=40, what="the fixed page to go")
    d.wait_log(r'ports_cache_clearing \["www", "stuck"\]: cleared, after \d+ failed attempts')
    assert sql(db, "SELECT count(*) FROM cache_clearing_failures") == [(0,)]
    assert check(dsn=db).returncode == 0
    figures["failing key (an undeletable page) beside steady changes"] = {
        "committed": 3, "cleared": 3, "wrongly deleted": 0,
        "notes": "the others cleared in %s ms while it failed; one ERROR line for it, one when"
                 " it cleared once fixed" % " and ".join("%.0f" % t for t in took)}


def test_by_hand_a_failing_key_stays_due_and_the_run_exits_1(db, cache):
    add_ports(db, "www/stuck")
    stuck = make_page(cache, "www/stuck")
    undo = make_immutable(stuck)
    try:
        result = clear(dsn=db, cache=cache)
    finally:
        undo()
    assert result.returncode == 1 and "cannot remove %s" % stuck in result.stderr
    assert queued(db) == [("www", "stuck")]


# ------------------------------------------------------ times at the ends of the line

def test_a_row_due_at_infinity_is_never_due_and_said_calmly(db, cache, daemon):
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'never', 'infinity')")
    d = daemon(cache, "--heartbeat", "0.3")
    d.wait_log(r"1 row due at infinity, which is never")
    d.wait_log(r"queue: nothing due", 5)    # five looks, a heartbeat apart: one line a minute
    assert d.count(r"WARNING") == 1, d.log()
    assert "cannot look at the queue" not in d.log()
    assert sql(db, "SELECT count(*) FROM ports_cache_clearing") == [(1,)]


def test_a_row_due_at_minus_infinity_is_due_since_it_was_queued(db):
    sql(db, "ALTER TABLE ports_cache_clearing DISABLE TRIGGER ports_cache_clearing_notify")
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at, queued_at)"
        " VALUES ('www', 'old', '-infinity', now() - interval '90 s')")
    sql(db, "ALTER TABLE ports_cache_clearing ENABLE TRIGGER ports_cache_clearing_notify")
    result = check("--warn", "60", dsn=db)
    assert result.stdout.startswith("CLEAR_CACHE CRITICAL - 1 row due, oldest due 9"), \
        result.stdout       # critical: no listener; due for 90 s, not UNKNOWN


# ------------------------------------------------------ a log that stays bounded

@pytest.mark.parametrize("rows, size", [(20, 5_000_000), (20_000, 2)])
def test_the_log_and_the_memory_stay_bounded_whatever_the_database_holds(db, cache, rows,
                                                                        size):
    sql(db, "INSERT INTO ports_cache_clearing (category, port)"
        " SELECT repeat('/', %s), 'p' || i FROM generate_series(1, %s) AS i", (size, rows))
    proc = subprocess.Popen([sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(cache)],
                            env=clean_env(), stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, stderr[:1000]
    assert len(stderr.encode()) < 64 * 1024, len(stderr)
    assert usage.ru_maxrss < 64 * 1024, usage.ru_maxrss     # KiB: the backlog's target
    assert "%d keys with a value no page can use" % rows in stderr
    assert queued(db) == []


# ------------------------------------------------------ a clearer that stops

@reliability
def test_a_stopped_clearer_is_said_then_killed_and_its_run_retried(db, cache, daemon, figures):
    add_ports(db, "www/a")
    d = daemon(cache, "--heartbeat", "1", "--again-after", "0")
    d.wait_ready()
    pid = waiting_clearer(d)
    wait_for(lambda: warm_backends(db), what="the waiting clearer's connection")
    os.kill(pid, signal.SIGSTOP)        # it takes its word, and does nothing more
    page = make_page(cache, "www/a")
    touch_port(db, "www/a")
    started = time.monotonic()
    d.wait_log(r"clearer pid %d has made no progress for 2 s; it was starting" % pid, timeout=5)
    d.wait_log(r"clearer pid %d has made no progress for 5 s: killing it" % pid, timeout=5)
    d.wait_log(r"clearer pid %d exited with signal 9; retrying in" % pid)
    wait_for(lambda: not page.exists(), what="the page, by the retried run")
    figures["clearer stopped (SIGSTOP) as it took its word"] = {
        "committed": 1, "cleared": 1, "wrongly deleted": 0,
        "reconnect s": "%.1f" % (time.monotonic() - started),
        "notes": "heartbeat 1 s: said after 2 s, killed after 5 s, retried"}


def test_a_clearer_whose_command_runs_within_its_timeout_is_not_killed(db, cache, daemon,
                                                                      tmp_path):
    marker = tmp_path / "done"
    path = tmp_path / "slow.ini"
    path.write_text("[ports_cache_clearing]\npages = {category}/{port}/*\n"
                    "command = sh -c 'sleep 3; touch %s'\ntimeout = 20\n" % marker)
    add_ports(db, "www/a")
    d = daemon(cache, "--config", str(path), "--heartbeat", "0.4", "--again-after", "0")
    d.wait_ready()
    marker.unlink()     # the catch-up run made it
    touch_port(db, "www/a")
    wait_for(marker.exists, timeout=20, what="the slow command to end")
    d.wait_idle()
    assert "no progress" not in d.log() and "signal 9" not in d.log(), d.log()


# ------------------------------------------------------ writers of any isolation level

@contextlib.contextmanager
def serializable_writer(db):
    """A program's "clear later": '' rows inserted under SERIALIZABLE, as fast as one
    connection goes, for the block's length; the list it yields gets how many."""
    stop, counts = threading.Event(), []

    def insert_empty_rows():
        conn = psycopg2.connect(db)
        conn.set_session(isolation_level="SERIALIZABLE")
        n = 0
        while not stop.is_set():
            try:
                with conn, conn.cursor() as cur:
                    cur.execute("INSERT INTO ports_cache_clearing (category, port)"
                                " VALUES ('www', 'busy')")
                n += 1
            except psycopg2.errors.SerializationFailure:
                pass
        conn.close()
        counts.append(n)
    writer = threading.Thread(target=insert_empty_rows, daemon=True)
    writer.start()
    try:
        yield counts
    finally:
        stop.set()
        writer.join(10)


@reliability
def test_serializable_writers_never_starve_a_consumers_clearer(db, tmp_path, daemon,
                                                               consumers, figures):
    add_ports(db, *("www/p%d" % i for i in range(10)))
    caches = {}
    for name in consumers:
        caches[name] = tmp_path / name
        caches[name].mkdir()
        d = daemon(caches[name], "--consumer", name, "--heartbeat", "5")
        d.wait_ready()
        caches[name] = caches[name], d
    with serializable_writer(db) as counts:
        updater = psycopg2.connect(db)
        updater.set_session(isolation_level="SERIALIZABLE")
        for i in range(10):     # a change a second, each cleared on both servers
            pages = [make_page(cache, "www/p%d" % i) for cache, _ in caches.values()]
            with updater, updater.cursor() as cur:
                cur.execute("UPDATE ports SET version = 'x' WHERE name = %s", ("p%d" % i,))
            wait_for(lambda: not any(p.exists() for p in pages), timeout=10,
                     what="change %d cleared on both servers" % i)
        updater.close()
    assert counts and counts[0] > 1000, counts     # the writer was busy throughout
    retries = 0
    for _, d in caches.values():
        d.wait_idle()
        assert d.count(r"clearer pid \d+ exited with") == 0, d.log()
        assert d.count(r"WARNING|ERROR") == 0, d.log()
        retries += d.count(r"INFO: retrying after")
    figures["SERIALIZABLE writers beside two consumers"] = {
        "committed": 10, "cleared": "10 on both caches", "wrongly deleted": 0,
        "notes": "%d '' rows inserted meanwhile by one SERIALIZABLE connection; no run failed,"
                 " %d routine retries" % (counts[0], retries)}


def test_consumers_runs_take_turns_so_that_a_writer_cannot_doom_the_longer(db, tmp_path,
                                                                            consumers):
    # Were web2's run to overlap web1's (held open by its command) and commit,
    # web1's would be the pivot of a read/write cycle, web2's run reading
    # what web1 wrote and web1 the queue the busy writer has since committed
    # to: PostgreSQL cancels it at its commit, all its work lost, and again
    # at every retry that another run overlaps.
    add_ports(db, "www/a")
    started, go = tmp_path / "started", tmp_path / "go"
    slow = config(tmp_path, "command = sh -c 'touch %s; until [ -e %s ]; do sleep 0.05; done'"
                            "\ntimeout = 60\n" % (started, go))
    caches = {name: tmp_path / name for name in consumers}
    pages = [make_page(cache, "www/a") for cache in caches.values()]
    touch_port(db, "www/a")
    runs = {}
    with serializable_writer(db):
        runs["web1"] = subprocess.Popen(
            [sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(caches["web1"]),
             "--config", slow, "--consumer", "web1"],
            env=clean_env(), stderr=subprocess.PIPE, text=True)
        wait_for(started.exists, what="web1's run to be in its command")
        runs["web2"] = subprocess.Popen(
            [sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(caches["web2"]),
             "--consumer", "web2"], env=clean_env(), stderr=subprocess.PIPE, text=True)
        wait_for(lambda: runs["web2"].poll() is not None
                 or waiting_on_lock(db, "clear_cache.py"),
                 what="web2's run to end or to wait for web1's")
        waited = runs["web2"].poll() is None
        go.touch()
        logs = {name: run.communicate(timeout=60)[1] for name, run in runs.items()}
    assert waited, logs
    for name, run in runs.items():
        assert run.returncode == 0, logs[name]
    assert "retrying" not in logs["web1"], logs["web1"]     # the longer run is never doomed
    # PostgreSQL wakes a lock's waiter before it records the holder's commit for
    # SERIALIZABLE (resowner.c: ProcReleaseLocks, then ReleasePredicateLocks): in
    # that moment web2's snapshot may still count web1 as running, and web2, not
    # web1, is cancelled as a pivot during its write (one run in four here).
    # Once: its retry begins after web1 has wholly ended.
    assert logs["web2"].count("retrying") <= 1, logs["web2"]
    assert not any(page.exists() for page in pages)
