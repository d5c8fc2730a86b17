"""The queues' SQL: their key columns, the due rows, the queue update.

Every statement is composed with psycopg2.sql; a table is named as
PostgreSQL reads an unquoted name (folded to lower case) and quoted.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import sys

from .errors import ConfigError, psycopg2
from .templates import Unusable

# This consumer's due rows; now() is the transaction's start, the snapshot's time.
DUE = "consumer = %(c)s AND due_at <= pg_catalog.now()"
# Each queue's key columns and their types, and its generated columns (a
# function of its keys: placeholders may name them); whether it exists and
# is a queue.
KEYS_QUERY = (
    "SELECT c.oid, EXISTS (SELECT FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
    " WHERE t.tgrelid = c.oid AND p.proname = 'cache_clearing_notify'),"
    " ARRAY(SELECT k.name::text FROM cache_clearing_keys(c.oid::regclass) k),"
    " ARRAY(SELECT k.type FROM cache_clearing_keys(c.oid::regclass) k),"
    " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid"
    " AND a.attgenerated <> '' AND NOT a.attisdropped ORDER BY a.attnum),"
    " ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
    " WHERE a.attrelid = c.oid AND a.attgenerated <> '' AND NOT a.attisdropped"
    " ORDER BY a.attnum)"
    " FROM pg_catalog.unnest(%s::text[]) WITH ORDINALITY AS q(name, i)"
    " LEFT JOIN pg_class c ON c.oid = pg_catalog.to_regclass(q.name)::oid ORDER BY q.i")
# True when nothing is queued for consumer %(c)s: '' while names are
# registered, or a name that is not registered (none may be).
UNREGISTERED = ("CASE WHEN %(c)s::text = '' THEN EXISTS (SELECT FROM cache_consumers)"
                " ELSE NOT EXISTS (SELECT FROM cache_consumers WHERE name = %(c)s) END")
REGISTERED = "SELECT name FROM cache_consumers ORDER BY name"
# Sessions that wait on purpose; set_config, since PostgreSQL 13 has no
# idle_session_timeout.
NO_IDLE_TIMEOUTS = ("SELECT pg_catalog.set_config(name, '0', false) FROM pg_settings WHERE name IN"
                    " ('idle_session_timeout', 'idle_in_transaction_session_timeout')")


def connect(dsn, **params):
    """Connect with keepalives, so that a dead peer is noticed while idle."""
    # The DSN or PGAPPNAME may name the application; else the script does.
    params = dict(dict(keepalives=1, keepalives_idle=10, keepalives_interval=5,
                       keepalives_count=3, connect_timeout=10,
                       fallback_application_name=os.path.basename(sys.argv[0])), **params)
    conn = psycopg2.connect(dsn, **params)
    if not params.get("async_") and conn.encoding == "SQLASCII":
        # The server stores bytes and converts nothing: latin-1 reads any byte
        # as one character, and writes it back as the same byte.
        conn.set_client_encoding("LATIN1")
    return conn


def read_any_value(cur):
    """Make cur give an Unusable for a date or time Python cannot hold (past year 9999,
    before year 1, +-infinity), instead of failing the whole run."""
    ext = psycopg2.extensions
    ext.register_adapter(Unusable, lambda value: ext.QuotedString(value.text))
    for base in (ext.PYDATE, ext.PYDATETIME, ext.PYDATETIMETZ):
        def cast(text, cur, base=base):
            if text is None:
                return None
            if text in ("infinity", "-infinity"):
                return Unusable(text)   # psycopg2 would say 9999-12-31: a page nobody named
            try:
                return base(text, cur)
            except (ValueError, OverflowError):
                return Unusable(text)
        ext.register_type(ext.new_type(base.values, base.name, cast), cur)


def lock_timeout(seconds):
    """A lock_timeout setting for seconds: never 0, which would mean no limit."""
    return "%dms" % max(1, math.ceil(seconds * 1000))


def daemon_name(consumer):
    """The application_name a daemon sets for itself: it says which consumer it serves.

    PostgreSQL keeps 63 bytes of it, printable ASCII only: a longer name, or
    one with other characters, is its first characters and a digest of it all.
    """
    name = "listen_clear_cache.py" + (" " + consumer if consumer else "")
    if len(name) <= 63 and name.isascii() and name.isprintable():
        return name
    shown = "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:40])
    return "%s~%s" % (shown, hashlib.sha256(consumer.encode()).hexdigest()[:22])


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


def table(name):
    """A table's name as SQL: what PostgreSQL makes of it unquoted, quoted."""
    return psycopg2.sql.Identifier(*name.lower().split("."))


