"""Gemini response pieces -> OpenAI chat, and the streamGenerateContent (`alt=sse`) translator.

Each SSE `data:` payload is a whole GenerateContentResponse holding only the new parts:
text arrives in pieces, a function call arrives whole, `finishReason` comes on the last
candidate chunk, and `usageMetadata` (cumulative) may come on any chunk. An error inside the
200 stream is a payload with an `error` object (https://ai.google.dev/api/generate-content).
providers.gemini_format re-exports the public names.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.context import token_count
from providers.streams import StreamError as UpstreamStreamError
from providers.streams import chat_chunk

JSON = dict[str, Any]

# finishReason values that mean the output was blocked (Candidate.FinishReason).
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                       "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"})


def completion_id(response_id: Any) -> str:
    """The chat.completion id: Gemini's responseId when it sent one."""
    return f"chatcmpl-{response_id}" if response_id else f"chatcmpl-{uuid.uuid4().hex}"


def created_now() -> int:
    """OpenAI's `created`; reading the clock is the only impurity in the translators."""
    return int(time.time())


def finish_reason(reason: Any, has_tool_calls: bool) -> str:
    """Candidate.finishReason -> OpenAI finish_reason."""
    if reason in _FILTERED:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def chat_usage(metadata: Any) -> JSON | None:
    """UsageMetadata -> OpenAI usage; thinking tokens are billed as output, so counted there."""
    if not isinstance(metadata, dict):
        return None
    # Tool-use prompt tokens (results of Gemini's built-in tools) are billed as input.
    prompt = token_count(metadata.get("promptTokenCount")) + token_count(
        metadata.get("toolUsePromptTokenCount"))
    thoughts = token_count(metadata.get("thoughtsTokenCount"))
    completion = token_count(metadata.get("candidatesTokenCount")) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens":
                                      token_count(metadata.get("cachedContentTokenCount"))},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def walk_parts(candidate: JSON) -> Iterator[tuple[str, Any]]:
    """("text", str) per run of answer text and ("call", part) per function call, in order.

    Thought summaries (`thought: true`) are not part of the answer; code-execution and media
    parts are skipped because this translation never asks for them.
    """
    run: list[str] = []
    for part in (candidate.get("content") or {}).get("parts") or ():
        if isinstance(part.get("functionCall"), dict):
            if run:
                yield "text", "".join(run)
                run = []
            yield "call", part
        elif isinstance(part.get("text"), str) and part["text"] and not part.get("thought"):
            run.append(part["text"])
    if run:
        yield "text", "".join(run)


def response_tool_call(part: JSON, response_id: Any, choice: int, ordinal: int) -> JSON:
    """A functionCall part -> an OpenAI tool call, its id stable for the same response."""
    call = part["functionCall"]
    arguments = orjson.dumps(call.get("args") or {}).decode()
    seed = f"{response_id}|{choice}|{ordinal}|{call['name']}|{arguments}"
    tool_call: JSON = {"id": "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24],
                       "type": "function",
                       "function": {"name": call["name"], "arguments": arguments}}
    if part.get("thoughtSignature"):  # where Gemini's OpenAI endpoint puts it; see format doc
        tool_call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return tool_call


def logprobs_to_chat(result: Any) -> JSON | None:
    """Candidate.logprobsResult -> OpenAI choice `logprobs` (None when not asked for)."""
    if not isinstance(result, dict) or not result.get("chosenCandidates"):
        return None
    steps = result.get("topCandidates") or []
    content = []
    for position, chosen in enumerate(result["chosenCandidates"]):
        top = steps[position].get("candidates") or [] if position < len(steps) else []
        content.append({**_token_logprob(chosen),
                        "top_logprobs": [_token_logprob(c) for c in top]})
    return {"content": content, "refusal": None}


def _token_logprob(candidate: JSON) -> JSON:
    token = str(candidate.get("token", ""))
    return {"token": token, "logprob": float(candidate.get("logProbability") or 0.0),
            "bytes": list(token.encode())}


