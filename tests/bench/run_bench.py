#!/usr/bin/env python3
"""Benchmark Sluicegate against the floor proxy and LiteLLM, all in front of one nginx mock.

The method follows ../shared/bench/README.md: nginx serves a fixed chat.completion and a fixed
chat.completion.chunk stream; the load tool and nginx share CPU 0, the target runs alone on CPU 1.
Writes tests/bench/RESULTS.md and prints the table. Everything runs on 127.0.0.1 and every server
it starts is stopped at the end, also after an error or Ctrl-C.

    python tests/bench/run_bench.py                      # the full run (about 10 minutes)
    python tests/bench/run_bench.py --quick --targets direct,floor
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, however this is started

from bench_load import SCENARIOS, LoadError, Scenario, probe, request_body, run_load
from bench_procs import ProcessSet, Started, port_in_use, tree_rss_bytes, wait_port_free
from bench_report import TargetResult, main_table, ratios, render
from bench_targets import (
    HERE,
    LITELLM_VENV,
    MOCK_PORT,
    REDIS_PORT,
    ROOT,
    TARGET_PORT,
    TARGETS,
    NotRunnable,
    Target,
    mock_base,
)

SETTLE_S = 0.5  # lets a slow target drain the previous run's requests before the next one


@dataclass(frozen=True, slots=True)
class Settings:
    targets: list[Target]
    scenarios: list[Scenario]
    duration_s: int
    warmup_s: int
    rounds: int
    tool: str
    load_cpu: int | None
    target_cpu: int | None
    rundir: Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the mock -----------------------------------------------------------------------------------

def public_fixtures(rundir: Path) -> Path:
    """The fixed bodies, copied where nginx's unprivileged worker can read them.

    The checkout (or a 0700 temp dir such as pytest's) may not be traversable by the worker's
    user, which would answer 403.
    """
    public = Path(tempfile.mkdtemp(prefix="sluicegate-bench-fixtures-"))
    public.chmod(0o755)
    for name in ("chat.json", "chat.sse"):
        shutil.copyfile(HERE / name, public / name)
        (public / name).chmod(0o644)
    atexit.register(shutil.rmtree, public, True)
    return public


def start_mock(procs: ProcessSet, settings: Settings) -> Started:
    conf = (HERE / "nginx.conf.template").read_text()
    fixtures = public_fixtures(settings.rundir)
    for name, value in (("@RUN_DIR@", str(settings.rundir)), ("@BENCH_DIR@", str(fixtures)),
                        ("@PORT@", str(MOCK_PORT))):
        conf = conf.replace(name, value)
    conf_path = settings.rundir / "nginx.conf"
    conf_path.write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    # -e: the start-up error log too goes to our run directory, not /var/log/nginx.
    cmd = [nginx, "-c", str(conf_path), "-p", f"{settings.rundir}/",
           "-e", str(settings.rundir / "nginx-error.log")]
    mock = procs.start("nginx", cmd, log_path=settings.rundir / "nginx.log", cpu=settings.load_cpu)
    deadline = time.monotonic() + 10
    while True:
        reasons = [probe(mock_base(stream) + "/chat/completions", stream, 2)
                   for stream in (False, True)]
        if not any(reasons):
            return mock
        if mock.exited() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: the nginx mock did not come up: {reasons}\n{mock.log_tail()}")
        time.sleep(0.1)


def start_redis(procs: ProcessSet, settings: Settings) -> Started | None:
    """A Redis of the bench's own for the targets that use one, on the load CPU.

    Redis stands for a server on another machine: pinned beside nginx and the load tool it
    never takes CPU from the target, which is measured on one core.
    """
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(server).exists():
        raise SystemExit("bench: redis-server not found (the Redis targets need it)")
    if port_in_use(REDIS_PORT):
        raise SystemExit(f"bench: port {REDIS_PORT} on 127.0.0.1 already in use; free it first")
    cmd = [server, "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
           "--appendonly", "no", "--dir", str(settings.rundir)]
    started = procs.start("redis", cmd, log_path=settings.rundir / "redis.log",
                          cpu=settings.load_cpu)
    deadline = time.monotonic() + 10
    while not port_in_use(REDIS_PORT):
        if started.exited() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: redis-server did not come up\n{started.log_tail()}")
        time.sleep(0.05)
    return started


# --- one target ---------------------------------------------------------------------------------

def start_target(procs: ProcessSet, target: Target, stream: bool,
                 settings: Settings) -> tuple[Started | None, str | None]:
    """Start `target` in front of the JSON or SSE mock and wait for a good answer."""
    assert target.launch is not None
    try:
        launch = target.launch(mock_base(stream))
    except NotRunnable as exc:
        return None, str(exc)
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(launch.env)
    phase = "sse" if stream else "json"
    log(f"[{target.key}] starting for {phase}: {' '.join(launch.cmd)}")
    try:
        started = procs.start(target.key, launch.cmd, cwd=launch.cwd, env=env,
                              log_path=settings.rundir / f"{target.key}-{phase}.log",
                              cpu=settings.target_cpu)
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    failure = wait_ready(started, target, stream)
    if failure is not None:
        procs.stop(started)
        wait_port_free(TARGET_PORT, 15)
        return None, failure
    return started, None


def wait_ready(started: Started, target: Target, stream: bool) -> str | None:
    """None once the target answers a real request well; else why it never did."""
    begin = time.monotonic()
    wrong_since: float | None = None
    while True:
        code = started.exited()
        if code is not None:
            return f"exited with code {code}: {started.log_tail(3)}"
        reason = probe(target.url(stream), stream, timeout_s=10)
        if reason is None:
            log(f"[{target.key}] ready after {time.monotonic() - begin:.1f}s")
            return None
        now = time.monotonic()
        answered = not reason.startswith(("ConnectionRefusedError", "RemoteDisconnected"))
        wrong_since = (wrong_since or now) if answered else None
        # A server that answers, but wrongly, for 3 s is misconfigured, not still starting.
        if wrong_since is not None and now - wrong_since > 3:
            return f"bad answer: {reason}"
        if now - begin > target.start_timeout_s:
            return f"not ready within {target.start_timeout_s:.0f}s ({reason})"
        time.sleep(0.25)


def run_scenario(target: Target, scenario: Scenario, settings: Settings,
                 result: TargetResult) -> None:
    url = target.url(scenario.stream)
    try:
        if settings.warmup_s > 0:
            run_load(settings.tool, url, scenario, settings.warmup_s, cpu=settings.load_cpu,
                     server_timing=target.server_timing)
            time.sleep(SETTLE_S)
        for number in range(1, settings.rounds + 1):
            run = run_load(settings.tool, url, scenario, settings.duration_s,
                           cpu=settings.load_cpu, server_timing=target.server_timing)
            result.rounds.setdefault(scenario.key, []).append(run)
            errors = f" errors {run.errors}" if run.errors else ""
            server = (f", server-side p50 {run.server_p50_ms:.3f} ms"
                      if run.server_p50_ms is not None else "")
            log(f"[{target.key}] {scenario.label} round {number}/{settings.rounds}: "
                f"{run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms"
                f"{server}{errors}")
            time.sleep(SETTLE_S)
    except LoadError as exc:
        result.problems[scenario.key] = str(exc)
        log(f"[{target.key}] {scenario.label}: {exc}")


def bench_target(procs: ProcessSet, target: Target, settings: Settings) -> TargetResult:
    """The JSON scenarios, then the SSE ones; a proxy is restarted between, as its upstream
    base URL is fixed when it starts."""
    result = TargetResult(target.key, target.label)
    for stream in (False, True):
        scenarios = [s for s in settings.scenarios if s.stream == stream
                     and (target.scenarios is None or s.key in target.scenarios)]
        if not scenarios:
            continue
        # Headers the target needs on every request (the probe, wrk and hey read them);
        # "{upstream}" is the mock's base URL for this phase (Portkey routes by header).
        os.environ["BENCH_HEADERS"] = "|".join(
            f"{name}: {value.replace('{upstream}', mock_base(stream))}"
            for name, value in target.headers)
        if target.launch is None:
            for scenario in scenarios:
                run_scenario(target, scenario, settings, result)
            continue
        started, failure = start_target(procs, target, stream, settings)
        if started is None:
            log(f"[{target.key}] failed to start: {failure}")
            if not result.rounds:
                result.failure = failure
                return result
            result.problems.update({s.key: f"failed to start: {failure}" for s in scenarios})
            continue
        try:
            for scenario in scenarios:
                run_scenario(target, scenario, settings, result)
            rss = tree_rss_bytes(started.proc.pid)
            result.rss_bytes = max(rss, result.rss_bytes or 0)
        finally:
            procs.stop(started)
            if not wait_port_free(TARGET_PORT, 15):
                raise SystemExit(f"bench: port {TARGET_PORT} still busy after stopping {target.key}")
    return result


# --- the report ---------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _litellm_version() -> str:
    found = sorted(LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "—"


def _output_lines(cmd: list[str]) -> list[str]:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (done.stdout + done.stderr).splitlines()


def _deb_version(package: str) -> str:
    lines = _output_lines(["dpkg-query", "-W", "-f=${Version}", package])
    return lines[0] if lines and "no packages found" not in lines[0] else "not installed"


def machine_lines(settings: Settings) -> list[str]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in _output_lines(["lscpu"])
                      if line.startswith("Model name:")), "unknown CPU")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    pinning = ("load tool, nginx and the bench's Redis (port 18379) on CPU 0, the target on"
               " CPU 1 (`taskset`)"
               if settings.target_cpu is not None else "none (fewer than 2 CPUs available)")
    hardware = (f"{os.cpu_count()} CPUs (`nproc`), {cpu_model}, "
                f"{mem_kib / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}")
    python = (f"Python {platform.python_version()}; hypercorn {_version('hypercorn')}, "
              f"uvloop {_version('uvloop')}, aiohttp {_version('aiohttp')}, "
              f"sluicegate {_version('sluicegate')}")
    tools = (f"Debian packages: wrk {_deb_version('wrk')}, hey {_deb_version('hey')}, "
             f"nginx-light {_deb_version('nginx-light')}; LiteLLM {_litellm_version()} (own venv)")
    return [hardware, python, tools, f"CPU pinning: {pinning}"]


def method_lines(settings: Settings) -> list[str]:
    json_size = (HERE / "chat.json").stat().st_size
    sse = (HERE / "chat.sse").read_bytes()
    tool = ("`wrk -t1 -cN --latency --timeout 10s -s post.lua`" if settings.tool == "wrk"
            else "`hey -cpus 1 -c N -z D`")
    mock = (f"Mock: nginx (1 worker) on 127.0.0.1:{MOCK_PORT}; `POST /json/v1/chat/completions` "
            f"answers a fixed {json_size}-byte `chat.completion`, `POST /sse/v1/chat/completions` "
            f"a fixed {sse.count(b'data: ')}-event `chat.completion.chunk` stream of "
            f"{len(sse) / 1000:.1f} KB with a usage chunk and `data: [DONE]`.")
    load = (f"Load: {tool}, `POST /v1/chat/completions` with `{request_body(False)}` (plus "
            '`"stream":true` for SSE) and `Authorization: Bearer sk-sg-bench-not-a-secret-0123456789`. Latency is the time '
            "to the complete response.")
    rounds = (f"Each scenario: a {settings.warmup_s} s warm-up, then {settings.rounds} round(s) "
              f"of {settings.duration_s} s. req/s counts successful responses only and is shown "
              "as the range over the rounds; latencies are the mean over the rounds.")
    targets = (f"Targets listen on 127.0.0.1:{TARGET_PORT}; each is started for the JSON "
               "scenarios and restarted for the SSE ones (its upstream base URL is fixed at "
               "start). floor: `hypercorn -w 1 -k uvloop floor_proxy:app`; Sluicegate: "
               "`sluicegate serve --config tests/bench/config_{bare,default}.py --workers 1`; "
               "LiteLLM: `litellm --config litellm_config.yaml --num_workers 1`, no database.")
    rss = ("RSS: the target's process plus all its descendants (from /proc) at the end of each "
           "phase; the larger of the two is shown.")
    return [mock, load, rounds, targets, rss]


def write_outputs(results: list[TargetResult], settings: Settings, output: Path) -> None:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = render(results, when=when, machine=machine_lines(settings),
                  method=method_lines(settings))
    output.write_text(text)
    raw = ROOT / ".bench" / "results.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    print(main_table(results))
    print()
    print(ratios(results))
    print(f"\nwritten: {output} (raw numbers: {raw})")


# --- the command --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS if s.by_default),
                        help="comma-separated subset of the scenarios (default: all but "
                             "sse-c16-unique)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per round (10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per scenario (3)")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (2)")
    parser.add_argument("--quick", action="store_true",
                        help="1 s warm-up and one 3 s round: about a minute for three targets")
    parser.add_argument("--tool", choices=("wrk", "hey"), default="wrk", help="load generator")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 3, 1, 1
    return args


def pick(names: str, known: dict[str, object], what: str) -> list[str]:
    """The comma-separated `names`, each one of `known` (SystemExit naming the others)."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise SystemExit(f"bench: unknown {what} {unknown}; choose from {', '.join(known)}")
    return chosen


def make_settings(args: argparse.Namespace, rundir: Path) -> Settings:
    targets = [TARGETS[k] for k in pick(args.targets, dict(TARGETS), "targets")]
    scenario_map = {s.key: s for s in SCENARIOS}
    picked = set(pick(args.scenarios, dict(scenario_map), "scenarios"))
    if min(args.duration, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("bench: --duration and --rounds must be at least 1, --warmup at least 0")
    return Settings(targets, [s for s in SCENARIOS if s.key in picked], args.duration,
                    args.warmup, args.rounds, args.tool, *pinned_cpus(), rundir)


def pinned_cpus() -> tuple[int | None, int | None]:
    """(load CPU, target CPU): 0 and 1 where both are ours and taskset exists, else unpinned."""
    if {0, 1} <= os.sched_getaffinity(0) and shutil.which("taskset") is not None:
        return 0, 1
    return None, None


def preflight(tools: Sequence[str], ports: Sequence[int] = (MOCK_PORT, TARGET_PORT)) -> None:
    """SystemExit unless `tools` and nginx are installed and `ports` are free."""
    missing = [b for b in (*tools, "nginx") if shutil.which(b) is None
               and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not installed (run `make bench-tools`)")
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        raise SystemExit(f"bench: port(s) {busy} on 127.0.0.1 already in use; free them first")


def start_services(procs: ProcessSet, settings: Settings) -> None:
    """The nginx mock, and the bench's Redis when a target needs it."""
    start_mock(procs, settings)
    if any(t.needs_redis for t in settings.targets):
        start_redis(procs, settings)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwinds through ProcessSet, which stops every server. SIGINT too is set here: a shell
    # starts background jobs with it ignored, and Python then never raises KeyboardInterrupt.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight([args.tool])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    rundir = Path(tempfile.mkdtemp(prefix="sluicegate-bench-"))
    settings = make_settings(args, rundir)
    results: list[TargetResult] = []
    try:
        with ProcessSet() as procs:
            start_services(procs, settings)
            for target in settings.targets:
                results.append(bench_target(procs, target, settings))
    except KeyboardInterrupt as exc:
        log(f"bench: interrupted ({exc or 'SIGINT'}); every server it started has been stopped")
        return 130
    finally:
        failed = any(r.failure or r.problems for r in results)
        if args.keep_logs or failed:
            log(f"bench: server logs kept in {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    write_outputs(results, settings, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
