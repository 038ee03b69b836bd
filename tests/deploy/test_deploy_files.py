"""The deployment artefacts under deploy/ (Docker, compose, Kubernetes, systemd, hypercorn,
Grafana). Docker and a cluster are not available to the tests, so each file is parsed and held
to what the gateway really does: the probe paths it serves, the flags `sluicegate serve`
accepts, the hypercorn settings `serve` makes, the env vars the default config reads, and the
metric names it exports."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import create_app
from gateway.config import ConfigError
from tests.harness import REPO, ThreadedServer

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_IN_IMAGE = "/etc/sluicegate/config.py"
JOURNAL_DIR = "/var/lib/sluicegate/journal"
# `sluicegate serve` without the flags each target sets for itself.
SERVE = ["sluicegate", "serve", "--config", CONFIG_IN_IMAGE]
PER_TARGET_FLAGS = ("--host", "--port", "--workers")
# Names a deployment sets that the config module does not read itself.
READ_ELSEWHERE = {"SLUICEGATE_JOURNAL_DIR"}  # middleware/metering: the journal directory
REQUIRED_ENV = {"SLUICEGATE_API_KEY", "SLUICEGATE_ADMIN_TOKEN", "SLUICEGATE_DATABASE_URL",
                "SLUICEGATE_REDIS_URL"}
PROVIDER_KEYS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
VALID_KEY = "sk-sg-" + "k" * 43  # long enough for StaticKey; not a real key
VALID_ADMIN_TOKEN = "admin-token-for-tests-only"

COUNTERS = {"sluicegate_requests_total", "sluicegate_tokens_total", "sluicegate_cost_usd_total",
            "sluicegate_cost_saved_usd_total", "sluicegate_cache_requests_total",
            "sluicegate_retries_total", "sluicegate_fallbacks_total",
            "sluicegate_quota_refusals_total", "sluicegate_client_disconnects_total"}
HISTOGRAMS = {"sluicegate_request_duration_seconds", "sluicegate_ttft_seconds"}
GAUGES = {"sluicegate_breaker_state", "sluicegate_requests_in_flight",
          "sluicegate_metering_queue_depth", "sluicegate_metering_journal_bytes",
          "sluicegate_metering_writer_lag_seconds"}
SERIES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "topk",
                "bottomk", "histogram_quantile", "clamp_min", "clamp_max", "abs", "and", "or",
                "unless", "bool", "offset"}

SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),                  # OpenAI, Anthropic, virtual keys
    re.compile(r"AKIA[0-9A-Z]{16}"),                       # AWS access key id
    re.compile(r"AIza[0-9A-Za-z_-]{35}"),                  # Google API key
    re.compile(r"gh[pousr]_[A-Za-z0-9]{36,}"),             # GitHub token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{40}"),
]
# Deliberate non-secrets: the offline demo's key, documented in README.md.
NOT_SECRETS = {"sk-sg-demo-offline-only-not-a-secret"}


# -- loading -----------------------------------------------------------------------------------

def yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml_docs(path)]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [doc for doc in k8s_manifests() if doc["kind"] == kind
            and (name is None or doc["metadata"]["name"] == name)]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def gateway_container() -> dict[str, Any]:
    containers = only("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return dict(containers[0])


def compose() -> dict[str, Any]:
    (doc,) = yaml_docs(DEPLOY / "docker-compose.yml")
    return doc


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def dockerfile(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    """Sections of deploy/systemd/sluicegate.service as (key, value) lists (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in (DEPLOY / "systemd/sluicegate.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(section: str, key: str) -> str:
    values = [value for name, value in systemd_unit()[section] if name == key]
    assert len(values) == 1, f"{key}= in [{section}]: {values}"
    return values[0]


def hypercorn_toml() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "hypercorn.toml").read_text())


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {name: value for name, value in pairs}


def names_the_config_reads() -> set[str]:
    # Env var names appear in the config module as string literals: os.environ.get("X"),
    # key_env="X", api_key_env="X", admin_token_env = "X".
    text = (DEPLOY / "default_config.py").read_text()
    return set(re.findall(r'"([A-Z][A-Z0-9]*_[A-Z0-9_]+)"', text))


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", str(text))
    assert match, text
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match[2]]


# -- the serve command -------------------------------------------------------------------------

