"""The exact cache's key, policy and request controls (pure: no I/O, no ASGI)."""
from __future__ import annotations

import copy
import hashlib
from typing import Any

import orjson
import pytest

from middleware.cache.keys import (
    ANTHROPIC_FORWARDED_HEADERS,
    IGNORED_FIELDS,
    CacheControl,
    cache_key,
    cache_tags,
    forwarded_headers,
    is_cacheable,
    model_tag,
    namespace_tag,
    parse_cache_control,
    project_tag,
)

SCOPE = "project:acme"

OPENAI_CHAT: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "temperature": 0,
    "top_p": 1,
    "max_completion_tokens": 64,
    "tools": [{"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}}}}}],
    "tool_choice": "auto",
    "response_format": {"type": "text"},
    "seed": 7,
    "stop": ["\n\n"],
    "n": 1,
    "logprobs": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}

ANTHROPIC_MESSAGES: dict[str, Any] = {
    "model": "claude-sonnet-4",
    "system": [{"type": "text", "text": "You are terse."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}],
    "max_tokens": 64,
    "temperature": 0,
    "top_k": 5,
    "stop_sequences": ["END"],
    "tools": [{"name": "add", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
    "thinking": {"type": "disabled"},
}

SHAPES = [("openai.chat", OPENAI_CHAT), ("anthropic.messages", ANTHROPIC_MESSAGES)]
SHAPE_IDS = ["openai", "anthropic"]


def key_of(body: dict[str, Any], operation: str = "openai.chat", **options: Any) -> str:
    return cache_key(SCOPE, body.get("model", "m"), operation, body, **options)


# -- canonical form ------------------------------------------------------------------------------

def test_the_key_is_the_sha256_of_the_documented_canonical_json() -> None:
    body = {"model": "gpt-4o", "temperature": 0.0, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    canonical = (b'{"model":"gpt-4o","namespace":null,"operation":"openai.chat",'
                 b'"request":{"messages":[{"content":"hi","role":"user"}],"temperature":0},'
                 b'"scope":"project:acme"}')

    assert cache_key(SCOPE, "gpt-4o", "openai.chat", body) == \
        hashlib.sha256(canonical).hexdigest()


def test_the_documented_key_holds_for_every_scope_namespace_and_model_seen() -> None:
    # The text around the request is written once per scope, namespace, model and operation
    # (and forgotten after 4,096 of them: namespaces come from requests). Each key is still
    # the hash of its whole document, the first time, the second, and after the forgetting.
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}

    def documented(scope: str, namespace: str | None, model: str) -> str:
        document = {"scope": scope, "namespace": namespace, "model": model,
                    "operation": "openai.chat",
                    "request": {"temperature": 0, "messages": body["messages"]}}
        return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()

    cases = [(SCOPE, None, "m"), (SCOPE, "faq", "m"), ("key:k1", None, "m"),
             ("global", 'quote " and \\ "request":null', "m"), (SCOPE, None, "other")]
    for _ in range(2):
        for scope, namespace, model in cases:
            assert cache_key(scope, model, "openai.chat", body, namespace=namespace) == \
                documented(scope, namespace, model)
    for number in range(4_200):
        assert cache_key(SCOPE, "m", "openai.chat", body, namespace=f"n{number}") == \
            documented(SCOPE, f"n{number}", "m")
    for scope, namespace, model in cases:
        assert cache_key(scope, model, "openai.chat", body, namespace=namespace) == \
            documented(scope, namespace, model)


@pytest.mark.parametrize(("operation", "body"), SHAPES, ids=SHAPE_IDS)
def test_key_order_and_whitespace_do_not_matter(operation: str, body: dict[str, Any]) -> None:
    compact = orjson.loads(orjson.dumps(body))
    spaced = orjson.loads(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    reordered = _reverse_keys(body)
    assert list(reordered) != list(body)  # the test really reorders

    assert key_of(compact, operation) == key_of(spaced, operation) == \
        key_of(reordered, operation) == key_of(body, operation)


def _reverse_keys(value: Any, *, top: bool = True) -> Any:
    """`value` with its objects' keys in reverse order, but in the fields holding JSON
    schemas, whose order is part of the request (see the next test)."""
    if isinstance(value, dict):
        return {k: v if top and k in ORDERED else _reverse_keys(v, top=False)
                for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_reverse_keys(v, top=False) for v in value]
    return value


ORDERED = ("response_format", "tools", "functions", "text", "output_config")


@pytest.mark.parametrize("field", ["response_format", "tools"])
def test_a_schemas_property_order_is_part_of_the_request(field: str) -> None:
    # A model writes structured output (and tool arguments) in the schema's order: "reasoning"
    # before "answer" is another answer than "answer" before "reasoning". Sorted keys made
    # the two one entry, and the second caller got the first's order.
    def schema(first: str, second: str) -> dict[str, Any]:
        return {"type": "object", "required": ["reasoning", "answer"],
                "properties": {first: {"type": "string"}, second: {"type": "string"}}}

    def body(first: str, second: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": "Is 1001 prime?"}]
        if field == "response_format":
            return {"model": "m", "temperature": 0, "messages": messages, "response_format": {
                "type": "json_schema", "json_schema": {"name": "a", "schema":
                                                       schema(first, second)}}}
        return {"model": "m", "temperature": 0, "messages": messages, "tools": [{
            "type": "function", "function": {"name": "f", "parameters": schema(first, second)}}]}

    reasoning_first = key_of(body("reasoning", "answer"), "openai.chat")
    assert reasoning_first != key_of(body("answer", "reasoning"), "openai.chat")
    assert reasoning_first == key_of(body("reasoning", "answer"), "openai.chat")
    # Elsewhere order still makes no difference: the messages' keys, the top level.
    shuffled = body("reasoning", "answer")
    shuffled["messages"] = [{"content": "Is 1001 prime?", "role": "user"}]
    assert key_of(dict(reversed(list(shuffled.items()))), "openai.chat") == reasoning_first


def test_escaped_and_raw_unicode_are_the_same_request() -> None:
    raw = orjson.loads('{"messages": [{"role": "user", "content": "café ☕"}]}'.encode())
    escaped = orjson.loads(b'{"messages": [{"role": "user", "content": "caf\\u00e9 \\u2615"}]}')
    assert key_of(raw) == key_of(escaped)


@pytest.mark.parametrize(("integral", "decimal"), [(0, 0.0), (1, 1.0), (256, 256.0)])
def test_an_integral_float_is_the_same_number(integral: int, decimal: float) -> None:
    nested = {"logit_bias": {"50256": decimal}, "temperature": decimal}
    assert key_of({**OPENAI_CHAT, **nested}) == key_of(
        {**OPENAI_CHAT, "logit_bias": {"50256": integral}, "temperature": integral})


def _schema(bound: object) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "minimum": bound}}}}}]}


