"""The mock's knobs: timing and random failures (`MockConfig`), queued failures (`Fault`,
`FaultQueue`).

Both are shared between the test thread that sets them and the server's event loop thread
that reads them, so the queue and the random failure draw take a lock; config fields are
single attribute writes.
"""
from __future__ import annotations

import copy
import math
import random
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

PROVIDERS = ("openai", "azure", "anthropic", "gemini", "mistral")
FAULT_KINDS = ("status", "slow_first_byte", "reset", "error_event", "truncate", "stall",
               "ignore_max_tokens", "omit_usage", "ignore_stream", "slow_body")
RESPONSES_ERROR_EVENTS = ("error", "error.nested", "response.failed")
REASONING_FIELDS = (None, "reasoning_content", "reasoning")


@dataclass(slots=True)
class MockConfig:
    """Timing, authentication and random failures of a mock provider server.

    `ttft_s` delays the response headers (and so the first chunk); `chunk_delay_s` is slept
    between content chunks of a stream, which carries `chunk_chars` characters per chunk.
    `expected_keys` maps a provider (one of `PROVIDERS`) to the only key
    it accepts; a provider missing from it (or `None`) accepts any non-empty key.
    `record_requests` keeps the request log (`max_recorded` newest entries).
    `keepalive_comments` puts a `: keepalive` SSE comment before each content event of every
    stream, as providers and proxies keep a slow stream's connection alive (OpenRouter's
    `: OPENROUTER PROCESSING`); clients skip comments, which are no events.

    Random failures: each provider request that drew no queued `Fault` fails with probability
    `fail_ratio` (0..1), answered exactly as `Fault("status", status=fail_status,
    retry_after_s=fail_retry_after_s)` would be (the provider's error body and headers).
    `fail_providers` limits this to the named providers (None: every provider). With
    `fail_seed` set, a `random.Random(fail_seed)` decides, so a run is reproducible; it is
    reseeded by every `update` that names `fail_seed`, and when `fail_seed` is assigned a
    different value directly.
    """

    ttft_s: float = 0.0
    chunk_delay_s: float = 0.0
    chunk_chars: int = 8
    expected_keys: dict[str, str] | None = None
    record_requests: bool = True
    max_recorded: int = 10_000
    # Azure streams open with a chunk that has `choices: []` and the prompt filter results;
    # off by default because most tests want the plain OpenAI stream shape.
    azure_prompt_filter_chunk: bool = False
    # Some OpenAI-compatible servers end a chat stream after its finish (and usage) chunk,
    # without `data: [DONE]`.
    omit_done: bool = False
    keepalive_comments: bool = False
    # A reasoning model behind an OpenAI-compatible chat API: the reply comes after its
    # reasoning, "Reasoning about: <last user text>", in this field of the stream's deltas
    # (before the first text delta) and of the answer's message: "reasoning_content"
    # (DeepSeek and many compatible servers) or "reasoning" (OpenRouter, vLLM). Its words
    # count in completion_tokens and in completion_tokens_details.reasoning_tokens.
    reasoning_field: str | None = None
    # The model an answer says answered, by the model asked for, as the live APIs answer an
    # alias with the snapshot that served it (OpenAI: gpt-4o-mini -> gpt-4o-mini-2024-07-18;
    # Anthropic: claude-3-5-sonnet-latest -> claude-3-5-sonnet-20241022). OpenAI chat and
    # Anthropic messages, answers and streams; a model not in it is echoed.
    answered_models: dict[str, str] | None = None
    fail_ratio: float = 0.0
    fail_status: int = 503
    fail_retry_after_s: float | None = None
    fail_seed: int | None = None
    fail_providers: list[str] | None = None
    # Keep a bill per provider call (`MockProviderServer.bills`): what it was asked, what it
    # answered and how much of a stream went out, for tests that check a gateway's ledger.
    record_bills: bool = False
    # The random failure draw: its generator, the seed it was last seeded with, a lock.
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False,
                                compare=False)
    _rng_seed: int | None = field(default=None, init=False, repr=False, compare=False)
    _rng_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                      compare=False)

    def __post_init__(self) -> None:
        self._check_failures()
        self._reseed()

    def update(self, values: dict[str, Any]) -> None:
        """Set the named fields (from `PUT /_mock/config`); unknown names or bad values raise
        ValueError and change nothing."""
        known = {f.name for f in fields(self) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        if values.get("chunk_chars", self.chunk_chars) < 1:
            raise ValueError("chunk_chars must be at least 1")
        replace(self, **values)  # validates the result before anything is set
        for name, value in values.items():
            setattr(self, name, value)
        if "fail_seed" in values:
            with self._rng_lock:
                self._reseed()

    def as_dict(self) -> dict[str, Any]:
        """The settable fields and their values (what `GET /_mock/config` answers)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.init}

    def draw_failure(self, provider: str) -> Fault | None:
        """The status fault a request to `provider` fails with by `fail_ratio`, else None."""
        ratio = self.fail_ratio
        if ratio <= 0:
            return None
        chosen = self.fail_providers
        if chosen is not None and provider not in chosen:
            return None
        with self._rng_lock:
            if self.fail_seed != self._rng_seed:  # `fail_seed` was assigned directly
                self._reseed()
            failed = self._rng.random() < ratio
        if not failed:
            return None
        return Fault("status", provider=provider, status=self.fail_status,
                     retry_after_s=self.fail_retry_after_s)

    def _reseed(self) -> None:
        seed = self.fail_seed
        self._rng.seed(seed)
        self._rng_seed = seed

    def _check_failures(self) -> None:
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field must be one of {REASONING_FIELDS}, "
                             f"not {self.reasoning_field!r}")
        ratio = self.fail_ratio
        if not _is_number(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"fail_ratio must be a number from 0 to 1, not {ratio!r}")
        status = self.fail_status
        if not _is_int(status) or not 400 <= status <= 599:
            raise ValueError(f"fail_status must be an HTTP error status (400..599), "
                             f"not {status!r}")
        retry = self.fail_retry_after_s
        if retry is not None and (not _is_number(retry) or not 0.0 <= retry < math.inf):
            raise ValueError(f"fail_retry_after_s must be None or a number of seconds >= 0, "
                             f"not {retry!r}")
        if self.fail_seed is not None and not _is_int(self.fail_seed):
            raise ValueError(f"fail_seed must be None or an integer, not {self.fail_seed!r}")
        chosen = self.fail_providers
        if chosen is not None and (not isinstance(chosen, list)
                                   or any(name not in PROVIDERS for name in chosen)):
            raise ValueError(f"fail_providers must be None or a list of provider names from "
                             f"{PROVIDERS}, not {chosen!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class Fault:
    """One failure for the next matching request (FIFO, consumed when used).

    kind:
      "status"           answer `status` with the provider's error body (429 adds
                         `retry-after: retry_after_s` and the rate-limit error shape).
      "slow_first_byte"  sleep `delay_s` before the response headers, then answer normally.
      "reset"            streams: send `after_chunks` content events, then reset the TCP
                         connection; non-streams: drop the connection without a response.
      "error_event"      streams: status 200, `after_chunks` content events, then the
                         provider's in-band error event, then the stream ends.
      "truncate"         streams: status 200, `after_chunks` content events, then the stream
                         ends cleanly without its closing events (no finish reason, usage,
                         `[DONE]` or `message_stop`), as when a proxy cuts it short.
      "stall"            streams: status 200, `after_chunks` content events, then silence for
                         `delay_s`, then the rest of the stream (a provider that hung midway);
                         non-streams: as "slow_first_byte".
      "ignore_max_tokens" answers in full, past the request's token limit (max_tokens,
                         max_output_tokens...), as a provider or a self-hosted server that
                         does not hold a call to it (chat, Responses, Anthropic, Gemini).
      "omit_usage"       non-streams: the answer without its `usage` (Gemini's
                         `usageMetadata`), as some OpenAI-compatible servers send one.
      "ignore_stream"    streams (OpenAI chat, Anthropic): the JSON answer of the same
                         request without the stream, as a server that ignores `stream`.
      "slow_body"        non-streams: the response headers at once, then silence for
                         `delay_s`, then the answer (a provider that hung while sending it).
    `provider` None matches any provider. `message` overrides the error message; `code` and
    `param` set a "status" fault's `error.code` and `error.param` (OpenAI's shape only), and
    `code` an "error_event" fault's error: the code of a Responses API stream's error event
    and of an OpenAI chat stream's error chunk (whose type is then `invalid_request_error`
    for a request the caller must fix: `openai_wire.CALLER_FAULT_CODES`); the `type` of
    Anthropic's `error` event (its error types: `invalid_request_error` for a request the
    caller must fix; `overloaded_error` without a code); the `status` of Gemini's error
    object, whose `code` is then that status's HTTP code (`INVALID_ARGUMENT`: 400; without a
    code, `UNAVAILABLE`: 503).
    `sent_status` sends a "status" fault's error body with another HTTP status: 200 is what
    OpenRouter and some OpenAI-compatible proxies answer certain upstream failures with; the
    error's `code` is then `status`, a number, as OpenRouter sends it (unless `code` is set).
    `event` picks the Responses API's in-band failure (see `RESPONSES_ERROR_EVENTS`): "error"
    as its reference documents it, "error.nested" as the live API sends it, or
    "response.failed".
    `stall_s` holds an "error_event" stream open, silent, for that long after its error event
    before it ends, as a provider that hung after it; a Responses stream's `error` event then
    comes without the `response.failed` that follows it on the live API.
    `error_type` replaces a "status" fault's error `type` (OpenAI's and Anthropic's shapes),
    as a provider or a proxy in front of one names its own errors: any JSON string, one
    holding a NUL (`"\\u0000"`) too.
    `retry_after_header` False leaves the `retry-after` header out of a "status" fault's
    answer, as Gemini's API answers a 429: its delay is only in the body (the
    `google.rpc.RetryInfo` detail the mock's Gemini error adds for `retry_after_s`).
    `headers` adds (or replaces) headers of a "status" fault's answer, as a provider that
    says its pause in headers of its own (OpenAI's `x-ratelimit-reset-requests: 20s`).
    `match` limits the fault to requests whose raw body holds that text (a marker in the
    prompt), so concurrent requests each meet their own faults, in order.
    """

    kind: str
    provider: str | None = None
    status: int = 500
    retry_after_s: float | None = None
    after_chunks: int = 0
    delay_s: float = 1.0
    message: str | None = None
    sent_status: int | None = None
    code: str | None = None
    param: str | None = None
    event: str = "error"
    stall_s: float = 0.0
    match: str | None = None
    retry_after_header: bool = True
    headers: dict[str, str] | None = None
    error_type: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.event not in RESPONSES_ERROR_EVENTS:
            raise ValueError(f"unknown Responses error event {self.event!r}; expected one of "
                             f"{RESPONSES_ERROR_EVENTS}")
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {PROVIDERS}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class FaultQueue:
    """Faults waiting for a request; the first one matching the provider is taken."""

    _items: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def push(self, fault: Fault) -> None:
        with self._lock:
            self._items.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def take(self, provider: str, body: bytes = b"") -> Fault | None:
        """The first fault for `provider` whose `match` (if any) is in the request `body`."""
        if not self._items:  # the common case, without the lock
            return None
        with self._lock:
            for index, fault in enumerate(self._items):
                if (fault.provider is None or fault.provider == provider) and \
                        (fault.match is None or fault.match.encode() in body):
                    return self._items.pop(index)
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._items)
