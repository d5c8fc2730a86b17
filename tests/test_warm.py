"""The waiting (warm) clearer the daemon keeps started ahead."""

import os
import signal
from pathlib import Path

from tests.fixtures.common import wait_for
from tests.fixtures.daemon import alive, clearer_children, waiting_clearer, warm_backends
from tests.fixtures.database import add_ports, queued, sql, touch_port
from tests.fixtures.files import make_page


# ------------------------------------------------------- the warm clearer

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


def test_a_repointed_cache_symlink_is_the_one_cleared(db, cache, daemon):
    """The waiting clearer opens the cache directory after its word, not before."""
    add_ports(db, "www/a")
    old, new = cache / "old", cache / "new"
    old.mkdir()
    new.mkdir()
    link = cache / "current"
    link.symlink_to(old)
    d = daemon(link, "--heartbeat", "600", "--again-after", "0")
    d.wait_ready()
    waiting_clearer(d)
    wait_for(lambda: warm_backends(db), what="the waiting clearer's connection")
    stays, goes = make_page(old, "www/a"), make_page(new, "www/a")
    link.unlink()
    link.symlink_to(new)        # the operator repoints the cache
    touch_port(db, "www/a")
    wait_for(lambda: not goes.exists(), what="the new cache's page to go")
    wait_for(lambda: queued(db) == [], what="the queue to drain")
    assert stays.exists()


def test_a_failed_warm_up_is_a_warning(db, cache, daemon):
    sql(db, "ALTER TABLE ports_cache_clearing RENAME TO renamed")
    try:
        d = daemon(cache, "--heartbeat", "600")
        d.wait_log(r"clear_cache: WARNING: cannot prepare ahead, connecting again at the run:"
                   r" relation \"ports_cache_clearing\" does not exist")
    finally:
        sql(db, "ALTER TABLE renamed RENAME TO ports_cache_clearing")
