"""The quota layer's pure part: the rate-limit headers, from planned checks and a decision."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config import Deployment, Model
from gateway.context import OPENAI_CHAT, RequestContext, Usage
from gateway.policy import (
    AMOUNT_MAX,
    BUDGET,
    CONCURRENT,
    LIMIT_MAX,
    REQUESTS,
    TOKENS,
    Budget,
    Check,
    Decision,
    Limits,
    Principal,
    micros_to_usd,
)
from gateway.pricing import Price, cost_micros, estimate_micros
from middleware.quota.plan import (
    Estimate,
    Planned,
    Templated,
    estimate,
    planned_from,
    rate_limit_headers,
    reservation_price,
    template,
    templated,
)
from tests.gateway.test_pricing import dated_table


def planned(kind: str, key: str, limit: int) -> Planned:
    return Planned(Check(kind, key, limit, 1), "key", "k1", Limits())


def test_headers_name_the_tightest_limit_of_each_kind_with_openai_reset_formats() -> None:
    checks = [planned(REQUESTS, "a:rpm", 100), planned(REQUESTS, "b:rpm", 50),
              planned(TOKENS, "a:tpm", 10_000), planned(BUDGET, "a:budget", 5_000_000)]
    decision = Decision(allowed=True, remaining=(90, 7, 9_000, 1_234_567),
                        reset_s=(0.25, 3723.2, 61.0, 86_400.0))
    assert rate_limit_headers(checks, decision) == [
        (b"x-ratelimit-limit-requests", b"50"),  # the tighter of the two request limits
        (b"x-ratelimit-remaining-requests", b"7"),
        (b"x-ratelimit-reset-requests", b"1h2m4s"),  # 3723.2 s, rounded up
        (b"x-ratelimit-limit-tokens", b"10000"),
        (b"x-ratelimit-remaining-tokens", b"9000"),
        (b"x-ratelimit-reset-tokens", b"1m1s"),
        (b"x-sluicegate-budget-remaining", b"1.234567"),
    ]


def test_reset_below_a_second_is_in_milliseconds_and_never_negative() -> None:
    checks = [planned(REQUESTS, "a:rpm", 100), planned(TOKENS, "a:tpm", 10)]
    for reset, text in ((0.2509, b"250ms"), (6e-07, b"0ms"), (-0.5, b"0ms"), (0.0, b"0ms"),
                        (1.0, b"1s"), (59.01, b"1m0s")):
        decision = Decision(allowed=True, remaining=(1, 2), reset_s=(reset, reset))
        headers = dict(rate_limit_headers(checks, decision))
        assert headers[b"x-ratelimit-reset-requests"] == text
        assert headers[b"x-ratelimit-reset-tokens"] == text


def test_an_overdrawn_budget_shows_zero_left() -> None:
    decision = Decision(allowed=True, remaining=(-40,), reset_s=(10.0,))
    assert rate_limit_headers([planned(BUDGET, "a:budget", 10)], decision) == [
        (b"x-sluicegate-budget-remaining", b"0.000000")]


def test_a_templated_list_gives_the_headers_a_plain_list_gives() -> None:
    """The kinds' indexes are kept in the template's memo: the tightest limit is still the
    one this decision says, request after request, and each reset is formatted afresh."""
    plain = [planned(REQUESTS, "a:rpm", 100), planned(REQUESTS, "b:rpm", 50),
             planned(TOKENS, "a:tpm", 10_000), planned(BUDGET, "a:budget", 500),
             planned(BUDGET, "b:budget", 900)]
    memo: dict[object, object] = {}
    decisions = [((90, 7, 9_000, 400, 800), (0.25, 3723.2, 61.0, 9.0, 9.0)),
                 ((3, 40, 8_000, 450, 20), (1.5, 0.002, 0.0, 9.0, 9.0)),
                 ((5, 5, 7_000, -1, 300), (0.25, 0.75, 59.01, 9.0, 9.0))]
    for remaining, reset_s in decisions + decisions:
        decision = Decision(allowed=True, remaining=remaining, reset_s=reset_s)
        assert rate_limit_headers(templated(plain, memo), decision) == \
            rate_limit_headers(list(plain), decision)
    first = dict(rate_limit_headers(templated(plain, memo), Decision(
        allowed=True, remaining=decisions[1][0], reset_s=decisions[1][1])))
    assert first[b"x-ratelimit-remaining-requests"] == b"3"  # a:rpm is the tighter now
    assert first[b"x-ratelimit-reset-requests"] == b"2s"
    assert first[b"x-sluicegate-budget-remaining"] == b"0.000020"
    assert memo  # the indexes were kept


def test_a_templated_list_made_without_a_memo_works_as_a_plain_list() -> None:
    items = [planned(REQUESTS, "a:rpm", 5), planned(REQUESTS, "b:rpm", 3)]
    bare = Templated(items)  # list's own constructor: no memo set
    decision = Decision(allowed=True, remaining=(4, 1), reset_s=(0.5, 2.0))
    assert rate_limit_headers(bare, decision) == rate_limit_headers(items, decision)


def test_each_request_gets_its_own_checks_and_the_templates_planned_list() -> None:
    """The Planned list is the template's (the same object for every request, amounts 0);
    the checks carry this request's amounts: 1 request, its tokens, its cost, 1 lease."""
    limits = Limits(rpm=10, tpm=1_000, max_concurrent=2, budgets=(Budget("5"),))
    applicable = [("key", "k1", limits)]
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    planned, checks = planned_from(template(applicable, now, 900.0), Estimate(30, 70, 1_234))
    again, other = planned_from(template(applicable, now, 900.0), Estimate(5, 0, 7))
    assert again is planned and other is not checks
    assert [c.kind for c in checks] == [p.check.kind for p in planned] == \
        [REQUESTS, TOKENS, CONCURRENT, BUDGET]
    assert [c.amount for c in checks] == [1, 100, 1, 1_234]
    assert [c.amount for c in other] == [1, 5, 1, 7]
    assert [p.check.amount for p in planned] == [0, 0, 0, 0]
    assert [c.key for c in checks] == [p.check.key for p in planned] == \
        ["key:k1:rpm", "key:k1:tpm", "key:k1:concurrent", "key:k1:budget:monthly:2026-11"]
    assert checks.memo is planned.memo is not None


