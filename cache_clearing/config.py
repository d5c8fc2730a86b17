"""What both commands are told: by option, else by environment, else by default.

load_config() reads it all into one Config, immutable once loaded; what the
database says of the queues (their key columns) belongs to a run, not here.
"""

import argparse
import configparser
import dataclasses
import logging
import os
import re
import shlex

from . import __version__
from .errors import ConfigError, UsageError, one_line, psycopg2
from .templates import Argument, Page

DEFAULT_PAGES = ("{category}/{port}/*",)
DEFAULT_AGAIN_AFTER = 5.0
DEFAULT_GIVE_UP = 30.0
DEFAULT_TIMEOUT = 60.0  # seconds each run of a queue's command may take
DEFAULT_QUEUE = "ports_cache_clearing"
PORT_KEYS = (("category", "text"), ("port", "text"))
QUEUE_OPTIONS = ("pages", "command", "again_after", "timeout", "listen")
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?\Z")
CHANNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")  # as LISTEN takes it unquoted
RESERVED = ("later",)   # a notification's payload: no consumer may be called that
FLAGS = configparser.ConfigParser.BOOLEAN_STATES   # 1/0, yes/no, true/false, on/off


@dataclasses.dataclass(frozen=True)
class Queue:
    """A queue table and what its rows clear: pages, and a command per key."""

    table: str
    pages: tuple = ()
    command: tuple = ()             # its arguments
    again_after: float = None       # None: --again-after's
    timeout: float = DEFAULT_TIMEOUT
    keys: tuple = None              # ((name, type), ...) where known before the database says
    listen: tuple = ()              # NOTIFY channels that make it due (a queue without keys)

    def placeholders(self):
        return {name for t in self.pages + self.command for name in t.names}

    def targets(self, values):
        """The Targets its pages name for the values, and the pages that cannot use them."""
        expanded = [(page, page.expand(values)) for page in self.pages]
        return ([target for _, target in expanded if target is not None],
                [page for page, target in expanded if target is None])

    def argv(self, values):
        """Its command for the values (() for none), or None if a value cannot be used."""
        argv = [t.fill(values) for t in self.command]
        return None if None in argv else argv


@dataclasses.dataclass(frozen=True)
class Config:
    dsn: str
    cache_dir: str
    queues: tuple
    again_after: float
    consumer: str
    give_up: float = DEFAULT_GIVE_UP
    source: tuple = None    # (file name, its text) of --config; None: --pages

    def environ(self):
        """The environment that hands this configuration to a clearer.

        The configuration file goes as the text read at start-up, in a file
        the daemon opens (CLEAR_CACHE_CONFIG_FD, its caller's to add): an
        edited file takes effect when the daemon restarts, and a large one
        fits, as no environment variable over 128 KiB would.
        """
        env = dict(os.environ, CLEAR_CACHE_DSN=self.dsn, CLEAR_CACHE_DIR=self.cache_dir,
                   CLEAR_CACHE_AGAIN_AFTER=repr(self.again_after),
                   CLEAR_CACHE_CONSUMER=self.consumer,
                   CLEAR_CACHE_GIVE_UP_AFTER=repr(self.give_up))
        if self.source:
            env.pop("CLEAR_CACHE_PAGES", None)
            env["CLEAR_CACHE_CONFIG"] = self.source[0]
        else:
            env["CLEAR_CACHE_PAGES"] = " ".join(t.text for t in self.queues[0].pages)
        return env

    def queue(self, table):
        """(index, queue) of the configuration's queue of that table."""
        for i, queue in enumerate(self.queues):
            if queue.table == table:
                return i, queue
        raise ConfigError("no queue %s in the configuration" % table)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors main() reports, in one line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(message)


def add_common_options(parser):
    """Add the options both commands share."""
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
                      const=logging.DEBUG, help="also log each target whose directory"
                      " exists, with the files removed, and each step of a run")


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


