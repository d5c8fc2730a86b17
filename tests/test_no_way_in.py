"""No way in: what other roles can create does not change what the machinery
and the clearer run."""


import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from tests.fixtures.daemon import check, clear
from tests.fixtures.database import load_schema, scratch_roles, sql
from tests.fixtures.files import make_page

# Overloads a writer with CREATE on public can add, each a better match than
# pg_catalog's for some call the machinery or the clearer made: (signature,
# what it returns, the built-in it stands for).  Each records who ran it.
OVERLOADS = [
    ("quote_ident(name)", "text", "pg_catalog.quote_ident($1::text)"),
    ("quote_ident(character varying)", "text", "pg_catalog.quote_ident($1::text)"),
    ("format(text, text)", "text", "pg_catalog.format($1, $2)"),
    ("format(text, name)", "text", "pg_catalog.format($1, $2)"),
    ("format(text, regclass)", "text", "pg_catalog.format($1, $2)"),
    ("format(text, text, regclass)", "text", "pg_catalog.format($1, $2, $3)"),
    ("format(text, text, text)", "text", "pg_catalog.format($1, $2, $3)"),
    ("format(text, text, text, regclass)", "text", "pg_catalog.format($1, $2, $3, $4)"),
    ("format(text, regclass, text, text)", "text", "pg_catalog.format($1, $2, $3, $4)"),
    ("format(text, name, name, text, text)", "text", "pg_catalog.format($1, $2, $3, $4, $5)"),
    ("unnest(text[])", "SETOF text", "pg_catalog.unnest($1)"),
    ("unnest(int2vector)", "SETOF smallint", "pg_catalog.unnest($1::smallint[])"),
    ("concat_ws(text, text)", "text", "pg_catalog.concat_ws($1, $2)"),
    ("concat_ws(text, text, text)", "text", "pg_catalog.concat_ws($1, $2, $3)"),
    ("octet_length(character varying)", "integer", "pg_catalog.octet_length($1::text)"),
    ("set_config(name, text, boolean)", "text", "pg_catalog.set_config($1::text, $2, $3)"),
    ("cache_clearing_keys(oid)", "TABLE (name name, type text)",
     "* FROM public.cache_clearing_keys($1::regclass)"),
]
# Operators likewise: (name, left, right, the built-in expression).
OPERATORS = [
    ("=", "oid", "regclass", "$1 = $2::oid"),
    ("=", "oid", "integer", "$1 = $2::oid"),
    ("||", "name", "name", "$1::text || $2::text"),
    ("||", "name", "text", "$1::text || $2"),
    ("->>", "jsonb", "jsonb", "$1 ->> ($2 #>> '{}')"),
]


@pytest.fixture
def attacked(admin_dsn, cache):
    """A database whose queues' owner is a plain role, with a writer that may CREATE
    in public and has put its overloads there, and the daemon's role with the
    README's grants: {role: DSN}."""
    with scratch_roles(admin_dsn, "attack", ("owner", "writer", "daemon"), "owner") as (
            _, roles, dsns):
        yield from set_up_attack(roles, dsns)


def set_up_attack(roles, dsns):
    """Load the schema as the owner, grant as the README says, plant the overloads."""
    load_schema(dsns["owner"], daemon_role=roles["daemon"])     # with its grants
    writer = roles["writer"]
    sql(dsns["owner"], "GRANT INSERT ON ports_cache_clearing TO {0};"
        " GRANT USAGE ON SEQUENCE ports_cache_clearing_id_seq TO {0};"
        " GRANT SELECT, UPDATE ON ports TO {0}; GRANT CREATE ON SCHEMA public TO {0};"
        " INSERT INTO ports (category, name) VALUES ('www', 'a'), ('www', 'b'), ('www', 'c')"
        .format(writer))
    sql(dsns["writer"], "CREATE TABLE public.called (fn text, who text DEFAULT current_user);"
        " GRANT INSERT ON public.called TO PUBLIC")
    for signature, returns, builtin in OVERLOADS:
        sql(dsns["writer"], "CREATE FUNCTION public.%s RETURNS %s LANGUAGE sql AS $$"
            " INSERT INTO public.called (fn) VALUES (%s); SELECT %s $$"
            % (signature, returns, psycopg2.extensions.QuotedString(signature).getquoted()
               .decode(), builtin))
    for i, (op, left, right, builtin) in enumerate(OPERATORS):
        what = "%s %s %s" % (left, op, right)
        sql(dsns["writer"], "CREATE FUNCTION public.hostile_%d(%s, %s) RETURNS %s LANGUAGE sql"
            " AS $$ INSERT INTO public.called (fn) VALUES ('%s'); SELECT %s $$;"
            " CREATE OPERATOR public.%s (LEFTARG = %s, RIGHTARG = %s,"
            " FUNCTION = public.hostile_%d)"
            % (i, left, right, "boolean" if op == "=" else "text", what, builtin,
               op, left, right, i))
    yield dsns


def ran_as_others(dsns):
    """The overloads run by a role other than the writer: [(overload, role)]."""
    return sql(dsns["writer"], "SELECT DISTINCT fn, who FROM public.called"
               " WHERE who <> %s ORDER BY 1, 2",
               [psycopg2.extensions.parse_dsn(dsns["writer"])["user"]])


def test_overloads_in_public_run_for_nobody_but_their_writer(attacked, cache):
    pages = {name: make_page(cache, "www/" + name) for name in "abc"}
    # A writer's INSERT (no consumers: the notify trigger), an UPDATE of ports
    # (the ports trigger), a clear as the daemon's role.
    sql(attacked["writer"], "INSERT INTO ports_cache_clearing (category, port)"
        " VALUES ('www', 'a')")
    sql(attacked["writer"], "UPDATE ports SET version = '2' WHERE name = 'b'")
    result = clear(dsn=attacked["daemon"], cache=cache)
    assert result.returncode == 0, result.stderr
    assert not pages["a"].exists() and not pages["b"].exists()
    assert sql(attacked["owner"], "SELECT count(*) FROM ports_cache_clearing"
               " WHERE NOT reclear") == [(0,)]
    # From one server to two; a writer's row for '' fanned out; a clear for web1.
    sql(attacked["owner"], "SELECT cache_clearing_add_consumers('web1')")
    sql(attacked["writer"], "INSERT INTO ports_cache_clearing (category, port)"
        " VALUES ('www', 'c')")
    result = clear("--consumer", "web1", dsn=attacked["daemon"], cache=cache)
    assert result.returncode == 0, result.stderr
    assert not pages["c"].exists()
    check("--consumer", "web1", dsn=attacked["daemon"])
    load_schema(attacked["owner"])      # reloading after an upgrade
    assert ran_as_others(attacked) == []
    # And the writer gained nothing.
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        sql(attacked["writer"], "SELECT FROM cache_clearing_failures")


def test_schema_warns_once_when_others_may_create_in_its_schema(attacked):
    result = load_schema(attacked["owner"])
    writer = psycopg2.extensions.parse_dsn(attacked["writer"])["user"]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].endswith("REVOKE CREATE ON SCHEMA public FROM %s" % writer)
    sql(attacked["owner"], "REVOKE CREATE ON SCHEMA public FROM %s" % writer)
    assert "WARNING" not in load_schema(attacked["owner"]).stderr
