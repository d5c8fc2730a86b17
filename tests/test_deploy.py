"""The deployment recipes under contrib/, run for real."""

import configparser
import os
import re
import signal
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

from tests.fixtures.common import HERE, copy_checkout, require, typed, wait_for
from tests.fixtures.daemon import CLEAR
from tests.fixtures.database import (add_ports, drop_database, grants_to, all_queued, backends, libpq_env,
                                     queue_quietly, queued, sql, touch_port)
from tests.fixtures.files import make_page
from tests.fixtures.recipes import (CONTRIB, DAEMON, INSTALLED, SETTINGS, daemontools_service,
                                    freshports_pages, read_settings, write_settings)
from tests.fixtures.proxy import free_port


# ------------------------------------------------- deployment recipes (contrib/)

def test_the_commands_make_run_prints_show_a_page_go(db, tmp_path):
    """Run as printed, the second after the re-clear: page listed, then the UPDATE clears it."""
    cache, out, err = tmp_path / "cache", tmp_path / "out", tmp_path / "err"
    env = typed(libpq_env(db))
    venv = Path(sys.executable).parent.parent       # the one this suite runs in
    with out.open("w") as stdout, err.open("w") as stderr:
        make = subprocess.Popen(["make", "-s", "run", "CACHE_DIR=%s" % cache,
                                 "VENV=%s" % venv], cwd=HERE, env=env, stdout=stdout,
                                stderr=stderr, start_new_session=True)
    try:
        wait_for(lambda: "listening" in err.read_text(), what="make run's daemon")
        commands = [line.strip() for line in out.read_text().splitlines()
                    if line.startswith("  ")]
        assert len(commands) == 2, out.read_text()
        assert "after those 5 s" in out.read_text()     # the user is told to wait
        subprocess.run(["bash", "-c", commands[0]], cwd=HERE, env=env, check=True)
        # "after those 5 s": the new port's clear and re-clear are done
        wait_for(lambda: not all_queued(db), what="the new port's re-clear")
        page = cache / "www" / "nginx" / "index.html"
        shown = subprocess.run(["bash", "-c", commands[1]], cwd=HERE, env=env, check=True,
                               capture_output=True, text=True).stdout
        assert shown.splitlines()[:2] == ["index.html", "UPDATE 1"]
        wait_for(lambda: not page.exists(), what="the page to go")
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=15)




def test_make_run_loads_the_schema_as_an_owner_it_makes_not_as_the_superuser(admin_dsn,
                                                                             tmp_path):
    suffix = os.getpid()
    name, owner = "lcc_make_%d" % suffix, "lcc_make_owner_%d" % suffix
    drop_database(admin_dsn, name)
    sql(admin_dsn, "CREATE DATABASE %s" % name)
    base = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    assert sql(base, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(True,)]
    out, err = tmp_path / "out", tmp_path / "err"
    venv = Path(sys.executable).parent.parent
    with out.open("w") as stdout, err.open("w") as stderr:
        make = subprocess.Popen(["make", "-s", "run", "CACHE_DIR=%s" % (tmp_path / "cache"),
                                 "VENV=%s" % venv, "OWNER=%s" % owner], cwd=HERE,
                                env=typed(libpq_env(base)), stdout=stdout, stderr=stderr,
                                start_new_session=True)
    try:
        wait_for(lambda: "listening" in err.read_text(), what="make run's daemon")
        said = [line for line in out.read_text().splitlines() if "schema.sql" in line]
        assert said[0].startswith("make: loading schema.sql as %s, the queues' owner" % owner), \
            said
        assert sql(base, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname ="
                   " 'public'") == [(owner,)]
        assert sql(base, "SELECT rolsuper, rolcanlogin FROM pg_roles WHERE rolname = %s",
                   (owner,)) == [(False, False)]
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=15)
        drop_database(admin_dsn, name)
        sql(admin_dsn, "DROP ROLE IF EXISTS %s" % owner)


def svstat(service):
    """svstat's one-line report on a service directory."""
    return subprocess.run(["svstat", str(service)], capture_output=True, text=True,
                          check=True).stdout


