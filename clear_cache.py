"""Delete the cached pages of the ports queued in ports_cache_clearing.

One SERIALIZABLE transaction: read the distinct queued (category, port)
pairs, delete every non-directory entry of <cache-dir>/<category>/<port>/,
delete the queue rows the transaction saw, commit.  Rows queued meanwhile
are not in the snapshot and stay for the next run.

    clear_cache.py [--dsn DSN] [--cache-dir DIR] [--dry-run] [-q|-v] [CATEGORY/PORT ...]

With CATEGORY/PORT arguments it clears just those ports and leaves the
queue alone.  Exit status: 0 all handled, 1 database error or a port left
queued, 2 usage or configuration error.
"""

import argparse
import errno
import os
import re
import stat
import sys
import threading
import time

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions

NAME_MAX = 255
ATTEMPTS = 5    # serialization failures and deadlocks retry the whole run
RETRYABLE = {psycopg2.errorcodes.SERIALIZATION_FAILURE,
             psycopg2.errorcodes.DEADLOCK_DETECTED}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
SUBDIR_FLAGS = DIR_FLAGS | os.O_NOFOLLOW
# A queue row q whose (category, port) is among two parallel arrays.
MATCHING_PAIR = ("(SELECT FROM unnest(%s::text[], %s::text[]) AS f(c, p)"
                 " WHERE f.c = q.category AND f.p = q.port)")
UNSAFE = re.compile(r"[/\x00-\x1f\x7f]")    # a slash, or a control character

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}


class Logger:
    """logging's calls, one line each on stderr, without logging's import.

    A clearer starts for every change, and importing logging alone costs
    about 10 ms here: most of what the clearer may add to the spawn floor.
    """

    level = INFO        # for every logger of the process: see setup_logging
    stamp = True

    def __init__(self, name):
        self.name = name

    def log(self, level, msg, *args):
        if level < Logger.level:
            return
        line = "%s: %s: %s\n" % (self.name, LEVEL_NAMES[level], msg % args if args else msg)
        if Logger.stamp:
            now = time.time()
            line = "%s,%03d %s" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                   now % 1 * 1000, line)
        sys.stderr.write(line)
        sys.stderr.flush()

    def debug(self, msg, *args):
        self.log(DEBUG, msg, *args)

    def info(self, msg, *args):
        self.log(INFO, msg, *args)

    def warning(self, msg, *args):
        self.log(WARNING, msg, *args)

    def error(self, msg, *args):
        self.log(ERROR, msg, *args)


log = Logger("clear_cache")


def main(argv=None):
    parser = Parser(description=__doc__)
    add_common_options(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be removed, change nothing")
    parser.add_argument("ports", nargs="*", metavar="CATEGORY/PORT",
                        help="clear just these ports; the queue is not read")
    args = parser.parse_args(argv)
    setup_logging(args.verbosity)
    started = time.monotonic()
    try:
        dsn, cache_dir = load_config(args)
        ports = [parse_port_argument(arg) for arg in args.ports]
        cache_fd = open_cache_dir(cache_dir)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    clearer = Clearer(cache_fd, cache_dir, args.dry_run)
    if ports:
        failed = clearer.clear_ports(dict.fromkeys(ports))
        rows = 0
    else:
        try:
            rows, failed = flush_queue(dsn, clearer)
        except psycopg2.Error as e:
            log.error("database error: %s", db_error(e))
            return 1
    log.info("%scleared %d ports, deleted %d rows, removed %d files%s in %d ms",
             "dry run: " if args.dry_run else "", clearer.ports, rows,
             clearer.files, ", %d ports left queued" % len(failed) if failed else "",
             (time.monotonic() - started) * 1000)
    return 1 if failed else 0


class ConfigError(Exception):
    """A usage or configuration error: exit 2, touch nothing."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors take one line."""

    def __init__(self, **kwargs):
        # A fixed width spares the import of shutil, which would ask the terminal.
        super().__init__(formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, width=79), **kwargs)

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def add_common_options(parser):
    """Add the options both scripts share."""
    parser.add_argument("--dsn", metavar="DSN", help="libpq connection string "
                        "(default: $CLEAR_CACHE_DSN, then libpq's PG* defaults)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache root (default: $CLEAR_CACHE_DIR)")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const",
                      const=WARNING, default=INFO,
                      help="print only warnings and errors")
    loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                      const=DEBUG, help="list each port")


