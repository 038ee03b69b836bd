#!/usr/bin/env python3
"""Shows, on demand, that metering loses nothing while PostgreSQL is down, and how fast the
writer is. Everything runs on 127.0.0.1 and stops at the end.

    python tests/bench/metering_outage.py                    # 12 s outage inside 30 s of load
    python tests/bench/metering_outage.py --outage-s 60 --load-s 80   # the 60 s memory check
    python tests/bench/metering_outage.py --writer-only      # records/s into PostgreSQL

The outage run: a mock provider, a gateway (`sluicegate serve`, 1 worker) whose usage store
reaches PostgreSQL through a TCP relay, and client threads sending chat requests and logging
every answer's request id. The relay is switched off for `--outage-s` seconds (connections cut,
new ones refused), then on again. At the end it checks: no request failed; `usage_events` has
exactly one row per answered request id (no more, no fewer); the rollups equal the sums of the
events. It prints the gateway's peak RSS before, during and after the outage, and the journal's
peak size on disk.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx
import psycopg

from tests.bench.bench_procs import tree_rss_bytes
from tests.harness import TEST_KEY, free_port, mock_config, start_cli_gateway
from tests.mock_providers import MockProviderServer
from tests.tcp_proxy import TcpProxy

PG_PORT = 5432
DSN = "host=127.0.0.1 port={port} user=root dbname=test"
MIB = 1024 * 1024


class Relay:
    """The TCP relay to PostgreSQL, on an event loop of its own in a thread."""

    def __init__(self) -> None:
        self.proxy = TcpProxy(PG_PORT, port=free_port())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _run(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)  # type: ignore[arg-type]

    def start(self) -> None:
        self._run(self.proxy.start())

    def stop(self) -> None:
        self._run(self.proxy.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def config_text(mock_url: str, dsn: str, prefix: str, journal: Path) -> str:
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              f"Middleware(MeteringMiddleware, store=PostgresUsageStore({dsn!r}, "
              f"prefix={prefix!r}, timeout_s=2), journal_dir={str(journal)!r}, "
              "retry_interval_s=0.5)]")
    return mock_config(mock_url, middleware=layers).replace(
        "from middleware.metering import MeteringMiddleware",
        "from middleware.metering import MeteringMiddleware, PostgresUsageStore")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def outage_run(args: argparse.Namespace) -> int:
    prefix = "sg_demo_" + uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="sluicegate-metering-demo-"))
    journal = workdir / "journal"
    mock = MockProviderServer()
    mock.start()
    relay = Relay()
    relay.start()
    config = workdir / "config.py"
    config.write_text(config_text(f"http://127.0.0.1:{mock.port}",
                                  DSN.format(port=relay.proxy.port), prefix, journal))
    process, url = start_cli_gateway(config, log_path=workdir / "gateway.log")
    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
                        json={"model": "gpt-mock",
                              "messages": [{"role": "user", "content": "meter me"}]})
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    continue
                if response.status_code == 200:
                    answered.append(response.headers["x-request-id"])
                else:
                    failures.append(f"HTTP {response.status_code}")

    rss = {"before": 0, "during": 0, "after": 0}
    journal_peak = 0
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    started = time.monotonic()
    outage_at, back_at = args.outage_start_s, args.outage_start_s + args.outage_s
    phase = "before"
    try:
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < args.load_s:
            if phase == "before" and elapsed >= outage_at:
                relay.stop()
                phase = "during"
                print(f"[{elapsed:5.1f} s] PostgreSQL unreachable "
                      f"({len(answered)} answered so far)", flush=True)
            elif phase == "during" and elapsed >= back_at:
                relay.start()
                phase = "after"
                print(f"[{elapsed:5.1f} s] PostgreSQL back ({len(answered)} answered so far)",
                      flush=True)
            rss[phase] = max(rss[phase], tree_rss_bytes(process.pid))
            journal_peak = max(journal_peak, dir_bytes(journal))
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 60
        while True:
            with psycopg.connect(DSN.format(port=PG_PORT), autocommit=True) as conn:
                ids = {row[0] for row in conn.execute(
                    f"SELECT request_id FROM {prefix}_events").fetchall()}
                total = conn.execute(f"SELECT count(*) FROM {prefix}_events").fetchone()
            if len(ids) >= len(answered) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rollups_ok = rollups_equal_events(prefix)
    finally:
        stop.set()
        process.terminate()
        process.wait(30)
        relay.close()
        mock.stop()
        drop(prefix)
    rows = total[0] if total else 0
    missing, extra = set(answered) - ids, ids - set(answered)
    print(f"\nload: {args.load_s} s, {args.concurrency} clients; PostgreSQL away for "
          f"{args.outage_s} s")
    print(f"answered: {len(answered)}   failed requests: {len(failures)}"
          f"{' ' + str(sorted(set(failures))) if failures else ''}")
    print(f"usage_events rows: {rows} ({len(ids)} distinct request ids); answered without a "
          f"row: {len(missing)}; rows for no answer: {len(extra)}")
    print(f"rollups equal the sums of the events: {rollups_ok}")
    print("gateway peak RSS: " + ", ".join(f"{k} the outage {v / MIB:.0f} MiB"
                                           for k, v in rss.items()))
    print(f"journal peak on disk: {journal_peak / MIB:.1f} MiB")
    ok = not failures and not missing and not extra and rows == len(answered) and rollups_ok
    print("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def rollups_equal_events(prefix: str) -> bool:
    with psycopg.connect(DSN.format(port=PG_PORT), autocommit=True) as conn:
        for grain in ("minute", "day"):
            for kind, subject in (("key", "key_id"), ("project", "project"),
                                  ("model", "model")):
                expected = conn.execute(
                    f"SELECT {subject}, date_trunc('{grain}', started_at, 'UTC'), count(*), "
                    f"sum(input_tokens), sum(output_tokens), sum(cost) FROM {prefix}_events "
                    f"WHERE {subject} IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
                found = conn.execute(
                    f"SELECT subject, bucket, requests, input_tokens, output_tokens, cost "
                    f"FROM {prefix}_rollups WHERE grain = %s AND kind = %s ORDER BY 1, 2",
                    (grain, kind)).fetchall()
                if expected != found:
                    return False
    return True


def drop(prefix: str) -> None:
    with psycopg.connect(DSN.format(port=PG_PORT), autocommit=True) as conn:
        for table in ("events", "rollups", "schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table} CASCADE")


def writer_run(args: argparse.Namespace) -> int:
    """Records per second the PostgreSQL writer sustains (COPY + insert + rollups)."""
    from middleware.metering.record import UsageRecord
    from middleware.metering.store import PostgresUsageStore

    async def run() -> float:
        prefix = "sg_writer_" + uuid.uuid4().hex[:8]
        store = PostgresUsageStore(DSN.format(port=PG_PORT), prefix=prefix, timeout_s=60)
        await store.startup()
        now = time.time()
        records = [UsageRecord(request_id=uuid.uuid4().hex, started_at=now - i * 0.001,
                               ended_at=now, key_id=f"key-{i % 50}", project=f"p{i % 5}",
                               customer=f"c{i % 200}" if i % 3 else None, model=f"m{i % 4}",
                               input_tokens=100 + i % 50, output_tokens=20 + i % 30,
                               cost_micros=1000 + i % 700, status=200, latency_ms=1.5)
                   for i in range(args.records)]
        try:
            await store.write(records[:args.batch])  # warm: schema, partition, plans
            begin = time.perf_counter()
            for start in range(args.batch, len(records), args.batch):
                await store.write(records[start:start + args.batch])
            elapsed = time.perf_counter() - begin
        finally:
            await store.shutdown()
            drop(prefix)
        return (len(records) - args.batch) / elapsed
    rate = asyncio.run(run())
    print(f"writer: {rate:,.0f} records/s into PostgreSQL ({args.records:,} records, batches "
          f"of {args.batch}, COPY + ON CONFLICT insert + minute/day rollups per batch)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-s", type=float, default=30.0)
    parser.add_argument("--outage-start-s", type=float, default=6.0)
    parser.add_argument("--outage-s", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--writer-only", action="store_true")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("SLUICEGATE_JOURNAL_DIR", tempfile.mkdtemp())
    if args.writer_only:
        return writer_run(args)
    if args.outage_start_s + args.outage_s >= args.load_s:
        raise SystemExit("the outage must end before the load does")
    code = outage_run(args)
    writer_run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
