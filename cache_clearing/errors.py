"""The errors both commands exit on, and how they are said: one line each."""

import random
import sys

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.sql
except ImportError:     # said only where it is needed: --help and CATEGORY/PORT work without
    psycopg2 = None

DATABASE_ERROR = psycopg2.Error if psycopg2 is not None else ()
# A run that failed, and a key whose page or command failed, are retried
# this long after: 0.5 s, doubling to a minute, jittered.
RETRY_BACKOFF = 0.5, 60.0
UNDEFINED = {"42P01", "42703", "42883"}  # undefined_table, _column, _function


class ConfigError(Exception):
    """A usage or configuration error: exit 2, touch nothing."""


class UsageError(Exception):
    """A command line argparse cannot read."""


def require_psycopg2():
    if psycopg2 is None:
        raise ConfigError("psycopg2 is not installed for %s: run `make venv` and use"
                          " .venv/bin/python" % sys.executable)


def one_line(error):
    """Squeeze an exception's message onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def db_error(e):
    """Describe a psycopg2 error in one line, with a hint where one helps."""
    text = e.diag.message_primary or one_line(e)
    if e.pgcode in UNDEFINED:
        text += " (is schema.sql loaded?)"
    return text


def shown(value, limit=200):
    """A value as a log line shows it: its repr, cut to limit characters, its length said."""
    return cut(repr(value), limit)


def cut(text, limit=200):
    """text, cut to limit characters, its full length said."""
    if len(text) <= limit:
        return text
    return "%s... (%d characters)" % (text[:limit], len(text))


def exit_status(code):
    """A process's exit code as a log says it: '1', or 'signal 9'."""
    return str(code) if code >= 0 else "signal %d" % -code


def count(n, noun):
    """'1 port', '2 ports'."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


class Backoff:
    """Failures in a row, and how long to wait after the last: doubling, capped, jittered."""

    def __init__(self, base, cap):
        self.base, self.cap = base, cap
        self.failures = 0

    def failed(self):
        """Count a failure; return the seconds to wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def delay(self, failures):
        """The seconds to wait after the failures-th failure in a row."""
        return min(self.cap, self.base * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)

    def reset(self):
        self.failures = 0
