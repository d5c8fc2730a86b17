#!/usr/bin/env python3
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
those and leaves the queue alone.  Exit status: 0 all handled, 1 database
error or a key left queued, 2 usage or configuration error.
"""

import argparse
import configparser
import dataclasses
import datetime
import errno
import fnmatch
import glob
import logging
import math
import os
import re
import shlex
import stat
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor     # not lazily, in the run

try:
    import psycopg2
    import psycopg2.extensions
except ImportError:     # said only where it is needed: --help and CATEGORY/PORT work without
    psycopg2 = None
DATABASE_ERROR = psycopg2.Error if psycopg2 is not None else ()

__version__ = "1.0.0"    # the one version of both scripts (pyproject.toml reads it)
NAME_MAX = 255
ATTEMPTS = 5    # serialization failures and deadlocks retry the whole run
RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected
UNDEFINED = {"42P01", "42703", "42883"}  # undefined_table, _column, _function
UNLINK_THREADS = 3      # for a large batch: unlinking written-back pages waits on the disk
THREADS_FROM = 1000     # targets per thread at least: a small batch takes one
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
SUBDIR_FLAGS = DIR_FLAGS | os.O_NOFOLLOW
DEFAULT_PAGES = ["{category}/{port}/*"]
DEFAULT_AGAIN_AFTER = 5.0
DEFAULT_GIVE_UP = 30.0
DEFAULT_TIMEOUT = 60.0  # seconds each run of a queue's command may take
DEFAULT_QUEUE = "ports_cache_clearing"
PORT_KEYS = (("category", "text"), ("port", "text"))
QUEUE_OPTIONS = ("pages", "command", "again_after", "timeout")
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?\Z")
DIRECTORY = "/"         # a target's pattern when its template names a directory
RESERVED = ("later",)   # a notification's payload: no consumer may be called that
WARM_NAME = "clear_cache.py (warm)"     # application_name of the daemon's waiting clearer
GLOB = re.compile(r"[*?[]")
FLAGS = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}
# This consumer's due rows; now() is the transaction's start, the snapshot's time.
DUE = "consumer = %(c)s AND due_at <= now()"
# Each queue's key columns and their types; whether it exists and is a queue.
KEYS_QUERY = (
    "SELECT c.oid IS NOT NULL, EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid"
    " AND t.tgname = c.relname || '_notify'),"
    " ARRAY(SELECT k.name::text FROM cache_clearing_keys(c.oid) k),"
    " ARRAY(SELECT k.type FROM cache_clearing_keys(c.oid) k)"
    " FROM unnest(%s::text[]) WITH ORDINALITY AS q(name, i)"
    " LEFT JOIN pg_class c ON c.oid = to_regclass(q.name) ORDER BY q.i")
OK, WARNING, CRITICAL, UNKNOWN = range(4)     # Nagios plugin exit codes
STATUS = ["OK", "WARNING", "CRITICAL", "UNKNOWN"]
# For each consumer: its due rows in every queue, the age of the oldest in
# seconds, and the daemons listening for it (by application_name, the second
# array).
CHECK_QUERY = (
    "SELECT c.name, count(q.*), coalesce(EXTRACT(epoch FROM now() - min(q.due_at)), 0)::float8,"
    " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name = c.daemon)"
    " FROM unnest(%s::text[], %s::text[]) AS c(name, daemon)"
    " LEFT JOIN ({queues}) q ON q.consumer = c.name AND q.due_at <= now()"
    " GROUP BY c.name, c.daemon ORDER BY c.name")
REGISTERED = "SELECT name FROM cache_consumers ORDER BY name"
# True when nothing is queued for consumer %(c)s: '' while names are
# registered, or a name that is not registered (none may be).
UNREGISTERED = ("CASE WHEN %(c)s = '' THEN EXISTS (SELECT FROM cache_consumers)"
                " ELSE NOT EXISTS (SELECT FROM cache_consumers WHERE name = %(c)s) END")
# Sessions that wait on purpose; set_config, since PostgreSQL 13 has no
# idle_session_timeout.
NO_IDLE_TIMEOUTS = ("SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN"
                    " ('idle_session_timeout', 'idle_in_transaction_session_timeout')")
UNSAFE = re.compile(r"[/\x00-\x1f\x7f]")    # a slash, or a control character
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

log = logging.getLogger("clear_cache")


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        stamps = env_flag("CLEAR_CACHE_TIMESTAMPS", True)
    except (UsageError, ConfigError) as e:
        if wants_check(argv):
            return report(UNKNOWN, str(e))      # Nagios reads 2 as CRITICAL
        return parser.exit(2, "%s: error: %s (see --help)\n" % (parser.prog, e))
    setup_logging(args.verbosity, stamps)
    if args.check:
        return check_queue(args)
    try:
        config = load_config(args, dsn=not (args.ports or args.queue))
        config.give_up = seconds_setting(args.give_up_after, "CLEAR_CACHE_GIVE_UP_AFTER",
                                         DEFAULT_GIVE_UP, seconds(0, strict=True))
        items = by_hand(config, args.queue, args.ports) if args.ports or args.queue else None
        if items is None:
            require_psycopg2()
        give_up = GiveUp(config.give_up)
        word, conn = wait_for_word(config, give_up) if args.warm else (True, None)
        if not word:
            return 0        # the daemon needs no run
        started = time.monotonic()
        # Opened only now: the operator may have swapped it while we waited.
        clearer = Clearer(open_cache_dir(config.cache_dir, write=not args.dry_run),
                          config.cache_dir, args.dry_run)
        rows, failed = ((0, clearer.clear(*items)) if items is not None
                        else flush_queue(config, clearer, give_up, conn))
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except DATABASE_ERROR as e:
        log.error("database error: %s", db_error(e))
        return 1
    noun = "key" if config.source else "port"
    log.info("%scleared %s, deleted %s, removed %s%s in %d ms",
             "dry run: " if args.dry_run else "", count(len(clearer.cleared), noun),
             count(rows, "row"), count(clearer.files, "file"),
             ", %s left queued" % count(len(failed), noun) if failed else "",
             (time.monotonic() - started) * 1000)
    return 1 if failed else 0


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
    check = parser.add_argument_group("monitoring (Nagios plugin conventions: one line on"
                                      " stdout; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)")
    check.add_argument("--check", action="store_true", help="report the due rows and the"
                       " listening daemons of the consumer, or of every registered one;"
                       " change nothing; no cache directory needed")
    check.add_argument("--warn", metavar="SECONDS", type=seconds(0), default=60.0,
                       help="WARNING when the oldest due row is this old (default: 60)")
    check.add_argument("--crit", metavar="SECONDS", type=seconds(0), default=300.0,
                       help="CRITICAL when it is this old (default: 300)")
    # The daemon's business: connect, then wait for a byte on stdin before
    # the run; end of file: exit 0, no run.
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    return parser


def wants_check(argv):
    """Did a command line that failed to parse ask for --check?  argparse's own reading."""
    parser = Parser(add_help=False)
    parser.add_argument("--check", action="store_true")
    try:
        return parser.parse_known_args(argv)[0].check
    except UsageError:
        return False