def up_pid(service):
    """The pid svstat reports for a service that is up, else None."""
    found = re.search(r": up \(pid (\d+)\)", svstat(service))
    return int(found.group(1)) if found else None


def clearers_of(cache):
    """Live clear_cache.py processes working on this cache directory."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path("/proc/%s/cmdline" % pid).read_bytes()
            environ = Path("/proc/%s/environ" % pid).read_bytes()
        except (FileNotFoundError, PermissionError, NotADirectoryError, ProcessLookupError):
            continue
        if CLEAR.encode() in cmdline and ("CLEAR_CACHE_DIR=%s" % cache).encode() in environ:
            found.append(int(pid))
    return found


@pytest.fixture
def service(tmp_path, db, cache):
    """contrib's daemontools service under real supervise processes, log service piped."""
    require(shutil.which("supervise"), "daemontools", "apt-get install daemontools")
    svc = tmp_path / "listen-clear-cache"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    assert (svc / "env" / "LCC_SETTINGS").read_text().strip() == INSTALLED
    settings = write_settings(tmp_path / "settings.env", LCC_DAEMON=DAEMON,
                              CLEAR_CACHE_DSN=db, CLEAR_CACHE_DIR=cache)
    (svc / "env" / "LCC_SETTINGS").write_text("%s\n" % settings)
    (svc / "env" / "LCC_ACCOUNT").write_text("")       # empty: no setuidgid
    reader, writer = os.pipe()      # as svscan connects a service to its log
    env = {"PATH": os.environ["PATH"]}
    log = subprocess.Popen(["supervise", str(svc / "log")], stdin=reader, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main = subprocess.Popen(["supervise", str(svc)], stdout=writer, stderr=writer, env=env)
    os.close(reader)
    os.close(writer)
    yield svc
    for s in (svc, svc / "log"):
        subprocess.run(["svc", "-dx", str(s)], check=False)
    for proc in (main, log):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_daemontools_service_end_to_end(db, cache, service):
    add_ports(db, "www/a")
    current = service / "log" / "main" / "current"
    wait_for(lambda: up_pid(service), what="svstat to report the service up")
    wait_for(lambda: current.exists() and "listening" in current.read_text(),
             what="the daemon's first lines in log/main/current")
    wait_for(lambda: queued(db) == [], what="the catch-up run")

    pages = freshports_pages(cache, "www/a")            # a committed change clears it
    touch_port(db, "www/a")
    wait_for(lambda: not any(p.exists() for p in pages), what="the change to be cleared")

    page = make_page(cache / "ports", "www/b")          # svc -h flushes without NOTIFY
    queue_quietly(db, "www", "b")
    subprocess.run(["svc", "-h", str(service)], check=True)
    wait_for(lambda: not page.exists(), what="svc -h to flush")

    first = up_pid(service)                             # kill -9: supervise restarts it
    os.kill(first, signal.SIGKILL)
    page = make_page(cache / "ports", "www/a", "while-down.html")
    touch_port(db, "www/a", "3")
    wait_for(lambda: up_pid(service) not in (None, first), what="supervise to restart it")
    wait_for(lambda: not page.exists(), what="the change made while it was down")

    subprocess.run(["svc", "-d", str(service)], check=True)     # svc -d stops it
    wait_for(lambda: ": down " in svstat(service), what="svstat to report it down")
    wait_for(lambda: current.read_text().count("stopped") == 1,
             what="the daemon's clean exit (status 0) in the log")
    assert clearers_of(cache) == [], "a clearer was left behind"

    lines = current.read_text().splitlines()
    assert lines and all(re.match(r"@[0-9a-f]{24} \S", line) for line in lines), lines
    ours = [line for line in lines if "listen_clear_cache: " in line]
    assert ours, lines
    for line in lines:      # multilog's stamp, and no second one of the daemon's
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line


def readme_block(after):
    """The indented command lines of contrib/README.md's first block after the line `after`."""
    lines = (CONTRIB / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    block, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("    "):
            block.append(line.strip().split("   #")[0].strip())
            seen = True
        elif seen and line.strip():
            break
    return block


def as_root(line, paths, cwd):
    """Run one of contrib/README.md's root command lines, its example paths replaced."""
    for example, real in paths.items():
        line = line.replace(example, real)
    # A line that leaves a process behind (&) keeps no pipe of ours open.
    out = subprocess.DEVNULL if line.endswith("&") else subprocess.PIPE
    result = subprocess.run(["sh", "-c", line], cwd=cwd, stdout=out, stderr=out, text=True,
                            timeout=60)
    assert result.returncode == 0, (line, result.stderr)
    return result


def test_the_cron_steps_start_the_line_as_the_account_in_crons_environment(db, account, proxy):
    """contrib/README.md's cron steps as root, the @reboot line as the account (not root),
    in cron's bare environment: the log's directory is there, the settings file's pages go."""
    name, home = account
    add_ports(db, "www/a")
    contrib, cache, logs = home / "contrib", home / "cache", home / "log"
    paths = {INSTALLED: str(home / "settings.env"), "/var/log/freshports": str(logs),
             "/var/db/freshports/cache": str(cache), "-u freshports": "-u " + name,
             "-o freshports -g freshports": "-o %s -g %s" % (name, name),
             "-g freshports": "-g " + name}
    # What the steps use from the account's checkout: the settings as `vi` would
    # leave them, the crontab line with the paths of this test.
    write_settings(contrib / "listen-clear-cache.env",
                   LCC_DAEMON="%s %s" % (home / ".venv/bin/python", home / "listen_clear_cache.py"),
                   CLEAR_CACHE_DSN=psycopg2.extensions.make_dsn(
                       db, user=name, host="127.0.0.1", port=proxy.port),
                   CLEAR_CACHE_DIR=cache)
    line = (contrib / "cron" / "listen-clear-cache").read_text()
    for example, real in paths.items():
        line = line.replace(example, real)
    (contrib / "cron" / "listen-clear-cache").write_text(line)

    first = readme_block("As root, in the checkout's")
    assert first[1].startswith("install -d") and "/var/db/freshports/cache" in first[1]
    as_root(first[1], paths, contrib)                       # the cache, the account's
    settings = readme_block("**The settings**")
    assert settings[0].startswith("install -m 640 -g freshports")
    as_root(settings[0], paths, contrib)
    steps = readme_block("`cron/listen-clear-cache` holds the crontab line")
    assert len(steps) == 3 and steps[2].startswith("runuser -u freshports") and \
        steps[2].endswith("&")
    had = subprocess.run(["crontab", "-u", name, "-l"], capture_output=True).returncode
    try:
        for step in steps:
            as_root(step.replace("runuser -u freshports", "runuser -u " + name), paths, contrib)
        assert "@reboot" in subprocess.run(["crontab", "-u", name, "-l"], capture_output=True,
                                           text=True).stdout
        log = logs / "listen_clear_cache.log"
        wait_for(lambda: log.exists() and "listening" in log.read_text(),
                 what="the daemon the @reboot line started")
        daemon = [int(pid) for pid in subprocess.run(
            ["pgrep", "-f", "listen_clear_cache.py --cache-dir %s$" % cache],
            capture_output=True, text=True).stdout.split()]
        assert len(daemon) == 1
        uid = subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout.strip()
        assert "Uid:\t%s\t" % uid in Path("/proc/%d/status" % daemon[0]).read_text()
        pages = freshports_pages(cache, "www/a")
        subprocess.run(["chown", "-R", name, str(cache)], check=True)
        touch_port(db, "www/a")
        wait_for(lambda: not any(p.exists() for p in pages),
                 what="the settings file's pages, cleared by the cron-started daemon")
        # The README's pkill commands pick out this daemon alone, even beside a
        # younger process with its command line, as a clearer it has forked has
        # until its exec.
        lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                      "listen_clear_cache.py", "--cache-dir", str(cache)])
        try:
            flush, stop = readme_pkill("-HUP", cache), readme_pkill("-TERM", cache)
            assert subprocess.run(["pgrep"] + flush[2:], capture_output=True,
                                  text=True).stdout.split() == [str(daemon[0])]
            page = make_page(cache / "ports", "www/b")
            subprocess.run(["chown", "-R", name, str(cache)], check=True)
            queue_quietly(db, "www", "b")
            subprocess.run(flush, check=True)
            wait_for(lambda: not page.exists(), what="pkill -HUP to flush")
            subprocess.run(stop, check=True)
            wait_for(lambda: not Path("/proc/%d" % daemon[0]).exists(), what="pkill -TERM")
            assert lookalike.poll() is None
        finally:
            lookalike.kill()
            lookalike.wait()
        assert "Traceback" not in log.read_text() and "stopped" in log.read_text()
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "--", "--cache-dir %s$" % cache])
        if had != 0:
            subprocess.run(["crontab", "-u", name, "-r"], capture_output=True)