def test_the_output_bound_is_the_requests_cap_times_its_choices_else_the_default() -> None:
    from gateway.context import (
        ANTHROPIC_MESSAGES,
        OPENAI_CHAT,
        OPENAI_EMBEDDINGS,
        OPENAI_RESPONSES,
        RequestContext,
    )
    from middleware.quota.plan import output_bound

    def bound(body: dict[str, object], operation: str = OPENAI_CHAT) -> int:
        ctx = RequestContext(request_id="r", operation=operation, api_format="openai",
                             body=body, raw_body=b"", model="m", stream=False)
        return output_bound(ctx, 4096)

    assert bound({}) == 4096
    assert bound({"max_tokens": 100}) == 100
    # Both chat caps: the translators read the first, a server may read the other.
    assert bound({"max_completion_tokens": 50, "max_tokens": 100}) == 100
    assert bound({"max_completion_tokens": 100, "max_tokens": 50}) == 100
    # Another API's cap is read by nobody downstream: it bounds nothing.
    assert bound({"max_output_tokens": 70}) == 4096
    assert bound({"max_output_tokens": 70}, OPENAI_RESPONSES) == 70
    assert bound({"max_tokens": 70, "max_output_tokens": 5}, OPENAI_RESPONSES) == 5
    assert bound({"max_tokens": 70}, OPENAI_RESPONSES) == 4096
    assert bound({"max_tokens": 100_000, "max_completion_tokens": 1},
                 ANTHROPIC_MESSAGES) == 100_000
    # A float that is an integer is that integer (a server taking the body as it came may
    # read it so); other floats are no cap.
    assert bound({"max_tokens": 100_000.0}) == 100_000
    assert bound({"max_tokens": 10.0, "n": 3.0}) == 30
    assert bound({"max_tokens": 10.5}) == bound({"max_tokens": float("inf")}) == 4096
    assert bound({"max_tokens": 1e20}) == 2 ** 53
    assert bound({"max_tokens": 0}) == bound({"max_tokens": True}) == 4096
    assert bound({"max_tokens": "100"}) == bound({"max_tokens": None}) == 4096
    assert bound({"n": 3}) == 3 * 4096
    assert bound({"max_tokens": 10, "n": 2}) == 20
    assert bound({"max_tokens": 10, "n": 0}) == bound({"max_tokens": 10, "n": False}) == 10

    # A legacy completion: every prompt of a batch and every best_of candidate is generated.
    from gateway.context import OPENAI_COMPLETIONS
    assert bound({"prompt": "one", "max_tokens": 30}, OPENAI_COMPLETIONS) == 30
    assert bound({"prompt": ["a b"] * 40, "max_tokens": 30}, OPENAI_COMPLETIONS) == 40 * 30
    assert bound({"prompt": [[1, 2], [3]], "max_tokens": 5}, OPENAI_COMPLETIONS) == 10
    assert bound({"prompt": [1, 2, 3], "max_tokens": 5}, OPENAI_COMPLETIONS) == 5  # (one)
    assert bound({"prompt": "x", "max_tokens": 5, "best_of": 4, "n": 2},
                 OPENAI_COMPLETIONS) == 20
    # Without max_tokens, the Completions API's own default, 16 (not the gateway's 4096).
    assert bound({"prompt": ["x", "y"], "n": 3}, OPENAI_COMPLETIONS) == 2 * 3 * 16
    assert bound({"prompt": "x", "best_of": 5, "n": 2}, OPENAI_COMPLETIONS) == 5 * 16
    assert bound({"prompt": "x", "max_tokens": None}, OPENAI_COMPLETIONS) == 16
    assert bound({"max_tokens": 300}, ANTHROPIC_MESSAGES) == 300
    assert bound({"max_tokens": 10}, OPENAI_EMBEDDINGS) == 0


