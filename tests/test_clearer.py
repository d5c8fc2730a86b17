"""clear_cache.py, the one-off flush: what it removes, and what it never touches."""

import os
import re
import subprocess
import sys

import psycopg2
import psycopg2.extensions
import pytest

from cache_clearing.queues import lock_timeout
from tests.fixtures.common import wait_for
from tests.fixtures.daemon import CLEAR, assert_one_line_error, clear
from tests.fixtures.database import (add_ports, libpq_env, queued, sql, touch_port,
                                     waiting_on_lock)
from tests.fixtures.files import PAGE, make_immutable, make_page, tree


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
    result = clear("--dry-run", "-v", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert str(page) in result.stdout
    assert page.exists()
    assert queued(db) == [("www", "a")]
    # It says what it would do, never that it did; counts agree in number.
    assert "removed" not in result.stderr and "deleted" not in result.stderr, result.stderr
    assert "www/a/*: would remove 1 file\n" in result.stderr, result.stderr
    assert "dry run: would clear 1 port, would remove 1 file; nothing changed" in result.stderr


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
    # One line for them all: a count, and the first few.
    assert ("ports_cache_clearing: %d keys with a value no page can use, deleted unused: "
            "category=''" % len(rows)) in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 2, result.stderr     # that, and the summary
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
    undo = make_immutable(stuck)
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
    undo = [make_immutable(cache / c / p / PAGE) for c, p in stuck]
    try:
        result = clear(dsn=db, cache=cache)
    finally:
        for u in undo:
            u()
    assert result.returncode == 1, result.stderr
    assert sorted(queued(db)) == stuck
    assert [p for p in pages if p.exists()] == [cache / c / p / PAGE for c, p in stuck]
    assert "removed 3997 files" in result.stderr


def flush_beside_a_concurrent_delete(db, cache, *args):
    """A concurrent flush deletes the rows under our feet: 40001, then a clean retry.

    Returns the clearer's exit status and its stderr.
    """
    add_ports(db, "www/a")
    other = psycopg2.connect(db)
    other.set_session(isolation_level="REPEATABLE READ")
    other.cursor().execute("DELETE FROM ports_cache_clearing")
    proc = subprocess.Popen([sys.executable, CLEAR, "--dsn", db, "--cache-dir", str(cache)]
                            + list(args), stderr=subprocess.PIPE, text=True)
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
    return proc.returncode, stderr


def test_serialization_failure_retries_the_transaction(db, cache):
    page = make_page(cache, "www/a")
    status, stderr = flush_beside_a_concurrent_delete(db, cache)
    assert status == 0, stderr
    assert "INFO: retrying after could not serialize access" in stderr
    assert "cleared 1 port, deleted 1 row" in stderr, "the summary counts the last attempt"
    assert not page.exists()
    assert queued(db) == []


def test_a_retry_that_succeeds_is_quiet_with_q(db, cache):
    status, stderr = flush_beside_a_concurrent_delete(db, cache, "-q")
    assert status == 0 and stderr == "", stderr


def test_a_lock_timeout_never_rounds_to_no_limit():
    # 0 would mean "wait forever": a heartbeat under 2 ms made the daemon's 0.
    assert lock_timeout(0.0004) == "1ms" and lock_timeout(1.5) == "1500ms"


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


def test_a_run_says_the_re_clears_it_queued_and_when_they_are_due(db, cache):
    add_ports(db, "www/a", "www/b")
    result = clear(dsn=db, cache=cache, env={"CLEAR_CACHE_AGAIN_AFTER": "7"})
    assert result.returncode == 0, result.stderr
    assert re.search(r"cleared 2 ports, deleted 2 rows, removed 0 files in \d+ ms,"
                     r" 2 re-clears due in 7 s: ports_cache_clearing ", result.stderr), \
        result.stderr
