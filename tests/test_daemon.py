"""The daemon's scheduling, as functions of times: the start rule and the backoff."""

import pytest

from cache_clearing.daemon import MAX_DELAY, MIN_GAP, NEVER, QUIET, start_time
from cache_clearing.errors import Backoff


def test_a_lone_change_starts_at_once():
    assert start_time(100.0, True, -NEVER, None) == 100.0


def test_a_change_keeps_min_gap_after_the_last_start_for_changes():
    assert start_time(100.0, True, 99.9, None) == pytest.approx(99.9 + MIN_GAP)


def test_changes_that_keep_coming_wait_for_a_pause():
    assert start_time(100.0, True, 99.8, news_at=100.2) == pytest.approx(100.2 + QUIET)


def test_a_pause_is_never_awaited_past_max_delay_after_the_last_start():
    assert start_time(100.0, True, 99.5, news_at=100.49) == pytest.approx(99.5 + MAX_DELAY)


def test_a_run_no_change_asked_for_waits_for_nothing():
    # A re-clear, a retry or SIGHUP: nobody waits for it, and it holds no change back.
    assert start_time(100.0, False, 99.99, news_at=100.0) == 100.0


def test_backoff_doubles_from_its_base_to_its_cap_with_jitter():
    backoff = Backoff(0.5, 4.0)
    waits = [backoff.failed() for _ in range(6)]
    for wait, base in zip(waits, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        assert 0.8 * base <= wait <= 1.2 * base
    backoff.reset()
    assert backoff.failed() <= 0.6
