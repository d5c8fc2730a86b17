#!/bin/sh
# make run: load schema.sql, create the cache directory, print the two commands
# to try in another terminal, and run the daemon in the foreground.
#   contrib/make/run.sh PYTHON PSQL CACHE_DIR OWNER
# The commands it prints make the page only once the INSERT's own clear and
# re-clear are done (the text says to wait), and list it again after a pause:
# an `ls` right after psql can beat the daemon's few ms.
set -eu
py=$1 psql=$2 cache=$3 owner=$4
sh contrib/make/schema.sh "$psql" "$owner"
mkdir -p "$cache"
# The other terminal must reach the same server: where make chose it (the
# checkout's own, say), the commands name it.
shown=$psql
[ -z "${PGHOST:-}" ] || shown="PGHOST=$PGHOST $(command -v "$psql")"
echo "To see it work, in another terminal: make a port (its pages are cleared now and again 5 s later, as for any change),"
echo "  $shown -c \"INSERT INTO ports (category, name, version) VALUES ('www', 'nginx', '1')\""
echo "then, after those 5 s, cache its page, change the port and see the page go:"
echo "  mkdir -p $cache/www/nginx; echo page > $cache/www/nginx/index.html; ls $cache/www/nginx; $shown -c \"UPDATE ports SET version = '2' WHERE category = 'www' AND name = 'nginx'\"; sleep 1; ls $cache/www/nginx"
exec "$py" listen_clear_cache.py --cache-dir "$cache"
