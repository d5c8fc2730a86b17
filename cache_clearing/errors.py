"""The errors both commands exit on, and how they are said: one line each."""

import sys

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.sql
except ImportError:     # said only where it is needed: --help and CATEGORY/PORT work without
    psycopg2 = None

DATABASE_ERROR = psycopg2.Error if psycopg2 is not None else ()
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


def count(n, noun):
    """'1 port', '2 ports'."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")
