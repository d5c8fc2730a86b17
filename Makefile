# listen_clear_cache: `make test` on a fresh clone; `make run` to use it.
# GNU make and BSD make alike (FreeBSD's make, Debian's bmake): no
# conditionals, no $(shell).  Everything Python needs goes into $(VENV),
# from the pinned requirements.txt.
#
#   make venv PYTHON=/usr/bin/python3     the .venv the recipes use, from that interpreter
#   make test PYTHON=python3.9 VENV=.venv-3.9    the suite under another one, in its own venv
#   make test ARGS='-k template'          a slice of the suite (pytest's options)

PYTHON ?= python3
PSQL ?= psql
VENV ?= .venv
CACHE_DIR ?= cache
ARGS ?=
PY = $(VENV)/bin/python
# make test creates its scratch database as libpq's default role, else as postgres.
TEST_ROLES = "" "user=postgres"

.PHONY: test run demo flush bench reliability venv pg-answers pg-answers-test

venv: $(VENV)/.installed

# The scripts' own venv holds psycopg2 only; the test tools go in by `make test`.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Every target that needs the database says so in one line when none
# answers, or when the one that answers refuses (an unknown role, say).
pg-answers: venv
	@$(PY) contrib/make/pg-answers.py ""

pg-answers-test: venv
	@$(PY) contrib/make/pg-answers.py $(TEST_ROLES)

test: pg-answers-test $(VENV)/.dev-installed
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

bench: pg-answers-test $(VENV)/.dev-installed
	$(PY) bench.py

reliability: pg-answers-test $(VENV)/.dev-installed
	rm -f reliability.json
	$(PY) -m pytest -q -m reliability $(ARGS)
	$(PY) -c "import conftest; conftest.print_reliability_table()"

# The demo uses the database `make run` uses, a temporary cache directory,
# and a port named demo/hello, which it removes again with its queue rows.
demo: pg-answers
	@bash contrib/make/demo.sh $(PY) $(PSQL)
