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
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from .config import Parser, add_common_options, env_flag, load_config, seconds, setup_logging
from . import __version__
from .errors import (RETRY_BACKOFF, Backoff, ConfigError, UsageError, count, cut, db_error,
                     exit_status, one_line, psycopg2, require_psycopg2)
from .pages import lock_cache_dir
from .queues import (NO_IDLE_TIMEOUTS, KEYS_QUERY, UNREGISTERED, connect, daemon_name,
                     lock_timeout, table, take_keys, union, unregistered_reason)

# The start rule.  A lone change starts a clearer at once.  Changes that keep
# coming while one runs make the next start wait for a pause of QUIET
# seconds, but never more than MAX_DELAY after the previous start: a burst
# costs a run a second.  Runs that only re-clear or retry (a timer, not a
# change, asked for them) hold back no change: nobody waits for them.
MIN_GAP = 0.25          # seconds between the starts of runs for changes, at least
QUIET = 0.05
MAX_DELAY = 1.0
# Capped low, so that a server that is back (a restart, a promotion, a pooler
# restart) has the daemon listening within 2.5 s; the log stays calm instead.
CONNECT_BACKOFF = 0.5, 1.6
CALM = 60.0             # seconds between lines about a trouble that lasts
UNANNOUNCED_EVERY = 3600.0      # seconds between warnings about lost notifications
RUN_LIMIT = 3600.0      # seconds a clearer may run before it is killed: a backstop
# A running clearer says what it does through a pipe.  Silent this many
# heartbeats since its word or its last step, it is said to have stopped;
# then, unless a queue has a command (whose run is its own business), it is
# killed, with all it started, and its run retried.
STALLED, STALLED_KILL = 2, 5
CHANNEL = "clear_ports_cache"   # schema.sql's NOTIFY
LATER = "later"         # the payload of a notification about rows due later only
# Seconds until this consumer's earliest row in any queue falls due (<= 0:
# due now; NULL: none; rows due at infinity never are), how many are due at
# infinity, and whether nothing can be queued for it.
LOOK_QUERY = ("SELECT w.wait, w.never, " + UNREGISTERED + " FROM (SELECT"
              " (EXTRACT(epoch FROM pg_catalog.min(due_at) FILTER (WHERE due_at < 'infinity'))"
              " - EXTRACT(epoch FROM pg_catalog.now()))::float8 AS wait,"
              " pg_catalog.count(*) FILTER (WHERE due_at = 'infinity') AS never"
              " FROM ({}) AS q WHERE consumer = %(c)s) AS w")
DUE_MARGIN = 0.02       # start a timed run this much late: due_at <= its now()
LOCKED_RETRY = 1.0      # a queue locked by someone else: look again this much later
LOCK_NOT_AVAILABLE = "55P03"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
VERBOSITY_FLAGS = {logging.WARNING: ["-q"], logging.INFO: [], logging.DEBUG: ["-v"]}
NEVER = float("inf")
# The clearer is the script beside this package, in a checkout as once installed.
CLEARER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "clear_cache.py")

log = logging.getLogger("listen_clear_cache")


def main(argv=None):
    parser = Parser(description=__doc__)
    add_common_options(parser)
    parser.add_argument("--heartbeat", type=seconds(0, strict=True), default=30.0,
                        metavar="SECONDS", help="check an idle connection this often,"
                        " and give up on an answer after as long (default: 30)")
    parser.add_argument("--no-warm", dest="warm", action="store_false", default=None,
                        help="start each clearer when it is needed, instead of keeping one"
                        " started and connected ahead (default: $CLEAR_CACHE_WARM, on)")
    try:
        args = parser.parse_args(argv)
        stamps = env_flag("CLEAR_CACHE_TIMESTAMPS", True)
        warm = env_flag("CLEAR_CACHE_WARM", True) and args.warm is None
    except (UsageError, ConfigError) as e:
        return parser.exit(2, "%s: error: %s (see --help)\n" % (parser.prog, e))
    setup_logging(args.verbosity, stamps)
    try:
        require_psycopg2()
        # Each run's deadline, handed to the clearers, is the heartbeat.
        config = load_config(args, give_up=args.heartbeat)
        lock_cache_dir(config.cache_dir)     # held, open, until the daemon ends
    except ConfigError as e:
        log.error("%s", e)
        return 2
    log.info("%s", describe_setup(config))
    clearers = Clearers(config, VERBOSITY_FLAGS[args.verbosity], warm)
    return Daemon(config, args.heartbeat, clearers).run()


