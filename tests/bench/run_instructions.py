#!/usr/bin/env python3
"""What each layer costs in CPU instructions per request, under hypercorn, counted by callgrind.

`make bench` measures req/s, which on a shared machine moves by 10-20% from one 10 s round to
the next: more than the 3% a layer may cost. Instructions do not move with the neighbours.
Each Sluicegate target runs under `valgrind --tool=callgrind` (about 50 times slower), serves
wrk's load (the same post.lua, body and concurrency as `make bench`) for a warm-up, then the
counters are zeroed, wrk runs again, and the counters are dumped: every instruction the
process ran, the event loop, hypercorn and h11 included, divided by the responses wrk
completed. The table gives each target beside the bare passthrough on the same scenario;
at one saturated core, bare/target is the req/s ratio if each instruction cost the same.

Limits: instructions are not time (cache misses, branch mispredictions and system calls
weigh differently), and at 1/50 of the speed, work that batches by time sees fewer requests
per batch, so its per-batch costs weigh more here than at full speed. For the metering layer
alone the bench says how long a batch lasts: its target runs with a 10 s flush instead of
0.2 s (about 700 records a batch here, about 500 at full speed) and 60 s of counted load, so
a batch cut by the start or the end of the count moves the figure by a fraction of a percent.
(It changed the count by 0.1%: metering's cost is per record.) Elsewhere batches follow the
run's pace (the Redis client's write coalescing, the production stack's PostgreSQL writer),
and the count moves with them: the production stack's moved by 12% between runs.

    python tests/bench/run_instructions.py                       # all layer targets (~15 min)
    python tests/bench/run_instructions.py --targets bare,failover --scenarios json-c16
    python tests/bench/run_instructions.py --targets cache-miss --keep   # then callgrind_annotate
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, however this is started

from bench_load import SCENARIOS, LoadError, Scenario, run_load
from bench_procs import ProcessSet, wait_port_free
from bench_targets import HERE, TARGET_PORT, TARGETS, NotRunnable, Target, mock_base
from run_bench import Settings, log, pick, pinned_cpus, preflight, start_services, wait_ready

DEFAULT_TARGETS = ("floor,bare,failover,metering,cache-miss,auth-quota,auth-quota-memory,redis-rtt,"
                   "cache,cache-redis,default,production")
DEFAULT_SCENARIOS = "json-c16,sse-c16,json-c16-unique,sse-c16-unique"
# New prompts on every request: the miss paths (the cache's, the production stack's) and the
# bare passthrough they are compared with.
UNIQUE_ONLY_FOR = ("floor", "bare", "cache-miss", "production")
START_TIMEOUT_S = 300.0  # imports alone take half a minute under callgrind
# Targets whose batches are timed: the environment that gives them full-speed batches under
# callgrind, and the counted seconds that averages over several batches (see the docstring).
FULL_SPEED_BATCHES = {"metering": ({"SLUICEGATE_BENCH_FLUSH_S": "10"}, 60)}
_SUMMARY = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Count:
    target: str
    scenario: str
    instructions: int
    responses: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.responses


def callgrind_command(cmd: list[str], out_pattern: Path) -> list[str]:
    """The target's command under callgrind; a script is run through this interpreter (a
    shebang would make valgrind count a shell's start too). The floor's `hypercorn -w 1`
    becomes `-w 0`: the same worker code, run in the process callgrind watches rather than
    in a child it spawns."""
    program = cmd[0]
    if program.endswith("sluicegate"):
        cmd = [sys.executable, *cmd]
    if cmd[1:3] == ["-m", "hypercorn"] and "-w" in cmd:
        at = cmd.index("-w") + 1
        cmd = [*cmd[:at], "0", *cmd[at + 1:]]
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_pattern}", *cmd]


def dumped_instructions(dump: Path) -> int:
    """The instruction total of one callgrind dump."""
    match = _SUMMARY.search(dump.read_text(errors="replace"))
    if match is None:
        raise LoadError(f"no summary line in {dump}")
    return int(match.group(1))


def count_target(procs: ProcessSet, target: Target, scenario: Scenario, settings: Settings,
                 duration_s: int) -> Count | None:
    assert target.launch is not None
    try:
        launch = target.launch(mock_base(scenario.stream))
    except NotRunnable as exc:
        log(f"[{target.key}] {exc}")
        return None
    outdir = Path(tempfile.mkdtemp(prefix=f"callgrind-{target.key}-", dir=settings.rundir))
    batches, at_least_s = FULL_SPEED_BATCHES.get(target.key, ({}, 0))
    duration_s = max(duration_s, at_least_s)
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", **launch.env, **batches)
    cmd = callgrind_command(launch.cmd, outdir / "callgrind.out.%p")
    log(f"[{target.key}] {scenario.label}: starting under callgrind")
    started = procs.start(target.key, cmd, cwd=launch.cwd, env=env,
                          log_path=outdir / "server.log", cpu=settings.target_cpu)
    try:
        failure = wait_ready(started, target, scenario.stream)
        if failure is not None:
            log(f"[{target.key}] did not start: {failure}")
            return None
        url = target.url(scenario.stream)
        run_load("wrk", url, scenario, settings.warmup_s, cpu=settings.load_cpu)
        time.sleep(1)
        pid = str(started.proc.pid)
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
        run = run_load("wrk", url, scenario, duration_s, cpu=settings.load_cpu)
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
        dumps = sorted(outdir.glob(f"callgrind.out.{pid}.*"))
        if not dumps or run.ok == 0 or run.errors:
            log(f"[{target.key}] no count: dumps {len(dumps)}, ok {run.ok}, errors {run.errors}")
            return None
        count = Count(target.key, scenario.key, dumped_instructions(dumps[-1]), run.ok)
        log(f"[{target.key}] {scenario.label}: {count.per_request / 1e3:,.0f}k instructions "
            f"per request over {run.ok} responses")
        return count
    except LoadError as exc:
        log(f"[{target.key}] {scenario.label}: {exc}")
        return None
    finally:
        procs.stop(started)
        wait_port_free(TARGET_PORT, 30)


def render(counts: list[Count], scenarios: list[Scenario], duration_s: int) -> str:
    labels = {s.key: s.label for s in scenarios}
    bare = {c.scenario: c.per_request for c in counts if c.target == "bare"}
    floor = {c.scenario: c.per_request for c in counts if c.target == "floor"}
    lines = [
        "# Sluicegate instruction counts per request",
        "",
        (f"Run on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by "
        "`tests/bench/run_instructions.py`; regenerate with `make bench-instructions`."),
        "",
        ("Each target under `valgrind --tool=callgrind`, pinned to one core, behind the same "
        f"nginx mock and wrk load as `make bench`; counters zeroed after a warm-up, then "
        f"{duration_s} s of load (at about 1/50 of full speed; the metering layer alone: "
        "60 s, with its batches stretched to full-speed size), then dumped. Instructions "
        "of the whole process (event loop, hypercorn, h11, the gateway) divided by the "
        "responses wrk completed. See the script's docstring for what this does not "
        "measure."),
        "",
        ("| target | scenario | instructions per request | floor / target | bare / target "
        "| layer cost |"),
        "|---|---|---:|---:|---:|---:|",
    ]
    for count in counts:
        base = bare.get(count.scenario)
        ratio = f"{base / count.per_request:.3f}×" if base else "n/a"
        low = floor.get(count.scenario)
        to_floor = f"{low / count.per_request:.3f}×" if low else "n/a"
        cost = (f"{(count.per_request - base) / base * 100:+.1f}%"
                if base and count.target not in ("bare", "floor") else "—")
        lines.append(f"| {TARGETS[count.target].label} | {labels[count.scenario]} | "
                     f"{count.per_request / 1e3:,.1f}k | {to_floor} | {ratio} | {cost} |")
    lines += ["", ("Layer cost: the target's instructions over the bare passthrough's, on the "
              "same scenario (the issues' bars: auth + quota ≤ 10%, failover, metering and "
              "the cache's miss path ≤ 3%)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--duration", type=int, default=20, help="seconds of counted load")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--output", type=Path, default=HERE / "INSTRUCTIONS.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the callgrind dumps (for callgrind_annotate) and say where")
    args = parser.parse_args(argv)
    preflight(["valgrind", "callgrind_control", "wrk"])
    keys = pick(args.targets, dict(TARGETS), "targets")
    unknown = [k for k in keys if k not in TARGETS or TARGETS[k].launch is None
               or k in ("litellm", "portkey")]
    if unknown:
        raise SystemExit(f"bench: not a Sluicegate target: {', '.join(unknown)}")
    wanted = set(pick(args.scenarios, {s.key: s for s in SCENARIOS}, "scenarios"))
    scenarios = [s for s in SCENARIOS if s.key in wanted]
    rundir = Path(tempfile.mkdtemp(prefix="sluicegate-instructions-"))
    targets = [dataclasses.replace(TARGETS[k], start_timeout_s=START_TIMEOUT_S) for k in keys]
    settings = Settings(targets, scenarios, args.duration, args.warmup, 1, "wrk",
                        *pinned_cpus(), rundir)
    counts: list[Count] = []
    with ProcessSet() as procs:
        start_services(procs, settings)
        for target in settings.targets:
            for scenario in scenarios:
                if target.scenarios is not None and scenario.key not in target.scenarios:
                    continue
                if scenario.unique and target.key not in UNIQUE_ONLY_FOR:
                    continue
                count = count_target(procs, target, scenario, settings, args.duration)
                if count is not None:
                    counts.append(count)
    if args.keep:
        log(f"callgrind dumps kept in {rundir}")
    else:
        shutil.rmtree(rundir, ignore_errors=True)
    text = render(counts, scenarios, args.duration)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
