"""Several web servers, each with its own cache and daemon."""

import os
import signal
import subprocess
import sys
import threading

import psycopg2
import pytest

from tests.fixtures.common import wait_for
from tests.fixtures.daemon import CLEAR, LISTEN, assert_one_line_error, check, clear
from tests.fixtures.database import add_ports, all_queued, queued, sql, touch_port
from tests.fixtures.files import make_page


# ------------------------------------------------ several web servers

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


def test_a_rename_queues_the_old_pair_for_each_registered_consumer(db, consumers):
    add_ports(db, "www/a")
    sql(db, "DELETE FROM ports_cache_clearing")
    sql(db, "UPDATE ports SET name = 'b' WHERE name = 'a'")
    assert sorted(sql(db, "SELECT consumer, category, port FROM ports_cache_clearing")) == [
        ("web1", "www", "a"), ("web1", "www", "b"), ("web2", "www", "a"), ("web2", "www", "b")]


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


def test_a_daemon_named_while_none_is_registered_says_so(db, cache, daemon):
    add_ports(db, "www/a")
    d = daemon(cache, "--consumer", "web1", "--heartbeat", "0.5", "--again-after", "0")
    d.wait_log(r"ERROR: consumer 'web1' is not registered in cache_consumers")
    d.wait_log(r"consumer 'web1' is not registered", 3)
    assert d.count(r"ERROR: consumer 'web1'") == 1, "at most one line a minute"
    assert "queue: nothing due" not in d.log()
    assert d.runs() == 0 and queued(db) == [("www", "a")]


def test_a_flush_named_while_none_is_registered_exits_2(db, cache):
    add_ports(db, "www/a")
    result = clear("--consumer", "web1", dsn=db, cache=cache)
    assert_one_line_error(result, 2)
    assert "consumer 'web1' is not registered in cache_consumers" in result.stderr
    assert queued(db) == [("www", "a")]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_reserved_name_later_is_refused(db, cache, how):
    args, env = (["--consumer", "later"], {}) if how == "option" else (
        [], {"CLEAR_CACHE_CONSUMER": "later"})
    for script in (CLEAR, LISTEN):
        result = subprocess.run([sys.executable, script, "--dsn", db, "--cache-dir",
                                 str(cache)] + args, capture_output=True, text=True,
                                timeout=30, env=dict(os.environ, **env))
        assert_one_line_error(result, 2)
        assert "'later'" in result.stderr and "reserved" in result.stderr


def test_a_routine_retry_between_two_web_servers_is_quiet(db, cache, consumers):
    """Two consumers' runs overlap: any retry is info, hidden by -q; each succeeds."""
    add_ports(db, *("www/p%d" % i for i in range(50)))
    caches = {}
    for name in consumers:
        caches[name] = cache / name
        caches[name].mkdir()
    for round in range(8):
        sql(db, "UPDATE ports SET version = %s", (str(round),))
        procs = [subprocess.Popen([sys.executable, CLEAR, "-q", "--dsn", db, "--cache-dir",
                                   str(caches[name]), "--consumer", name, "--again-after", "0"],
                                  stderr=subprocess.PIPE, text=True) for name in consumers]
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0 and stderr == "", stderr
    assert queued(db) == []



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


# -------------------------------------------------- from one server to two

def test_adding_servers_waits_for_an_open_writer_and_strands_nothing(db):
    add_ports(db, "www/a")
    sql(db, "DELETE FROM ports_cache_clearing")
    writer = psycopg2.connect(db)
    with writer.cursor() as cur:     # open across the procedure, committed later
        cur.execute("UPDATE ports SET version = '2' WHERE name = 'a'")
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'before')")
    done = threading.Event()

    def procedure():
        conn = psycopg2.connect(db)
        with conn, conn.cursor() as cur:    # the README's block, as one transaction
            cur.execute("SELECT cache_clearing_add_consumers('web1', 'web2')")
        conn.close()
        done.set()
    threading.Thread(target=procedure, daemon=True).start()
    wait_for(lambda: sql(db, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
             what="the procedure to wait for the writer")
    assert not done.is_set()
    writer.commit()
    writer.close()
    wait_for(done.is_set, what="the procedure to end")
    rows = sql(db, "SELECT port, consumer FROM ports_cache_clearing ORDER BY port, consumer")
    assert rows == [("a", "web1"), ("a", "web2"), ("before", "web1"), ("before", "web2")]
    assert check(dsn=db).stdout.count("stranded") == 0


def test_check_says_rows_left_for_no_one_are_stranded(db, consumers):
    # As a writer whose snapshot predates the names leaves it: not fanned out.
    sql(db, "ALTER TABLE ports_cache_clearing DISABLE TRIGGER USER")
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'lost')")
    sql(db, "ALTER TABLE ports_cache_clearing ENABLE TRIGGER USER")
    result = check(dsn=db)
    assert result.returncode == 2, result.stdout
    assert "1 row stranded for consumer ''" in result.stdout, result.stdout
