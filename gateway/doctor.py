"""`sluicegate doctor --config PATH`: whether what a config module names can be reached.

It loads the config and builds the stack as `serve` does, runs every component's `startup()`
(innermost first), then checks, each within `--timeout` seconds:

- every store the components report through `check_ready()` ({store name: "ok" | problem};
  for the doctor, "degraded: ..." is a failure too);
- pgvector, where a PgVectorIndex is configured and its own check did not already show it
  ready (its startup creates the extension): is `vector` in pg_extension, or at least
  available on the server;
- every provider, with a cheap authenticated GET of its family's model list (the adapter's
  `probe()`): with the provider's own key, and with each deployment key (`api_key_envs`) of
  the deployments it serves, named by the environment variable, never by the value.

Then it shuts every component down (outermost first) and reports background tasks that
outlived the shutdown. Targets are shown without credentials (scheme://host:port/db, no
userinfo or query); details are one line, with known secrets and DSN passwords removed.

gateway/ imports no layer or provider: components, stores and adapters are reached through
the stack and the config (duck typing), as the kernel reaches them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from gateway.app import create_app
from gateway.config import GatewayConfig, load_config
from gateway.kernel import stack_components
from gateway.resp import RedisEndpoint, RespClient, parse_redis_url, split_userinfo
from gateway.upstream import ProviderKey

OK, FAIL, SKIP = "ok", "FAIL", "skip"
DEFAULT_TIMEOUT_S = 10.0
_SHUTDOWN_MIN_S = 10.0  # shutdowns flush queues; give them at least this long
_REDACTED = "[redacted]"
_HIDDEN = "(hidden)"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the report."""

    check: str
    target: str
    status: str  # OK, FAIL or SKIP (a provider adapter without probe())
    detail: str  # latency ("12 ms") or why it failed, on one line

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "target": self.target, "status": self.status,
                "detail": self.detail}


# -- the command -------------------------------------------------------------------------------