def describe_setup(config):
    """One line: the version, the cache directory, the consumer, and each queue with what
    it clears (its templates, command and channels), cut to a bounded length."""
    queues = []
    for queue in config.queues:
        what = [" ".join(t.text for t in queue.pages)] if queue.pages else []
        if queue.command:
            what.append("command " + shlex.join(a.text for a in queue.command))
        if queue.listen:
            what.append("on " + " ".join(queue.listen))
        queues.append("%s (%s)" % (queue.table, "; ".join(what)))
    return cut("listen_clear_cache %s: cache %s, consumer %r, %s: %s" % (
        __version__, config.cache_dir, config.consumer, count(len(queues), "queue"),
        ", ".join(queues)), 2000)


def start_time(wanted_at, gated, last_start, news_at):
    """When a wanted run starts: the start rule, a function of times alone.

    wanted_at: when the run was asked for.  gated: a change asked for it
    (not a timer, a retry or SIGHUP), so it keeps MIN_GAP after last_start,
    the start of the latest run for changes.  news_at: when changes were
    last heard of while it waited (None: none), which make it wait for a
    pause of QUIET, though never past MAX_DELAY after last_start.
    """
    if not gated:
        return wanted_at
    at = max(wanted_at, last_start + MIN_GAP)
    if news_at is not None:
        at = max(at, min(news_at + QUIET, last_start + MAX_DELAY))
    return at


