"""The benchmark harness's own logic: output parsing, the report, process trees, the fixtures."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the harness imports its siblings by plain name, as a script

import bench_load
import bench_procs
import bench_report
import run_bench
from bench_load import LoadError, RoundResult
from bench_report import TargetResult

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:18100/v1/chat/completions
  1 threads and 16 connections
  Latency Distribution
     50%    5.10ms
Non-2xx or 3xx responses: 7
BENCH_RESULT requests=28507 duration_us=10002000 bytes=19270732 p50_us=5100 p90_us=7000 \
p99_us=9800 max_us=20011 connect=0 read=2 write=0 status=7 timeout=0
"""

HEY_OUTPUT = """
Summary:
  Total:\t2.0031 secs
  Slowest:\t0.0601 secs
  Requests/sec:\t1012.1234

Latency distribution:
  10% in 0.0051 secs
  50% in 0.0124 secs
  99% in 0.0502 secs

Status code distribution:
  [200]\t2000 responses
  [502]\t25 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:18100/v1/chat/completions": EOF
"""


# --- parsing the load tools ---------------------------------------------------------------------

def test_wrk_summary_counts_only_successful_responses() -> None:
    run = bench_load.parse_wrk(WRK_OUTPUT)
    assert run.ok == 28500
    assert run.duration_s == pytest.approx(10.002)
    assert run.rps == pytest.approx(28500 / 10.002)
    assert (run.p50_ms, run.p99_ms) == (5.1, 9.8)
    assert run.errors == {"read": 2, "status": 7}


def test_wrk_output_without_the_summary_line_is_an_error() -> None:
    with pytest.raises(LoadError, match="no BENCH_RESULT"):
        bench_load.parse_wrk("unable to connect to 127.0.0.1:18100 Connection refused\n")


def test_hey_summary() -> None:
    run = bench_load.parse_hey(HEY_OUTPUT)
    assert run.ok == 2000
    assert run.duration_s == pytest.approx(2.0031)
    assert run.p50_ms == pytest.approx(12.4)
    assert run.p99_ms == pytest.approx(50.2)
    assert run.errors == {"status 502": 25, "socket": 3}


def test_sse_request_body_asks_for_a_stream() -> None:
    assert json.loads(bench_load.request_body(True)) == {
        "model": "bench", "messages": [{"role": "user", "content": "Say hello"}], "stream": True}
    assert "stream" not in json.loads(bench_load.request_body(False))


@pytest.mark.parametrize(("status", "ctype", "body", "stream", "ok"), [
    (200, "application/json", b'{"choices":[{"index":0}]}', False, True),
    (200, "application/json", b'{"error":{"message":"x"}}', False, False),
    (401, "application/json", b'{"choices":[{"index":0}]}', False, False),
    (200, "text/event-stream", b"data: {}\n\ndata: [DONE]\n\n", True, True),
    (200, "text/event-stream", b"data: {}\n\n", True, False),
    (200, "application/json", b"data: [DONE]\n\n", True, False),
])
def test_probe_judges_the_answer(status: int, ctype: str, body: bytes, stream: bool,
                                 ok: bool) -> None:
    assert (bench_load._judge(status, ctype, body, stream) is None) is ok


# --- the report ---------------------------------------------------------------------------------

def _result(key: str, rps: list[float], p50_ms: float, **kw: object) -> TargetResult:
    rounds = [RoundResult(ok=int(r * 10), duration_s=10.0, p50_ms=p50_ms, p99_ms=p50_ms * 3)
              for r in rps]
    result = TargetResult(key, key, **kw)  # type: ignore[arg-type]
    for scenario in bench_load.SCENARIOS:
        result.rounds[scenario.key] = list(rounds)
    return result


def test_table_shows_ranges_latencies_and_failures() -> None:
    floor = _result("floor", [2810.0, 2930.0], 0.58, rss_bytes=81 * bench_report.MIB)
    broken = TargetResult("bare", "bare", failure="the sluicegate command is missing")
    table = bench_report.main_table([floor, broken])
    row_floor, row_bare = table.splitlines()[2:4]
    assert row_floor.split(" | ")[1:4] == ["0.58 ms", "1.74 ms", "2.81k–2.93k"]
    assert row_floor.endswith("| 81 MiB |")
    assert "failed to start: the sluicegate command is missing" in row_bare


def test_cells_with_errors_are_flagged() -> None:
    result = _result("floor", [1000.0], 1.0)
    result.rounds["json-c16"][0] = RoundResult(ok=10, duration_s=1.0, p50_ms=1.0, p99_ms=2.0,
                                               errors={"status": 990})
    row = bench_report.main_table([result]).splitlines()[2]
    assert "10 ⚠" in row


