"""Delete the cached pages that the rows queued in ports_cache_clearing name.

One SERIALIZABLE transaction: read the distinct keys of the rows that are
due (a port's category and name), delete the pages their templates name,
delete the due rows the transaction saw, queue one re-clear per change,
commit.  Rows queued meanwhile are not in the snapshot and stay for the next
run.  Run it by hand for a one-off flush; the daemon, listen_clear_cache.py,
runs it too.  --config FILE names other queues too, each with its pages and
a command: one transaction covers them all.

A page template is a path under the cache directory, such as
{category}/{port}/* (the default) or categories/{category}/*; only its last
component may hold glob characters, and one ending in / names a directory.
With CATEGORY/PORT arguments (or --queue TABLE NAME=VALUE ...) it clears just
those and leaves the queue alone.  --schema prints schema.sql, the checkout's
or the one pip installed, for psql.  Exit status: 0 all handled, 1 database
error or a key left queued, 2 usage or configuration error.
"""

import argparse
import bisect
import collections
import datetime
import fnmatch
import itertools
import logging
import math
import os
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import check
from .config import (DEFAULT_GIVE_UP, DEFAULT_QUEUE, Parser, add_common_options, env_flag,
                     load_config, seconds, seconds_setting, setup_logging)
from .errors import (DATABASE_ERROR, RETRY_BACKOFF, Backoff, ConfigError, UsageError, count,
                     cut, db_error, one_line, psycopg2, require_psycopg2, shown)
from .pages import Cache, open_cache_dir
from .queues import (NO_IDLE_TIMEOUTS, ROOM_TO_SORT, TAKE_TURNS, check_consumer, connect,
                     delete_due, key_text, lock_timeout, queue_again_after, read_any_value,
                     read_keys, record_failures, select_due, update_queues, warm_up)

ATTEMPTS = 5    # serialization failures and deadlocks retry the whole run
RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected
WARM_NAME = "clear_cache.py (warm)"     # application_name of the daemon's waiting clearer
KEY_BACKOFF = Backoff(*RETRY_BACKOFF)   # a failing key's own

log = logging.getLogger("clear_cache")


