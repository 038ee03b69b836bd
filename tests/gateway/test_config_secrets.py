"""Config errors never print a secret: a key or a virtual key given where a name or an object
belongs is named by its type, a base URL's user:password@ never shows (whatever it holds),
and a reload's error is logged without secrets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cli
from gateway.app import WORKERS_ENV, build_stack
from gateway.config import ConfigError, load_config
from gateway.doctor import redact_target
from gateway.supervisor import REPLACEMENT_ENV
from middleware.cache.semantic import HttpEmbedder, SemanticCache
from tests.harness import REPO, write_config

PROVIDER_SECRET = "sk-proj-SECRETVALUE0123456789"
VIRTUAL_KEY = "sk-sg-VIRTUALSECRET0123456789ab"
PASSWORD = "pgSECRET"  # of a proxy in front of a provider, before its "/", "?" or "#"

HEAD = """
import os
from gateway.config import Deployment, Middleware
from middleware.auth import AuthMiddleware
from providers import Provider
"""
PROVIDERS = 'providers = {"oa": Provider("openai", api_key_env="SG_T_SECRET_KEY")}\n'


@pytest.fixture(autouse=True)
def secrets_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_T_SECRET_KEY", PROVIDER_SECRET)
    monkeypatch.setenv("SG_T_VIRTUAL_KEY", VIRTUAL_KEY)
    monkeypatch.delenv("SG_T_UNSET_KEY", raising=False)


def refused(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The error loading the config gives, and what `check-config` and `doctor` print (exit
    2, one sentence): the same sentence, without any secret."""
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        build_stack(load_config(path))
    message = str(caught.value)
    for command in (["check-config", str(path)], ["doctor", "--config", str(path)]):
        assert cli.main(command) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err == f"sluicegate: {message}\n"
    assert "\n" not in message
    for secret in (PROVIDER_SECRET, VIRTUAL_KEY, PASSWORD):
        assert secret not in message, message
    return message


@pytest.mark.parametrize(("api_key_envs", "shown"), [
    ('[os.environ.get("SG_T_SECRET_KEY"), os.environ.get("SG_T_UNSET_KEY")]',
     "not a list holding None."),
    ('(os.environ["SG_T_SECRET_KEY"], 1)', "not a tuple holding an int."),
    ('(os.environ["SG_T_SECRET_KEY"], "")', "not a tuple holding an empty string."),
    ("7", "not an int."),
], ids=["a-key-and-none", "a-key-and-a-number", "a-key-and-nothing", "a-number"])
def test_api_key_envs_holding_keys_are_refused_by_type(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], api_key_envs: str,
        shown: str) -> None:
    message = refused(tmp_path, HEAD + PROVIDERS + (
        f'models = {{"m": [Deployment("oa", "y", free=True, api_key_envs={api_key_envs})]}}\n'),
        capsys)
    assert "Deployment('oa', 'y'): api_key_envs must be a tuple of strings such as ('eu',), " \
           f"{shown}" in message


def test_a_virtual_key_in_auth_keys_is_refused_by_type(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(tmp_path, HEAD + PROVIDERS + (
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        'middleware = [Middleware(AuthMiddleware, keys=[os.environ["SG_T_VIRTUAL_KEY"]])]\n'),
        capsys)
    assert "layer AuthMiddleware has wrong options: AuthMiddleware keys must be " \
           "StaticKey(...) objects, such as StaticKey('team', key_env='TEAM_KEY'), not str" \
           in message


# A proxy's password pasted as `openssl rand -base64` makes it, unencoded: urllib (and
# aiohttp) end the authority at its "/", "?" or "#", and what came before read as host:port.
UNENCODED = [f"http://proxyuser:{PASSWORD}{mark}pw@127.0.0.1:19301/anthropic"
             for mark in "/?#"]


@pytest.mark.parametrize("url", UNENCODED, ids=["slash", "question-mark", "hash"])
def test_a_base_url_whose_password_holds_a_delimiter_refuses_to_start_without_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str) -> None:
    message = refused(tmp_path, HEAD + (
        f'providers = {{"an": Provider("anthropic", base_url="{url}")}}\n'
        'models = {"m": [Deployment("an", "y", free=True)]}\n'), capsys)
    assert "a anthropic provider's base_url 'http://127.0.0.1:19301/anthropic' has no host " \
           "and port that can be read" in message
    assert "percent-encoded" in message and "proxyuser" not in message


