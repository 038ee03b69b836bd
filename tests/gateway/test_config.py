"""Config modules: loading, the one-sentence errors, check-config, every example in deploy/."""
from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.app import build_stack, create_app
from gateway.config import ConfigError, load_config
from tests.harness import REPO, TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

EXAMPLES = sorted((REPO / "deploy/examples").glob("*.py"))
EXAMPLE_KEYS = {
    "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY",
    "GROQ_API_KEY", "TOGETHER_API_KEY", "DEEPSEEK_API_KEY", "XAI_API_KEY", "MISTRAL_API_KEY",
    "OPENROUTER_API_KEY", "FIREWORKS_API_KEY", "VLLM_API_KEY",
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, text=True,
                          capture_output=True, check=False, env={**os.environ, **(env or {})}, timeout=60)


def error_for(tmp_path: Path, text: str) -> str:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        build_stack(load_config(path))
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


HEAD = """
from gateway.config import Deployment, Middleware, Model
from providers import Provider
from middleware.auth import AuthMiddleware
"""


def test_unknown_provider_type(tmp_path: Path) -> None:
    message = error_for(tmp_path, HEAD + 'providers = {"x": Provider("openia")}\n'
                        'models = {"m": [Deployment("x", "y")]}\n')
    assert "unknown provider type 'openia'" in message and "line 5" in message


def test_missing_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SG_TEST_MISSING_KEY", raising=False)
    message = error_for(tmp_path, HEAD + 'providers = {"oa": Provider("openai", '
                        'api_key_env="SG_TEST_MISSING_KEY")}\nmodels = {"m": [Deployment("oa", "y")]}\n')
    assert "provider 'oa' needs the environment variable SG_TEST_MISSING_KEY" in message


# A secret given where its environment variable's name belongs (api_key_env=os.environ[...]):
# the sentence names the setting, never the value. One secret cannot be a variable's name
# and is refused as one; the other could be, and is not shown: it is a set variable's value.
SECRET_AS_NAME = ["sk-proj-REALPROVIDERKEY0123456789abcdef", "REALSECRET0123456789ABCDEF"]


@pytest.mark.parametrize("secret", SECRET_AS_NAME)
@pytest.mark.parametrize("setting,line", [
    ("api_key_env", 'providers = {"oa": Provider("openai", api_key_env=SECRET)}'),
    ("api_key_envs", 'models = {"m": [Deployment("oa", "y", free=True, api_key_envs=[SECRET])]}'),
    ("admin_token_env", "middleware = auth(keys=KEYS, admin_token_env=SECRET)"),
    ("key_env", 'middleware = auth(keys=[StaticKey("t", key_env=SECRET)])'),
    ("Settings.metrics_token_env", "settings = Settings(metrics_token_env=SECRET)"),
], ids=["provider", "deployment", "admin", "static_key", "metrics"])
def test_a_secret_given_as_a_variable_name_is_never_printed(tmp_path: Path, setting: str,
                                                            line: str, secret: str) -> None:
    path = write_config(tmp_path, HEAD + "import os\nfrom gateway.config import Settings\n"
                        "from middleware.auth import StaticKey\n"
                        "SECRET = os.environ['SG_TEST_SECRET']\n"
                        'KEYS = [StaticKey("t", key_env="SG_TEST_VK")]\n'
                        "def auth(**options): return [Middleware(AuthMiddleware, **options)]\n"
                        'providers = {"oa": Provider("openai")}\n'
                        'models = {"m": [Deployment("oa", "y", free=True)]}\n' + line + "\n")
    env = {"SG_TEST_SECRET": secret, "SG_TEST_VK": "sk-sg-" + "v" * 32}
    for command in (["check-config", str(path)], ["serve", "--config", str(path), "--port", "0"]):
        result = run_cli(*command, env=env)
        assert result.returncode == 2, result.stderr
        assert secret not in result.stdout + result.stderr
        assert setting in result.stderr and "environment variable" in result.stderr


def test_layer_with_wrong_options(tmp_path: Path) -> None:
    message = error_for(tmp_path, HEAD + 'providers = {"oa": Provider("openai")}\n'
                        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
                        'middleware = [Middleware(AuthMiddleware, keys=["sk-1"])]\n')
    assert "layer AuthMiddleware has wrong options" in message and "keys" in message