@pytest.mark.parametrize(("floats", "integers"), [
    (_schema(1.0), _schema(1)),
    ({"response_format": {"json_schema": {"maximum": 1e15}}},
     {"response_format": {"json_schema": {"maximum": 10 ** 15}}}),
    ({"logit_bias": {"1": -0.0, "2": 3.0}}, {"logit_bias": {"1": 0, "2": 3}}),
])
def test_a_nested_integral_float_is_the_same_number(floats: dict[str, Any],
                                                     integers: dict[str, Any]) -> None:
    assert key_of({**OPENAI_CHAT, **floats}) == key_of({**OPENAI_CHAT, **integers})


def test_digits_in_text_and_unsafe_floats_stay_as_they_are() -> None:
    """Only numbers are made canonical: ".0" in a string is text, and a float above 2**53 or a
    fraction deep in a body keeps its value."""
    def said(text: str) -> str:
        return key_of({**OPENAI_CHAT, "messages": [{"role": "user", "content": text}]})
    assert said("version 2.0") != said("version 2")
    assert said("version 2.0") == said("version 2.0")
    assert key_of({**OPENAI_CHAT, **_schema(9007199254740994.0)}) != \
        key_of({**OPENAI_CHAT, **_schema(9007199254740994)})
    assert key_of({**OPENAI_CHAT, **_schema(2.5)}) != key_of({**OPENAI_CHAT, **_schema(2)})


