"""Anthropic Messages API: `/v1/messages` (JSON and SSE), `/v1/messages/count_tokens`, models.

Wire format from https://docs.anthropic.com/en/api/messages and .../messages-streaming:
a stream is message_start, content_block_start, ping, content_block_delta (text_delta or
input_json_delta), content_block_stop, message_delta (stop_reason, usage.output_tokens) and
message_stop, each with an `event:` line. Errors are `{"type": "error", "error": {"type",
"message"}, "request_id"}`; requests need `x-api-key` and `anthropic-version`.

Prompt caching (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching): a
block marked `cache_control` ends a cacheable prefix (tools, then system, then messages) of
at least PROMPT_CACHE_MIN_TOKENS; the longest prefix cached before is read, the rest up to
the last mark written, for 5 minutes or for `"ttl": "1h"`. `usage.input_tokens` counts only
what was neither read nor written; `cache_creation` splits the writes by TTL.

Extended thinking (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking):
with `thinking` enabled (or adaptive) the answer opens with a thinking block, "Thinking about:
<last user text, or the tool result>", and a `signature` (streamed as a `signature_delta` after
the `thinking_delta`s); its words count in output_tokens and in
`output_tokens_details.thinking_tokens`. A prompt holding REDACTED_TRIGGER (the test string of
those docs) gets a `redacted_thinking` block before it. A thinking block sent back must carry
the signature the mock gave it, and with thinking on, an assistant message whose tool calls the
last message answers must open with its thinking, as the API demands.
"""
from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from tests.mock_providers.behaviour import (
    Conversation,
    Reply,
    ToolSpec,
    count_input,
    reply_for,
    split_chunks,
    words,
)
from tests.mock_providers.faults import MockConfig
from tests.mock_providers.wire import (
    JSON,
    BadRequest,
    Call,
    ProviderWire,
    StreamItem,
    body_dict,
    dumps,
    error_response,
    random_id,
    respond_json,
    respond_stream,
    retry_after_value,
    sse,
)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", ("Your API key does not have permission to use the specified "
                              "resource.")),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", ("Number of request tokens has exceeded your per-minute rate "
                              "limit (https://docs.anthropic.com/en/api/rate-limits); see the "
                              "response headers for current usage.")),
    500: ("api_error", "Internal server error"),
    503: ("overloaded_error", "Overloaded"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
_MESSAGES = {kind: message for kind, message in _ERRORS.values()}
MODELS = (("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
          ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
          ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
          ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"))


def _error_kind(status: int) -> tuple[str, str]:
    if status in _ERRORS:
        return _ERRORS[status]
    return ("api_error", "Internal server error") if status >= 500 else \
        ("invalid_request_error", f"HTTP {status}")


class AnthropicWire(ProviderWire):
    name = "anthropic"

    def __init__(self) -> None:
        self._reset_second = -1
        self._reset_text = ""

    def _reset_at(self) -> str:
        """The RFC 3339 time the rate-limit window resets, recomputed once a second."""
        second = int(time.time())
        if second != self._reset_second:
            moment = datetime.fromtimestamp(second + 1, UTC) + timedelta(seconds=59)
            self._reset_second, self._reset_text = second, moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        return self._reset_text

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        reset = self._reset_at()
        headers = {"request-id": random_id("req_011C", 20),
                   "anthropic-organization-id": "00000000-0000-4000-8000-000000000000"}
        for limit, (size, left) in {"requests": ("4000", "3999"),
                                    "tokens": ("2000000", "1999000"),
                                    "input-tokens": ("1600000", "1599000"),
                                    "output-tokens": ("400000", "400000")}.items():
            headers[f"anthropic-ratelimit-{limit}-limit"] = size
            headers[f"anthropic-ratelimit-{limit}-remaining"] = left
            headers[f"anthropic-ratelimit-{limit}-reset"] = reset
        return headers

    def auth_refusal(self, request: web.Request, expected: str | None) -> web.Response | None:
        key = request.headers.get("x-api-key", "").strip()
        bearer = request.headers.get("authorization", "")
        if not key and bearer[:7].lower() == "bearer " and bearer[7:].strip():
            key = bearer[7:].strip()  # OAuth tokens (the SDK's auth_token) come as Bearer
        if not key:
            return self.error(401, "x-api-key header is required", {})
        if expected is not None and key != expected:
            return self.error(401, "invalid x-api-key", {})
        if "anthropic-version" not in request.headers:
            return self.error(400, "anthropic-version: header is required", {})
        return None

    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        kind, default = _error_kind(status)
        if retry_after_s is not None:
            headers = {**headers, "retry-after": retry_after_value(retry_after_s)}
        if status == 429:
            headers = {**headers, "anthropic-ratelimit-requests-remaining": "0"}
        request_id = headers.get("request-id") or random_id("req_011C", 20)
        body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message or default},
                             "request_id": request_id})
        return error_response(status, body, headers)

    def stream_error_event(self, message: str | None, code: str | None = None) -> bytes:
        # An error event has a type and no code: the fault's code is the type
        # (invalid_request_error for a request the caller must fix), else overloaded_error.
        kind = code or "overloaded_error"
        return sse({"type": "error", "error": {"type": kind,
                                               "message": message or _MESSAGES.get(kind, kind)}},
                   "error")


