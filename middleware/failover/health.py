"""Health and retry arithmetic for the failover layer: circuit breakers, the retry budget and
backoff. Pure and clock-driven (no I/O), so the layer and its tests share one definition.

- `CircuitBreaker`: closed → open on `consecutive_failures` failures in a row, or when the
  error rate over the last `window_s` seconds reaches `error_rate` with at least
  `min_requests` calls in the window; open → half-open after `cooldown_s`; half-open lets
  `half_open_probes` calls through at a time, closes on a success and opens again (for another
  cooldown) on a failure. Callers report only upstream failures: a 4xx the caller caused is
  never a failure of the deployment.
- `RetryBudget`: retries may be at most `ratio` of the requests seen in the last `window_s`
  seconds (plus `min_per_s` retries per second, so a quiet gateway can still retry): when a
  provider is down for everyone, retries stop multiplying the load.
- `backoff_s`: exponential backoff with full jitter, or the provider's Retry-After when it fits
  in what is left of the request's deadline.
"""
from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BreakerSettings", "CircuitBreaker", "RetryBudget", "Window", "backoff_s"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Window:
    """Two counts over the last `window_s` seconds, kept in `buckets` time slices: O(1) work
    and no allocation per event (one small list per slice), so thousands of calls a second
    cost what a few do. Events leave the window with their slice: it is exact to one slice's
    width (`window_s / buckets`)."""

    __slots__ = ("_slices", "buckets", "first", "second", "width")

    def __init__(self, window_s: float, buckets: int = 20) -> None:
        self.buckets = buckets
        self.width = window_s / buckets
        self._slices: deque[list[int]] = deque()  # [slice number, first, second]
        self.first = 0  # the totals over the slices in the window
        self.second = 0

    def add(self, now: float, first: int, second: int) -> None:
        number = int(now // self.width)
        slices = self._slices
        if slices and slices[-1][0] == number:
            last = slices[-1]
            last[1] += first
            last[2] += second
        else:
            slices.append([number, first, second])
            self._trim(number)
        self.first += first
        self.second += second

    def take_back_second(self) -> None:
        """Takes back one `second` event, from the newest slice holding one (none left in the
        window: nothing to take back)."""
        for newest in reversed(self._slices):
            if newest[2] > 0:
                newest[2] -= 1
                self.second -= 1
                return

    def totals(self, now: float) -> tuple[int, int]:
        self._trim(int(now // self.width))
        return self.first, self.second

    def _trim(self, number: int) -> None:
        slices, oldest_kept = self._slices, number - self.buckets + 1
        while slices and slices[0][0] < oldest_kept:
            _, first, second = slices.popleft()
            self.first -= first
            self.second -= second

    def clear(self) -> None:
        self._slices.clear()
        self.first = self.second = 0


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    consecutive_failures: int = 5
    error_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    cooldown_s: float = 10.0
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.half_open_probes < 1:
            raise ValueError("consecutive_failures, min_requests and half_open_probes must be "
                             "at least 1")
        if not 0 < self.error_rate <= 1:
            raise ValueError("error_rate must be in (0, 1]")
        if self.window_s <= 0 or self.cooldown_s <= 0:
            raise ValueError("window_s and cooldown_s must be positive")


class CircuitBreaker:
    """One deployment's (or one provider key's) breaker; see the module docstring."""

    def __init__(self, settings: BreakerSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[CircuitBreaker], None] | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self.clock = clock
        self.on_change = on_change  # told when this process opens or closes the breaker
        self.state = CLOSED
        self.opened_at = 0.0
        self.consecutive = 0
        self.probes_in_flight = 0
        self._window = Window(self.settings.window_s)  # (calls, failures)

    def allows(self) -> bool:
        """May a call go to this deployment now? (A half-open breaker counts the probe.)"""
        if self.state == OPEN:
            if self.clock() - self.opened_at < self.settings.cooldown_s:
                return False
            self.state, self.probes_in_flight = HALF_OPEN, 0
        if self.state == HALF_OPEN:
            if self.probes_in_flight >= self.settings.half_open_probes:
                return False
            self.probes_in_flight += 1
        return True

    def reopens_in_s(self) -> float | None:
        """How long until an open breaker lets a probe through (0: it would now); None for
        a breaker that is not open."""
        if self.state != OPEN:
            return None
        return max(self.opened_at + self.settings.cooldown_s - self.clock(), 0.0)

    def record(self, failed: bool, now: float | None = None) -> None:
        """The outcome of a call `allows` let through (`now` on this breaker's clock)."""
        if now is None:
            now = self.clock()
        if self.state == HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if failed:
                self._open(now)
            else:
                self._close()
            return
        self._window.add(now, 1, failed)
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.state == CLOSED and failed and self._should_open():
            self._open(now)

    def release(self) -> None:
        """A call `allows` let through ended without an outcome (cancelled, or refused before
        it reached the deployment): a half-open probe slot is given back."""
        if self.state == HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def open_until(self, until: float) -> None:
        """Another instance opened this breaker: stay open until `until` (this clock)."""
        if self.state == OPEN and self.opened_at + self.settings.cooldown_s >= until:
            return
        self.state, self.probes_in_flight = OPEN, 0
        self.opened_at = until - self.settings.cooldown_s

    def close_shared(self) -> None:
        """Another instance's probe succeeded: close without telling anyone back."""
        if self.state != CLOSED:
            self.state, self.consecutive = CLOSED, 0
            self._window.clear()

    def _should_open(self) -> bool:
        settings = self.settings
        if self.consecutive >= settings.consecutive_failures:
            return True
        count, failures = self._window.first, self._window.second
        return count >= settings.min_requests and failures >= settings.error_rate * count

    def _open(self, now: float) -> None:
        self.state, self.opened_at, self.probes_in_flight = OPEN, now, 0
        if self.on_change is not None:
            self.on_change(self)

    def _close(self) -> None:
        self.close_shared()
        if self.on_change is not None:
            self.on_change(self)


class RetryBudget:
    """Retries ≤ `ratio` × requests of the last `window_s` seconds + `min_per_s` × window."""

    def __init__(self, *, ratio: float = 0.2, window_s: float = 10.0, min_per_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ratio < 0 or window_s <= 0 or min_per_s < 0:
            raise ValueError("ratio and min_per_s must be >= 0 and window_s positive")
        self.ratio = ratio
        self.window_s = window_s
        self.min_per_s = min_per_s
        self.clock = clock
        self._window = Window(window_s)  # (requests, retries)

    def request(self, now: float | None = None) -> None:
        """A first attempt was made (it earns retry budget)."""
        self._window.add(self.clock() if now is None else now, 1, 0)

    def try_retry(self) -> bool:
        """True (and the retry is counted) when the budget allows one more retry now."""
        now = self.clock()
        requests, retries = self._window.totals(now)
        if retries + 1 > self.ratio * requests + self.min_per_s * self.window_s:
            return False
        self._window.add(now, 0, 1)
        return True

    def give_back(self) -> None:
        """A retry `try_retry` allowed was not made after all (its call was refused before it
        went out): it no longer counts."""
        self._window.take_back_second()


def backoff_s(attempt: int, *, base_s: float = 0.1, cap_s: float = 5.0,
              retry_after_s: float | None = None, remaining_s: float | None = None,
              rand: Callable[[], float] = random.random) -> float | None:
    """How long to wait before retry number `attempt` (1 = the first retry): the provider's
    Retry-After when it has one, else full jitter over min(cap, base × 2^(attempt-1)). None
    when the wait would not fit in `remaining_s` (what is left of the request's deadline):
    the caller falls back instead of waiting."""
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    if retry_after_s is not None and retry_after_s >= 0:
        wait = retry_after_s
    else:
        wait = rand() * min(cap_s, base_s * 2 ** (attempt - 1))
    if remaining_s is not None and wait >= remaining_s:
        return None
    return wait
