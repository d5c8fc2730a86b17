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
SIGHUP: run the clearer now.
"""

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time

import clear_cache      # first: it says in one line when psycopg2 is missing
import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions

# A lone change starts a clearer at once.  Changes that keep coming while one
# runs make the next start wait for a pause of QUIET seconds, but never more
# than MAX_DELAY after the previous start: a burst costs a run a second.
MIN_GAP = 0.25          # seconds between clearer starts, at least
QUIET = 0.05
MAX_DELAY = 1.0
# Capped low, so that a server that is back (a restart, a promotion, a pooler
# restart) has the daemon listening within 2.5 s; the log stays calm instead.
CONNECT_BACKOFF = 0.5, 1.6
CALM = 60.0             # seconds between lines about a trouble that lasts
UNANNOUNCED_EVERY = 3600.0      # seconds between warnings about lost notifications
RUN_BACKOFF = 0.5, 60.0
RUN_LIMIT = 3600.0      # seconds a clearer may run before it is killed: a backstop
# Seconds until this consumer's earliest row falls due (<= 0: due now; NULL:
# none), and whether names are registered without this one.
LOOK_QUERY = ("SELECT (SELECT EXTRACT(epoch FROM min(due_at) - now())::float8"
              " FROM ports_cache_clearing WHERE consumer = %s), " + clear_cache.UNREGISTERED)
DUE_MARGIN = 0.02       # start a timed run this much late: due_at <= its now()
LOCKED_RETRY = 1.0      # a queue locked by someone else: look again this much later
LOCK_NOT_AVAILABLE = psycopg2.errorcodes.LOCK_NOT_AVAILABLE
LATER = "later"         # the payload of a notification about rows due later only
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
VERBOSITY_FLAGS = {logging.WARNING: ["-q"], logging.INFO: [], logging.DEBUG: ["-v"]}

log = logging.getLogger("listen_clear_cache")


def main(argv=None):
    parser = clear_cache.Parser(description=__doc__)
    clear_cache.add_common_options(parser)
    parser.add_argument("--channel", default="clear_ports_cache",
                        help="channel to LISTEN on (default: %(default)s)")
    parser.add_argument("--heartbeat", type=clear_cache.seconds(0, strict=True),
                        default=30.0,
                        metavar="SECONDS", help="check an idle connection this often,"
                        " and give up on an answer after as long (default: 30)")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        default=os.environ.get("CLEAR_CACHE_WARM") != "0",
                        help="start each clearer when it is needed, instead of keeping one"
                        " started and connected ahead (default: $CLEAR_CACHE_WARM=0 also)")
    args = parser.parse_args(argv)
    clear_cache.setup_logging(args.verbosity)
    try:
        config = clear_cache.load_config(args)
        os.close(clear_cache.open_cache_dir(config.cache_dir))
        if not args.channel or "\0" in args.channel:
            raise clear_cache.ConfigError("invalid channel name %r" % args.channel)
    except clear_cache.ConfigError as e:
        log.error("%s", e)
        return 2
    listener = Listener(config, args.channel, args.heartbeat,
                        VERBOSITY_FLAGS[args.verbosity], args.warm)
    return listener.run()


def backoff(failures, base_cap):
    """Seconds to wait after the n-th failure in a row: doubling, capped, jittered."""
    base, cap = base_cap
    return min(cap, base * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)


def exit_status(code):
    """A child's exit code as a log says it: '1', or 'signal 9'."""
    return str(code) if code >= 0 else "signal %d" % -code


class Calm:
    """A trouble that lasts: its first line, then at most one a minute, then its end."""

    def __init__(self):
        self.since = None       # wall-clock start, for the log
        self.started = self.last = 0.0
        self.times = 0

    def failed(self, text):
        now = time.monotonic()
        self.times += 1
        if self.since is None:
            self.since, self.started, self.last = time.time(), now, now
            log.error("%s", text)
        elif now >= self.last + CALM:
            self.last = now
            log.error("%s (failing since %s, %d times)", text,
                      time.strftime("%H:%M:%S", time.localtime(self.since)), self.times)
        else:
            log.debug("%s", text)

    def ended(self, text):
        if self.since is not None:
            log.info("%s, after %.1f s and %d failures", text, time.monotonic() - self.started,
                     self.times)
            self.since, self.times = None, 0


class Interrupted(Exception):
    """A stop signal came while waiting for the server."""


class Unanswered(Exception):
    """The server did not answer within a heartbeat."""