def test_a_template_of_one_limit_per_kind_gives_the_loops_headers() -> None:
    """Such a template's headers come from code made for it once (the limit pairs ready,
    the counts and resets formatted per decision): the same bytes as the plain list's loop,
    for every reset format and for an overdrawn budget."""
    plain = [planned(TOKENS, "a:tpm", 10_000), planned(CONCURRENT, "a:concurrent", 4),
             planned(REQUESTS, "a:rpm", 100), planned(BUDGET, "a:budget", 500)]
    memo: dict[object, object] = {}
    resets = (0.0, 6e-07, 0.2509, 0.999, 1.0, 59.01, 3723.2, -0.5, 86_400.0)
    for number, reset in enumerate(resets):
        remaining = (9_000 - number, 3, 99 - number, 450 - 100 * number)
        decision = Decision(allowed=True, remaining=remaining,
                            reset_s=(reset, 1.0, resets[-1 - number], 9.0))
        made = rate_limit_headers(templated(plain, memo), decision)
        assert made == rate_limit_headers(list(plain), decision)
        assert dict(made)[b"x-ratelimit-remaining-requests"] == b"%d" % (99 - number)
    assert memo  # the maker was kept
    only_budget = [planned(BUDGET, "a:budget", 500)]
    decision = Decision(allowed=True, remaining=(-3,), reset_s=(5.0,))
    assert rate_limit_headers(templated(only_budget, {}), decision) == \
        [(b"x-sluicegate-budget-remaining", b"0.000000")]
    no_limits: list[Planned] = [planned(CONCURRENT, "a:concurrent", 4)]
    assert rate_limit_headers(templated(no_limits, {}), Decision(
        allowed=True, remaining=(2,), reset_s=(1.0,))) == []


def test_limits_past_what_redis_counts_exactly_are_refused_at_startup() -> None:
    # Redis's Lua holds numbers as doubles: past 2**53 it would admit what the in-process
    # store refuses (a budget of 2**53 micro-dollars took a reservation of 2**53 + 1).
    assert LIMIT_MAX < AMOUNT_MAX < 2 ** 53
    for name in ("rpm", "tpm", "max_concurrent"):
        assert getattr(Limits(**{name: LIMIT_MAX}), name) == LIMIT_MAX
        with pytest.raises(ValueError, match=f"{name} must be a whole number from 0 to "):
            Limits(**{name: LIMIT_MAX + 1})
    assert Budget(micros_to_usd(LIMIT_MAX)).limit_micros == LIMIT_MAX
    with pytest.raises(ValueError, match="limit_usd can be at most 4503599627.370496"):
        Budget(micros_to_usd(LIMIT_MAX + 1))


def test_a_reservation_for_any_max_tokens_stays_where_both_stores_count_exactly() -> None:
    ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai",
                         body={"messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 2 ** 62, "n": 4},
                         raw_body=b"{}", model="gpt-mock", stream=False)
    reserved = estimate(ctx, 4096)
    assert reserved.output_tokens == LIMIT_MAX  # more than any limit, as 2**64 would be
    assert reserved.tokens <= AMOUNT_MAX

