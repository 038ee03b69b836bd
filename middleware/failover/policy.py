"""The failover layer's configuration and its reading of upstream errors (pure, no I/O)."""
from __future__ import annotations

import email.utils
import math
import re
import time
from dataclasses import dataclass, field

from gateway.context import ANTHROPIC_COUNT_TOKENS
from gateway.errors import UpstreamError
from middleware.failover.routing import STRATEGIES

__all__ = ["AUTH", "CALLER", "CONTENT_POLICY", "CONTEXT_WINDOW", "FATAL", "NO_VERDICT_OPERATIONS",
           "RETRYABLE", "RetryPolicy", "Route", "classify", "parse_retry_after"]

# Operations whose outcomes say nothing of a deployment's health: they never count for its
# breaker, cool-down or latency average, and a deployment that fails one is out for that
# request only. Nor do they share its rate limits: they take none of its rpm tokens and go
# to it while it cools down after a 429 (`Tried.rate_limited`); only its breaker steers them.
# Anthropic's token counting: "Token counting and message creation have separate and
# independent rate limits — usage of one does not count against the limits of the other"
# (https://docs.anthropic.com/en/docs/build-with-claude/token-counting, "Pricing and rate
# limits"), so its 429 is no reason to keep messages away, nor theirs to keep it away.
NO_VERDICT_OPERATIONS = frozenset({ANTHROPIC_COUNT_TOKENS})

# What an upstream error means for the next step.
RETRYABLE = "retryable"  # try another deployment, or this one again after a backoff
AUTH = "auth"  # the provider key failed (401/402/403): take the key out for this request
CONTEXT_WINDOW = "context_window"  # go to a larger-context model, if configured
CONTENT_POLICY = "content_policy"  # go to the configured alternative, if any
CALLER = "caller"  # the caller's own mistake (other 4xx): answer it, never retry
FATAL = "fatal"  # an upstream failure the operator chose not to retry (not in retry_on)

_CONTEXT_WINDOW = re.compile(
    r"context[_ ]length|context window|maximum context|prompt is too long|too many tokens|"
    r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
_CONTENT_POLICY = re.compile(
    r"content[_ ]policy|content[_ ]filter|content management policy|safety system|"
    r"responsible ?ai|blocked due to safety|prohibited content", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Route:
    """How one public model is routed (`FailoverMiddleware(routes={"gpt-4o": Route(...)})`).

    - `strategy`: one of "weighted" (default), "least-busy", "latency", "lowest-cost",
      "priority" (see middleware/failover/routing.py).
    - `fallbacks`: public models tried, in order, when every deployment of this one failed or
      is unhealthy. `context_window_fallbacks` replace the rest of the chain when the provider
      says the input is too long; `content_policy_fallbacks` when it refuses on content policy.
    - `ttft_timeout_s`: a stream whose response has not started by then is abandoned and
      fails over (the provider's own first-byte timeout still applies when this is None).
      Streams only, like that timeout: a non-stream answer comes whole when the model is
      done, and the provider's `total_s` bounds it.
    - `hedge_after_s`: when the first call has not started answering after this long, a
      second deployment is called too; the first to answer wins, the other is cancelled.
    - `continuation`: a chat stream that breaks after content went out is continued by the
      next deployment or fallback, from the text sent so far (middleware/failover/
      continuation.py, with its limits).
    """

    strategy: str = "weighted"
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    ttft_timeout_s: float | None = None
    hedge_after_s: float | None = None
    continuation: bool = False
    # No hedging, TTFT timeout or continuation: a first attempt is a plain call (set below).
    plain: bool = field(init=False, repr=False, compare=False, default=True)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} "
                             f"(known: {', '.join(STRATEGIES)})")
        for name in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"Route.{name} must be a list of model names, not a string")
            object.__setattr__(self, name, tuple(value))
        for name in ("ttft_timeout_s", "hedge_after_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Route.{name} must be a positive number of seconds or None")
        object.__setattr__(self, "plain", self.hedge_after_s is None and
                           self.ttft_timeout_s is None and not self.continuation)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed call is tried again.

    `max_attempts` bounds the upstream calls one request makes (first call, retries and
    fallbacks together); `deadline_s` bounds the time spent on them, backoff included.
    `retry_on` holds statuses and error kinds ("connection_error", "timeout") worth another
    try. Backoff is exponential with full jitter (`backoff_base_s`, `backoff_cap_s`), or the
    provider's Retry-After when it fits in the deadline. `max_retry_after_s` bounds how long
    a 429 cools its deployment down for everyone; a request waits for a longer Retry-After
    only when the whole of it fits its deadline. The retry budget allows at most
    `budget_ratio` retries per request seen in the last `budget_window_s` seconds, plus
    `budget_min_per_s` per second, so an outage does not multiply the load on a provider.
    """

    max_attempts: int = 3
    deadline_s: float = 120.0
    retry_on: frozenset[int | str] = field(default_factory=lambda: frozenset(
        {408, 429, 500, 502, 503, 504, 529, "connection_error", "timeout"}))
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0
    max_retry_after_s: float = 60.0
    budget_ratio: float = 0.2
    budget_window_s: float = 10.0
    budget_min_per_s: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be an integer >= 1")
        if not self.deadline_s > 0 or self.backoff_base_s < 0 or self.backoff_cap_s < 0 or \
                self.max_retry_after_s < 0:
            raise ValueError("RetryPolicy.deadline_s must be positive, backoffs and "
                             "max_retry_after_s >= 0")
        if self.budget_ratio < 0 or not self.budget_window_s > 0 or self.budget_min_per_s < 0:
            raise ValueError("RetryPolicy budget_ratio and budget_min_per_s must be >= 0, "
                             "budget_window_s positive")
        if isinstance(self.retry_on, str) or not all(
                (type(item) is int and 400 <= item <= 599) or (isinstance(item, str) and item)
                for item in self.retry_on):
            raise ValueError("RetryPolicy.retry_on must be a set of HTTP statuses (400 to 599) "
                             "and error kinds such as 'timeout', not "
                             f"{self.retry_on!r}")
        object.__setattr__(self, "retry_on", frozenset(self.retry_on))


def classify(error: UpstreamError, retry_on: frozenset[int | str]) -> str:
    """What an upstream error means for the failover layer (see the constants above)."""
    status = error.status
    kind = error.upstream_error_type or ""
    if status in (401, 402, 403):
        return AUTH
    if status in (400, 413, 422):
        text = f"{kind} {error.message}"
        if _CONTEXT_WINDOW.search(text):
            return CONTEXT_WINDOW
        if _CONTENT_POLICY.search(text):
            return CONTENT_POLICY
    if status in retry_on or kind in retry_on:
        return RETRYABLE
    return CALLER if 400 <= status < 500 else FATAL


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date, RFC 9110 §10.2.3),
    as asked (whether a request can wait for it is decided on the whole of it); None when
    absent or unreadable."""
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = _http_date_in(value)
        except (TypeError, ValueError, OverflowError):
            return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _http_date_in(value: str) -> float | None:
    when = email.utils.parsedate_to_datetime(value)
    return None if when.tzinfo is None else when.timestamp() - time.time()