@pytest.mark.parametrize("option", ["store_retry_s=0", "lease_s=-1", "store_retry_s=float('inf')"])
def test_quota_timings_that_are_not_positive_refuse_to_start(tmp_path: Path,
                                                           option: str) -> None:
    # (a retry interval of 0 had the release of unsure leases spin on an unreachable Redis)
    message = error_for(tmp_path, HEAD + 'from middleware.quota import QuotaMiddleware\n'
                        'providers = {"oa": Provider("openai")}\n'
                        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
                        f'middleware = [Middleware(QuotaMiddleware, {option})]\n')
    assert "store_retry_s and lease_s must be positive, finite numbers of seconds" in message


def test_model_with_unknown_provider(tmp_path: Path) -> None:
    message = error_for(tmp_path, HEAD + 'providers = {"oa": Provider("openai")}\n'
                        'models = {"m": [Deployment("nope", "y")]}\n')
    assert "uses provider 'nope'" in message


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, "providers = {\n")
    assert "SyntaxError" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.py")


def test_serve_refuses_to_start_with_one_sentence(tmp_path: Path) -> None:
    path = write_config(tmp_path, HEAD + 'providers = {"x": Provider("bogus")}\nmodels = {}\n')
    result = run_cli("serve", "--config", str(path), "--port", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown provider type 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_tracing_the_gateway_cannot_make_is_refused_before_it_starts(
        tmp_path: Path, command: str) -> None:
    # check-config passed this (the Kernel, which sets tracing up, was never built), and
    # serve refused it only inside its workers.
    path = write_config(tmp_path, mock_config("http://127.0.0.1:9"))
    args = ["--config", str(path), "--port", "0"] if command == "serve" else [str(path)]
    result = run_cli(command, *args, env={"OTEL_TRACES_EXPORTER": "zipkin",
                                          "OTEL_SDK_DISABLED": "false"})
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_prints_stack_models_and_deployments(tmp_path: Path) -> None:
    path = write_config(tmp_path, mock_config("http://127.0.0.1:9"))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    order = [out.index(name) for name in ("kernel", "AuthMiddleware", "MeteringMiddleware",
                                          "QuotaMiddleware", "CacheMiddleware",
                                          "FailoverMiddleware", "Passthrough")]
    assert order == sorted(order)
    assert "claude-mock:" in out and "-> anthropic / claude-3-5-haiku-latest" in out
    assert "provider-secret" not in out  # the key's value is never printed, only its variable


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_config_loads(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXAMPLE_KEYS:
        monkeypatch.setenv(name, "test-key")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example-resource.openai.azure.com")
    monkeypatch.setenv("SLUICEGATE_API_KEY", TEST_KEY)
    app = create_app(example)
    assert app.config.models


def test_default_config_loads_without_any_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(REPO / "deploy/default_config.py")
    assert list(config.models) == ["demo"]
    assert config.models["demo"].owned_by == "sluicegate-demo"


def create_error_for(tmp_path: Path, text: str) -> str:
    """The error `create_app` (the kernel over the stack) gives for a config."""
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        create_app(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


FAILOVER_HEAD = HEAD + "from middleware.failover import FailoverMiddleware, Route\n"


def test_a_failover_route_naming_an_unknown_model_refuses_to_start(tmp_path: Path) -> None:
    message = create_error_for(tmp_path, FAILOVER_HEAD + (
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        'middleware = [Middleware(FailoverMiddleware, routes={"m": Route(fallbacks=("m2",), '
        'context_window_fallbacks=("big",))})]\n'))
    assert "routes['m'] names 'm2', 'big', which are not models" in message


def test_deployment_keys_come_from_the_environment_or_refuse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SG_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("SG_TEST_KEY_A", "sk-a-secret-value-123456")
    text = HEAD + ('providers = {"oa": Provider("openai")}\n'
                   'models = {"m": [Deployment("oa", "y", free=True, '
                   'api_key_envs=("SG_TEST_KEY_A", "SG_TEST_NO_SUCH_KEY"))]}\n')
    message = error_for(tmp_path, text)
    assert "needs the environment variable(s) SG_TEST_NO_SUCH_KEY" in message
    assert "sk-a-secret" not in message
    config = load_config(write_config(tmp_path, text.replace(', "SG_TEST_NO_SUCH_KEY"', "")))
    key = config.models["m"].deployments[0].keys[0]
    assert key.env == "SG_TEST_KEY_A" and key.secret == "sk-a-secret-value-123456"
    assert "sk-a-secret" not in repr(config.models["m"])


def test_two_deployments_of_a_model_need_distinct_names(tmp_path: Path) -> None:
    message = error_for(tmp_path, HEAD + (
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True), Deployment("oa", "y", free=True)]}\n'))
    assert "give them distinct `label`s" in message
    error_for_rpm = error_for(tmp_path, HEAD + (
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True, rpm=0)]}\n'))
    assert "rpm/tpm that are positive integers" in error_for_rpm


# Values of the wrong type or range are refused as the config loads, in one sentence (each
# was accepted and failed later: at the first request, in a traceback, or silently).
@pytest.mark.parametrize(("text", "expected"), [
    ('providers = {"oa": Provider("openai", base_url="https://h/v1?api-key=s3cret")}\n',
     "base_url must have no query or fragment"),
    ('providers = {"oa": Provider("openai", base_url=42)}\n', "needs an http(s) base_url"),
    ('providers = {"oa": Provider("openai", timeouts=30)}\n', "timeouts must be Timeouts(...)"),
    (('from gateway.upstream import Timeouts\n'
     'providers = {"oa": Provider("openai", timeouts=Timeouts(first_byte_s=0))}\n'),
     "Timeouts.first_byte_s must be a positive number of seconds"),
    ('providers = {"oa": Provider("openai", max_connections=0)}\n',
     "max_connections must be a positive number"),
    ('providers = {"oa": Provider("openai", max_connections_per_host=-1)}\n',
     "max_connections_per_host must be a whole number"),
], ids=["query", "not-a-url", "timeouts-number", "timeout-zero", "connections-0",
        "per-host-negative"])
def test_a_provider_with_a_bad_option_refuses_to_start(tmp_path: Path, text: str,
                                                       expected: str) -> None:
    message = error_for(tmp_path, HEAD + text + 'models = {"m": [Deployment("oa", "y", '
                        'free=True)]}\n')
    assert expected in message
    assert "s3cret" not in message


@pytest.mark.parametrize(("deployment", "expected"), [
    ('Deployment("oa", "")', "Deployment model must be a non-empty string"),
    ('Deployment("oa", "y", weight=-1)', "weight must be a finite number >= 0"),
    ('Deployment("oa", "y", weight=True)', "weight must be a finite number >= 0"),
    ('Deployment("oa", "y", tags=("eu", 3))', "tags must be a tuple of strings"),
    ('Deployment("oa", "y", free="yes")', "free must be True or False"),
], ids=["model", "weight", "weight-bool", "tags", "free"])
def test_a_deployment_with_a_bad_field_refuses_to_start(tmp_path: Path, deployment: str,
                                                        expected: str) -> None:
    message = error_for(tmp_path, HEAD + 'providers = {"oa": Provider("openai")}\n'
                        f'models = {{"m": [{deployment}]}}\n')
    assert expected in message


def test_a_tag_given_as_a_plain_string_is_one_tag(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, HEAD + (
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True, tags="eu")]}\n')))
    assert config.models["m"].deployments[0].tags == ("eu",)  # (it was "e", "u")


