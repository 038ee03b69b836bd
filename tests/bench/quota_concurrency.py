"""Do budgets and rate limits hold under concurrency across gateway processes? A verification
benchmark (a script, not collected by pytest).

It starts the mock providers (`python -m tests.mock_providers`) and two `sluicegate serve`
processes (one worker each) that share one Redis under a fresh key prefix, with three virtual
keys: one whose budget admits exactly N requests, one with rpm=N, and one whose TPM limit is N
requests' token reservations. For each key it releases C concurrent requests at once, half to
each process, waits until every settle has landed, and prints a markdown table.

Every request reserves exactly what it then uses (the prompt "a b c d e f" with max_tokens=5:
14 tokens, 19 micro-dollars at the harness's $1/$2 per 1M tokens), so N admitted is exact:
- budget: exactly N admitted, the rest 402 budget_exceeded, and the recorded spend (the Redis
  budget counter) at most the cap plus the largest amount by which a request's actual cost
  exceeded its reservation (0 here);
- rpm, tpm: N admitted plus what the bucket refilled while the burst ran (N/60 requests per
  second), the rest 429 rate_limit_exceeded with Retry-After.

Usage, from the repository root, with Redis on 127.0.0.1:6379:

    python tests/bench/quota_concurrency.py [--requests 200] [--admit 20]
                                            [--redis-url redis://127.0.0.1:6379/0]

Exit status: 0 when every bound holds, 1 when one is violated, 2 when it could not run.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: the repository's packages are not installed
    sys.path.insert(0, str(REPO))

import httpx
import redis

from gateway.context import Usage
from gateway.policy import micros_to_usd
from gateway.pricing import Price, cost_micros, estimate_micros
from gateway.tokens import estimate_messages
from tests.harness import (
    free_port,
    mock_config,
    start_cli_gateway,
    stop_process,
    wait_until_up,
    write_config,
)

PRICE = Price(input_per_mtok="1", output_per_mtok="2")  # the harness's MOCK_PRICE
MESSAGES = [{"role": "user", "content": "a b c d e f"}]
MAX_TOKENS = 5
CHAT = {"model": "gpt-mock", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
RESERVED_TOKENS = estimate_messages(MESSAGES) + MAX_TOKENS
RESERVED_MICROS = estimate_micros(PRICE, estimate_messages(MESSAGES), MAX_TOKENS)
REFUSALS = {"budget": (402, "budget_exceeded"), "rpm": (429, "rate_limit_exceeded"),
            "tpm": (429, "rate_limit_exceeded")}


@dataclass(frozen=True)
class Outcome:
    status: int
    code: str | None
    retry_after: str | None
    usage: dict[str, Any] | None


@dataclass(frozen=True)
class Row:
    limit: str
    requests: int
    admitted: int
    refused: int
    other: int
    cap: str
    recorded: str
    overshoot: str
    burst_s: float
    problems: list[str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests per limit")
    parser.add_argument("--admit", type=int, default=20, help="N, what each limit admits")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if args.admit < 1 or args.requests < args.admit:
        parser.error("--admit must be at least 1 and no more than --requests")
    return args


def gateway_config(mock_url: str, redis_url: str, prefix: str, admit: int) -> str:
    cap_usd = micros_to_usd(admit * RESERVED_MICROS)
    limits = {
        "budget": f"Limits(budgets=(Budget({str(cap_usd)!r}, period='lifetime'),))",
        "rpm": f"Limits(rpm={admit})",
        "tpm": f"Limits(tpm={admit * RESERVED_TOKENS})",
    }
    keys = ", ".join(f"StaticKey('bench', key_env='SG_BENCH_KEY_{name.upper()}', "
                     f"id='k_{name}', limits={value})" for name, value in limits.items())
    extra = ("from middleware.quota import RedisQuotaStore\n"
             f"middleware = [Middleware(AuthMiddleware, keys=[{keys}]), "
             f"Middleware(QuotaMiddleware, store=RedisQuotaStore({redis_url!r}, "
             f"prefix={prefix!r}))]\n")
    return mock_config(mock_url, middleware="[]", extra=extra)


async def burst(urls: list[str], key: str, count: int) -> tuple[list[Outcome], float]:
    """`count` requests released at once, alternating between `urls`; (outcomes, seconds)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        go = asyncio.Event()

        async def one(index: int) -> Outcome:
            await go.wait()
            try:
                response = await client.post(urls[index % len(urls)] + "/v1/chat/completions",
                                             json=CHAT, headers={"authorization": f"Bearer {key}"})
            except httpx.HTTPError as exc:
                return Outcome(0, type(exc).__name__, None, None)
            body = response.json()
            error = body.get("error") if isinstance(body, dict) else None
            return Outcome(response.status_code, error.get("code") if error else None,
                           response.headers.get("retry-after"),
                           body.get("usage") if response.status_code == 200 else None)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0)
        started = time.monotonic()
        go.set()
        outcomes = await asyncio.gather(*tasks)
        return outcomes, time.monotonic() - started


def budget_counter(client: redis.Redis, key: str, expected: int, timeout_s: float = 10.0) -> int:
    """The budget counter once every settle has landed (it reaches `expected` and stays)."""
    deadline = time.monotonic() + timeout_s
    value = int(client.get(key) or 0)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = int(client.get(key) or 0)
    time.sleep(0.3)  # a late settle would still move it
    return int(client.get(key) or 0)


