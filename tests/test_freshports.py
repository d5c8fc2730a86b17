"""FreshPorts, the worked example: its own schema, adopt.sql and the .ini, for real.

The schema is contrib/freshports/subset.sql, a faithful subset of FreshPorts'.
"""

import datetime
import os
import re
import subprocess

import psycopg2.extensions
import pytest

from tests.fixtures.common import HERE, wait_for
from tests.fixtures.daemon import clear, warm_backends
from tests.fixtures.database import create_database, drop_database, scratch_roles, sql

CONTRIB = HERE / "contrib" / "freshports"
SITE = (HERE / "contrib" / "freshports" / "subset.sql").read_text()


@pytest.fixture(scope="module")
def freshports_db(admin_dsn):
    name = "lcc_freshports_%d" % os.getpid()
    yield create_database(admin_dsn, name, CONTRIB / "adopt.sql", site=SITE)
    drop_database(admin_dsn, name)


@pytest.fixture
def site(freshports_db, cache, daemon, tmp_path):
    """The daemon on adopt.sql and the .ini, its command replaced by a harmless one."""
    for table in ("cache_clearing_ports", "cache_clearing_dates", "cache_clearing_commits",
                  "packages_cache_clearing", "news_cache_clearing"):
        sql(freshports_db, "DELETE FROM %s" % table)
    marker = tmp_path / "rolled-back"
    ini = (CONTRIB / "listen_clear_cache.ini").read_text().replace(
        "/sbin/zfs rollback -r zroot/freshports/cache/packages@empty",
        "/usr/bin/touch %s" % marker)
    config = tmp_path / "listen_clear_cache.ini"
    config.write_text(ini)
    d = daemon(cache, "--config", str(config), "--again-after", "0", "--heartbeat", "600",
               dsn=freshports_db)
    d.wait_ready()
    return freshports_db, d, marker, config


def pages(cache, *paths):
    made = []
    for path in paths:
        page = cache / path
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("<html>%s</html>" % path)
        made.append(page)
    return made


def test_adopt_sql_leaves_freshports_writes_working_and_its_old_queue_alone(site):
    db, _, _, _ = site
    # adopt.sql left cache_clearing_files (unfinished in fp-listen) as it was.
    assert sql(db, "SELECT count(*) FROM pg_trigger WHERE tgname = 'cache_clearing_files_notify'"
               ) == [(0,)]
    assert sql(db, "UPDATE ports SET version = '2'") == 3


def test_freshports_on_conflict_statements_run_and_drop_no_change(freshports_db):
    db = freshports_db
    for table in ("cache_clearing_ports", "cache_clearing_commits"):
        sql(db, "DELETE FROM %s" % table)
    for _ in range(2):      # a change while an older row for the same key is queued
        sql(db, "INSERT INTO cache_clearing_ports (port_id, category, port, due_at)"
            " SELECT PA.id, PA.category, PA.name, now() + interval '1 h' FROM ports_all PA"
            " WHERE PA.name = 'nginx'"
            " ON CONFLICT ON CONSTRAINT cache_clearing_ports_category_port_idx DO NOTHING")
        sql(db, "INSERT INTO cache_clearing_commits (commit_to_clear, due_at)"
            " VALUES ('abc123', now() + interval '1 h')"
            " ON CONFLICT ON CONSTRAINT cache_clearing_commits_idx DO NOTHING")
    assert sql(db, "SELECT (SELECT count(*) FROM cache_clearing_ports),"
               " (SELECT count(*) FROM cache_clearing_commits)") == [(2, 2)]
    for table in ("cache_clearing_ports", "cache_clearing_commits"):
        sql(db, "DELETE FROM %s" % table)


def test_a_port_updated_then_deleted_keeps_its_queued_rows(site, cache):
    db, d, _, _ = site
    d.wait_idle()
    sql(db, "INSERT INTO element (name) VALUES ('gone');"
        " INSERT INTO ports (element_id, category_id, version)"
        " SELECT e.id, c.id, '1' FROM element e, categories c"
        " WHERE e.name = 'gone' AND c.name = 'www'")
    d.wait_idle()
    page, = pages(cache, "ports/www/gone/index.html")
    sql(db, "BEGIN; UPDATE ports SET version = '2' WHERE element_id = (SELECT id FROM element"
        " WHERE name = 'gone'); DELETE FROM ports WHERE element_id = (SELECT id FROM element"
        " WHERE name = 'gone'); COMMIT")
    wait_for(lambda: not page.exists(), what="the deleted port's page")


def test_a_port_update_clears_its_pages_its_category_and_the_news(site, cache):
    db, d, _, _ = site
    gone = pages(cache, "ports/www/nginx/Detail.html", "categories/www/www.html", "news/a.html")
    kept = pages(cache, "ports/net/curl/Detail.html", "categories/net/net.html")
    sql(db, "UPDATE ports SET version = '2' WHERE id = 1")
    wait_for(lambda: not any(p.exists() for p in gone), what="nginx, www and the news")
    d.wait_idle()
    assert all(p.exists() for p in kept)
    wait_for(lambda: sql(db, "SELECT count(*) FROM cache_clearing_ports") == [(0,)], what="the queue to drain")