def test_ratios_and_latency_delta() -> None:
    results = [_result("floor", [3000.0], 0.50), _result("bare", [1500.0], 0.75),
               _result("litellm", [100.0], 10.0)]
    text = bench_report.ratios(results)
    bare_floor = next(line for line in text.splitlines() if "bare / floor" in line)
    assert bare_floor.count("0.50×") == 4
    bare_litellm = next(line for line in text.splitlines() if "bare / LiteLLM" in line)
    assert "15.00×" in bare_litellm
    assert "default / floor | n/a" in text
    assert "bare passthrough minus floor: +0.25 ms" in text


# --- processes ----------------------------------------------------------------------------------

def test_process_set_stops_the_whole_group_and_measures_tree_rss(tmp_path: Path) -> None:
    # Two `sleep`s, one the other's child: their memory stays put once both have exec'd.
    with bench_procs.ProcessSet(stop_timeout_s=5) as procs:
        started = procs.start("sleepers", ["sh", "-c", "sleep 60 & exec sleep 60"],
                              log_path=tmp_path / "log")
        deadline = time.monotonic() + 10
        while [_comm(p) for p in bench_procs.process_tree(started.proc.pid)] != ["sleep"] * 2:
            assert time.monotonic() < deadline, "the two sleeps never appeared"
            time.sleep(0.05)
        tree = bench_procs.process_tree(started.proc.pid)
        assert tree[0] == started.proc.pid
        rss = _settled_rss(tree)
        assert min(rss) > 0
        assert bench_procs.tree_rss_bytes(started.proc.pid) == sum(rss)
    assert started.exited() is not None
    for pid in tree:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _settled_rss(pids: list[int]) -> list[int]:
    """The processes' RSS once the dynamic loader has finished (two equal readings)."""
    previous: list[int] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        current = [bench_procs.rss_bytes(p) for p in pids]
        if current == previous:
            return current
        previous = current
        time.sleep(0.1)
    raise AssertionError(f"RSS of {pids} never settled")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_taskset_prefix() -> None:
    cmd = bench_procs.pinned(["wrk", "-c1"], 0)
    assert cmd[-2:] == ["wrk", "-c1"]
    assert bench_procs.pinned(["wrk"], None) == ["wrk"]


# --- the mock's fixed bodies --------------------------------------------------------------------

def test_fixed_bodies_are_a_consistent_completion_and_stream() -> None:
    completion = json.loads((HERE / "chat.json").read_bytes())
    assert completion["object"] == "chat.completion"
    raw = (HERE / "chat.sse").read_text()
    events = [block for block in raw.split("\n\n") if block]
    assert len(events) == 21 and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion["usage"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == completion["choices"][0]["message"]["content"]


@pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                    reason="nginx is installed by `make bench-tools`")
def test_nginx_mock_answers_post_with_the_fixed_bodies(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = (HERE / "nginx.conf.template").read_text()
    fixtures = run_bench.public_fixtures(tmp_path)
    for name, value in (("@RUN_DIR@", str(tmp_path)), ("@BENCH_DIR@", str(fixtures)),
                        ("@PORT@", str(port))):
        conf = conf.replace(name, value)
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [nginx, "-c", str(tmp_path / "nginx.conf"), "-p", f"{tmp_path}/",
           "-e", str(tmp_path / "error.log")]
    with bench_procs.ProcessSet(stop_timeout_s=5) as procs:
        mock = procs.start("nginx", cmd, log_path=tmp_path / "nginx.log")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while not bench_procs.port_in_use(port):
            assert mock.exited() is None and time.monotonic() < deadline, mock.log_tail()
            time.sleep(0.05)
        assert bench_load.probe(f"{base}/json/v1/chat/completions", False) is None
        assert bench_load.probe(f"{base}/sse/v1/chat/completions", True) is None
        assert bench_load.probe(f"{base}/other/v1/chat/completions", False) is not None
        for kind, suffix, ctype in (("json", "json", "application/json"),
                                    ("sse", "sse", "text/event-stream")):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", f"/{kind}/v1/chat/completions", body=b"{}")
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("content-type")) == (200, ctype)
            assert resp.read() == (HERE / f"chat.{suffix}").read_bytes()
            conn.close()


# --- the instruction counts (run_instructions.py) -----------------------------------------------

def test_a_callgrind_dump_gives_its_instruction_total(tmp_path: Path) -> None:
    import run_instructions
    dump = tmp_path / "callgrind.out.123.1"
    dump.write_text("# callgrind format\nversion: 1\ncmd: python3 sluicegate serve\n"
                    "events: Ir\nsummary: 1530541209\n\nfl=(1) x.c\nfn=(1) f\n16 4\n"
                    "totals: 1530541209\n")
    assert run_instructions.dumped_instructions(dump) == 1_530_541_209
    dump.write_text("events: Ir\n")
    with pytest.raises(LoadError, match="no summary"):
        run_instructions.dumped_instructions(dump)