def test_fractions_and_huge_floats_keep_their_value() -> None:
    assert key_of({**OPENAI_CHAT, "temperature": 0.5}) != key_of({**OPENAI_CHAT, "temperature": 0})
    assert key_of({**OPENAI_CHAT, "top_p": 1e300}) != key_of({**OPENAI_CHAT, "top_p": 1e299})


def test_the_body_is_not_changed() -> None:
    body = copy.deepcopy(OPENAI_CHAT) | {"stream": True, "temperature": 0.0}
    before = copy.deepcopy(body)
    key_of(body)
    assert body == before and type(body["temperature"]) is float


def test_the_key_is_hex_sha256() -> None:
    key = key_of(OPENAI_CHAT)
    assert len(key) == 64 and int(key, 16) >= 0


# -- fields that do not change the answer --------------------------------------------------------

IGNORED_VALUES: dict[str, list[Any]] = {
    "stream": [True, False],
    "stream_options": [{"include_usage": True}, {"include_usage": False}],
    "user": ["alice", "bob"],
    "safety_identifier": ["h1", "h2"],
    "metadata": [{"user_id": "u1"}, {"trace": "t2"}],
    "store": [True, False],
    "service_tier": ["auto", "priority"],
    "prompt_cache_key": ["a", "b"],
    "prompt_cache_retention": ["in_memory", "24h"],
}


def test_every_ignored_field_has_a_case() -> None:
    assert set(IGNORED_VALUES) == IGNORED_FIELDS - {"model"}


@pytest.mark.parametrize(("operation", "body"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("field", sorted(IGNORED_VALUES))
def test_fields_that_do_not_change_the_answer_are_left_out(operation: str, body: dict[str, Any],
                                                           field: str) -> None:
    first, second = IGNORED_VALUES[field]
    absent = key_of(body, operation)
    assert key_of({**body, field: first}, operation) == absent
    assert key_of({**body, field: second}, operation) == absent


def test_the_body_model_is_replaced_by_the_public_model_argument() -> None:
    routed = {**OPENAI_CHAT, "model": "gpt-4o-2024-08-06"}  # what a fallback writes
    assert cache_key(SCOPE, "gpt-4o", "openai.chat", routed) == \
        cache_key(SCOPE, "gpt-4o", "openai.chat", OPENAI_CHAT)
    assert cache_key(SCOPE, "gpt-4o", "openai.chat", OPENAI_CHAT) != \
        cache_key(SCOPE, "gpt-4o-mini", "openai.chat", OPENAI_CHAT)


# -- fields that do -------------------------------------------------------------------------------

OPENAI_CHANGES: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is 2 + 3?"}],
    "temperature": 0.2,
    "top_p": 0.9,
    "max_completion_tokens": 65,
    "max_tokens": 64,
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "seed": 8,
    "stop": ["\n"],
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {"50256": -100},
    "reasoning_effort": "high",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "4"},
    "web_search_options": {},
    "verbosity": "low",
    "a_field_from_the_future": 1,
}

ANTHROPIC_CHANGES: dict[str, Any] = {
    "system": "You are verbose.",
    "messages": [{"role": "user", "content": "What is 2 + 3?"}],
    "max_tokens": 65,
    "temperature": 1,
    "top_p": 0.5,
    "top_k": 6,
    "stop_sequences": ["STOP"],
    "tools": [],
    "tool_choice": {"type": "any"},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "container": "container_1",
    "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
    "a_field_from_the_future": 1,
}