def seconds_setting(value, variable, default, parse):
    """An option's number of seconds, else its environment variable's, else default."""
    if value is not None:
        return value
    try:
        return parse(os.environ.get(variable) or str(default))
    except argparse.ArgumentTypeError as e:
        raise ConfigError("%s: %s" % (variable, e)) from None


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


def load_config(args, give_up=DEFAULT_GIVE_UP, dsn=True, cache=True):
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
        fd = os.environ.get("CLEAR_CACHE_CONFIG_FD", "")
        source = name, read_fd(int(fd)) if fd.isdigit() else read_file(name)
        queues = read_queues(*source)
    else:
        queues = (Queue(DEFAULT_QUEUE, tuple(Page(t, PORT_KEYS) for t in pages or DEFAULT_PAGES),
                        keys=PORT_KEYS),)
    return Config(text, os.path.abspath(cache_dir), queues, again_after, consumer,
                  give_up, source)


def read_file(name):
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeError) as e:
        raise ConfigError("%s: %s" % (name, getattr(e, "strerror", None) or e)) from None


def read_fd(fd):
    """The text of the file the daemon opened for its clearers (read from its start:
    they share the offset)."""
    try:
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8")
    except (OSError, UnicodeError) as e:
        raise ConfigError("CLEAR_CACHE_CONFIG_FD: %s" % (getattr(e, "strerror", None) or e)
                          ) from None


def read_queues(name, text):
    """The queues an INI file names: [TABLE] with pages, command, again_after, timeout."""
    # No interpolation (% is literal), and no [DEFAULT]: every section is a
    # table.  configparser's defaults go in a section no header can name.
    ini = configparser.ConfigParser(interpolation=None, default_section="\n")
    # Headers configparser would skip or read otherwise, as Python versions do.
    for header in re.findall(r"^\[(.*)\][ \t]*$", text, re.M):
        if not TABLE_NAME.match(header) or header.upper() == "DEFAULT":
            raise ConfigError("%s: [%s]: not a table name" % (name, header))
    try:
        ini.read_string(text, name)
    except configparser.Error as e:
        raise ConfigError("%s: %s" % (name, one_line(e))) from None
    queues = tuple(read_queue(name, table, ini[table]) for table in ini.sections())
    if not queues:
        raise ConfigError("%s: no queue: a section [TABLE] for each" % name)
    return queues


def read_queue(name, table, section):
    """The Queue of one section [TABLE]."""
    where = "%s: [%s]" % (name, table)
    if not TABLE_NAME.match(table) or table.upper() == "DEFAULT":
        raise ConfigError("%s: not a table name" % where)
    for option in section:
        if option not in QUEUE_OPTIONS:
            raise ConfigError("%s: unknown option %s; there are %s"
                              % (where, option, ", ".join(QUEUE_OPTIONS)))
    if not section.get("pages", "").split() and not section.get("command", "").strip():
        raise ConfigError("%s: needs pages or command" % where)

    def parsed(option, parse, default):
        try:
            return parse(section[option]) if option in section else default
        except (ConfigError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError("%s %s: %s" % (where, option, e)) from None
    return Queue(table,
                 parsed("pages", lambda t: tuple(Page(p) for p in t.split()), ()),
                 parsed("command", lambda t: tuple(Argument(a) for a in shlex.split(t)), ()),
                 parsed("again_after", seconds(0), None),
                 parsed("timeout", seconds(0, strict=True), DEFAULT_TIMEOUT),
                 listen=parsed("listen", channels, ()))


def channels(text):
    """The channels of a queue's listen: names LISTEN takes as they are."""
    names = text.split()
    for name in names:
        if name.lower() == "clear_ports_cache":
            raise ValueError("clear_ports_cache is the queues' own channel")
        if not CHANNEL_NAME.match(name):
            raise ValueError("%r is not a channel name (letters, digits, _ and $, not"
                             " first a digit, 63 at most)" % name)
    return tuple(name.lower() for name in names)
