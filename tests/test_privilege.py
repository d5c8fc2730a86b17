"""Least privilege: the grants schema.sql documents are enough."""

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from tests.fixtures.common import wait_for
from tests.fixtures.daemon import check, clear
from tests.fixtures.database import GRANTS, add_ports, all_queued, queued, sql, touch_port
from tests.fixtures.files import make_immutable, make_page


# ---------------------------------------------------------- least privilege

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


def test_least_privilege_is_enough_for_a_key_retried_alone(db, cache, daemon, least):
    add_ports(db, "www/stuck")
    d = daemon(cache, "--heartbeat", "60", dsn=least)
    d.wait_ready()
    page = make_page(cache, "www/stuck")
    undo = make_immutable(page)
    try:
        touch_port(db, "www/stuck")
        d.wait_log(r"failing: cannot remove .*; retrying it alone in")
    finally:
        undo()
    wait_for(lambda: not page.exists(), timeout=30, what="the page, once it can go")
    d.wait_log(r"cleared, after \d+ failed attempt")
    assert "permission denied" not in d.log(), d.log()