def positive_seconds(text: str) -> float:
    """argparse type of `--timeout`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds, e.g. 5 or 2.5") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def run_doctor(path: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Row]:
    """The checks of `sluicegate doctor` (the CLI prints them with `report`). A ConfigError
    (exit 2 in the CLI) propagates."""
    config = load_config(path)
    kernel = create_app(config)  # builds the stack and runs the layers' check_config
    scrub = Scrubber.for_config(config, stack_components(kernel.app))
    _quiet_logging(scrub)
    return asyncio.run(diagnose(config, kernel.app, timeout_s=timeout_s, scrub=scrub))


def report(rows: list[Row], *, as_json: bool = False) -> str:
    """The rows as the CLI prints them: a table and a summary line, or a JSON list."""
    if as_json:
        return orjson.dumps([row.as_dict() for row in rows], option=orjson.OPT_INDENT_2).decode()
    failed = sum(row.status == FAIL for row in rows)
    summary = f"{len(rows)} checks: " + (f"{failed} failed." if failed else "all ok.")
    return render_table(rows) + "\n" + summary


def _quiet_logging(scrub: Scrubber) -> None:
    """Components log retries and warnings while the doctor probes them; the report says it
    better. Errors (e.g. an unclosed session) still reach stderr, scrubbed."""

    class _Scrubbed(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return scrub(super().format(record))

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR)  # some libraries' loggers set their own level
    handler.setFormatter(_Scrubbed("sluicegate doctor: %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.ERROR)


def render_table(rows: list[Row]) -> str:
    table = [["CHECK", "TARGET", "STATUS", "DETAIL"]]
    table += [[_printable(row.check), _printable(row.target), row.status,
               _printable(row.detail)] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(*table, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                         strict=True)).rstrip()
                     for line in table)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


# -- the checks --------------------------------------------------------------------------------

async def diagnose(config: GatewayConfig, app: Any, *, timeout_s: float,
                   scrub: Scrubber | None = None) -> list[Row]:
    """Starts the stack's components, checks stores, pgvector and providers, shuts the
    components down; one Row per check (and per startup or shutdown that failed)."""
    scrub = scrub or Scrubber.for_config(config, stack_components(app))
    components = stack_components(app)
    resources = {id(component): find_resources(component) for component in components}
    rows: list[Row] = []
    started: list[Any] = []
    try:
        for component in reversed(components):  # innermost first, as the kernel does
            start = getattr(component, "startup", None)
            if not callable(start):
                continue
            started.append(component)
            _, error, _ = await _bounded(start(), timeout_s)
            if error is not None:
                rows.append(Row(f"startup {type(component).__name__}",
                                _targets(resources[id(component)]), FAIL, scrub(error)))
        probes = asyncio.gather(*(_probe(name, adapter, key, env, timeout_s, scrub)
                                  for name, adapter, key, env in provider_probes(config)))
        try:
            # Also after a failed startup: the report then names the store that failed
            # (check_ready never raises, by contract; it is bounded anyway).
            checked = await asyncio.gather(*(
                _check_component(component, resources[id(component)], timeout_s, scrub)
                for component in components
                if callable(getattr(component, "check_ready", None))))
            reports: dict[int, dict[str, str]] = {}
            for component_id, component_rows, report in checked:
                rows.extend(component_rows)
                reports[component_id] = report
            rows.extend(await asyncio.gather(*(
                _check_pgvector(resource, timeout_s, scrub)
                for component in components
                for resource in _uncovered_pgvector(resources[id(component)],
                                                    reports.get(id(component), {})))))
        finally:
            rows.extend(await probes)
    finally:
        for component in reversed(started):  # outermost first
            stop = getattr(component, "shutdown", None)
            if callable(stop):
                _, error, _ = await _bounded(stop(), max(timeout_s, _SHUTDOWN_MIN_S))
                if error is not None:
                    rows.append(Row(f"shutdown {type(component).__name__}",
                                    _targets(resources[id(component)]), FAIL, scrub(error)))
    rows.extend(await _leftover_tasks())
    return rows


async def _bounded(awaitable: Awaitable[_T], timeout_s: float
                   ) -> tuple[_T | None, str | None, float]:
    """(result, None, seconds) or (None, why it failed, seconds); never raises but
    cancellation of the doctor itself."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            value = await awaitable
    except TimeoutError:
        return None, f"timed out after {timeout_s:g} s", time.monotonic() - began
    except Exception as exc:  # noqa: BLE001 (a failing component is a report)
        return None, f"{type(exc).__name__}: {exc}", time.monotonic() - began
    return value, None, time.monotonic() - began


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


async def _check_component(component: Any, resources: list[Resource], timeout_s: float,
                           scrub: Scrubber) -> tuple[int, list[Row], dict[str, str]]:
    report, error, elapsed = await _bounded(component.check_ready(), timeout_s)
    name = type(component).__name__
    if error is not None:
        return id(component), [Row(f"store {name}", _targets(resources), FAIL,
                                   scrub(error))], {}
    if not isinstance(report, dict):
        return id(component), [Row(f"store {name}", _targets(resources), FAIL,
                                   f"check_ready() answered a {type(report).__name__}, "
                                   "not a dict")], {}
    rows = [Row(f"store {store}", target_for(str(store), resources),
                OK if value == "ok" else FAIL,
                _latency(elapsed) if value == "ok" else scrub(str(value)))
            for store, value in report.items()]
    return id(component), rows, {str(key): str(value) for key, value in report.items()}


def provider_probes(config: GatewayConfig) -> Iterator[tuple[str, Any, ProviderKey | None,
                                                             str | None]]:
    """(provider name, adapter, key or None for the provider's own, env var name) to probe:
    the provider's own key (or none, when it has none and serves a deployment without keys),
    then each deployment key of its deployments, once per variable."""
    for name, adapter in config.providers.items():
        keys: dict[str, ProviderKey] = {}
        keyless = False
        for model in config.models.values():
            for deployment in model.deployments:
                if deployment.provider != name:
                    continue
                keyless = keyless or not deployment.keys
                for key in deployment.keys:
                    keys.setdefault(key.env, key)
        own_env = getattr(adapter, "api_key_env", None)
        if own_env or keyless or not keys:
            yield name, adapter, None, own_env or None
        for env, key in keys.items():
            yield name, adapter, key, env


