#!/bin/sh
# make run and make demo: load schema.sql as the queues' owner, never as a
# superuser when it can help it, and say which role in one line.
#   contrib/make/schema.sh PSQL OWNER
# The owner is, in this order: the role that owns the queue already (the
# schema is loaded again as it was first); OWNER, made here (no login) when
# we are a superuser, with CREATE on the schema; else ourselves, who are then
# no superuser.  A superuser loads it with SET ROLE: the objects are OWNER's.
set -eu
psql=$1 owner=$2
q() { $psql -X -q -A -t -v ON_ERROR_STOP=1 -v owner="$owner" "$@"; }
read -r me super found <<END
$(q -F ' ' -c "SELECT current_user, rolsuper, coalesce((SELECT pg_catalog.pg_get_userbyid(relowner)
      FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass('ports_cache_clearing')), '')
  FROM pg_catalog.pg_roles WHERE rolname = current_user")
END
if [ -n "$found" ]; then
    as=$found why="the queue's owner"
elif [ "$super" = t ]; then
    as=$owner why="the queues' owner, a role without login made for them, not the superuser $me"
    q >/dev/null <<'SQL'
SELECT pg_catalog.format('CREATE ROLE %I', :'owner')
    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'owner') \gexec
SELECT pg_catalog.format('GRANT CREATE, USAGE ON SCHEMA %I TO %I',
                         pg_catalog.current_schema(), :'owner') \gexec
SQL
else
    as=$me why="the role libpq's defaults name (no superuser: it cannot make an owner)"
fi
echo "make: loading schema.sql as $as, $why"
{ [ "$as" = "$me" ] || echo "SET ROLE \"$as\";"; cat schema.sql; } | q -f -