def readme_pkill(signal_option, cache):
    """contrib/README.md's cron pkill command for one signal, aimed at this cache directory."""
    lines = [line.split("   #")[0] for line in (CONTRIB / "README.md").read_text().splitlines()
             if line.strip().startswith("pkill %s " % signal_option)]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].replace("/var/db/freshports/cache", str(cache)))


def unit_settings():
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str      # systemd keys are case-sensitive
    unit.read(CONTRIB / "systemd" / "listen-clear-cache.service")
    return unit


def test_systemd_unit_settings():
    unit = unit_settings()
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["Restart"] == "always"
    assert 0 < float(service["RestartSec"]) <= 5
    assert service["EnvironmentFile"] == INSTALLED
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == read_settings()["CLEAR_CACHE_DIR"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert "Install" in unit and unit["Install"]["WantedBy"]
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(
            CONTRIB / "systemd" / "listen-clear-cache.service")], capture_output=True,
            text=True)
        assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr, \
            result.stderr


def test_systemd_exec_start_runs_the_settings_files_daemon(db, cache, tmp_path):
    """ExecStart as systemd would run it (no systemd here): $$ unescaped to $, the
    environment the settings file's EnvironmentFile= gives; its pages go."""
    argv = shlex.split(unit_settings()["Service"]["ExecStart"].replace("$$", "$"))
    assert argv[0].startswith("/")     # systemd takes no variable for the program
    settings = write_settings(tmp_path / "settings.env", LCC_DAEMON=DAEMON,
                              CLEAR_CACHE_DSN=db, CLEAR_CACHE_DIR=cache)
    env = dict(read_settings(settings), PATH="/usr/bin:/bin", CLEAR_CACHE_TIMESTAMPS="0")
    add_ports(db, "www/a")
    log = tmp_path / "journal"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd="/")
    try:
        wait_for(lambda: "listening" in log.read_text(), what="the unit's daemon")
        assert Path("/proc/%d/exe" % proc.pid).resolve() == Path(sys.executable).resolve(), \
            "sh exec'd the daemon: $MAINPID is the daemon's"
        wait_for(lambda: queued(db) == [], what="the catch-up run")
        pages = freshports_pages(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not any(p.exists() for p in pages), what="the settings' pages to go")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()