def serve_commands() -> dict[str, list[str]]:
    container = gateway_container()
    (cmd,) = dockerfile("CMD")
    return {
        "Dockerfile CMD": json.loads(cmd),
        "compose gateway command": compose()["services"]["gateway"]["command"],
        "k8s container command+args": [*container["command"], *container["args"]],
        "systemd ExecStart": shlex.split(unit_value("Service", "ExecStart")),
    }


def without_per_target_flags(argv: list[str]) -> list[str]:
    out = [os.path.basename(argv[0])]
    rest = iter(argv[1:])
    for arg in rest:
        if arg in PER_TARGET_FLAGS:
            next(rest)
        else:
            out.append(arg)
    return out


def recorder(calls: list[Any]) -> Any:
    """A stand-in that records its argument and returns 0 (exit status, hypercorn's too)."""
    def record(arg: Any) -> int:
        calls.append(arg)
        return 0
    return record


def parse_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """argv as gateway.cli's own parser reads it (serve_forever replaced by a recorder)."""
    import gateway.cli

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(gateway.cli, "serve_forever", recorder(seen))
    assert gateway.cli.main(argv[1:]) == 0
    (args,) = seen
    return args


def test_every_target_runs_the_same_serve_command(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = serve_commands()
    assert {where: without_per_target_flags(argv) for where, argv in commands.items()} == \
        {where: SERVE for where in commands}
    hosts = {}
    for where, argv in commands.items():
        args = parse_serve(argv, monkeypatch)
        assert (args.command, args.config, args.port, args.workers, args.access_log) == \
            ("serve", CONFIG_IN_IMAGE, 8080, 2, False), where
        hosts[where] = args.host
    assert hosts == {"Dockerfile CMD": "0.0.0.0", "compose gateway command": "0.0.0.0",
                     "k8s container command+args": "0.0.0.0",
                     "systemd ExecStart": "127.0.0.1"}


def test_serve_help_lists_every_flag_the_targets_use() -> None:
    help_text = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--help"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
    offered = set(re.findall(r"--[a-z][a-z-]*", help_text))
    used = {arg for argv in serve_commands().values() for arg in argv if arg.startswith("--")}
    assert used == {"--config", "--host", "--port", "--workers"}
    assert used <= offered, f"not offered by `sluicegate serve`: {used - offered}"


def test_the_config_path_is_where_each_target_puts_the_config() -> None:
    copies = [args.split() for args in dockerfile("COPY") if "default_config.py" in args]
    assert [copy[-2:] for copy in copies] == [["deploy/default_config.py", CONFIG_IN_IMAGE]]
    mounts = {m["name"]: m for m in gateway_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in only("Deployment")["spec"]["template"]["spec"]["volumes"]}
    config = volumes[mounts["config"]["name"]]["configMap"]
    assert config["name"] == "sluicegate-config"
    (item,) = config["items"]
    assert f"{mounts['config']['mountPath']}/{item['path']}" == CONFIG_IN_IMAGE
    assert item["key"] == "config.py" and mounts["config"]["readOnly"] is True


# -- hypercorn ---------------------------------------------------------------------------------

@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Loading deploy/default_config.py sets defaults in os.environ; undo them afterwards."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_hypercorn_toml_is_what_serve_configures(monkeypatch: pytest.MonkeyPatch,
                                                 restored_environ: None) -> None:
    import hypercorn.run
    from hypercorn.config import Config

    import gateway.cli
    import gateway.supervisor

    configured: list[Config] = []
    for name in (*REQUIRED_ENV, *PROVIDER_KEYS):
        os.environ.pop(name, None)
    args = parse_serve(serve_commands()["Dockerfile CMD"], monkeypatch)
    args.config = str(DEPLOY / "default_config.py")
    monkeypatch.undo()  # the real serve_forever again
    monkeypatch.setattr(hypercorn.run, "run", recorder(configured))  # `serve` imports it late
    # With --workers 2 `serve` runs the workers itself (gateway/supervisor.py), on this config.
    monkeypatch.setattr(gateway.supervisor.Supervisor, "run",
                        lambda self: recorder(configured)(self.config))
    # Two workers share limits and budgets through Redis; without it (the in-process store,
    # one per worker) `serve` refuses them, saying what to do.
    with pytest.raises(ConfigError, match="with --workers 2, each worker would admit a whole "
                                          "budget.*set SLUICEGATE_REDIS_URL"):
        gateway.cli.serve_forever(args)
    assert configured == []
    os.environ["SLUICEGATE_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    assert gateway.cli.serve_forever(args) == 0
    (served,) = configured

    toml = hypercorn_toml()
    assert {"bind", "workers", "worker_class", "keep_alive_timeout", "graceful_timeout"} <= \
        set(toml)
    assert {key: getattr(served, key) for key in toml} == toml
    assert (toml["worker_class"], toml["bind"], toml["workers"]) == \
        ("uvloop", ["0.0.0.0:8080"], 2)
    from_file = Config.from_toml(DEPLOY / "hypercorn.toml")
    assert from_file.accesslog is None and served.accesslog is None  # access log off
    assert from_file.graceful_timeout == served.graceful_timeout == 30


def test_every_stop_timeout_outlasts_the_graceful_drain() -> None:
    graceful = hypercorn_toml()["graceful_timeout"]
    pod = only("Deployment")["spec"]["template"]["spec"]
    pre_stop = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > graceful + int(pre_stop[1])
    assert duration_s(unit_value("Service", "TimeoutStopSec")) > graceful
    assert unit_value("Service", "KillSignal") == "SIGTERM"
    # Only the hypercorn parent gets SIGTERM; it drains its workers (see the unit's comment).
    assert unit_value("Service", "KillMode") == "mixed"
    assert duration_s(compose()["services"]["gateway"]["stop_grace_period"]) > graceful
    assert dockerfile("STOPSIGNAL") == ["SIGTERM"]


# -- Kubernetes --------------------------------------------------------------------------------

def test_k8s_manifests_hold_each_kind_once_and_no_namespace() -> None:
    docs = k8s_manifests()
    assert Counter((doc["apiVersion"], doc["kind"]) for doc in docs) == Counter({
        ("apps/v1", "Deployment"): 1, ("v1", "Service"): 1,
        ("autoscaling/v2", "HorizontalPodAutoscaler"): 1,
        ("policy/v1", "PodDisruptionBudget"): 1, ("v1", "ConfigMap"): 2, ("v1", "Secret"): 1})
    assert [doc["metadata"]["name"] for doc in docs if "namespace" in doc["metadata"]] == []
    (kustomization,) = yaml_docs(K8S / "kustomization.yaml")
    assert "namespace" not in kustomization
    assert sorted(kustomization["resources"]) == \
        sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_deployment_probes_resources_and_security() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container()
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    probes = {name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
              for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes == {"readinessProbe": ("/readyz", "http"), "livenessProbe": ("/healthz", "http"),
                      "startupProbe": ("/healthz", "http")}
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert dockerfile("USER") == ["10001:10001"]  # the image's user: the same uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["enableServiceLinks"] is False  # no SLUICEGATE_PORT etc. from the Service
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {JOURNAL_DIR, "/tmp"}


def test_deployment_env_comes_from_the_secret_and_the_configmap() -> None:
    sources = {key: ref["name"] for source in gateway_container()["envFrom"]
               for key, ref in source.items()}
    assert sources == {"configMapRef": "sluicegate-env", "secretRef": "sluicegate-secrets"}
    env = {**only("ConfigMap", "sluicegate-env")["data"],
           **only("Secret", "sluicegate-secrets")["stringData"]}
    assert REQUIRED_ENV | PROVIDER_KEYS <= set(env)
    assert set(env) <= names_the_config_reads() | READ_ELSEWHERE
    assert env["SLUICEGATE_JOURNAL_DIR"] == JOURNAL_DIR


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    deployment = only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = only("Service")
    assert service["spec"]["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    pdb = only("PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": labels}}
    hpa = only("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_configmap_holds_the_default_config_byte_for_byte() -> None:
    config = only("ConfigMap", "sluicegate-config")["data"]["config.py"]
    assert config.encode() == (DEPLOY / "default_config.py").read_bytes()


def test_secret_holds_placeholders_only() -> None:
    secret = only("Secret")
    assert "data" not in secret  # stringData: readable, and nothing base64-hidden
    values = secret["stringData"]
    assert {name: value for name, value in values.items()
            if value and "REPLACE-ME" not in value} == {}
    assert all(values[name] == "" for name in PROVIDER_KEYS)


def check_config(env: dict[str, str], tmp_path: Path,
                 *options: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in REQUIRED_ENV | PROVIDER_KEYS and not k.startswith("SLUICEGATE_")}
    clean["SLUICEGATE_JOURNAL_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", *options,
                           str(DEPLOY / "default_config.py")], check=False, cwd=REPO,
                          capture_output=True, text=True, env={**clean, **env}, timeout=60)


def test_forgotten_placeholders_fail_closed(tmp_path: Path) -> None:
    env = {**only("ConfigMap", "sluicegate-env")["data"], **only("Secret")["stringData"]}
    refused = check_config(env, tmp_path)
    assert (refused.returncode, "SLUICEGATE_API_KEY" in refused.stderr) == (2, True)
    refused = check_config({**env, "SLUICEGATE_API_KEY": VALID_KEY}, tmp_path)
    assert (refused.returncode, "admin token" in refused.stderr) == (2, True)
    accepted = check_config({**env, "SLUICEGATE_API_KEY": VALID_KEY,
                             "SLUICEGATE_ADMIN_TOKEN": VALID_ADMIN_TOKEN}, tmp_path)
    assert accepted.returncode == 0, accepted.stderr


def test_check_config_checks_a_config_for_the_workers_it_will_run_in(tmp_path: Path) -> None:
    # The unit's and the image's `serve --workers 2` refuse the in-process quota store; the
    # check the unit tells operators to run before a restart says so too, given --workers.
    env = {"SLUICEGATE_API_KEY": VALID_KEY, "SLUICEGATE_ADMIN_TOKEN": VALID_ADMIN_TOKEN}
    assert check_config(env, tmp_path).returncode == 0
    refused = check_config(env, tmp_path, "--workers", "2")
    assert refused.returncode == 2
    assert "with --workers 2, each worker would admit a whole budget" in refused.stderr
    shared = check_config({**env, "SLUICEGATE_REDIS_URL": "redis://127.0.0.1:6379/0"},
                          tmp_path, "--workers", "2")
    assert shared.returncode == 0, shared.stderr


# -- the gateway serves the probe paths --------------------------------------------------------

def probe_paths() -> set[str]:
    container = gateway_container()
    paths = {container[name]["httpGet"]["path"]
             for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    (healthcheck,) = dockerfile("HEALTHCHECK")
    compose_check = " ".join(compose()["services"]["gateway"]["healthcheck"]["test"])
    for text in (healthcheck, compose_check):
        paths |= set(re.findall(r"http://127\.0\.0\.1:8080(/[a-z]+)", text))
    return paths


def assert_serves_probes(url: str) -> None:
    assert probe_paths() == {"/healthz", "/readyz"}
    health = httpx.get(url + "/healthz", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(url + "/readyz", timeout=5)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert httpx.get(url + "/healthcheck", timeout=5).status_code == 404  # not any path


def test_the_gateway_serves_the_probe_paths(config_path: Path) -> None:
    with ThreadedServer(create_app(config_path)) as server:
        assert_serves_probes(server.url)


def test_the_default_config_serves_the_probe_paths(restored_environ: None) -> None:
    for name in (*REQUIRED_ENV, *PROVIDER_KEYS):
        os.environ.pop(name, None)
    with ThreadedServer(create_app(DEPLOY / "default_config.py")) as server:
        assert_serves_probes(server.url)


# -- Docker and compose ------------------------------------------------------------------------

def test_dockerfile() -> None:
    assert dockerfile("FROM") == ["python:3.11-slim AS build", "python:3.11-slim"]
    assert dockerfile("EXPOSE") == ["8080"]
    user = dockerfile("USER")
    assert len(user) == 1 and user[0].split(":")[0] not in ("0", "root")
    installs = [args for args in dockerfile("RUN") if "pip " in args]
    assert any(".[redis,postgres,otel]" in args for args in installs)
    assert any('"sluicegate[redis,postgres,otel]"' in args for args in installs)
    (healthcheck,) = dockerfile("HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in healthcheck
    sources = [part for args in dockerfile("COPY") if "--from" not in args
               for part in args.split()[:-1] if not part.startswith("--")]
    assert sources and all((REPO / source).exists() for source in sources), sources
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignored and {f"!{s.rstrip('/')}" for s in sources} <= \
        {line.rstrip("/") for line in ignored}
    assert "**/*.so" in ignored  # (a local `make compile` never goes into the image as is)


def test_the_image_compiles_the_hot_path_as_make_compile_does() -> None:
    # The build stage compiles what `sluicegate build --sources` lists, as `make compile`
    # does, strays removed first; the runtime stage copies the extensions in after the
    # package and runs `sluicegate build`, which fails the image build on a stale build.
    instructions = dockerfile_instructions()
    runtime_from = [index for index, (name, _) in enumerate(instructions) if name == "FROM"][1]
    build, runtime = instructions[:runtime_from], instructions[runtime_from:]
    assert ("ARG", "COMPILE=1") in build
    (compile_step,) = [" ".join(args.split()) for name, args in build
                       if name == "RUN" and "mypyc" in args]
    assert compile_step.index("gateway.cli build --remove") < \
        compile_step.index("python -m mypyc $(python -m gateway.cli build --sources)") < \
        compile_step.rindex("python -m gateway.cli build ")
    assert "cp *__mypyc.*.so /compiled/" in compile_step
    assert 'find gateway middleware -name "*.so" -exec cp --parents {} /compiled/' in compile_step
    (install,) = [" ".join(args.split()) for name, args in runtime
                  if name == "RUN" and "pip install" in args]
    assert "source=/compiled,target=/compiled" in install
    assert install.index('"sluicegate[redis,postgres,otel]"') < \
        install.index("cp -r /compiled/. ") < install.index("&& sluicegate build &&")


def test_compose_services_healthchecks_and_env() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "redis", "postgres"}
    assert (services["redis"]["image"], services["postgres"]["image"]) == \
        ("redis:7", "pgvector/pgvector:pg15")
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    gateway = services["gateway"]
    assert gateway["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    assert gateway["depends_on"] == {"redis": {"condition": "service_healthy"},
                                     "postgres": {"condition": "service_healthy"}}
    assert gateway["env_file"] == ".env"
    assert gateway["ports"] == ["8080:8080"]
    assert [name for name in ("redis", "postgres") if "ports" in services[name]] == []
    env = gateway["environment"]
    assert REQUIRED_ENV <= set(env) <= names_the_config_reads() | READ_ELSEWHERE
    assert env["SLUICEGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["SLUICEGATE_DATABASE_URL"].startswith("postgresql://sluicegate:${")
    assert env["SLUICEGATE_DATABASE_URL"].endswith("}@postgres:5432/sluicegate")
    for name in ("SLUICEGATE_API_KEY", "SLUICEGATE_ADMIN_TOKEN"):  # compose refuses if unset
        assert env[name].startswith("${" + name + ":?"), name
    # The database password: one variable, required, for the server and the gateway's URL.
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${SLUICEGATE_DB_PASSWORD:?")
    assert password in env["SLUICEGATE_DATABASE_URL"]
    assert f"journal:{JOURNAL_DIR}" in gateway["volumes"]


def test_env_example_lists_names_only() -> None:
    example = env_example()
    assert {name: value for name, value in example.items() if value} == {}
    assert set(example) == {"SLUICEGATE_API_KEY", "SLUICEGATE_ADMIN_TOKEN",
                            "SLUICEGATE_DB_PASSWORD", *PROVIDER_KEYS}
    assert set(example) - {"SLUICEGATE_DB_PASSWORD"} <= names_the_config_reads()
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# -- systemd -----------------------------------------------------------------------------------

def test_systemd_unit() -> None:
    assert unit_value("Service", "Type") in ("simple", "exec")
    assert unit_value("Service", "User") not in ("", "root")
    assert unit_value("Service", "EnvironmentFile").startswith("/etc/sluicegate/")
    assert unit_value("Service", "Restart") == "on-failure"
    assert unit_value("Service", "NoNewPrivileges") == "yes"
    assert unit_value("Service", "ProtectSystem") == "strict"
    environment = dict(value.split("=", 1) for name, value in systemd_unit()["Service"]
                       if name == "Environment")
    assert environment["SLUICEGATE_JOURNAL_DIR"] == JOURNAL_DIR
    assert unit_value("Service", "ReadWritePaths").split() == [JOURNAL_DIR]
    assert unit_value("Install", "WantedBy") == "multi-user.target"


def test_the_documented_check_runs_where_the_service_runs() -> None:
    """The comment's systemd-run check-config line sets the unit's working directory,
    journal directory and environment file (systemd-run applies none of the unit's own:
    the check ran in /, its journal directory ./sluicegate-journal)."""
    text = (DEPLOY / "systemd/sluicegate.service").read_text()
    start = text.index("#   systemd-run ") + 1
    check = shlex.split(text[start:text.index("\n\n", start)].replace("\\\n#", " "))
    properties = [check[at + 1] for at, arg in enumerate(check) if arg == "-p"]
    for key in ("User", "WorkingDirectory", "EnvironmentFile"):
        assert f"{key}={unit_value('Service', key)}" in properties
    assert f"Environment=SLUICEGATE_JOURNAL_DIR={JOURNAL_DIR}" in properties
    assert "check-config" in check


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_every_directive(tmp_path: Path) -> None:
    unit = tmp_path / "sluicegate.service"
    unit.write_text((DEPLOY / "systemd/sluicegate.service").read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False,
                            capture_output=True, text=True, timeout=60)
    # The venv's binary is not installed here; any other complaint is a mistake in the unit.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "/opt/sluicegate/venv/bin/sluicegate" not in line]
    assert problems == []


# -- Grafana -----------------------------------------------------------------------------------

def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                 # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)                # matchers and ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", expr))
    return words - PROMQL_WORDS


def test_metric_names_finds_only_series() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model",x="y z"}'
            '[$__rate_interval]))) / on (model) b_total * 3600')
    assert metric_names(expr) == {"a_bucket", "b_total"}


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana/sluicegate.json").read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_uses_only_the_exported_metrics() -> None:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used - SERIES == set(), "not exported by the gateway"
    # Every exported metric has a panel (a histogram through its buckets).
    assert {re.sub(r"_bucket$", "", name) for name in used} == COUNTERS | GAUGES | HISTOGRAMS
    for expr in exprs:
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \(le\b", expr), expr
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert re.findall(r"label_values\((\w+), *\w+\)", variables["model"]["definition"]) == \
        ["sluicegate_requests_total"]


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["DS_PROMETHEUS"]["type"], variables["DS_PROMETHEUS"]["query"]) == \
        ("datasource", "prometheus")
    prometheus = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels():
        assert panel["datasource"] == prometheus, panel["title"]
        assert panel["targets"] and all(t["datasource"] == prometheus for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {p["title"] for p in panels()} >= {
        "Requests/s by status", "Error rate", "Request duration p50 / p95 / p99",
        "Time to first token p50 / p95 / p99", "Tokens/s in / out", "Spend $/h by model",
        "Cache hit ratio", "Retries and fallbacks/s", "Circuit breakers", "Quota refusals/s",
        "Metering queue depth", "Usage journal size", "Metering writer lag",
        "Requests in flight"}
    breakers = next(p for p in panels() if p["title"] == "Circuit breakers")
    assert breakers["type"] == "state-timeline"
    (mapping,) = breakers["fieldConfig"]["defaults"]["mappings"]
    assert {k: v["text"] for k, v in mapping["options"].items()} == \
        {"0": "closed", "1": "half-open", "2": "open"}


# -- secrets -----------------------------------------------------------------------------------

def secrets_in(text: str) -> list[str]:
    return [match for pattern in SECRET_PATTERNS for match in pattern.findall(text)
            if match not in NOT_SECRETS]


def test_the_secret_scan_finds_secrets() -> None:
    fake = "sk-proj-" + "Ab1" * 10  # built here, so this file holds no key-shaped literal
    assert secrets_in(f"OPENAI_API_KEY={fake}\n") == [fake]
    assert secrets_in("key: sk-sg-demo-offline-only-not-a-secret") == []


def test_no_file_under_deploy_holds_a_secret() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): secrets_in(p.read_text(errors="replace")) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_systemctl_reload_sends_sighup_to_serve() -> None:
    """`systemctl reload` is the zero-downtime config reload of gateway/supervisor.py."""
    assert unit_value("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
