"""The price table and the cost arithmetic, without ASGI: exact micro-dollars, tiers, dates."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import FrozenInstanceError
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Deployment
from gateway.context import RequestContext, Usage
from gateway.pricing import (
    FREE,
    Price,
    PriceTable,
    billed_micros,
    billed_usage,
    call_cost_micros,
    cost_micros,
    estimate_micros,
    in_force,
    resolve_price,
    vendor_for_provider_type,
    writes_cost_more,
)

SHIPPED = Path(__file__).resolve().parents[2] / "gateway" / "prices.json"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ONE = {"input_per_mtok": "1", "output_per_mtok": "1"}
PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "reasoning_per_mtok",
              "cache_write_per_mtok", "cache_write_1h_per_mtok")


def price(input_per_mtok: str, output_per_mtok: str, **extra: Any) -> Price:
    return Price(input_per_mtok=Decimal(input_per_mtok), output_per_mtok=Decimal(output_per_mtok),
                 **extra)


def write_table(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(document))
    return path


def one_model(models: dict[str, Any], vendor: str = "acme") -> dict[str, Any]:
    return {"vendors": {vendor: {"source": "https://acme.example/pricing", "models": models}}}


# --- arithmetic ---------------------------------------------------------------------------


def test_cost_is_tokens_times_price_per_million_in_micro_dollars() -> None:
    # 1,000 tokens at $2.50/M = $0.0025 = 2,500 micros; 500 at $10/M = 5,000 micros.
    usage = Usage(input_tokens=1_000, output_tokens=500)
    assert cost_micros(price("2.50", "10.00"), usage) == 7_500


def test_cached_and_reasoning_tokens_are_split_out_of_their_totals() -> None:
    p = price("3", "15", cached_input_per_mtok=Decimal("0.30"), reasoning_per_mtok=Decimal(20))
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cached_input_tokens=4_000,
                  reasoning_tokens=500)
    # 6,000 x 3 + 4,000 x 0.30 + 1,500 x 15 + 500 x 20
    assert cost_micros(p, usage) == 18_000 + 1_200 + 22_500 + 10_000


def test_missing_cached_and_reasoning_prices_bill_as_input_and_output() -> None:
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cached_input_tokens=4_000,
                  reasoning_tokens=500)
    assert cost_micros(price("3", "15"), usage) == 10_000 * 3 + 2_000 * 15


def test_prompt_cache_writes_bill_at_their_own_rates_by_how_long_they_are_kept() -> None:
    # Claude Sonnet 4: $3 input, $0.30 cache reads, $3.75 5-minute writes, $6 1-hour writes.
    p = price("3", "15", cached_input_per_mtok=Decimal("0.30"),
              cache_write_per_mtok=Decimal("3.75"), cache_write_1h_per_mtok=Decimal(6))
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_input_tokens=2_000,
                  cache_write_tokens=5_000, cache_write_1h_tokens=1_000)
    # 3,000 fresh x 3 + 2,000 x 0.30 + 4,000 x 3.75 + 1,000 x 6 + 1,000 x 15
    assert cost_micros(p, usage) == 9_000 + 600 + 15_000 + 6_000 + 15_000
    # The same on a rate finer than the integer path takes (Decimal arithmetic).
    fine = dataclasses.replace(p, output_per_mtok=Decimal("15.0000000001"))
    assert cost_micros(fine, usage) == 9_000 + 600 + 15_000 + 6_000 + 15_001


def test_missing_cache_write_prices_fall_back_to_input_then_to_the_5_minute_rate() -> None:
    usage = Usage(input_tokens=10_000, cache_write_tokens=4_000, cache_write_1h_tokens=1_000)
    assert cost_micros(price("3", "15"), usage) == 30_000
    p = price("3", "15", cache_write_per_mtok=Decimal("3.75"))
    assert cost_micros(p, usage) == 6_000 * 3 + 4_000 * Decimal("3.75")


def test_cache_writes_beyond_their_totals_are_clamped() -> None:
    p = price("1", "1", cached_input_per_mtok=Decimal("0.5"), cache_write_per_mtok=Decimal(2),
              cache_write_1h_per_mtok=Decimal(4))
    # 10 input, 6 read: at most 4 can have been written, and at most those for an hour.
    usage = Usage(input_tokens=10, cached_input_tokens=6, cache_write_tokens=9,
                  cache_write_1h_tokens=20)
    assert cost_micros(p, usage) == 6 * Decimal("0.5") + 4 * 4
    negative = Usage(input_tokens=10, cache_write_tokens=-4, cache_write_1h_tokens=-1)
    assert cost_micros(p, negative) == 10


def test_anthropic_usage_says_what_was_written_and_for_how_long() -> None:
    usage = Usage.from_anthropic({
        "input_tokens": 50, "cache_read_input_tokens": 2_000,
        "cache_creation_input_tokens": 3_000, "output_tokens": 7,
        "cache_creation": {"ephemeral_5m_input_tokens": 2_000,
                           "ephemeral_1h_input_tokens": 1_000}})
    assert usage == Usage(input_tokens=5_050, output_tokens=7, cached_input_tokens=2_000,
                          cache_write_tokens=3_000, cache_write_1h_tokens=1_000)
    # (an older API version: the total alone, all of it 5-minute writes)
    assert Usage.from_anthropic({"input_tokens": 1, "cache_creation_input_tokens": 9}) == \
        Usage(input_tokens=10, cache_write_tokens=9)
    # OpenAI's shape of the same (the Anthropic translation's, some routers')
    assert Usage.from_openai({"prompt_tokens": 10, "completion_tokens": 1,
                              "prompt_tokens_details": {"cached_tokens": 2,
                                                        "cache_write_tokens": 3}}) == \
        Usage(input_tokens=10, output_tokens=1, cached_input_tokens=2, cache_write_tokens=3)


def test_reasoning_counted_beside_the_completion_is_billed_as_output() -> None:
    # xAI (Grok) chat usage: reasoning is not in completion_tokens; the total adds it on
    # (a real grok-4.20 reasoning answer's numbers: 10120 + 1499 + 2809 = 14428).
    grok = {"prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
            "prompt_tokens_details": {"cached_tokens": 128},
            "completion_tokens_details": {"reasoning_tokens": 2809}}
    assert Usage.from_openai(grok) == Usage(input_tokens=10120, output_tokens=4308,
                                            cached_input_tokens=128, reasoning_tokens=2809)
    # without a total: reasoning a completion could not hold (grok-3-mini: 2 and 317)
    assert Usage.from_openai({"prompt_tokens": 12, "completion_tokens": 2,
                              "completion_tokens_details": {"reasoning_tokens": 317}}
                             ).output_tokens == 319
    # OpenAI's own: reasoning is a part of the completion, with or without a total
    for total in ({"total_tokens": 110}, {}):
        assert Usage.from_openai({"prompt_tokens": 10, "completion_tokens": 100, **total,
                                  "completion_tokens_details": {"reasoning_tokens": 60}}
                                 ) == Usage(input_tokens=10, output_tokens=100,
                                            reasoning_tokens=60)


def test_deepseeks_own_cache_hit_count_is_read_when_the_openai_one_is_missing() -> None:
    usage = Usage.from_openai({"prompt_tokens": 100_000, "completion_tokens": 10,
                               "prompt_cache_hit_tokens": 90_000,
                               "prompt_cache_miss_tokens": 10_000})
    assert usage is not None and usage.cached_input_tokens == 90_000
    both = Usage.from_openai({"prompt_tokens": 100, "completion_tokens": 1,
                              "prompt_cache_hit_tokens": 64,
                              "prompt_tokens_details": {"cached_tokens": 64}})
    assert both is not None and both.cached_input_tokens == 64


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -5, "completion_tokens": 10},
    {"prompt_tokens": 5, "completion_tokens": 10,
     "completion_tokens_details": {"reasoning_tokens": -3}},
    {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": -1}},
    {"prompt_tokens": "n/a", "completion_tokens": 1},
])
def test_openai_usage_that_cannot_be_a_bill_is_unreadable(usage: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Usage.from_openai(usage)


@pytest.mark.parametrize("usage", [
    {"input_tokens": -50, "cache_read_input_tokens": 100, "output_tokens": 1},
    {"input_tokens": 5, "output_tokens": -1},
    {"input_tokens": 5, "cache_creation_input_tokens": 9, "output_tokens": 1,
     "cache_creation": {"ephemeral_5m_input_tokens": -2, "ephemeral_1h_input_tokens": 4}},
    {"input_tokens": 1e300, "output_tokens": 1},
    {"input_tokens": 5, "output_tokens": True},
    {"input_tokens": 5, "output_tokens": 2.5},
    {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 2**40},
])
def test_anthropic_usage_with_a_count_that_is_no_count_is_unreadable(usage: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Usage.from_anthropic(usage)


def test_rounds_up_once_at_the_end_never_per_bucket() -> None:
    p = price("0.3", "0.3", cached_input_per_mtok=Decimal("0.3"))
    usage = Usage(input_tokens=2, output_tokens=1, cached_input_tokens=1)
    assert cost_micros(p, usage) == 1  # 0.9 micros; rounding each bucket would give 3


def test_rounds_fractions_up_and_leaves_whole_amounts_alone() -> None:
    assert cost_micros(price("0.15", "0.60"), Usage(input_tokens=1, output_tokens=1)) == 1
    assert cost_micros(price("0.15", "0.60"), Usage(input_tokens=100)) == 15
    assert cost_micros(price("0.15", "0.60"), Usage(input_tokens=101)) == 16  # 15.15 -> 16


def test_large_counts_stay_exact() -> None:
    usage = Usage(input_tokens=10**12, output_tokens=3)
    assert cost_micros(price("0.000001", "1000000"), usage) == 1_000_000 + 3_000_000


def test_long_context_tier_applies_only_above_the_threshold() -> None:
    p = price("1.25", "10", long_context_threshold=200_000, long_context=price("2.50", "15"))
    at_threshold = Usage(input_tokens=200_000, output_tokens=1_000)
    above = Usage(input_tokens=200_001, output_tokens=1_000)
    assert cost_micros(p, at_threshold) == 250_000 + 10_000
    assert cost_micros(p, above) == 500_003 + 15_000  # 500,002.5 rounds up with the total


def test_long_context_tier_counts_cached_tokens_towards_the_threshold() -> None:
    long = price("2", "4", cached_input_per_mtok=Decimal(1))
    p = price("1", "2", long_context_threshold=100, long_context=long)
    usage = Usage(input_tokens=150, cached_input_tokens=100, output_tokens=10)
    assert cost_micros(p, usage) == 50 * 2 + 100 * 1 + 10 * 4


def test_inconsistent_counts_are_clamped_instead_of_billing_negative() -> None:
    p = price("1", "1", cached_input_per_mtok=Decimal("0.5"), reasoning_per_mtok=Decimal(3))
    usage = Usage(input_tokens=10, cached_input_tokens=50, output_tokens=4, reasoning_tokens=9)
    assert cost_micros(p, usage) == 10 * Decimal("0.5") + 4 * 3
    negative = Usage(input_tokens=-5, cached_input_tokens=-3, output_tokens=4, reasoning_tokens=-1)
    assert cost_micros(p, negative) == 4


def test_estimate_bills_plain_input_and_output() -> None:
    assert estimate_micros(price("2.50", "10.00"), 1_000, 500) == 7_500
    assert estimate_micros(price("0.15", "0.60"), 1, 0) == 1


def test_estimate_is_the_cost_of_the_same_usage_on_every_price_form() -> None:
    """The estimate takes a shortcut past Usage; it must round exactly as cost_micros does,
    on integer-scalable rates, rates finer than that, long-context tiers and bad counts."""
    long = price("5", "20")
    prices = [price("2.50", "10.00"), price("0.15", "0.60"), FREE,
              price("0.0000000001", "0.3333333333333"),  # finer than a nano-micro-dollar
              price("1.25", "5", long_context_threshold=1000, long_context=long)]
    counts = [0, 1, 7, 999, 1000, 1001, 123_457, 10**9, -3]
    for p in prices:
        for input_tokens in counts:
            for output_tokens in counts:
                expected = cost_micros(p, Usage(input_tokens=input_tokens,
                                                output_tokens=output_tokens))
                assert estimate_micros(p, input_tokens, output_tokens) == expected, \
                    (p, input_tokens, output_tokens)


def test_estimate_is_a_bound_for_prompt_cache_writes_and_reasoning() -> None:
    # (reserved at the plain rates, a request writing a 50k-token prompt to Anthropic's
    # 1-hour cache was billed twice its reservation: a budget near its cap overspent by it)
    claude = price("3", "15", cache_write_per_mtok=Decimal("3.75"),
                   cache_write_1h_per_mtok=Decimal(6), reasoning_per_mtok=Decimal(20))
    assert estimate_micros(claude, 50_000, 100) == 50_000 * 3 + 100 * 20  # (micro-dollars)
    assert estimate_micros(claude, 50_000, 100, cache_writes=True) == \
        cost_micros(claude, Usage(input_tokens=50_000, cache_write_tokens=50_000,
                                  cache_write_1h_tokens=50_000, output_tokens=100,
                                  reasoning_tokens=100))
    fine = price("0.0000000001", "0.3333333333333", cache_write_per_mtok=Decimal("0.5"))
    for writes in (False, True):  # (rates finer than a nano-dollar: the same bound)
        every = [cost_micros(fine, Usage(input_tokens=7, output_tokens=3,
                                         cache_write_tokens=7 if written else 0))
                 for written in ({False, writes})]
        assert estimate_micros(fine, 7, 3, cache_writes=writes) == max(every)


def test_a_body_is_searched_for_cache_writes_only_where_a_write_costs_more() -> None:
    # (`plan.estimate` searches the whole body for "cache_control" only where the answer can
    # change the estimate; the answer must then be the one estimate_micros would use)
    plain = price("0.15", "0.60")
    claude = price("3", "15", cache_write_per_mtok=Decimal("3.75"))
    hour_only = price("3", "15", cache_write_1h_per_mtok=Decimal(6))
    cheaper = price("3", "15", cache_write_per_mtok=Decimal(1))
    long_writes = price("1", "2", long_context_threshold=1_000,
                        long_context=price("2", "4", cache_write_per_mtok=Decimal(3)))
    fine = price("0.0000000001", "0.3", cache_write_per_mtok=Decimal("0.5"))
    for p, tokens, expected in ((plain, 10, False), (claude, 10, True), (hour_only, 10, True),
                                (cheaper, 10, False), (long_writes, 1_000, False),
                                (long_writes, 1_001, True), (fine, 10, True)):
        assert writes_cost_more(p, tokens) is expected, (p, tokens)
        if not expected:  # the search it spares could not have changed the estimate
            assert estimate_micros(p, tokens, 50, cache_writes=True) == \
                estimate_micros(p, tokens, 50, cache_writes=False)


def test_free_costs_nothing() -> None:
    usage = Usage(input_tokens=10**9, output_tokens=10**9, cached_input_tokens=5)
    assert cost_micros(FREE, usage) == 0


# --- the Price type -----------------------------------------------------------------------


def test_price_converts_strings_and_ints_to_decimal() -> None:
    loose: dict[str, Any] = {"input_per_mtok": "2.50", "output_per_mtok": 10,
                             "cached_input_per_mtok": "0.25"}
    p = Price(**loose)
    assert (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) == (
        Decimal("2.50"), Decimal(10), Decimal("0.25"))
    assert all(isinstance(v, Decimal) for v in (p.input_per_mtok, p.output_per_mtok))


@pytest.mark.parametrize("field", PRICE_KEYS)
def test_price_rejects_float(field: str) -> None:
    fields: dict[str, Any] = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(1)}
    fields[field] = 0.1
    with pytest.raises(ValueError, match="float"):
        Price(**fields)


@pytest.mark.parametrize("bad", ["-0.01", Decimal(-1), -1, "NaN", "Infinity", "two", True])
def test_price_rejects_negative_non_finite_and_non_numbers(bad: object) -> None:
    with pytest.raises(ValueError):
        Price(input_per_mtok=bad, output_per_mtok=Decimal(1))  # type: ignore[arg-type]


def test_price_needs_threshold_and_long_context_together() -> None:
    with pytest.raises(ValueError):
        price("1", "1", long_context_threshold=10)
    with pytest.raises(ValueError):
        price("1", "1", long_context=price("2", "2"))
    with pytest.raises(ValueError):
        price("1", "1", long_context_threshold=-1, long_context=price("2", "2"))


def test_price_is_immutable() -> None:
    with pytest.raises(FrozenInstanceError):
        FREE.input_per_mtok = Decimal(1)  # type: ignore[misc]


# --- the table ----------------------------------------------------------------------------


def dated_table(tmp_path: Path) -> PriceTable:
    models = {
        "m": {"aliases": ["m-2026-01-01", "m-latest"], "prices": [
            {"effective_from": "2026-06-01", "input_per_mtok": "5", "output_per_mtok": "6"},
            {"input_per_mtok": "1", "output_per_mtok": "2"},
            {"effective_from": "2026-01-01", "input_per_mtok": "3", "output_per_mtok": "4"},
        ]},
        "future": {"prices": [
            {"effective_from": "2026-01-01", "input_per_mtok": "7", "output_per_mtok": "8"}]},
    }
    return PriceTable.from_file(write_table(tmp_path, one_model(models)))


def input_price_at(table: PriceTable, model: str, at: datetime) -> Decimal | None:
    found = table.lookup("acme", model, at=at)
    return None if found is None else found.input_per_mtok


def test_lookup_picks_the_latest_entry_in_force(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    assert input_price_at(table, "m", datetime(2025, 12, 31, 23, 59, tzinfo=UTC)) == 1
    assert input_price_at(table, "m", datetime(2026, 1, 1, tzinfo=UTC)) == 3
    assert input_price_at(table, "m", datetime(2026, 5, 31, 23, 59, tzinfo=UTC)) == 3
    assert input_price_at(table, "m", datetime(2026, 6, 1, tzinfo=UTC)) == 5
    assert input_price_at(table, "m", datetime(2030, 1, 1)) == 5  # naive is taken as UTC


def test_lookup_compares_dates_in_utc(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    berlin_morning = datetime(2026, 6, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert input_price_at(table, "m", berlin_morning) == 3  # still 31 May in UTC


def test_lookup_before_the_first_entry_is_unknown(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    assert input_price_at(table, "future", datetime(2025, 6, 1, tzinfo=UTC)) is None
    assert input_price_at(table, "future", datetime(2026, 6, 1, tzinfo=UTC)) == 7


def test_lookup_defaults_to_now(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    found = table.lookup("acme", "m")
    assert found is not None and found.input_per_mtok == 5


def test_aliases_resolve_to_the_same_entries(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    assert table.lookup("acme", "m-latest", at) == table.lookup("acme", "m", at)
    assert table.lookup("acme", "m-2026-01-01", at) == table.lookup("acme", "m", at)
    assert table.lookup("other", "m-latest", at) is None


def test_unknown_models_and_vendors_are_none(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    assert table.lookup("acme", "nope") is None
    assert table.lookup("acme", "") is None
    assert table.lookup("nope", "m") is None
    assert table.lookup("acme", "M") is None  # ids are exact


def test_vendors_and_models_list_canonical_ids(tmp_path: Path) -> None:
    table = dated_table(tmp_path)
    assert table.vendors() == ["acme"]
    assert table.models("acme") == ["future", "m"]
    assert table.models("nope") == []


def test_file_prices_carry_the_nearest_source_and_the_tier(tmp_path: Path) -> None:
    models = {
        "a": {"prices": [{"input_per_mtok": "1", "output_per_mtok": "2"}]},
        "b": {"source": "https://acme.example/b", "prices": [
            {"input_per_mtok": "1", "output_per_mtok": "2", "cached_input_per_mtok": "0.1",
             "long_context": {"above_input_tokens": 1000, "input_per_mtok": "2",
                              "output_per_mtok": "3"}}]},
    }
    table = PriceTable.from_file(write_table(tmp_path, one_model(models)))
    a, b = table.lookup("acme", "a"), table.lookup("acme", "b")
    assert a is not None and a.source == "https://acme.example/pricing"
    assert b is not None and b.source == "https://acme.example/b"
    assert b.long_context_threshold == 1000
    assert b.long_context == price("2", "3")
    assert cost_micros(b, Usage(input_tokens=1001)) == 2002


@pytest.mark.parametrize(("document", "complaint"), [
    ({"vendors": []}, "vendors must be a JSON object"),
    ({"vendors": {}, "extra": 1}, "unknown key 'extra'"),
    (one_model({"m": {"prices": []}}), "vendors.acme.models.m.prices must be a non-empty list"),
    (one_model({"m": {"prices": [{"input_per_mtok": 0.5, "output_per_mtok": "1"}]}}), "float"),
    (one_model({"m": {"prices": [{"input_per_mtok": "1"}]}}), "output_per_mtok is missing"),
    (one_model({"m": {"prices": [{"input_per_mtok": "-1", "output_per_mtok": "1"}]}}),
     "non-negative"),
    (one_model({"m": {"prices": [{"input": "1", "output_per_mtok": "1"}]}}),
     "unknown key 'input'"),
    (one_model({"m": {"prices": [{"effective_from": "1 May", "input_per_mtok": "1",
                                  "output_per_mtok": "1"}]}}), "YYYY-MM-DD"),
    (one_model({"m": {"prices": [{"input_per_mtok": "1", "output_per_mtok": "1"},
                                 {"input_per_mtok": "2", "output_per_mtok": "2"}]}}),
     "same effective_from"),
    (one_model({"m": {"aliases": ["n"], "prices": [ONE]}, "n": {"prices": [ONE]}}),
     "both a model id and an alias"),
    (one_model({"m": {"prices": [{"input_per_mtok": "1", "output_per_mtok": "1", "long_context": {
        "input_per_mtok": "2", "output_per_mtok": "2"}}]}}), "above_input_tokens"),
])
def test_a_bad_file_is_one_clear_value_error(tmp_path: Path, document: object,
                                              complaint: str) -> None:
    path = write_table(tmp_path, document)
    with pytest.raises(ValueError, match=complaint) as caught:
        PriceTable.from_file(path)
    assert str(caught.value).startswith(str(path))


def test_unreadable_and_malformed_files_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        PriceTable.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"vendors": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        PriceTable.from_file(broken)


# --- vendor mapping and resolution --------------------------------------------------------


@pytest.mark.parametrize(("provider_type", "vendor"), [
    ("openai", "openai"), ("azure", "openai"), ("anthropic", "anthropic"), ("gemini", "gemini"),
    ("mistral", "mistral"), ("deepseek", "deepseek"), ("xai", "xai"), ("groq", "groq"),
    ("openai-compatible", None), ("together", None), ("fireworks", None), ("openrouter", None),
    ("vllm", None), ("ollama", None), ("lmstudio", None), ("mock", None), ("", None),
])
def test_vendor_for_provider_type(provider_type: str, vendor: str | None) -> None:
    assert vendor_for_provider_type(provider_type) == vendor


def test_resolve_price_prefers_explicit_then_free_then_table(tmp_path: Path) -> None:
    table = PriceTable.from_file(write_table(tmp_path, one_model(
        {"gpt-x": {"prices": [{"input_per_mtok": "1", "output_per_mtok": "2"}]}}, vendor="openai")))
    explicit = price("9", "9")
    assert resolve_price("openai", "gpt-x", explicit=explicit, free=True, table=table) is explicit
    assert resolve_price("openai", "gpt-x", free=True, table=table) is FREE
    assert resolve_price("vllm", "anything", free=True, table=table) is FREE
    assert resolve_price("azure", "gpt-x", table=table) == price("1", "2", source=(
        "https://acme.example/pricing"))
    assert resolve_price("openai", "gpt-unknown", table=table) is None
    assert resolve_price("openai-compatible", "gpt-x", table=table) is None


def test_resolve_price_uses_the_shipped_table_by_default() -> None:
    assert resolve_price("anthropic", "claude-haiku-4-5") == PriceTable.default().lookup(
        "anthropic", "claude-haiku-4-5")
    assert resolve_price("anthropic", "claude-haiku-4-5") is not None


# --- the shipped table --------------------------------------------------------------------


def shipped_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SHIPPED.read_text())
    return document


def shipped_entries() -> list[tuple[str, str, dict[str, Any]]]:
    return [(vendor, model, entry)
            for vendor, body in shipped_document()["vendors"].items()
            for model, spec in body["models"].items()
            for entry in spec["prices"]]


def test_the_shipped_table_loads_once_and_covers_every_vendor() -> None:
    table = PriceTable.default()
    assert table is PriceTable.default()
    assert table.vendors() == [
        "anthropic", "deepseek", "gemini", "groq", "mistral", "openai", "xai"]
    assert all(table.models(vendor) for vendor in table.vendors())
    assert "_comment" in shipped_document()


def test_every_shipped_vendor_names_its_source_and_date() -> None:
    for vendor, body in shipped_document()["vendors"].items():
        assert body["source"].startswith("https://"), vendor
        assert date.fromisoformat(body["as_of"]) <= date(2026, 11, 28), vendor


@pytest.mark.parametrize(("vendor", "model", "entry"), shipped_entries(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_every_shipped_price_is_a_decimal_string(vendor: str, model: str,
                                                 entry: dict[str, Any]) -> None:
    tiers = [entry] + ([entry["long_context"]] if "long_context" in entry else [])
    for tier in tiers:
        for key in PRICE_KEYS:
            if key in tier:
                assert isinstance(tier[key], str), (vendor, model, key)
                assert Decimal(tier[key]) >= 0, (vendor, model, key)
        if "cached_input_per_mtok" in tier:
            assert Decimal(tier["cached_input_per_mtok"]) <= Decimal(tier["input_per_mtok"])


def test_every_shipped_model_resolves_with_a_source_and_sane_tiers() -> None:
    table = PriceTable.default()
    for vendor in table.vendors():
        for model in table.models(vendor):
            found = table.lookup(vendor, model, at=datetime(2027, 6, 1, tzinfo=UTC))
            assert found is not None, (vendor, model)
            assert found.source.startswith("https://"), (vendor, model)
            if found.long_context is not None:
                assert found.long_context.input_per_mtok > found.input_per_mtok, (vendor, model)


def test_every_shipped_alias_resolves_to_its_model() -> None:
    table = PriceTable.default()
    for vendor, body in shipped_document()["vendors"].items():
        for model, spec in body["models"].items():
            for alias in spec.get("aliases", []):
                assert table.lookup(vendor, alias, NOW) == table.lookup(vendor, model, NOW)


# Spot checks of prices verified against the vendors' pages (see the sources in prices.json).
@pytest.mark.parametrize(("vendor", "model", "at", "expected"), [
    ("openai", "gpt-6.2-sol", NOW, ("2.00", "0.10", "10.00")),
    ("openai", "gpt-6-luna", NOW, ("0.10", "0.01", "0.50")),
    ("openai", "gpt-5-nano-2025-08-07", NOW, ("0.05", "0.005", "0.40")),
    ("openai", "gpt-4o-2024-08-06", NOW, ("2.50", "1.25", "10.00")),
    ("anthropic", "claude-opus-5-5", NOW, ("4.00", "0.20", "20.00")),
    ("anthropic", "claude-haiku-4-5-20251001", NOW, ("1.00", "0.10", "5.00")),
    ("anthropic", "claude-sonnet-5-5", datetime(2026, 10, 6, tzinfo=UTC),
     ("2.00", "0.20", "10.00")),
    ("anthropic", "claude-sonnet-5-5", datetime(2026, 10, 7, tzinfo=UTC),
     ("2.00", "0.10", "10.00")),
    ("gemini", "gemini-4-carbon", NOW, ("2.00", "0.10", "10.00")),
    ("gemini", "gemini-4-carbon", datetime(2026, 12, 1, tzinfo=UTC),
     ("4.00", "0.20", "20.00")),
    ("deepseek", "deepseek-v4-flash", NOW, ("0.30", "0.006", "1.20")),
    ("xai", "grok-4.20", NOW, ("1.25", "0.20", "2.50")),
])
def test_shipped_spot_checks(vendor: str, model: str, at: datetime,
                             expected: tuple[str, str, str]) -> None:
    found = PriceTable.default().lookup(vendor, model, at)
    assert found is not None
    assert (found.input_per_mtok, found.cached_input_per_mtok, found.output_per_mtok) == tuple(
        Decimal(value) for value in expected)


def test_shipped_anthropic_prices_bill_cache_writes_at_the_pricing_pages_rates() -> None:
    table = PriceTable.default()
    for vendor_model, five_minutes, one_hour in [
            ("claude-sonnet-4-5", "3.75", "6.00"), ("claude-opus-4-1", "18.75", "30.00"),
            ("claude-3-5-haiku-20241022", "1.00", "1.60"),
            ("claude-3-haiku-20240307", "0.30", "0.50")]:
        found = table.lookup("anthropic", vendor_model, NOW)
        assert found is not None
        assert (found.cache_write_per_mtok, found.cache_write_1h_per_mtok) == \
            (Decimal(five_minutes), Decimal(one_hour)), vendor_model
    for model in table.models("anthropic"):
        found = table.lookup("anthropic", model, datetime(2027, 6, 1, tzinfo=UTC))
        assert found is not None
        for tier in (found, found.long_context):
            if tier is not None:
                assert tier.cache_write_per_mtok is not None, model
                assert tier.cache_write_per_mtok > tier.input_per_mtok, model
                assert tier.cache_write_1h_per_mtok > tier.cache_write_per_mtok, model


def test_shipped_long_context_tiers_bill_whole_requests() -> None:
    table = PriceTable.default()
    sol = table.lookup("openai", "gpt-6.2-sol", NOW)
    haiku = table.lookup("anthropic", "claude-haiku-5-5", NOW)
    pro = table.lookup("gemini", "gemini-2.5-pro", NOW)
    assert sol is not None and haiku is not None and pro is not None
    # 300k input (100k cached) + 1k output, all at the >272K rates: 4.00 / 0.20 / 15.00.
    usage = Usage(input_tokens=300_000, cached_input_tokens=100_000, output_tokens=1_000)
    assert cost_micros(sol, usage) == 800_000 + 20_000 + 15_000
    # Haiku 5.5 above 100k: 0.50 input, 0.05 cache reads, 2.50 output.
    usage = Usage(input_tokens=150_000, cached_input_tokens=50_000, output_tokens=2_000)
    assert cost_micros(haiku, usage) == 50_000 + 2_500 + 5_000
    assert estimate_micros(pro, 200_000, 1_000) == 250_000 + 10_000
    assert estimate_micros(pro, 200_001, 1_000) == 500_003 + 15_000


def test_a_requests_cost_is_kept_only_while_the_price_and_counts_are_the_same() -> None:
    """Several layers price one request; the kept answer must never outlive what it priced:
    a stream's usage grows in place (Anthropic's message_delta), and failover may change the
    serving deployment."""
    cheap = Deployment("p", "m", price=price("1", "2"))
    dear = Deployment("p", "m", price=price("3", "4"))
    ctx = RequestContext(request_id="r", operation="openai.chat", api_format="openai", body={},
                         raw_body=b"", model="m", stream=True, served_deployment=cheap)
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert call_cost_micros(ctx, usage) == 3_000_000
    assert call_cost_micros(ctx, usage) == 3_000_000
    usage.output_tokens = 2_000_000  # grown in place
    assert call_cost_micros(ctx, usage) == 5_000_000
    ctx.served_deployment = dear
    assert call_cost_micros(ctx, usage) == 11_000_000
    assert call_cost_micros(ctx, Usage(input_tokens=1_000_000, cached_input_tokens=1_000_000,
                                       output_tokens=2_000_000)) == 11_000_000  # no cached rate: input
    assert call_cost_micros(ctx, Usage()) == 0


def test_a_request_is_billed_its_recorded_usage_and_a_cache_hit_nothing() -> None:
    """The one definition of the bill, which the ledger records and the quota layer settles
    budgets to: the usage the layers below recorded, at the served price; a hit, nothing."""
    ctx = RequestContext(request_id="r", operation="openai.chat", api_format="openai", body={},
                         raw_body=b"", model="m", stream=True,
                         served_deployment=Deployment("p", "m", price=price("1", "2")))
    assert billed_usage(ctx) is None and billed_micros(ctx) == 0  # (never reached a model)
    ctx.usage = Usage(input_tokens=10, output_tokens=20)
    assert billed_usage(ctx) is ctx.usage
    assert billed_micros(ctx) == call_cost_micros(ctx, ctx.usage) == 50
    for hit in ("hit", "semantic-hit"):
        ctx.cache_status = hit
        assert billed_usage(ctx) is None and billed_micros(ctx) == 0
    ctx.cache_status = "miss"
    assert billed_micros(ctx) == 50


def test_a_price_resolved_before_it_changes_bills_the_new_one_from_its_date(
        tmp_path: Path) -> None:
    """A gateway resolves each deployment's price once, at startup; the table's next price
    must still apply from midnight UTC of its date (the shipped table has such changes)."""
    table = dated_table(tmp_path)
    resolved = table.lookup("acme", "m", at=datetime(2025, 12, 31, 12, tzinfo=UTC))
    assert resolved is not None and resolved.input_per_mtok == 1
    served = Deployment("p", "m", price=resolved)

    def billed_at(when: datetime) -> int:
        ctx = RequestContext(request_id="r", operation="openai.chat", api_format="openai",
                             body={}, raw_body=b"", model="m", stream=False,
                             served_deployment=served, started_at=when.timestamp())
        return call_cost_micros(ctx, Usage(input_tokens=1_000_000, output_tokens=1_000_000))

    assert billed_at(datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)) == 1_000_000 + 2_000_000
    assert billed_at(datetime(2026, 1, 1, tzinfo=UTC)) == 3_000_000 + 4_000_000
    assert billed_at(datetime(2026, 7, 1, tzinfo=UTC)) == 5_000_000 + 6_000_000
    assert in_force(resolved, datetime(2026, 5, 31, 23, 59, tzinfo=UTC).timestamp()) == \
        table.lookup("acme", "m", at=datetime(2026, 5, 31, tzinfo=UTC))
    assert in_force(price("1", "2"), math.inf) == price("1", "2")  # an explicit price stays



def test_a_price_follows_its_own_tables_successor_only(tmp_path: Path) -> None:
    """Tables keep linked copies: a Price given to two tables (or models) is not changed,
    and a Price made from a table's one (dataclasses.replace: a discount, say) keeps its
    own figures after the table's next date."""
    shared = price("1", "2", effective_from=date(2026, 1, 1))
    later_a = price("3", "4", effective_from=date(2026, 6, 1))
    later_b = price("5", "6", effective_from=date(2026, 3, 1))
    table_a = PriceTable({"acme": {"m1": [shared, later_a]}})
    table_b = PriceTable({"acme": {"m2": [shared, later_b]}})
    assert shared.successor is None  # (the caller's object)
    july = datetime(2026, 7, 1, tzinfo=UTC)
    from_a = table_a.lookup("acme", "m1", at=datetime(2026, 1, 2, tzinfo=UTC))
    from_b = table_b.lookup("acme", "m2", at=datetime(2026, 1, 2, tzinfo=UTC))
    assert from_a is not None and from_b is not None
    assert in_force(from_a, july.timestamp()).input_per_mtok == 3
    assert in_force(from_b, july.timestamp()).input_per_mtok == 5
    discounted = dataclasses.replace(from_a, input_per_mtok=Decimal("0.5"))
    assert in_force(discounted, july.timestamp()) is discounted
