#!/usr/bin/env python3
"""Wait for NOTIFY clear_ports_cache and run clear_cache.py when rows are due.

Holds one autocommit LISTEN connection and sleeps in select().  A
notification about rows due now starts a run: clear_cache.py, as a separate
process that was started and connected ahead and waits for its word.  A
notification about rows due later, a (re)connect, the heartbeat or the end of
a run make it look at the queue: rows due start a run, rows due later set a
timer.  Runs never overlap, and notifications that arrive meanwhile fold
into one more run, so a burst of changes costs a handful of runs.  The queue
table is the truth; NOTIFY is only a wake-up.

Stays in the foreground and logs to stderr (daemontools, cron @reboot).
SIGTERM or SIGINT: stop listening, let a running clearer finish, exit 0.
SIGHUP: run the clearer now.  Exit status 2: a usage or configuration error.
"""

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time

import clear_cache
from clear_cache import psycopg2    # None without it: main() says so in one line

# A lone change starts a clearer at once.  Changes that keep coming while one
# runs make the next start wait for a pause of QUIET seconds, but never more
# than MAX_DELAY after the previous start: a burst costs a run a second.
# Runs that only re-clear (a timer, not a change, started them) hold back no
# change: nobody waits for them.
MIN_GAP = 0.25          # seconds between the starts of runs for changes, at least
QUIET = 0.05
MAX_DELAY = 1.0
# Capped low, so that a server that is back (a restart, a promotion, a pooler
# restart) has the daemon listening within 2.5 s; the log stays calm instead.
CONNECT_BACKOFF = 0.5, 1.6
RUN_BACKOFF = 0.5, 60.0
CALM = 60.0             # seconds between lines about a trouble that lasts
UNANNOUNCED_EVERY = 3600.0      # seconds between warnings about lost notifications
RUN_LIMIT = 3600.0      # seconds a clearer may run before it is killed: a backstop
CHANNEL = "clear_ports_cache"   # schema.sql's NOTIFY
LATER = "later"         # the payload of a notification about rows due later only
# Seconds until this consumer's earliest row in any queue falls due (<= 0:
# due now; NULL: none), and whether nothing can be queued for it.
LOOK_QUERY = ("SELECT (SELECT EXTRACT(epoch FROM min(due_at) - now())::float8 FROM ({queues})"
              " AS q WHERE consumer = %(c)s), " + clear_cache.UNREGISTERED)
DUE_MARGIN = 0.02       # start a timed run this much late: due_at <= its now()
LOCKED_RETRY = 1.0      # a queue locked by someone else: look again this much later
LOCK_NOT_AVAILABLE = "55P03"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
VERBOSITY_FLAGS = {logging.WARNING: ["-q"], logging.INFO: [], logging.DEBUG: ["-v"]}
NEVER = float("inf")

log = logging.getLogger("listen_clear_cache")


def main(argv=None):
    parser = clear_cache.Parser(description=__doc__)
    clear_cache.add_common_options(parser)
    parser.add_argument("--heartbeat", type=clear_cache.seconds(0, strict=True),
                        default=30.0,
                        metavar="SECONDS", help="check an idle connection this often,"
                        " and give up on an answer after as long (default: 30)")
    parser.add_argument("--no-warm", dest="warm", action="store_false", default=None,
                        help="start each clearer when it is needed, instead of keeping one"
                        " started and connected ahead (default: $CLEAR_CACHE_WARM, on)")
    try:
        args = parser.parse_args(argv)
        stamps = clear_cache.env_flag("CLEAR_CACHE_TIMESTAMPS", True)
        warm = clear_cache.env_flag("CLEAR_CACHE_WARM", True) and args.warm is None
    except (clear_cache.UsageError, clear_cache.ConfigError) as e:
        return parser.exit(2, "%s: error: %s (see --help)\n" % (parser.prog, e))
    clear_cache.setup_logging(args.verbosity, stamps)
    try:
        clear_cache.require_psycopg2()
        config = clear_cache.load_config(args)
        config.give_up = args.heartbeat     # each run's, handed to the clearers
        os.close(clear_cache.open_cache_dir(config.cache_dir))
    except clear_cache.ConfigError as e:
        log.error("%s", e)
        return 2
    clearers = Clearers(config, VERBOSITY_FLAGS[args.verbosity], warm)
    return Daemon(config, args.heartbeat, clearers).run()


def backoff(failures, base_cap):
    """Seconds to wait after the n-th failure in a row: doubling, capped, jittered."""
    base, cap = base_cap
    return min(cap, base * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)


