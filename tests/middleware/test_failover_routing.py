"""Deployment picking and error reading for the failover layer (middleware/failover/routing.py
and policy.py), on a fake clock and a seeded `random`: pure, no sockets, no ASGI."""
from __future__ import annotations

import email.utils
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal

import pytest

from gateway.context import Usage
from gateway.errors import UpstreamError
from gateway.pricing import Price
from gateway.upstream import Deployment, ProviderKey
from middleware.failover.health import CLOSED, HALF_OPEN, OPEN, BreakerSettings
from middleware.failover.policy import (
    AUTH,
    CALLER,
    CONTENT_POLICY,
    CONTEXT_WINDOW,
    FATAL,
    RETRYABLE,
    RetryPolicy,
    Route,
    classify,
    parse_retry_after,
)
from middleware.failover.routing import (
    EWMA_TAU_S,
    STRATEGIES,
    DeploymentState,
    Group,
    KeyState,
    paced_in_s,
)

# One failure opens a breaker for 10 s; then one probe at a time.
SETTINGS = BreakerSettings(consecutive_failures=1, cooldown_s=10, half_open_probes=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Every test draws from the same seeded `random` and leaves the global state as found."""
    saved = random.getstate()
    random.seed(20240611)
    yield
    random.setstate(saved)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def dep(name: str, **fields: object) -> Deployment:
    return Deployment(provider="openai", model=name, **fields)  # type: ignore[arg-type]


def group(clock: Clock, *deployments: Deployment, strategy: str = "weighted") -> Group:
    return Group("gpt-test", deployments, strategy=strategy, breaker=SETTINGS, clock=clock)


def names(g: Group, picks: int, excluded: set[DeploymentState] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(picks):
        state = g.pick(excluded or set())
        counts[state.name if state is not None else None] += 1  # type: ignore[index]
    return counts


def trip(state: DeploymentState | KeyState) -> None:
    """Opens the breaker (one failure opens it under SETTINGS)."""
    state.breaker.record(True)
    assert state.breaker.state == OPEN


# --- weighted ------------------------------------------------------------------------------


def test_weighted_shares_follow_the_weights(clock: Clock) -> None:
    g = group(clock, dep("a", weight=3), dep("b", weight=1))
    counts = names(g, 4000)
    assert set(counts) == {"openai/a", "openai/b"}
    assert abs(counts["openai/a"] / 4000 - 0.75) <= 0.05
    assert abs(counts["openai/b"] / 4000 - 0.25) <= 0.05


def test_weighted_shares_among_the_rest_when_one_is_excluded(clock: Clock) -> None:
    # With an exclusion the pick takes the slower path over the remaining deployments.
    g = group(clock, dep("a", weight=3), dep("heavy", weight=5), dep("b", weight=1))
    heavy = g.state("openai/heavy")
    assert heavy is not None
    counts = names(g, 4000, {heavy})
    assert set(counts) == {"openai/a", "openai/b"}
    assert abs(counts["openai/a"] / 4000 - 0.75) <= 0.05


def test_weight_zero_is_only_a_backup(clock: Clock) -> None:
    g = group(clock, dep("spare", weight=0), dep("main", weight=1), dep("other", weight=2))
    spare, main, other = g.deployments
    assert names(g, 500).keys() == {"openai/main", "openai/other"}
    assert names(g, 300, {other}) == {"openai/main": 300}
    trip(main)
    assert names(g, 300, {other}) == {"openai/spare": 300}  # nobody else is left
    assert g.pick({spare, other}) is None


def test_all_weights_zero_still_picks_at_random(clock: Clock) -> None:
    g = group(clock, dep("a", weight=0), dep("b", weight=0))
    assert names(g, 400).keys() == {"openai/a", "openai/b"}


def test_weighted_skips_an_open_breaker(clock: Clock) -> None:
    g = group(clock, dep("a", weight=3), dep("b", weight=1))
    trip(g.deployments[0])
    assert names(g, 500) == {"openai/b": 500}


# --- every strategy: exclusions, breakers, nothing left ----------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_excluded_deployments_are_never_returned(clock: Clock, strategy: str) -> None:
    price = Price(input_per_mtok="1", output_per_mtok="2")
    g = group(clock, *(dep(n, price=price) for n in "abc"), strategy=strategy)
    a, b, c = (g.state(f"openai/{n}") for n in "abc")
    assert a is not None and b is not None and c is not None
    counts = names(g, 300, {a})
    assert "openai/a" not in counts and None not in counts
    assert names(g, 50, {a, c}) == {"openai/b": 50}
    assert g.pick({a, b, c}) is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_open_breaker_is_skipped_and_none_when_all_are_unavailable(
        clock: Clock, strategy: str) -> None:
    price = Price(input_per_mtok="1", output_per_mtok="2")
    g = group(clock, dep("a", price=price), dep("b", price=price), strategy=strategy)
    a, b = g.deployments
    trip(a)
    assert names(g, 100) == {b.name: 100}
    trip(b)
    assert g.pick(set()) is None
    clock.now += 5  # still within the cooldown
    assert g.pick(set()) is None


def test_an_unknown_strategy_is_refused(clock: Clock) -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        group(clock, dep("a"), strategy="fastest")


def test_an_empty_group_picks_nothing(clock: Clock) -> None:
    for strategy in STRATEGIES:
        assert group(clock, strategy=strategy).pick(set()) is None


# --- least-busy ----------------------------------------------------------------------------


def test_least_busy_picks_the_fewest_in_flight(clock: Clock) -> None:
    g = group(clock, dep("a"), dep("b"), dep("c"), strategy="least-busy")
    a, b, c = g.deployments
    for _ in range(3):
        a.started()
    c.started()
    assert names(g, 100) == {"openai/b": 100}
    b.started()
    b.started()  # a 3, b 2, c 1
    assert names(g, 100) == {"openai/c": 100}
    c.finished(Usage(10, 0))  # a 3, b 2, c 0
    assert g.pick(set()) is c
    assert names(g, 50, {c}) == {"openai/b": 50}
    trip(b)
    assert names(g, 50, {c}) == {"openai/a": 50}


def test_least_busy_breaks_ties_at_random(clock: Clock) -> None:
    g = group(clock, dep("a"), dep("b"), dep("c"), strategy="least-busy")
    g.deployments[2].started()
    counts = names(g, 400)
    assert counts.keys() == {"openai/a", "openai/b"}
    assert min(counts.values()) > 120


# --- latency (power of two choices over peak EWMA) ----------------------------------------


def test_latency_always_picks_the_faster_of_two(clock: Clock) -> None:
    g = group(clock, dep("slow"), dep("fast"), strategy="latency")
    slow, fast = g.deployments
    slow.observe_ttft(1.0)
    fast.observe_ttft(0.05)
    assert names(g, 300) == {"openai/fast": 300}
    trip(fast)
    assert names(g, 50) == {"openai/slow": 50}


def test_latency_is_two_choices_so_the_slowest_of_three_never_wins(clock: Clock) -> None:
    g = group(clock, dep("fast"), dep("mid"), dep("slow"), strategy="latency")
    for state, ttft in zip(g.deployments, (0.05, 0.3, 1.0), strict=True):
        state.observe_ttft(ttft)
    counts = names(g, 3000)
    # Pairs {fast, mid} and {fast, slow} go to fast, {mid, slow} to mid.
    assert counts.keys() == {"openai/fast", "openai/mid"}
    assert abs(counts["openai/fast"] / 3000 - 2 / 3) <= 0.05


def test_latency_weighs_the_calls_in_flight_and_the_shared_view(clock: Clock) -> None:
    g = group(clock, dep("slow"), dep("fast"), strategy="latency")
    slow, fast = g.deployments
    slow.observe_ttft(1.0)
    fast.observe_ttft(0.05)
    for _ in range(20):  # 0.05 × 21 = 1.05 > 1.0 × 1
        fast.started()
    assert fast.latency_score() == pytest.approx(1.05)
    assert names(g, 100) == {"openai/slow": 100}
    for _ in range(20):
        fast.finished(Usage(0, 0))
    fast.shared_ttft_s = 2.0  # other instances see it slower: the worse view counts
    assert fast.latency_score() == pytest.approx(2.0)
    assert names(g, 100) == {"openai/slow": 100}


def test_peak_ewma_takes_a_slower_sample_at_once_and_decays_a_faster_one(clock: Clock) -> None:
    state = DeploymentState(dep("a"), SETTINGS, clock)
    state.observe_ttft(0.2)
    assert state.ewma_ttft_s == pytest.approx(0.2)
    clock.now += 1
    state.observe_ttft(1.0)  # slower: taken at once
    assert state.ewma_ttft_s == pytest.approx(1.0)
    state.observe_ttft(0.05)  # faster, the same instant: no time has passed, no decay
    assert state.ewma_ttft_s == pytest.approx(1.0)
    clock.now += EWMA_TAU_S
    state.observe_ttft(0.05)
    expected = 1.0 * math.exp(-1) + 0.05 * (1 - math.exp(-1))
    assert state.ewma_ttft_s == pytest.approx(expected)
    assert 0.05 < state.ewma_ttft_s < 1.0
    clock.now += 100 * EWMA_TAU_S
    state.observe_ttft(0.05)  # long enough: the fast value has all but replaced the slow one
    assert state.ewma_ttft_s == pytest.approx(0.05, abs=1e-9)
    state.observe_ttft(0.5)
    assert state.ewma_ttft_s == pytest.approx(0.5)


# --- lowest-cost and priority --------------------------------------------------------------


def test_lowest_cost_goes_cheapest_first_and_unpriced_last(clock: Clock) -> None:
    g = group(clock,
              dep("unpriced"),
              dep("dear", price=Price(input_per_mtok="5", output_per_mtok="15")),
              dep("cheap", price=Price(input_per_mtok="1", output_per_mtok="2")),
              dep("mid", price=Price(input_per_mtok="0.5", output_per_mtok="2.55")),
              strategy="lowest-cost")
    assert [s.name for s in g.deployments] == ["openai/cheap", "openai/mid", "openai/dear",
                                              "openai/unpriced"]
    assert [s.cost for s in g.deployments] == [Decimal(3), Decimal("3.05"), Decimal(20),
                                               Decimal("Infinity")]
    order, excluded = [], set()
    while (state := g.pick(excluded)) is not None:
        order.append(state.name)
        excluded.add(state)
    assert order == ["openai/cheap", "openai/mid", "openai/dear", "openai/unpriced"]
    assert names(g, 50) == {"openai/cheap": 50}  # no randomness in it
    trip(g.deployments[0])
    assert g.pick(set()) is g.deployments[1]


def test_priority_is_the_declared_order(clock: Clock) -> None:
    g = group(clock, dep("z"), dep("a"), dep("m"), strategy="priority")
    z, a, m = g.deployments
    assert names(g, 50) == {"openai/z": 50}
    assert g.pick({z}) is a
    assert g.pick({z, a}) is m
    trip(z)
    assert g.pick(set()) is a
    clock.now += 10.1  # z's cooldown is over: a probe goes to it first again
    assert g.pick(set()) is z
    assert g.pick(set()) is a  # its one probe is in flight


# --- capacity and cool-down ---------------------------------------------------------------


def test_rpm_capacity_is_a_token_bucket(clock: Clock) -> None:
    g = group(clock, dep("limited", rpm=2), dep("spare"), strategy="priority")
    limited, spare = g.deployments
    assert g.pick(set()) is limited
    limited.started()
    assert g.pick(set()) is limited
    limited.started()
    assert g.pick(set()) is spare  # two calls in the same instant used the minute's two
    clock.now += 30  # refills rpm / 60 = 1 call per 30 s
    assert g.pick(set()) is limited
    limited.started()
    assert g.pick(set()) is spare


def test_rpm_refill_is_gradual_and_capped(clock: Clock) -> None:
    g = group(clock, dep("limited", rpm=2), dep("spare"), strategy="priority")
    limited, spare = g.deployments
    limited.started()
    limited.started()
    clock.now += 29
    assert g.pick(set()) is spare  # 0.97 of a call: not yet
    clock.now += 2
    assert g.pick(set()) is limited
    clock.now += 3600  # an idle hour banks no more than rpm
    for _ in range(2):
        assert g.pick(set()) is limited
        limited.started()
    assert g.pick(set()) is spare
    assert limited.requests == 4 and limited.in_flight == 4


def test_paced_in_s_is_the_time_until_the_first_refill_when_capacity_alone_is_missing(
        clock: Clock) -> None:
    g = group(clock, dep("rpm", rpm=2), dep("tpm", tpm=1000), strategy="priority")
    by_rpm, by_tpm = g.deployments
    assert paced_in_s(g.deployments, set(), clock.now) is None  # both have capacity
    by_rpm.started()
    by_rpm.started()
    by_tpm.started()
    by_tpm.finished(Usage(1500, 0))  # 500 tokens short: 30 s
    clock.now += 10
    assert by_rpm.refills_in_s(clock.now) == pytest.approx(20)
    assert by_tpm.refills_in_s(clock.now) == pytest.approx(20)
    assert paced_in_s(g.deployments, set(), clock.now) == pytest.approx(20)
    by_tpm.breaker.record(True)  # (one failure opens it): not capacity alone any more
    assert by_tpm.breaker.state == OPEN
    assert paced_in_s(g.deployments, set(), clock.now) is None


def test_tpm_capacity_is_spent_by_finished_calls(clock: Clock) -> None:
    g = group(clock, dep("limited", tpm=1000), dep("spare"), strategy="priority")
    limited, spare = g.deployments
    limited.started()
    assert g.pick(set()) is limited  # tpm is spent when the call reports its tokens
    limited.finished(Usage(1500, 0))
    assert limited.in_flight == 0
    assert g.pick(set()) is spare
    clock.now += 29  # +483 tokens: still 17 short
    assert g.pick(set()) is spare
    clock.now += 2
    assert g.pick(set()) is limited


def test_tpm_counts_the_tokens_of_a_long_call(clock: Clock) -> None:
    g = group(clock, dep("limited", tpm=1000), dep("spare"), strategy="priority")
    limited, spare = g.deployments
    assert g.pick(set()) is limited
    limited.started()
    clock.now += 60  # a minute-long stream...
    limited.finished(Usage(1500, 0))  # ...that used 1.5 minutes' worth of tokens
    # A full bucket (1000) less 1500 leaves it 500 short: 30 s before it is usable again.
    assert g.pick(set()) is spare


def test_a_deployment_cooling_after_a_429_is_skipped_until_then(clock: Clock) -> None:
    g = group(clock, dep("a"), dep("b"), strategy="priority")
    a, b = g.deployments
    a.cool_until = clock.now + 5
    assert g.pick(set()) is b
    clock.now += 4.9
    assert g.pick(set()) is b
    clock.now += 0.1
    assert g.pick(set()) is a
    assert a.breaker.state == CLOSED  # cooling is not a breaker failure


def test_after_a_429_cool_down_one_probe_goes_first(clock: Clock) -> None:
    # (a breaker that one failure does not open: the cool-down's probe is what is tested)
    g = Group("gpt-test", [dep("a"), dep("b")], strategy="priority", breaker=BreakerSettings(),
              clock=clock)
    a, b = g.deployments
    a.cool_down(clock.now + 5)
    assert g.pick(set()) is b and a.cooling_s(clock.now) == 5
    a.record(failed=False)  # a call made before the 429 answers: the pause it asked for stands
    clock.now += 5
    assert g.pick(set()) is a and a.cool_probes == 1  # the probe
    assert g.pick(set()) is b and g.pick({b}) is None  # nobody else, until it ends
    assert a.cooling_s(clock.now) == 0.0  # (0: waiting on the probe, not on the clock)
    a.release()  # it never reached the deployment (its client left): the slot comes back
    assert a.cooling_s(clock.now) is None
    assert g.pick({b}) is a and g.pick({b}) is None
    a.record(failed=True)  # it failed: the slot goes to the next
    assert g.pick({b}) is a and g.pick({b}) is None
    a.cool_down(clock.now + 1)  # it was refused with another 429: a new cool-down
    assert a.cool_probes == 0 and g.pick({b}) is None
    clock.now += 1
    assert g.pick({b}) is a and g.pick({b}) is None
    a.record(failed=False)  # it answered: the cool-down is over
    assert (a.cool_until, a.cool_probes, a.cooling_s(clock.now)) == (0.0, 0, None)
    assert names(g, 5, {b}) == {"openai/a": 5}
    assert a.breaker.state == CLOSED  # cooling is not a breaker failure


def test_the_single_deployment_fast_path(clock: Clock) -> None:
    for strategy in STRATEGIES:
        g = group(clock, dep("only", rpm=1), strategy=strategy)
        (only,) = g.deployments
        assert g.only is only
        assert g.pick(set()) is only
        assert g.pick({only}) is None
        only.cool_until = clock.now + 1
        assert g.pick(set()) is None
        only.cool_until = 0.0
        only.started()
        assert g.pick(set()) is None  # no capacity left this minute
        clock.now += 60
        assert g.pick(set()) is only
        trip(only)
        assert g.pick(set()) is None


# --- half-open probes and shared health --------------------------------------------------


def test_a_pick_on_a_half_open_breaker_counts_its_probe(clock: Clock) -> None:
    g = group(clock, dep("only"))
    (only,) = g.deployments
    trip(only)
    clock.now += 10.1
    assert g.pick(set()) is only
    assert only.breaker.state == HALF_OPEN and only.breaker.probes_in_flight == 1
    assert g.pick(set()) is None  # half_open_probes=1: the one probe is out
    only.breaker.release()  # that call never reached the deployment: the slot comes back
    assert only.breaker.probes_in_flight == 0
    assert g.pick(set()) is only
    only.breaker.record(failed=False)
    assert only.breaker.state == CLOSED
    assert names(g, 5) == {"openai/only": 5}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_half_open_deployment_gets_one_probe_in_a_group(clock: Clock, strategy: str) -> None:
    price = Price(input_per_mtok="1", output_per_mtok="2")
    g = group(clock, dep("a", price=price), dep("b", price=price), strategy=strategy)
    a, b = g.deployments
    trip(a)
    clock.now += 10.1
    picks = [g.pick({b}) for _ in range(3)]
    assert picks == [a, None, None]
    assert a.breaker.probes_in_flight == 1
    assert names(g, 50) == {"openai/b": 50}  # nothing else leaks into a's probe count
    assert a.breaker.probes_in_flight == 1


def test_a_cooling_or_full_deployment_does_not_spend_its_probe(clock: Clock) -> None:
    g = group(clock, dep("a", rpm=1), dep("b"), strategy="priority")
    a, b = g.deployments
    trip(a)
    clock.now += 10.1
    a.cool_until = clock.now + 1
    assert g.pick(set()) is b and g.pick({b}) is None
    assert a.breaker.state == OPEN and a.breaker.probes_in_flight == 0
    clock.now += 1
    a.started()  # capacity used up (as if by a call already in flight)
    assert g.pick({b}) is None and a.breaker.probes_in_flight == 0
    clock.now += 60
    assert g.pick({b}) is a and a.breaker.probes_in_flight == 1


def test_shared_health_opens_and_closes_a_deployment_without_echo(clock: Clock) -> None:
    changes: list[str] = []
    g = group(clock, dep("a"), dep("b"), strategy="priority")
    a, b = g.deployments
    a.breaker.on_change = lambda breaker: changes.append(breaker.state)
    a.breaker.open_until(clock.now + 30)  # another instance opened it
    assert g.pick(set()) is b
    clock.now += 29.9
    assert g.pick(set()) is b
    a.breaker.close_shared()  # another instance's probe succeeded
    assert g.pick(set()) is a
    assert changes == []  # neither is told back to the other instances
    trip(a)  # this process opens it: that is told
    assert changes == [OPEN]
    a.breaker.open_until(clock.now + 1)  # an earlier end than ours changes nothing
    clock.now += 5
    assert g.pick(set()) is b


# --- provider keys ------------------------------------------------------------------------


def keyed(clock: Clock, *envs: str) -> DeploymentState:
    keys = tuple(ProviderKey(env, secret=f"sk-secret-{env}") for env in envs)
    return DeploymentState(dep("keyed", keys=keys), SETTINGS, clock)


def key_counts(state: DeploymentState, bad: set[str], picks: int) -> Counter[str | None]:
    counts: Counter[str | None] = Counter()
    for _ in range(picks):
        key = state.pick_key(bad)
        counts[key.key.env if key is not None else None] += 1
    return counts


def test_pick_key_spreads_over_keys_and_never_returns_a_bad_one(clock: Clock) -> None:
    state = keyed(clock, "K1", "K2", "K3")
    assert key_counts(state, set(), 600).keys() == {"K1", "K2", "K3"}
    assert key_counts(state, {"K1"}, 300).keys() == {"K2", "K3"}
    assert key_counts(state, {"K1", "K3"}, 100) == {"K2": 100}
    assert key_counts(state, {"K1", "K2", "K3"}, 10) == {None: 10}


def test_pick_key_skips_an_open_key_breaker(clock: Clock) -> None:
    state = keyed(clock, "K1", "K2")
    k1, _ = state.keys
    trip(k1)
    assert key_counts(state, set(), 100) == {"K2": 100}
    assert key_counts(state, {"K2"}, 10) == {None: 10}
    clock.now += 10.1  # K1's probe: once
    assert key_counts(state, {"K2"}, 3) == {"K1": 1, None: 2}


def test_pick_key_without_keys_is_none(clock: Clock) -> None:
    assert DeploymentState(dep("plain"), SETTINGS, clock).pick_key(set()) is None


def test_pick_key_spreads_evenly_over_the_usable_keys(clock: Clock) -> None:
    state = keyed(clock, "K1", "K2", "K3")
    trip(state.keys[0])  # K1 is broken for every request, not just one
    counts = key_counts(state, set(), 3000)
    assert abs(counts["K2"] / 3000 - 0.5) <= 0.05
    assert abs(counts["K3"] / 3000 - 0.5) <= 0.05


def test_a_provider_key_never_shows_its_secret(clock: Clock) -> None:
    key = ProviderKey("OPENAI_KEY_2", secret="sk-live-abc123")
    assert "sk-live-abc123" not in repr(key) and "sk-live-abc123" not in str(key)
    assert "OPENAI_KEY_2" in repr(key)
    assert key == ProviderKey("OPENAI_KEY_2", secret="other")  # compared by name only
    deployment = dep("keyed", keys=(key,))
    assert "sk-live-abc123" not in repr(deployment)
    state = DeploymentState(deployment, SETTINGS, clock)
    assert "sk-live-abc123" not in repr(state.describe())
    assert state.describe()["keys"] == [{"key": "OPENAI_KEY_2", "breaker": CLOSED,
                                         "failures": 0, "last_error": None}]


# --- classify ------------------------------------------------------------------------------


def err(status: int, message: str = "upstream said no", *, error_type: str | None = None,
        retry_after: str | None = None) -> UpstreamError:
    return UpstreamError(status, message, provider="openai", error_type=error_type,
                         retry_after=retry_after)


DEFAULT_RETRY_ON = RetryPolicy().retry_on


@pytest.mark.parametrize("status", [401, 402, 403])
def test_auth_and_billing_failures_are_the_keys_fault(status: int) -> None:
    assert classify(err(status, "Incorrect API key provided"), DEFAULT_RETRY_ON) == AUTH
    assert classify(err(status), frozenset()) == AUTH  # whatever retry_on says


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 529])
def test_overload_and_server_errors_are_retryable(status: int) -> None:
    assert classify(err(status, retry_after="3"), DEFAULT_RETRY_ON) == RETRYABLE


@pytest.mark.parametrize(("status", "kind"), [(502, "connection_error"), (504, "timeout")])
def test_connection_errors_and_timeouts_are_retryable_by_kind(status: int, kind: str) -> None:
    error = err(status, "Could not reach provider 'openai'", error_type=kind)
    assert classify(error, DEFAULT_RETRY_ON) == RETRYABLE
    assert classify(error, frozenset({kind})) == RETRYABLE  # by its kind, not its status
    assert classify(error, frozenset({status})) == RETRYABLE
    assert classify(error, frozenset()) == FATAL


@pytest.mark.parametrize(("status", "message", "kind"), [
    (400, ("This model's maximum context length is 8192 tokens. However, your messages "
           "resulted in 9000 tokens."), "invalid_request_error"),
    (400, "prompt is too long: 210000 tokens > 200000 maximum", "invalid_request_error"),
    (400, "Please reduce the length of the messages.", "context_length_exceeded"),
    (400, ("The input token count (1200000) exceeds the maximum number of tokens allowed "
           "(1048576)."), "INVALID_ARGUMENT"),
    (413, "prompt is too long: 210000 tokens > 200000 maximum", "request_too_large"),
])
def test_context_window_errors(status: int, message: str, kind: str) -> None:
    assert classify(err(status, message, error_type=kind), DEFAULT_RETRY_ON) == CONTEXT_WINDOW


@pytest.mark.parametrize(("message", "kind"), [
    ("Your request was rejected as a result of our safety system.", "content_policy_violation"),
    (("The response was filtered due to the prompt triggering Azure OpenAI's content "
      "management policy. Please modify your prompt and retry."), None),
    ("filtered", "content_filter"),
])
def test_content_policy_errors(message: str, kind: str | None) -> None:
    assert classify(err(400, message, error_type=kind), DEFAULT_RETRY_ON) == CONTENT_POLICY


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_client_errors_are_the_callers(status: int) -> None:
    error = err(status, "Invalid value for 'temperature'", error_type="invalid_request_error")
    assert classify(error, DEFAULT_RETRY_ON) == CALLER


def test_context_words_in_a_server_error_do_not_make_it_a_context_window_error() -> None:
    error = err(500, "maximum context length lookup failed", error_type="server_error")
    assert classify(error, DEFAULT_RETRY_ON) == RETRYABLE


def test_a_status_left_out_of_retry_on_is_fatal() -> None:
    retry_on = frozenset(DEFAULT_RETRY_ON - {500})
    assert classify(err(500), retry_on) == FATAL
    assert classify(err(502), retry_on) == RETRYABLE
    assert classify(err(429), frozenset()) == CALLER  # a 4xx nobody retries is answered as is


# --- parse_retry_after ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("0.5", 0.5), ("0", 0.0), ("3600", 3600.0), ("-3", 0.0),
    ("soon", None), ("7s", None), ("", None), (None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: no wait
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_reads_an_http_date() -> None:
    value = email.utils.formatdate(time.time() + 10, usegmt=True)
    seconds = parse_retry_after(value)
    assert seconds is not None and abs(seconds - 10) <= 2
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    far_s = parse_retry_after(far)  # as asked: the layer caps only the cool-down
    assert far_s is not None and abs(far_s - 3600) <= 2
    naive = email.utils.formatdate(time.time() + 10, localtime=False).replace("+0000", "-0000")
    assert parse_retry_after(naive) is None  # no zone: unreadable, not guessed


@pytest.mark.parametrize("value", ["Wed, 21 Oct 2015 99999999999999999999:00:00 GMT",
                                   "Wed, 21 Oct 2015 07:28:00 +99999999999999999999"])
def test_parse_retry_after_treats_an_overflowing_date_as_unreadable(value: str) -> None:
    assert parse_retry_after(value) is None


# --- Route and RetryPolicy -----------------------------------------------------------------


def test_route_defaults_and_normalisation() -> None:
    route = Route(fallbacks=["gpt-4o-mini"], context_window_fallbacks=["claude"])  # type: ignore[arg-type]
    assert route.strategy == "weighted"
    assert route.fallbacks == ("gpt-4o-mini",) and route.context_window_fallbacks == ("claude",)
    assert Route(hedge_after_s=0.5, ttft_timeout_s=2).hedge_after_s == 0.5
    policy = RetryPolicy(retry_on={500, "timeout"})  # type: ignore[arg-type]
    assert policy.retry_on == frozenset({500, "timeout"})


@pytest.mark.parametrize("name", ["fallbacks", "context_window_fallbacks",
                                  "content_policy_fallbacks"])
def test_fallbacks_given_as_one_string_are_refused(name: str) -> None:
    # A TypeError today; a ValueError would do as well (both say what is wrong).
    with pytest.raises((TypeError, ValueError), match=f"Route.{name} must be a list"):
        Route(**{name: "gpt-4o-mini"})  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "match"), [
    ({"strategy": "round-robin"}, "unknown strategy 'round-robin'"),
    ({"hedge_after_s": 0}, "Route.hedge_after_s must be a positive"),
    ({"hedge_after_s": -1.0}, "Route.hedge_after_s must be a positive"),
    ({"hedge_after_s": float("nan")}, "Route.hedge_after_s must be a positive"),
    ({"ttft_timeout_s": 0.0}, "Route.ttft_timeout_s must be a positive"),
])
def test_bad_routes(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Route(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"max_attempts": 0}, {"max_attempts": -1}, {"max_attempts": 2.5}, {"deadline_s": 0},
    {"backoff_base_s": -0.1}, {"backoff_cap_s": -1}, {"budget_ratio": -0.1},
    {"budget_window_s": 0}, {"budget_min_per_s": -1},
])
def test_bad_retry_policies(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**fields)  # type: ignore[arg-type]
