"""Page templates: the cache layouts a site can describe."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.fixtures.daemon import CLEAR, FRESHPORTS, LISTEN, assert_one_line_error, clear
from tests.fixtures.database import add_ports, all_queued, sql
from tests.fixtures.files import PAGE, make_page, tree
from tests.fixtures.proxy import free_port


# ------------------------------------------------------------ page templates

BAD_TEMPLATES = ["", "a b", "/abs/{port}", "a//{port}", "./{port}", "{category}/../x",
                 "{category}/./{port}", "{version}/{port}", "{category/x",
                 "x}/{port}", "*/{port}", "{category}*/{port}/x", "[ab]/{port}/*",
                 "{category}/{port}*/", "{category:%Y/%m}/x", "{port!r}/x", "a/{port}//"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_bad_templates_are_refused_before_any_database_access(tmp_path, cache, template):
    # The port is closed: a script that tried to connect would fail otherwise.
    dsn = "host=127.0.0.1 port=%d connect_timeout=1" % free_port()
    for script in (CLEAR, LISTEN):
        for how in ("option", "environment"):
            args, env = (["--pages", template], {}) if how == "option" else (
                [], {"CLEAR_CACHE_PAGES": "{category}/{port}/* " + template})
            if how == "environment" and (not template or " " in template):
                continue        # the variable's white space separates templates
            result = subprocess.run([sys.executable, script, "--dsn", dsn, "--cache-dir",
                                     str(cache)] + args, capture_output=True, text=True,
                                    timeout=30, env=dict(os.environ, **env))
            assert_one_line_error(result, 2)
            assert "template" in result.stderr, result.stderr


def test_pages_from_environment_and_empty_means_default(db, cache):
    add_ports(db, "www/a")
    page, listing = make_page(cache, "www/a"), make_page(cache, "categories/www", "a.html")
    single = make_page(cache, "solo", "a.html")
    env = {"CLEAR_CACHE_PAGES": "  categories/{category}/*\tsolo/{port}.html\n"}
    result = clear(dsn=db, cache=cache, env=env)
    assert result.returncode == 0, result.stderr
    assert page.exists() and not listing.exists() and not single.exists()
    add_ports(db, "www/b")
    page_b = make_page(cache, "www/b")
    result = clear(dsn=db, cache=cache, env={"CLEAR_CACHE_PAGES": ""})
    assert result.returncode == 0, result.stderr
    assert not page_b.exists()


def test_freshports_layout_clears_the_port_and_its_category(db, cache, outside):
    add_ports(db, "www/a", "net/b")
    port_pages = [make_page(cache, "ports/www/a", n) for n in (PAGE, ".hidden", "x.html")]
    listing = make_page(cache, "categories/www", "index.html")
    (cache / "categories/www/subdir").mkdir()
    (cache / "categories/www/link.html").symlink_to(outside / "victim")
    others = [make_page(cache, "ports/www/z"), make_page(cache, "categories/net/i.html"),
              make_page(cache, "www/a")]
    sql(db, "DELETE FROM ports_cache_clearing WHERE port = 'b'")
    result = clear(*FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in port_pages + [listing])
    assert not os.path.lexists(cache / "categories/www/link.html")
    assert (cache / "categories/www/subdir").is_dir()
    assert all(p.exists() for p in others)
    assert "removed 5 files" in result.stderr, result.stderr


def test_literal_last_component_names_one_entry(db, cache):
    add_ports(db, "www/a")
    page = make_page(cache, "flat", "a.html")
    others = [make_page(cache, "flat", n) for n in ("a.htm", "a.html.gz", "b.html")]
    (cache / "flat" / "dir.html").mkdir()
    sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', 'dir')")
    result = clear("--pages", "flat/{port}.html", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists() and all(p.exists() for p in others)
    assert (cache / "flat" / "dir.html").is_dir()
    assert "flat/dir.html: is a directory, left alone" in result.stderr


def test_values_in_a_glob_match_only_themselves(db, cache):
    pages = {n: make_page(cache, "flat", n + "-1.html")
             for n in ("a*", "ab", "[x]", "x", "?", "q", "a")}
    for port in ("a*", "[x]", "?"):
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', %s)",
            (port,))
    result = clear("--pages", "flat/{port}-*", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert sorted(n for n, p in pages.items() if not p.exists()) == ["?", "[x]", "a*"]


def test_glob_characters_in_the_template_match_as_fnmatch_does(db, cache):
    add_ports(db, "www/a")
    gone = [make_page(cache, "www/a", n) for n in ("p1.html", "p2.html", ".p3.html")]
    kept = [make_page(cache, "www/a", n) for n in ("p10.html", "q1.html")]
    result = clear("--pages", "{category}/{port}/[p.]?.html", "--pages",
                   "{category}/{port}/.p*", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


BOTH = ["--pages", "flat/{category}-{port}.html", "--pages", "{category}/{port}/*"]


def test_an_expansion_too_long_leaves_out_that_page_alone(db, cache, outside):
    long_port = "p" * 250     # a valid name, but www-<port>.html is 259 bytes
    pages = [make_page(cache, "flat", "www-ok.html"), make_page(cache, "www/" + long_port)]
    before = tree(cache)
    for port in (long_port, "ok"):
        sql(db, "INSERT INTO ports_cache_clearing (category, port) VALUES ('www', %s)",
            (port,))
    result = clear(*BOTH, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    # A value in a log line is cut to 200 characters, its length said.
    assert result.stderr.count("ports_cache_clearing: template 'flat/{category}-{port}.html'"
                               " cannot use the values of 1 key, its others are cleared:"
                               " category='www', port='%s... (252 characters)"
                               % long_port[:199]) == 1, result.stderr
    assert not any(page.exists() for page in pages)
    for page in pages:
        del before[str(page)]
    assert tree(cache) == before
    # Everything that could be done for it is done: its rows go, its re-clear comes.
    assert all_queued(db) == sorted([("www", long_port, True), ("www", "ok", True)])


def test_by_hand_a_key_is_refused_only_when_no_template_can_use_it(db, cache):
    long_port = "p" * 250
    page = make_page(cache, "www/" + long_port)
    assert_one_line_error(clear("--pages", "flat/{category}-{port}.html",
                                "www/" + long_port, dsn=db, cache=cache), 2)
    result = clear(*BOTH, "www/" + long_port, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "cannot use the values of 1 key" in result.stderr and not page.exists()


def test_each_target_cleared_once_per_run(db, cache):
    names = ["www/p%d" % i for i in range(50)]
    add_ports(db, *names)
    listing = make_page(cache, "categories/www", "index.html")
    make_page(cache, "ports/www/p7")
    result = clear("-v", *FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not listing.exists()
    assert result.stderr.count("categories/www/*: removed") == 1, result.stderr
    assert result.stderr.count("ports/www/p7/*: removed") == 1, result.stderr


def test_explicit_ports_apply_every_template(db, cache):
    pages = [make_page(cache, "ports/www/a"), make_page(cache, "categories/www", "i.html")]
    result = clear(*FRESHPORTS, "www/a", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in pages)
    assert all_queued(db) == []


def test_symlinked_template_directory_is_not_entered(db, cache, outside):
    (cache / "ports").symlink_to(outside)
    (outside / "www").mkdir()
    (outside / "www" / "a").symlink_to(outside / "p")
    add_ports(db, "www/a")
    result = clear(*FRESHPORTS, dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert "ports: is a symlink, not entered" in result.stderr
    shutil.rmtree(outside / "www")      # ours, made above: the fixture compares the rest