# -- reading a request ------------------------------------------------------------------------

def block_text(content: Any) -> str:
    """Text of a content value: a string or text blocks (tool results' text included)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_result":
            texts.append(block_text(block.get("content")))
    return " ".join(texts)


def _tool_results(content: Any) -> list[JSON]:
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


def validate_messages(body: JSON, *, need_max_tokens: bool) -> list[JSON]:
    for field in ("model", "messages") + (("max_tokens",) if need_max_tokens else ()):
        if field not in body:
            raise BadRequest(f"{field}: Field required")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{index}.role: Input should be 'user' or 'assistant'")
    for sequence in body.get("stop_sequences") or ():
        if isinstance(sequence, str) and not sequence.strip():
            raise BadRequest("stop_sequences: each stop sequence must contain non-whitespace")
    last = messages[-1]
    if last.get("role") == "assistant" and block_text(last.get("content")) != \
            block_text(last.get("content")).rstrip():
        raise BadRequest("messages: final assistant content cannot end with trailing whitespace")
    for index, message in enumerate(messages):
        _check_tool_ids(index, message.get("content"))
        content = message.get("content")
        if isinstance(content, list) and any(
                isinstance(block, dict) and block.get("type") == "text" and
                not str(block.get("text") or "").strip() for block in content):
            raise BadRequest("messages: text content blocks must contain non-whitespace text")
    if not body.get("tools") and any(_tool_blocks(m.get("content")) for m in messages):
        # The API's answer to a tool history without tool definitions, as quoted in
        # BerriAI/litellm#4689 (the reason LiteLLM adds a dummy tool).
        raise BadRequest("Requests which include `tool_use` or `tool_result` blocks must "
                         "define tools.")
    return messages


# tool_use.id and tool_result.tool_use_id must match this; the API's 400 for an id from
# another provider (such as Kimi's `functions.Bash:0`) is quoted in maximhq/bifrost#5097.
TOOL_ID_PATTERN = "^[a-zA-Z0-9_-]+$"
_TOOL_ID = re.compile(TOOL_ID_PATTERN)


def _check_tool_ids(index: int, content: Any) -> None:
    if not isinstance(content, list):
        return
    for position, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        field = {"tool_use": "id", "tool_result": "tool_use_id"}.get(str(block.get("type")))
        if field is not None and not _TOOL_ID.match(str(block.get(field))):
            raise BadRequest(f"messages.{index}.content.{position}.{block['type']}.{field}: "
                             f"String should match pattern '{TOOL_ID_PATTERN}'")


def _tool_blocks(content: Any) -> list[JSON]:
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict)
            and b.get("type") in ("tool_use", "tool_result")]


def messages_conversation(body: JSON, messages: list[JSON]) -> Conversation:
    texts = [block_text(m.get("content")) for m in messages]
    system = body.get("system")
    texts.append(block_text(system))
    last = messages[-1]
    conv = Conversation(input_tokens=count_input(texts, len(messages)),
                        max_tokens=body.get("max_tokens"), user_last=last["role"] == "user")
    if last["role"] == "assistant":
        conv.prefill = block_text(last.get("content"))
    results = _tool_results(last.get("content")) if last["role"] == "user" else []
    if results:
        conv.tool_result = " ".join(block_text(r.get("content")) for r in results)
    user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    if user is not None:
        content = user.get("content")
        conv.last_user_text = content if isinstance(content, str) else " ".join(
            str(b.get("text") or "") for b in content or ()
            if isinstance(b, dict) and b.get("type") == "text")
        conv.images = sum(1 for b in content or () if isinstance(b, dict)
                          and b.get("type") == "image") if isinstance(content, list) else 0
    conv.tools = [ToolSpec(str(tool.get("name")), tool.get("input_schema"))
                  for tool in body.get("tools") or ()
                  if isinstance(tool, dict) and "input_schema" in tool]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        conv.tools_enabled = choice.get("type") != "none"
        if choice.get("type") == "tool":
            conv.forced_tool = choice.get("name")
    return conv


# -- endpoints --------------------------------------------------------------------------------

# Models that take `temperature` or `top_p`, not both: Claude Sonnet and Haiku 4.5 (the
# migration guide, platform.claude.com/docs/en/about-claude/models/migrating-to-claude-4:
# "Use only temperature OR top_p, not both"), Opus 4.1 (the 400 reported in
# open-webui/functions#9) and their successors: `claude-<family>-4-<minor>`.
_ONE_SAMPLER = re.compile(r"claude-(?:opus|sonnet|haiku)-4-[1-9](?:-|$)")


def validate_sampling(body: JSON) -> None:
    if body.get("temperature") is not None and body.get("top_p") is not None and \
            _ONE_SAMPLER.search(str(body.get("model"))):
        # The message as the API words it (Vali-98/ChatterUI#564).
        raise BadRequest("`temperature` and `top_p` cannot both be specified for this model. "
                         "Please use only one.")


async def messages(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    conv = messages_conversation(body, validate_messages(body, need_max_tokens=True))
    validate_sampling(body)
    thinking = thinking_for(body, conv)
    reply = reply_for(call.bounded(conv), id_prefix="toolu_01")
    cache = prompt_cache(call, body, reply.input_tokens)
    message_id = random_id("msg_01", 22)
    model = call.answered_model(str(body["model"]))
    if body.get("stream") is True and call.fault_of("ignore_stream") is None:
        items = message_events(message_id, model, reply, call.config.chunk_chars, cache,
                               thinking)
        return await respond_stream(call, items, call.stream_error())
    return await respond_json(call, message_object(message_id, model, reply, cache, thinking))


# The extended-thinking docs' string for testing redacted thinking.
REDACTED_TRIGGER = ("ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_"
                    "46C9A13E193C177646C7398A98432ECCCE4C1253")
_THINKING_ORDER = ("When `thinking` is enabled, a final `assistant` message must start with a "
                   "thinking block (preceeding the lastmost set of `tool_use` and "
                   "`tool_result` blocks). We recommend you include thinking blocks from "
                   "previous turns. To avoid this requirement, disable `thinking`.")


def thinking_signature(thinking: str) -> str:
    """The mock's signature of a thinking text (Anthropic's is opaque and checked alike)."""
    return "EqMB" + hashlib.sha256(b"mock-thinking:" + thinking.encode()).hexdigest()


def redacted_data(prompt: str) -> str:
    return "EmwK" + hashlib.sha256(b"mock-redacted:" + prompt.encode()).hexdigest()


def thinking_for(body: JSON, conv: Conversation) -> list[JSON]:
    """The thinking blocks the answer opens with ([] without `thinking`), after checking the
    ones the request sends back."""
    enabled = _thinking_enabled(body)
    messages = body["messages"]
    for index, message in enumerate(messages):
        blocks = message.get("content") if isinstance(message.get("content"), list) else []
        for position, block in enumerate(blocks):
            if isinstance(block, dict) and block.get("type") == "thinking" and \
                    block.get("signature") != thinking_signature(str(block.get("thinking"))):
                raise BadRequest(f"messages.{index}.content.{position}: Invalid `signature` "
                                 "in `thinking` block")
    if not enabled:
        return []
    if conv.tool_result is not None and len(messages) >= 2:
        opening = messages[-2].get("content")
        first = opening[0] if isinstance(opening, list) and opening else {}
        if first.get("type") not in ("thinking", "redacted_thinking"):
            raise BadRequest(f"messages.{len(messages) - 2}.content.0.type: Expected "
                             f"`thinking` or `redacted_thinking`, but found "
                             f"`{first.get('type')}`. {_THINKING_ORDER}")
    about = conv.last_user_text if conv.tool_result is None else conv.tool_result
    text = "Thinking about: " + about
    blocks = [{"type": "thinking", "thinking": text, "signature": thinking_signature(text)}]
    if REDACTED_TRIGGER in conv.last_user_text:
        blocks.insert(0, {"type": "redacted_thinking", "data": redacted_data(about)})
    return blocks


def _thinking_enabled(body: JSON) -> bool:
    config = body.get("thinking")
    if config is None:
        return False
    kind = str(config.get("type")) if isinstance(config, dict) else None
    if kind not in ("enabled", "adaptive", "disabled"):
        raise BadRequest("thinking: Input tag does not match any of the expected tags: "
                         "'adaptive', 'disabled', 'enabled'")
    if kind != "disabled":
        _check_thinking_allowed(body, kind)
    if kind == "enabled":
        budget = config.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise BadRequest("thinking.enabled.budget_tokens: Input should be greater than "
                             "or equal to 1024")
        if not budget < int(body.get("max_tokens") or 0):
            raise BadRequest("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return kind != "disabled"


# Claude's version in a model name ("claude-opus-4-6", "claude-sonnet-4-20250514" is 4.0,
# "claude-3-7-sonnet-20250219").
_CLAUDE_VERSION = re.compile(r"claude-(?:[a-z]+-)?(\d+)(?:-(\d)(?!\d))?")
_THINKING_DOCS = ("https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking"
                  "#important-considerations-when-using-extended-thinking")


def _check_thinking_allowed(body: JSON, kind: str) -> None:
    """What Anthropic refuses with thinking on: sampling other than its own (a temperature
    other than 1, top_k, a top_p below 0.95) and a forced tool (the extended thinking
    docs' "important considerations"); adaptive thinking before Claude 4.6, a budget
    (`enabled`) from Opus 4.7 on (Bedrock's adaptive thinking page: "Older models (Claude
    Sonnet 4.5, Claude Opus 4.5, etc.) do not support adaptive thinking"; on Opus 4.7
    "type: enabled ... will return a 400 error"); an effort that is none of Anthropic's."""
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise BadRequest("`temperature` may only be set to 1 when thinking is enabled. "
                         f"Please consult our documentation at {_THINKING_DOCS}")
    if body.get("top_k") is not None:
        raise BadRequest(f"`top_k` must be unset when thinking is enabled. Please consult our "
                         f"documentation at {_THINKING_DOCS}")
    top_p = body.get("top_p")
    if isinstance(top_p, (int, float)) and top_p < 0.95:
        raise BadRequest("`top_p` must be greater than or equal to 0.95 or unset when "
                         f"thinking is enabled. Please consult our documentation at "
                         f"{_THINKING_DOCS}")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise BadRequest("Thinking may not be enabled when tool_choice forces tool use.")
    found = _CLAUDE_VERSION.search(str(body.get("model")))
    version = (int(found[1]), int(found[2] or 0)) if found else None
    if kind == "adaptive" and version is not None and version < (4, 6):
        raise BadRequest("adaptive thinking is not supported on this model")
    if kind == "enabled" and version is not None and version >= (4, 7):
        raise BadRequest("thinking.type.enabled is not supported for this model. Use "
                         "thinking.type.adaptive and output_config.effort instead.")
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if effort is not None and effort not in ("low", "medium", "high", "max"):
        raise BadRequest("output_config.effort: Input should be 'low', 'medium', 'high' or "
                         "'max'")