def test_the_settings_file_reads_the_same_in_sh_as_in_systemd():
    shown = subprocess.run(["env", "-i", "sh", "-c", "set -a; . %s; env -0" % SETTINGS],
                           capture_output=True, text=True, check=True).stdout
    by_sh = dict(item.split("=", 1) for item in shown.split("\0") if item)
    settings = read_settings()
    assert {name: by_sh.get(name) for name in settings} == settings
    assert set(settings) >= {"LCC_DAEMON", "CLEAR_CACHE_DSN", "CLEAR_CACHE_DIR",
                             "CLEAR_CACHE_PAGES"}


def test_every_recipe_reads_the_one_settings_file_and_sets_no_pages_of_its_own():
    """A change of templates is made once: no recipe names pages, a configuration,
    a DSN or the daemon's command itself; each reads the settings file."""
    svc = CONTRIB / "daemontools" / "listen-clear-cache"
    recipes = {"daemontools": [svc / "run", svc / "log" / "run"] + sorted((svc / "env").iterdir()),
               "cron": [CONTRIB / "cron" / "listen-clear-cache"],
               "systemd": [CONTRIB / "systemd" / "listen-clear-cache.service"]}
    reads = {"daemontools": (svc / "env" / "LCC_SETTINGS").read_text().strip(),
             "cron": re.search(r"\. (\S+) &&", cron_line()).group(1),
             "systemd": unit_settings()["Service"]["EnvironmentFile"]}
    assert set(reads.values()) == {INSTALLED}, reads
    for recipe, files in recipes.items():
        for path in files:
            text = "\n".join(line for line in path.read_text().splitlines()
                              if not line.lstrip().startswith("#"))
            for setting in ("CLEAR_CACHE_PAGES", "--pages", "CLEAR_CACHE_CONFIG", "--config",
                            "CLEAR_CACHE_DSN", "--dsn", "listen_clear_cache.py"):
                assert setting not in text, (recipe, path.name, setting)
    assert not (svc / "env" / "CLEAR_CACHE_PAGES").exists()


