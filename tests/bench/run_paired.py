#!/usr/bin/env python3
"""A layer's req/s beside the bare passthrough's, in paired rounds that cancel the host's drift.

`make bench` runs each target's rounds together, minutes apart from the bare passthrough's;
on a shared host req/s drifts by 10-20% over that time, more than the 3% a layer may cost.
Here the bare passthrough and the layer's target run side by side (both pinned to the target
core, on two ports; only the one under load uses it), and their rounds alternate in ABBA
order: bare, layer, layer, bare, bare, layer, ... Each pair (one round of each, next to each
other) gives a ratio; a linear drift cancels within a pair, and the table gives the median
pair and the spread. Each round also reads the server's CPU time (user + system, the whole
process tree, from /proc) and divides it by the responses: the CPU a request costs, the
other face of req/s on a saturated core, given as the bare passthrough's over the target's
(the req/s ratio the CPU predicts) and as the target's extra microseconds per request.

    python tests/bench/run_paired.py --targets failover --scenarios json-c16,sse-c16
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, however this is started

from bench_load import SCENARIOS, LoadError, Scenario, run_load
from bench_procs import ProcessSet, Started, port_in_use, wait_port_free
from bench_targets import HERE, MOCK_PORT, REDIS_PORT, TARGET_PORT, TARGETS, Target, mock_base
from run_bench import Settings, log, pick, pinned_cpus, preflight, start_services

BARE_PORT = TARGET_PORT + 1


@dataclass(slots=True)
class Pairs:
    target: str
    scenario: str
    bare_rps: list[float] = field(default_factory=list)
    target_rps: list[float] = field(default_factory=list)
    bare_cpu_us: list[float] = field(default_factory=list)  # CPU per response, per round
    target_cpu_us: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [t / b for t, b in zip(self.target_rps, self.bare_rps, strict=False) if b > 0]

    @property
    def cpu_ratios(self) -> list[float]:
        """Per pair, bare's CPU per request over the target's (as req/s: below 1 costs)."""
        return [b / t for t, b in zip(self.target_cpu_us, self.bare_cpu_us, strict=False)
                if t > 0]

    @property
    def cpu_extra_us(self) -> list[float]:
        return [t - b for t, b in zip(self.target_cpu_us, self.bare_cpu_us, strict=False)]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every process under it (from /proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # (gone meanwhile)
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += children.get(current, [])
    return total


def abba(pairs: int) -> list[str]:
    """The order of `pairs` pairs of rounds: bare, target, target, bare, bare, target, ..."""
    order: list[str] = []
    for number in range(pairs):
        order += ["bare", "target"] if number % 2 == 0 else ["target", "bare"]
    return order


def on_port(cmd: list[str], port: int) -> list[str]:
    """The command with its `--port` value replaced."""
    at = cmd.index("--port") + 1
    return [*cmd[:at], str(port), *cmd[at + 1:]]


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def start(procs: ProcessSet, target: Target, scenario: Scenario, port: int,
          settings: Settings) -> Started:
    assert target.launch is not None
    launch = target.launch(mock_base(scenario.stream))
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", **launch.env)
    started = procs.start(f"{target.key}-{port}", on_port(launch.cmd, port), cwd=launch.cwd,
                          env=env, log_path=settings.rundir / f"{target.key}-{port}.log",
                          cpu=settings.target_cpu)
    deadline = time.monotonic() + target.start_timeout_s
    while not port_in_use(port):
        if started.exited() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {target.key} did not start\n{started.log_tail()}")
        time.sleep(0.2)
    return started


def measure(procs: ProcessSet, target: Target, scenario: Scenario, settings: Settings,
            pairs: int) -> Pairs:
    result = Pairs(target.key, scenario.key)
    bare = start(procs, TARGETS["bare"], scenario, BARE_PORT, settings)
    layer = start(procs, target, scenario, TARGET_PORT, settings)
    ports = {"bare": BARE_PORT, "target": TARGET_PORT}
    try:
        for side in ("bare", "target"):
            run_load("wrk", url(ports[side]), scenario, settings.warmup_s, cpu=settings.load_cpu)
        pids = {"bare": bare.proc.pid, "target": layer.proc.pid}
        for side in abba(pairs):
            cpu_before = tree_cpu_s(pids[side])
            run = run_load("wrk", url(ports[side]), scenario, settings.duration_s,
                           cpu=settings.load_cpu)
            cpu_us = (tree_cpu_s(pids[side]) - cpu_before) / max(run.ok, 1) * 1e6
            if run.errors:
                raise LoadError(f"{side} saw errors: {run.errors}")
            (result.bare_rps if side == "bare" else result.target_rps).append(run.rps)
            (result.bare_cpu_us if side == "bare" else result.target_cpu_us).append(cpu_us)
            log(f"[{target.key}] {scenario.label} {side}: {run.rps:,.0f} req/s, "
                f"{cpu_us:.1f} us CPU a request")
            time.sleep(0.3)
    finally:
        for started in (layer, bare):
            procs.stop(started)
        for port in ports.values():
            wait_port_free(port, 15)
    return result


def render(results: list[Pairs], duration_s: int) -> str:
    labels = {s.key: s.label for s in SCENARIOS}
    lines = [
        "# Sluicegate layers beside the bare passthrough, in paired rounds",
        "",
        (f"Run on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by "
        "`tests/bench/run_paired.py` (`make bench-paired`). The bare passthrough and the "
        "target run side by side on the target core; their wrk rounds "
        f"({duration_s} s each) alternate bare, target, target, bare, ...; each adjacent "
        "pair gives one ratio of req/s."),
        "",
        ("| target | scenario | pairs | median target/bare | range | bare req/s (median) | "
         "CPU a request, bare/target (median) | range | extra CPU a request (median) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ratios = result.ratios
        if not ratios:
            continue
        cpu = result.cpu_ratios
        cpu_cells = (f"{statistics.median(cpu):.3f}× | {min(cpu):.3f}–{max(cpu):.3f}× | "
                     f"{statistics.median(result.cpu_extra_us):+.1f} µs" if cpu else
                     "— | — | —")
        lines.append(
            f"| {TARGETS[result.target].label} | {labels[result.scenario]} | {len(ratios)} | "
            f"{statistics.median(ratios):.3f}× | {min(ratios):.3f}–{max(ratios):.3f}× | "
            f"{statistics.median(result.bare_rps):,.0f} | {cpu_cells} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="failover,metering")
    parser.add_argument("--scenarios", default="json-c16,sse-c16")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5, help="seconds per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "PAIRED.md")
    args = parser.parse_args(argv)
    preflight(["wrk"], (MOCK_PORT, TARGET_PORT, BARE_PORT, REDIS_PORT))
    keys = pick(args.targets, dict(TARGETS), "targets")
    if any(k not in TARGETS or TARGETS[k].launch is None or k in ("bare", "floor", "litellm",
                                                                  "portkey") for k in keys):
        raise SystemExit("bench: --targets takes Sluicegate layer targets (not bare or peers)")
    if args.pairs < 1 or args.duration < 1:
        raise SystemExit("bench: --pairs and --duration must be at least 1")
    wanted = set(pick(args.scenarios, {s.key: s for s in SCENARIOS}, "scenarios"))
    scenarios = [s for s in SCENARIOS if s.key in wanted]
    rundir = Path(tempfile.mkdtemp(prefix="sluicegate-paired-"))
    targets = [TARGETS[k] for k in keys]
    settings = Settings(targets, scenarios, args.duration, args.warmup, args.pairs, "wrk",
                        *pinned_cpus(), rundir)
    results: list[Pairs] = []
    with ProcessSet() as procs:
        start_services(procs, settings)
        for target in targets:
            for scenario in scenarios:
                if target.scenarios is not None and scenario.key not in target.scenarios:
                    continue
                results.append(measure(procs, target, scenario, settings, args.pairs))
    shutil.rmtree(rundir, ignore_errors=True)
    text = render(results, args.duration)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