async def _probe(name: str, adapter: Any, key: ProviderKey | None, env: str | None,
                 timeout_s: float, scrub: Scrubber) -> Row:
    check = f"provider {name}" + (f" [{env}]" if env else "")
    request = getattr(adapter, "probe_request", None)
    url = request("")[0] if callable(request) else str(getattr(adapter, "base_url", ""))
    target = redact_target(url)
    probe = getattr(adapter, "probe", None)
    if not callable(probe):
        return Row(check, target, SKIP, f"a {type(adapter).__name__} has no probe()")
    redact: Callable[[str], str] = getattr(adapter, "redact", lambda text: text)
    # The adapter bounds its own call; this bound is for an adapter that does not.
    result, error, elapsed = await _bounded(probe(key, timeout_s=timeout_s), timeout_s + 1.0)
    if error is not None:
        return Row(check, target, FAIL, scrub(redact(error)))
    ok, why = result if isinstance(result, tuple) else (False, f"probe() answered {result!r}")
    return Row(check, target, OK if ok else FAIL,
               _latency(elapsed) if ok else scrub(redact(str(why))))


_PGVECTOR_SQL = ("SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                 "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector')")


def _uncovered_pgvector(resources: list[Resource], report: dict[str, str]) -> list[Resource]:
    """The component's PgVectorIndexes whose readiness does not already show the extension
    (the index reports "semantic_index": "ok" only once CREATE EXTENSION vector and its
    table are done)."""
    indexes = [resource for resource in resources if resource.is_pgvector]
    if len(indexes) == 1 and report.get("semantic_index") == "ok":
        return []
    return indexes


async def _check_pgvector(resource: Resource, timeout_s: float, scrub: Scrubber) -> Row:
    target = redact_target(resource.raw)

    async def query() -> tuple[Any, Any]:
        import psycopg  # a PgVectorIndex is configured, so psycopg is installed

        conn = await psycopg.AsyncConnection.connect(
            resource.raw, autocommit=True, connect_timeout=max(2, math.ceil(timeout_s)),
            application_name="sluicegate-doctor")
        async with conn:
            cursor = await conn.execute(_PGVECTOR_SQL)
            row = await cursor.fetchone()
        return (row[0], row[1]) if row is not None else (None, None)

    result, error, elapsed = await _bounded(query(), timeout_s)
    if error is not None or result is None:
        return Row("pgvector", target, FAIL, scrub(f"cannot query: {error}"))
    installed, available = result
    if installed is not None:
        return Row("pgvector", target, OK, _latency(elapsed))
    if available is not None:
        return Row("pgvector", target, FAIL,
                   f"the vector extension ({available}) is available but not created in this "
                   "database; the index creates it at startup, which needs a role allowed to "
                   "CREATE EXTENSION vector")
    return Row("pgvector", target, FAIL,
               "the vector extension is not installed on this PostgreSQL server (pgvector)")


async def _leftover_tasks() -> list[Row]:
    """Background tasks a component started and its shutdown left running: reported, then
    cancelled (asyncio.run would cancel them silently)."""
    current = asyncio.current_task()
    leftover = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if not leftover:
        return []
    names = ", ".join(sorted(task.get_name() for task in leftover))
    for task in leftover:
        task.cancel()
    await asyncio.wait(leftover, timeout=_SHUTDOWN_MIN_S)
    return [Row("shutdown", "-", FAIL, f"{len(leftover)} background task(s) outlived the "
                                       f"shutdown: {names}")]


# -- where the stores are ----------------------------------------------------------------------

_ADDRESS_ATTRIBUTES = ("url", "dsn", "_url", "_dsn")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                  "redis+cluster", "rediss+cluster")
_POSTGRES_SCHEMES = ("postgres", "postgresql")
_LIBPQ_KEYWORD = re.compile(r"\b(host|hostaddr|dbname|port|user)\s*=")
_LOCAL_STORES = frozenset({"memory", "journal", "static", "local"})
_FAMILIES = frozenset({"redis", "postgres", "postgresql", "pg"})
_MAX_DEPTH = 3