@pytest.mark.parametrize(("settings", "expected"), [
    ('metrics_path="/healthz"', "Settings.metrics_path must be a path such as '/metrics'"),
    ('metrics_path="/admin/metrics"', "Settings.metrics_path must be a path"),
    ('metrics_path="/"', "Settings.metrics_path must be a path"),
    ('request_id_header="x request id"', "Settings.request_id_header must be a header name"),
    ('max_body_bytes=True', "Settings.max_body_bytes must be a positive number"),
], ids=["healthz", "admin", "root", "header-space", "body-bool"])
def test_settings_with_a_bad_value_refuse_to_start(tmp_path: Path, settings: str,
                                                   expected: str) -> None:
    message = error_for(tmp_path, HEAD + 'from gateway.config import Settings\n'
                        'providers = {"oa": Provider("openai")}\n'
                        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
                        f'settings = Settings({settings})\n')
    assert expected in message


@pytest.mark.parametrize(("layer", "expected"), [
    ('Middleware(FailoverMiddleware, default=Route(fallbacks=("gone",)))',
     "FailoverMiddleware default names 'gone', which is not a model"),
    ('Middleware(QuotaMiddleware, model_limits={"mm": Limits(rpm=1)})',
     "QuotaMiddleware model_limits names 'mm', not a model"),
    (('Middleware(QuotaMiddleware, limits=Limits(rpm=1, on_overflow="downgrade", '
     'downgrade_to="cheap"))'), "QuotaMiddleware limits downgrades to 'cheap', not a model"),
    ('Middleware(AuthMiddleware, keys=[StaticKey("p", key_hash="' + "a" * 64 + '", '
     'limits=Limits(rpm=1, on_overflow="downgrade", downgrade_to="cheap"))])',
     "downgrade to 'cheap', not a model in `models`"),
], ids=["failover-default", "quota-model-limits", "quota-downgrade", "auth-downgrade"])
def test_a_layer_naming_a_model_the_config_lacks_refuses_to_start(
        tmp_path: Path, layer: str, expected: str) -> None:
    message = create_error_for(tmp_path, FAILOVER_HEAD + (
        'from gateway.policy import Limits\n'
        'from middleware.auth import StaticKey\n'
        'from middleware.quota import QuotaMiddleware\n'
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        f'middleware = [{layer}]\n'))
    assert expected in message