def union(queues):
    """SQL for the (consumer, due_at) of every queue's rows.

    A row due at -infinity is due since it was queued (its queued_at, where
    the queue has one; else now): no age can be told from -infinity.
    """
    return psycopg2.sql.SQL(" UNION ALL ").join(
        psycopg2.sql.SQL("SELECT consumer, CASE WHEN due_at > '-infinity' THEN due_at ELSE"
                         " coalesce((pg_catalog.to_jsonb(t) ->> 'queued_at'::text)::timestamptz,"
                         " pg_catalog.now()) END AS due_at FROM {} t").format(table(queue.table))
        for queue in queues)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The queues of a run with the key columns the database gave each."""

    queues: tuple
    keys: tuple     # per queue: ((name, type), ...)
    raw: bool = False   # an SQL_ASCII database: names are bytes, read as latin-1
    derived: tuple = None   # per queue: its generated columns, ((name, type), ...)

    def columns(self, index):
        """The columns select_due() reads of queue index: its keys, then its generated."""
        return self.keys[index] + (self.derived[index] if self.derived else ())

    def slot(self, index):
        """Where queue index's columns start in a row of select_due()."""
        return sum(len(self.columns(i)) for i in range(index))

    def item(self, row):
        """(queue index, its keys) of a row of select_due()."""
        start = 3 + self.slot(row[0])
        return row[0], row[start:start + len(self.keys[row[0]])]

    def generated(self, row):
        """The values of the queue's generated columns in a row of select_due()."""
        start = 3 + self.slot(row[0]) + len(self.keys[row[0]])
        return row[start:start + len(self.columns(row[0])) - len(self.keys[row[0]])]

    def values(self, item, generated=()):
        """{column: value} of an item (and its generated values), a name in the file
        system's terms."""
        values = item[1] + tuple(generated)
        if self.raw:    # the bytes the database holds name the file a renderer wrote
            values = [os.fsdecode(v.encode("latin-1")) if isinstance(v, str) else v
                      for v in values]
        return dict(zip((name for name, _ in self.columns(item[0])), values))


def read_keys(cur, queues):
    """The Layout of the queues: the key columns of those a configuration file named.

    ConfigError for a table that is missing or no queue, or a placeholder
    that names none of its keys: exit 2, with nothing deleted.
    """
    raw = cur.connection.get_parameter_status("server_encoding") == "SQL_ASCII"
    if all(queue.keys is not None for queue in queues):
        return Layout(queues, tuple(queue.keys for queue in queues), raw)
    cur.execute(KEYS_QUERY, [[queue.table for queue in queues]])
    return take_keys(queues, cur.fetchall(), raw)


def take_keys(queues, rows, raw=False):
    """The Layout from KEYS_QUERY's rows, or ConfigError."""
    found, derived, seen = [], [], {}
    for queue, (oid, is_queue, names, types, generated, generated_types) in zip(queues, rows):
        if oid is None:
            raise ConfigError("queue %s: no such table" % queue.table)
        if oid in seen:
            raise ConfigError("queue %s: the same table as queue %s; name it once"
                              % (queue.table, seen[oid]))
        seen[oid] = queue.table
        if not is_queue:
            raise ConfigError("queue %s: not a queue (SELECT cache_clearing_queue('%s') makes"
                              " it one)" % (queue.table, queue.table))
        if queue.listen and names:
            raise ConfigError("queue %s: listen is for a queue without keys; it has %s"
                              % (queue.table, ", ".join(names)))
        unknown = sorted(queue.placeholders() - set(names) - set(generated))
        if unknown:
            raise ConfigError("queue %s: placeholder {%s} is not one of its key columns (%s)"
                              % (queue.table, unknown[0], ", ".join(names) or "it has none"))
        found.append(tuple(zip(names, types)))
        # Only those its templates name: the others would only cost.
        derived.append(tuple((name, kind) for name, kind in zip(generated, generated_types)
                             if name in queue.placeholders()))
    return Layout(tuple(queues), tuple(found), raw, tuple(derived))