def test_the_waiting_clearer_serves_every_queue(site, cache):
    db, d, _, _ = site
    d.wait_idle()       # the start's run (a listen channel's queue is due once)
    wait_for(lambda: warm_backends(db), what="a waiting clearer, connected")
    gone = pages(cache, "ports/www/nginx/Detail.html", "daily/2026/11/30.daily.head")
    sql(db, "UPDATE ports SET version = '3' WHERE id = 1; SET TimeZone = 'UTC';"
        " INSERT INTO commit_log (message_id, commit_date) VALUES ('c@d', '2026-11-30 08:00+00')")
    wait_for(lambda: not any(p.exists() for p in gone), what="both queues' pages")
    d.wait_log(r"word given to the waiting clearer")
    assert "lost the waiting clearer" not in d.log() and "ERROR" not in d.log(), d.log()


def test_a_new_dependency_clears_both_ports(site, cache):
    db, _, _, _ = site
    gone = pages(cache, "ports/net/curl/Detail.html", "ports/net/wget/Detail.html")
    kept = pages(cache, "ports/www/nginx/Detail.html")
    sql(db, "INSERT INTO port_dependencies VALUES (2, 3, 'B')")
    wait_for(lambda: not any(p.exists() for p in gone), what="both ports' pages")
    assert all(p.exists() for p in kept)


def test_a_commit_clears_its_days_pages_and_no_other_days(site, cache):
    db, d, _, _ = site
    gone = pages(cache, "daily/2026/11/30.daily.head", "news/x.html")
    kept = pages(cache, "daily/2026/11/29.daily.head", "daily/2026/10/30.daily.head")
    sql(db, "SET TimeZone = 'UTC'; INSERT INTO commit_log (message_id, commit_date)"
        " VALUES ('a@b', '2026-11-30 12:00+00')")
    wait_for(lambda: not any(p.exists() for p in gone), what="the day's pages")
    d.wait_idle()
    assert all(p.exists() for p in kept)


def test_a_queued_commit_removes_its_directory_and_sanity_pages(site, cache):
    db, d, _, _ = site
    gone = pages(cache, "commits/abc123/index.html", "commits/abc123/files.html",
                 "general/sanity_test_failures.abc123.html",
                 "general/sanity_test_failures.PageSize50.html")
    kept = pages(cache, "commits/def456/index.html",
                 "general/sanity_test_failures.def456.html")
    # The same commit twice: the primary key that refused that now takes the row's id.
    sql(db, "INSERT INTO cache_clearing_commits (commit_to_clear) VALUES ('abc123'), ('abc123')")
    # One run removes them in turn (the directory first): wait for all of them.
    wait_for(lambda: not any(p.exists() for p in gone), what="the commit's pages")
    assert not (cache / "commits" / "abc123").exists()
    d.wait_idle()
    assert all(p.exists() for p in kept)
    wait_for(lambda: sql(db, "SELECT count(*) FROM cache_clearing_commits") == [(0,)], what="the queue")


def test_an_svn_era_commit_removes_the_directory_freshports_names(site, cache):
    db, d, _, _ = site
    message_id = "201905171345.x4HDjK1a012345@repo.freebsd.org"
    gone = pages(cache, "commits/201905171345-x4hdjk1a012345-repo-freebsd-org/index.html")
    kept = pages(cache, "commits/%s/index.html" % message_id)   # no renderer writes that
    sql(db, "INSERT INTO cache_clearing_commits (commit_to_clear) VALUES (%s)", (message_id,))
    wait_for(lambda: not gone[0].exists(), what="the directory _CleanKey names")
    d.wait_idle()
    assert kept[0].exists()


def test_the_packages_import_rolls_the_packages_cache_back_unchanged(site, cache):
    db, d, marker, _ = site
    wait_for(marker.exists, what="the packages command, once at start")
    d.wait_idle()
    marker.unlink()
    news = pages(cache, "news/index.html")[0]
    sql(db, "NOTIFY packages_imported")     # as the import does
    wait_for(marker.exists, what="the packages command, on NOTIFY packages_imported")
    wait_for(lambda: sql(db, "SELECT count(*) FROM packages_cache_clearing") == [(0,)],
             what="its row gone")
    d.wait_idle()
    assert news.exists(), "news/ stays, as with fp-listen"


@pytest.mark.parametrize("channel", ["category_new", "ports_updating", "ports_moved", "vuxml"])
def test_a_channel_with_no_queue_clears_the_news(site, cache, channel):
    db, d, _, _ = site
    d.wait_idle()
    news, port = pages(cache, "news/index.html", "ports/www/nginx/index.html")
    sql(db, "NOTIFY %s" % channel)
    wait_for(lambda: not news.exists(), what="news/ on NOTIFY " + channel)
    d.wait_idle()
    assert port.exists()


