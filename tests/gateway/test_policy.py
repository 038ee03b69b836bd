"""The limit records the auth layer stores and the quota layer enforces: what `Budget` and
`Limits` accept, from the config module and from JSON (the admin API), pure logic."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gateway.policy import Budget, Limits


def test_valid_limits_round_trip_through_json() -> None:
    limits = Limits(rpm=60, on_overflow="downgrade", downgrade_to="gpt-mini",
                    budgets=(Budget("12.5", stream_cutoff=True, status=429,
                                    alert_at_percent=(10, 100)),))
    assert Limits.from_json(limits.to_json()) == limits
    assert limits.budgets[0].limit_usd == Decimal("12.5")
    assert Budget(1, alert_at_percent=[50]).alert_at_percent == (50,)  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "Infinity", "-Infinity", Decimal("NaN"),
                                    Decimal("Infinity"), "1E+999999", "-0.0000001"])
def test_a_budget_must_be_a_finite_amount_of_micro_dollars(amount: Any) -> None:
    with pytest.raises(ValueError, match="limit_usd"):
        Budget(amount)
    with pytest.raises(ValueError, match="limit_usd"):
        Limits.from_json({"budgets": [{"limit_usd": amount}]})


@pytest.mark.parametrize("amount", [1.5, True, None, [1], "ten"])
def test_a_budget_amount_of_another_type_is_refused(amount: Any) -> None:
    with pytest.raises(TypeError, match="money"):
        Budget(amount)


@pytest.mark.parametrize("amount", ["1e-999999999", "1e-1000", "1.0000001", "0.0000005"])
def test_an_amount_finer_than_a_micro_dollar_is_refused_however_fine(amount: str) -> None:
    # ("1e-999999999" * 10**6 underflowed to 0 in the default decimal context and passed:
    # a budget shown as entered and enforced as $0)
    with pytest.raises(ValueError, match="finer than a micro-dollar"):
        Budget(amount)


@pytest.mark.parametrize("amount", ["5_0", "\u0665", " 12", "12 ", "1,5"])
def test_an_amount_is_plain_ascii_digits(amount: str) -> None:
    # (Decimal reads "5_0" as 50 and Arabic-Indic digits as digits: stored and shown as typed)
    with pytest.raises(TypeError, match="not an amount of money"):
        Budget(amount)
    assert Budget("12.50").limit_micros == 12_500_000 and Budget(".5").limit_micros == 500_000


@pytest.mark.parametrize("fields", [
    {"on_overflow": "downgrade", "downgrade_to": 5},
    {"downgrade_to": ["x"]},
    {"downgrade_to": {"a": 1}},
    {"downgrade_to": ""},
    {"downgrade_to": "gpt\u0000"},
    {"downgrade_to": "m" * 257},
    {"on_overflow": ["block"]},
    {"on_store_error": {"open": 1}},
    {"rpm": True},
    {"tpm": 1.0},
    {"max_concurrent": "3"},
])
def test_limits_refuse_wrongly_typed_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Limits(**fields)
    with pytest.raises(ValueError):
        Limits.from_json(fields)


def test_two_budgets_of_one_period_are_refused() -> None:
    # (they shared one counter, and every request of the subject was a 500)
    tiered = {"budgets": [{"limit_usd": "100", "period": "monthly", "on_overflow": "downgrade",
                           "downgrade_to": "cheap"}, {"limit_usd": "200", "period": "monthly"}]}
    with pytest.raises(ValueError, match="one budget per period: two are monthly"):
        Limits.from_json(tiered)
    daily_and_monthly = {"budgets": [{"limit_usd": "5", "period": "daily"},
                                     {"limit_usd": "100", "period": "monthly"}]}
    assert len(Limits.from_json(daily_and_monthly).budgets) == 2


@pytest.mark.parametrize("fields", [
    {"stream_cutoff": "no"},
    {"stream_cutoff": 1},
    {"on_overflow": "downgrade", "downgrade_to": {"a": 1}},
    {"downgrade_to": 5},
    {"period": ["monthly"]},
    {"status": "402"},
    {"status": 402.0},
    {"status": True},
    {"alert_at_percent": 50},
    {"alert_at_percent": "50"},
    {"alert_at_percent": [True]},
    {"alert_at_percent": [50.5]},
    {"alert_at_percent": [0]},
    {"alert_at_percent": [101]},
])
def test_budgets_refuse_wrongly_typed_fields(fields: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        Budget("1", **fields)
    with pytest.raises((ValueError, TypeError)):
        Limits.from_json({"budgets": [{"limit_usd": "1", **fields}]})


# -- documents stored by older versions ---------------------------------------------------------

# What 956f523's admin API accepted and stored (`Limits.to_json`, one field off each time):
# its Budget checked only `0 < p <= 100` and `status in (402, 429)`, and nothing looked at
# stream_cutoff or at a downgrade_to that on_overflow="block" never used.
OLD_BUDGET = {"limit_usd": "10", "period": "monthly", "on_overflow": "block",
              "downgrade_to": None, "stream_cutoff": False, "on_store_error": "closed",
              "status": 402, "alert_at_percent": [50, 80, 100]}
OLD_LIMITS = {"rpm": None, "tpm": None, "max_concurrent": None, "on_overflow": "block",
              "downgrade_to": None, "on_store_error": "open", "budgets": []}


@pytest.mark.parametrize(("stored", "meant"), [
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "alert_at_percent": [50.0, 80.0, 100.0]}]},
     Limits(budgets=(Budget("10", alert_at_percent=(50, 80, 100)),))),
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "status": 429.0}]},
     Limits(budgets=(Budget("10", status=429),))),
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "stream_cutoff": 1}]},
     Limits(budgets=(Budget("10", stream_cutoff=True),))),
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "stream_cutoff": 0}]},
     Limits(budgets=(Budget("10"),))),
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "stream_cutoff": None}]},
     Limits(budgets=(Budget("10"),))),
    ({**OLD_LIMITS, "budgets": [{**OLD_BUDGET, "downgrade_to": ""}]},
     Limits(budgets=(Budget("10"),))),
    ({**OLD_LIMITS, "rpm": 100, "downgrade_to": ""}, Limits(rpm=100)),
    ({**OLD_LIMITS, "rpm": 100, "downgrade_to": ["x"]}, Limits(rpm=100)),
])
def test_limits_stored_by_the_previous_version_read_as_it_meant_them(
        stored: dict[str, Any], meant: Limits) -> None:
    assert Limits.from_stored(stored) == meant
    with pytest.raises((ValueError, TypeError)):  # still refused from the admin API
        Limits.from_json(stored)


@pytest.mark.parametrize("stored", [
    {"budgets": [{**OLD_BUDGET, "stream_cutoff": "no"}]},  # truthy to the old version
    {"budgets": [{**OLD_BUDGET, "alert_at_percent": [50.5]}]},
    {"budgets": [{**OLD_BUDGET, "status": 402.5}]},
    {"on_overflow": "downgrade", "downgrade_to": 5},
    {"budgets": [{**OLD_BUDGET, "on_overflow": "downgrade", "downgrade_to": ""}]},
    {"rpm": 1.0},
    {"surprise": 1},
    ["not", "an", "object"],
])
def test_stored_limits_without_one_meaning_are_still_refused(stored: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        Limits.from_stored(stored)


def test_current_limits_read_back_from_storage_unchanged() -> None:
    limits = Limits(rpm=60, on_overflow="downgrade", downgrade_to="gpt-mini",
                    budgets=(Budget("12.5", stream_cutoff=True, status=429,
                                    alert_at_percent=(10, 100)),))
    assert Limits.from_stored(limits.to_json()) == limits