def test_the_quota_layer_reserves_at_the_price_in_force_when_the_request_starts(
        tmp_path: Path) -> None:
    table = dated_table(tmp_path)  # (1 until 2026, 3 from 2026-01-01, 5 from 2026-06-01)
    resolved = table.lookup("acme", "m", at=datetime(2025, 12, 31, tzinfo=UTC))
    model = Model([Deployment("p", "m", price=resolved)])

    def reserved_input_price(when: datetime) -> Decimal:
        ctx = RequestContext(request_id="r", operation="openai.chat", api_format="openai",
                             body={}, raw_body=b"", model="m", stream=False,
                             models={"m": model}, started_at=when.timestamp())
        found = reservation_price(ctx)
        assert found is not None
        return found.input_per_mtok

    assert reserved_input_price(datetime(2025, 12, 31, 23, tzinfo=UTC)) == 1
    assert reserved_input_price(datetime(2026, 1, 2, tzinfo=UTC)) == 3  # (past its memo)
    assert reserved_input_price(datetime(2026, 6, 2, tzinfo=UTC)) == 5


# A model's deployments (or its fallbacks) priced each dearer in some part: cheaper output
# and dearer input, cache reads, writes and reasoning, long-context tiers from different
# thresholds.
RIVALS = {
    "output": Price("1", "8"),
    "input": Price("6", "2"),  # (cheaper output: ranked below "output", and reserved so)
    "cache": Price("1", "1", cached_input_per_mtok="3", cache_write_per_mtok="9",
                   cache_write_1h_per_mtok="12", reasoning_per_mtok="20"),
    "long": Price("2", "3", long_context_threshold=100, long_context=Price("7", "9")),
    "later-long": Price("1", "2", long_context_threshold=1000,
                        long_context=Price("4", "30")),
}
USAGES = [Usage(input_tokens, output_tokens, cached, reasoning, written, written_1h)
          for input_tokens, output_tokens in ((5000, 1), (50, 1), (1, 50), (50, 5000),
                                              (500, 20), (2000, 2000))
          for cached, reasoning, written, written_1h in ((0, 0, 0, 0), (20, 0, 0, 0),
                                                         (0, 1, 20, 10), (10, 0, 30, 0))]


def reserved_price(prices: dict[str, Price], fallbacks: dict[str, Price] | None = None
                   ) -> Price:
    models = {"m": Model([Deployment("p", name, price=price) for name, price in prices.items()]),
              **{name: Model([Deployment("p", name, price=price)])
                 for name, price in (fallbacks or {}).items()}}
    ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai", body={},
                         raw_body=b"", model="m", stream=False, models=models,
                         principal=Principal(key_id="k", project="p"))
    routes = tuple(fallbacks or ())  # (one tuple per model, as the quota layer keeps them)
    found = reservation_price(ctx, routes)
    assert found is not None
    assert reservation_price(ctx, routes) is found  # (remembered)
    return found


@pytest.mark.parametrize("names", [("output", "input"), ("input", "output"), tuple(RIVALS),
                                   ("cache", "output"), ("long", "later-long", "input")])
def test_the_reservation_is_priced_at_least_as_dear_as_any_deployment_for_any_request(
        names: tuple[str, ...]) -> None:
    # Ranked by output price, then input, the dearest was "output" ($1 in, $8 out): a
    # request of 5,000 input tokens and one output token was reserved 5,008 micro-dollars,
    # and billed 30,002 on "input" ($6 in, $2 out).
    candidates = {name: RIVALS[name] for name in names}
    for reserved in (reserved_price(candidates),
                     reserved_price({names[0]: RIVALS[names[0]]},
                                    {name: RIVALS[name] for name in names[1:]})):
        for usage in USAGES:
            dearest = max(cost_micros(price, usage) for price in candidates.values())
            assert cost_micros(reserved, usage) >= dearest, (names, usage)
            assert estimate_micros(reserved, usage.input_tokens, usage.output_tokens) >= max(
                estimate_micros(price, usage.input_tokens, usage.output_tokens)
                for price in candidates.values())


def test_a_price_dearest_in_every_part_is_reserved_itself() -> None:
    cheaper = Price("1", "2")
    dearer = Price("3", "4", cached_input_per_mtok="3")
    assert reserved_price({"a": cheaper, "b": dearer}) is dearer
    assert reserved_price({"a": cheaper}, {"b": dearer}) is dearer
    mixed = reserved_price({"a": RIVALS["output"], "b": RIVALS["input"]})
    assert (mixed.input_per_mtok, mixed.output_per_mtok) == (6, 8)
