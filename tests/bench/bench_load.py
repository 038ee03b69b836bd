"""Load generation for the benchmarks: the scenarios, wrk and hey runs, and a correctness probe."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench_procs import pinned

HERE = Path(__file__).resolve().parent
POST_LUA = HERE / "post.lua"
TOKEN = "sk-sg-bench-not-a-secret-0123456789"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load shape: JSON or SSE responses at a fixed number of concurrent connections."""

    key: str
    stream: bool
    concurrency: int
    unique: bool = False  # a new prompt every request (wrk only): the cache's miss path
    by_default: bool = True  # run by `make bench` unless --scenarios names others

    @property
    def label(self) -> str:
        unique = ", new prompts" if self.unique else ""
        return f"{'SSE' if self.stream else 'JSON'} c={self.concurrency}{unique}"


SCENARIOS = (
    Scenario("json-c1", False, 1),
    Scenario("json-c16", False, 16),
    Scenario("json-c64", False, 64),
    Scenario("sse-c16", True, 16),
    Scenario("sse-c64", True, 64),
    Scenario("json-c16-unique", False, 16, unique=True),
    # A stream the cache misses is stored as the answer it amounts to, read back event by
    # event: the miss path's cost for streams (cache-miss and bare; asked for by name).
    Scenario("sse-c16-unique", True, 16, unique=True, by_default=False),
)


def request_body(stream: bool) -> str:
    body: dict[str, object] = {"model": "bench", "messages": MESSAGES}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


@dataclass(slots=True)
class RoundResult:
    """One measured run of the load tool. Latency is time to the complete response."""

    ok: int                 # responses with a 2xx/3xx status
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count, only non-zero kinds
    server_p50_ms: float | None = None  # the Server-Timing header's median, when collected
    server_p99_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


class LoadError(RuntimeError):
    """The load tool failed or printed nothing we can read."""


_WRK_LINE = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


def parse_wrk(output: str) -> RoundResult:
    """Read the BENCH_RESULT line that post.lua's done() prints."""
    match = _WRK_LINE.search(output)
    if match is None:
        raise LoadError(f"no BENCH_RESULT line in wrk output: {output.strip()[-300:]!r}")
    values = {k: int(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}
    errors = {k: values[k] for k in ("connect", "read", "write", "status", "timeout") if values[k]}
    return RoundResult(ok=values["requests"] - values["status"],
                       duration_s=values["duration_us"] / 1e6,
                       p50_ms=values["p50_us"] / 1000, p99_ms=values["p99_us"] / 1000,
                       errors=errors, **_server_timing(values))


def _server_timing(values: dict[str, int]) -> dict[str, float]:
    if values.get("server_n", 0) <= 0:
        return {}
    return {"server_p50_ms": values["server_p50_us"] / 1000,
            "server_p99_ms": values["server_p99_us"] / 1000}


_HEY_TOTAL = re.compile(r"Total:\s+([\d.]+) secs")
_HEY_PCT = re.compile(r"(\d+)%+ in ([\d.]+) secs")
_HEY_STATUS = re.compile(r"\[(\d{3})\]\s+(\d+) responses")
_HEY_ERROR = re.compile(r"^\s+\[(\d+)\]\s+\S", re.MULTILINE)


def parse_hey(output: str) -> RoundResult:
    """Read hey's text summary (total time, latency distribution, status codes, errors)."""
    total = _HEY_TOTAL.search(output)
    if total is None:
        raise LoadError(f"no summary in hey output: {output.strip()[-300:]!r}")
    pct = {int(p): float(s) * 1000 for p, s in _HEY_PCT.findall(output)}
    statuses = {int(code): int(n) for code, n in _HEY_STATUS.findall(output)}
    ok = sum(n for code, n in statuses.items() if code < 400)
    errors = {f"status {code}": n for code, n in statuses.items() if code >= 400}
    tail = output.split("Error distribution:", 1)
    failed = sum(int(n) for n in _HEY_ERROR.findall(tail[1])) if len(tail) == 2 else 0
    if failed:
        errors["socket"] = failed
    return RoundResult(ok=ok, duration_s=float(total.group(1)), p50_ms=pct.get(50, 0.0),
                       p99_ms=pct.get(99, 0.0), errors=errors)


def wrk_command(url: str, scenario: Scenario, duration_s: int) -> list[str]:
    return ["wrk", "-t1", f"-c{scenario.concurrency}", f"-d{duration_s}s", "--latency",
            "--timeout", "10s", "-s", str(POST_LUA), url]


def extra_headers() -> dict[str, str]:
    """Headers the current target needs on every request (`BENCH_HEADERS`, set per target by
    run_bench.py as "Name: value|Name: value"; post.lua reads the same variable)."""
    pairs = (item.partition(":") for item in os.environ.get("BENCH_HEADERS", "").split("|"))
    return {name.strip(): value.strip() for name, _, value in pairs if name.strip()}


def hey_command(url: str, scenario: Scenario, duration_s: int) -> list[str]:
    extra = [arg for name, value in extra_headers().items() for arg in ("-H", f"{name}: {value}")]
    return ["hey", "-z", f"{duration_s}s", "-c", str(scenario.concurrency), "-cpus", "1",
            "-m", "POST", "-T", "application/json", "-H", f"Authorization: Bearer {TOKEN}",
            *extra, "-t", "10", "-disable-compression", "-d", request_body(scenario.stream), url]


def run_load(tool: str, url: str, scenario: Scenario, duration_s: int, *,
             cpu: int | None, server_timing: bool = False) -> RoundResult:
    """One run of wrk or hey against `url`, bounded in time, pinned to `cpu`.
    `server_timing`: also collect the target's Server-Timing header (wrk only)."""
    if tool == "wrk":
        cmd, parse = wrk_command(url, scenario, duration_s), parse_wrk
    elif scenario.unique:
        raise LoadError("new prompts on every request need wrk (--tool wrk)")
    else:
        cmd, parse = hey_command(url, scenario, duration_s), parse_hey
    env = dict(os.environ, BENCH_BODY=request_body(scenario.stream), BENCH_TOKEN=TOKEN,
               BENCH_UNIQUE="1" if scenario.unique else "0",
               BENCH_SERVER_TIMING="1" if server_timing else "0")
    try:
        done = subprocess.run(pinned(cmd, cpu), check=False, env=env, capture_output=True, text=True,
                              timeout=duration_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{tool} did not finish within {duration_s + 30}s") from exc
    if done.returncode != 0:
        raise LoadError(f"{tool} exited {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
    return parse(done.stdout)


def probe(url: str, stream: bool, timeout_s: float = 10.0) -> str | None:
    """One real request; None if the answer is a well-formed completion, else why not."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout_s)
    try:
        conn.request("POST", "/" + path, body=request_body(stream),
                     headers={"Content-Type": "application/json",
                              "Authorization": f"Bearer {TOKEN}", **extra_headers()})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return _judge(resp.status, resp.getheader("content-type") or "", body, stream)


def _judge(status: int, content_type: str, body: bytes, stream: bool) -> str | None:
    snippet = body[:200].decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {snippet}"
    if stream:
        if not content_type.startswith("text/event-stream") or b"data: [DONE]" not in body:
            return f"not an SSE stream ending in [DONE] ({content_type}): {snippet}"
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"not JSON: {snippet}"
    if not isinstance(parsed, dict) or not parsed.get("choices"):
        return f"no choices in the completion: {snippet}"
    return None
