"""The quota layer's admissions in Redis for one limit template, without per-request objects.

A template (plan.template: the same subjects, limits and periods for every request of one
caller and model on one day) differs from request to request only in two numbers, the
estimated tokens and the estimated cost, and after the call in two more, the actual ones.
The general path still builds what describes the template on every request: a Check per
limit, a Decision with tuples of the reply's numbers, the list of actual amounts. A `Lane`
is made once per template and Redis store, and per request it makes only the bytes that go
to Redis (the store's own encoding, `store_redis._Wire`, with the amounts filled in by
straight-line code made for the template) and the response headers (from the reply's JSON
array, read in place).

Both scripts, their arguments and their replies are the store's; a Lane is a faster way to
build the same command and read the same answer, never another semantics. Anything that is
not an admitted request (a refusal, budget counters to seed, a script Redis lost, an
unreachable Redis) goes back to the general path with what happened, which then does what
it always did (tests/middleware/test_quota_lane.py holds the two paths to the same
commands and the same answers).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.policy import BUDGET, CONCURRENT, REQUESTS, TOKENS, Check
from middleware.quota import plan
from middleware.quota.plan import Estimate, Planned

__all__ = ["Lane", "lane_for"]

# Which of a request's amounts a check takes: 1 (a request, a concurrency lease), the
# estimated (or actual) tokens, or the estimated (or actual) cost.
_ONE, _TOKENS, _COST = "1", "tokens", "cost"
_AMOUNT = {REQUESTS: _ONE, CONCURRENT: _ONE, TOKENS: _TOKENS, BUDGET: _COST}

_LANE = "lane"  # the template memo's entry: {store: Lane}
_Compiled = tuple[list[tuple[Any, ...]], dict[Any, Any]]  # plan.template's: rows and memo


class Lane:
    """One template's admissions and settles in one RedisQuotaStore (see the module
    docstring). `admit_payload` gives the whole EVALSHA command; `settle_argv` a request's
    ARGV string in the settle script's (batched) call, after its keys, `settle_keys`;
    `headers` reads an admitted reply; `planned` is the template's Planned list,
    `budgets` the (index, Planned) of its budget checks, `budget_keys` their keys, `cutoff`
    the indexes of those that cut streams off, `leases` its concurrency and budget checks
    (what a request holds: renewed while it runs)."""

    __slots__ = ("admit_args", "admit_bytes", "admit_head", "budget_keys", "budgets",
                 "compiled", "cutoff", "headers", "key_count", "leases", "planned", "reply_size",
                 "settle_args", "settle_bytes", "settle_keys")

    def __init__(self, compiled: _Compiled, planned: Sequence[Planned], wire: Any) -> None:
        self.compiled = compiled
        self.planned = planned
        self.admit_head, self.settle_keys = wire.admit_head, wire.keys
        self.key_count = wire.count
        self.admit_bytes, self.settle_bytes = wire.admit_bytes, wire.settle_bytes
        which = [_AMOUNT[item.check.kind] for item in planned]
        # (Only the names above go into the source: "1", "tokens", "cost", "actual_...".)
        admit = ", ".join(which)
        settle = ", ".join(f"{w}, {w if w == _ONE else 'actual_' + w}" for w in which)
        self.admit_args: Callable[[int, int], tuple[int, ...]] = eval(
            f"lambda tokens, cost: ({admit},)")
        self.settle_args: Callable[[int, int, int, int], tuple[int, ...]] = eval(
            f"lambda tokens, cost, actual_tokens, actual_cost: ({settle},)")
        self.headers = plan.reply_header_maker(planned)
        self.reply_size = 1 + 2 * len(planned)  # an admitted reply: 1, then two per check
        self.budgets = tuple([(index, planned[index]) for index in plan.budget_indexes(planned)])
        self.budget_keys = tuple([item.check.key for _, item in self.budgets])
        self.cutoff = plan.budget_indexes(planned, cutoff=True)
        self.leases = tuple([item.check for item in planned
                             if item.check.kind == CONCURRENT or item.check.kind == BUDGET])

    def admit_payload(self, prefix: bytes, tokens: int, cost: int) -> bytes:
        data = prefix + self.admit_bytes % self.admit_args(tokens, cost)
        return b"%b$%d\r\n%b\r\n" % (self.admit_head, len(data), data)

    def settle_argv(self, prefix: bytes, tokens: int, cost: int, actual_tokens: int,
                    actual_cost: int) -> bytes:
        data: bytes = prefix + self.settle_bytes % self.settle_args(tokens, cost,
                                                                     actual_tokens, actual_cost)
        return data

    def checks(self, est: Estimate) -> list[Check]:
        """The Checks the general path makes for a request of this estimate (for the rare
        cases a Lane hands back: a settle Redis must be sent again in full)."""
        return plan.planned_from(self.compiled, est)[1]


def lane_for(store: Any, compiled: _Compiled) -> Lane:
    """The Lane of the template `compiled` (plan.template's) in `store`, a RedisQuotaStore:
    made on first use and kept in the template's memo."""
    memo = compiled[1]
    lanes: dict[Any, Lane] | None = memo.get(_LANE)
    if lanes is None:
        lanes = memo[_LANE] = {}
    lane = lanes.get(store)
    if lane is None:
        planned, checks = plan.planned_from(compiled, Estimate(0, 0, 0))
        wire = store.wire(checks)  # (it reads no amount)
        lane = lanes[store] = Lane(compiled, planned, wire)
    return lane