def test_scripts_run_under_callgrind_through_this_interpreter(tmp_path: Path) -> None:
    import run_instructions
    out = tmp_path / "callgrind.out.%p"
    cmd = run_instructions.callgrind_command(["/venv/bin/sluicegate", "serve", "--port", "1"],
                                             out)
    assert cmd == ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, "/venv/bin/sluicegate", "serve", "--port", "1"]
    assert run_instructions.callgrind_command([sys.executable, "-m", "x"], out)[3:] == \
        [sys.executable, "-m", "x"]
    floor = [sys.executable, "-m", "hypercorn", "-w", "1", "-k", "uvloop", "floor_proxy:app"]
    assert run_instructions.callgrind_command(floor, out)[3:] == \
        [sys.executable, "-m", "hypercorn", "-w", "0", "-k", "uvloop", "floor_proxy:app"]


def test_instruction_table_compares_each_target_with_bare_on_its_scenario() -> None:
    import run_instructions
    from run_instructions import Count
    scenarios = [s for s in bench_load.SCENARIOS if s.key in ("json-c16", "sse-c16")]
    text = run_instructions.render([
        Count("floor", "json-c16", 1_200_000_000, 1000),
        Count("bare", "json-c16", 1_500_000_000, 1000),
        Count("bare", "sse-c16", 1_600_000, 1),
        Count("failover", "json-c16", 1_530_000_000, 1000),
        Count("failover", "sse-c16", 1_680_000_000, 1000),
        Count("metering", "json-c16-unique", 2_000_000, 1),  # no bare run to compare with
    ], [*scenarios, *(s for s in bench_load.SCENARIOS if s.key == "json-c16-unique")], 20)
    rows = [line for line in text.splitlines() if line.startswith("| Sluicegate")]
    assert text.count("| floor, hypercorn") == 1
    assert rows[0] == ("| Sluicegate, bare passthrough | JSON c=16 | 1,500.0k | 0.800× | 1.000× "
                       "| — |")
    assert rows[2] == ("| Sluicegate, failover layer alone (success path) | JSON c=16 | "
                       "1,530.0k | 0.784× | 0.980× | +2.0% |")
    assert rows[3].endswith("| SSE c=16 | 1,680.0k | n/a | 0.952× | +5.0% |")
    assert rows[4].endswith("| 2,000.0k | n/a | n/a | — |")


# --- paired rounds (run_paired.py) --------------------------------------------------------------

def test_paired_rounds_alternate_so_that_each_pair_sits_side_by_side() -> None:
    import run_paired
    assert run_paired.abba(3) == ["bare", "target", "target", "bare", "bare", "target"]
    assert run_paired.on_port(["sluicegate", "serve", "--port", "18100", "--workers", "1"],
                              18101) == ["sluicegate", "serve", "--port", "18101", "--workers", "1"]


def test_paired_table_gives_the_median_pair_and_the_spread() -> None:
    import run_paired
    pairs = run_paired.Pairs("failover", "json-c16", bare_rps=[1000.0, 2000.0, 1500.0],
                             target_rps=[990.0, 1900.0, 1500.0])
    assert pairs.ratios == [0.99, 0.95, 1.0]
    text = run_paired.render([pairs, run_paired.Pairs("metering", "sse-c16")], 5)
    rows = [line for line in text.splitlines() if line.startswith("| Sluicegate")]
    assert rows == [("| Sluicegate, failover layer alone (success path) | JSON c=16 | 3 | "
                    "0.990× | 0.950–1.000× | 1,500 | — | — | — |")]  # no rounds: no row
    pairs.bare_cpu_us, pairs.target_cpu_us = [150.0, 160.0, 155.0], [165.0, 160.0, 170.5]
    assert pairs.cpu_ratios == [150 / 165, 1.0, 155 / 170.5]
    row = run_paired.render([pairs], 5).splitlines()[-1]
    assert row.endswith("| 1,500 | 0.909× | 0.909–1.000× | +15.0 µs |")


def test_a_process_trees_cpu_time_counts_its_children() -> None:
    import run_paired
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # (it spins: its CPU time grows, however slowly a loaded host lets it; no time limit
        # but a generous one, so this asserts the reading, not the host's pace)
        deadline = time.monotonic() + 60
        while (spun := run_paired.tree_cpu_s(child.pid)) <= 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spun > 0.2
        assert run_paired.tree_cpu_s(os.getpid()) >= spun  # (it is under this process)
    finally:
        child.kill()
        child.wait()