def report(status, text):
    """--check's one line on stdout; returns the exit status."""
    print("CLEAR_CACHE %s - %s" % (STATUS[status], text))
    return status


def require_psycopg2():
    if psycopg2 is None:
        raise ConfigError("psycopg2 is not installed for %s: run `make venv` and use"
                          " .venv/bin/python" % sys.executable)


def check_queue(args):
    """--check: one line on stdout about the due rows and the listening daemons."""
    if args.warn > args.crit:
        return report(UNKNOWN, "--warn %g is above --crit %g" % (args.warn, args.crit))
    try:
        config = load_config(args, cache=False)
        require_psycopg2()
        conn = connect(config.dsn, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                consumers, unregistered = [config.consumer], False
                if config.consumer:
                    cur.execute("SELECT " + UNREGISTERED, {"c": config.consumer})
                    unregistered = cur.fetchone()[0]
                else:   # every registered consumer, or '' while none is
                    cur.execute(REGISTERED)
                    consumers = [name for name, in cur] or [""]
                cur.execute(CHECK_QUERY.format(queues=config.union()),
                            [consumers, [daemon_name(c) for c in consumers]])
                rows = cur.fetchall()
        finally:
            conn.close()
    except ConfigError as e:
        return report(UNKNOWN, str(e))
    except DATABASE_ERROR as e:
        return report(UNKNOWN, db_error(e))
    worst, trouble = OK, []
    for name, due, oldest, listeners in rows:
        status = (CRITICAL if not listeners or oldest >= args.crit
                  else WARNING if oldest >= args.warn else OK)
        worst = max(worst, status)
        if status != OK and len(rows) > 1:
            trouble.append("%s: %s" % (name, "no listener" if not listeners
                                       else "oldest due %d s" % oldest))
    if unregistered:
        worst = CRITICAL
        trouble.append(unregistered_reason(config.consumer))
    due = sum(r[1] for r in rows)
    oldest = max(r[2] for r in rows)
    listeners = sum(r[3] for r in rows)
    return report(worst, "%s due, oldest due %d s, %s%s | due=%d oldest=%ds;%g;%g"
                  " listeners=%d" % (count(due, "row"), oldest, count(listeners, "listener"),
                                     "".join("; " + t for t in trouble), due, oldest,
                                     args.warn, args.crit, listeners))


def daemon_name(consumer):
    """The application_name a daemon sets for itself: it says which consumer it serves."""
    name = "listen_clear_cache.py" + (" " + consumer if consumer else "")
    return name.encode()[:63].decode(errors="ignore")     # PostgreSQL keeps 63 bytes


def count(n, noun):
    """'1 port', '2 ports'."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


class ConfigError(Exception):
    """A usage or configuration error: exit 2, touch nothing."""


class UsageError(Exception):
    """A command line argparse cannot read."""


@dataclasses.dataclass
class Config:
    """What both scripts are told: by option, else by environment, else by default."""

    dsn: str
    cache_dir: str
    queues: list
    again_after: float
    consumer: str
    give_up: float = DEFAULT_GIVE_UP
    source: tuple = None    # (file name, its text) of --config; None: --pages

    def environ(self):
        """The environment that hands this configuration to a clearer.

        The configuration file goes as the text read at start-up: an edited
        file takes effect when the daemon restarts.
        """
        env = dict(os.environ, CLEAR_CACHE_DSN=self.dsn, CLEAR_CACHE_DIR=self.cache_dir,
                   CLEAR_CACHE_AGAIN_AFTER=repr(self.again_after),
                   CLEAR_CACHE_CONSUMER=self.consumer,
                   CLEAR_CACHE_GIVE_UP_AFTER=repr(self.give_up))
        if self.source:
            env.pop("CLEAR_CACHE_PAGES", None)
            env.update(CLEAR_CACHE_CONFIG=self.source[0], CLEAR_CACHE_CONFIG_TEXT=self.source[1])
        else:
            env["CLEAR_CACHE_PAGES"] = " ".join(t.text for t in self.queues[0].templates)
        return env

    def union(self):
        """SQL for the (consumer, due_at) of every queue's rows."""
        return " UNION ALL ".join("SELECT consumer, due_at FROM " + queue.table
                                  for queue in self.queues)

    def queue(self, table):
        """The configuration's queue of that table, by index."""
        for i, queue in enumerate(self.queues):
            if queue.table == table:
                return i, queue
        raise ConfigError("no queue %s in the configuration" % table)


@dataclasses.dataclass
class Queue:
    """A queue table, what its rows clear, and (once read) its key columns."""

    table: str
    templates: list
    command: list = None            # its arguments, as Templates
    again_after: float = None       # None: --again-after's
    timeout: float = DEFAULT_TIMEOUT
    keys: tuple = None              # ((name, type), ...), from the database
    slot: int = 0                   # where its keys start in a row of select_due()

    def placeholders(self):
        return {name for t in self.templates + (self.command or []) for name in t.names}

    def targets(self, values):
        """What its templates name for the values, or None if a value cannot be used."""
        targets = [t.expand(values) for t in self.templates]
        return None if None in targets else targets

    def argv(self, values):
        """Its command for the values ([] for none), or None if a value cannot be used."""
        argv = [t.fill(values) for t in self.command or []]
        return None if None in argv else argv


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors main() reports, in one line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(message)


def add_common_options(parser):
    """Add the options both scripts share."""
    parser.add_argument("--dsn", metavar="DSN", help="libpq connection string "
                        "(default: $CLEAR_CACHE_DSN, then libpq's PG* defaults)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache root (default: $CLEAR_CACHE_DIR)")
    parser.add_argument("--config", metavar="FILE", help="the queues and what each clears,"
                        " an INI file: [TABLE] with pages, command, again_after, timeout"
                        " (default: $CLEAR_CACHE_CONFIG; none: ports_cache_clearing alone)")
    parser.add_argument("--pages", metavar="TEMPLATE", action="append",
                        help="pages to clear for a port, under the cache directory;"
                        " repeatable (default: $CLEAR_CACHE_PAGES, whitespace-separated,"
                        " then %s)" % DEFAULT_PAGES[0].replace("%", "%%"))
    parser.add_argument("--again-after", metavar="SECONDS", type=seconds(0),
                        help="clear a changed port's pages again this much later, for"
                        " renders that raced the clear; 0: never (default:"
                        " $CLEAR_CACHE_AGAIN_AFTER, then %g)" % DEFAULT_AGAIN_AFTER)
    parser.add_argument("--consumer", metavar="NAME", help="this web server's name in"
                        " cache_consumers, when several clear their own caches (default:"
                        " $CLEAR_CACHE_CONSUMER, then '': a single server)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const",
                      const=logging.WARNING, default=logging.INFO,
                      help="print only warnings and errors")
    loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                      const=logging.DEBUG, help="list each port")