def exit_status(code):
    """A child's exit code as a log says it: '1', or 'signal 9'."""
    return str(code) if code >= 0 else "signal %d" % -code


class Calm:
    """A trouble that lasts: a line once it has happened `after` times, then one a period.

    The other occurrences go to the debug level; ended() says how it ended.
    """

    def __init__(self, period=CALM, level=logging.ERROR, after=1):
        self.period, self.level, self.after = period, level, after
        self.times = 0
        self.since = None       # (wall clock, monotonic) of the first occurrence
        self.said = -NEVER      # monotonic time of the last line

    def failed(self, text):
        now = time.monotonic()
        self.times += 1
        if self.since is None:
            self.since = time.time(), now
        if self.times < self.after or now < self.said + self.period:
            log.debug("%s", text)
            return
        self.said = now
        if self.times > 1:
            text += " (since %s, %d times)" % (
                time.strftime("%H:%M:%S", time.localtime(self.since[0])), self.times)
        log.log(self.level, "%s", text)

    def ended(self, text):
        if self.said > -NEVER:
            log.info("%s, after %.1f s and %d failures", text,
                     time.monotonic() - self.since[1], self.times)
        self.times, self.since, self.said = 0, None, -NEVER


class Interrupted(Exception):
    """A stop signal came while waiting for the server."""


class Unanswered(Exception):
    """The server did not answer within a heartbeat."""


class Clearers:
    """The clear_cache.py processes: at most one run, and one started ahead for the next."""

    def __init__(self, config, flags, warm):
        self.argv = [sys.executable, clear_cache.__file__] + flags
        self.env = config.environ()     # secrets go through the environment: ps shows argv
        self.warm = warm
        self.running = None             # the run's process
        self.deadline = NEVER           # when it is killed: a backstop
        self.waiter = None              # started ahead: connected, waiting on its stdin
        self.waiter_at = 0.0            # when the next one may start
        self.waiter_failures = 0

    def spawn(self, *args, **kwargs):
        """A new clear_cache.py process."""
        # Its own session and process group: a terminal's ^C reaches only
        # the daemon, which then lets the clearer finish.
        return subprocess.Popen(self.argv + list(args), env=self.env,
                                start_new_session=True, **kwargs)

    def start_run(self):
        """Give the word to the waiting clearer, else start one; OSError if none could."""
        self.deadline = time.monotonic() + RUN_LIMIT
        if self.waiter is not None:
            try:
                self.waiter.stdin.write(b"!")
                self.waiter.stdin.close()
            except OSError:
                self.waiter.stdin.close()   # it died: reap() says so and replaces it
            else:
                self.running, self.waiter = self.waiter, None
                log.debug("clearer pid %d started: word given to the waiting clearer",
                          self.running.pid)
                return
        self.running = self.spawn(stdin=subprocess.DEVNULL)
        log.debug("clearer pid %d started", self.running.pid)

    def start_waiter(self):
        """Start the next clearer ahead: it connects, then waits for its word."""
        try:
            self.waiter = self.spawn("--warm", stdin=subprocess.PIPE, bufsize=0)
        except OSError as e:
            self.lose_waiter("cannot start a waiting clearer: %s" % e)
            return
        log.debug("started waiting clearer pid %d", self.waiter.pid)

    def dismiss_waiter(self):
        """End of file on its stdin: it exits at once, without a run; reap() collects it."""
        if self.waiter is not None:
            self.waiter.stdin.close()

    def lose_waiter(self, reason):
        """A waiting clearer died or never started: replace it later, backing off."""
        self.waiter = None
        self.waiter_failures += 1
        delay = backoff(self.waiter_failures, RUN_BACKOFF)
        self.waiter_at = time.monotonic() + delay
        log.error("%s; a new one in %.1f s, cold starts meanwhile", reason, delay)

    def kill_running(self):
        log.error("clearer pid %d still running after %g s: killing it",
                  self.running.pid, RUN_LIMIT)
        self.running.kill()
        self.deadline = NEVER

    def reap(self, stopping):
        """Collect what exited; return (pid, exit code) of a run that ended, else None."""
        if self.waiter is not None and self.waiter.poll() is not None:
            waiter = self.waiter
            waiter.stdin.close()
            if stopping:
                log.debug("waiting clearer pid %d gone", waiter.pid)
                self.waiter = None
            else:
                self.lose_waiter("lost the waiting clearer (pid %d, exit %s)" % (
                    waiter.pid, exit_status(waiter.returncode)))
        if self.running is None or self.running.poll() is None:
            return None
        ended, self.running = self.running, None
        if ended.returncode == 0:
            self.waiter_failures = 0
        return ended.pid, ended.returncode