@pytest.mark.parametrize("port", ["99999", "0"])
def test_a_base_url_with_a_port_out_of_range_refuses_to_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str) -> None:
    message = refused(tmp_path, HEAD + (
        f'providers = {{"oa": Provider("openai", base_url="https://u:pgSECRET@proxy:{port}/v1")}}\n'
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'), capsys)
    assert f"base_url 'https://proxy:{port}/v1' has no host and port that can be read" in message


def test_a_percent_encoded_password_loads_and_is_never_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, HEAD + (
        f'providers = {{"an": Provider("anthropic", base_url="http://proxyuser:{PASSWORD}'
        '%2Fpw@127.0.0.1:19301/anthropic")}\n'
        'models = {"m": [Deployment("an", "y", free=True)]}\n'))
    assert cli.main(["check-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "  an: anthropic at http://127.0.0.1:19301/anthropic, no key\n" in printed
    assert PASSWORD not in printed


@pytest.mark.parametrize(("address", "shown"), [
    *((url, "http://127.0.0.1:19301/anthropic") for url in UNENCODED),
    (f"https://u:{PASSWORD}@pw@api.example.com/v1?key=k#f", "https://api.example.com/v1"),
    (f"postgresql://app:{PASSWORD}/pw@db.internal/gw", "postgresql://db.internal:5432/gw"),
    (f"htps://u:{PASSWORD}?pw@emb.example/embed", "htps://emb.example/embed"),
], ids=["slash", "question-mark", "hash", "at", "postgresql", "other-scheme"])
def test_a_target_drops_everything_up_to_the_last_at(address: str, shown: str) -> None:
    assert redact_target(address) == shown


def test_an_embedder_url_that_is_not_http_is_shown_without_credentials() -> None:
    with pytest.raises(ConfigError) as caught:
        HttpEmbedder(f"htps://u:{PASSWORD}/pw@emb.example")
    assert str(caught.value) == "HttpEmbedder needs an http(s) URL, not " \
                                "'htps://emb.example/embed'."
    assert repr(HttpEmbedder(f"https://u:{PASSWORD}@emb.example")) == \
        "HttpEmbedder('https://emb.example/embed')"


def test_an_embedder_given_as_its_url_is_refused_by_type() -> None:
    with pytest.raises(ConfigError) as caught:
        SemanticCache(f"https://u:{PASSWORD}@emb.example")  # type: ignore[arg-type]
    assert str(caught.value) == "SemanticCache embedder (a str) has no embed(): give " \
        "LocalEmbedder(), HttpEmbedder(url) or OpenAIEmbedder(base_url, model)."


def test_a_reload_logs_why_its_config_did_not_load_without_secrets(tmp_path: Path) -> None:
    # A worker of a reload whose new file is broken serves the last good config, and logs
    # why before the config's redaction is set up (gateway/asgi.py).
    last_good = write_config(tmp_path, HEAD + PROVIDERS + (
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'), name="last_good.py")
    broken = write_config(tmp_path, HEAD + (
        'raise RuntimeError("cannot use " + os.environ["SG_T_SECRET_KEY"] + " nor "\n'
        f'                   + os.environ["SG_T_VIRTUAL_KEY"] + " at https://u:{PASSWORD}@proxy/v1")\n'))
    env = {key: value for key, value in os.environ.items()
           if key not in (REPLACEMENT_ENV, WORKERS_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", "import gateway.asgi"], cwd=REPO, text=True,
        capture_output=True, check=False, timeout=60,
        env={**env, "SLUICEGATE_CONFIG": str(broken),
             "SLUICEGATE_CONFIG_LAST_GOOD": str(last_good)})
    assert done.returncode == 0, done.stderr
    assert "the config did not load" in done.stderr and "serving the last config that did" \
        in done.stderr
    assert "RuntimeError: cannot use [redacted] nor [redacted] at https://[redacted]@proxy/v1" \
        in done.stderr
    for secret in (PROVIDER_SECRET, VIRTUAL_KEY, PASSWORD):
        assert secret not in done.stderr


def test_a_config_modules_own_exception_is_printed_without_secrets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The config did not load, so its secrets are not known: the values of environment
    # variables named like secrets go, and what any log line loses (URL userinfo, sk-sg-).
    message = refused(tmp_path, HEAD + PROVIDERS + (
        'raise RuntimeError("this key was refused: " + os.environ["SG_T_SECRET_KEY"] + '
        '", this one too: " + os.environ["SG_T_VIRTUAL_KEY"] + '
        '", by redis://:pgSECRET/x@cache:6379")\n'), capsys)
    assert message.endswith("RuntimeError: this key was refused: [redacted], this one too: "
                            "[redacted], by redis://[redacted]@cache:6379")
    assert ", line " in message


@pytest.mark.parametrize(("option", "says"), [
    ('store="redis://:pgSECRET@cache:6379/0"', "store must be a PostgreSQL DSN"),
    ("store=5", "store must be a key store such as PostgresKeyStore(dsn)"),
    ("customer_header=5", "customer_header must be an HTTP header name"),
    ('customer_header="x customer"', "customer_header must be an HTTP header name"),
    ('limits={"project": Limits()}', "limits are keyed by (kind, subject) pairs"),
    ('limits={("team", "acme"): Limits()}', "not per 'team'"),
    ('limits={("project", "acme"): 5}', "must be Limits(...), not a int."),
])
def test_auth_options_of_the_wrong_kind_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, says: str) -> None:
    # They were AttributeErrors and unpacking errors naming no option.
    message = refused(tmp_path, HEAD + PROVIDERS + (
        "from gateway.policy import Limits\n"
        "from middleware.auth import StaticKey\n"
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        'middleware = [Middleware(AuthMiddleware, keys=[StaticKey("t", '
        f'key_env="SG_T_VIRTUAL_KEY")], {option})]\n'), capsys)
    assert f"AuthMiddleware {option.split('=')[0]}" in message
    assert says in message


def test_an_auth_store_given_as_its_dsn_is_a_postgresql_key_store(tmp_path: Path) -> None:
    from middleware.auth import AuthMiddleware, PostgresKeyStore
    path = write_config(tmp_path, HEAD + PROVIDERS + (
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        'middleware = [Middleware(AuthMiddleware, '
        'store="postgresql://root@127.0.0.1:5432/test")]\n'))
    stack = build_stack(load_config(path))
    layers = []
    while stack is not None:
        layers.append(stack)
        stack = getattr(stack, "app", None)
    (auth,) = [layer for layer in layers if isinstance(layer, AuthMiddleware)]
    assert isinstance(auth.store, PostgresKeyStore)


@pytest.mark.parametrize(("layer", "option", "says"), [
    ("CacheMiddleware", 'ttl_s="5"', "CacheMiddleware ttl_s must be a number, not a str."),
    ("MeteringMiddleware", "journal_dir=5",
     "MeteringMiddleware journal_dir must be a directory's path, not a int."),
])
def test_layer_options_of_the_wrong_type_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], layer: str, option: str,
        says: str) -> None:
    # ("'<' not supported between instances of 'int' and 'str'" and "expected str, bytes
    # or os.PathLike object, not int" named neither the layer's option nor what it takes.)
    message = refused(tmp_path, HEAD + PROVIDERS + (
        "from middleware.cache import CacheMiddleware\n"
        "from middleware.metering import MeteringMiddleware\n"
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'
        f"middleware = [Middleware({layer}, {option})]\n"), capsys)
    assert message.endswith(says)