def test_check_config_hides_credentials_in_a_base_url(tmp_path: Path) -> None:
    path = write_config(tmp_path, HEAD + (
        'providers = {"an": Provider("anthropic", base_url="https://user:pw-s3cret@proxy")}\n'
        'models = {"m": [Deployment("an", "y", free=True)]}\n'))
    done = run_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "https://proxy" in done.stdout and "s3cret" not in done.stdout + done.stderr


# A base URL's user:password@ goes as HTTP Basic in the Authorization header: a provider whose
# key goes there too had every call refused by aiohttp ("Cannot combine AUTHORIZATION header
# with AUTH argument or credentials encoded in URL"), a 500 with a traceback.
@pytest.mark.parametrize(("provider", "deployment"), [
    ('Provider("openai", api_key_env="SG_T_PROVIDER_KEY", base_url="https://proxy-admin:pw-s3cret@proxy/v1")',
     'Deployment("p", "y", free=True)'),
    ('Provider("groq", api_key_env="SG_T_PROVIDER_KEY", base_url="https://proxy-admin:pw-s3cret@proxy/v1")',
     'Deployment("p", "y", free=True)'),
    ('Provider("vllm", base_url="http://proxy-admin:pw-s3cret@127.0.0.1:8000/v1")',
     'Deployment("p", "y", free=True, api_key_envs=("SG_T_PROVIDER_KEY",))'),
    (('Provider("anthropic", base_url="https://proxy-admin:pw-s3cret@proxy", '
      'headers={"Authorization": "Bearer team-token"})'), 'Deployment("p", "y", free=True)'),
], ids=["openai", "groq", "vllm-with-a-deployments-key", "anthropic-with-an-authorization-header"])
def test_a_base_url_with_credentials_for_the_authorization_header_refuses_to_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: str, deployment: str) -> None:
    monkeypatch.setenv("SG_T_PROVIDER_KEY", "sk-provider-key-123456")
    message = error_for(tmp_path, HEAD + f'providers = {{"p": {provider}}}\n'
                        f'models = {{"m": [{deployment}]}}\n')
    assert "cannot carry user:password@" in message
    assert "s3cret" not in message and "proxy-admin" not in message