class Listener:
    """The daemon's state: one LISTEN connection, at most one clearer child."""

    def __init__(self, config, channel, heartbeat, flags, warm=True):
        self.dsn = config.dsn
        # A lock held on the queue (an ALTER TABLE, say) is no dead connection.
        # A server's idle_session_timeout would close this idle session again
        # and again; a statement, since PgBouncer refuses the options parameter.
        self.listen_sql = 'LISTEN "%s"; SET lock_timeout = %d; %s' % (
            channel.replace('"', '""'), min(LOCKED_RETRY, heartbeat / 2) * 1000,
            clear_cache.NO_IDLE_TIMEOUTS)
        self.channel = channel
        self.heartbeat = heartbeat
        self.argv = [sys.executable, clear_cache.__file__] + flags
        # Secrets go through the environment: argv is visible to ps.
        self.env = dict(config.environ(), CLEAR_CACHE_GIVE_UP_AFTER=repr(heartbeat))
        self.conn = None
        self.look_at = float("inf")     # monotonic time of the next look at the queue
        self.consumer = config.consumer
        self.multihost = "," in (psycopg2.extensions.parse_dsn(config.dsn).get("host") or "")
        self.connect_failures = 0
        self.outage = Calm()            # the connection's troubles
        self.unregistered = Calm()      # this consumer missing from cache_consumers
        self.unannounced = 0            # heartbeats that found due rows nobody announced
        self.warned_unannounced = -UNANNOUNCED_EVERY
        self.next_connect = 0.0         # monotonic time of the next attempt
        self.last_heard = 0.0           # last sign of life from the server
        self.child = None
        self.child_deadline = 0.0
        self.warm = warm
        self.waiter = None              # the clearer started ahead, waiting for its word
        self.word_fd = None             # the pipe to it; closing it sends it away
        self.waiter_failures = 0
        self.next_waiter = 0.0
        self.run_failures = 0
        self.pending = False            # a clearer run is wanted
        self.next_start = 0.0           # earliest start of that run
        self.started_at = -MAX_DELAY    # start of the latest run
        self.signals = set()
        self.stopping = False
        self.wakeup = None

    def run(self):
        """The main loop; returns the exit status."""
        self.install_signals()
        while True:
            self.handle_signals()
            self.reap_clearer()
            now = time.monotonic()
            if self.stopping:
                if self.child is None and self.waiter is None:
                    break
                self.wait_events()
            elif self.conn is None and now >= self.next_connect:
                self.reconnect()
            elif self.conn is not None and now >= self.last_heard + self.heartbeat:
                self.check_connection()
            elif self.conn is not None and now >= self.look_at and self.idle():
                self.look_at_queue()
            elif (self.pending and self.child is None and self.conn is not None
                  and now >= self.next_start):
                self.start_clearer()
            elif self.wants_waiter() and now >= self.next_waiter:
                self.start_waiter()
            else:
                self.wait_events()
        log.info("stopped")
        return 0

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
            self.pending = True
            self.next_start = 0.0
        if signals & STOP_SIGNALS and not self.stopping:
            log.info("stopping on signal%s", "" if self.child is None
                     else ", after clearer pid %d ends" % self.child.pid)
            self.stopping = True
            self.close_connection()
            self.dismiss_waiter()

    def wait_events(self):
        """Sleep in select() until a notification, a signal or the next deadline."""
        deadlines = [float("inf")]
        if self.child is not None:
            deadlines.append(self.child_deadline)
        if not self.stopping:
            deadlines.append(self.next_connect if self.conn is None
                             else self.last_heard + self.heartbeat)
            if self.pending and self.child is None and self.conn is not None:
                deadlines.append(self.next_start)
            if self.conn is not None and self.idle():
                deadlines.append(self.look_at)
            if self.wants_waiter():
                deadlines.append(self.next_waiter)
        timeout = min(deadlines) - time.monotonic()
        timeout = None if timeout == float("inf") else max(0.0, timeout)
        # While a run is pending or running, notifications carry no news:
        # leave them in the socket and drain them in one go when it starts.
        idle = self.conn is not None and self.idle()
        readable, _, _ = select.select([self.wakeup] + [self.conn] * idle, [], [], timeout)
        news = self.conn in readable and self.news(self.poll_notifications())
        if news == "due":
            self.pending = True         # rows due now: no need to look first
        elif news:
            self.look_at = 0.0          # rows due later, perhaps: set the timer

    def news(self, payloads):
        """What notifications mean to this consumer: "due", "look", or None."""
        if self.consumer in payloads:
            return "due"
        if LATER in payloads or "" in payloads:
            return "look"
        return None                     # another consumer's rows

    def idle(self):
        """No clearer runs or waits to run."""
        return self.child is None and not self.pending

    def poll_notifications(self):
        """Read what the server sent; return the payloads of its notifications, now consumed."""
        if self.conn is None:
            return set()
        try:
            self.conn.poll()
        except psycopg2.Error as e:
            self.drop_connection(clear_cache.one_line(e))
            return set()
        self.last_heard = time.monotonic()
        payloads = {n.payload for n in self.conn.notifies}
        self.conn.notifies.clear()
        return payloads

    def reconnect(self):
        """Connect, LISTEN, and look at the queue; on failure, back off."""
        conn = None
        try:
            # Its own name, whatever the DSN says: --check counts daemons by it.
            conn = clear_cache.connect(self.dsn, async_=1,
                                       application_name=clear_cache.daemon_name(self.consumer))
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
            self.connect_failures += 1
            delay = backoff(self.connect_failures, CONNECT_BACKOFF)
            self.next_connect = time.monotonic() + delay
            self.outage.failed("cannot listen: %s; retrying in %.1f s" % (reason, delay))
            return
        self.conn = conn
        self.connect_failures = 0
        self.last_heard = time.monotonic()
        self.outage.ended("the server answers again")
        log.info("listening on channel %s%s", self.channel, self.where(conn))
        # Notifications sent while nobody listened are lost: catch up.  A
        # run that failed against the lost server may go at once.
        self.look_at = 0.0
        self.run_failures = 0
        self.next_start = min(self.next_start, time.monotonic())

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
            cursor.execute(LOOK_QUERY, [self.consumer, self.consumer])
            self.wait_ready(self.conn)
            wait, unregistered = cursor.fetchone()
        except Interrupted:
            return      # stopping: the connection goes with the rest
        except (psycopg2.Error, Unanswered) as e:
            if getattr(e, "pgcode", None) is None:      # no answer, or no connection
                self.drop_connection(clear_cache.one_line(e))
                return
            self.last_heard = time.monotonic()
            retry = LOCKED_RETRY if e.pgcode == LOCK_NOT_AVAILABLE else self.heartbeat
            log.warning("cannot look at the queue: %s; again in %g s",
                        clear_cache.db_error(e), retry)
            self.look_at = self.last_heard + retry
            return
        now = self.last_heard = time.monotonic()
        if not self.idle():
            return      # a run is coming anyway, and it looks again after
        announced = self.news({n.payload for n in self.conn.notifies})
        self.conn.notifies.clear()
        if unregistered:
            # Nothing is queued for it; it looks again at every heartbeat.
            self.unregistered.failed(
                "consumer %r is not registered in cache_consumers, which is not empty:"
                " nothing is queued for it" % self.consumer)
            self.look_at = float("inf")
            return
        self.unregistered.ended("consumer %r is registered" % self.consumer)
        if wait is None or wait > 0:
            self.look_at = float("inf") if wait is None else now + wait + DUE_MARGIN
            log.debug("queue: %s", "nothing due" if wait is None
                      else "next rows due in %.1f s" % wait)
            return
        if heartbeat and not announced:
            log.info("heartbeat found rows due: clearing")
            self.warn_unannounced(now)
        self.look_at = float("inf")
        self.pending = True
        if settle:
            self.settle(now)

    def warn_unannounced(self, now):
        """Say so when due rows keep coming that no notification announced."""
        self.unannounced += 1
        if self.unannounced >= 2 and now >= self.warned_unannounced + UNANNOUNCED_EVERY:
            self.warned_unannounced = now
            log.warning("rows were due that no notification announced, at %d heartbeats:"
                        " is LISTEN going through PgBouncer in transaction pooling, which"
                        " cannot carry it, or does --channel %s differ from the trigger's"
                        " NOTIFY?  Clearing at each heartbeat meanwhile", self.unannounced,
                        self.channel)

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
        self.next_connect = time.monotonic() + backoff(1, CONNECT_BACKOFF)

    def close_connection(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def start_clearer(self):
        """Give the word to the waiting clearer, or start one, unless changes still pour in."""
        now = time.monotonic()
        if self.poll_notifications() and now < self.started_at + MAX_DELAY:
            self.settle(now)
            return
        # Its snapshot comes later: it covers every notification read so far.
        self.pending = False
        self.started_at = now
        self.next_start = now + MIN_GAP
        self.child_deadline = now + RUN_LIMIT
        if self.waiter is not None and self.give_word():
            return
        try:
            self.child = self.spawn_clearer()
        except OSError as e:
            self.fail_run("cannot start clearer: %s" % e)
            return
        log.debug("clearer pid %d started", self.child.pid)

    def spawn_clearer(self, *args, **kwargs):
        """A new clear_cache.py process."""
        # Its own session and process group: a terminal's ^C reaches only
        # the daemon, which then lets the clearer finish.
        return subprocess.Popen(self.argv + list(args), env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)

    def wants_waiter(self):
        """Should a clearer be started ahead now: warm, connected, nothing running?"""
        return (self.warm and self.waiter is None and self.child is None
                and self.conn is not None and not self.stopping)

    def start_waiter(self):
        """Start the next clearer ahead: it connects, then waits for its word on a pipe."""
        reader, self.word_fd = os.pipe2(os.O_CLOEXEC)
        try:
            self.waiter = self.spawn_clearer("--warm", str(reader), pass_fds=(reader,))
        except OSError as e:
            self.lose_waiter("cannot start a waiting clearer: %s" % e)
        else:
            log.debug("started waiting clearer pid %d", self.waiter.pid)
        finally:
            os.close(reader)

    def give_word(self):
        """Hand the run to the waiting clearer; False if it is gone."""
        try:
            os.write(self.word_fd, b"!")
        except OSError:
            return False        # it died: reap_clearer says so and replaces it
        finally:
            os.close(self.word_fd)
            self.word_fd = None
        self.child, self.waiter = self.waiter, None
        log.debug("clearer pid %d started: word given to the waiting clearer", self.child.pid)
        return True

    def dismiss_waiter(self):
        """Send the waiting clearer away; reap_clearer collects it."""
        if self.word_fd is not None:
            os.close(self.word_fd)      # end of file: it exits without a run
            self.word_fd = None
        if self.waiter is not None and self.waiter.returncode is None:
            self.waiter.terminate()     # even while it connects: it holds nothing yet

    def lose_waiter(self, reason):
        """A waiting clearer died or never started: replace it later, backing off."""
        self.waiter = None
        if self.word_fd is not None:
            os.close(self.word_fd)
            self.word_fd = None
        self.waiter_failures += 1
        delay = backoff(self.waiter_failures, RUN_BACKOFF)
        self.next_waiter = time.monotonic() + delay
        log.error("%s; a new one in %.1f s, cold starts meanwhile", reason, delay)

    def reap_clearer(self):
        """Collect a finished clearer or waiter; kill a clearer that has run far too long."""
        if self.waiter is not None and self.waiter.poll() is not None:
            code = self.waiter.returncode
            if self.stopping:
                log.debug("waiting clearer pid %d gone", self.waiter.pid)
                self.waiter = None
            else:
                self.lose_waiter("lost the waiting clearer (pid %d, exit %s)" % (
                    self.waiter.pid, exit_status(code)))
        if self.child is None:
            return
        code = self.child.poll()
        if code is None:
            if time.monotonic() >= self.child_deadline:
                log.error("clearer pid %d still running after %g s: killing it",
                          self.child.pid, RUN_LIMIT)
                self.child.kill()
                self.child_deadline = float("inf")
            return
        pid, self.child = self.child.pid, None
        if code != 0:
            self.fail_run("clearer pid %d exited with %s" % (pid, exit_status(code)))
            return
        log.debug("clearer pid %d done", pid)
        self.run_failures = 0
        self.waiter_failures = 0
        notified = bool(self.poll_notifications())
        if self.conn is not None and not self.stopping:
            # Rows may have come due or been queued while it ran (its own
            # re-clears too); changes that kept coming call for a pause.
            self.look_at_queue(settle=notified)

    def settle(self, now):
        """Changes keep coming: start after a pause, or MAX_DELAY after the last start."""
        self.next_start = max(self.next_start, min(now + QUIET, self.started_at + MAX_DELAY))

    def fail_run(self, reason):
        """Retry a failed clear later, backing off, so a stuck port cannot spin us."""
        self.run_failures += 1
        delay = backoff(self.run_failures, RUN_BACKOFF)
        self.pending = True
        self.next_start = time.monotonic() + delay
        log.error("%s; retrying in %.1f s", reason, delay)


if __name__ == "__main__":
    sys.exit(main())
