# listen_clear_cache: `make test` on a fresh clone; `make run` to use it.
# GNU make and BSD make alike (FreeBSD's make, Debian's bmake): no
# conditionals, no $(shell).  Everything Python needs goes into $(VENV),
# from the pinned requirements.txt.
#
#   make venv PYTHON=/usr/bin/python3     the .venv the recipes use, from that interpreter
#   make test PYTHON=python3.9 VENV=.venv-3.9    the suite under another one, in its own venv
#   make test ARGS='-k template'          a slice of the suite (pytest's options)
#   make test PG=embedded                 against the checkout's own PostgreSQL 18 in .pg/

PYTHON ?= python3
PSQL ?= psql
VENV ?= .venv
CACHE_DIR ?= cache
# make run and make demo load schema.sql as this role, made for the queues when
# libpq's role is a superuser (contrib/make/schema.sh says which it used).
OWNER ?= cache_owner
ARGS ?=
PG ?=
PY = $(VENV)/bin/python
# Every target that needs the database runs its command through pg.py: the
# server libpq's defaults name, else (or with PG=embedded) the checkout's own
# in .pg/, started on first use and said in one line.  A server that does not
# answer where a PG* variable points, or refuses, is one line.
WITH_PG = $(PY) contrib/make/pg.py --pg "$(PG)"
# make test creates its scratch database as libpq's default role, else as postgres.
WITH_TEST_PG = $(WITH_PG) --roles "" "user=postgres"

.PHONY: test run demo flush bench reliability venv pg-stop clean

venv: $(VENV)/.installed

# The scripts' own venv holds psycopg2 only; the test tools go in by `make test`.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: $(VENV)/.dev-installed
	@$(WITH_TEST_PG) -- $(PY) -m pytest -q $(ARGS)

run: venv
	@$(WITH_PG) -- sh contrib/make/run.sh $(PY) $(PSQL) $(CACHE_DIR) $(OWNER)

flush: venv
	mkdir -p $(CACHE_DIR)
	@$(WITH_PG) -- $(PY) clear_cache.py --cache-dir $(CACHE_DIR)

bench: $(VENV)/.dev-installed
	@$(WITH_TEST_PG) -- $(PY) bench.py

reliability: $(VENV)/.dev-installed
	rm -f reliability.json
	@$(WITH_TEST_PG) -- $(PY) -m pytest -q -m reliability $(ARGS)
	$(PY) -c "from tests.fixtures.common import print_reliability_table as p; p()"

# The demo uses the database `make run` uses, a temporary cache directory,
# and a port named demo/hello, which it removes again with its queue rows.
demo: venv
	@$(WITH_PG) -- bash contrib/make/demo.sh $(PY) $(PSQL) $(OWNER)

# Stops the checkout's own PostgreSQL; its data stays in .pg/ for the next command.
pg-stop:
	@$(PYTHON) contrib/make/pg.py --stop

# Removes what the targets made: the checkout's PostgreSQL with its data
# (stopped first), and ./cache, make run's cache (never $(CACHE_DIR), which
# make also takes from the environment); the venvs stay: rm -rf .venv .venv-*.
clean: pg-stop
	rm -rf .pg cache dist build *.egg-info reliability.json .pytest_cache .hypothesis __pycache__