def judge(kind: str, outcomes: list[Outcome], burst_s: float, admit: int,
          client: redis.Redis, prefix: str) -> Row:
    refusal = REFUSALS[kind]
    tally = Counter((o.status, o.code) for o in outcomes)
    admitted, refused = tally[(200, None)], tally[refusal]
    other = len(outcomes) - admitted - refused
    used = [o.usage for o in outcomes if o.usage is not None]
    problems = [f"{other} answers were neither 200 nor {refusal[0]} {refusal[1]}"] if other else []
    if kind == "budget":
        spent = [cost_micros(PRICE, Usage(input_tokens=u["prompt_tokens"],
                                          output_tokens=u["completion_tokens"])) for u in used]
        cap = admit * RESERVED_MICROS
        error = max([0, *(s - RESERVED_MICROS for s in spent)])
        recorded = budget_counter(client, f"{prefix}:key:k_budget:budget:lifetime:all", sum(spent))
        low = high = admit
        if recorded > cap + error:
            problems.append(f"recorded spend {recorded} µ$ exceeds the cap {cap} µ$ by more than "
                            f"one request's reservation error ({error} µ$)")
        if recorded != sum(spent):
            problems.append(f"recorded spend {recorded} µ$ is not the {sum(spent)} µ$ the "
                            "admitted requests cost")
        cap_text, recorded_text = f"${micros_to_usd(cap)}", f"${micros_to_usd(recorded)}"
        overshoot = f"${micros_to_usd(max(0, recorded - cap))}"
    else:
        per_request = 1 if kind == "rpm" else RESERVED_TOKENS
        refill = math.floor(burst_s * admit / 60)  # requests the bucket refilled meanwhile
        low, high = admit, admit + refill
        cap = admit * per_request
        recorded = admitted if kind == "rpm" else sum(u["total_tokens"] for u in used)
        unit = "requests" if kind == "rpm" else "tokens"
        cap_text = f"{cap} {unit}/min" + (f" (+{refill * per_request} refilled)" if refill else "")
        recorded_text = f"{recorded} {unit}"
        overshoot = f"{max(0, recorded - high * per_request)} {unit}"
        waits = [o.retry_after for o in outcomes if (o.status, o.code) == refusal]
        if not all(w is not None and 1 <= int(w) <= math.ceil(60 / admit) for w in waits):
            problems.append("a 429 lacks a Retry-After between 1 and 60/N seconds")
    if not low <= admitted <= high:
        problems.append(f"{admitted} admitted, expected {low}" + (f" to {high}" if high > low
                                                                  else ""))
    label = {"budget": f"budget (N={admit})", "rpm": f"rpm={admit}",
             "tpm": f"tpm={admit * RESERVED_TOKENS} (N={admit})"}[kind]
    return Row(label, len(outcomes), admitted, refused, other, cap_text, recorded_text,
               overshoot, burst_s, problems)


def table(rows: list[Row]) -> str:
    header = ("| limit | requests | admitted (200) | refused | other errors | cap | recorded | "
              "overshoot | burst s | bounds |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = "ok" if not r.problems else "VIOLATED: " + "; ".join(r.problems)
        lines.append(f"| {r.limit} | {r.requests} | {r.admitted} | {r.refused} | {r.other} | "
                     f"{r.cap} | {r.recorded} | {r.overshoot} | {r.burst_s:.2f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"quota_concurrency: Redis at {args.redis_url} is unreachable ({exc}).",
              file=sys.stderr)
        return 2
    prefix = f"{{sgbench-{uuid.uuid4().hex}}}"
    workdir = Path(tempfile.mkdtemp(prefix="sg-quota-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        mock_port = free_port()
        mock_log = open(workdir / "mock.log", "wb")  # noqa: SIM115 (Popen keeps it)
        mock = subprocess.Popen([sys.executable, "-m", "tests.mock_providers", "--port",
                                 str(mock_port), "--no-record"], cwd=REPO, stdout=mock_log,
                                stderr=subprocess.STDOUT)
        processes.append(mock)
        mock_url = f"http://127.0.0.1:{mock_port}"
        wait_until_up(mock_url, process=mock, health_path="/_mock/health")
        path = write_config(workdir, gateway_config(mock_url, args.redis_url, prefix,
                                                    args.admit))
        keys = {kind: "sk-sg-bench-" + uuid.uuid4().hex for kind in REFUSALS}
        env = {f"SG_BENCH_KEY_{kind.upper()}": key for kind, key in keys.items()}
        urls = []
        for name in ("a", "b"):
            process, url = start_cli_gateway(path, workers=1, env=env,
                                             log_path=workdir / f"gateway-{name}.log")
            processes.append(process)
            urls.append(url)
        rows = []
        for kind, key in keys.items():
            outcomes, burst_s = asyncio.run(burst(urls, key, args.requests))
            rows.append(judge(kind, outcomes, burst_s, args.admit, client, prefix))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"quota_concurrency: could not run ({exc}); logs in {workdir}.", file=sys.stderr)
        return 2
    finally:
        for process in reversed(processes):
            stop_process(process)
        stale = list(client.scan_iter(match=f"{prefix}*"))
        if stale:
            client.delete(*stale)
        client.close()
    print(f"Two gateway processes (--workers 1 each) sharing Redis; {args.requests} concurrent "
          f"requests per limit, half to each; every request reserves {RESERVED_TOKENS} tokens "
          f"and {RESERVED_MICROS} micro-dollars and uses exactly that.\n")
    print(table(rows))
    if any(r.problems for r in rows):
        print(f"\nA bound was violated; gateway logs in {workdir}.", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
