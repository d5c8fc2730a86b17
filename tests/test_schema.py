"""The schema: the queue, its triggers and their notifications."""

import os

import psycopg2
import psycopg2.extensions

from tests.fixtures.common import wait_for
from tests.fixtures.database import (add_ports, all_queued, create_database, drop_database,
                                     load_schema, queued, sql, touch_port)


# ----------------------------------------------------------------- schema

def test_schema_loads_twice_and_keeps_data(admin_dsn):
    name = "lcc_schema_%d" % os.getpid()
    dsn = create_database(admin_dsn, name)
    try:
        add_ports(dsn, "www/a")
        load_schema(dsn)
        assert sql(dsn, "SELECT category, name FROM ports") == [("www", "a")]
        assert queued(dsn) == [("www", "a")]
        add_ports(dsn, "www/b")     # the trigger still works, once
        assert queued(dsn) == [("www", "a"), ("www", "b")]
    finally:
        drop_database(admin_dsn, name)


def test_trigger_queues_insert_update_delete(db):
    add_ports(db, "www/a")
    assert queued(db) == [("www", "a")]
    sql(db, "TRUNCATE ports_cache_clearing")
    touch_port(db, "www/a")
    assert queued(db) == [("www", "a")]
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "DELETE FROM ports WHERE name = 'a'")
    assert queued(db) == [("www", "a")]


def test_trigger_queues_old_and_new_pair_on_rename_and_move(db):
    add_ports(db, "www/a")
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "UPDATE ports SET name = 'b' WHERE name = 'a'")
    assert queued(db) == [("www", "a"), ("www", "b")]
    sql(db, "TRUNCATE ports_cache_clearing")
    sql(db, "UPDATE ports SET category = 'net' WHERE name = 'b'")
    assert queued(db) == [("net", "b"), ("www", "b")]


def test_trigger_inserts_unconditionally(db):
    add_ports(db, "www/a")
    touch_port(db, "www/a")
    touch_port(db, "www/a", "3")
    assert queued(db) == [("www", "a")] * 3


class Listening:
    """A plain LISTEN connection, for watching what the trigger notifies."""

    def __init__(self, dsn):
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.conn.cursor().execute("LISTEN clear_ports_cache")

    def received(self):
        """Notifications received so far; a round trip first flushes in-flight ones."""
        self.conn.cursor().execute("SELECT 1")
        self.conn.poll()
        return list(self.conn.notifies)


def test_rollback_queues_and_notifies_nothing(db):
    listening = Listening(db)
    add_ports(db, "www/a")
    wait_for(listening.received, what="the INSERT's notification")
    listening.conn.notifies.clear()
    sql(db, "TRUNCATE ports_cache_clearing")
    conn = psycopg2.connect(db)
    with conn.cursor() as cur:
        cur.execute("UPDATE ports SET version = 'x'")
        cur.execute("INSERT INTO ports (category, name) VALUES ('www', 'b')")
    conn.rollback()
    conn.close()
    assert queued(db) == []
    assert listening.received() == []


def test_one_notification_per_transaction_without_payload(db):
    add_ports(db, "www/a", "www/b", "www/c")
    listening = Listening(db)
    conn = psycopg2.connect(db)
    with conn, conn.cursor() as cur:
        for name in "abc":
            cur.execute("UPDATE ports SET version = '9' WHERE name = %s", (name,))
    conn.close()
    notes = wait_for(listening.received, what="a notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "")]


def test_statement_changing_nothing_notifies_nobody(db):
    add_ports(db, "www/a")
    sql(db, "TRUNCATE ports_cache_clearing")
    listening = Listening(db)
    assert sql(db, "UPDATE ports SET version = 'x' WHERE false") == 0
    assert queued(db) == []
    assert listening.received() == []


def test_schema_upgrade_keeps_queued_rows(admin_dsn):
    name = "lcc_upgrade_%d" % os.getpid()
    drop_database(admin_dsn, name)
    sql(admin_dsn, "CREATE DATABASE %s" % name)
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    try:
        # The queue as the previous schema.sql made it.
        sql(dsn, "CREATE TABLE ports_cache_clearing (id bigserial PRIMARY KEY, category"
            " text NOT NULL, port text NOT NULL, queued_at timestamptz NOT NULL DEFAULT"
            " now()); INSERT INTO ports_cache_clearing (category, port)"
            " VALUES ('www', 'a'), ('net', 'b')")
        load_schema(dsn)
        assert all_queued(dsn) == [("net", "b", False), ("www", "a", False)]
        assert queued(dsn) == [("net", "b"), ("www", "a")]
        load_schema(dsn)
        assert len(all_queued(dsn)) == 2
    finally:
        drop_database(admin_dsn, name)


def test_truncate_ports_queues_every_port(db):
    add_ports(db, "www/a", "net/b")
    sql(db, "TRUNCATE ports_cache_clearing")
    listening = Listening(db)
    sql(db, "TRUNCATE ports")
    assert queued(db) == [("net", "b"), ("www", "a")]
    wait_for(listening.received, what="TRUNCATE's notification")


def test_any_insert_into_the_queue_notifies_and_an_empty_one_does_not(db):
    listening = Listening(db)
    sql(db, "INSERT INTO ports_cache_clearing (category, port) SELECT 'www', 'a' WHERE false")
    assert listening.received() == []
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'nginx', now() + interval '10 days')")
    notes = wait_for(listening.received, what="the INSERT's notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "later")]
    listening.conn.notifies.clear()
    sql(db, "INSERT INTO ports_cache_clearing (category, port, due_at)"
        " VALUES ('www', 'a', now() + interval '1 h'), ('www', 'b', now())")
    notes = wait_for(listening.received, what="the INSERT's notification")
    assert [(n.channel, n.payload) for n in notes] == [("clear_ports_cache", "")]


def test_schema_says_it_made_the_examples_ports_and_then_nothing(admin_dsn):
    name = "lcc_new_ports_%d" % os.getpid()
    drop_database(admin_dsn, name)
    sql(admin_dsn, "CREATE DATABASE %s" % name)
    dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    try:
        said = load_schema(dsn).stderr.strip().splitlines()
        assert len(said) == 1 and "NOTICE:  this database had no ports" in said[0], said
        assert load_schema(dsn).stderr == ""        # again: a ports that fits
    finally:
        drop_database(admin_dsn, name)