def select_due(layout):
    """The distinct keys of every queue's due rows, in one round trip.

    A row is (queue index, reclear, too long, every queue's keys): each queue
    fills its own typed slots, and NULL the others'.  A text over LONGEST
    bytes names nothing (no file name, no argument is that long), so it is
    never read whole: its row comes in a branch of its own, keys NULL, too
    long saying its key for the log, each text cut to its first characters.
    """
    sql = psycopg2.sql
    slots = [sql.SQL("NULL::" + kind) for index in range(len(layout.queues))
             for _, kind in layout.columns(index)]
    branches = []
    for index, (queue, keys) in enumerate(zip(layout.queues, layout.keys)):
        columns = list(slots)
        start = layout.slot(index)
        for i, (name, _) in enumerate(layout.columns(index)):
            columns[start + i] = sql.Identifier(name)
        texts = [sql.Identifier(name) for name, kind in keys
                 if kind == "text" or kind.startswith("character")]
        too_long = sql.SQL(" OR ").join(sql.SQL("pg_catalog.octet_length({}) > {}").format(
            text, sql.Literal(LONGEST)) for text in texts) if texts else sql.SQL("false")
        select = sql.SQL("SELECT DISTINCT {}, reclear, {}{} FROM {} WHERE " + DUE + " AND ({}) {}")
        branches.append(select.format(
            sql.Literal(index), sql.SQL("NULL"),
            sql.Composed([sql.SQL(", ") + c for c in columns]),
            table(queue.table), too_long, sql.SQL("IS NOT TRUE")))
        if texts:
            said = sql.SQL("pg_catalog.concat_ws(', ', {})").format(sql.SQL(", ").join(
                sql.SQL("{}::text || '=' ||"
                        " pg_catalog.quote_literal(pg_catalog.left({}::text, 200)) || CASE"
                        " WHEN pg_catalog.length({}::text) > 200 THEN '... (' ||"
                        " pg_catalog.length({}::text) || ' characters)' ELSE '' END").format(
                            sql.Literal(name), sql.Identifier(name), sql.Identifier(name),
                            sql.Identifier(name)) for name, _ in keys))
            branches.append(select.format(
                sql.Literal(index), said, sql.Composed([sql.SQL(", ") + c for c in slots]),
                table(queue.table), too_long, sql.SQL("")))
    return sql.SQL(" UNION ALL ").join(branches)


LONGEST = 131072    # bytes: Linux's longest argument; a file name is 255 at most


def update_queues(conn, changed, config, layout, failed=(), retry=None):
    """Delete the due rows, queue re-clears; return (rows deleted, failures forgotten,
    {delay: re-clears queued}).

    changed: {item: queued by a change, not only by a re-clear}.  Without
    failed keys it first sets the savepoint that undoes it all, should a key
    fail; with them the caller has gone back to it.  A failed key's rows stay
    as they are (a run by hand), or with retry, {item: seconds}, they go and
    the key is queued once more, due that much later: it is retried alone.
    The records of failing keys that it clears go too, and are returned.
    """
    rows, failing = delete_due(conn, config, layout, failed, retry)
    return (rows,) + queue_again_after(conn, changed, config, layout, failing, failed, retry)