def cron_line():
    """The command of contrib's @reboot line."""
    lines = [line for line in (CONTRIB / "cron" / "listen-clear-cache").read_text()
             .splitlines() if line.startswith("@reboot")]
    assert len(lines) == 1 and "%" not in lines[0], "cron turns % into a newline"
    return lines[0][len("@reboot"):].strip()


def run_script(tmp_path, account="", **settings):
    """contrib's daemontools run script, run once; its result."""
    svc, _ = daemontools_service(tmp_path, account, **settings)
    return subprocess.run(["./run"], cwd=svc, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})


@pytest.mark.parametrize("account, settings, says", [
    ("no_such_account_lcc", {}, "no account no_such_account_lcc"),
    ("", {"LCC_DAEMON": "{tmp}/nowhere/bin/listen_clear_cache"},
     "cannot run {tmp}/nowhere/bin/listen_clear_cache (LCC_DAEMON in {tmp}/settings.env"),
    ("", {"LCC_DAEMON": DAEMON, "CLEAR_CACHE_DIR": "{tmp}/missing"},
     "cannot write the cache directory {tmp}/missing (CLEAR_CACHE_DIR in {tmp}/settings.env)")])
def test_daemontools_run_script_says_what_is_wrong_before_starting(tmp_path, cache, account,
                                                                    settings, says):
    settings = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
    result = run_script(tmp_path, account, **settings)
    assert result.returncode == 1, result
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout     # one line
    assert result.stdout.startswith("listen-clear-cache run: ") and \
        says.format(tmp=tmp_path) in result.stdout, result.stdout


def test_daemontools_run_script_says_a_settings_file_it_cannot_read(tmp_path):
    svc, settings = daemontools_service(tmp_path)
    settings.unlink()
    result = subprocess.run(["./run"], cwd=svc, capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"]})
    assert result.returncode == 1 and result.stdout == (
        "listen-clear-cache run: cannot read the settings file %s (env/LCC_SETTINGS)\n"
        % settings), result


def test_daemontools_run_script_warns_about_a_readable_secret(tmp_path, cache):
    svc, settings = daemontools_service(
        tmp_path, LCC_DAEMON=DAEMON, CLEAR_CACHE_DIR=cache,
        CLEAR_CACHE_DSN="host=127.0.0.1 port=%d connect_timeout=1" % free_port())
    for mode, warned in ((0o644, True), (0o640, False)):
        settings.chmod(mode)
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=subprocess.PIPE, text=True,
                                env={"PATH": os.environ["PATH"]})
        try:
            first = proc.stdout.readline()      # the warning, or the daemon's first line
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        assert ("%s is readable by everyone; chmod 640 it" % settings in first) == warned, first


@pytest.fixture
def account(db, tmp_path):
    """An unprivileged account with a role of least privilege, and a checkout it can run."""
    require(os.geteuid() == 0, "root", "creating an account needs it")
    name = "lcc_acct_%d" % os.getpid()
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)
    sql(db, "CREATE ROLE %s LOGIN" % name)
    for grant in grants_to(name):
        sql(db, grant)
    # pyenv's interpreters live in root's mode-700 home: Debian's python3 it is,
    # in a directory the account can read.
    home = Path(tempfile.mkdtemp(prefix="lcc-checkout-"))
    home.chmod(0o755)
    copy_checkout(home)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(home / ".venv")], check=True)
    subprocess.run([str(home / ".venv/bin/python"), "-m", "pip", "install", "-q", "-r",
                    str(home / "requirements.txt")], check=True, capture_output=True)
    yield name, home
    shutil.rmtree(home, ignore_errors=True)
    sql(db, "DROP OWNED BY %s; DROP ROLE %s" % (name, name))
    subprocess.run(["userdel", name], check=False)


