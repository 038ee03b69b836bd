"""Limits documents as the gateway of 956f523 stored them in PostgreSQL (its Limits.to_json
of what its admin API accepted), which this one must still read, and one no version reads
as one thing (stream_cutoff "no" was truthy to 956f523): shared by the auth tests."""
from __future__ import annotations

from typing import Any

OLD_BUDGET: dict[str, Any] = {
    "limit_usd": "10", "period": "monthly", "on_overflow": "block", "downgrade_to": None,
    "stream_cutoff": False, "on_store_error": "closed", "status": 402,
    "alert_at_percent": [50, 80, 100]}
OLD_DOCS: list[dict[str, Any]] = [
    {"budgets": [{**OLD_BUDGET, "alert_at_percent": [50.0, 80.0, 100.0]}]},
    {"budgets": [{**OLD_BUDGET, "status": 429.0}]},
    {"budgets": [{**OLD_BUDGET, "stream_cutoff": 1}]},
    {"rpm": 100, "on_overflow": "block", "downgrade_to": ""},
]
UNREADABLE: dict[str, Any] = {"budgets": [{**OLD_BUDGET, "stream_cutoff": "no"}]}
