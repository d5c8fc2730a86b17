"""clear_cache.py --check, the monitoring plugin."""

import os
import re
import signal
import subprocess
import sys

import psycopg2
import psycopg2.extensions
import pytest

from tests.fixtures.common import wait_for
from tests.fixtures.daemon import clean_env, CLEAR, check
from tests.fixtures.database import all_queued, backends, queue_quietly, sql


# -------------------------------------------------------- the monitoring check

def test_check_reports_ok_warning_and_critical(db, cache, daemon):
    result = check(dsn=db)
    assert result.returncode == 2, result                   # no daemon listens
    assert result.stdout.startswith("CLEAR_CACHE CRITICAL - 0 rows due, oldest due 0 s,"
                                    " 0 listeners; no daemon listens |"
                                    " due=0 oldest=0s;60;300 listeners=0")
    # A DSN's application_name does not rename the daemon: it names itself.
    d = daemon(cache, "--heartbeat", "600", dsn=db + " application_name=renamed")
    d.wait_ready()
    result = check(dsn=db)
    assert result.returncode == 0, result
    assert result.stdout == ("CLEAR_CACHE OK - 0 rows due, oldest due 0 s, 1 listener |"
                             " due=0 oldest=0s;60;300 listeners=1\n")
    queue_quietly(db, "www", "old", ago=90)
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


def one_line_on_stdout(result, status):
    """Nagios: the exit status, and one line on stdout that starts with its word."""
    assert result.returncode == status, result
    assert len(result.stdout.splitlines()) == 1, result
    word = ["OK", "WARNING", "CRITICAL", "UNKNOWN"][status]
    assert result.stdout.startswith("CLEAR_CACHE %s - " % word), result.stdout
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.parametrize("args", [["--warn", "500", "--crit", "100"], ["--crit", "soon"],
                                  ["--bogus"], ["--warn"]])
def test_every_usage_error_of_check_is_unknown_on_stdout(db, args):
    one_line_on_stdout(check(*args, dsn=db), 3)


def test_an_abbreviated_check_is_still_a_check(db):
    env = clean_env()
    result = subprocess.run([sys.executable, CLEAR, "--chec", "--dsn", db, "--crit", "soon"],
                            env=env, capture_output=True, text=True, timeout=60)
    one_line_on_stdout(result, 3)


def test_check_without_a_consumer_checks_every_registered_one(db, cache, daemon, consumers):
    daemons = {}
    for name in consumers:
        (cache / name).mkdir()
        daemons[name] = daemon(cache / name, "--consumer", name, "--heartbeat", "600")
        daemons[name].wait_ready()
    assert one_line_on_stdout(check(dsn=db), 0).startswith(
        "CLEAR_CACHE OK - 0 rows due, oldest due 0 s, 2 listeners |")
    queue_quietly(db, "www", "old", "web1", ago=90)
    line = one_line_on_stdout(check(dsn=db), 1)
    assert "; web1: oldest due 9" in line and "web2" not in line.split("|")[0], line
    daemons["web2"].signal(signal.SIGTERM)
    assert daemons["web2"].wait() == 0
    line = one_line_on_stdout(check(dsn=db), 2)       # the worst wins
    assert "web1: oldest due 9" in line and "web2: no daemon listens" in line, line
    assert "1 listener" in line


def test_check_named_while_none_is_registered_is_critical(db, cache, daemon):
    d = daemon(cache, "--consumer", "web1", "--heartbeat", "600")
    d.wait_log("listening")
    wait_for(lambda: backends(db, "listen_clear_cache.py web1"), what="its connection")
    line = one_line_on_stdout(check("--consumer", "web1", dsn=db), 2)
    assert "consumer 'web1' is not registered in cache_consumers" in line, line


# ------------------------------------------------- a listener is proven, not named

def test_a_session_that_names_itself_like_the_daemon_is_no_listener(db, admin_dsn):
    role = "lcc_forger_%d" % os.getpid()
    sql(admin_dsn, "DROP ROLE IF EXISTS %s; CREATE ROLE %s LOGIN" % (role, role))
    forger = psycopg2.connect(psycopg2.extensions.make_dsn(
        db, user=role, application_name="listen_clear_cache.py"))
    try:
        assert backends(db, "listen_clear_cache.py")
        result = check(dsn=db)
        assert result.returncode == 2 and "0 listeners" in result.stdout, result
    finally:
        forger.close()
        sql(admin_dsn, "DROP ROLE %s" % role)


@pytest.mark.parametrize("names", [("w" * 41 + "-one", "w" * 41 + "-two"),
                                   ("wéb1", "web1"), ("x" * 300, "x" * 299)])
def test_consumers_of_any_name_are_told_apart_and_found(db, cache, daemon, names):
    sql(db, "INSERT INTO cache_consumers VALUES (%s), (%s)", names)
    d = daemon(cache, "--consumer", names[0], "--heartbeat", "600")
    d.wait_ready()
    result = check("--consumer", names[0], dsn=db)
    assert result.returncode == 0 and "1 listener" in result.stdout, result
    result = check("--consumer", names[1], dsn=db)
    assert result.returncode == 2 and "0 listeners" in result.stdout, result


def test_a_monitoring_role_names_the_daemons_role(db, cache, daemon, least):
    d = daemon(cache, "--heartbeat", "600", dsn=least)
    d.wait_ready()
    result = check(dsn=db)      # the test's own role: the daemon is not one of its sessions
    assert result.returncode == 2 and "0 listeners" in result.stdout, result
    role = psycopg2.extensions.parse_dsn(least)["user"]
    result = check("--daemon-role", role, dsn=db)
    assert result.returncode == 0 and "1 listener" in result.stdout, result
    assert check(dsn=least).returncode == 0     # run as the daemon's role: no option


def test_warn_0_with_nothing_due_is_ok(db, cache, daemon):
    d = daemon(cache, "--heartbeat", "600")
    d.wait_ready()
    result = check("--warn", "0", dsn=db)
    assert result.returncode == 0 and result.stdout.startswith("CLEAR_CACHE OK - 0 rows"), result