@dataclass(frozen=True, slots=True)
class Resource:
    """A store address found in a component: where it was, the object holding it, the raw
    address (never printed; see redact_target), words that name it (to match report names)
    and the secrets it carries (passwords)."""

    path: str
    holder: Any
    raw: str
    words: frozenset[str]
    secrets: frozenset[str]

    @property
    def is_pgvector(self) -> bool:
        # gateway/ imports no layer; a config with a PgVectorIndex has loaded its module.
        module = sys.modules.get("middleware.cache.semantic")
        cls = getattr(module, "PgVectorIndex", None)
        return isinstance(cls, type) and isinstance(self.holder, cls)


def find_resources(component: Any) -> list[Resource]:
    """Store addresses held by the component or by the objects it holds from its own
    package (its stores, ledger, index), nearest first, one per holding object: a `url`,
    `dsn`, `_url` or `_dsn` that is a redis://, postgresql:// or libpq "host=..." string, or a
    gateway RespClient (Redis). The next layer (`.app`) is not entered."""
    package = type(component).__module__.split(".")[0]
    found: dict[int, Resource] = {}
    seen = {id(component)}
    queue: deque[tuple[str, Any, int]] = deque([("", component, 0)])
    while queue:
        path, holder, depth = queue.popleft()
        attributes = _attributes(holder)
        for name in _ADDRESS_ATTRIBUTES:
            raw = attributes.get(name)
            if isinstance(raw, str) and _is_store_address(raw):
                _add_resource(found, path, holder, raw, _address_secrets(raw))
                break
        for name, value in attributes.items():
            if name == "app" or id(value) in seen:
                continue
            if isinstance(value, RespClient):
                seen.add(id(value))
                _add_resource(found, path, holder, _resp_address(value.endpoint),
                              {secret for secret in (value.endpoint.password,
                                                     value.endpoint.sentinel_password)
                               if secret})
            elif depth < _MAX_DEPTH and _walkable(value, package):
                seen.add(id(value))
                queue.append((f"{path}.{name}" if path else name, value, depth + 1))
    return list(found.values())


def _resp_address(endpoint: RedisEndpoint) -> str:
    """A RespClient's endpoint as a URL without credentials."""
    if endpoint.mode == "unix":
        return f"unix://{endpoint.unix_path}"
    scheme = ("rediss" if endpoint.tls else "redis") + \
        {"direct": "", "sentinel": "+sentinel", "cluster": "+cluster"}[endpoint.mode]
    hosts = ",".join(_host_port(host, str(port)) for host, port in endpoint.addresses)
    path = f"/{endpoint.service}/{endpoint.db}" if endpoint.service else f"/{endpoint.db}"
    return f"{scheme}://{hosts}{path}"


def _add_resource(found: dict[int, Resource], path: str, holder: Any, raw: str,
                  secrets: set[str]) -> None:
    if id(holder) not in found:
        words = _words(path) | _words(type(holder).__name__) | _family_words(raw)
        found[id(holder)] = Resource(path, holder, raw, frozenset(words), frozenset(secrets))


def _attributes(holder: Any) -> dict[str, Any]:
    """Instance attributes (`__dict__`, slots, and a compiled native class's attributes,
    which mypyc lists in `__mypyc_attrs__`), read without running properties."""
    attributes = dict(getattr(holder, "__dict__", {}))
    for cls in type(holder).__mro__:
        slots = getattr(cls, "__slots__", ())
        names = (*((slots,) if isinstance(slots, str) else slots),
                 *cls.__dict__.get("__mypyc_attrs__", ()))
        for slot in names:
            if slot in ("__dict__", "__weakref__") or slot in attributes:
                continue
            try:
                attributes[slot] = object.__getattribute__(holder, slot)
            except AttributeError:
                continue
    return attributes


def _walkable(value: Any, package: str) -> bool:
    if isinstance(value, (type, ModuleType, FunctionType, BuiltinFunctionType, MethodType)):
        return False
    return type(value).__module__.split(".")[0] == package


