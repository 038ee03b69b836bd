"""The mock's knobs: timing (`MockConfig`) and queued failures (`Fault`, `FaultQueue`).

Both are shared between the test thread that sets them and the server's event loop thread
that reads them, so the queue takes a lock; config fields are single attribute writes.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PROVIDERS = ("openai", "azure", "anthropic", "gemini")
FAULT_KINDS = ("status", "slow_first_byte", "reset", "error_event")


@dataclass(slots=True)
class MockConfig:
    """Timing and authentication of a mock provider server.

    `ttft_s` delays the response headers (and so the first chunk); `chunk_delay_s` is slept
    between content chunks of a stream, which carries `chunk_chars` characters per chunk.
    `expected_keys` maps a provider ("openai", "azure", "anthropic", "gemini") to the only key
    it accepts; a provider missing from it (or `None`) accepts any non-empty key.
    `record_requests` keeps the request log (`max_recorded` newest entries).
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

    def update(self, values: dict[str, Any]) -> None:
        """Set the named fields (from `PUT /_mock/config`); unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be at least 1")


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
    `provider` None matches any provider. `message` overrides the error message.
    """

    kind: str
    provider: str | None = None
    status: int = 500
    retry_after_s: float | None = None
    after_chunks: int = 0
    delay_s: float = 1.0
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
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

    def take(self, provider: str) -> Fault | None:
        if not self._items:  # the common case, without the lock
            return None
        with self._lock:
            for index, fault in enumerate(self._items):
                if fault.provider is None or fault.provider == provider:
                    return self._items.pop(index)
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._items)