def main(argv=None):
    if check.wanted(argv):
        return check.main(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.schema:
            return print_schema()
        stamps = env_flag("CLEAR_CACHE_TIMESTAMPS", True)
    except (UsageError, ConfigError) as e:
        return parser.exit(2, "%s: error: %s (see --help)\n" % (parser.prog, e))
    setup_logging(args.verbosity, stamps)
    by_hand = bool(args.ports or args.queue)
    try:
        config = load_config(args, dsn=not by_hand, give_up=seconds_setting(
            args.give_up_after, "CLEAR_CACHE_GIVE_UP_AFTER", DEFAULT_GIVE_UP,
            seconds(0, strict=True)))
        if by_hand:
            items, targets, commands = keys_by_hand(config, args.queue, args.ports)
        else:
            require_psycopg2()
            give_up = GiveUp(config.give_up)
            word, ahead = wait_for_word(config, give_up) if args.warm else (True, {})
            if not word:
                return 0        # the daemon needs no run
        started = time.monotonic()
        progress = Progress()
        progress("starting the run")
        # Opened only now: the operator may have swapped it while we waited.
        cache = Cache(open_cache_dir(config.cache_dir, write=not args.dry_run),
                      config.cache_dir, args.dry_run,
                      logging.DEBUG if args.for_daemon else logging.ERROR, progress)
        rows, failed = ((0, cache.clear(items, targets, commands)) if by_hand
                        else flush_queue(config, cache, give_up, args.for_daemon, **ahead))
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except DATABASE_ERROR as e:
        log.error("database error: %s", db_error(e))
        return 1
    noun = "key" if config.source else "port"
    if args.dry_run:
        log.info("dry run: would clear %s, would remove %s; nothing changed in %d ms%s",
                 count(len(cache.cleared), noun), count(cache.files, "file"),
                 (time.monotonic() - started) * 1000, listed_keys(config, cache.cleared))
        return 1 if failed else 0
    log.info("cleared %s, deleted %s, removed %s%s in %d ms%s%s",
             count(len(cache.cleared), noun), count(rows, "row"), count(cache.files, "file"),
             ", %s %s" % (count(len(failed), noun), "retried alone" if args.for_daemon
                          else "left queued") if failed else "",
             (time.monotonic() - started) * 1000, requeued(cache),
             listed_keys(config, cache.cleared))
    # The daemon's runs go on: each failed key is queued again, to be retried alone.
    return 1 if failed and not args.for_daemon else 0


CHEAP_TO_COUNT = 100000  # keys a run's line counts by queue; a backlog's would cost 0.2 s


def listed_keys(config, items, shown_keys=3):
    """': queue KEY, KEY, KEY and N more; queue ...' for a run's line; '' for none.

    The first keys met, not the least: never a sort of a backlog.
    """
    if not items:
        return ""
    if len(config.queues) == 1:
        counts = {0: len(items)}
    elif len(items) <= CHEAP_TO_COUNT:
        counts = collections.Counter(index for index, _ in items)
    else:   # a backlog over several queues: the first few keys met, with their queues
        first = list(itertools.islice(items, shown_keys))
        return ": %s and %d more" % (", ".join("%s %s" % (config.queues[index].table,
                                                          key_shown(key))
                                               for index, key in first),
                                     len(items) - len(first))
    parts = []
    for index in sorted(counts):
        first = itertools.islice((key for i, key in items if i == index), shown_keys)
        texts = [key_shown(key) for key in first if key]
        line = config.queues[index].table       # a queue without keys: its name alone
        if texts:
            more = counts[index] - len(texts)
            line += " " + ", ".join(texts) + (" and %d more" % more if more else "")
        parts.append(line)
    return ": " + "; ".join(parts)


def requeued(cache):
    """', 2 re-clears due in 5 s' for a run's line, from {delay: re-clears}."""
    if not cache.requeued:
        return ""
    return ", %s due in %s" % (count(sum(cache.requeued.values()), "re-clear"),
                               " or ".join("%g s" % d for d in sorted(cache.requeued)))


def key_shown(key):
    """A key as a run's line shows it: its values as JSON, cut."""
    # A key by hand is (name, value) pairs; from the queue, its values.
    return cut(key_text([v for _, v in key] if key and isinstance(key[0], tuple) else key), 100)


def build_parser():
    parser = Parser(description=__doc__)
    add_common_options(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be removed, change nothing")
    parser.add_argument("ports", nargs="*", metavar="CATEGORY/PORT",
                        help="clear just these ports (NAME=VALUE with --queue); the queue is"
                        " not read")
    parser.add_argument("--queue", metavar="TABLE", help="clear by hand what the"
                        " configuration's queue TABLE clears for the keys given as"
                        " NAME=VALUE arguments (a date as YYYY-MM-DD); the queue is not read")
    parser.add_argument("--give-up-after", metavar="SECONDS", type=seconds(0, strict=True),
                        help="give up, exit 1, if the server has not answered a run's first"
                        " statement this long after the run began, or a lock is not granted"
                        " in as long (default: $CLEAR_CACHE_GIVE_UP_AFTER, then %g)"
                        % DEFAULT_GIVE_UP)
    parser.add_argument("--schema", action="store_true", help="print schema.sql (the"
                        " checkout's, else the one pip installed in share/listen_clear_cache/"
                        " with contrib/) and exit: clear_cache --schema | psql -v"
                        " ON_ERROR_STOP=1")
    check.add_options(parser)   # for --help: main() hands a --check to check.main()
    # The daemon's business: connect, then wait for a byte on stdin before
    # the run; end of file: exit 0, no run.
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    # The daemon's runs: a failed key is retried alone, on a backoff of its own.
    parser.add_argument("--for-daemon", action="store_true", help=argparse.SUPPRESS)
    return parser


def shipped(name):
    """The path of a file shipped beside the code: in the checkout, else where pip put it."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    # pip installs the data files under the scheme's data path: the venv, the
    # prefix, or with --user the user's.
    for scheme in (None, os.name + "_user"):
        data = sysconfig.get_path("data", scheme) if scheme else sysconfig.get_path("data")
        roots.append(os.path.join(data, "share", "listen_clear_cache"))
    for root in roots:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise ConfigError("no %s beside the code nor under %s" % (name, " or ".join(roots[1:])))


def print_schema():
    """--schema: schema.sql on stdout, for psql."""
    try:
        with open(shipped("schema.sql"), encoding="utf-8") as f:
            sys.stdout.write(f.read())
    except (ConfigError, OSError) as e:
        print("clear_cache: %s" % e, file=sys.stderr)
        return 2
    return 0


def keys_by_hand(config, table, arguments):
    """(items, targets, commands) of a clear by hand.

    CATEGORY/PORT arguments are the keys of ports_cache_clearing, as --queue
    ports_cache_clearing category=CATEGORY port=PORT would give them.
    """
    index, queue = config.queue(table or DEFAULT_QUEUE)
    if table is None:
        keyed = [(arg, dict(zip(("category", "port"), arg.partition("/")[::2])))
                 for arg in arguments]
    else:
        keyed = [(" ".join(arguments), dict(value_argument(a) for a in arguments))]
    items, targets, commands = [], {}, {}
    unusable = Unusable()
    for text, values in keyed:
        missing = queue.placeholders() - set(values)
        if missing:
            raise ConfigError("--queue %s: give %s=VALUE too" % (table, sorted(missing)[0]))
        item = index, tuple(sorted(values.items()))
        if not unusable.file(targets, commands, item, queue, values):
            raise ConfigError("not %s the templates of %s can use: %s" % (
                "values" if table else "a CATEGORY/PORT", queue.table, shown(text)))
        items.append(item)
    unusable.say(dry_run=False)
    return items, targets, commands


def value_argument(arg):
    """(name, value) of a NAME=VALUE argument; a date is written YYYY-MM-DD."""
    name, equals, value = arg.partition("=")
    if not equals:
        raise ConfigError("--queue: expected NAME=VALUE, got %r" % arg)
    try:
        return name, datetime.date.fromisoformat(value)
    except ValueError:
        return name, value


class Unusable:
    """Files what each item's values name, and says once a run what they could not name.

    A value a page template (or the command) cannot use leaves that page out,
    not the item's others; an item whose values nothing can use is invalid,
    and its rows go.  The log stays bounded: a line per queue and template,
    with a count and the first few keys.
    """

    SHOWN = 3

    def __init__(self):
        self.invalid = {}       # table -> [how many keys, the first few]
        self.partial = {}       # (table, template text) -> [how many keys, the first few]

    def file(self, targets, commands, item, queue, values):
        """File {Target: the items naming it} and {item: (argv, timeout)}; False if invalid."""
        found, pages = queue.targets(values)
        argv = queue.argv(values)
        for target in found:
            targets.setdefault(target, []).append(item)
        if argv:
            commands[item] = argv, queue.timeout
        left_out = [page.text for page in pages] + (["command"] if argv is None else [])
        if len(left_out) == len(queue.pages) + bool(queue.command):
            self.note(self.invalid, queue.table, values)
            return False
        for what in left_out:
            self.note(self.partial, (queue.table, what), values)
        return True

    def note(self, found, where, values=None, said=None):
        seen = found.setdefault(where, [0, []])
        seen[0] += 1
        # The first few in sorted order, whatever order the server read them in.
        bisect.insort(seen[1], said or ", ".join("%s=%s" % (k, shown(v))
                                                 for k, v in values.items()))
        del seen[1][self.SHOWN:]

    def say(self, dry_run):
        for table, (n, first) in self.invalid.items():
            log.warning("%s: %s with a value no page can use, %s: %s", table, count(n, "key"),
                        "would be deleted" if dry_run else "deleted unused", self.listed(n, first))
        for (table, what), (n, first) in self.partial.items():
            log.warning("%s: %s %s cannot use the values of %s, its others are cleared: %s",
                        table, "the" if what == "command" else "template", shown(what),
                        count(n, "key"), self.listed(n, first))

    def listed(self, n, first):
        return "; ".join(first) + ("; and %d more" % (n - len(first)) if n > len(first) else "")


class Progress:
    """Tells the daemon what this run is doing, a line a step, through the pipe it gave
    (CLEAR_CACHE_PROGRESS_FD): a clearer that stops saying so is stopped, or blocked."""

    def __init__(self):
        fd = os.environ.get("CLEAR_CACHE_PROGRESS_FD")
        self.fd = int(fd) if fd and fd.isdigit() else None
        # The last line, and when.  The daemon counts from the word: a run of
        # a few milliseconds need not wake it.
        self.said = None, time.monotonic()

    def __call__(self, doing):
        if self.fd is None:
            return
        now = time.monotonic()
        if now < self.said[1] + 0.05:
            return      # a line wakes the daemon: one a twentieth of a second is plenty
        self.said = doing, now
        try:
            os.write(self.fd, (doing[:200] + "\n").encode(errors="replace"))
        except OSError:
            pass        # the daemon is gone or busy: nothing to tell


class GiveUp:
    """A run's deadline: exit 1 unless the server answers in time.

    A watchdog thread ends the process, since the main one may be stuck in
    libpq: a paused pooler, a lock.  Armed at the start of each attempt (or at
    the daemon's word), disarmed once the server has answered its first
    statement.  Started ahead, so that arming it starts no thread on the way
    from a change to its page gone.
    """

    def __init__(self, seconds):
        self.seconds = seconds
        self.deadline = None
        self.changed = threading.Condition()
        threading.Thread(target=self.watch, daemon=True).start()

    def arm(self):
        with self.changed:
            if self.deadline is None:
                self.deadline = time.monotonic() + self.seconds
                self.changed.notify()

    def answered(self):
        with self.changed:
            self.deadline = None

    def watch(self):
        with self.changed:
            while self.deadline is None or time.monotonic() < self.deadline:
                self.changed.wait(None if self.deadline is None
                                  else self.deadline - time.monotonic())
        log.error("gave up: the server did not answer in %g s (a paused connection pooler?"
                  " a lock?)", self.seconds)
        logging.shutdown()
        os._exit(1)


def wait_for_word(config, give_up):
    """The daemon's waiting clearer: connect ahead, and wait for the word on stdin.

    The word is one byte; end of file means the daemon needs no run (it stops,
    or it died).  The run's deadline starts with the word, so a connection
    still under way counts against it.  Returns (word given, what was
    prepared: flush_queue's conn and layout, those that could be).
    """
    ahead = {}
    connecting = threading.Thread(target=connect_ahead, args=(config, ahead), daemon=True)
    connecting.start()
    # fnmatch compiles and caches each pattern on first use: the templates'
    # literal last components are the patterns of most runs.
    for queue in config.queues:
        for page in queue.pages:
            if page.glob:
                fnmatch.fnmatchcase("", page.components[-1].literal)
    if not os.read(sys.stdin.fileno(), 1):
        return False, {}
    give_up.arm()
    connecting.join()
    return True, ahead


def connect_ahead(config, ahead):
    """Connect, and let the new backend fill its caches; ahead["conn"] if it worked."""
    conn = None
    try:
        conn = connect(config.dsn, fallback_application_name=WARM_NAME)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(NO_IDLE_TIMEOUTS)
            ahead["layout"] = layout = read_keys(cur, config.queues)
            # A new backend plans its first queries slowly while it fills its
            # caches, and compiles the queues' triggers at their first call:
            # let it do that now.  No snapshot stays, no row is written.
            warm_up(cur, layout, config.consumer)
        ahead["conn"] = conn
    except ConfigError:
        ahead["conn"] = conn    # the run says what is wrong
    except psycopg2.Error as e:
        log.warning("cannot prepare ahead, connecting again at the run: %s", one_line(e))
        if conn is not None:
            conn.close()


def flush_queue(config, cache, give_up, alone=False, conn=None, layout=None):
    """Clear every queue's due keys in one transaction; return (rows deleted, failed keys).

    conn, if given, was opened before the run was asked for; should it turn
    out to be dead, the run connects again.  Each attempt must have its first
    statement answered within config.give_up seconds (GiveUp); once it has,
    the run works on to its end.
    """
    ahead = conn is not None
    try:
        for attempt in range(1, ATTEMPTS + 1):
            give_up.arm()
            cache.progress("connecting")
            try:
                # libpq rounds a connect_timeout under 2 s up to 2: the timer holds.
                conn = conn or connect(config.dsn, connect_timeout=math.ceil(config.give_up))
                # clear_snapshot sends BEGIN itself, with the lock_timeout.
                conn.autocommit = True
                with conn.cursor() as cur:
                    layout = layout or read_keys(cur, config.queues)
                    try:
                        return clear_snapshot(cur, cache, config, layout, give_up.answered,
                                              alone)
                    except BaseException:
                        roll_back(cur)
                        raise
            except psycopg2.Error as e:
                if ahead and e.pgcode is None and attempt == 1:
                    # It died unseen while we waited (no word from the server).
                    log.info("connecting again: %s", one_line(e))
                    conn.close()
                    conn = None
                    continue
                if e.pgcode not in RETRYABLE or attempt == ATTEMPTS:
                    raise
                # Routine when two runs overlap; the last attempt's failure is the error.
                log.info("retrying after %s (attempt %d)", db_error(e), attempt)
                time.sleep(0.05 * attempt)
    finally:
        give_up.answered()
        if conn is not None:
            conn.close()


def roll_back(cur):
    """End a failed transaction, if the connection still can."""
    try:
        cur.execute("ROLLBACK")
    except psycopg2.Error:
        pass


def name_keys(cur, layout, unusable):
    """({item: queued by a change, not only by a re-clear}, {Target: items}, {item:
    command}) of the due rows cur read; an item whose values name nothing is left out."""
    changed = {}
    generated = {}  # item -> its generated columns' values
    for row in cur:
        if row[2] is not None:  # a text too long to name anything: its row goes
            unusable.note(unusable.invalid, layout.queues[row[0]].table, said=row[2])
            continue
        item = layout.item(row)
        changed[item] = changed.get(item, False) or not row[1]
        generated[item] = layout.generated(row)
    targets, commands = {}, {}
    for item in list(changed):
        queue, values = layout.queues[item[0]], layout.values(item, generated[item])
        if not unusable.file(targets, commands, item, queue, values):
            del changed[item]   # it can never name a cache entry: it goes with the batch
    return changed, targets, commands


def clear_snapshot(cur, cache, config, layout, answered, alone=False):
    """Clear the keys due in this transaction's snapshot, delete their rows, queue re-clears.

    alone: a failed key is queued again, to be retried on a backoff of its own.
    """
    # The first answer proves the server reachable (no paused pooler): a cheap
    # statement, so that the deadline never cuts short the SELECT of a large
    # backlog.  A lock not granted within give_up fails the run: it is retried.
    cur.execute("BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL lock_timeout = %s",
                [lock_timeout(config.give_up)])
    answered()
    cache.progress("waiting for any other clearer's commit")
    cur.execute(TAKE_TURNS + "; " + ROOM_TO_SORT)  # the lock before the snapshot
    cache.progress("reading the queues")
    # Deduplicate in the database: a backlog can hold a million rows.
    read_any_value(cur)
    cur.execute(select_due(layout), {"c": config.consumer})
    if not cur.rowcount:
        check_consumer(cur, config.consumer)
    unusable = Unusable()
    if cache.dry_run:
        changed, targets, commands = name_keys(cur, layout, unusable)
        unusable.say(cache.dry_run)
        cache.progress("clearing %s" % count(len(changed), "key"))
        failed = cache.clear(changed, targets, commands)
        cur.execute("ROLLBACK")
        return 0, failed
    # Under SERIALIZABLE this deletes only the rows in the snapshot; a row
    # committed after it started stays queued for the next run.  Nothing is
    # committed before the files are gone (and the commands done), so the
    # server may update the queues meanwhile: a large backlog's DELETE runs
    # while the keys are named and their files removed.  The pool's exit
    # waits for it (an error included): the connection is free again only then.
    conn = cur.connection
    with ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(delete_due, conn, config, layout)
        changed, targets, commands = name_keys(cur, layout, unusable)
        unusable.say(cache.dry_run)
        # Its one worker runs this after the DELETE: the failing keys are known.
        queueing = pool.submit(lambda: queue_again_after(conn, changed, config, layout,
                                                         deleting.result()[1]))
        cache.progress("clearing %s" % count(len(changed), "key"))
        failed = cache.clear(changed, targets, commands)
    rows, (forgotten, queued) = deleting.result()[0], queueing.result()
    if failed:
        cur.execute("ROLLBACK TO SAVEPOINT snapshot_read")
        retry = retry_alone(cur, cache, config, layout, failed) if alone else None
        rows, forgotten, queued = update_queues(cur.connection, changed, config, layout, failed,
                                                retry)
    cache.progress("committing")
    cur.execute("COMMIT")
    cache.requeued = queued
    for table, key, since, attempts in forgotten:
        log.info("%s %s: cleared, after %s since %s", table, cut(key),
                 count(attempts, "failed attempt"), since.strftime("%H:%M:%S"))
    return rows, failed


def retry_alone(cur, cache, config, layout, failed):
    """Count each failed key's attempt and say so calmly; {item: seconds to its retry}.

    A failing key is said in one line, then once a minute at most, counting
    the lines of every clearer: the database keeps when it was last said.
    """
    delays = {}
    for item, (since, attempts, say) in record_failures(cur, config.consumer, layout,
                                                         failed).items():
        delays[item] = KEY_BACKOFF.delay(attempts)
        log.log(logging.ERROR if say else logging.DEBUG,
                "%s %s failing: %s; retrying it alone in %.1f s%s",
                layout.queues[item[0]].table, cut(key_text(item[1])),
                cache.reasons.get(item) or "failed", delays[item],
                " (since %s, %d attempts)" % (since.strftime("%H:%M:%S"), attempts)
                if attempts > 1 else "")
    return delays
