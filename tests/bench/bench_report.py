"""The results of a benchmark run and their markdown: the main table, details and ratios."""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean

from bench_load import SCENARIOS, RoundResult

MIB = 1024 * 1024


@dataclass(slots=True)
class TargetResult:
    """Everything measured for one target. `failure` set means it never served a request."""

    key: str
    label: str
    failure: str | None = None
    rounds: dict[str, list[RoundResult]] = field(default_factory=dict)  # scenario key -> rounds
    problems: dict[str, str] = field(default_factory=dict)  # scenario key -> why it has no number
    rss_bytes: int | None = None

    def mean_rps(self, scenario: str) -> float | None:
        runs = self.rounds.get(scenario)
        return mean(r.rps for r in runs) if runs else None

    def mean_p50_ms(self, scenario: str) -> float | None:
        runs = self.rounds.get(scenario)
        return mean(r.p50_ms for r in runs) if runs else None

    def mean_p99_ms(self, scenario: str) -> float | None:
        runs = self.rounds.get(scenario)
        return mean(r.p99_ms for r in runs) if runs else None

    def mean_server_ms(self, scenario: str, which: str = "p50") -> float | None:
        runs = [r for r in self.rounds.get(scenario, []) if r.server_p50_ms is not None]
        if not runs:
            return None
        return mean((r.server_p50_ms if which == "p50" else r.server_p99_ms) or 0.0
                    for r in runs)

    def error_counts(self, scenario: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for run in self.rounds.get(scenario, []):
            for kind, count in run.errors.items():
                total[kind] = total.get(kind, 0) + count
        return total


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _rps_number(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 1000:
        return f"{value / 1000:.2f}k"
    return f"{value:.0f}"


def fmt_rps(values: list[float]) -> str:
    """One round as a number, several as the range `low–high` (as the reference table does)."""
    if not values:
        return "—"
    low, high = min(values), max(values)
    if _rps_number(low) == _rps_number(high):
        return _rps_number(low)
    return f"{_rps_number(low)}–{_rps_number(high)}"


def fmt_rss(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:.0f} MiB"


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _flag(result: TargetResult, scenario: str) -> str:
    """A marker for a cell whose runs saw errors, so a fast failure never reads as throughput."""
    return " ⚠" if result.error_counts(scenario) else ""


def _cell(result: TargetResult, scenario: str, what: str) -> str:
    if scenario in result.problems:
        return "error"
    runs = result.rounds.get(scenario)
    if not runs:
        return "—"
    if what == "rps":
        text = fmt_rps([r.rps for r in runs])
    elif what == "p50":
        text = fmt_ms(result.mean_p50_ms(scenario))
    else:
        text = fmt_ms(result.mean_p99_ms(scenario))
    return text + _flag(result, scenario)


MAIN_COLUMNS = (
    ("JSON c=1 p50", "json-c1", "p50"),
    ("JSON c=1 p99", "json-c1", "p99"),
    ("JSON c=16 req/s", "json-c16", "rps"),
    ("JSON c=16 p99", "json-c16", "p99"),
    ("JSON c=64 req/s", "json-c64", "rps"),
    ("SSE c=16 req/s", "sse-c16", "rps"),
    ("SSE c=64 req/s", "sse-c64", "rps"),
)


def main_table(results: list[TargetResult]) -> str:
    header = ["target", *(name for name, _, _ in MAIN_COLUMNS), "RSS"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for result in results:
        if result.failure is not None:
            cells = [f"failed to start: {_one_line(result.failure)}"]
            cells += ["—"] * (len(header) - 2)
        else:
            cells = [_cell(result, scenario, what) for _, scenario, what in MAIN_COLUMNS]
            cells.append(fmt_rss(result.rss_bytes))
        lines.append("| " + " | ".join([result.label, *cells]) + " |")
    return "\n".join(lines)


def details_table(results: list[TargetResult]) -> str:
    """Every scenario of every target: req/s per round, mean p50 and p99, and errors seen."""
    lines = ["| target | scenario | req/s (per round) | p50 | p99 | errors |",
             "|---|---|---:|---:|---:|---|"]
    for result in results:
        if result.failure is not None:
            continue
        for scenario in SCENARIOS:
            key = scenario.key
            if key not in result.rounds and key not in result.problems:
                continue
            runs = result.rounds.get(key, [])
            rps = ", ".join(_rps_number(r.rps) for r in runs) or "—"
            errors = result.problems.get(key) or ", ".join(
                f"{kind}: {n}" for kind, n in sorted(result.error_counts(key).items()))
            lines.append(f"| {result.label} | {scenario.label} | {rps} | "
                         f"{fmt_ms(result.mean_p50_ms(key))} | {fmt_ms(result.mean_p99_ms(key))} | "
                         f"{_one_line(errors) or '—'} |")
    return "\n".join(lines)


def _ratio(num: TargetResult | None, den: TargetResult | None, scenario: str) -> str:
    if num is None or den is None:
        return "n/a"
    top, bottom = num.mean_rps(scenario), den.mean_rps(scenario)
    if top is None or bottom is None or bottom == 0:
        return "n/a"
    return f"{top / bottom:.2f}×"


RATIO_PAIRS = (
    ("bare", "floor", "Sluicegate bare / floor"),
    ("default", "floor", "Sluicegate default / floor"),
    ("redis", "bare", "default stack + auth + quota on Redis / bare"),
    ("auth-quota", "bare", "auth + quota on Redis alone / bare"),
    ("auth-quota-memory", "bare", "auth + quota in process (the embedded default) / bare"),
    ("redis-rtt", "bare", "one Redis round trip, nothing else / bare (auth + quota's floor)"),
    ("metering", "bare", "metering layer / bare"),
    ("failover", "bare", "failover layer / bare"),
    ("tracing", "bare", "tracing on / off (bare)"),
    ("cache", "bare", "cache hits (memory) / bare"),
    ("cache-redis", "bare", "cache hits (Redis) / bare"),
    ("bare", "litellm", "Sluicegate bare / LiteLLM"),
    ("default", "litellm", "Sluicegate default / LiteLLM"),
    ("bare", "portkey", "Sluicegate bare / Portkey"),
    ("default", "portkey", "Sluicegate default / Portkey"),
)
RATIO_SCENARIOS = ("json-c16", "json-c64", "sse-c16", "sse-c64")


def ratios(results: list[TargetResult]) -> str:
    """req/s ratios (means of the rounds) and the c=1 latency Sluicegate adds over the floor."""
    by_key = {r.key: r for r in results if r.failure is None}
    labels = {s.key: s.label for s in SCENARIOS}
    lines = ["| ratio of req/s | " + " | ".join(labels[s] for s in RATIO_SCENARIOS) + " |",
             "|---|" + "---:|" * len(RATIO_SCENARIOS)]
    for num, den, label in RATIO_PAIRS:
        cells = [_ratio(by_key.get(num), by_key.get(den), s) for s in RATIO_SCENARIOS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, label in (("bare", "bare passthrough"), ("default", "default stack"),
                       ("production", "production stack")):
        lines.append(f"- JSON c=1 p50, Sluicegate {label} minus floor: "
                     f"{_latency_delta(by_key.get(key), by_key.get('floor'))}")
    production = by_key.get("production")
    if production is not None:
        unique, rps = "json-c16-unique", production.mean_rps("json-c16-unique")
        peers = [(key, by_key.get(key)) for key in ("floor", "litellm", "portkey")]
        shares = ", ".join(f"{rps / peer_rps:.2f}× {key}" for key, peer in peers
                           if peer is not None and rps
                           and (peer_rps := peer.mean_rps("json-c16")))
        rss = (f"; RSS {production.rss_bytes / 2**20:.0f} MB"
               if production.rss_bytes else "")
        lines.append(f"- Production stack (auth + quota on Redis, metering into PostgreSQL, "
                     f"cache miss on Redis, failover, tracing off), JSON c=16 with a new "
                     f"prompt every request: {_cell(production, unique, 'rps')} req/s "
                     f"({shares or 'no peers measured'}){rss}.")
    return "\n".join(lines)


CACHE_TARGETS = ("cache", "cache-redis")


def cache_section(results: list[TargetResult]) -> str:
    """Hits: req/s against the bare passthrough (which always calls upstream), the gateway's
    own time per hit (Server-Timing) and the CPU a hit costs (one saturated core / req/s).
    Misses: the cache layer alone against bare, both asked a new prompt every time."""
    by_key = {r.key: r for r in results if r.failure is None}
    bare = by_key.get("bare")
    header = ("| cache target | JSON c=16 req/s | / bare | server-side p50 | server-side p99 "
              "| CPU per hit | JSON c=1 p50 (client) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for key in CACHE_TARGETS:
        hit = by_key.get(key)
        if hit is None:
            continue
        rps = hit.mean_rps("json-c16")
        cpu = f"{1000 / rps:.2f} ms" if rps else "—"
        lines.append(f"| {hit.label} | {_cell(hit, 'json-c16', 'rps')} | "
                     f"{_ratio(hit, bare, 'json-c16')} | "
                     f"{fmt_ms3(hit.mean_server_ms('json-c16', 'p50'))} | "
                     f"{fmt_ms3(hit.mean_server_ms('json-c16', 'p99'))} | {cpu} | "
                     f"{fmt_ms(hit.mean_p50_ms('json-c1'))} |")
    miss = by_key.get("cache-miss")
    if miss is not None:
        unique = "json-c16-unique"
        bare_rps = _cell(bare, unique, "rps") if bare else "n/a"
        line = (f"- Cache layer on its miss path (memory store, every request a new prompt, "
                f"looked up, sent upstream, stored): {_cell(miss, unique, 'rps')} req/s, "
                f"{_ratio(miss, bare, unique)} of the bare passthrough's {bare_rps} req/s on "
                "the same load.")
        lines += ["", line]
    note = ("Server-side: the `Server-Timing` the gateway sends (from the request read to the "
            "response head). CPU per hit: one core's second divided by the hits it served.")
    lines += ["", note]
    return "\n".join(lines)


def fmt_ms3(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} ms"


def _latency_delta(target: TargetResult | None, floor: TargetResult | None) -> str:
    if target is None or floor is None:
        return "n/a"
    ours, base = target.mean_p50_ms("json-c1"), floor.mean_p50_ms("json-c1")
    if ours is None or base is None:
        return "n/a"
    return f"{ours - base:+.2f} ms"


def render(results: list[TargetResult], *, when: str, machine: list[str],
           method: list[str]) -> str:
    parts = [
        "# Sluicegate benchmark results", "",
        f"Run on {when} by `tests/bench/run_bench.py`; regenerate with `make bench`.", "",
        "## Machine", "", *(f"- {line}" for line in machine), "",
        "## Method", "", *(f"- {line}" for line in method), "",
        "## Results", "", main_table(results), "",
        "⚠ marks a cell whose runs saw errors (see the details); failed requests are never",
        "counted as throughput.", "",
        "## Ratios", "", ratios(results), "",
        ("A layer's ratio here compares rounds run minutes apart, and the host's drift over "
         "that time can exceed the 3% a layer may cost. `make bench` then runs the failover "
         "and metering layers beside the bare passthrough in alternating rounds "
         "(`tests/bench/run_paired.py`): `tests/bench/PAIRED.md` has those ratios."), "",
        "## Cache", "", cache_section(results), "",
        "## Details", "", details_table(results), "",
    ]
    return "\n".join(parts)