def thinking_tokens(thinking: list[JSON]) -> int:
    return sum(words(str(block.get("thinking") or "")) for block in thinking)


PROMPT_CACHE_MIN_TOKENS = 1024  # (Claude Sonnet and Opus; Haiku's is larger)
_CACHE_TTLS_S = {"5m": 300.0, "1h": 3600.0}
Cached = tuple[int, int, int]  # input tokens read from the cache, written for 5m, for 1h


def _blocks(body: JSON) -> list[tuple[Any, JSON]]:
    """The request's blocks in the cache's prefix order: tools, system, messages' content."""
    blocks: list[tuple[Any, JSON]] = [("tool", tool) for tool in body.get("tools") or ()
                                      if isinstance(tool, dict)]
    system = body.get("system")
    if isinstance(system, list):
        blocks += [("system", block) for block in system if isinstance(block, dict)]
    elif isinstance(system, str):
        blocks.append(("system", {"type": "text", "text": system}))
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        blocks += [(message.get("role"), block) for block in content or ()
                   if isinstance(block, dict)]
    return blocks


def prompt_cache(call: Call, body: JSON, input_tokens: int) -> Cached:
    """Reads and writes the server's prompt cache for this request (module docstring)."""
    marks: list[tuple[str, int, str]] = []  # (prefix key, its tokens, ttl) per cache_control
    digest = hashlib.sha256(str(body.get("model")).encode())
    tokens = 0
    for role, block in _blocks(body):
        digest.update(orjson.dumps([role, {k: v for k, v in block.items()
                                           if k != "cache_control"}], option=orjson.OPT_SORT_KEYS))
        if role != "tool":
            tokens += words(block_text([block]))
        control = block.get("cache_control")
        if isinstance(control, dict):
            ttl = control.get("ttl", "5m")
            if ttl not in _CACHE_TTLS_S:
                raise BadRequest(f"cache_control.ttl: Input should be '5m' or '1h', got {ttl!r}")
            marks.append((digest.copy().hexdigest(), min(tokens, input_tokens), ttl))
    cache, now = call.state.prompt_cache, time.monotonic()
    cacheable = [mark for mark in marks if mark[1] >= PROMPT_CACHE_MIN_TOKENS]
    read, first_new = 0, 0
    for index in range(len(cacheable) - 1, -1, -1):
        key, size, ttl = cacheable[index]
        if cache.get(key, 0.0) > now:
            read, first_new = size, index + 1
            cache[key] = now + _CACHE_TTLS_S[ttl]  # a read refreshes it
            break
    written = {"5m": 0, "1h": 0}
    done = read
    for key, size, ttl in cacheable[first_new:]:
        written[ttl] += max(size - done, 0)
        done = max(done, size)
        cache[key] = now + _CACHE_TTLS_S[ttl]
    return read, written["5m"], written["1h"]


