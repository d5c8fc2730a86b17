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
from tests.fixtures.database import (GRANTS, add_ports, all_queued, backends, libpq_env,
                                     queue_quietly, queued, sql, touch_port)
from tests.fixtures.files import make_page
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


CONTRIB = HERE / "contrib"


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
    (svc / "env" / "CLEAR_CACHE_DSN").write_text(db + "\n")
    (svc / "env" / "CLEAR_CACHE_DIR").write_text(str(cache) + "\n")
    (svc / "env" / "LCC_HOME").write_text(str(HERE) + "\n")
    (svc / "env" / "LCC_ACCOUNT").write_text("")       # empty: no setuidgid
    assert "categories/{category}/*" in (svc / "env" / "CLEAR_CACHE_PAGES").read_text()
    (svc / "env" / "CLEAR_CACHE_PAGES").write_text("\n")  # empty: the default layout
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

    page = make_page(cache, "www/a")                    # a committed change clears it
    touch_port(db, "www/a")
    wait_for(lambda: not page.exists(), what="the change to be cleared")

    page = make_page(cache, "www/b")                    # svc -h flushes without NOTIFY
    queue_quietly(db, "www", "b")
    subprocess.run(["svc", "-h", str(service)], check=True)
    wait_for(lambda: not page.exists(), what="svc -h to flush")

    first = up_pid(service)                             # kill -9: supervise restarts it
    os.kill(first, signal.SIGKILL)
    page = make_page(cache, "www/a", "while-down.html")
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


def cron_command():
    """The command of contrib's @reboot line."""
    lines = [line for line in (CONTRIB / "cron" / "listen-clear-cache").read_text()
             .splitlines() if line.startswith("@reboot")]
    assert len(lines) == 1
    return lines[0][len("@reboot"):].strip()


def test_cron_line_runs_in_crons_bare_environment(db, cache, tmp_path):
    command = cron_command()
    assert "%" not in command, "cron turns % into a newline"
    log = tmp_path / "logs" / "cron.log"      # the line makes its directory
    for example, real in (("/usr/local/listen_clear_cache", str(HERE)),
                          ("dbname=freshports user=freshports",
                           db.replace("'", "")),
                          ("/var/db/freshports/cache", str(cache)),
                          ("/var/log/freshports/listen_clear_cache.log", str(log))):
        assert example in command
        command = command.replace(example, real)
    add_ports(db, "www/a")
    proc = subprocess.Popen(["env", "-i", "PATH=/usr/bin:/bin", "sh", "-c", command], cwd="/")
    lookalike = None
    try:
        wait_for(lambda: log.exists() and "listening" in log.read_text(),
                 what="the daemon started from the cron line")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="a change cleared by the cron-started daemon")
        # The README's pkill commands pick out this daemon alone (env and sh
        # exec'd into it), even beside a younger process with its command
        # line, as a clearer it has forked has until its exec.
        lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                      "listen_clear_cache.py", "--cache-dir", str(cache)])
        flush, stop = readme_pkill("-HUP", cache), readme_pkill("-TERM", cache)
        pgrep = ["pgrep"] + flush[2:]
        assert subprocess.run(pgrep, capture_output=True, text=True).stdout.split() == [
            str(proc.pid)]
        page = make_page(cache, "www/b")
        queue_quietly(db, "www", "b")
        subprocess.run(flush, check=True)
        wait_for(lambda: not page.exists(), what="pkill -HUP to flush")
        subprocess.run(stop, check=True)
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert lookalike.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if lookalike:
            lookalike.kill()
            lookalike.wait()


def readme_pkill(signal_option, cache):
    """contrib/README.md's cron pkill command for one signal, aimed at this cache directory."""
    lines = [line.split("#")[0] for line in (CONTRIB / "README.md").read_text().splitlines()
             if line.strip().startswith("pkill %s " % signal_option)]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].replace("/var/db/freshports/cache", str(cache)))


def test_systemd_unit_settings():
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str      # systemd keys are case-sensitive
    unit.read(CONTRIB / "systemd" / "listen-clear-cache.service")
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["Restart"] == "always"
    assert 0 < float(service["RestartSec"]) <= 5
    assert service["EnvironmentFile"].startswith("/")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/db/freshports/cache"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["ExecStart"].split()[1].endswith("/listen_clear_cache.py")
    assert "Install" in unit and unit["Install"]["WantedBy"]
    env = (CONTRIB / "systemd" / "listen-clear-cache.env").read_text()
    assert re.search(r"^CLEAR_CACHE_DSN=", env, re.M)
    assert re.search(r"^CLEAR_CACHE_DIR=/var/db/freshports/cache$", env, re.M)
    assert re.search(r"^CLEAR_CACHE_PAGES=ports/\{category\}/\{port\}/\*"
                     r" categories/\{category\}/\*$", env, re.M)
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(
            CONTRIB / "systemd" / "listen-clear-cache.service")], capture_output=True,
            text=True)
        assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr, \
            result.stderr


def run_script(tmp_path, **env):
    """contrib's daemontools run script, run once with env/ holding env; its result."""
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for name, value in env.items():
        (svc / "env" / name).write_text(value + "\n")
    return subprocess.run(["./run"], cwd=svc, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})