def delete_due(conn, config, layout, failed=(), retry=None):
    """update_queues' first half, which needs no key: (rows deleted, failing keys)."""
    sql = psycopg2.sql
    params, failed = {"c": config.consumer}, set(failed)
    rows = 0
    with conn.cursor() as cur:
        # The savepoint goes with the look at the failing keys: a round trip less.
        cur.execute(("SAVEPOINT snapshot_read; " if not failed else "") + FAILING, params)
        failing = set(cur.fetchall())
        for index, (queue, keys) in enumerate(zip(layout.queues, layout.keys)):
            kept = [k for i, k in failed if i == index] if retry is None else []
            if kept and not keys:
                continue        # a queue without keys is one item: it stays whole
            delete = sql.SQL("DELETE FROM {} q WHERE " + DUE).format(table(queue.table))
            if kept:
                delete += sql.SQL(" AND NOT EXISTS (SELECT FROM {} WHERE {})").format(
                    unnest(keys), sql.SQL(" AND ").join(
                        sql.SQL("f.k%d = q.{}" % i).format(sql.Identifier(name))
                        for i, (name, _) in enumerate(keys)))
            cur.execute(delete, dict(params, **columns(kept, keys)))
            rows += cur.rowcount
    return rows, failing


def queue_again_after(conn, changed, config, layout, failing, failed=(), retry=None):
    """update_queues' second half, after delete_due: (the failures forgotten, {delay:
    re-clears queued})."""
    params, failed = {"c": config.consumer}, set(failed)
    # A render that read the database before the change committed may write
    # its page after we delete it: clear once more, later.  Re-clears queue
    # nothing, so they never chain.
    again = {}
    for (i, k), change in changed.items():
        if change and (i, k) not in failed:
            again.setdefault(i, []).append(k)
    queued = collections.Counter()
    with conn.cursor() as cur:
        for index, (queue, keys) in enumerate(zip(layout.queues, layout.keys)):
            delay = config.again_after if queue.again_after is None else queue.again_after
            if delay and again.get(index):
                queue_again(cur, queue, keys, dict(params, reclear=True, **columns(
                    again[index], keys, [delay] * len(again[index]))))
                queued[delay] += len(again[index])
            later = [(k, seconds) for (i, k), seconds in (retry or {}).items() if i == index]
            if later:
                queue_again(cur, queue, keys, dict(params, reclear=False, **columns(
                    [k for k, _ in later], keys, [s for _, s in later])))
        forgotten = []
        tables = {table for table, _ in failing}
        gone = [named for named in (
            (layout.queues[i].table, key_text(k)) for i, k in changed
            if (i, k) not in failed and layout.queues[i].table in tables) if named in failing]
        if gone:
            cur.execute(FORGET, dict(params, queues=[t for t, _ in gone],
                                     keys=[k for _, k in gone]))
            forgotten = cur.fetchall()
    return forgotten, queued


def warm_up(cur, layout, consumer):
    """Have a new backend plan the run's queries and compile the queues' triggers."""
    cur.execute(psycopg2.sql.SQL("EXPLAIN ") + select_due(layout), {"c": consumer})
    cur.execute(FAILING, {"c": consumer})
    for queue, keys in zip(layout.queues, layout.keys):     # an INSERT of no row
        queue_again(cur, queue, keys, dict(columns([], keys, []), c=consumer, reclear=True))


def queue_again(cur, queue, keys, params):
    """Queue the keys of unnest() again, each due its delay later."""
    sql = psycopg2.sql
    cur.execute(sql.SQL(
        "INSERT INTO {} ({}consumer, due_at, reclear) SELECT {}%(c)s,"
        " pg_catalog.now() + f.delay * interval '1 second', %(reclear)s FROM {}").format(
            table(queue.table),
            sql.Composed([sql.Identifier(name) + sql.SQL(", ") for name, _ in keys]),
            sql.SQL("".join("f.k%d, " % i for i in range(len(keys)))),
            unnest(keys, delay=True)), params)