class GeminiStreamToChat:
    """Gemini SSE payloads -> OpenAI `chat.completion.chunk` dicts, one response's worth."""

    __slots__ = (
        "_calls",
        "_created",
        "_finished",
        "_id",
        "_include_usage",
        "_model",
        "_opened",
        "_response_id",
        "_usage",
    )

    def __init__(self, public_model: str, include_usage: bool) -> None:
        self._model = public_model
        self._include_usage = include_usage
        self._id: str | None = None
        self._response_id: Any = None
        self._created = created_now()
        self._opened: list[int] = []          # choice indexes that got their role delta
        self._calls: dict[int, int] = {}      # choice index -> tool calls sent so far
        self._finished: set[int] = set()
        self._usage: JSON | None = None  # OpenAI-shaped, from the latest usageMetadata

    @property
    def usage(self) -> JSON | None:
        """The latest (cumulative) usage, OpenAI-shaped; None until Gemini sent any."""
        return self._usage

    @property
    def ended(self) -> bool:
        """Whether every candidate that answered has its finishReason (Gemini's stream has
        no other end): a stream without one was cut short."""
        return bool(self._finished) and all(index in self._finished for index in self._opened)

    def feed(self, data: JSON) -> list[JSON]:
        """Chunks for one parsed `data:` payload; raises UpstreamStreamError on an error one."""
        error = data.get("error")
        if isinstance(error, dict):
            raise UpstreamStreamError(str(error.get("status") or error.get("code") or "UNKNOWN"),
                                      str(error.get("message") or "Gemini stream error"))
        if self._id is None:
            self._response_id = data.get("responseId")
            self._id = completion_id(self._response_id)
        if isinstance(data.get("usageMetadata"), dict):
            # (read now: unreadable, it is an unreadable event, not a failure at the end)
            self._usage = chat_usage(data["usageMetadata"])
        out: list[JSON] = []
        candidates = data.get("candidates") or ()
        for position, candidate in enumerate(candidates):
            out += self._candidate(candidate, candidate.get("index", position))
        if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
            out += self._finish(0, "content_filter")
        return out

    def finish(self) -> list[JSON]:
        """Closing chunks once the upstream ended: missing finish chunks, then usage."""
        out: list[JSON] = []
        for index in self._opened or [0]:
            if index not in self._finished:
                out += self._finish(index, finish_reason(None, self._calls.get(index, 0) > 0))
        usage = self.usage
        if self._include_usage and usage is not None:
            out.append({**self._envelope([]), "usage": usage})
        return out

    def _candidate(self, candidate: JSON, index: int) -> list[JSON]:
        out = self._open(index)
        logprobs = logprobs_to_chat(candidate.get("logprobsResult"))
        for kind, value in walk_parts(candidate):
            if kind == "text":
                out.append(self._chunk(index, {"content": value}, logprobs=logprobs))
                logprobs = None
            else:
                ordinal = self._calls.get(index, 0)
                self._calls[index] = ordinal + 1
                call = response_tool_call(value, self._response_id, index, ordinal)
                out.append(self._chunk(index, {"tool_calls": [{"index": ordinal, **call}]}))
        reason = candidate.get("finishReason")
        if reason and reason != "FINISH_REASON_UNSPECIFIED":
            out += self._finish(index, finish_reason(reason, self._calls.get(index, 0) > 0))
        return out

    def _open(self, index: int) -> list[JSON]:
        if index in self._opened:
            return []
        self._opened.append(index)
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def _finish(self, index: int, reason: str) -> list[JSON]:
        if index in self._finished:
            return []
        self._finished.add(index)
        return self._open(index) + [self._chunk(index, {}, finish=reason)]

    def _chunk(self, index: int, delta: JSON, *, finish: str | None = None,
               logprobs: JSON | None = None) -> JSON:
        return self._envelope([{"index": index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": finish}])

    def _envelope(self, choices: list[JSON]) -> JSON:
        if self._id is None:  # finish() on a stream that sent nothing
            self._id = completion_id(None)
        return chat_chunk(self._id, self._created, self._model, choices, self._include_usage)
