#!/usr/bin/env bash
# make demo: insert a port, cache its page, start the daemon, update the port,
# watch the page go; then remove the port, its pages and its queue rows
# (re-clears included).  Uses the database `make run` uses: libpq's defaults.
#   contrib/make/demo.sh PYTHON PSQL OWNER
set -eu
py=$1 psql_cmd=$2 owner=$3
cache=$(mktemp -d); log=$cache/daemon.log; pid=
psql() { command $psql_cmd -q -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    psql -c "DELETE FROM ports WHERE category = 'demo'" \
         -c "DELETE FROM ports_cache_clearing WHERE category = 'demo'" || true
    rm -rf "$cache"
}
trap cleanup EXIT
page=$cache/demo/hello/Detail.Part1.head.PageSize100.PageNum1.html
sh contrib/make/schema.sh "$psql_cmd" "$owner"
psql -c "DELETE FROM ports WHERE category = 'demo' AND name = 'hello'"
psql -c "INSERT INTO ports (category, name, version) VALUES ('demo', 'hello', '1.0')"
"$py" clear_cache.py -q --cache-dir "$cache" --again-after 0
mkdir -p "$cache/demo/hello" && echo '<html>demo/hello 1.0</html>' > "$page"
echo "1. port demo/hello is in the database, and its page is cached:"
ls -l "$page"
echo "2. starting the daemon"
: > "$log"     # before tee, which creates it only when it starts
"$py" listen_clear_cache.py --cache-dir "$cache" 2> >(tee "$log" >&2) & pid=$!
for i in $(seq 100); do grep -q 'listening' "$log" && break; sleep 0.1; done
echo "3. UPDATE ports SET version = '1.1' WHERE category = 'demo' AND name = 'hello'"
psql -c "UPDATE ports SET version = '1.1' WHERE category = 'demo' AND name = 'hello'"
for i in $(seq 100); do [ -e "$page" ] || break; sleep 0.1; done
if [ -e "$page" ]; then echo "4. FAILED: the page is still there"; exit 1; fi
echo "4. the page is gone:"; ls -la "$cache/demo/hello"
echo "5. stopping the daemon, removing the port and its queue rows"
kill "$pid"; wait "$pid" || true; pid=
echo "demo done"
