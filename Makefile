# listen_clear_cache: `make test` on a fresh clone; `make run` to use it.
# Everything Python needs goes into .venv, from the pinned requirements.txt.

PYTHON ?= python3
PSQL ?= psql
CACHE_DIR ?= cache
# `make test PYTHON=python3.9` builds its own .venv-3.9 beside the default .venv.
ifeq ($(origin PYTHON),command line)
VENV := .venv-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
else
VENV := .venv
endif
PY := $(VENV)/bin/python

.PHONY: test run demo flush bench reliability venv pg-answers

venv: $(VENV)/.installed

# The scripts' own venv holds psycopg2 only; the test tools go in by `make test`.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Every target that needs the database says so in one line when none answers,
# or when the one that answers refuses (an unknown database or role, say).
define PG_ANSWERS
import sys, psycopg2
try:
    psycopg2.connect("connect_timeout=5").close()
except psycopg2.OperationalError as e:
    why = " ".join(str(e).split())
    silent = any(s in why for s in ("Connection refused", "No such file", "timeout expired",
                                    "could not translate host name"))
    sys.exit("make: " + ("no PostgreSQL answers" if silent else "PostgreSQL refused us")
             + " at libpq's defaults; set PGHOST, PGPORT, PGUSER, PGPASSWORD or"
             " PGDATABASE (" + why + ")")
endef
export PG_ANSWERS

pg-answers: venv
	@$(PY) -c "$$PG_ANSWERS"

test: pg-answers $(VENV)/.dev-installed
	$(PY) -m pytest -q $(ARGS)

# The commands it prints make the page only once the INSERT's own clear and
# re-clear are done (the text says to wait), and list it again after a pause:
# an `ls` right after psql can beat the daemon's few ms.
run: pg-answers
	$(PSQL) -q -v ON_ERROR_STOP=1 -f schema.sql
	mkdir -p $(CACHE_DIR)
	@echo "To see it work, in another terminal: make a port (its pages are cleared now and again 5 s later, as for any change),"
	@echo "  psql -c \"INSERT INTO ports (category, name, version) VALUES ('www', 'nginx', '1')\""
	@echo "then, after those 5 s, cache its page, change the port and see the page go:"
	@echo "  mkdir -p $(CACHE_DIR)/www/nginx; echo page > $(CACHE_DIR)/www/nginx/index.html; ls $(CACHE_DIR)/www/nginx; psql -c \"UPDATE ports SET version = '2' WHERE category = 'www' AND name = 'nginx'\"; sleep 1; ls $(CACHE_DIR)/www/nginx"
	$(PY) listen_clear_cache.py --cache-dir $(CACHE_DIR)

flush: pg-answers
	mkdir -p $(CACHE_DIR)
	$(PY) clear_cache.py --cache-dir $(CACHE_DIR)

bench: pg-answers $(VENV)/.dev-installed
	$(PY) bench.py

reliability: pg-answers $(VENV)/.dev-installed
	rm -f reliability.json
	$(PY) -m pytest -q -m reliability $(ARGS)
	$(PY) -c "import conftest; conftest.print_reliability_table()"

# The demo uses the database `make run` uses, a temporary cache directory,
# and a port named demo/hello that it removes again.
define DEMO
set -eu
cache=$$(mktemp -d); log=$$cache/daemon.log; pid=
trap '[ -z "$$pid" ] || kill "$$pid" 2>/dev/null; rm -rf "$$cache"' EXIT
psql() { command $(PSQL) -q -v ON_ERROR_STOP=1 "$$@"; }
page=$$cache/demo/hello/Detail.Part1.head.PageSize100.PageNum1.html
psql -f schema.sql
psql -c "DELETE FROM ports WHERE category = 'demo' AND name = 'hello'"
psql -c "INSERT INTO ports (category, name, version) VALUES ('demo', 'hello', '1.0')"
$(PY) clear_cache.py -q --cache-dir "$$cache"
mkdir -p "$$cache/demo/hello" && echo '<html>demo/hello 1.0</html>' > "$$page"
echo "1. port demo/hello is in the database, and its page is cached:"
ls -l "$$page"
echo "2. starting the daemon"
: > "$$log"     # before tee, which creates it only when it starts
$(PY) listen_clear_cache.py --cache-dir "$$cache" 2> >(tee "$$log" >&2) & pid=$$!
for i in $$(seq 100); do grep -q 'listening' "$$log" && break; sleep 0.1; done
echo "3. UPDATE ports SET version = '1.1' WHERE category = 'demo' AND name = 'hello'"
psql -c "UPDATE ports SET version = '1.1' WHERE category = 'demo' AND name = 'hello'"
for i in $$(seq 100); do [ -e "$$page" ] || break; sleep 0.1; done
if [ -e "$$page" ]; then echo "4. FAILED: the page is still there"; exit 1; fi
echo "4. the page is gone:"; ls -la "$$cache/demo/hello"
echo "5. stopping the daemon"
kill "$$pid"; wait "$$pid"; pid=
psql -c "DELETE FROM ports WHERE category = 'demo' AND name = 'hello'"
$(PY) clear_cache.py -q --cache-dir "$$cache"
echo "demo done"
endef
export DEMO

demo: pg-answers
	@bash -c "$$DEMO"
