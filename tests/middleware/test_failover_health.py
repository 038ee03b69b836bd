"""Circuit breakers, the retry budget and backoff (middleware/failover/health.py), on a fake
clock: the arithmetic the failover layer will run on."""
from __future__ import annotations

import pytest

from middleware.failover.health import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerSettings,
    CircuitBreaker,
    RetryBudget,
    backoff_s,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**settings: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerSettings(**settings), clock=clock), clock  # type: ignore[arg-type]


def call(b: CircuitBreaker, failed: bool) -> bool:
    if not b.allows():
        return False
    b.record(failed)
    return True


def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count() -> None:
    b, _ = breaker(consecutive_failures=3, min_requests=100)
    for failed in (True, True, False, True, True):
        assert call(b, failed)
    assert b.state == CLOSED
    assert call(b, True) and b.state == OPEN
    assert not b.allows()  # no call reaches an open deployment: nobody pays its timeout


def test_the_error_rate_over_the_window_opens_it_with_enough_requests() -> None:
    b, clock = breaker(consecutive_failures=100, error_rate=0.5, min_requests=10, window_s=30)
    for i in range(9):
        call(b, failed=i % 2 == 0)  # 5 of 9 failed, but fewer than min_requests
        clock.now += 1
    assert b.state == CLOSED
    call(b, failed=True)  # 6 of 10
    assert b.state == OPEN


def test_old_calls_leave_the_window() -> None:
    b, clock = breaker(consecutive_failures=100, error_rate=0.6, min_requests=4, window_s=10)
    for _ in range(6):
        call(b, failed=False)
    clock.now += 11  # those six successes no longer dilute the rate
    for failed in (True, True, False):
        call(b, failed)
    assert b.state == CLOSED  # 3 calls in the window: fewer than min_requests
    call(b, failed=True)  # 3 of 4 failed; with the old six it would be 3 of 10
    assert b.state == OPEN


def test_cooldown_then_one_probe_which_closes_or_reopens() -> None:
    b, clock = breaker(consecutive_failures=1, cooldown_s=10, half_open_probes=1)
    call(b, True)
    clock.now += 9.9
    assert not b.allows()
    clock.now += 0.2
    assert b.allows() and b.state == HALF_OPEN
    assert not b.allows()  # the one probe is in flight
    b.record(failed=True)
    assert b.state == OPEN and not b.allows()  # another full cooldown
    clock.now += 10.1
    assert b.allows()
    b.record(failed=False)
    assert b.state == CLOSED and call(b, False) and call(b, False)


@pytest.mark.parametrize("settings", [{"consecutive_failures": 0}, {"error_rate": 0},
                                      {"error_rate": 1.5}, {"window_s": 0},
                                      {"cooldown_s": -1}, {"half_open_probes": 0}])
def test_bad_breaker_settings(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**settings)  # type: ignore[arg-type]


def test_the_retry_budget_caps_retries_at_a_share_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=0, clock=clock)
    for _ in range(100):
        budget.request()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 20  # a provider down for everyone: 100 failures, 20 retries
    clock.now += 11  # the window moved on: nothing earned, nothing spent
    assert not budget.try_retry()
    for _ in range(10):
        budget.request()
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]


def test_a_quiet_gateway_may_still_retry() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=0.5, clock=clock)
    budget.request()
    assert sum(budget.try_retry() for _ in range(10)) == 5  # 0.2 + 0.5 * 10


def test_a_retry_given_back_no_longer_counts_and_leaves_with_its_slice() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0, window_s=10, min_per_s=0.2, clock=clock)  # 2 per window
    assert budget.try_retry()
    clock.now += 6
    assert budget.try_retry() and not budget.try_retry()
    budget.give_back()  # the newest one: the older still leaves the window first
    assert budget.try_retry() and not budget.try_retry()
    budget.give_back()
    clock.now += 4.5  # the first retry's slice has left: two may go again
    assert budget.try_retry() and budget.try_retry() and not budget.try_retry()
    clock.now += 20
    budget.give_back()  # nothing left in the window to give back: no credit either
    assert budget.try_retry() and budget.try_retry() and not budget.try_retry()


def test_backoff_is_full_jitter_under_a_cap_and_honours_retry_after() -> None:
    assert backoff_s(1, base_s=0.1, rand=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_s(4, base_s=0.1, rand=lambda: 1.0) == pytest.approx(0.8)
    assert backoff_s(20, base_s=0.1, cap_s=5, rand=lambda: 1.0) == pytest.approx(5)
    assert backoff_s(3, rand=lambda: 0.0) == 0.0
    assert backoff_s(1, retry_after_s=2.0, remaining_s=10) == 2.0
    assert backoff_s(1, retry_after_s=20.0, remaining_s=10) is None  # does not fit: fall back
    assert backoff_s(5, base_s=1, rand=lambda: 1.0, remaining_s=3) is None
    with pytest.raises(ValueError):
        backoff_s(0)