@pytest.mark.parametrize("env, says", [
    ({"LCC_ACCOUNT": "no_such_account_lcc"}, "no account no_such_account_lcc"),
    ({"LCC_ACCOUNT": "", "LCC_HOME": "{tmp}/nowhere"}, "cannot run {tmp}/nowhere/.venv/bin/python"),
    ({"LCC_ACCOUNT": "", "LCC_HOME": "{here}", "CLEAR_CACHE_DIR": "{tmp}/missing"},
     "cannot write the cache directory {tmp}/missing")])
def test_daemontools_run_script_says_what_is_wrong_before_starting(tmp_path, cache, env, says):
    env = {k: v.format(tmp=tmp_path, here=HERE) for k, v in env.items()}
    says = says.format(tmp=tmp_path)
    result = run_script(tmp_path / "svc", **env)
    assert result.returncode == 1, result
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout     # one line
    assert result.stdout.startswith("listen-clear-cache run: ") and says in result.stdout, \
        result.stdout


def test_daemontools_run_script_warns_about_a_readable_secret(tmp_path, cache):
    svc_env = {"LCC_ACCOUNT": "", "LCC_HOME": str(HERE), "CLEAR_CACHE_DIR": str(cache),
               "CLEAR_CACHE_DSN": "host=127.0.0.1 port=%d connect_timeout=1" % free_port()}
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for name, value in svc_env.items():
        (svc / "env" / name).write_text(value + "\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        (svc / "env" / "CLEAR_CACHE_DSN").chmod(mode)
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=subprocess.PIPE, text=True,
                                env={"PATH": os.environ["PATH"]})
        try:
            first = proc.stdout.readline()      # the warning, or the daemon's first line
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        assert ("env/CLEAR_CACHE_DSN is readable by everyone; chmod 600 it" in first) == warned, \
            first


@pytest.fixture
def account(db, tmp_path):
    """An unprivileged account with a role of least privilege, and a checkout it can run."""
    require(os.geteuid() == 0, "root", "creating an account needs it")
    name = "lcc_acct_%d" % os.getpid()
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)
    for grant in ["CREATE ROLE %s LOGIN" % name] + GRANTS[1:]:
        sql(db, grant.replace("freshports_cache", name))
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
    svc = tmp_path / "svc"
    shutil.copytree(CONTRIB / "daemontools" / "listen-clear-cache", svc, symlinks=True)
    for var, value in {"LCC_ACCOUNT": name, "LCC_HOME": str(home),
                       "CLEAR_CACHE_DIR": str(cache), "CLEAR_CACHE_PAGES": "",
                       # Over TCP: the checkout's own server lets no other account
                       # reach its socket.
                       "CLEAR_CACHE_DSN": psycopg2.extensions.make_dsn(
                           db, user=name, host="127.0.0.1", port=proxy.port)}.items():
        (svc / "env" / var).write_text(value + "\n")
    (svc / "env" / "CLEAR_CACHE_DSN").chmod(0o600)
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
        page = make_page(cache, "www/a")
        page.parent.chmod(0o777)
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="a change cleared by the account's daemon")
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
    for name in ("CLEAR_CACHE_DSN", "CLEAR_CACHE_DIR", "CLEAR_CACHE_TIMESTAMPS"):
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


def test_the_daemontools_steps_install_and_uninstall_as_written(db, cache, tmp_path):
    """contrib/README.md's install lines under a real svscan, then its uninstall lines."""
    require(shutil.which("svscan"), "daemontools", "apt-get install daemontools")
    src, services = tmp_path / "service-src", tmp_path / "service"
    services.mkdir()
    paths = {"/var/service-src": str(src), "/etc/service": str(services)}

    def run(line):
        for example, real in paths.items():
            line = line.replace(example, real)
        subprocess.run(["sh", "-c", line], cwd=HERE, check=True, capture_output=True)

    scan = subprocess.Popen(["svscan", str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        install = readme_block("Install (Debian")
        assert install[0].startswith("mkdir") and install[3].startswith("vi ")
        for line in install[:3]:
            run(line)
        env = src / "listen-clear-cache" / "env"        # what `vi` would do
        for name, value in (("CLEAR_CACHE_DSN", db), ("CLEAR_CACHE_DIR", str(cache)),
                            ("LCC_HOME", str(HERE)), ("LCC_ACCOUNT", ""),
                            ("CLEAR_CACHE_PAGES", "")):
            (env / name).write_text(value + "\n")
        assert oct((env / "CLEAR_CACHE_DSN").stat().st_mode)[-3:] == "600"
        run(install[4])                                  # the link: svscan starts it
        service = services / "listen-clear-cache"
        wait_for(lambda: up_pid(service), timeout=20, what="svscan to start the service")
        add_ports(db, "www/a")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="the installed service to clear a change")
        daemon = up_pid(service)

        uninstall = readme_block("Uninstall, in this order")
        assert uninstall[0].startswith("rm /etc/service/") and "svc -dx" in uninstall[1]
        for line in uninstall:
            run(line)
        wait_for(lambda: not Path("/proc/%d" % daemon).exists(), what="the daemon to stop")
        time.sleep(6)       # longer than svscan's 5 s: it must not start it again
        assert supervising(src) == [], "svscan started it again"
        assert not (src / "listen-clear-cache").exists()
    finally:
        os.killpg(scan.pid, signal.SIGTERM)
        scan.wait(timeout=20)
        for s in (src / "listen-clear-cache", src / "listen-clear-cache" / "log"):
            subprocess.run(["svc", "-dx", str(s)], capture_output=True)