def seconds(low, strict=False):
    """An argparse type: a number of seconds above low (or at least low)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low < value if strict else low <= value) or not value < 1e6:
            raise argparse.ArgumentTypeError("expected a number of seconds %s %g, got %r"
                                             % (">" if strict else ">=", low, text))
        return value
    return parse


def env_flag(variable, default):
    """An on/off environment variable: 0/1, no/yes, false/true, off/on, in any case."""
    text = os.environ.get(variable, "")
    if not text:
        return default
    try:
        return FLAGS[text.lower()]
    except KeyError:
        raise ConfigError("%s: expected 0/1, no/yes, false/true or off/on, got %r"
                          % (variable, text)) from None


def setup_logging(level, stamps=True):
    """Set the level of every logger; CLEAR_CACHE_TIMESTAMPS=0 drops the time."""
    stamp = "%(asctime)s " if stamps else ""
    logging.basicConfig(level=level, format=stamp + "%(name)s: %(levelname)s: %(message)s")


def load_config(args, dsn=True, cache=True):
    """The Config from the options, then the environment, then the defaults.

    Without dsn (CATEGORY/PORT arguments), the DSN is neither used nor
    checked; without cache (--check), neither is the cache directory.
    """
    text = args.dsn if args.dsn is not None else os.environ.get("CLEAR_CACHE_DSN", "")
    if dsn and psycopg2 is not None:
        try:
            psycopg2.extensions.parse_dsn(text)
        except psycopg2.ProgrammingError as e:
            why = re.sub(r"^invalid dsn: ", "", one_line(e))     # psycopg2 says it too
            raise ConfigError("invalid DSN: %s" % why) from None
    cache_dir = args.cache_dir or os.environ.get("CLEAR_CACHE_DIR") or ("" if cache else ".")
    if not cache_dir:
        raise ConfigError("no cache directory: give --cache-dir or set CLEAR_CACHE_DIR")
    again_after = seconds_setting(args.again_after, "CLEAR_CACHE_AGAIN_AFTER",
                                  DEFAULT_AGAIN_AFTER, seconds(0))
    consumer = args.consumer if args.consumer is not None else os.environ.get(
        "CLEAR_CACHE_CONSUMER", "")
    if consumer in RESERVED:
        raise ConfigError("consumer %r: the name is reserved (a notification's payload)"
                          % consumer)
    pages = args.pages or os.environ.get("CLEAR_CACHE_PAGES", "").split()
    name = args.config or os.environ.get("CLEAR_CACHE_CONFIG")
    source = None
    if name:
        if pages:
            raise ConfigError("%s: --pages and CLEAR_CACHE_PAGES go without --config: its"
                              " sections name the pages" % name)
        # The daemon hands its clearers the text it read at start-up.
        source = name, os.environ.get("CLEAR_CACHE_CONFIG_TEXT") or read_file(name)
        queues = read_queues(*source)
    else:
        queues = [Queue(DEFAULT_QUEUE, [Template(t, PORT_KEYS) for t in pages or DEFAULT_PAGES],
                        keys=PORT_KEYS)]
    return Config(text, os.path.abspath(cache_dir), queues, again_after, consumer,
                  source=source)


def read_file(name):
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeError) as e:
        raise ConfigError("%s: %s" % (name, getattr(e, "strerror", None) or e)) from None


def read_queues(name, text):
    """The queues an INI file names: [TABLE] with pages, command, again_after, timeout."""
    # No interpolation (% is literal), and no [DEFAULT]: every section is a table.
    ini = configparser.ConfigParser(interpolation=None, default_section="]")
    try:
        ini.read_string(text, name)
    except configparser.Error as e:
        raise ConfigError("%s: %s" % (name, one_line(e))) from None
    queues = []
    for table in ini.sections():
        section = ini[table]
        where = "%s: [%s]" % (name, table)
        if not TABLE_NAME.match(table):
            raise ConfigError("%s: not a table name" % where)
        for option in section:
            if option not in QUEUE_OPTIONS:
                raise ConfigError("%s: unknown option %s; there are %s"
                                  % (where, option, ", ".join(QUEUE_OPTIONS)))
        if not section.get("pages", "").split() and not section.get("command", "").strip():
            raise ConfigError("%s: needs pages or command" % where)
        def parsed(option, parse):
            try:
                return parse(section[option]) if option in section else None
            except (ConfigError, ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError("%s %s: %s" % (where, option, e)) from None
        queue = Queue(table, parsed("pages", lambda t: [Template(p) for p in t.split()]) or [])
        queue.command = parsed("command", lambda t: [Template(a, path=False)
                                                     for a in shlex.split(t)]) or None
        queue.again_after = parsed("again_after", seconds(0))
        queue.timeout = parsed("timeout", seconds(0, strict=True)) or DEFAULT_TIMEOUT
        queues.append(queue)
    if not queues:
        raise ConfigError("%s: no queue: a section [TABLE] for each" % name)
    return queues


def by_hand(config, table, arguments):
    """(items, targets, commands) of a clear by hand: CATEGORY/PORT, or --queue's NAME=VALUE."""
    index, queue = config.queue(table or DEFAULT_QUEUE)
    items, targets, commands = [], {}, {}
    for arg in arguments if table is None else [arguments]:
        if table is None:
            category, _, port = arg.partition("/")
            values = {"category": category, "port": port}
        else:
            values = dict(value_argument(a) for a in arg)
            missing = queue.placeholders() - set(values)
            if missing:
                raise ConfigError("--queue %s: give %s=VALUE too" % (table, sorted(missing)[0]))
        item = index, tuple(sorted(values.items()))
        if not file_item(targets, commands, item, queue, values):
            raise ConfigError("not %s the templates of %s can use: %r" % (
                "a CATEGORY/PORT" if table is None else "values", queue.table,
                arg if table is None else " ".join(arg)))
        items.append(item)
    return items, targets, commands