def setup_logging(level):
    """Set the level of every logger; CLEAR_CACHE_TIMESTAMPS=0 drops the time."""
    Logger.level = level
    Logger.stamp = os.environ.get("CLEAR_CACHE_TIMESTAMPS") != "0"


def load_config(args):
    """Return (dsn, cache_dir) from the options, then the environment."""
    dsn = args.dsn if args.dsn is not None else os.environ.get("CLEAR_CACHE_DSN", "")
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ConfigError("invalid DSN: %s" % one_line(e)) from None
    cache_dir = args.cache_dir or os.environ.get("CLEAR_CACHE_DIR")
    if not cache_dir:
        raise ConfigError("no cache directory: give --cache-dir or set CLEAR_CACHE_DIR")
    return dsn, os.path.abspath(cache_dir)


def open_cache_dir(path):
    """Open the cache root; a symlink here is the administrator's and is followed."""
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as e:
        raise ConfigError("cache directory %s: %s" % (path, e.strerror)) from None


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
        return len(os.fsencode(name)) <= NAME_MAX
    except UnicodeError:
        return False


def valid_port(category, port):
    """Can (category, port) name a directory of the cache?"""
    return valid_name(category) and valid_name(port)


def parse_port_argument(arg):
    """Split a CATEGORY/PORT argument, refusing anything but two plain names."""
    category, _, port = arg.partition("/")
    if not valid_port(category, port):
        raise ConfigError("not a CATEGORY/PORT: %r" % arg)
    return category, port


def db_error(e):
    """Describe a psycopg2 error in one line, with a hint where one helps."""
    text = e.diag.message_primary or one_line(e)
    if e.pgcode == psycopg2.errorcodes.UNDEFINED_TABLE:
        text += " (is schema.sql loaded?)"
    return text


def one_line(error):
    """Squeeze an exception's message onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def connect(dsn, **params):
    """Connect with keepalives, so that a dead peer is noticed while idle."""
    params = dict(keepalives=1, keepalives_idle=10, keepalives_interval=5,
                  keepalives_count=3, connect_timeout=10) | params
    # The DSN or PGAPPNAME may name the application; else the script does.
    return psycopg2.connect(dsn, fallback_application_name=os.path.basename(sys.argv[0]),
                            **params)


def flush_queue(dsn, clearer):
    """Clear every queued port in one transaction; return (rows deleted, failed ports)."""
    conn = connect(dsn)
    try:
        conn.set_session(isolation_level="SERIALIZABLE")
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with conn, conn.cursor() as cur:
                    return clear_snapshot(cur, clearer)
            except psycopg2.Error as e:
                if e.pgcode not in RETRYABLE or attempt == ATTEMPTS:
                    raise
                log.warning("retrying after %s (attempt %d)", db_error(e), attempt)
                time.sleep(0.05 * attempt)
    finally:
        conn.close()


def clear_snapshot(cur, clearer):
    """Clear the ports in this transaction's snapshot and delete their rows."""
    # Deduplicate in the database: a backlog can hold a million rows.
    cur.execute("SELECT DISTINCT category, port FROM ports_cache_clearing")
    ports = dict.fromkeys(cur.fetchall())
    invalid = [p for p in ports if not valid_port(*p)]
    if invalid:
        # They can never name a cache entry, so they go with the batch.
        cur.execute("SELECT min(id), count(*), category, port FROM ports_cache_clearing q"
                    " WHERE EXISTS " + MATCHING_PAIR + " GROUP BY category, port",
                    pair_arrays(invalid))
        for row in cur:
            log.warning("row %d (%d rows): invalid name %r/%r, deleted unused", *row)
        for pair in invalid:
            del ports[pair]
    if clearer.dry_run:
        failed = clearer.clear_ports(ports)
        cur.connection.rollback()
        return 0, failed
    # Under SERIALIZABLE this deletes only the rows in the snapshot; a row
    # committed after it started stays queued for the next run.  Nothing is
    # committed before the files are gone, so the server may delete the rows
    # while we delete the files.
    cur.execute("SAVEPOINT snapshot_read")
    deleted = in_thread(cur.connection, "DELETE FROM ports_cache_clearing")
    try:
        failed = clearer.clear_ports(ports)
    finally:
        rows = deleted()
    if failed:
        cur.execute("ROLLBACK TO SAVEPOINT snapshot_read")
        cur.execute("DELETE FROM ports_cache_clearing q WHERE NOT EXISTS " + MATCHING_PAIR,
                    pair_arrays(failed))
        rows = cur.rowcount
    return rows, failed