class Daemon:
    """The daemon's state: one LISTEN connection, its clearers, and when each thing happens."""

    def __init__(self, config, heartbeat, clearers):
        self.config = config
        self.heartbeat = heartbeat
        self.clearers = clearers
        # A lock held on the queue (an ALTER TABLE, say) is no dead connection.
        # A server's idle_session_timeout would close this idle session again
        # and again; a statement, since PgBouncer refuses the options parameter.
        self.listen_sql = "LISTEN %s; SET lock_timeout = '%s'; %s" % (
            CHANNEL, clear_cache.lock_timeout(min(LOCKED_RETRY, heartbeat / 2)),
            clear_cache.NO_IDLE_TIMEOUTS)
        self.multihost = "," in (psycopg2.extensions.parse_dsn(config.dsn).get("host") or "")
        self.conn = None
        self.connect_at = 0.0           # the next attempt, while there is no connection
        self.heard_at = 0.0             # the server's last sign of life
        self.outage = Calm()            # the connection's troubles
        self.unregistered = Calm()      # nothing can be queued for this consumer
        self.misconfigured = Calm()     # a queue of the configuration file is not as it says
        self.look_sql = LOOK_QUERY.format(queues=config.union())
        self.unannounced = Calm(UNANNOUNCED_EVERY, logging.WARNING, after=2)
        self.look_at = NEVER            # the next look at the queue, while no run is wanted
        self.run_at = NEVER             # the wanted run's start; NEVER: none wanted
        self.changes = False            # the wanted run is for changes (notified)
        self.change_run_at = -NEVER     # the start of the latest run for changes
        self.running_changes = False    # the running clearer's run was for changes
        self.run_failures = 0
        self.signals = set()
        self.stopping = False
        self.wakeup = None

    def run(self):
        """The main loop; returns the exit status."""
        self.install_signals()
        while True:
            self.handle_signals()
            self.reap_clearers()
            if self.stopping and self.clearers.running is None and self.clearers.waiter is None:
                break
            when, action = self.next_event()
            if when <= time.monotonic():
                action()
            else:
                self.wait_events(when)
        log.info("stopped")
        return 0

    def next_event(self):
        """(when, action): what happens next.  The one place that says it."""
        clearers = self.clearers
        events = [(NEVER, None)]
        if clearers.running is not None:
            events.append((clearers.deadline, clearers.kill_running))
        if self.stopping:
            pass
        elif self.conn is None:
            events.append((self.connect_at, self.connect))
        else:
            events.append((self.heard_at + self.heartbeat, self.check_connection))
            if self.run_at < NEVER and clearers.running is None:
                events.append((self.run_at, self.start_run))
            elif self.idle():
                events.append((self.look_at, self.look_at_queue))
                # Not beside a run: two Python start-ups on two cores slow both.
                if clearers.warm and clearers.waiter is None:
                    events.append((clearers.waiter_at, clearers.start_waiter))
        return min(events, key=lambda event: event[0])

    def idle(self):
        """No run is wanted or running: only then do notifications carry news."""
        return self.run_at == NEVER and self.clearers.running is None

    def wait_events(self, when):
        """Sleep in select() until a notification, a signal, a child's exit, or when."""
        timeout = None if when == NEVER else max(0.0, when - time.monotonic())
        # While a run is wanted or running, notifications carry no news:
        # leave them in the socket and read them in one go when it starts.
        watch = [self.conn] if self.conn is not None and self.idle() else []
        readable, _, _ = select.select([self.wakeup] + watch, [], [], timeout)
        if watch and self.conn in readable:
            news = self.read_news()
            if news == "due":
                self.want_run(changes=True)
            elif news == "look":
                self.look_at = 0.0

    def read_news(self):
        """Read what the server sent; what its notifications mean to this consumer.

        "due": rows due now for it; "look": rows perhaps due later; None: nothing
        for it (another consumer's rows, or no notification).
        """
        if self.conn is None:
            return None
        try:
            self.conn.poll()
        except psycopg2.Error as e:
            self.drop_connection(clear_cache.one_line(e))
            return None
        self.heard_at = time.monotonic()
        payloads = {n.payload for n in self.conn.notifies}
        self.conn.notifies.clear()
        if self.config.consumer in payloads:
            return "due"
        return "look" if LATER in payloads or "" in payloads else None

    def want_run(self, changes=False, at=None):
        """Ask for a run: for changes, no sooner than MIN_GAP after the last such start."""
        now = time.monotonic() if at is None else at
        self.changes = self.changes or changes
        gap = self.change_run_at + MIN_GAP if self.changes else now
        self.run_at = min(self.run_at, max(now, gap))

    def settle(self, now):
        """Changes keep coming: start after a pause, or MAX_DELAY after the last start."""
        self.run_at = max(self.run_at, self.change_run_at + MIN_GAP,
                          min(now + QUIET, self.change_run_at + MAX_DELAY))

    def start_run(self):
        """Start the wanted run, unless changes still pour in or the connection just went."""
        now = time.monotonic()
        news = self.read_news()
        if self.conn is None:
            return      # none starts while disconnected: the catch-up comes after
        if news == "due":
            if self.changes and now < self.change_run_at + MAX_DELAY:
                self.settle(now)
                return
            self.changes = True
        # Its snapshot comes later: it covers every notification read so far.
        self.run_at = NEVER
        self.running_changes, self.changes = self.changes, False
        if self.running_changes:
            self.change_run_at = now
        try:
            self.clearers.start_run()
        except OSError as e:
            self.fail_run("cannot start clearer: %s" % e)

    def reap_clearers(self):
        """Act on a run that ended: look again, or retry a failed one later."""
        ended = self.clearers.reap(self.stopping)
        if ended is None:
            return
        pid, code = ended
        if code == 2 and self.config.source:
            for queue in self.config.queues:
                queue.keys = None       # a queue may have changed: look at them again
        if code != 0:
            self.fail_run("clearer pid %d exited with %s" % (pid, exit_status(code)))
            return
        log.debug("clearer pid %d done", pid)
        self.run_failures = 0
        news = self.read_news()
        if self.conn is not None and not self.stopping:
            # Rows may have come due or been queued while it ran (its own
            # re-clears too); changes that kept coming call for a pause.
            self.look_at_queue(settle=news == "due" and self.running_changes)

    def fail_run(self, reason):
        """Retry a failed run later, backing off, so a stuck port cannot spin us."""
        self.run_failures += 1
        delay = backoff(self.run_failures, RUN_BACKOFF)
        self.run_at = time.monotonic() + delay
        log.error("%s; retrying in %.1f s", reason, delay)

    def install_signals(self):
        """Let signals and child exits wake select() through a pipe."""
        self.wakeup, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: self.signals.add(signum))
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def drain_wakeup(self):
        """Empty the pipe that woke select(); the handlers marked the signals."""
        while True:
            try:
                if not os.read(self.wakeup, 512):
                    break
            except BlockingIOError:
                break

    def handle_signals(self):
        """Act on the signals the handlers only marked."""
        self.drain_wakeup()
        signals, self.signals = self.signals, set()
        if signal.SIGHUP in signals:
            log.info("SIGHUP: clearing now")
            self.run_at = 0.0
        if signals & STOP_SIGNALS and not self.stopping:
            running = self.clearers.running
            log.info("stopping on signal%s", "" if running is None
                     else ", after clearer pid %d ends" % running.pid)
            self.stopping = True
            self.close_connection()
            self.clearers.dismiss_waiter()

    def connect(self):
        """Connect, LISTEN, and look at the queue; on failure, back off."""
        conn = None
        try:
            # Its own name, whatever the DSN says: --check counts daemons by it.
            conn = clear_cache.connect(self.config.dsn, async_=1, application_name=(
                clear_cache.daemon_name(self.config.consumer)))
            self.wait_ready(conn)
            cursor = conn.cursor()      # must outlive the asynchronous query
            cursor.execute(self.listen_sql)
            self.wait_ready(conn)
        except Interrupted:
            conn.close()
            return
        except (psycopg2.Error, Unanswered) as e:
            reason = self.describe(e, conn)
            if conn is not None:
                conn.close()
            delay = backoff(self.outage.times + 1, CONNECT_BACKOFF)
            self.connect_at = time.monotonic() + delay
            self.outage.failed("cannot listen: %s; retrying in %.1f s" % (reason, delay))
            return
        self.conn = conn
        self.heard_at = now = time.monotonic()
        self.outage.ended("the server answers again")
        log.info("listening on channel %s%s", CHANNEL, self.where(conn))
        # Notifications sent while nobody listened are lost: catch up.  A
        # run that failed against the lost server may go at once.
        self.look_at = 0.0
        self.run_failures = 0
        if self.run_at < NEVER:
            self.run_at = now

    def describe(self, error, conn):
        """One line for a connection's error: which host, and a hint where one helps."""
        text = clear_cache.one_line(error)
        if "during recovery" in text or "hot standby" in text:
            text = ("connected to a standby, which cannot LISTEN: point the DSN at the"
                    " primary, or list all hosts with target_session_attrs=read-write")
        return text + self.where(conn)

    def where(self, conn):
        """' (host:port)' of conn when the DSN lists several hosts, else ''."""
        if not self.multihost or conn is None:
            return ""
        try:
            return " (%s:%s)" % (conn.info.host, conn.info.port)
        except psycopg2.Error:
            return ""

    def check_connection(self):
        """Heartbeat: prove the connection alive, and look at the queue while at it."""
        self.look_at_queue(heartbeat=True)

    def look_at_queue(self, heartbeat=False, settle=False):
        """Ask when the earliest row falls due: run the clearer now, or set the timer."""
        cursor = self.conn.cursor()
        try:
            queues = self.config.queues
            if any(queue.keys is None for queue in queues):
                # Its clearers would exit 2: say why here, once a minute, and look again.
                cursor.execute(clear_cache.KEYS_QUERY, [[queue.table for queue in queues]])
                self.wait_ready(self.conn)
                try:
                    clear_cache.take_keys(queues, cursor.fetchall())
                except clear_cache.ConfigError as e:
                    for queue in queues:
                        queue.keys = None
                    self.misconfigured.failed(str(e))
                    self.heard_at = time.monotonic()
                    self.look_at = self.heard_at + self.heartbeat
                    return
                self.misconfigured.ended("the queues are as configured")
            cursor.execute(self.look_sql, {"c": self.config.consumer})
            self.wait_ready(self.conn)
            wait, unregistered = cursor.fetchone()
        except Interrupted:
            return      # stopping: the connection goes with the rest
        except (psycopg2.Error, Unanswered) as e:
            if getattr(e, "pgcode", None) is None:      # no answer, or no connection
                self.drop_connection(clear_cache.one_line(e))
                return
            self.heard_at = time.monotonic()
            retry = LOCKED_RETRY if e.pgcode == LOCK_NOT_AVAILABLE else self.heartbeat
            log.warning("cannot look at the queue: %s; again in %g s",
                        clear_cache.db_error(e), retry)
            self.look_at = self.heard_at + retry
            return
        now = self.heard_at = time.monotonic()
        if not self.idle():
            return      # a run is coming anyway, and it looks again after
        announced = self.read_news() == "due"
        if unregistered:
            # Nothing is queued for it; it looks again at every heartbeat.
            self.unregistered.failed(clear_cache.unregistered_reason(self.config.consumer))
            self.look_at = NEVER
            return
        self.unregistered.ended("consumer %r is registered" % self.config.consumer)
        if wait is None or wait > 0:
            self.look_at = NEVER if wait is None else now + wait + DUE_MARGIN
            log.debug("queue: %s", "nothing due" if wait is None
                      else "next rows due in %.1f s" % wait)
            return
        if heartbeat and not announced:
            log.info("heartbeat found rows due: clearing")
            self.unannounced.failed(
                "rows were due that no notification announced: is LISTEN going through"
                " PgBouncer in transaction pooling, which cannot carry it?  Clearing at"
                " each heartbeat meanwhile")
        self.look_at = NEVER
        self.want_run(changes=announced, at=now)
        if settle:
            self.settle(now)

    def wait_ready(self, conn):
        """Poll an asynchronous operation to its end, for at most one heartbeat."""
        deadline = time.monotonic() + self.heartbeat
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unanswered("no answer from the server in %g s" % self.heartbeat)
            want_write = state == psycopg2.extensions.POLL_WRITE
            readable, _, _ = select.select([self.wakeup] + [conn] * (not want_write),
                                           [conn] * want_write, [], remaining)
            if self.wakeup in readable:
                self.drain_wakeup()
                if self.signals & STOP_SIGNALS:
                    raise Interrupted   # the main loop acts on it, first thing

    def drop_connection(self, reason):
        """Log a lost connection and schedule the first reconnect."""
        # The server says why in a notice (idle-session timeout, administrator
        # command); libpq's exception says only that the connection closed.
        said = [n for n in self.conn.notices if "terminating connection" in n]
        if said:
            reason = clear_cache.one_line(said[-1].split(":", 1)[-1])
        self.outage.failed("connection lost: %s%s" % (reason, self.where(self.conn)))
        self.close_connection()
        self.connect_at = time.monotonic() + backoff(1, CONNECT_BACKOFF)

    def close_connection(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


if __name__ == "__main__":
    sys.exit(main())