def file_item(targets, commands, item, queue, values):
    """File what item's values name: {target: the items naming it}, {item: (argv, timeout)}.

    False, filing nothing, if a value cannot be used.
    """
    found, argv = queue.targets(values), queue.argv(values)
    if found is None or argv is None:
        return False
    for target in found:
        targets.setdefault(target, []).append(item)
    if argv:
        commands[item] = argv, queue.timeout
    return True


def value_argument(arg):
    """(name, value) of a NAME=VALUE argument; a date is written YYYY-MM-DD."""
    name, equals, value = arg.partition("=")
    if not equals:
        raise ConfigError("--queue: expected NAME=VALUE, got %r" % arg)
    try:
        return name, datetime.date.fromisoformat(value)
    except ValueError:
        return name, value


def seconds_setting(value, variable, default, parse):
    """An option's number of seconds, else its environment variable's, else default."""
    if value is not None:
        return value
    try:
        return parse(os.environ.get(variable) or str(default))
    except argparse.ArgumentTypeError as e:
        raise ConfigError("%s: %s" % (variable, e)) from None


def open_cache_dir(path, write=True):
    """Open the cache root; a symlink here is the administrator's and is followed."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as e:
        raise ConfigError("cache directory %s: %s" % (path, e.strerror)) from None
    if write and not os.access(path, os.W_OK | os.X_OK):
        os.close(fd)
        raise ConfigError("cache directory %s: not writable by this account (uid %d)"
                          % (path, os.geteuid()))
    return fd


def open_subdir(dir_fd, name):
    """Open directory name under dir_fd; a symlink or a non-directory raises ENOTDIR."""
    try:
        return os.open(name, SUBDIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        raise NotADirectoryError(errno.ENOTDIR, "is a symlink" if link
                                 else "is not a directory") from None


def valid_name(name):
    """Is name exactly one plain path component?"""
    if name in ("", ".", "..") or UNSAFE.search(name):
        return False
    try:
        return len(name) <= NAME_MAX // 4 or len(os.fsencode(name)) <= NAME_MAX
    except UnicodeError:
        return False


def valid_port(category, port):
    """Can (category, port) name a directory of the cache?"""
    return valid_name(category) and valid_name(port)


class Template:
    """A page template, such as categories/{category}/*, or a command's argument.

    Placeholders may stand anywhere, with a format spec ({date:%Y}); {{ and }}
    are braces.  In a page template only the last component may hold glob
    characters, and a value put into it matches only itself (glob.escape); a
    template that ends in / names a directory.  keys, where known at start-up,
    are the names placeholders may take.
    """

    def __init__(self, text, keys=None, path=True):
        self.text = text
        self.directory = path and text.endswith("/")
        if path and (not text or re.search(r"\s", text)):
            self.refuse("empty or has white space")
        if path and text.startswith("/"):
            self.refuse("must be relative to the cache directory")
        self.parts = []     # per component: [(literal text, placeholder or None, spec)]
        components = text[:-1].split("/") if self.directory else text.split("/") if path \
            else [text]
        for i, part in enumerate(components):
            try:
                parsed = list(string.Formatter().parse(part))
            except ValueError as e:
                self.refuse("%s (a brace is written {{ or }})" % e)
            if any(conversion for _, _, _, conversion in parsed):
                self.refuse("no !conversion in a placeholder")
            pieces = [(literal, name, spec) for literal, name, spec, _ in parsed]
            literal = "".join(piece[0] for piece in pieces)
            for _, name, spec in pieces:
                if name is not None and keys is not None and name not in dict(keys):
                    self.refuse("unknown placeholder {%s}; there are %s"
                                % (name, ", ".join("{%s}" % k for k, _ in keys)))
                if path and spec and "/" in spec:
                    self.refuse("{%s:%s}: a / in a format spec" % (name, spec))
            if path and all(name is None for _, name, _ in pieces) and not valid_name(literal):
                self.refuse("%r is no file name" % part)
            if path and GLOB.search(literal) and (i < len(components) - 1 or self.directory):
                self.refuse("glob characters before the last component, or in a directory")
            self.parts.append(pieces)
        self.names = {name for pieces in self.parts for _, name, _ in pieces if name}
        self.glob = path and bool(GLOB.search(literal))

    def refuse(self, why):
        raise ConfigError("template %r: %s" % (self.text, why))

    def render(self, value, spec, path):
        """A placeholder's text, or None when the row's value cannot be used.

        A value is used as str() gives it, with the spec applied; a spec that
        fails for a usable value, or puts a slash into a path, is the
        configuration's fault.
        """
        if value is None:
            return None
        text = str(value)
        if not valid_name(text) if path else CONTROL.search(text):
            return None
        if spec:
            try:
                text = format(value, spec)
            except (TypeError, ValueError) as e:
                self.refuse("{:%s} cannot format %r: %s" % (spec, value, e))
            if CONTROL.search(text) or (path and "/" in text):
                self.refuse("{:%s} makes %r of %r" % (spec, text, value))
        return text

    def join(self, pieces, values, path, escape=False):
        """The pieces with the values put in, or None if a value cannot be used."""
        out = []
        for literal, name, spec in pieces:
            if literal:
                out.append(literal)
            if name is not None:
                text = self.render(values[name], spec, path)
                if text is None:
                    return None
                out.append(glob.escape(text) if escape else text)
        return out[0] if len(out) == 1 else "".join(out)     # a value alone: shared

    def fill(self, values):
        """A command's argument for the values, or None if one cannot be used."""
        return self.join(self.parts[0], values, path=False)

    def expand(self, values):
        """(directories, last component, its fnmatch pattern, DIRECTORY or None).

        None if a value cannot be used: unsafe, too long once the template's
        text is added, or NULL.
        """
        parts = []
        for pieces in self.parts:
            if len(pieces) == 1 and pieces[0][1] is None:
                parts.append(pieces[0][0])      # literal: checked at start-up
            elif len(pieces) == 1 and not pieces[0][0] and not pieces[0][2]:
                part = self.render(values[pieces[0][1]], "", path=True)    # a value alone
                if part is None:
                    return None
                parts.append(part)
            else:
                part = self.join(pieces, values, path=True)
                if part is None or not valid_name(part):
                    return None     # too long, once the template's text is added
                parts.append(part)
        pattern = DIRECTORY if self.directory else None
        if self.glob:   # a port named 'a*' never matches another's page
            pattern = self.join(self.parts[-1], values, path=True, escape=True)
        return tuple(parts[:-1]), parts[-1], pattern


def db_error(e):
    """Describe a psycopg2 error in one line, with a hint where one helps."""
    text = e.diag.message_primary or one_line(e)
    if e.pgcode in UNDEFINED:
        text += " (is schema.sql loaded?)"
    return text


def one_line(error):
    """Squeeze an exception's message onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def connect(dsn, **params):
    """Connect with keepalives, so that a dead peer is noticed while idle."""
    # The DSN or PGAPPNAME may name the application; else the script does.
    params = dict(dict(keepalives=1, keepalives_idle=10, keepalives_interval=5,
                       keepalives_count=3, connect_timeout=10,
                       fallback_application_name=os.path.basename(sys.argv[0])), **params)
    return psycopg2.connect(dsn, **params)


def lock_timeout(seconds):
    """A lock_timeout setting for seconds: never 0, which would mean no limit."""
    return "%dms" % max(1, math.ceil(seconds * 1000))


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
    still under way counts against it.  Returns (word given, the connection or
    None if it could not be made: the run connects again).
    """
    ahead = {}
    connecting = threading.Thread(target=connect_ahead, args=(config, ahead), daemon=True)
    connecting.start()
    for queue in config.queues:     # compile their patterns now: fnmatch caches them
        for template in queue.templates:
            try:
                target = template.expand(dict.fromkeys(queue.placeholders(), "x"))
            except ConfigError:
                continue    # a spec the stand-in value does not fit: the run will tell
            if target and target[2] not in (None, DIRECTORY):
                fnmatch.fnmatchcase("", target[2])
    if not os.read(sys.stdin.fileno(), 1):
        return False, None
    give_up.arm()
    connecting.join()
    return True, ahead.get("conn")


def connect_ahead(config, ahead):
    """Connect, and let the new backend fill its caches; ahead["conn"] if it worked."""
    conn = None
    try:
        conn = connect(config.dsn, fallback_application_name=WARM_NAME)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(NO_IDLE_TIMEOUTS)
            read_keys(cur, config.queues)
            # A new backend plans its first query slowly while it fills its
            # caches: let it do that now.  No snapshot stays.
            cur.execute("EXPLAIN " + select_due(config.queues), {"c": config.consumer})
        ahead["conn"] = conn
    except ConfigError:
        ahead["conn"] = conn    # the run says what is wrong
    except psycopg2.Error as e:
        log.warning("cannot prepare ahead, connecting again at the run: %s", one_line(e))
        if conn is not None:
            conn.close()


def read_keys(cur, queues):
    """Read the key columns of queues that a configuration file named; check them.

    ConfigError for a table that is missing or no queue, or a placeholder
    that names none of its keys: exit 2, with nothing deleted.
    """
    if all(queue.keys is not None for queue in queues):
        return
    cur.execute(KEYS_QUERY, [[queue.table for queue in queues]])
    take_keys(queues, cur.fetchall())


def take_keys(queues, rows):
    """Take each queue's key columns from KEYS_QUERY's rows, or raise ConfigError."""
    for queue, (exists, is_queue, names, types) in zip(queues, rows):
        if not exists:
            raise ConfigError("queue %s: no such table" % queue.table)
        if not is_queue:
            raise ConfigError("queue %s: not a queue (SELECT cache_clearing_queue('%s') makes"
                              " it one)" % (queue.table, queue.table))
        unknown = sorted(queue.placeholders() - set(names))
        if unknown:
            raise ConfigError("queue %s: placeholder {%s} is not one of its key columns (%s)"
                              % (queue.table, unknown[0], ", ".join(names) or "it has none"))
        queue.keys = tuple(zip(names, types))
    slot = 0
    for queue in queues:
        queue.slot, slot = slot, slot + len(queue.keys)


def select_due(queues):
    """The distinct keys of every queue's due rows, in one round trip.

    A row is (queue index, reclear, every queue's keys): each queue fills its
    own typed slots, and NULL the others'.
    """
    slots = ["NULL::%s" % kind for queue in queues for _, kind in queue.keys]
    branches = []
    for index, queue in enumerate(queues):
        columns = list(slots)
        for i, (name, _) in enumerate(queue.keys):
            columns[queue.slot + i] = quote_ident(name)
        branches.append("SELECT DISTINCT %d, reclear%s FROM %s WHERE %s" % (
            index, "".join(", " + c for c in columns), queue.table, DUE))
    return " UNION ALL ".join(branches)


def quote_ident(name):
    return '"%s"' % name.replace('"', '""')


def flush_queue(config, clearer, give_up, conn=None):
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
            try:
                # libpq rounds a connect_timeout under 2 s up to 2: the timer holds.
                conn = conn or connect(config.dsn, connect_timeout=math.ceil(config.give_up))
                # clear_snapshot sends BEGIN itself, with the lock_timeout.
                conn.autocommit = True
                with conn.cursor() as cur:
                    read_keys(cur, config.queues)
                    try:
                        return clear_snapshot(cur, clearer, config, give_up.answered)
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


def clear_snapshot(cur, clearer, config, answered):
    """Clear the keys due in this transaction's snapshot, delete their rows, queue re-clears."""
    # The first answer proves the server reachable (no paused pooler): a cheap
    # statement, so that the deadline never cuts short the SELECT of a large
    # backlog.  A lock not granted within give_up fails the run: it is retried.
    cur.execute("BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL lock_timeout = %s",
                [lock_timeout(config.give_up)])
    answered()
    # Deduplicate in the database: a backlog can hold a million rows.
    cur.execute(select_due(config.queues), {"c": config.consumer})
    if not cur.rowcount:
        check_consumer(cur, config.consumer)
    changed = {}    # (queue index, keys) -> queued by a change, not only by a re-clear
    for row in cur:
        queue = config.queues[row[0]]
        item = row[0], row[2 + queue.slot:2 + queue.slot + len(queue.keys)]
        changed[item] = changed.get(item, False) or not row[1]
    targets, commands = {}, {}
    for item in list(changed):
        queue = config.queues[item[0]]
        values = dict(zip((name for name, _ in queue.keys), item[1]))
        if not file_item(targets, commands, item, queue, values):
            # It can never name a cache entry, so it goes with the batch.
            log.warning("%s: invalid name %s, %s", queue.table, ", ".join(
                "%s=%r" % kv for kv in values.items()), "would be deleted" if clearer.dry_run
                else "deleted unused")
            del changed[item]
    if clearer.dry_run:
        failed = clearer.clear(changed, targets, commands)
        cur.execute("ROLLBACK")
        return 0, failed
    # Under SERIALIZABLE this deletes only the rows in the snapshot; a row
    # committed after it started stays queued for the next run.  Nothing is
    # committed before the files are gone (and the commands done), so the
    # server may update the queues meanwhile: a large backlog's DELETE and
    # the unlinks overlap.  The pool's exit waits for it: the connection is
    # free again only then.
    with ThreadPoolExecutor(1) as pool:
        updating = pool.submit(update_queues, cur.connection, changed, config)
        failed = clearer.clear(changed, targets, commands)
    rows = updating.result()
    if failed:
        rows = update_queues(cur.connection, changed, config, failed)
    cur.execute("COMMIT")
    return rows, failed


def update_queues(conn, changed, config, failed=()):
    """Delete the due rows but the failed keys', queue re-clears; return rows deleted.

    Without failed keys it sets the savepoint that undoes it all should a key
    fail; with them it goes back to that savepoint first.
    """
    params, failed = {"c": config.consumer}, set(failed)
    # The savepoint goes with the first DELETE: one round trip less.
    savepoint = ("ROLLBACK TO SAVEPOINT snapshot_read; " if failed
                 else "SAVEPOINT snapshot_read; ")
    with conn.cursor() as cur:
        rows = 0
        for index, queue in enumerate(config.queues):
            kept = [keys for i, keys in failed if i == index]
            if kept and not queue.keys:
                continue        # a queue without keys is one item: it stays whole
            delete = "DELETE FROM %s q WHERE %s" % (queue.table, DUE)
            if kept:
                delete += " AND NOT EXISTS (SELECT FROM %s WHERE %s)" % (
                    unnest(queue), " AND ".join("f.k%d = q.%s" % (i, quote_ident(name))
                                                for i, (name, _) in enumerate(queue.keys)))
            cur.execute(savepoint + delete, dict(params, **columns(kept, queue)))
            savepoint = ""
            rows += cur.rowcount
            # A render that read the database before the change committed may
            # write its page after we delete it: clear once more, later.
            # Re-clears queue nothing, so they never chain.
            again = [keys for (i, keys), change in changed.items()
                     if i == index and change and (i, keys) not in failed]
            delay = config.again_after if queue.again_after is None else queue.again_after
            if delay and again:
                names = "".join(quote_ident(name) + ", " for name, _ in queue.keys)
                cur.execute("INSERT INTO %s (%sconsumer, due_at, reclear) SELECT %s%%(c)s,"
                            " now() + %%(delay)s * interval '1 second', true FROM %s" % (
                                queue.table, names, "".join("f.k%d, " % i for i in range(
                                    len(queue.keys))), unnest(queue) if queue.keys
                                else "(SELECT) AS f"),
                            dict(params, delay=delay, **columns(again, queue)))
        if savepoint:
            cur.execute(savepoint)      # no DELETE ran (only keyless queues failed)
    return rows


def unnest(queue):
    """Parallel typed arrays, one per key column, as f(k0, k1, ...)."""
    return "unnest(%s) AS f(%s)" % (
        ", ".join("%%(k%d)s::%s[]" % (i, kind) for i, (_, kind) in enumerate(queue.keys)),
        ", ".join("k%d" % i for i in range(len(queue.keys))))


def columns(keys, queue):
    """The parameters of unnest(): each key column's values."""
    return {"k%d" % i: [k[i] for k in keys] for i in range(len(queue.keys))}


def unregistered_reason(consumer):
    """Why nothing is queued for consumer, as --check, the clearer and the daemon say it."""
    if consumer:
        return "consumer %r is not registered in cache_consumers: nothing is queued for it" % (
            consumer)
    return ("no consumer given, and cache_consumers is not empty: nothing is queued for ''"
            " (give --consumer)")


def check_consumer(cur, consumer):
    """Raise ConfigError if nothing can be queued for consumer."""
    cur.execute("SELECT " + UNREGISTERED, {"c": consumer})
    if cur.fetchone()[0]:
        raise ConfigError(unregistered_reason(consumer))


def in_this_thread(function, *args):
    """function(*args) as a finished Future: what it returned or raised."""
    future = Future()
    try:
        future.set_result(function(*args))
    except Exception as e:
        future.set_exception(e)
    return future


class Clearer:
    """Removes the pages templates name, never following a link inside the cache; runs commands."""

    def __init__(self, cache_fd, cache_dir, dry_run=False):
        self.cache_fd = cache_fd
        self.cache_dir = cache_dir
        self.dry_run = dry_run
        # What this run did, over all its attempts (a serialization failure
        # retries the transaction): keys cleared, files removed.
        self.cleared = set()
        self.files = 0

    def clear(self, items, targets, commands):
        """Clear {target: the items naming it}, then run {item: (argv, timeout)}.

        Returns the items that failed.  Each distinct target is cleared once,
        whichever items name it; a command runs once its item's pages are gone.
        """
        failed = self.clear_pages(targets)
        for item, (argv, timeout) in commands.items():
            if item not in failed and not self.run(argv, timeout):
                failed.add(item)
        self.cleared.update(item for item in items if item not in failed)
        return [item for item in items if item in failed]

    def clear_pages(self, targets):
        """Clear {target: the items naming it}; return the set of items whose pages failed."""
        # Sorted, targets that share directories come together.  A large batch
        # is cut into UNLINK_THREADS runs of them, each with its own walk:
        # unlinking pages that were written back to disk mostly waits on the
        # filesystem.  A dry run prints in order.
        ordered = sorted(targets, key=lambda t: (t[0], t[1], t[2] or ""))
        size = max(THREADS_FROM, len(ordered) if self.dry_run
                   else math.ceil(len(ordered) / UNLINK_THREADS))
        parts = [ordered[i:i + size] for i in range(0, len(ordered), size)] or [[]]
        with ThreadPoolExecutor(UNLINK_THREADS) as pool:
            futures = [pool.submit(self.clear_targets, part) for part in parts[1:]]
            futures.insert(0, in_this_thread(self.clear_targets, parts[0]))
        errors = [f.exception() for f in futures if f.exception() is not None]
        for error in errors[1:]:
            log.error("clearing in a thread: %s", one_line(error))
        if errors:
            raise errors[0]
        failed = set()
        for future in futures:
            bad, files = future.result()
            self.files += files
            for target in bad:
                failed.update(targets[target])
        return failed

    def run(self, argv, timeout):
        """Run a queue's command, never through a shell; False if it failed."""
        if self.dry_run:
            print("would run: " + shlex.join(argv))
            return True
        # Its output goes to our stderr, and it is given no secret of ours.
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLEAR_CACHE_DSN", "CLEAR_CACHE_CONFIG_TEXT")}
        try:
            code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                                  env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.error("command %s: still running after %g s: killed", shlex.join(argv), timeout)
            return False
        except OSError as e:
            log.error("command %s: %s", shlex.join(argv), e.strerror)
            return False
        if code:
            log.error("command %s: exited with %s", shlex.join(argv),
                      code if code > 0 else "signal %d" % -code)
        return code == 0

    def clear_targets(self, targets):
        """Clear each of the sorted targets; return (those that failed, files removed).

        Each directory is opened once, and only those along one path are open.
        """
        bad, files = [], 0
        # (name, fd, ok) along the current path.  fd None: nothing to clear
        # there; ok False: it, or a directory above it, could not be opened.
        opened = [("", self.cache_fd, True)]
        try:
            for dirs, last, pattern in targets:
                same = 1
                while (same < min(len(opened), len(dirs) + 1)
                       and opened[same][0] == dirs[same - 1]):
                    same += 1
                while len(opened) > same:
                    fd = opened.pop()[1]
                    if fd is not None:
                        os.close(fd)
                for depth in range(len(opened), len(dirs) + 1):
                    _, parent, ok = opened[-1]
                    fd, ok = (None, ok) if parent is None else self.open_dir(parent,
                                                                             dirs[:depth])
                    opened.append((dirs[depth - 1], fd, ok))
                _, fd, ok = opened[-1]
                if fd is not None:
                    ok, removed = self.remove(fd, dirs, last, pattern)
                    files += removed
                if not ok:
                    bad.append((dirs, last, pattern))
        finally:
            for _, fd, _ in opened[1:]:
                if fd is not None:
                    os.close(fd)
        return bad, files

    def open_dir(self, parent_fd, dirs):
        """(fd, True) of directory dirs; (None, True): nothing to clear; (None, False): failed."""
        try:
            return open_subdir(parent_fd, dirs[-1]), True
        except FileNotFoundError:
            return None, True
        except NotADirectoryError as e:
            # Not ours to follow; retrying would not change it.
            log.warning("%s: %s, not entered", self.path(*dirs), e.strerror)
            return None, True
        except OSError as e:
            log.error("cannot open %s: %s", self.path(*dirs), e.strerror)
            return None, False

    def remove(self, dir_fd, dirs, last, pattern):
        """Unlink the non-directory entries last names; return (none stays, files removed)."""
        # Directories are told apart first: unlink(2) of one fails with EISDIR
        # on Linux but EPERM elsewhere.
        try:
            if pattern == DIRECTORY:
                return self.remove_directory(dir_fd, dirs, last)
            if pattern is not None:
                with os.scandir(dir_fd) as entries:
                    found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries
                             if fnmatch.fnmatchcase(e.name, pattern)]
            else:
                mode = os.stat(last, dir_fd=dir_fd, follow_symlinks=False).st_mode
                found = [(last, stat.S_ISDIR(mode))]
        except FileNotFoundError:
            found = []
        except OSError as e:
            log.error("cannot read %s: %s", self.path(*dirs, last), e.strerror)
            return False, 0
        ok = True
        removed = 0
        for name, is_dir in found:
            try:
                if is_dir:
                    raise IsADirectoryError
                if self.dry_run:
                    print(self.path(*dirs, name))
                else:
                    os.unlink(name, dir_fd=dir_fd)
                removed += 1
            except FileNotFoundError:
                pass        # not there, or someone else removed it: that is the goal
            except IsADirectoryError:
                log.warning("%s: is a directory, left alone%s", self.path(*dirs, name),
                            "" if pattern else " (a template ends in /* for its files, or in"
                            " / for the directory itself)")
            except OSError as e:
                log.error("cannot remove %s: %s", self.path(*dirs, name), e.strerror)
                ok = False
        log.debug("%s: removed %d files", "/".join(dirs + (last,)), removed)
        return ok, removed

    def remove_directory(self, parent_fd, dirs, name):
        """Unlink the non-directory entries of directory name, then remove it if empty."""
        fd, ok = self.open_dir(parent_fd, dirs + (name,))
        if fd is None:
            return ok, 0
        try:
            ok, removed = self.remove(fd, dirs + (name,), "*", "*")
        finally:
            os.close(fd)
        if ok and not self.dry_run:
            try:
                os.rmdir(name, dir_fd=parent_fd)
            except OSError as e:
                # A renderer writing into it meanwhile, or a subdirectory: it stays.
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    log.error("cannot remove %s: %s", self.path(*dirs, name), e.strerror)
                    ok = False
        return ok, removed

    def path(self, *parts):
        """A path under the cache directory, for messages only."""
        return os.path.join(self.cache_dir, *parts)


if __name__ == "__main__":
    sys.exit(main())