def pair_arrays(pairs):
    """Query parameters for MATCHING_PAIR: the categories, then the ports."""
    return [p[0] for p in pairs], [p[1] for p in pairs]


def in_thread(conn, query):
    """Run query on conn in a thread; return a function that waits for its row count."""
    result = {}

    def run():
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                result["rows"] = cur.rowcount
        except BaseException as e:      # handed to the caller
            result["error"] = e
    thread = threading.Thread(target=run)
    thread.start()

    def wait():
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["rows"]
    return wait


class Clearer:
    """Removes port directories' entries, never following a link inside the cache."""

    def __init__(self, cache_fd, cache_dir, dry_run=False):
        self.cache_fd = cache_fd
        self.cache_dir = cache_dir
        self.dry_run = dry_run
        self.ports = 0          # cleared by the latest attempt
        self.files = 0          # removed, over all attempts
        self.categories = {}    # name -> fd, or what open_dir said instead

    def clear_ports(self, ports):
        """Clear each (category, port); return the ones that could not be cleared."""
        try:
            failed = [p for p in ports if not self.clear_port(*p)]
        finally:
            for fd in self.categories.values():
                if not isinstance(fd, bool):
                    os.close(fd)
            self.categories.clear()
        # One call is one whole attempt: a retried transaction counts its ports once.
        self.ports = len(ports) - len(failed)
        return failed

    def clear_port(self, category, port):
        """Remove the port's pages; False when one could not be removed."""
        if category not in self.categories:
            self.categories[category] = self.open_dir(self.cache_fd, category)
        port_fd = self.categories[category]
        if not isinstance(port_fd, bool):
            port_fd = self.open_dir(port_fd, port, category)
        if isinstance(port_fd, bool):
            return port_fd
        try:
            return self.remove_entries(port_fd, category, port)
        finally:
            os.close(port_fd)

    def open_dir(self, dir_fd, name, *parents):
        """The fd of directory name, or True (nothing to clear) or False (failed)."""
        try:
            return open_subdir(dir_fd, name)
        except FileNotFoundError:
            return True
        except NotADirectoryError as e:
            # Not ours to follow; retrying would not change it.
            log.warning("%s: %s, not entered", self.path(*parents, name), e.strerror)
            return True
        except OSError as e:
            log.error("cannot open %s: %s", self.path(*parents, name), e.strerror)
            return False

    def remove_entries(self, port_fd, category, port):
        """Unlink every non-directory entry; a symlink goes as a link."""
        ok = True
        removed = 0
        with os.scandir(port_fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    log.warning("%s: is a directory, left alone",
                                self.path(category, port, entry.name))
                    continue
                if self.dry_run:
                    print(self.path(category, port, entry.name))
                    removed += 1
                    continue
                try:
                    os.unlink(entry.name, dir_fd=port_fd)
                    removed += 1
                except FileNotFoundError:
                    pass        # someone else removed it: that is the goal
                except IsADirectoryError:
                    log.warning("%s: is a directory, left alone",
                                self.path(category, port, entry.name))
                except OSError as e:
                    log.error("cannot remove %s: %s", self.path(category, port, entry.name),
                              e.strerror)
                    ok = False
        self.files += removed
        log.debug("%s/%s: removed %d files", category, port, removed)
        return ok

    def path(self, *parts):
        """A path under the cache directory, for messages only."""
        return os.path.join(self.cache_dir, *parts)


if __name__ == "__main__":
    sys.exit(main())
