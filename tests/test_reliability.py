"""The reliability campaign (make reliability): faults provoked for real."""

import os
import random
import re
import signal
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cache_clearing.templates import valid_name
from tests.fixtures.common import make_pg, reliability, wait_for
from tests.fixtures.daemon import (assert_one_line_error, clear, clearer_children,
                                   waiting_clearer, warm_backends)
from tests.fixtures.database import (add_ports, drop_database, load_schema, queued,
                                     server_bindir, sql, tcp_dsn, touch_port)
from tests.fixtures.files import make_page, tree
from tests.fixtures.proxy import free_port


# ------------------------------------------- reliability (make reliability)
#
# These push hard and record their figures in reliability.json, which
# `make reliability` prints as the README's table.

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


class Cluster:
    """A private PostgreSQL cluster in a temporary directory, on a spare port."""

    def __init__(self, bindir):
        # Not below pytest's tmp_path: the server's account could not reach it.
        self.root = root = Path(tempfile.mkdtemp(prefix="lcc-cluster-"))
        self.dir = root / "pgdata"
        self.port = free_port()
        self.bindir = bindir
        self.as_owner = make_pg.as_account()     # PostgreSQL refuses to run as root
        if self.as_owner:
            os.chown(root, self.as_owner["user"], self.as_owner["group"])
        self.pg("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.dir), "--no-sync")
        self.pg_ctl("start", "-o", "-p %d -k %s -c listen_addresses=127.0.0.1"
                    % (self.port, root))
        self.admin = "host=127.0.0.1 port=%d user=postgres dbname=postgres" % self.port
        sql(self.admin, "CREATE DATABASE lcc")
        self.dsn = "host=127.0.0.1 port=%d user=postgres dbname=lcc" % self.port
        load_schema(self.dsn)

    def pg(self, program, *args):
        # No pipes: the postmaster would inherit them and hold them open.
        subprocess.run([os.path.join(self.bindir, program)] + list(args), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                       **self.as_owner)

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
def cluster(admin_dsn):
    """A private PostgreSQL of the server under test's version, which the test may restart."""
    c = Cluster(server_bindir(admin_dsn))
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
            os.chown(root, self.as_owner["user"], self.as_owner["group"])
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
        lone_cache = cache.parent / "lone-cache"   # one daemon per cache directory
        lone_cache.mkdir()
        lone = daemon(lone_cache, "--heartbeat", "1", dsn=standby.dsn)      # a standby only
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
def test_a_warm_clearer_still_connecting_gives_up_through_a_paused_pooler(db, cache, daemon,
                                                                         bouncer):
    """The word given while the waiting clearer connects ahead starts the run's deadline."""
    add_ports(db, "www/a", "www/b")
    b = bouncer("session")
    d = daemon(cache, "--heartbeat", "1", "--again-after", "0", dsn=b.dsn)
    d.wait_ready()
    waiting_clearer(d)
    wait_for(lambda: warm_backends(db), what="the waiting clearer's connection")
    admin = psycopg2.connect(b.admin)
    admin.autocommit = True
    threading.Thread(target=pause, args=(admin, b.dbname), daemon=True).start()
    wait_for(lambda: "PAUSE" in (b.root / "pgbouncer.log").read_text(),
             what="PgBouncer to pause")
    # The connected waiter's session keeps its server: this run goes through.
    first = make_page(cache, "www/a")
    touch_port(db, "www/a")
    wait_for(lambda: not first.exists(), what="the first change, through the pausing pooler")
    # Its successor's connection is held by the paused pooler.
    waiting_clearer(d, 2)
    second = make_page(cache, "www/b")
    touch_port(db, "www/b")
    d.wait_log(r"gave up: the server did not answer in 1 s", timeout=20)
    d.wait_log(r"clearer pid \d+ exited with 1; retrying in")
    assert second.exists()
    sql(b.admin, "RESUME %s" % b.dbname)
    wait_for(lambda: not second.exists(), timeout=30, what="the change cleared after RESUME")


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
    pages = [make_page(cache, n) for n in names]
    started = time.monotonic()
    for name in names:
        touch_port(db, name)
    wait_for(lambda: not any(p.exists() for p in pages), what="changes over a slow network")
    took = time.monotonic() - started
    took_all = assert_recovers(db, cache, d, names, "more changes over a slow network")
    assert "connection lost" not in d.log()
    figures["network with 200 ms latency"] = {
        "committed": 2 * len(names), "cleared": 2 * len(names), "wrongly deleted": 0,
        "notes": "no reconnect; pages gone in %.1f s; a second round's, with the queue's due"
                 " rows (re-clears included) gone too, in %.1f s" % (took, took_all)}


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
    allowed = {str(cache / c / p) for c, p in pairs if valid_name(c) and valid_name(p)}
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
    assert "INFO: listen_clear_cache " in lines[0], lines     # what it does, said at start
    lines = lines[1:]
    assert all("cannot listen" in line for line in lines), lines
    # One line for the outage, then at most one a minute; each attempt at -v.
    assert len([line for line in lines if "ERROR" in line]) == 1, lines
    delays = [float(x) for x in re.findall(r"retrying in ([\d.]+) s", d.log())]
    assert delays[0] < 1 and min(delays) >= 0.4, delays         # never spins
    assert max(delays) <= 1.6 * 1.2 + 0.05, delays     # back within 2.5 s once it answers
    assert d.proc.poll() is None