@pytest.mark.parametrize(("field", "value"), sorted(OPENAI_CHANGES.items()))
def test_an_openai_field_that_changes_the_answer_changes_the_key(field: str, value: Any) -> None:
    assert OPENAI_CHAT.get(field) != value
    assert key_of({**OPENAI_CHAT, field: value}) != key_of(OPENAI_CHAT)


@pytest.mark.parametrize(("field", "value"), sorted(ANTHROPIC_CHANGES.items()))
def test_an_anthropic_field_that_changes_the_answer_changes_the_key(field: str,
                                                                    value: Any) -> None:
    assert ANTHROPIC_MESSAGES.get(field) != value
    changed = {**ANTHROPIC_MESSAGES, field: value}
    assert key_of(changed, "anthropic.messages") != key_of(ANTHROPIC_MESSAGES, "anthropic.messages")


@pytest.mark.parametrize(("operation", "body"), [
    ("openai.completions", {"model": "m", "prompt": "Say hi", "temperature": 0}),
    ("openai.embeddings", {"model": "m", "input": ["a", "b"], "dimensions": 256}),
    ("openai.responses", {"model": "m", "input": "Say hi", "instructions": "Be terse",
                          "max_output_tokens": 10}),
], ids=["completions", "embeddings", "responses"])
def test_prompt_and_input_are_part_of_the_key(operation: str, body: dict[str, Any]) -> None:
    field = "prompt" if "prompt" in body else "input"
    assert key_of(body, operation) != key_of({**body, field: "Say bye"}, operation)
    assert key_of(body, operation) == key_of({**body, "stream": True, "user": "u"}, operation)


def test_a_message_order_change_is_a_different_request() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert key_of({"messages": messages}) != key_of({"messages": messages[::-1]})


def test_an_absent_field_differs_from_its_default() -> None:
    # Conservative: the provider's default may change; a miss is cheap, a wrong hit is not.
    without = {k: v for k, v in OPENAI_CHAT.items() if k != "top_p"}
    assert key_of(without) != key_of(OPENAI_CHAT)


@pytest.mark.parametrize(("first", "second"), [
    ({"scope_id": "project:acme"}, {"scope_id": "project:globex"}),
    ({"model": "gpt-4o"}, {"model": "gpt-4o-mini"}),
    ({"operation": "openai.chat"}, {"operation": "openai.responses"}),
    ({"namespace": None}, {"namespace": "faq"}),
    ({"namespace": "faq"}, {"namespace": "faq2"}),
    ({"scope_id": "project:a", "namespace": "b"}, {"scope_id": "project:a\x00b"}),
], ids=["scope", "model", "operation", "namespace-set", "namespace-value", "no-ambiguity"])
def test_scope_model_operation_and_namespace_separate_entries(first: dict[str, Any],
                                                              second: dict[str, Any]) -> None:
    base = {"scope_id": SCOPE, "model": "gpt-4o", "operation": "openai.chat", "namespace": None}
    one, two = base | first, base | second
    assert cache_key(one["scope_id"], one["model"], one["operation"], OPENAI_CHAT,
                     namespace=one["namespace"]) != \
        cache_key(two["scope_id"], two["model"], two["operation"], OPENAI_CHAT,
                  namespace=two["namespace"])


# -- what is cacheable ----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    ({"temperature": 0}, True),
    ({"temperature": 0.0}, True),
    ({"temperature": 0.7}, False),
    ({"temperature": 1}, False),
    ({}, False),  # the provider default, 1.0
    ({"temperature": None}, False),
    ({"temperature": "0"}, False),
    ({"temperature": False}, False),  # a bool is not a number here
])
def test_the_deterministic_policy_caches_temperature_zero(body: dict[str, Any],
                                                          expected: bool) -> None:
    assert is_cacheable(body, policy="deterministic") is expected
    assert is_cacheable(body) is expected  # the default policy