async def count_tokens(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    conv = messages_conversation(body, validate_messages(body, need_max_tokens=False))
    return await respond_json(call, {"input_tokens": conv.input_tokens})


_MODEL_LIST = dumps({"data": [{"type": "model", "id": model_id, "display_name": name,
                               "created_at": created} for model_id, name, created in MODELS],
                     "has_more": False, "first_id": MODELS[0][0], "last_id": MODELS[-1][0]})


async def list_models(call: Call) -> web.StreamResponse:
    return await respond_json(call, _MODEL_LIST)


# -- rendering --------------------------------------------------------------------------------

def usage(input_tokens: int, output_tokens: int, cache: Cached = (0, 0, 0),
          thinking: int = 0) -> JSON:
    """`output_tokens` includes the `thinking` tokens, as Anthropic counts them."""
    read, written_5m, written_1h = cache
    out: JSON = {"input_tokens": input_tokens - read - written_5m - written_1h,
                 "cache_creation_input_tokens": written_5m + written_1h,
                 "cache_read_input_tokens": read,
                 "cache_creation": {"ephemeral_5m_input_tokens": written_5m,
                                    "ephemeral_1h_input_tokens": written_1h},
                 "output_tokens": output_tokens + thinking, "service_tier": "standard"}
    if thinking:
        out["output_tokens_details"] = {"thinking_tokens": thinking}
    return out


def delta_usage(reply: Reply, cache: Cached, thinking: int = 0) -> JSON:
    """message_delta's usage (MessageDeltaUsage): the cumulative counts, without
    `cache_creation`'s split by TTL."""
    whole = usage(reply.input_tokens, reply.output_tokens, cache, thinking)
    return {name: whole[name] for name in ("input_tokens", "cache_creation_input_tokens",
                                           "cache_read_input_tokens", "output_tokens",
                                           "output_tokens_details") if name in whole}


def content_blocks(reply: Reply) -> list[JSON]:
    call = reply.tool_call
    if call is not None:
        return [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.args}]
    return [{"type": "text", "text": reply.text or ""}]