def unnest(keys, delay=False):
    """Parallel typed arrays, one per key column (and the delays), as f(k0, k1, ..., delay)."""
    sql = psycopg2.sql
    arrays = [(sql.Placeholder("k%d" % i), kind) for i, (_, kind) in enumerate(keys)]
    names = ["k%d" % i for i in range(len(keys))]
    if delay:
        arrays.append((sql.Placeholder("delay"), "float8"))
        names.append("delay")
    # ROWS FROM: a several-array unnest() is only understood unqualified.
    return sql.SQL("ROWS FROM ({}) AS f({})").format(
        sql.SQL(", ").join(sql.SQL("pg_catalog.unnest({}::%s[])" % kind).format(p)
                           for p, kind in arrays),
        sql.SQL(", ".join(names)))


def columns(keys, queue_keys, delays=None):
    """The parameters of unnest(): each key column's values (and the delays)."""
    params = {"k%d" % i: [k[i] for k in keys] for i in range(len(queue_keys))}
    if delays is not None:
        params["delay"] = delays
    return params


# One clearer at a time, every consumer's and by hand: two runs that overlap
# while writers commit form read/write cycles in which PostgreSQL cancels the
# longer at its commit, its work lost, and again at each overlap.  Taken before
# the snapshot (LOCK TABLE takes none), so that a run begins after the other's
# commit.  SHARE UPDATE EXCLUSIVE waits for another clearer only: --check
# reads this table, and no writer touches it, nor does a busy queue's autovacuum.
TAKE_TURNS = "LOCK TABLE cache_clearing_failures IN SHARE UPDATE EXCLUSIVE MODE"
# A backlog's DISTINCT sorts on disk within the default work_mem (4MB): the
# FreshPorts backlog's SELECT took 1.0 s, against 0.5 s with 32MB, hashed in
# memory (measured here).  Raised for the run's transaction only, never
# lowered; and no JIT, which compiles 85 ms for a plan of plain comparisons.
ROOM_TO_SORT = ("SELECT pg_catalog.set_config('jit', 'off', true), CASE WHEN"
                " pg_catalog.pg_size_bytes(pg_catalog.current_setting('work_mem')) < 33554432"
                " THEN pg_catalog.set_config('work_mem', '32MB', true) END")
# Keys whose pages or command keep failing, in cache_clearing_failures: since
# when, how many attempts, and when a line last said so (the clearers are
# processes of their own: the database keeps the log calm across them).
FAILING = "SELECT queue, key FROM cache_clearing_failures WHERE consumer = %(c)s"
FORGET = ("DELETE FROM cache_clearing_failures WHERE consumer = %(c)s AND (queue, key) IN"
          " (SELECT * FROM ROWS FROM (pg_catalog.unnest(%(queues)s::text[]),"
          " pg_catalog.unnest(%(keys)s::text[])))"
          " RETURNING queue, key, since, attempts")
RECORD = ("INSERT INTO cache_clearing_failures AS f (queue, consumer, key)"
          " SELECT q, %(c)s, k FROM ROWS FROM (pg_catalog.unnest(%(queues)s::text[]),"
          " pg_catalog.unnest(%(keys)s::text[])) AS u(q, k)"
          " ON CONFLICT (queue, consumer, key) DO UPDATE SET attempts = f.attempts + 1,"
          " said_at = CASE WHEN f.said_at <= pg_catalog.now() - interval '60 s'"
          " THEN pg_catalog.now() ELSE f.said_at END"
          " RETURNING queue, key, since, attempts, said_at = pg_catalog.now()")


def key_text(keys):
    """A key as cache_clearing_failures and the log name it: its values, as JSON."""
    return json.dumps([v if isinstance(v, str) else str(v) for v in keys])


def failure_keys(layout, items):
    """The parameters that name items in cache_clearing_failures."""
    return {"queues": [layout.queues[i].table for i, _ in items],
            "keys": [key_text(k) for _, k in items]}


def record_failures(cur, consumer, layout, items):
    """Count a failed attempt of each item: {item: (since, attempts, say it now)}."""
    cur.execute(RECORD, dict(failure_keys(layout, items), c=consumer))
    found = {(q, k): rest for q, k, *rest in cur.fetchall()}
    return {item: found[(layout.queues[item[0]].table, key_text(item[1]))] for item in items}
