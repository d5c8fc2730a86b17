"""One daemon per cache directory: a second one is refused, a clear by hand is not."""

import signal
import subprocess
import sys

from tests.fixtures.daemon import LISTEN, assert_one_line_error, clean_env, clear
from tests.fixtures.database import add_ports
from tests.fixtures.files import make_page


def second_daemon(db, cache):
    return subprocess.run([sys.executable, LISTEN, "--cache-dir", str(cache)],
                          env=clean_env(CLEAR_CACHE_DSN=db), capture_output=True, text=True,
                          timeout=30)


def test_a_second_daemon_on_the_same_cache_directory_is_refused(db, cache, daemon):
    first = daemon(cache, "--heartbeat", "600")
    first.wait_ready()
    result = second_daemon(db, cache)
    assert_one_line_error(result, 2)
    assert ("cache directory %s: another daemon clears it (pid %d)" % (cache, first.proc.pid)
            in result.stderr), result.stderr


def test_a_clear_by_hand_beside_the_daemon_still_works(db, cache, daemon):
    daemon(cache, "--heartbeat", "600").wait_ready()
    add_ports(db, "www/a")
    page = make_page(cache, "www/a")
    result = clear("www/a", dsn=db, cache=cache)
    assert result.returncode == 0, result.stderr
    assert not page.exists()


def test_the_lock_goes_with_the_daemon_even_after_sigkill(db, cache, daemon):
    first = daemon(cache, "--heartbeat", "600")
    first.wait_ready()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    daemon(cache, "--heartbeat", "600").wait_ready()