def test_daemontools_run_script_runs_the_daemon_as_its_account(db, tmp_path, account, proxy):
    name, home = account
    add_ports(db, "www/a")
    # Beside the checkout: pytest's own temporary directories are root's alone.
    # setuidgid sets the primary group only: the cache is writable through it.
    cache = home / "cache"
    cache.mkdir()
    shutil.chown(cache, group=name)
    cache.chmod(0o775)
    svc, _ = daemontools_service(
        tmp_path, name, CLEAR_CACHE_DIR=cache,
        LCC_DAEMON="%s %s" % (home / ".venv/bin/python", home / "listen_clear_cache.py"),
        # Over TCP: the checkout's own server lets no other account reach its socket.
        CLEAR_CACHE_DSN=psycopg2.extensions.make_dsn(db, user=name, host="127.0.0.1",
                                                     port=proxy.port))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=out, stderr=out,
                                env={"PATH": os.environ["PATH"]})
    try:
        wait_for(lambda: "listening" in log.read_text(), what="the daemon as " + name)
        pid = wait_for(lambda: backends(db, "listen_clear_cache.py"), what="its backend")
        assert sql(db, "SELECT usename FROM pg_stat_activity WHERE pid = %s",
                   (pid[0],)) == [(name,)]
        assert Path("/proc/%d/status" % proc.pid).read_text().count(
            "Uid:\t%d\t" % int(subprocess.run(["id", "-u", name], capture_output=True,
                                               text=True).stdout)) == 1
        pages = freshports_pages(cache, "www/a")
        subprocess.run(["chown", "-R", name, str(cache)], check=True)
        touch_port(db, "www/a")
        wait_for(lambda: not any(p.exists() for p in pages),
                 what="a change cleared by the account's daemon")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text() and "warning" not in log.read_text(), \
        log.read_text()


def test_daemontools_files_are_complete():
    svc = CONTRIB / "daemontools" / "listen-clear-cache"
    run = (svc / "run").read_text()
    assert os.access(svc / "run", os.X_OK) and os.access(svc / "log" / "run", os.X_OK)
    assert run.index("exec 2>&1") < run.index("exec envdir ./env")
    assert "setuidgid" in run
    assert "exec multilog t" in (svc / "log" / "run").read_text()
    for name in ("LCC_SETTINGS", "CLEAR_CACHE_TIMESTAMPS"):
        assert (svc / "env" / name).read_text().strip()


