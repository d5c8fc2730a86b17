"""Report the due rows and the listening daemons, as a Nagios plugin.

    clear_cache.py --check [--consumer NAME] [--warn SECONDS] [--crit SECONDS]

One line on stdout; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.  Every
usage or configuration error is UNKNOWN: Nagios reads 2 as CRITICAL.
Changes nothing, and needs no cache directory.
"""

from .config import Parser, add_common_options, load_config, seconds
from .errors import (DATABASE_ERROR, ConfigError, UsageError, count, db_error, psycopg2,
                     require_psycopg2, cut)
from .queues import (REGISTERED, UNREGISTERED, connect, daemon_name, union,
                     unregistered_reason)

OK, WARNING, CRITICAL, UNKNOWN = range(4)     # Nagios plugin exit codes
STATUS = ["OK", "WARNING", "CRITICAL", "UNKNOWN"]
# For each consumer: its due rows in every queue, the age of the oldest in
# seconds, and the daemons listening for it: sessions of the daemon's role
# (%(role)s) with the application_name it sets for itself (the second array).
# A name alone proves nothing: any session may take it.
CHECK_QUERY = (
    "SELECT c.name, pg_catalog.count(q.*),"
    " coalesce(EXTRACT(epoch FROM pg_catalog.now() - pg_catalog.min(q.due_at)), 0)::float8,"
    " (SELECT pg_catalog.count(*) FROM pg_stat_activity"
    " WHERE datname = pg_catalog.current_database() AND application_name = c.daemon"
    " AND usename = coalesce(%(role)s, CURRENT_USER))"
    " FROM ROWS FROM (pg_catalog.unnest(%(names)s::text[]),"
    " pg_catalog.unnest(%(daemons)s::text[]))"
    " AS c(name, daemon)"
    " LEFT JOIN ({}) q ON q.consumer = c.name AND q.due_at <= pg_catalog.now()"
    " GROUP BY c.name, c.daemon ORDER BY c.name")
# Rows left for '' while names are registered: no daemon clears them.
STRANDED_QUERY = ("SELECT pg_catalog.count(*) FROM ({}) q WHERE consumer = ''"
                  " AND EXISTS (SELECT FROM cache_consumers)")
# The key failing longest, of any of these consumers: which, and for how long.
FAILING_QUERY = ("SELECT queue, key, EXTRACT(epoch FROM pg_catalog.now() - since)::float8"
                 " FROM cache_clearing_failures WHERE consumer = ANY (%s) ORDER BY since LIMIT 1")


def add_options(parser):
    """--check, --warn and --crit, in a group of their own."""
    group = parser.add_argument_group("monitoring (Nagios plugin conventions: one line on"
                                      " stdout; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)")
    group.add_argument("--check", action="store_true", help="report the due rows and the"
                       " listening daemons of the consumer, or of every registered one;"
                       " change nothing; no cache directory needed")
    group.add_argument("--warn", metavar="SECONDS", type=seconds(0), default=60.0,
                       help="WARNING when the oldest due row is this old (default: 60)")
    group.add_argument("--crit", metavar="SECONDS", type=seconds(0), default=300.0,
                       help="CRITICAL when it is this old (default: 300)")
    group.add_argument("--daemon-role", metavar="ROLE", help="the role the daemons connect"
                       " as: only its sessions count as listeners (default: the role the"
                       " check connects as)")


def wanted(argv):
    """Does the command line ask for --check?  argparse's own reading, abbreviations too."""
    parser = Parser(add_help=False)
    parser.add_argument("--check", action="store_true")
    try:
        return parser.parse_known_args(argv)[0].check
    except UsageError:
        return False


def main(argv=None):
    parser = Parser(description=__doc__)
    add_common_options(parser)
    add_options(parser)
    try:
        args = parser.parse_args(argv)
    except (UsageError, ConfigError) as e:
        return report(UNKNOWN, str(e))
    if args.warn > args.crit:
        return report(UNKNOWN, "--warn %g is above --crit %g" % (args.warn, args.crit))
    try:
        config = load_config(args, cache=False)
        require_psycopg2()
        rows, unregistered, stranded, failing = read_status(config, args.daemon_role)
    except ConfigError as e:
        return report(UNKNOWN, str(e))
    except DATABASE_ERROR as e:
        return report(UNKNOWN, db_error(e))
    return report(*judge(rows, unregistered, stranded, failing, config.consumer, args.warn,
                         args.crit))


def read_status(config, role=None):
    """(consumer, rows due, age of the oldest, listeners) per consumer; is it unregistered?
    how many rows are stranded for ''; and the key failing longest, (queue, key, seconds)."""
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
            cur.execute(psycopg2.sql.SQL(CHECK_QUERY).format(union(config.queues)),
                        {"names": consumers, "daemons": [daemon_name(c) for c in consumers],
                         "role": role})
            rows = cur.fetchall()
            cur.execute(psycopg2.sql.SQL(STRANDED_QUERY).format(union(config.queues)))
            stranded = cur.fetchone()[0]
            cur.execute(FAILING_QUERY, [consumers])
            return rows, unregistered, stranded, cur.fetchone()
    finally:
        conn.close()


def judge(rows, unregistered, stranded, failing, consumer, warn, crit):
    """(status, text) of what read_status() found."""
    worst, trouble = OK, []
    for name, due, oldest, listeners in rows:
        # Nothing due is OK whatever --warn says: no row waits.
        status = (CRITICAL if not listeners or due and oldest >= crit
                  else WARNING if due and oldest >= warn else OK)
        worst = max(worst, status)
        if not listeners:
            trouble.append("%sno daemon listens" % ("%s: " % name if len(rows) > 1 else ""))
        elif status != OK and len(rows) > 1:
            trouble.append("%s: oldest due %d s" % (name, oldest))
    if unregistered:
        worst = CRITICAL
        trouble.append(unregistered_reason(consumer))
    if stranded:
        worst = CRITICAL
        trouble.append("%s stranded for consumer '' while names are registered: no daemon"
                       " clears them; cache_clearing_add_consumers('NAME') hands them out"
                       % count(stranded, "row"))
    if failing and failing[2] >= warn:
        worst = max(worst, CRITICAL if failing[2] >= crit else WARNING)
        trouble.append("%s key %s failing for %d s" % (failing[0], cut(failing[1]), failing[2]))
    due = sum(r[1] for r in rows)
    oldest = max(r[2] for r in rows)
    listeners = sum(r[3] for r in rows)
    return worst, "%s due, oldest due %d s, %s%s | due=%d oldest=%ds;%g;%g listeners=%d" % (
        count(due, "row"), oldest, count(listeners, "listener"),
        "".join("; " + t for t in trouble), due, oldest, warn, crit, listeners)


def report(status, text):
    """One line on stdout; returns the exit status."""
    print("CLEAR_CACHE %s - %s" % (STATUS[status], text))
    return status
