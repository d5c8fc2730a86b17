"""Re-clears and rows due later."""

import os
import subprocess
import sys

import pytest

from tests.fixtures.common import wait_for
from tests.fixtures.daemon import CLEAR, LISTEN, assert_one_line_error, clear
from tests.fixtures.database import add_ports, all_queued, queued, sql, touch_port
from tests.fixtures.files import make_page


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
    assert "1 key with a value no page can use, would be deleted: category='..', port='x'" in \
        result.stderr, result.stderr
    assert queued(db) == [("..", "x")]