def message_object(message_id: str, model: str, reply: Reply,
                   cache: Cached = (0, 0, 0), thinking: list[JSON] | None = None) -> JSON:
    thinking = thinking or []
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": thinking + content_blocks(reply),
            "stop_reason": STOP_REASONS[reply.finish], "stop_sequence": None,
            "usage": usage(reply.input_tokens, reply.output_tokens, cache,
                           thinking_tokens(thinking))}


def thinking_events(thinking: list[JSON], chunk_chars: int) -> list[StreamItem]:
    """The thinking blocks at indexes 0..: a thinking block streams its text, then its
    signature; a redacted one comes whole in its content_block_start."""
    items: list[StreamItem] = []
    for index, block in enumerate(thinking):
        opening = block if block["type"] == "redacted_thinking" else \
            {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [] if block["type"] == "redacted_thinking" else [
            *({"type": "thinking_delta", "thinking": piece}
              for piece in split_chunks(block["thinking"], chunk_chars)),
            {"type": "signature_delta", "signature": block["signature"]}]
        items.append((sse({"type": "content_block_start", "index": index,
                           "content_block": opening}, "content_block_start"), False))
        items += [(sse({"type": "content_block_delta", "index": index, "delta": delta},
                       "content_block_delta"), True) for delta in deltas]
        items.append((sse({"type": "content_block_stop", "index": index},
                          "content_block_stop"), False))
    return items


def message_events(message_id: str, model: str, reply: Reply, chunk_chars: int,
                   cache: Cached = (0, 0, 0),
                   thinking: list[JSON] | None = None) -> list[StreamItem]:
    thinking = thinking or []
    at = len(thinking)  # the answer's block index
    start: JSON = {"id": message_id, "type": "message", "role": "assistant", "model": model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": usage(reply.input_tokens, 1, cache)}
    call = reply.tool_call
    if call is not None:
        block: JSON = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        # A call without arguments streams one empty partial_json, as Anthropic's does.
        pieces = split_chunks(call.arguments, chunk_chars) if call.args else [""]
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece}
                  for piece in split_chunks(reply.text or "", chunk_chars)]
    items: list[StreamItem] = [
        (sse({"type": "message_start", "message": start}, "message_start"), False),
        *thinking_events(thinking, chunk_chars),
        (sse({"type": "content_block_start", "index": at, "content_block": block},
             "content_block_start"), False),
        (sse({"type": "ping"}, "ping"), False)]
    items += [(sse({"type": "content_block_delta", "index": at, "delta": delta},
                   "content_block_delta"), True) for delta in deltas]
    items += [
        (sse({"type": "content_block_stop", "index": at}, "content_block_stop"), False),
        (sse({"type": "message_delta", "delta": {"stop_reason": STOP_REASONS[reply.finish],
                                                 "stop_sequence": None},
              "usage": delta_usage(reply, cache, thinking_tokens(thinking))},
             "message_delta"), False),
        (sse({"type": "message_stop"}, "message_stop"), False)]
    return items
