"""What makes two requests the same answer: the exact cache's key, policy and request controls.

Pure functions, no I/O. The key is a SHA-256 over the canonical JSON (sorted keys, no
whitespace, integral floats written as integers) of the tenant scope, the optional namespace,
the public model name, the ingress operation and the request body *minus* the fields listed in
`IGNORED_FIELDS`. Everything else stays in, so a field added to an API tomorrow splits the
cache (a miss) rather than merging answers that differ (a wrong hit).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "ANTHROPIC_FORWARDED_HEADERS",
    "CACHE_POLICIES",
    "IGNORED_FIELDS",
    "TAGS_HEADER",
    "CacheControl",
    "cache_key",
    "cache_tags",
    "canonical",
    "forwarded_headers",
    "is_cacheable",
    "model_tag",
    "namespace_tag",
    "parse_cache_control",
    "project_tag",
]

# Request fields that never change what the model answers (OpenAI chat/completions/responses/
# embeddings and Anthropic messages). Everything not listed here is part of the key.
IGNORED_FIELDS = frozenset({
    "model",  # keyed separately: the public model name the caller asked for
    "stream",  # the same answer framed differently; a hit is replayed in either framing
    "stream_options",  # OpenAI: include_usage / include_obfuscation, stream framing only
    "user",  # OpenAI: end-user id for abuse monitoring
    "safety_identifier",  # OpenAI: the successor of `user`
    "metadata",  # OpenAI: stored-completion tags; Anthropic: {"user_id": ...}
    "store",  # OpenAI: keep the completion for evals/distillation
    "service_tier",  # OpenAI and Anthropic: which capacity pool serves it, not what it says
    "prompt_cache_key",  # OpenAI: routing hint for the provider's prompt cache
    "prompt_cache_retention",  # OpenAI: how long the provider keeps that prompt cache
})

# The request fields that hold JSON schemas, whose key order changes the answer: OpenAI's
# response_format and tools (functions), the Responses API's text.format and tools,
# Anthropic's tools (input_schema) and output_config.
_ORDERED_FIELDS = ("response_format", "tools", "functions", "text", "output_config")

CACHE_POLICIES = ("deterministic", "always", "never")
_DETERMINISTIC_OPERATIONS = frozenset({"openai.embeddings"})  # no sampling at all

_MAX_NAMESPACE_BYTES = 256
_MAX_SAFE_INTEGER = 2 ** 53  # floats above this are not all integers exactly representable


def cache_key(scope_id: str, model: str, operation: str, body: Mapping[str, Any], *,
              namespace: str | None = None,
              headers: tuple[tuple[str, str], ...] | None = None) -> str:
    """The hex SHA-256 that identifies an answer: equal for equivalent requests (key order,
    whitespace, `stream`, 1 vs 1.0) and different whenever a field that changes the output
    differs. `scope_id` is the tenant scope ("project:acme", "key:...", "global");
    `namespace` (from `x-sluicegate-cache-namespace`) partitions it further; `headers` are
    the request headers sent on to the provider that change its answer
    (`forwarded_headers`)."""
    # The canonical form differs from the body only where a float is integral (1.0 -> 1).
    # Top-level floats (temperature, top_p) are made canonical here; deeper ones are rare, and
    # orjson writes every one of them that canonical would change (|x| <= 2**53) as "N.0",
    # so a document without ".0" anywhere is canonical already and needs no walk through it.
    request = {name: canonical(value) if type(value) is float else value
               for name, value in body.items() if name not in IGNORED_FIELDS}
    text = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    # (find, not `in`: bytes' `in` first tries its argument as an integer, and raises)
    if text.find(b".0") != -1:  # perhaps a nested integral float (or only ".0" in a string)
        request = {name: canonical(value) for name, value in request.items()}
        text = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    # Sorted keys make key order no difference, but in a JSON schema it is one: a model
    # writes structured output, and a tool's arguments, in the schema's order ("reasoning"
    # before "answer", or after). Those fields are written again as they came.
    ordered = [request[name] for name in _ORDERED_FIELDS if name in request]
    if ordered:
        text += b"\n" + orjson.dumps(ordered)
    # The document's other members, written once per scope, namespace, model and operation:
    # sorted, they sit before and after "request", so the bytes are the whole document's.
    # (A copy of a hash that has read the text before: no new hash object to set up.)
    around = _AROUND.get((scope_id, namespace, model, operation, headers))
    if around is None:
        around = _around(scope_id, namespace, model, operation, headers)
    digest = around[0].copy()
    digest.update(text)
    digest.update(around[1])
    return digest.hexdigest()


Headers = tuple[tuple[str, str], ...]
_AROUND: dict[tuple[str, str | None, str, str, Headers | None],
              tuple[hashlib._Hash, bytes]] = {}


def _around(scope_id: str, namespace: str | None, model: str, operation: str,
            headers: Headers | None) -> tuple[hashlib._Hash, bytes]:
    """The canonical document's text before and after the request's: a SHA-256 that has
    read `{"headers":...,"model":...,"namespace":...,"operation":...,"request":`, and
    `,"scope":...}` ("headers" only when the request has some: other keys stay as they were)."""
    document: dict[str, Any] = {"scope": scope_id, "namespace": namespace, "model": model,
                                "operation": operation, "request": None}
    if headers:
        document["headers"] = headers
    text = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    before, _, after = text.rpartition(b'"request":null')
    if len(_AROUND) >= 4096:  # namespaces and headers come from requests: keep it bounded
        _AROUND.clear()
    around = _AROUND[(scope_id, namespace, model, operation, headers)] = \
        (hashlib.sha256(before + b'"request":'), after)
    return around


# The request headers the Anthropic adapter sends on to the provider (providers/anthropic.py
# `_FORWARDED_HEADERS`, which a layer may not import: tests/test_dependency_direction.py;
# test_cache_keys checks the two agree). A beta enables features, output limits and response
# shapes; a version changes the response format: both change the answer.
ANTHROPIC_FORWARDED_HEADERS = (b"anthropic-beta", b"anthropic-version")
_VERSION = b"anthropic-version"


# The deployment tags a request asks for (middleware/failover/routing.py `TAGS_HEADER`): they
# choose which deployments may answer (a region, a tier), so an answer from one set of
# deployments must not answer a request pinned to another (nor one no deployment could serve,
# which failover refuses).
TAGS_HEADER = b"x-sluicegate-tags"


def forwarded_headers(headers: list[tuple[bytes, bytes]], *,
                      anthropic: bool = True) -> Headers | None:
    """The output-changing headers of a request, as `cache_key` and the semantic partition
    take them (None: none): the deployment tags it asks for, and for an Anthropic-format
    request (`anthropic`) those the adapter sends on to the provider. A list is read as a set
    (`a,b` is `b, a`); several lines of one header count as one list, but for the version,
    of which the last line is the one sent."""
    found: dict[str, set[str]] | None = None
    for name, value in headers:
        if name == TAGS_HEADER or (anthropic and name in ANTHROPIC_FORWARDED_HEADERS):
            if found is None:
                found = {}
            text = value.decode("latin-1")
            if name == _VERSION:  # one value, the last line's, as the adapter sends it on
                found["anthropic-version"] = {text.strip()}
                continue
            found.setdefault(name.decode("latin-1"), set()).update(
                item.strip() for item in text.split(",") if item.strip())
    if found is None:
        return None
    return tuple((name, ",".join(sorted(values))) for name, values in sorted(found.items()))


def canonical(value: Any) -> Any:
    """`value` with JSON's one number type, as the key hashes it: `"temperature": 0` and
    `0.0` are the same request."""
    kind = type(value)
    if kind is float:
        if value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
            return int(value)
        return value
    if kind is dict:
        return {name: canonical(item) for name, item in value.items()}
    if kind is list:
        return [canonical(item) for item in value]
    return value


def is_cacheable(body: Mapping[str, Any], *, policy: str = "deterministic",
                 opt_in: bool = False, operation: str | None = None) -> bool:
    """Whether a request may be answered from (and stored into) the cache.

    - "deterministic" (the default): requests with `temperature` 0, embeddings (no sampling),
      and requests that opted in (`x-sluicegate-cache: on`, passed as `opt_in`). A missing
      temperature is the provider's default (1.0 for OpenAI and Anthropic): not cached.
    - "always": every request; sampled answers are then replayed as they were first drawn.
    - "never": none, whatever the request asks.
    """
    if policy == "never":
        return False
    if policy == "always":
        return True
    if policy != "deterministic":
        raise ValueError(f"unknown cache policy {policy!r}; expected one of "
                         f"{', '.join(CACHE_POLICIES)}")
    if opt_in or operation in _DETERMINISTIC_OPERATIONS:
        return True
    temperature = body.get("temperature")
    return type(temperature) in (int, float) and temperature == 0


# -- invalidation tags ---------------------------------------------------------------------------

def project_tag(project: str) -> str:
    return "project:" + project


def model_tag(model: str) -> str:
    return "model:" + model


def namespace_tag(namespace: str) -> str:
    return "namespace:" + namespace


def cache_tags(*, model: str, project: str | None = None,
               namespace: str | None = None) -> tuple[str, ...]:
    """The tags an entry is stored with, so that an admin call can drop every entry of a
    project, a model or a namespace (or of their intersection: `store.invalidate(
    project_tag("acme"), namespace_tag("faq"))`)."""
    tags = [model_tag(model)]
    if project is not None:
        tags.append(project_tag(project))
    if namespace is not None:
        tags.append(namespace_tag(namespace))
    return tuple(tags)


# -- request headers -----------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class CacheControl:
    """What the caller asked of the cache (RFC 9111 §5.2.1 request directives, and ours).

    `no_cache`: do not answer from the cache (the fresh answer may still be stored).
    `no_store`: do not store this request's answer.
    `max_age_s`: accept only entries at most this many seconds old.
    `namespace`: `x-sluicegate-cache-namespace`, a partition of the tenant's cache.
    `opt_in`: `x-sluicegate-cache: on`; `x-sluicegate-cache: off` sets no_cache and no_store.
    `only_if_cached`: answer from the cache or not at all (RFC 9111 §5.2.1.7: 504 otherwise);
    it sets no_store too (there is never a fresh answer to store, nor a vector to index).
    """

    no_cache: bool = False
    no_store: bool = False
    max_age_s: int | None = None
    namespace: str | None = None
    opt_in: bool = False
    only_if_cached: bool = False

    def accepts(self, created_at: float, now: float) -> bool:
        """Whether an entry created at `created_at` (epoch seconds) is young enough."""
        return self.max_age_s is None or now - created_at <= self.max_age_s


DEFAULT_CACHE_CONTROL = CacheControl()
_DELTA_SECONDS_MAX = 2**31  # RFC 9111 §1.2.2: what a larger delta-seconds counts as
_CONTROL_HEADERS = frozenset({b"cache-control", b"pragma", b"x-sluicegate-cache",
                              b"x-sluicegate-cache-namespace"})


def parse_cache_control(headers: list[tuple[bytes, bytes]]) -> CacheControl:
    """Reads `Cache-Control` (and HTTP/1.0 `Pragma: no-cache` when there is no Cache-Control),
    `x-sluicegate-cache` and `x-sluicegate-cache-namespace` from ASGI (lower-case) headers.

    Unknown directives and an unreadable `max-age` are ignored (RFC 9111 §5.2); one past 2^31
    counts as 2^31 (§1.2.2); with several `max-age` values the strictest wins. A namespace
    that is not printable ASCII or is longer than 256 bytes raises ValueError (the caller
    answers 400) rather than being dropped, which would merge it with the default namespace.
    """
    if _CONTROL_HEADERS.isdisjoint(dict(headers)):  # (nearly every request: a loop in C)
        return DEFAULT_CACHE_CONTROL
    directives: list[str] = []
    pragma_no_cache = seen_cache_control = opt_in = opt_out = False
    namespace: str | None = None
    for name, value in headers:
        if name not in _CONTROL_HEADERS:  # nearly every header: one set lookup, not four tests
            continue
        if name == b"cache-control":
            seen_cache_control = True
            directives += value.decode("latin-1").split(",")
        elif name == b"pragma":
            pragma_no_cache |= b"no-cache" in value.lower()
        elif name == b"x-sluicegate-cache":
            switch = value.strip().lower()
            opt_in, opt_out = switch == b"on", switch == b"off"
        elif name == b"x-sluicegate-cache-namespace":
            namespace = _namespace(value)
    if not (directives or pragma_no_cache or opt_in or opt_out or namespace):
        return DEFAULT_CACHE_CONTROL
    no_cache, no_store, max_age, only_if_cached = _directives(directives)
    no_cache |= pragma_no_cache and not seen_cache_control
    return CacheControl(no_cache=no_cache or opt_out,
                        no_store=no_store or opt_out or only_if_cached,
                        max_age_s=max_age, namespace=namespace, opt_in=opt_in,
                        only_if_cached=only_if_cached)


def _directives(directives: list[str]) -> tuple[bool, bool, int | None, bool]:
    no_cache = no_store = only_if_cached = False
    max_age: int | None = None
    for directive in directives:
        name, _, argument = directive.strip().partition("=")
        name = name.strip().lower()
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "only-if-cached":
            only_if_cached = True
        elif name == "max-age":
            seconds = _delta_seconds(argument)
            if seconds is not None:
                max_age = seconds if max_age is None else min(max_age, seconds)
    return no_cache, no_store, max_age, only_if_cached


def _delta_seconds(argument: str) -> int | None:
    # RFC 9111 §1.2.2: delta-seconds is 1*DIGIT; §5.2 allows the quoted-string form too. A
    # value past 2^31 counts as 2^31 (ibid.): judged by its length before int(), which refuses
    # more than 4300 digits (a ValueError, which would make the header a 400).
    text = argument.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not (text.isascii() and text.isdigit()):
        return None
    text = text.lstrip("0") or "0"
    return _DELTA_SECONDS_MAX if len(text) > 10 else min(int(text), _DELTA_SECONDS_MAX)


def _namespace(value: bytes) -> str | None:
    text = value.strip()
    if not text:
        return None
    if len(text) > _MAX_NAMESPACE_BYTES or not all(0x20 <= byte < 0x7F for byte in text):
        raise ValueError("x-sluicegate-cache-namespace must be printable ASCII, at most "
                         f"{_MAX_NAMESPACE_BYTES} bytes")
    return text.decode("ascii")