def test_a_base_url_with_credentials_reaches_providers_whose_key_has_its_own_header(
        tmp_path: Path, mock: MockProviderServer, mock_url: str) -> None:
    # Anthropic (x-api-key), Gemini (x-goog-api-key) and Azure (api-key) behind a proxy that
    # takes HTTP Basic: the key and the proxy's credentials both reach it; so do the
    # credentials alone for an OpenAI-compatible server that takes no key (the mock's OpenAI
    # then refuses the call for its missing key: a 401 passed on, not a 500).
    proxied = mock_url.replace("://", "://proxy-user:pw-s3cret@")
    extra = "\n".join(
        f'providers["{name}"] = Provider("{name}", base_url="{proxied}/{name}", '
        'api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)'
        for name in ("anthropic", "gemini", "azure"))
    extra += (f'\nproviders["openai"] = Provider("openai-compatible", base_url="{proxied}/openai'
              '/v1", timeouts=fast)')
    config = write_config(tmp_path, mock_config(mock_url, middleware="[]", extra=extra))
    with ThreadedServer(create_app(config)) as server:
        claude = anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)
        assert claude.messages.create(model="claude-mock", max_tokens=16, messages=[
            {"role": "user", "content": "hi"}]).content
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        for model in ("gemini-mock", "azure-mock"):
            assert oai.chat.completions.create(model=model, messages=[
                {"role": "user", "content": "hi"}]).choices
        with pytest.raises(openai.AuthenticationError):
            oai.chat.completions.create(model="gpt-mock", messages=[
                {"role": "user", "content": "hi"}])
    basic = "Basic " + base64.b64encode(b"proxy-user:pw-s3cret").decode()
    seen = {request["provider"]: request["headers"] for request in mock.requests}
    assert sorted(seen) == ["anthropic", "azure", "gemini", "openai"]
    assert all(headers["authorization"] == basic for headers in seen.values())
    assert seen["anthropic"]["x-api-key"] == seen["gemini"]["x-goog-api-key"] == \
        seen["azure"]["api-key"] == "provider-secret-123456789"


@pytest.mark.parametrize("argument", [["--port", "70000"], ["--port", "x"],
                                      ["--workers", "0"]])
def test_serve_refuses_a_bad_port_or_worker_count(tmp_path: Path, argument: list[str]) -> None:
    path = write_config(tmp_path, HEAD + ('providers = {"oa": Provider("openai")}\n'
                                          'models = {"m": [Deployment("oa", "y", free=True)]}\n'))
    done = run_cli("serve", "--config", str(path), *argument)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "must be a" in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(("layer", "expected"), [
    ('Middleware(CacheMiddleware, model_ttl_s={"mm": 60})',
     "CacheMiddleware model_ttl_s names 'mm', not a model"),
    ('Middleware(FailoverMiddleware, retry=RetryPolicy(retry_on="timeout"))',
     "RetryPolicy.retry_on must be a set of HTTP statuses"),
    ('Middleware(FailoverMiddleware, retry=RetryPolicy(retry_on={429, 5030}))',
     "RetryPolicy.retry_on must be a set of HTTP statuses"),
], ids=["cache-ttl", "retry-on-string", "retry-on-status"])
def test_a_cache_ttl_or_retry_status_that_cannot_apply_refuses_to_start(
        tmp_path: Path, layer: str, expected: str) -> None:
    message = create_error_for(tmp_path, FAILOVER_HEAD + (
        'from middleware.cache import CacheMiddleware\n'
        'from middleware.failover import RetryPolicy\n'
        'providers = {"oa": Provider("openai")}\n'
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        f'middleware = [{layer}]\n'))
    assert expected in message


@pytest.mark.parametrize(("text", "expected"), [
    (('providers = {"oa": Provider("openai")}\n'
     'models = {1: [Deployment("oa", "y", free=True)],\n'
      '          "1": [Deployment("oa", "z", free=True)]}\n'),
     "model name 1 must be a non-empty string"),
    ('providers = {7: Provider("openai")}\nmodels = {"m": [Deployment("oa", "y", free=True)]}\n',
     "provider name 7 must be a non-empty string"),
], ids=["model", "provider"])
def test_a_model_or_provider_named_by_a_number_refuses_to_start(
        tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_for(tmp_path, HEAD + text)
