"""From a checkout to a system: the package, --version, both makes, make demo."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.common import HERE, copy_checkout, require, typed, wait_for
from tests.fixtures.daemon import clean_env, CLEAR, LISTEN
from tests.fixtures.database import add_ports, libpq_env, sql, touch_port
from tests.fixtures.files import make_page
from tests.fixtures.recipes import daemontools_service, freshports_pages


def test_both_scripts_say_one_version():
    versions = {subprocess.run([sys.executable, script, "--version"], capture_output=True,
                               text=True, check=True).stdout.split()[-1]
                for script in (CLEAR, LISTEN)}
    assert len(versions) == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions.pop())


def test_the_license_is_bsd_2_clause():
    text = (HERE / "LICENSE").read_text()
    assert text.startswith("BSD 2-Clause License")
    assert 'license = "BSD-2-Clause"' in (HERE / "pyproject.toml").read_text()


# pyproject.toml's backend, pinned for the test, as requirements-dev.txt pins per version.
BUILD_BACKEND = ['setuptools==84.2.1; python_version >= "3.10"',
                 'setuptools==80.9.0; python_version < "3.10"']


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fresh venv outside the checkout, the wheel and sdist built from it, the wheel installed."""
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + BUILD_BACKEND, check=True)
    # From a copy of what git would ship, so that the build leaves the checkout alone.
    src, dist = copy_checkout(root / "src"), root / "dist"
    built = {}
    for kind in ("wheel", "sdist"):
        made = subprocess.run([python, "-c", "import setuptools.build_meta as b, sys;"
                               " print('BUILT', b.build_%s(sys.argv[1]))" % kind, str(dist)],
                              cwd=src, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        built[kind] = dist / [line for line in made.stdout.splitlines()
                              if line.startswith("BUILT")][-1].split()[1]
    wheel, sdist = built["wheel"], built["sdist"]
    requirement = [line for line in (HERE / "requirements.txt").read_text().splitlines()
                   if line.startswith("psycopg2")]
    subprocess.run(pip + requirement + [str(wheel)], check=True)
    return root / "venv" / "bin", sdist


@pytest.fixture(scope="module")
def installed(built):
    return built[0]


def test_the_installed_commands_say_their_version(installed):
    for command in ("listen_clear_cache", "clear_cache"):
        result = subprocess.run([str(installed / command), "--version"], capture_output=True,
                                text=True, cwd="/")
        assert result.returncode == 0 and re.search(r" \d+\.\d+\.\d+$", result.stdout.strip())


def next_waiter(pid):
    """The command line of the daemon's child that runs the clearer, once there is one: not
    the clearer that just exited (a zombie's is empty), nor a child not yet past exec."""
    for child in Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split():
        try:
            cmdline = Path("/proc/%s/cmdline" % child).read_bytes()
        except FileNotFoundError:
            continue
        if cmdline and b"listen_clear_cache" not in cmdline:
            return cmdline
    return None


def test_the_installed_daemon_clears_a_page_with_the_installed_clearer(installed, db, cache,
                                                                       tmp_path):
    add_ports(db, "www/a")
    log = tmp_path / "daemon.log"
    env = clean_env()
    with log.open("w") as out:
        proc = subprocess.Popen([str(installed / "listen_clear_cache"), "-v", "--dsn", db,
                                 "--cache-dir", str(cache), "--again-after", "0"],
                                stderr=out, cwd="/", env=env)
    try:
        wait_for(lambda: "started waiting clearer" in log.read_text(), what="its waiter")
        page = make_page(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not page.exists(), what="the page to go")
        argv = wait_for(lambda: next_waiter(proc.pid), what="its next waiter").split(b"\0")
        assert argv[0] == str(installed / "python").encode() or \
            Path(argv[0].decode()).resolve() == (installed / "python").resolve()
        assert str(HERE).encode() not in argv[1], "the installed clearer, not the checkout's"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert "Traceback" not in log.read_text()


def test_the_sdist_ships_the_schema_and_the_recipes(built):
    names = subprocess.run(["tar", "tzf", str(built[1])], capture_output=True, text=True,
                           check=True).stdout
    for wanted in ("schema.sql", "LICENSE", "contrib/freshports/adopt.sql",
                   "contrib/daemontools/listen-clear-cache/run", "contrib/README.md",
                   "docs/design.md"):
        assert "/" + wanted + "\n" in names, wanted


def test_the_installed_clear_cache_prints_the_schema_and_pip_ships_the_recipes(installed):
    result = subprocess.run([str(installed / "clear_cache"), "--schema"], capture_output=True,
                            text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (HERE / "schema.sql").read_text()
    share = installed.parent / "share" / "listen_clear_cache"
    for name in ("contrib/freshports/adopt.sql", "contrib/freshports/listen_clear_cache.ini",
                 "contrib/freshports/subset.sql", "contrib/listen-clear-cache.env",
                 "contrib/README.md", "contrib/cron/listen-clear-cache",
                 "contrib/systemd/listen-clear-cache.service",
                 "contrib/daemontools/listen-clear-cache/run",
                 "contrib/daemontools/listen-clear-cache/env/LCC_SETTINGS"):
        assert (share / name).read_bytes() == (HERE / name).read_bytes(), name
    assert os.access(share / "contrib/daemontools/listen-clear-cache/run", os.X_OK)


def test_the_daemontools_recipe_runs_the_installed_command_by_one_setting(installed, db, cache,
                                                                         tmp_path):
    """LCC_DAEMON, the one setting that differs, names pip's command: its pages go."""
    svc, _ = daemontools_service(tmp_path, LCC_DAEMON=str(installed / "listen_clear_cache"),
                                 CLEAR_CACHE_DSN=db, CLEAR_CACHE_DIR=cache)
    add_ports(db, "www/a")
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["./run"], cwd=svc, stdout=out, stderr=out,
                                env={"PATH": os.environ["PATH"]})
    try:
        wait_for(lambda: "listening" in log.read_text(), what="the installed daemon")
        assert Path("/proc/%d/cmdline" % proc.pid).read_bytes().split(b"\0")[1] == \
            str(installed / "listen_clear_cache").encode()
        pages = freshports_pages(cache, "www/a")
        touch_port(db, "www/a")
        wait_for(lambda: not any(p.exists() for p in pages), what="its pages to go")
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, log.read_text()


def bsd_make():
    found = shutil.which("bmake")
    require(found, "bmake", "apt-get install bmake")
    return found


@pytest.mark.parametrize("target", ["run", "test", "demo", "flush", "venv"])
def test_bsd_make_reads_the_makefile(target):
    result = subprocess.run([bsd_make(), "-n", target], cwd=HERE, capture_output=True,
                            text=True, env=typed(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_make_venv_with_python_builds_the_venv_the_recipes_use(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(HERE), str(clone)], check=True)
    for copied in ("Makefile", "requirements.txt"):     # the working tree's, committed or not
        shutil.copy(HERE / copied, clone / copied)
    # As a user would type it: nothing of the make that runs this suite passed on.
    result = subprocess.run([bsd_make(), "venv", "PYTHON=" + sys.executable], cwd=clone,
                            capture_output=True, text=True, env=typed(os.environ))
    assert result.returncode == 0, result.stderr
    assert (clone / ".venv" / "bin" / "python").exists()
    assert not list(clone.glob(".venv-*"))


PG_HELPER = [sys.executable, str(HERE / "contrib" / "make" / "pg.py")]


def test_make_tests_check_reaches_the_postgres_role(db):
    env = dict(libpq_env(db), PGUSER="no_such_role_lcc")
    result = subprocess.run(PG_HELPER + ["--roles", "", "user=postgres", "--", "true"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(PG_HELPER + ["--", "true"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "PostgreSQL refused us" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_make_demo_shows_a_page_go_and_leaves_nothing_behind(db):
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-s", "demo", "VENV=%s" % venv], cwd=HERE,
                            env=typed(libpq_env(db)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4. the page is gone" in result.stdout and "demo done" in result.stdout
    assert sql(db, "SELECT count(*) FROM ports_cache_clearing WHERE category = 'demo'") == [(0,)]
    assert sql(db, "SELECT count(*) FROM ports WHERE category = 'demo'") == [(0,)]