class Calm:
    """A trouble that lasts: a line once it has happened `after` times, then one a period.

    The other occurrences go to the debug level; ended() says how it ended.
    It only logs: what to do next is the Daemon's.
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


class Clearers:
    """The clear_cache.py processes: at most one run, and one started ahead for the next."""

    def __init__(self, config, flags, warm):
        self.argv = [sys.executable, CLEARER, "--for-daemon"] + flags
        self.env = config.environ()     # secrets go through the environment: ps shows argv
        self.fds = ()
        if config.source:   # the configuration's text, in a file of no name
            self.config_file = tempfile.TemporaryFile()
            self.config_file.write(config.source[1].encode("utf-8"))
            self.config_file.flush()
            self.fds = (self.config_file.fileno(),)
            self.env["CLEAR_CACHE_CONFIG_FD"] = str(self.fds[0])
        self.warm = warm
        self.running = None             # the run's process
        self.deadline = NEVER           # when it is killed: a backstop
        self.waiter = None              # started ahead: connected, waiting on its stdin
        self.waiter_at = 0.0            # when the next one may start
        self.backoff = Backoff(*RETRY_BACKOFF)    # waiters lost in a row
        self.progress_at = NEVER        # the running clearer's word, or its last step
        self.doing = None               # and what that step was
        self.stall_said = -NEVER        # when a line last said it had stopped

    def spawn(self, *args, **kwargs):
        """A new clear_cache.py process, with the pipe it says its steps through."""
        reader, writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            # Its own session and process group: a terminal's ^C reaches only
            # the daemon, which then lets the clearer finish.
            proc = subprocess.Popen(self.argv + list(args), start_new_session=True,
                                    env=dict(self.env, CLEAR_CACHE_PROGRESS_FD=str(writer)),
                                    pass_fds=(writer,) + self.fds, **kwargs)
        except OSError:
            os.close(reader)
            raise
        finally:
            os.close(writer)
        proc.progress = reader
        return proc

    def read_progress(self):
        """Read what the running clearer says it does."""
        try:
            said = os.read(self.running.progress, 4096)
        except BlockingIOError:
            return
        if not said:    # it exited, or closed the pipe: reap() tells
            os.close(self.running.progress)
            self.running.progress = None
            return
        lines = said.decode(errors="replace").split("\n")
        self.doing = [line for line in lines if line][-1] if any(lines) else self.doing
        if self.stall_said > -NEVER:
            log.info("clearer pid %d goes on: %s", self.running.pid, self.doing)
            self.stall_said = -NEVER
        self.progress_at = time.monotonic()

    def report_stall(self):
        log.error("clearer pid %d has made no progress for %.0f s; it was %s",
                  self.running.pid, time.monotonic() - self.progress_at, self.doing)
        self.stall_said = time.monotonic()

    def kill_stalled(self):
        log.error("clearer pid %d has made no progress for %.0f s: killing it, with all it"
                  " started; it was %s", self.running.pid, time.monotonic() - self.progress_at,
                  self.doing)
        try:
            os.killpg(self.running.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass        # gone meanwhile: reap() tells
        self.progress_at = NEVER

    def start_run(self):
        """Give the word to the waiting clearer, else start one; OSError if none could."""
        self.deadline = self.progress_at = time.monotonic()
        self.deadline += RUN_LIMIT
        self.doing, self.stall_said = "starting", -NEVER
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
        delay = self.backoff.failed()
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
            os.close(waiter.progress)
            if stopping:
                log.debug("waiting clearer pid %d gone", waiter.pid)
                self.waiter = None
            else:
                self.lose_waiter("lost the waiting clearer (pid %d, exit %s)" % (
                    waiter.pid, exit_status(waiter.returncode)))
        if self.running is None or self.running.poll() is None:
            return None
        ended, self.running = self.running, None
        if ended.progress is not None:
            os.close(ended.progress)
        self.progress_at = NEVER
        if ended.returncode == 0:
            self.backoff.reset()
        return ended.pid, ended.returncode


class Daemon:
    """The daemon's state: one LISTEN connection, its clearers, and when each thing happens.

    The states of docs/design.md: disconnected (no conn: connect at
    connect_at), idle (conn, no run wanted or running), run pending
    (wanted_at: start_time() says when), running (clearers.running),
    stopping.  Every statement goes asynchronously: step names the one in
    flight, and the main loop's one select() waits for it.
    """

    def __init__(self, config, heartbeat, clearers):
        self.config = config
        self.heartbeat = heartbeat
        self.clearers = clearers
        self.commands = any(queue.command for queue in config.queues)
        # A lock held on the queue (an ALTER TABLE, say) is no dead connection.
        # A server's idle_session_timeout would close this idle session again
        # and again; a statement, since PgBouncer refuses the options parameter.
        # A queue's listen channels: a notification on one makes it due once.
        self.channels = {name: i for i, queue in enumerate(config.queues)
                         for name in queue.listen}
        self.listen_sql = "LISTEN %s; %sSET lock_timeout = '%s'; %s" % (
            CHANNEL, "".join('LISTEN "%s"; ' % name for name in self.channels),
            lock_timeout(min(LOCKED_RETRY, heartbeat / 2)), NO_IDLE_TIMEOUTS)
        self.look_sql = psycopg2.sql.SQL(LOOK_QUERY).format(union(config.queues))
        self.multihost = "," in (psycopg2.extensions.parse_dsn(config.dsn).get("host") or "")
        # The connection, and the statement in flight on it.
        self.conn = None
        self.cursor = None
        self.step = None                # "connect", "listen", "keys", "look", "poke", or None
        self.step_deadline = NEVER      # a step unanswered by then: the connection is dead
        self.writing = False            # the step waits to write, not to read
        self.connect_at = 0.0           # the next attempt, while there is no connection
        self.heard_at = 0.0             # the server's last sign of life
        self.reconnect = Backoff(*CONNECT_BACKOFF)
        # The queue.
        self.keys_known = all(queue.keys is not None for queue in config.queues)
        self.look_at = NEVER            # the next look at the queue, while no run is wanted
        self.heartbeat_look = False     # the look in flight is the heartbeat's
        self.poked = set()              # queues a listen channel made due: a row to queue
        self.poke_at = 0.0              # when to queue it (later, after a failure)
        self.news_at = None             # changes heard of since the wanted run was asked
                                        # for (or at the end of the last): start_time()
        # The run: wanted, then running.
        self.wanted_at = NEVER          # when a run was asked for; NEVER: none wanted
        self.gated = False              # a change asked for it: start_time() holds it
        self.changes = False            # the wanted run is for changes
        self.last_start = -NEVER        # the start of the latest run for changes
        self.running_changes = False    # the running clearer's run is for changes
        self.retry = Backoff(*RETRY_BACKOFF)      # failed runs in a row
        # Troubles that last, said calmly.
        self.outage = Calm()            # the connection's
        self.unregistered = Calm()      # nothing can be queued for this consumer
        self.misconfigured = Calm()     # a queue of the configuration file is not as it says
        self.never_due = Calm(level=logging.WARNING)    # rows due at infinity
        self.unannounced = Calm(UNANNOUNCED_EVERY, logging.WARNING, after=2)
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
            when, action = self.next_action()
            if when <= time.monotonic():
                action()
            elif self.wait(when) and self.conn is not None:
                self.advance() if self.step else self.read_idle_news()
        log.info("stopped")
        return 0

    def next_action(self):
        """(when, action): what happens next.  The one place that says it."""
        clearers = self.clearers
        events = [(NEVER, None)]
        if clearers.running is not None:
            events.append((clearers.deadline, clearers.kill_running))
            stalled = clearers.progress_at + STALLED * self.heartbeat
            events.append((max(stalled, clearers.stall_said + CALM), clearers.report_stall))
            if not self.commands:
                events.append((clearers.progress_at + STALLED_KILL * self.heartbeat,
                               clearers.kill_stalled))
        if self.stopping:
            pass
        elif self.conn is None:
            events.append((self.connect_at, self.connect))
        elif self.step is not None:
            events.append((self.step_deadline, self.unanswered))
        else:
            events.append((self.heard_at + self.heartbeat, lambda: self.look(heartbeat=True)))
            if self.poked and self.keys_known:
                events.append((self.poke_at, self.poke))
            if self.wanted_at < NEVER and clearers.running is None:
                events.append((start_time(self.wanted_at, self.gated, self.last_start,
                                          self.news_at), self.start_run))
            elif self.idle():
                events.append((self.look_at, self.look))
                # Not beside a run: two Python start-ups on two cores slow both.
                if clearers.warm and clearers.waiter is None:
                    events.append((clearers.waiter_at, clearers.start_waiter))
        return min(events, key=lambda event: event[0])

    def idle(self):
        """No run is wanted or running: only then do notifications carry news."""
        return self.wanted_at == NEVER and self.clearers.running is None

    def wait(self, until):
        """Sleep in select() until a signal, a child's exit, the connection, or until.

        Returns whether the connection has something for us: the answer to
        the step in flight, or (while idle) notifications.  While a run is
        wanted or running, notifications carry no news: they stay in the
        socket, read in one go when it starts.
        """
        timeout = None if until == NEVER else max(0.0, until - time.monotonic())
        conn = [self.conn] if self.conn is not None and (self.step or self.idle()) else []
        reading, writing = (([], conn) if self.step and self.writing else (conn, []))
        running = self.clearers.running
        progress = [running.progress] if running and running.progress is not None else []
        readable, writable, _ = select.select([self.wakeup] + reading + progress, writing, [],
                                              timeout)
        if progress and progress[0] in readable:
            self.clearers.read_progress()
        return bool(conn) and (conn[0] in readable or conn[0] in writable)

    def connect(self):
        """Connect, then LISTEN: the steps "connect" and "listen"."""
        try:
            # Its own name, whatever the DSN says: --check counts daemons by it.
            self.conn = connect(self.config.dsn, async_=1,
                                application_name=daemon_name(self.config.consumer))
        except psycopg2.Error as e:
            self.connect_failed(e)
            return
        self.begin("connect")

    def begin(self, step, query=None, params=None):
        """Send a statement (none for "connect"); the loop waits a heartbeat for its answer."""
        self.step, self.step_deadline = step, time.monotonic() + self.heartbeat
        try:
            if query is not None:
                self.cursor.execute(query, params)
        except psycopg2.Error as e:
            self.step_failed(e)
            return
        self.advance()

    def advance(self):
        """Poll the step in flight; once answered, go on from it."""
        try:
            state = self.conn.poll()
        except psycopg2.Error as e:
            self.step_failed(e)
            return
        if state != psycopg2.extensions.POLL_OK:
            self.writing = state == psycopg2.extensions.POLL_WRITE
            return
        step, self.step, self.writing = self.step, None, False
        self.heard_at = time.monotonic()
        if step == "connect":
            self.cursor = self.conn.cursor()
            self.begin("listen", self.listen_sql)
        elif step == "listen":
            self.listening()
        elif step == "keys":
            self.keys_read()
        elif step == "poke":
            self.poked.clear()
            if self.idle():     # its own notification came with the answer
                self.read_idle_news()
        else:
            self.looked()

    def unanswered(self):
        """The step in flight has had no answer for a heartbeat."""
        self.step_failed(psycopg2.OperationalError(
            "no answer from the server in %g s" % self.heartbeat))

    def step_failed(self, error):
        """A step failed: the connection is lost, or (a statement's error) look again later."""
        step, self.step, self.writing = self.step, None, False
        if step in ("connect", "listen", None):
            self.connect_failed(error)
        elif error.pgcode is None:      # no answer, or no connection
            self.drop_connection(one_line(error))
        else:
            self.heard_at = time.monotonic()
            retry = LOCKED_RETRY if error.pgcode == LOCK_NOT_AVAILABLE else self.heartbeat
            if step == "poke":
                log.warning("cannot queue a row for a notification: %s; again in %g s",
                            db_error(error), retry)
                self.poke_at = self.heard_at + retry
                return
            log.warning("cannot look at the queue: %s; again in %g s", db_error(error), retry)
            self.look_at = self.heard_at + retry

    def connect_failed(self, error):
        reason = self.describe(error, self.conn)
        self.close_connection()
        delay = self.reconnect.failed()
        self.connect_at = time.monotonic() + delay
        self.outage.failed("cannot listen: %s; retrying in %.1f s" % (reason, delay))

    def listening(self):
        """LISTEN went through: catch up, since notifications sent meanwhile are lost."""
        self.reconnect.reset()
        self.outage.ended("the server answers again")
        log.info("listening on channel %s%s", ", ".join([CHANNEL] + list(self.channels)),
                 self.where(self.conn))
        self.look_at = 0.0
        # A notification on a listen channel may have been missed meanwhile.
        self.poked, self.poke_at = set(self.channels.values()), 0.0
        # A run that failed against the lost server may go at once.
        self.retry.reset()
        if self.wanted_at < NEVER:
            self.wanted_at, self.gated = min(self.wanted_at, time.monotonic()), False

    def describe(self, error, conn):
        """One line for a connection's error: which host, and a hint where one helps."""
        text = one_line(error)
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

    def drop_connection(self, reason):
        """Log a lost connection and schedule the first reconnect."""
        # The server says why in a notice (idle-session timeout, administrator
        # command); libpq's exception says only that the connection closed.
        said = [n for n in self.conn.notices if "terminating connection" in n]
        if said:
            reason = one_line(said[-1].split(":", 1)[-1])
        self.outage.failed("connection lost: %s%s" % (reason, self.where(self.conn)))
        self.close_connection()
        self.connect_at = time.monotonic() + self.reconnect.failed()

    def close_connection(self):
        if self.conn is not None:
            self.conn.close()
        self.conn = self.cursor = self.step = None
        self.writing = False

    def read_news(self):
        """Read what the server sent; what its notifications mean to this consumer.

        "due": rows due now for it; "look": rows perhaps due later; None: nothing
        for it (another consumer's rows, or no notification).
        """
        if self.conn is None:
            return None
        if self.step is None:   # else the step's poll reads them
            try:
                self.conn.poll()
            except psycopg2.Error as e:
                self.drop_connection(one_line(e))
                return None
            self.heard_at = time.monotonic()
        payloads = {n.payload for n in self.conn.notifies if n.channel == CHANNEL}
        self.poked.update(self.channels[n.channel] for n in self.conn.notifies
                          if n.channel in self.channels)
        self.conn.notifies.clear()
        if self.config.consumer in payloads:
            return "due"
        return "look" if LATER in payloads or "" in payloads else None

    def read_idle_news(self):
        """Notifications while idle: a run for changes, or a look at the queue."""
        news = self.read_news()
        if news == "due":
            self.want_run(time.monotonic(), changes=True)
        elif news == "look":
            self.look_at = 0.0

    def look(self, heartbeat=False):
        """Ask when the earliest row falls due (the step "look"), checking the queues first
        while they are not known to be as configured (the step "keys")."""
        self.heartbeat_look = heartbeat
        self.cursor = self.conn.cursor()
        if self.keys_known:
            self.begin("look", self.look_sql, {"c": self.config.consumer})
        else:
            self.begin("keys", KEYS_QUERY, [[queue.table for queue in self.config.queues]])

    def poke(self):
        """Queue a row in each queue a listen channel made due (the step "poke"): the
        queue is the truth, and its trigger's notification starts the run."""
        self.cursor = self.conn.cursor()
        self.begin("poke", psycopg2.sql.SQL("; ").join(
            psycopg2.sql.SQL("INSERT INTO {} (consumer) VALUES (%(c)s)").format(
                table(self.config.queues[i].table)) for i in sorted(self.poked)),
            {"c": self.config.consumer})

    def keys_read(self):
        """Its clearers would exit 2 on a queue not as configured: say why, look again later."""
        try:
            take_keys(self.config.queues, self.cursor.fetchall())
        except ConfigError as e:
            self.misconfigured.failed(str(e))
            self.look_at = self.heard_at + self.heartbeat
            return
        self.misconfigured.ended("the queues are as configured")
        self.keys_known = True
        self.begin("look", self.look_sql, {"c": self.config.consumer})

    def looked(self):
        """Run the clearer now, or set the timer for the earliest row."""
        wait, never, unregistered = self.cursor.fetchone()
        now = self.heard_at
        if not self.idle():
            return      # a run is coming anyway, and it looks again after
        heard, self.news_at = self.news_at, None
        announced = self.read_news() == "due"
        if unregistered:
            # Nothing is queued for it; it looks again at every heartbeat.
            self.unregistered.failed(unregistered_reason(self.config.consumer))
            self.look_at = NEVER
            return
        self.unregistered.ended("consumer %r is registered" % self.config.consumer)
        if never:
            self.never_due.failed("%s due at infinity, which is never: no run clears them"
                                  % count(never, "row"))
        else:
            self.never_due.ended("no row is due at infinity any more")
        if wait is None or wait > 0:
            self.look_at = NEVER if wait is None else now + wait + DUE_MARGIN
            log.debug("queue: %s", "nothing due" if wait is None
                      else "next rows due in %.1f s" % wait)
            return
        if self.heartbeat_look and not announced:
            log.info("heartbeat found rows due: clearing")
            self.unannounced.failed(
                "rows were due that no notification announced: is LISTEN going through"
                " PgBouncer in transaction pooling, which cannot carry it?  Clearing at"
                " each heartbeat meanwhile")
        self.look_at = NEVER
        self.want_run(now, changes=announced or heard is not None, news_at=heard)

    def want_run(self, now, changes, news_at=None):
        """Ask for a run; a change's run waits as start_time() says."""
        if self.wanted_at == NEVER:
            self.wanted_at, self.gated, self.news_at = now, changes, news_at
        self.changes = self.changes or changes

    def start_run(self):
        """Start the wanted run, unless changes still pour in or the connection just went."""
        now = time.monotonic()
        news = self.read_news()
        if self.conn is None:
            return      # none starts while disconnected: the catch-up comes after
        if news == "due":
            self.changes = True
            if self.gated:
                self.news_at = now
                if start_time(self.wanted_at, True, self.last_start, now) > now:
                    return
        # Its snapshot comes later: it covers every notification read so far.
        self.wanted_at, self.gated, self.news_at = NEVER, False, None
        self.running_changes, self.changes = self.changes, False
        if self.running_changes:
            self.last_start = now
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
            self.keys_known = False     # a queue may have changed: look at them again
        if code != 0:
            self.fail_run("clearer pid %d exited with %s" % (pid, exit_status(code)))
            return
        log.debug("clearer pid %d done", pid)
        self.retry.reset()
        # Rows may have come due or been queued while it ran (its own
        # re-clears too); changes that kept coming call for a pause.
        if self.read_news() == "due" and self.running_changes:
            self.news_at = time.monotonic()
        self.look_at = 0.0

    def fail_run(self, reason):
        """Retry a failed run later, backing off, so a stuck port cannot spin us."""
        delay = self.retry.failed()
        self.wanted_at, self.gated, self.changes = time.monotonic() + delay, False, False
        log.error("%s; retrying in %.1f s", reason, delay)

    def install_signals(self):
        """Let signals and child exits wake select() through a pipe."""
        self.wakeup, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: self.signals.add(signum))
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def handle_signals(self):
        """Empty the pipe that woke select(), and act on the signals the handlers marked."""
        while True:
            try:
                if not os.read(self.wakeup, 512):
                    break
            except BlockingIOError:
                break
        signals, self.signals = self.signals, set()
        if signal.SIGHUP in signals:
            log.info("SIGHUP: clearing now")
            self.wanted_at, self.gated = 0.0, False
        if signals & STOP_SIGNALS and not self.stopping:
            running = self.clearers.running
            log.info("stopping on signal%s", "" if running is None
                     else ", after clearer pid %d ends" % running.pid)
            self.stopping = True
            self.close_connection()
            self.clearers.dismiss_waiter()