def test_opting_in_makes_any_request_cacheable_under_the_deterministic_policy() -> None:
    assert is_cacheable({"temperature": 0.9}, policy="deterministic", opt_in=True) is True


def test_embeddings_are_deterministic() -> None:
    assert is_cacheable({"input": "x"}, operation="openai.embeddings") is True
    assert is_cacheable({"input": "x"}, operation="openai.responses") is False


@pytest.mark.parametrize("opt_in", [False, True])
def test_always_and_never_ignore_the_request(opt_in: bool) -> None:
    assert is_cacheable({"temperature": 0.9}, policy="always", opt_in=opt_in) is True
    assert is_cacheable({"temperature": 0}, policy="never", opt_in=opt_in) is False


def test_an_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown cache policy 'sometimes'"):
        is_cacheable({"temperature": 0}, policy="sometimes")


# -- tags ----------------------------------------------------------------------------------------

def test_cache_tags_name_model_project_and_namespace() -> None:
    assert cache_tags(model="gpt-4o", project="acme", namespace="faq") == (
        model_tag("gpt-4o"), project_tag("acme"), namespace_tag("faq"))
    assert cache_tags(model="gpt-4o") == ("model:gpt-4o",)
    assert len({model_tag("x"), project_tag("x"), namespace_tag("x")}) == 3


# -- request headers -----------------------------------------------------------------------------

def headers(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode("latin-1")) for name, value in pairs]


@pytest.mark.parametrize(("value", "expected"), [
    ("no-cache", CacheControl(no_cache=True)),
    ("no-store", CacheControl(no_store=True)),
    ("max-age=60", CacheControl(max_age_s=60)),
    ('max-age="60"', CacheControl(max_age_s=60)),
    ("max-age=0", CacheControl(max_age_s=0)),
    ("No-Cache, NO-STORE", CacheControl(no_cache=True, no_store=True)),
    ("  max-age = 30 ,no-store", CacheControl(no_store=True, max_age_s=30)),
    ("max-age=60, max-age=10", CacheControl(max_age_s=10)),
    ("max-age=10, max-age=60", CacheControl(max_age_s=10)),
    ("max-age=-5", CacheControl()),
    ("max-age=1.5", CacheControl()),
    ("max-age=", CacheControl()),
    ("max-age=\u00b2", CacheControl()),  # "²": str.isdigit() says yes, RFC 9111 says no
    ("only-if-cached", CacheControl(no_store=True, only_if_cached=True)),
    ("Only-If-Cached, max-age=5", CacheControl(no_store=True, max_age_s=5,
                                               only_if_cached=True)),
    ("private, must-revalidate, x-thing=1", CacheControl()),
    ("", CacheControl()),
])
def test_cache_control_directives(value: str, expected: CacheControl) -> None:
    assert parse_cache_control(headers(("cache-control", value))) == expected


@pytest.mark.parametrize(("digits", "expected"), [
    ("9" * 5000, 2**31),  # (int() refuses more than 4300 digits)
    ("9" * 20, 2**31),
    ("2147483649", 2**31),
    ("2147483647", 2**31 - 1),
    ("0" * 5000 + "7", 7),
], ids=["5000 nines", "20 nines", "2^31+1", "2^31-1", "5000 zeros then 7"])
def test_a_max_age_past_2_to_the_31_counts_as_2_to_the_31(digits: str, expected: int) -> None:
    """RFC 9111 §1.2.2, however many digits it has (a 400 is no answer to a large one)."""
    parsed = parse_cache_control(headers(("cache-control", f"max-age={digits}")))
    assert parsed == CacheControl(max_age_s=expected)


def test_cache_control_in_several_headers_adds_up() -> None:
    parsed = parse_cache_control(headers(("cache-control", "no-cache"),
                                         ("accept", "application/json"),
                                         ("cache-control", "max-age=5")))
    assert parsed == CacheControl(no_cache=True, max_age_s=5)


