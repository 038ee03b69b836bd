"""What the mock answers, independent of any wire format.

Each provider module reads its request into a `Conversation`; `reply_for` applies the rules
that tests assert on:

- the reply is "Mock reply to: <text of the last user message>", plus " [N image(s)]";
- with tools enabled and a user message last, one call to the forced (else first) tool, its
  arguments built from the schema's properties;
- after a tool result: "Tool result received: <result text>";
- a final assistant message (Anthropic's prefill) is the start of the reply: only the rest
  of the reply comes back;
- a token limit below the reply's word count truncates to that many words;
- input tokens: words of all message and system text plus 3 per message; output tokens:
  words of the reply (of the arguments JSON for a tool call, at least 1).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]
PER_MESSAGE_TOKENS = 3
DEFAULT_EMBEDDING_DIMS = 8
_SCHEMA_SAMPLES: dict[str, Any] = {"string": "test", "integer": 1, "number": 1.5,
                                   "boolean": True, "array": [], "object": {}}


@dataclass(slots=True)
class ToolSpec:
    name: str
    schema: Any  # a JSON schema object; anything else means "no arguments"


@dataclass(slots=True)
class Conversation:
    """The parts of a request the mock's rules look at, whatever the provider."""

    last_user_text: str = ""
    images: int = 0
    tool_result: str | None = None  # set when the last message is a tool result
    user_last: bool = True  # the last message is the user's (tools are only called then)
    input_tokens: int = 0
    tools: list[ToolSpec] = field(default_factory=list)
    forced_tool: str | None = None
    tools_enabled: bool = True
    max_tokens: int | None = None
    # Anthropic's prefill: a final assistant message is the start of the answer, which goes
    # on from where it ends (the reply holds only the rest).
    prefill: str | None = None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    args: JSON
    arguments: str  # the JSON text, as OpenAI sends it


@dataclass(slots=True)
class Reply:
    text: str | None
    tool_call: ToolCall | None
    truncated: bool
    input_tokens: int
    output_tokens: int

    @property
    def finish(self) -> str:
        """"stop", "length" or "tool"; each wire maps it to its own reason names."""
        if self.tool_call is not None:
            return "tool"
        return "length" if self.truncated else "stop"


def words(text: str) -> int:
    return len(text.split())


def count_input(texts: Iterable[str], messages: int) -> int:
    return sum(len(text.split()) for text in texts) + PER_MESSAGE_TOKENS * messages


def reply_for(conv: Conversation, id_prefix: str = "call_") -> Reply:
    """The deterministic answer to `conv`; tool call ids are `id_prefix` + a short hash."""
    if conv.tool_result is None and conv.user_last and conv.tools_enabled and conv.tools:
        tool = _chosen_tool(conv)
        args = sample_arguments(tool.schema)
        arguments = json.dumps(args)
        call_id = id_prefix + short_hash(tool.name, arguments, conv.last_user_text)
        call = ToolCall(call_id, tool.name, args, arguments)
        return Reply(None, call, False, conv.input_tokens, max(1, words(arguments)))
    if conv.tool_result is not None:
        text = "Tool result received: " + conv.tool_result
    else:
        text = "Mock reply to: " + conv.last_user_text + image_note(conv.images)
    if conv.prefill is not None:
        prefix = conv.prefill.rstrip()  # Anthropic refuses trailing whitespace in a prefill
        text = text.removeprefix(prefix)
    text, truncated = truncate(text, conv.max_tokens)
    return Reply(text, None, truncated, conv.input_tokens, words(text))


def _chosen_tool(conv: Conversation) -> ToolSpec:
    for tool in conv.tools:
        if tool.name == conv.forced_tool:
            return tool
    return conv.tools[0]


def image_note(images: int) -> str:
    if images <= 0:
        return ""
    return " [1 image]" if images == 1 else f" [{images} images]"


def truncate(text: str, max_tokens: int | None) -> tuple[str, bool]:
    if max_tokens is None:
        return text, False
    pieces = text.split()
    if max_tokens >= len(pieces):
        return text, False
    return " ".join(pieces[:max(max_tokens, 0)]), True


def sample_arguments(schema: Any) -> JSON:
    """Arguments for a JSON schema: one sample value per declared property."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {name: sample_value(prop) for name, prop in properties.items()}


def sample_value(prop: Any) -> Any:
    if not isinstance(prop, dict):
        return "test"
    enum = prop.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = prop.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if k != "null"), "string")
    # Gemini's OpenAPI-style schemas spell types in capitals ("STRING").
    sample = _SCHEMA_SAMPLES.get(str(kind).lower(), "test")
    return type(sample)() if isinstance(sample, (list, dict)) else sample  # fresh, not shared


def short_hash(*parts: str, length: int = 24) -> str:
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()
    return digest[:length]


def split_chunks(text: str, size: int) -> list[str]:
    """`text` in pieces of `size` characters (at least one piece, maybe empty)."""
    size = max(1, size)
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def embed(text: str, dims: int = DEFAULT_EMBEDDING_DIMS) -> list[float]:
    """A unit vector derived from a hash of `text`, rounded to float32 like real embeddings."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        block = hashlib.sha256(f"{counter}:{text}".encode("utf-8", "replace")).digest()
        raw.extend(value / 2**31 - 1.0 for value in struct.unpack("<8I", block))
        counter += 1
    raw = raw[:dims]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return array("f", (x / norm for x in raw)).tolist()


def embedding_base64(vector: list[float]) -> str:
    """OpenAI's `encoding_format: "base64"`: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def word_logprob(token: str) -> float:
    """A deterministic, plausible log probability for a token."""
    return -round((int(short_hash(token, length=4), 16) % 1000) / 10_000, 4)