def supervising(under):
    """Pids of supervise processes of a listen-clear-cache service below `under`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path("/proc/%s/cmdline" % pid).read_bytes().split(b"\0")
            cwd = os.readlink("/proc/%s/cwd" % pid)
        except OSError:
            continue        # gone while we looked
        if argv[0].endswith(b"supervise") and cwd.startswith(str(under)):
            found.append(int(pid))
    return found


def test_the_daemontools_steps_install_and_uninstall_as_written(db, cache, tmp_path):
    """contrib/README.md's install lines under a real svscan, then its uninstall lines."""
    require(shutil.which("svscan"), "daemontools", "apt-get install daemontools")
    src, services = tmp_path / "service-src", tmp_path / "service"
    services.mkdir()
    paths = {"/var/service-src": str(src), "/etc/service": str(services)}

    scan = subprocess.Popen(["svscan", str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        install = readme_block("Install (Debian")
        assert install[0].startswith("mkdir") and install[2].startswith("vi ")
        for line in install[:2]:
            as_root(line, paths, CONTRIB)
        env = src / "listen-clear-cache" / "env"        # what `vi` would do
        settings = write_settings(tmp_path / "settings.env", LCC_DAEMON=DAEMON,
                                  CLEAR_CACHE_DSN=db, CLEAR_CACHE_DIR=cache)
        (env / "LCC_SETTINGS").write_text("%s\n" % settings)
        (env / "LCC_ACCOUNT").write_text("\n")
        as_root(install[3], paths, CONTRIB)             # the link: svscan starts it
        service = services / "listen-clear-cache"
        wait_for(lambda: up_pid(service), timeout=20, what="svscan to start the service")
        add_ports(db, "www/a")
        pages = freshports_pages(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not any(p.exists() for p in pages),
                 what="the installed service to clear a change")
        daemon = up_pid(service)

        uninstall = readme_block("Uninstall, in this order")
        assert uninstall[0].startswith("rm /etc/service/") and "svc -dx" in uninstall[1]
        for line in uninstall:
            as_root(line, paths, CONTRIB)
        wait_for(lambda: not Path("/proc/%d" % daemon).exists(), what="the daemon to stop")
        time.sleep(6)       # longer than svscan's 5 s: it must not start it again
        assert supervising(src) == [], "svscan started it again"
        assert not (src / "listen-clear-cache").exists()
    finally:
        os.killpg(scan.pid, signal.SIGTERM)
        scan.wait(timeout=20)
        for s in (src / "listen-clear-cache", src / "listen-clear-cache" / "log"):
            subprocess.run(["svc", "-dx", str(s)], capture_output=True)


def test_the_database_steps_make_an_owner_and_a_daemon_role_that_clears(admin_dsn, cache):
    """contrib/README.md's database lines (su postgres aside: the admin's own session):
    the queues belong to the owner, the daemon's role has its grants and clears."""
    suffix = os.getpid()
    owner, clearer, name = ("lcc_steps_owner_%d" % suffix, "lcc_steps_clearer_%d" % suffix,
                            "lcc_steps_%d" % suffix)
    base = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    steps = readme_block("**The database**")
    assert len(steps) == 2 and all("su postgres -c " in step for step in steps), steps
    sql(admin_dsn, "CREATE DATABASE %s" % name)
    try:
        for step in steps:
            for example, real in (("su postgres -c ", "sh -c "), (" -d freshports", ""),
                                  ("cache_owner", owner), ("cache_clearer", clearer),
                                  ("/usr/local/listen_clear_cache/.venv/bin/python",
                                   sys.executable),
                                  ("/usr/local/listen_clear_cache/", "%s/" % HERE)):
                step = step.replace(example, real)
            result = subprocess.run(["sh", "-c", step], env=libpq_env(base),
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (step, result.stderr)
        assert sql(base, "SELECT tableowner FROM pg_tables WHERE tablename IN"
                   " ('ports_cache_clearing', 'cache_clearing_failures', 'ports')") == \
            [(owner,)] * 3
        sql(base, "INSERT INTO ports (category, name) VALUES ('www', 'a')")
        pages = [make_page(cache, "www/a")]
        result = subprocess.run([sys.executable, str(HERE / "clear_cache.py"), "--cache-dir",
                                 str(cache)], env=libpq_env(psycopg2.extensions.make_dsn(
                                     base, user=clearer)), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not pages[0].exists()
    finally:
        drop_database(admin_dsn, name)
        sql(admin_dsn, "DROP ROLE IF EXISTS %s; DROP ROLE IF EXISTS %s" % (owner, clearer))


def test_the_roles_have_one_name_each_in_every_file():
    """The queues' owner, the daemon's role: one name each, wherever a file names them."""
    files = [HERE / "schema.sql", HERE / "README.md", CONTRIB / "README.md", SETTINGS,
             CONTRIB / "freshports" / "adopt.sql"]
    for path in files:
        text = path.read_text()
        for old in ("freshports_cache", "user=freshports", "daemon=listening",
                    "user=listening"):
            assert old not in text, (path.name, old)
    assert "daemon_role=cache_clearer" in (HERE / "schema.sql").read_text()
    assert "user=cache_clearer" in read_settings()["CLEAR_CACHE_DSN"]
    assert "-v daemon=cache_clearer" in (CONTRIB / "freshports" / "adopt.sql").read_text()
    for readme in (HERE / "README.md", CONTRIB / "README.md"):
        text = readme.read_text()
        assert "`cache_owner`" in text and "`cache_clearer`" in text, readme