def test_no_headers_mean_defaults() -> None:
    assert parse_cache_control([]) == CacheControl()
    assert parse_cache_control(headers(("content-type", "application/json"))) == CacheControl()


def test_pragma_no_cache_counts_only_without_cache_control() -> None:
    assert parse_cache_control(headers(("pragma", "no-cache"))).no_cache is True
    both = headers(("pragma", "no-cache"), ("cache-control", "max-age=9"))
    assert parse_cache_control(both) == CacheControl(max_age_s=9)


@pytest.mark.parametrize(("value", "expected"), [
    ("faq-v2", "faq-v2"),
    ("  spaced name ", "spaced name"),
    ("", None),
    ("   ", None),
])
def test_the_namespace_header(value: str, expected: str | None) -> None:
    parsed = parse_cache_control(headers(("x-sluicegate-cache-namespace", value)))
    assert parsed.namespace == expected


@pytest.mark.parametrize("value", ["x" * 257, "tab\there", "caf\xe9"])
def test_an_unusable_namespace_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="x-sluicegate-cache-namespace"):
        parse_cache_control(headers(("x-sluicegate-cache-namespace", value)))


@pytest.mark.parametrize(("value", "expected"), [
    ("on", CacheControl(opt_in=True)),
    ("ON ", CacheControl(opt_in=True)),
    ("off", CacheControl(no_cache=True, no_store=True)),
    ("maybe", CacheControl()),
])
def test_the_sluicegate_cache_switch(value: str, expected: CacheControl) -> None:
    assert parse_cache_control(headers(("x-sluicegate-cache", value))) == expected


def test_max_age_accepts_only_young_enough_entries() -> None:
    control = CacheControl(max_age_s=10)
    assert control.accepts(created_at=1000.0, now=1010.0) is True
    assert control.accepts(created_at=1000.0, now=1010.5) is False
    assert CacheControl().accepts(created_at=0.0, now=1e12) is True
    assert CacheControl(max_age_s=0).accepts(created_at=5.0, now=5.0) is True


# -- request headers sent on to the provider ---------------------------------------------------

def test_the_headers_the_anthropic_adapter_sends_on_are_the_ones_keyed() -> None:
    # (a layer may not import providers/: the two lists are kept alike by this test)
    from providers.anthropic import _FORWARDED_HEADERS
    assert set(ANTHROPIC_FORWARDED_HEADERS) == set(_FORWARDED_HEADERS)


def test_a_beta_or_a_version_changes_the_key_and_other_headers_do_not() -> None:
    body = copy.deepcopy(ANTHROPIC_MESSAGES)

    def key_with(*headers: tuple[bytes, bytes]) -> str:
        return key_of(body, "anthropic.messages",
                      headers=forwarded_headers([(b"x-api-key", b"k"), *headers]))
    plain = key_with()
    assert plain == key_of(body, "anthropic.messages")  # (keys without them are unchanged)
    version = key_with((b"anthropic-version", b"2023-06-01"))
    beta = key_with((b"anthropic-version", b"2023-06-01"),
                    (b"anthropic-beta", b"interleaved-thinking-2025-05-14"))
    assert len({plain, version, beta}) == 3
    assert key_with((b"anthropic-version", b"2023-01-01")) != version
    # a beta list is a set, however it is written or split over lines
    two = key_with((b"anthropic-beta", b"a-1, b-2"))
    assert two == key_with((b"anthropic-beta", b"b-2,a-1")) == \
        key_with((b"anthropic-beta", b"b-2"), (b"anthropic-beta", b"a-1"))
    assert two != key_with((b"anthropic-beta", b"a-1"))
    assert forwarded_headers([(b"x-api-key", b"k"), (b"accept", b"*/*")]) is None
    # of two version lines, the adapter sends the last: the key is that one's
    first, last = (b"anthropic-version", b"2023-01-01"), (b"anthropic-version", b"2023-06-01")
    assert key_with(first, last) == version != key_with(last, first)