def _is_store_address(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    if sep:
        return scheme.lower() in _REDIS_SCHEMES + _POSTGRES_SCHEMES
    return bool(_LIBPQ_KEYWORD.search(text))


def _words(text: str) -> set[str]:
    """"semantic.index" -> {semantic, index}; "PgVectorIndex" -> {pg, vector, index}."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", text).lower()
    return {word for word in re.split(r"[^a-z0-9]+", spaced) if word}


def _family_words(raw: str) -> set[str]:
    scheme = raw.partition("://")[0].lower() if "://" in raw else "postgresql"
    return {"redis"} if scheme in _REDIS_SCHEMES else {"postgres", "postgresql", "pg"}


def target_for(store: str, resources: list[Resource]) -> str:
    """The address a reported store name most likely stands for: the resource sharing the
    most words with it ("quota_store" -> the `store` attribute, "spend_ledger" -> `ledger`,
    "cache_redis" -> the redis:// one); "-" for stores in the process or no clear match."""
    wanted = _words(store)
    named = wanted & _FAMILIES  # "cache_redis" is never the PostgreSQL one
    candidates = [resource for resource in resources if not named or named & resource.words]
    if not candidates or wanted & _LOCAL_STORES:
        return "-"
    scores = [(len(wanted & resource.words), resource) for resource in candidates]
    best = max(score for score, _ in scores)
    targets = {redact_target(resource.raw) for score, resource in scores if score == best}
    return targets.pop() if best > 0 and len(targets) == 1 else "-"


def _targets(resources: list[Resource]) -> str:
    return ", ".join(dict.fromkeys(redact_target(r.raw) for r in resources)) or "-"


# -- addresses without credentials -------------------------------------------------------------

_DEFAULT_PORTS = {"redis": "6379", "rediss": "6379", "redis+sentinel": "26379",
                  "rediss+sentinel": "26379", "redis+cluster": "6379", "rediss+cluster": "6379",
                  "postgres": "5432", "postgresql": "5432"}
_LIBPQ_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")


def redact_target(address: str) -> str:
    """`address` with no credentials: scheme://host:port/path (a Redis db, a PostgreSQL
    database, an HTTP path), without userinfo, query or fragment. A libpq "key=value" DSN
    becomes postgresql://host:port/dbname. Anything unreadable is "(hidden)"."""
    text = address.strip()
    if "://" not in text:
        params = libpq_params(text)
        if params is None:
            return _HIDDEN
        host = params.get("host") or params.get("hostaddr") or "localhost"
        return f"postgresql://{_host_port(host, params.get('port') or '5432')}/" \
               f"{params.get('dbname', '')}"
    scheme, _, rest = text.partition("://")
    if scheme.lower() in _REDIS_SCHEMES:
        try:
            parse_redis_url(text)
        except ValueError:
            return _HIDDEN
    # Every scheme's userinfo ends at its last "@", as the gateway reads a Redis URL: urllib
    # ends it at a password's first unencoded "/", "?" or "#" and would show the rest of it
    # (`openssl rand -base64` makes passwords holding "/").
    text = f"{scheme}://{split_userinfo(rest)[2]}"
    try:
        parts = urlsplit(text)
    except ValueError:
        return _HIDDEN
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return f"unix://{parts.path}"
    hostport = parts.netloc.rpartition("@")[2]
    if not hostport and scheme in _POSTGRES_SCHEMES:
        hostport = (parse_qs(parts.query).get("host") or ["localhost"])[0]
    if scheme in _DEFAULT_PORTS:  # Sentinel and Cluster URLs name several hosts
        hostport = ",".join(host if re.search(r":\d+$", host) else
                            _host_port(host, _DEFAULT_PORTS[scheme])
                            for host in hostport.split(","))
    return f"{scheme}://{hostport}{parts.path}"


def _host_port(host: str, port: str) -> str:
    if "," in host or "," in port:  # libpq's several hosts: leave them as given
        return f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def libpq_params(dsn: str) -> dict[str, str] | None:
    """A libpq "key=value ..." connection string as a dict, or None if it is not one."""
    params: dict[str, str] = {}
    position, text = 0, dsn.rstrip()
    while position < len(text):
        match = _LIBPQ_PAIR.match(text, position)
        if match is None:
            return None
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
        position = match.end()
    return params or None


def _address_secrets(address: str) -> set[str]:
    """The password (and the whole address, which may hold one) of a store address."""
    secrets = {address}
    if address.partition("://")[0].lower() in _REDIS_SCHEMES:
        try:  # (as the gateway reads it; urllib below gives a password's encoded form)
            endpoint = parse_redis_url(address)
        except ValueError:
            return secrets
        secrets |= {secret for secret in (endpoint.password, endpoint.sentinel_password)
                    if secret}
    if "://" in address:
        try:
            parts = urlsplit(address)
            password = parts.password
        except ValueError:
            return secrets
        if password:
            secrets |= {password, unquote(password)}
        secrets |= set(parse_qs(parts.query).get("password", []))
    else:
        password = (libpq_params(address) or {}).get("password")
        if password:
            secrets.add(password)
    return secrets


# -- secrets out of every line -----------------------------------------------------------------

# (to the last "@" before a space or quote: a password pasted unencoded may hold "/", "?"
# or "#", which end the userinfo of a URL read by the RFC; a path holding "@" loses its
# start to the redaction, which shows less, never more)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^@\s'\"<>]+@")
_PASSWORD_PAIR = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
# Any virtual key (middleware.auth.keys.KEY_PREFIX; the gateway package may not import a
# layer): one pasted into a URL's path reaches hypercorn's access log, which no layer sees.
_VIRTUAL_KEY = re.compile(r"sk-sg-[\w-]+")


class Scrubber:
    """Takes secrets out of a line: provider keys, deployment keys, admin and metrics tokens,
    any virtual key (sk-sg-...), store passwords and addresses, any URL userinfo and any
    password=...; then one line, bounded. `redact` alone keeps the text's lines and
    length (the serving process's log filter, gateway/logs.py)."""

    def __init__(self, secrets: Iterable[str], limit: int = 300) -> None:
        # Longest first, so a secret that contains another goes whole.
        self.secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)
        self.limit = limit

    @classmethod
    def for_config(cls, config: GatewayConfig, components: list[Any]) -> Scrubber:
        secrets: set[str] = set()
        for adapter in config.providers.values():
            env = getattr(adapter, "api_key_env", None)
            if env:
                secrets.add(os.environ.get(env, "").strip())
        for model in config.models.values():
            for deployment in model.deployments:
                secrets |= {key.secret for key in deployment.keys}
        if config.settings.metrics_token_env:
            secrets.add(os.environ.get(config.settings.metrics_token_env, "").strip())
        for item in config.middleware:
            secrets |= _env_secrets(item.kwargs, depth=0)
        for component in components:
            for resource in find_resources(component):
                secrets |= resource.secrets
        return cls(secrets)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        text = _USERINFO.sub(rf"\1{_REDACTED}@", text)
        if "sk-sg-" in text:
            text = _VIRTUAL_KEY.sub(_REDACTED, text)
        return _PASSWORD_PAIR.sub(rf"\1{_REDACTED}", text)

    def __call__(self, text: str) -> str:
        text = " ".join(self.redact(text).split())
        return text if len(text) <= self.limit else text[:self.limit - 3] + "..."


def _env_secrets(options: Any, depth: int) -> set[str]:
    """What the environment variables a layer's options name hold: every `*_env` option or
    attribute of an option's objects (admin_token_env, a StaticKey's key_env, an embedder's
    key_env, a RedisHealth's url_env), with the passwords of those that are addresses."""
    secrets: set[str] = set()
    items = options.items() if isinstance(options, dict) else \
        enumerate(options) if isinstance(options, (list, tuple)) else \
        _attributes(options).items()
    for name, value in items:
        if isinstance(name, str) and name.endswith("_env") and isinstance(value, str):
            secret = os.environ.get(value, "").strip()
            secrets |= _address_secrets(secret) if _is_store_address(secret) else {secret}
        elif depth < _MAX_DEPTH and not isinstance(value, (str, bytes, int, float, type,
                                                           ModuleType, FunctionType,
                                                           BuiltinFunctionType, MethodType)):
            secrets |= _env_secrets(value, depth + 1)
    return secrets