def test_a_failing_packages_command_keeps_its_row(freshports_db, cache, daemon, tmp_path):
    for table in ("cache_clearing_ports", "packages_cache_clearing"):
        sql(freshports_db, "DELETE FROM %s" % table)
    config = tmp_path / "failing.ini"
    config.write_text((CONTRIB / "listen_clear_cache.ini").read_text().replace(
        "/sbin/zfs rollback -r zroot/freshports/cache/packages@empty", "/bin/false"))
    d = daemon(cache, "--config", str(config), "--heartbeat", "600", dsn=freshports_db)
    d.wait_ready()
    # Due once at start (a packages_imported may have been missed); it is retried alone, on a backoff of its own: the other queues clear meanwhile.
    d.wait_log(r"packages_cache_clearing \[\] failing: command /bin/false: exited with 1;"
               r" retrying it alone in")
    assert sql(freshports_db, "SELECT count(*) FROM packages_cache_clearing") == [(1,)]
    assert "clearer pid" not in "".join(re.findall(r".*exited with.*", d.log()))


def test_a_commit_by_hand(site, cache):
    db, _, _, config = site
    gone = pages(cache, "commits/0123abcd/index.html")
    result = clear("--config", str(config), "--queue", "cache_clearing_commits",
                   "commit_to_clear=0123abcd", "commit_dir=0123abcd",   # generated: given too
                   dsn="host=/nonexistent", cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in gone)


def test_a_date_by_hand(site, cache):
    db, _, _, config = site
    gone = pages(cache, "daily/2026/11/30.daily.head")
    result = clear("--config", str(config), "--queue", "cache_clearing_dates",
                   "date_to_clear=" + datetime.date(2026, 11, 30).isoformat(),
                   dsn="host=/nonexistent", cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in gone)


@pytest.fixture
def two_owners(admin_dsn):
    """FreshPorts as its DDL has it: dan owns the queues, postgres cache_clearing_commits;
    the roles cache_clearer, commits and www.  {role: DSN}, and the admin's name."""
    with scratch_roles(admin_dsn, "fp", ("dan", "cache_clearer", "commits", "www"), "dan") as (
            base, roles, dsns):
        yield from freshports_as_published(admin_dsn, base, roles, dsns)


def freshports_as_published(admin_dsn, base, roles, dsns):
    """The subset with its owners and the site's own grants."""
    sql(base, SITE)
    for table, in sql(base, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                      " AND tablename <> 'cache_clearing_commits'"):
        sql(base, "ALTER TABLE %s OWNER TO %s" % (table, roles["dan"]))
    sql(base, "ALTER VIEW ports_all OWNER TO %s" % roles["dan"])
    # The site's own grants: the import updates ports.
    sql(base, "GRANT SELECT, UPDATE ON ports, element, categories, ports_all TO %s"
        % roles["commits"])
    yield dsns, sql(admin_dsn, "SELECT current_user")[0][0], roles


def psql_file(dsn, path, **variables):
    argv = ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(path)]
    for name, value in variables.items():
        argv[1:1] = ["-v", "%s=%s" % (name, value)]
    return subprocess.run(argv, capture_output=True, text=True)


def test_adoption_with_freshports_owners_and_roles(two_owners, cache, daemon, tmp_path):
    dsns, admin, roles = two_owners
    assert psql_file(dsns["dan"], HERE / "schema.sql").returncode == 0
    grants = dict(daemon=roles["cache_clearer"], commits=roles["commits"], www=roles["www"])
    result = psql_file(dsns["dan"], CONTRIB / "adopt.sql", **grants)
    said = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(said) == 1, result.stderr
    fix = "ALTER TABLE cache_clearing_commits OWNER TO %s" % roles["dan"]
    assert said[0].endswith("as %s, run: %s; then run adopt.sql again" % (admin, fix)), said
    sql(psycopg2.extensions.make_dsn(dsns["dan"], user=admin), fix)
    result = psql_file(dsns["dan"], CONTRIB / "adopt.sql", **grants)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The daemon as cache_clearer, the import as commits: nothing but their grants.
    config = tmp_path / "fp.ini"
    config.write_text((CONTRIB / "listen_clear_cache.ini").read_text().replace(
        "/sbin/zfs rollback -r zroot/freshports/cache/packages@empty", "/bin/true"))
    d = daemon(cache, "--config", str(config), "--heartbeat", "600", dsn=dsns["cache_clearer"])
    d.wait_ready()
    d.wait_idle()
    port, news = pages(cache, "ports/www/nginx/index.html", "news/index.html")
    sql(dsns["commits"], "UPDATE ports SET version = '9' WHERE id = (SELECT id FROM ports_all"
        " WHERE name = 'nginx')")
    wait_for(lambda: not port.exists() and not news.exists(), what="the port's pages")
    news, = pages(cache, "news/index.html")
    sql(dsns["www"], "NOTIFY vuxml")
    wait_for(lambda: not news.exists(), what="news/ on NOTIFY vuxml")
    d.wait_idle()
    assert "permission denied" not in d.log() and "ERROR" not in d.log(), d.log()
