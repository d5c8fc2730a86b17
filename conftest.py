"""The suite's fixtures: a real PostgreSQL, real files, real processes.

    make test                     everything: test_listen.py here, the rest in tests/
    make test ARGS='-k template'  a slice (pytest's options)

The suite creates a scratch database, loads schema.sql into it with psql,
and drops it at the end.  Without a reachable PostgreSQL it fails; it never
skips.  Every wait is a poll with a deadline.  The fixtures live in
tests/fixtures/, a module per kind; this file makes them every test's.
"""

pytest_plugins = ["tests.fixtures.common", "tests.fixtures.database", "tests.fixtures.files",
                  "tests.fixtures.daemon", "tests.fixtures.proxy"]
