"""The targets under test: how to start each one in front of the mock, and where to send load."""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MOCK_PORT = 18080
TARGET_PORT = 18100
REDIS_PORT = 18379  # the bench's own Redis (run_bench.start_redis), on the load CPU
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
LITELLM_VENV = ROOT / ".bench" / "litellm-venv"
PORTKEY_DIR = ROOT / ".bench" / "portkey"
PORTKEY_SERVER = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def mock_base(stream: bool) -> str:
    """The mock's OpenAI base URL for JSON or SSE answers (see nginx.conf.template)."""
    return f"http://127.0.0.1:{MOCK_PORT}/{'sse' if stream else 'json'}/v1"


class NotRunnable(Exception):
    """The target cannot be started here (a command or file is missing); the message says why."""


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one target: the command, its working directory and extra environment."""

    cmd: list[str]
    cwd: Path
    env: dict[str, str]


@dataclass(frozen=True, slots=True)
class Target:
    """A row of the results table."""

    key: str
    label: str
    launch: Callable[[str], Launch] | None  # upstream base URL -> Launch; None: the mock itself
    start_timeout_s: float = 30.0
    needs_redis: bool = False  # uses the bench's own Redis (REDIS_URL)
    server_timing: bool = False  # answers with Server-Timing; the load tool collects it
    scenarios: tuple[str, ...] | None = None  # only these scenarios (None: all)
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request (BENCH_HEADERS)

    def url(self, stream: bool) -> str:
        if self.launch is None:
            return mock_base(stream) + "/chat/completions"
        return f"http://127.0.0.1:{TARGET_PORT}/v1/chat/completions"


def _floor(upstream: str) -> Launch:
    cmd = [sys.executable, "-m", "hypercorn", "-w", "1", "-k", "uvloop",
           "--bind", f"127.0.0.1:{TARGET_PORT}", "floor_proxy:app"]
    return Launch(cmd, HERE, {"FLOOR_UPSTREAM": upstream, "PYTHONPATH": str(HERE)})


def _sluicegate_command() -> str:
    # Prefer the script beside this interpreter: a pyenv shim adds a bash hop to every start.
    beside = Path(sys.executable).parent / "sluicegate"
    found = str(beside) if beside.exists() else shutil.which("sluicegate")
    if found is None:
        raise NotRunnable("the sluicegate command is missing (run `make install`)")
    return found


def _sluicegate(config_name: str, env: dict[str, str] | None = None
                ) -> Callable[[str], Launch]:
    def launch(upstream: str) -> Launch:
        config = HERE / config_name
        if not config.exists():
            raise NotRunnable(f"{config.relative_to(ROOT)} does not exist")
        cmd = [_sluicegate_command(), "serve", "--config", str(config.relative_to(ROOT)),
               "--host", "127.0.0.1", "--port", str(TARGET_PORT), "--workers", "1"]
        return Launch(cmd, ROOT, {"SLUICEGATE_BENCH_UPSTREAM": upstream, **(env or {})})
    return launch


def _litellm(upstream: str) -> Launch:
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        raise NotRunnable(f"{litellm.relative_to(ROOT)} is missing (run `make bench-tools`)")
    cmd = [str(litellm), "--config", str(HERE / "litellm_config.yaml"), "--host", "127.0.0.1",
           "--port", str(TARGET_PORT), "--num_workers", "1"]
    # It refuses to start without a master key (in the config); the local cost map avoids a
    # download at start-up, and ERROR keeps per-request logging out of the measurement.
    env = {"LITELLM_BENCH_UPSTREAM": upstream, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": "ERROR"}
    return Launch(cmd, ROOT, env)


def _portkey(_upstream: str) -> Launch:
    if not PORTKEY_SERVER.is_file():
        raise NotRunnable(f"{PORTKEY_SERVER.relative_to(ROOT)} is missing (run `make bench-peers`)")
    # One Node.js process (it is single-threaded anyway), production mode, no UI; it routes
    # by request headers: x-portkey-provider plus the mock as x-portkey-custom-host (the
    # target's headers, sent by the load tool).
    cmd = ["node", str(PORTKEY_SERVER), f"--port={TARGET_PORT}", "--headless"]
    return Launch(cmd, ROOT, {"NODE_ENV": "production"})


TARGETS = {
    t.key: t for t in (
        Target("direct", "direct to the mock", None),
        Target("floor", "floor, hypercorn + uvloop (`-w 1 -k uvloop`)", _floor),
        Target("bare", "Sluicegate, bare passthrough", _sluicegate("config_bare.py")),
        Target("default", "Sluicegate, default stack", _sluicegate("config_default.py")),
        Target("redis", "Sluicegate, default stack, auth + quota on Redis",
               _sluicegate("config_redis.py", {"SLUICEGATE_BENCH_REDIS": REDIS_URL}),
               needs_redis=True),
        Target("auth-quota", "Sluicegate, auth + quota on Redis alone",
               _sluicegate("config_redis.py", {"SLUICEGATE_BENCH_REDIS": REDIS_URL,
                                               "SLUICEGATE_BENCH_ONLY_AUTH_QUOTA": "1"}),
               needs_redis=True, scenarios=("json-c16", "sse-c16")),
        Target("auth-quota-memory", "Sluicegate, auth + quota in process alone",
               _sluicegate("config_redis.py", {"SLUICEGATE_BENCH_ONLY_AUTH_QUOTA": "1",
                                               "SLUICEGATE_BENCH_QUOTA_STORE": "memory"}),
               scenarios=("json-c16", "sse-c16")),
        Target("redis-rtt", "Sluicegate, bare passthrough + one Redis round trip a request",
               _sluicegate("config_redis_rtt.py", {"SLUICEGATE_BENCH_REDIS": REDIS_URL}),
               needs_redis=True, scenarios=("json-c16", "sse-c16")),
        Target("cache", "Sluicegate, auth + exact cache hits (memory)",
               _sluicegate("config_cache.py"), server_timing=True),
        Target("cache-redis", "Sluicegate, auth + exact cache hits (Redis)",
               _sluicegate("config_cache.py", {"SLUICEGATE_BENCH_CACHE": REDIS_URL}),
               needs_redis=True, server_timing=True),
        Target("metering", "Sluicegate, metering layer alone (journal, no PostgreSQL)",
               _sluicegate("config_metering.py"), scenarios=("json-c16", "sse-c16")),
        Target("failover", "Sluicegate, failover layer alone (success path)",
               _sluicegate("config_failover.py"), scenarios=("json-c16", "sse-c16")),
        Target("tracing", "Sluicegate, bare passthrough with tracing on (spans dropped)",
               _sluicegate("config_tracing.py"), scenarios=("json-c16", "sse-c16")),
        Target("production", "Sluicegate, production stack (Redis, PostgreSQL, cache miss)",
               _sluicegate("config_production.py", {"SLUICEGATE_BENCH_REDIS": REDIS_URL}),
               needs_redis=True, scenarios=("json-c16-unique", "json-c1")),
        Target("cache-miss", "Sluicegate, cache layer alone, every request a miss (memory)",
               _sluicegate("config_cache_miss.py"),
               scenarios=("json-c16-unique", "sse-c16-unique")),
        Target("litellm", "LiteLLM proxy, 1 worker, no DB", _litellm, start_timeout_s=120.0),
        # With @hono/node-server pinned (deploy/scripts/install_bench_tools.sh): Portkey 1.15.2
        # answers streams with HTTP 500 under the newest one.
        Target("portkey", "Portkey gateway 1.15.2 (Node.js), no policy", _portkey,
               start_timeout_s=60.0, headers=(("x-portkey-provider", "openai"),
                                              ("x-portkey-custom-host", "{upstream}"))),
    )
}
