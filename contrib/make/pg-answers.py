"""Exit 0 if PostgreSQL answers at one of the DSNs given (libpq's defaults: ""), else say why in one line.

    python contrib/make/pg-answers.py "" "user=postgres"

The Makefile's targets run it first, so that a silent or refusing server is
one line, not a traceback.
"""

import sys

import psycopg2

SILENT = ("Connection refused", "No such file", "timeout expired", "could not translate host name")


def main(dsns):
    first = None
    for dsn in dsns or [""]:
        try:
            psycopg2.connect(dsn, connect_timeout=5).close()
            return 0
        except psycopg2.OperationalError as e:
            first = first or " ".join(str(e).split())
    silent = any(s in first for s in SILENT)
    sys.exit("make: %s at %s; set PGHOST, PGPORT, PGUSER, PGPASSWORD or PGDATABASE (%s)" % (
        "no PostgreSQL answers" if silent else "PostgreSQL refused us",
        " nor ".join(repr(d) if d else "libpq's defaults" for d in dsns or [""]), first))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
