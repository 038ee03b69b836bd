"""providers.anthropic_format / anthropic_stream: OpenAI chat <-> Anthropic Messages, no I/O.

Payloads follow https://docs.anthropic.com/en/api/messages and .../messages-streaming (the
event sequences are the documented examples) and OpenAI's chat completion, chunk and usage
shapes. Where an official SDK ships a parser, its output is also fed through it: pydantic
models for responses and chunks, `accumulate_event` (anthropic) and
`ChatCompletionStreamState` (openai) for streams.
"""
from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from gateway.context import Usage
from providers import anthropic_format, anthropic_stream
from providers.anthropic import AnthropicSource, _event_has_content, _stream_usage
from providers.anthropic_format import (
    ChatStreamToMessages,
    MessagesStreamToChat,
    TranslationError,
    UpstreamStreamError,
    chat_request_to_messages,
    chat_response_to_messages,
    messages_request_to_chat,
    messages_response_to_chat,
    parse_anthropic_error,
)
from providers.streams import (
    AnthropicEventSink,
    OpenAIChunkSink,
    OpenAIChunkSource,
    PassthroughCodec,
    TranslatingCodec,
)

CREATED = 1_700_000_000
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
           "RU5ErkJggg==")
PDF_B64 = "JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K"
WEATHER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"location": {"type": "string"},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["location"]}
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": WEATHER_SCHEMA}}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
ANTHROPIC_WEATHER_TOOL: dict[str, Any] = {"name": "get_weather",
                          "description": "Get the current weather in a given location",
                          "input_schema": WEATHER_SCHEMA}
EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic_stream, "created_now", lambda: CREATED)
    monkeypatch.setattr(anthropic_format, "created_now", lambda: CREATED)


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "claude-public", "messages": list(messages) or [
        {"role": "user", "content": "Hello"}], **fields}


def anthropic_message(*content: dict[str, Any], stop: str = "end_turn",
                      usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": list(content),
            "stop_reason": stop, "stop_sequence": None,
            "usage": usage or {"input_tokens": 2095, "output_tokens": 503}}


def completion(message: dict[str, Any], finish: str | None = "stop",
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion",
            "created": 1741570283, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None,
                                                 "annotations": [], **message},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 1117, "completion_tokens": 46,
                               "total_tokens": 1163,
                               "prompt_tokens_details": {"cached_tokens": 0,
                                                         "audio_tokens": 0},
                               "completion_tokens_details": {"reasoning_tokens": 0}}}


# -- chat request -> Messages request --------------------------------------------------------

def test_minimal_request_gets_upstream_model_and_default_max_tokens() -> None:
    out = chat_request_to_messages(chat(), "claude-sonnet-4-5-20250929")
    assert out == {"model": "claude-sonnet-4-5-20250929", "max_tokens": 4096,
                   "messages": [{"role": "user",
                                 "content": [{"type": "text", "text": "Hello"}]}]}


def test_default_max_tokens_is_a_keyword_and_explicit_limits_win() -> None:
    assert chat_request_to_messages(chat(), "m", default_max_tokens=64)["max_tokens"] == 64
    assert chat_request_to_messages(chat(max_tokens=100), "m")["max_tokens"] == 100
    both = chat(max_tokens=100, max_completion_tokens=200)
    assert chat_request_to_messages(both, "m")["max_tokens"] == 200


def test_one_system_message_becomes_a_string() -> None:
    out = chat_request_to_messages(chat({"role": "system", "content": "Be terse."},
                                        {"role": "user", "content": "Hi"}), "m")
    assert out["system"] == "Be terse."
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_several_system_and_developer_messages_become_text_blocks() -> None:
    out = chat_request_to_messages(chat(
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Never mention the weather."}), "m")
    assert out["system"] == [{"type": "text", "text": "Be terse."},
                             {"type": "text", "text": "Answer in French."},
                             {"type": "text", "text": "Never mention the weather."}]


def test_system_message_with_an_image_is_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(TranslationError, match="system messages can only hold text"):
        chat_request_to_messages(chat({"role": "system", "content": [image]},
                                      {"role": "user", "content": "Hi"}), "m")


def test_user_images_data_urls_and_https_urls() -> None:
    content = [
        {"type": "text", "text": "What is in these images?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}",
                                            "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/a.jpg"}},
    ]
    out = chat_request_to_messages(chat({"role": "user", "content": content}), "m")
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these images?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/a.jpg"}},
    ]


@pytest.mark.parametrize(("url", "message"), [
    ("data:image/bmp;base64,Qk0=", "JPEG, PNG, GIF or WebP"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("ftp://example.com/a.png", "http\\(s\\) or base64"),
])
def test_images_anthropic_cannot_take_are_refused(url: str, message: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(TranslationError, match=message):
        chat_request_to_messages(chat({"role": "user", "content": [part]}), "m")


def test_pdf_files_become_document_blocks() -> None:
    parts = [{"type": "file", "file": {"filename": "a.pdf",
                                       "file_data": f"data:application/pdf;base64,{PDF_B64}"}},
             {"type": "file", "file": {"filename": "b.PDF", "file_data": PDF_B64}}]
    out = chat_request_to_messages(chat({"role": "user", "content": parts}), "m")
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                               "data": PDF_B64}}
    assert out["messages"][0]["content"] == [document, document]


@pytest.mark.parametrize(("part", "message"), [
    ({"type": "file", "file": {"file_id": "file-abc123"}}, "file_id"),
    ({"type": "file", "file": {"file_data": "data:text/csv;base64,YSxi"}}, "PDF documents only"),
    ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
     "'input_audio'"),
])
def test_content_anthropic_cannot_take_is_refused(part: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        chat_request_to_messages(chat({"role": "user", "content": [part]}), "m")


def test_cache_control_on_content_parts_is_kept() -> None:
    part = {"type": "text", "text": "<long document>", "cache_control": {"type": "ephemeral"}}
    out = chat_request_to_messages(chat({"role": "system", "content": [part]},
                                        {"role": "user", "content": "Hi"}), "m")
    assert out["system"] == [{"type": "text", "text": "<long document>",
                              "cache_control": {"type": "ephemeral"}}]


def tool_conversation() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_01A", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}},
            {"id": "toolu_01B", "type": "function", "function": {
                "name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "15 degrees, cloudy"},
        {"role": "tool", "tool_call_id": "toolu_01B",
         "content": [{"type": "text", "text": "21:04 JST"}]},
        {"role": "user", "content": "Thanks! Summarise."},
    ]


def test_tool_calls_and_results_become_tool_use_and_merged_tool_results() -> None:
    out = chat_request_to_messages(chat(*tool_conversation(), tools=[WEATHER_TOOL, TIME_TOOL]),
                                   "m")
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text",
                                      "text": "Weather in Paris and the time in Tokyo?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
             "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "15 degrees, cloudy"},
            {"type": "tool_result", "tool_use_id": "toolu_01B",
             "content": [{"type": "text", "text": "21:04 JST"}]},
            {"type": "text", "text": "Thanks! Summarise."}]},
    ]


def test_tool_results_open_the_user_turn_even_after_user_text() -> None:
    out = chat_request_to_messages(chat(
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "toolu_01A", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
        {"role": "user", "content": "(hurry)"},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": ""}), "m")
    assert out["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01A"},
        {"type": "text", "text": "(hurry)"}]}


def test_consecutive_same_role_messages_merge_and_empty_ones_vanish() -> None:
    out = chat_request_to_messages(chat(
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "three"},
        {"role": "assistant", "content": "ok"}, {"role": "assistant", "content": "sure"}), "m")
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": t} for t in ("one", "two",
                                                                            "three")]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                          {"type": "text", "text": "sure"}]}]


def test_text_of_whitespace_only_is_left_out_and_a_message_of_it_too() -> None:
    out = chat_request_to_messages(chat(
        {"role": "system", "content": [{"type": "text", "text": " "},
                                       {"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "text", "text": "\n"},
                                     {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
        {"role": "assistant", "content": " "}, {"role": "user", "content": "\n\t"},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "tool_calls": [{"id": "toolu_01A", "type": "function", "function": {
            "name": "get_weather", "arguments": "{}"}}], "content": [{"type": "text",
                                                                      "text": "  "}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": [{"type": "text",
                                                                   "text": "\n"}]}), "m")
    assert out["system"] == "Be terse."
    assert out["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
            {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01A",
                                           "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A"}]}]


@pytest.mark.parametrize("content", ["\n", [{"type": "text", "text": " "}]])
def test_a_request_of_whitespace_only_is_refused_naming_messages(content: Any) -> None:
    with pytest.raises(TranslationError, match="not only whitespace") as refused:
        chat_request_to_messages(chat({"role": "user", "content": content}), "m")
    assert refused.value.param == "messages"


@pytest.mark.parametrize(("prefill", "sent"), [
    ("Sure: ", [{"type": "text", "text": "Sure:"}]),
    ([{"type": "text", "text": "Sure"}, {"type": "text", "text": ":\n"}],
     [{"type": "text", "text": "Sure"}, {"type": "text", "text": ":"}]),
    ([{"type": "text", "text": "Sure:"}, {"type": "text", "text": " ", "cache_control": {
        "type": "ephemeral"}}], [{"type": "text", "text": "Sure:"}]),
    ("Sure:", [{"type": "text", "text": "Sure:"}]),
])
def test_a_prefill_goes_without_the_whitespace_its_text_ends_with(prefill: Any,
                                                                   sent: Any) -> None:
    out = chat_request_to_messages(chat({"role": "user", "content": "Write a haiku"},
                                        {"role": "assistant", "content": prefill}), "m")
    assert out["messages"][-1] == {"role": "assistant", "content": sent}


def test_a_prefill_of_whitespace_only_is_left_out_and_earlier_turns_keep_theirs() -> None:
    out = chat_request_to_messages(chat(
        {"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Sure: "},
        {"role": "user", "content": "Go on "}, {"role": "assistant", "content": " \n"}), "m")
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Write a haiku"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure: "}]},
        {"role": "user", "content": [{"type": "text", "text": "Go on "}]}]


@pytest.mark.parametrize(("arguments", "message"), [
    ("{\"location\": \"Par", "not valid JSON"),
    ("[\"Paris\"]", "must be a JSON object"),
])
def test_bad_tool_call_arguments_are_refused(arguments: str, message: str) -> None:
    call = {"id": "toolu_01A", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}
    with pytest.raises(TranslationError, match=message):
        chat_request_to_messages(chat({"role": "user", "content": "Weather?"},
                                      {"role": "assistant", "tool_calls": [call]}), "m")


def test_only_system_messages_is_refused() -> None:
    with pytest.raises(TranslationError, match="at least one user or assistant"):
        chat_request_to_messages(chat({"role": "system", "content": "Be terse."}), "m")


def test_tools_become_anthropic_tools() -> None:
    strict = {"type": "function", "function": {**TIME_TOOL["function"], "strict": True}}
    out = chat_request_to_messages(chat(tools=[WEATHER_TOOL, strict]), "m")
    assert out["tools"] == [ANTHROPIC_WEATHER_TOOL,
                            {"name": "get_time", "strict": True,
                             "input_schema": {"type": "object", "properties": {}}}]
    assert "tool_choice" not in out


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"type": "tool", "name": "get_weather"}),
])
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    out = chat_request_to_messages(chat(tools=[WEATHER_TOOL], tool_choice=choice), "m")
    assert out["tool_choice"] == expected


@pytest.mark.parametrize(("choice", "expected"), [
    (None, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    ("none", {"type": "none"}),
])
def test_parallel_tool_calls_false_disables_parallel_tool_use(
        choice: Any, expected: dict[str, Any]) -> None:
    body = chat(tools=[WEATHER_TOOL], parallel_tool_calls=False)
    if choice is not None:
        body["tool_choice"] = choice
    assert chat_request_to_messages(body, "m")["tool_choice"] == expected


def test_allowed_tools_keeps_only_the_named_tools() -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    out = chat_request_to_messages(chat(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice), "m")
    assert [tool["name"] for tool in out["tools"]] == ["get_time"]
    assert out["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(("fields", "message", "param"), [
    ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "'custom'", "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "custom", "custom": {"name": "x"}}},
     "tool_choice", "tool_choice"),
    ({"n": 2}, "`n` must be 1", "n"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs", "logprobs"),
    ({"functions": [WEATHER_TOOL["function"]]}, "legacy", None),  # (or `function_call`)
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio",
     None),  # (`modalities` or `audio`)
    ({"response_format": {"type": "grammar"}}, "no Anthropic equivalent", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs a `schema`", "response_format"),
])
def test_inexpressible_requests_are_refused_naming_the_field(
        fields: dict[str, Any], message: str, param: str | None) -> None:
    with pytest.raises(TranslationError, match=message) as refused:
        chat_request_to_messages(chat(**fields), "m")
    assert refused.value.param == param


def test_sampling_stop_user_and_stream() -> None:
    out = chat_request_to_messages(chat(temperature=0.2, top_p=0.9, stop="\n\nHuman:",
                                        user="user-1234", stream=True), "m")
    # (not both: Claude 4.5 models refuse the pair; see test_cross_provider)
    assert (out["temperature"], out["stop_sequences"]) == (0.2, ["\n\nHuman:"])
    assert "top_p" not in out
    assert out["metadata"] == {"user_id": "user-1234"}
    assert out["stream"] is True
    out = chat_request_to_messages(chat(stop=["END", "STOP"], temperature=1.7, stream=False), "m")
    assert (out["stop_sequences"], out["temperature"], out["stream"]) == (["END", "STOP"], 1.0,
                                                                         False)


@pytest.mark.parametrize("stop", ["\n", ["END", " \n\t"], [""]])
def test_a_stop_sequence_of_whitespace_only_is_refused_naming_stop(stop: Any) -> None:
    with pytest.raises(TranslationError, match="only whitespace or empty") as refused:
        chat_request_to_messages(chat(stop=stop), "m")
    assert refused.value.param == "stop"


def test_openai_only_fields_are_dropped() -> None:
    body = chat(seed=7, frequency_penalty=0.5, presence_penalty=0.1, logit_bias={"50256": -100},
                stream_options={"include_usage": True}, service_tier="auto", store=True,
                metadata={"team": "search"}, reasoning_effort="none", n=1, logprobs=False,
                response_format={"type": "text"})
    assert set(chat_request_to_messages(body, "m")) == {"model", "messages", "max_tokens"}


@pytest.mark.parametrize("model, effort, thinking, config", [
    # Claude 4.6 and later, and names without a version: adaptive thinking at an effort
    ("claude-opus-4-6", "high", {"type": "adaptive"}, {"effort": "high"}),
    ("claude-sonnet-4-6", "minimal", {"type": "adaptive"}, {"effort": "low"}),
    ("claude-opus-4-7", "xhigh", {"type": "adaptive"}, {"effort": "max"}),
    ("claude-sonnet-4-6", "xhigh", {"type": "adaptive"}, {"effort": "high"}),  # (max: Opus)
    ("anthropic.claude-opus-4-7-v1:0", "medium", {"type": "adaptive"}, {"effort": "medium"}),
    ("claude-mythos-preview", "low", {"type": "adaptive"}, {"effort": "low"}),
    # Claude 3.7 to 4.5: the effort's budget, which max_tokens (the caller set none: the
    # default 4096) grows by, so the answer keeps the default's room
    ("claude-sonnet-4-5-20250929", "low", {"type": "enabled", "budget_tokens": 1024}, None),
    ("claude-haiku-4-5", "medium", {"type": "enabled", "budget_tokens": 2048}, None),
    ("claude-opus-4-20250514", "high", {"type": "enabled", "budget_tokens": 4096}, None),
    ("claude-sonnet-4-5", "xhigh", {"type": "enabled", "budget_tokens": 16384}, None),
    ("claude-3-7-sonnet-20250219", "minimal", {"type": "enabled", "budget_tokens": 1024},
     None),
    # no thinking: Claude 3.5 and older, and "none"
    ("claude-3-5-haiku-20241022", "high", None, None),
    ("claude-opus-4-6", "none", None, None),
])
def test_reasoning_effort_turns_thinking_on(model: str, effort: str, thinking: Any,
                                            config: Any) -> None:
    out = chat_request_to_messages(chat(reasoning_effort=effort), model)
    assert (out.get("thinking"), out.get("output_config")) == (thinking, config)
    assert out["max_tokens"] == 4096 + (thinking or {}).get("budget_tokens", 0)


def test_a_callers_own_thinking_budget_leaves_the_answer_the_default_room() -> None:
    # (Anthropic demands budget_tokens < max_tokens: 8000 with the default 4096 was its 400)
    think = {"type": "enabled", "budget_tokens": 8000}
    out = chat_request_to_messages(chat(thinking=think), "claude-sonnet-4-5")
    assert (out["thinking"], out["max_tokens"]) == (think, 4096 + 8000)
    small = {"type": "enabled", "budget_tokens": 1024}
    assert chat_request_to_messages(chat(thinking=small), "claude-sonnet-4-5")[
        "max_tokens"] == 4096
    given = chat_request_to_messages(chat(thinking=think, max_tokens=9000), "claude-sonnet-4-5")
    assert given["max_tokens"] == 9000  # (what the caller set goes as it is)


def test_thinking_from_the_effort_fits_below_max_tokens() -> None:
    def thinking(max_tokens: int, effort: str = "xhigh") -> Any:
        return chat_request_to_messages(chat(reasoning_effort=effort, max_tokens=max_tokens),
                                        "claude-sonnet-4-5").get("thinking")
    assert thinking(20000) == {"type": "enabled", "budget_tokens": 16384}
    assert thinking(3000) == {"type": "enabled", "budget_tokens": 2999}
    assert thinking(1025, "low") == {"type": "enabled", "budget_tokens": 1024}
    assert thinking(1024, "low") is None  # no room for Anthropic's least budget
    adaptive = chat_request_to_messages(chat(reasoning_effort="high", max_tokens=200),
                                        "claude-opus-4-6")
    assert adaptive["thinking"] == {"type": "adaptive"} and adaptive["max_tokens"] == 200


def test_thinking_drops_the_sampling_anthropic_refuses_with_it() -> None:
    def sampling(**fields: Any) -> dict[str, Any]:
        out = chat_request_to_messages(chat(**fields), "claude-sonnet-4-5")
        return {name: out[name] for name in ("temperature", "top_p", "top_k", "thinking")
                if name in out}
    think = {"type": "enabled", "budget_tokens": 1024}
    assert sampling(reasoning_effort="low", temperature=0.2, top_k=5) == {"thinking": think}
    assert sampling(reasoning_effort="low", temperature=1, top_p=0.5) == {"thinking": think}
    assert sampling(reasoning_effort="low", top_p=0.97) == {"top_p": 0.97, "thinking": think}
    assert sampling(thinking=think, temperature=0) == {"thinking": think}  # (a caller's own)
    assert sampling(temperature=0.2, top_k=5) == {"temperature": 0.2, "top_k": 5}
    disabled = {"type": "disabled"}
    assert sampling(thinking=disabled, temperature=0) == {"temperature": 0.0,
                                                          "thinking": disabled}


def test_an_effort_with_a_forced_tool_or_a_prefill_does_not_think() -> None:
    forced = chat(reasoning_effort="high", tools=[WEATHER_TOOL], tool_choice="required",
                  temperature=0)
    out = chat_request_to_messages(forced, "claude-opus-4-6")
    assert "thinking" not in out and out["tool_choice"] == {"type": "any"}
    assert out["temperature"] == 0
    prefill = chat({"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "The colour is"}, reasoning_effort="high")
    assert "thinking" not in chat_request_to_messages(prefill, "claude-opus-4-6")
    auto = chat(reasoning_effort="high", tools=[WEATHER_TOOL], tool_choice="auto")
    assert chat_request_to_messages(auto, "claude-opus-4-6")["thinking"] == {"type": "adaptive"}


def test_an_effort_and_a_schema_share_output_config() -> None:
    schema = {"type": "object", "properties": {}}
    out = chat_request_to_messages(chat(reasoning_effort="low", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        "claude-opus-4-6")
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema},
                                    "effort": "low"}


@pytest.mark.parametrize("effort", ["maximum", "HIGH", "", 3])
def test_an_unknown_reasoning_effort_is_refused(effort: Any) -> None:
    with pytest.raises(TranslationError) as refused:
        chat_request_to_messages(chat(reasoning_effort=effort), "claude-opus-4-6")
    assert refused.value.param == "reasoning_effort"


def test_json_schema_becomes_output_config_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}
    body = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "contact", "strict": True, "schema": schema}})
    out = chat_request_to_messages(body, "m")
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "system" not in out


def test_json_object_adds_a_system_instruction_only() -> None:
    out = chat_request_to_messages(chat({"role": "system", "content": "Extract the contact."},
                                        {"role": "user", "content": "Jane, jane@example.com"},
                                        response_format={"type": "json_object"}), "m")
    assert out["system"] == [{"type": "text", "text": "Extract the contact."},
                             {"type": "text", "text": anthropic_format._JSON_INSTRUCTION}]
    assert "output_config" not in out


# -- Message -> chat.completion --------------------------------------------------------------

def test_text_message_becomes_a_chat_completion() -> None:
    resp = anthropic_message({"type": "text", "text": "Hi! My name is Claude."},
                             usage={"input_tokens": 12, "output_tokens": 6})
    assert messages_response_to_chat(resp, "claude-public") == {
        "id": "chatcmpl-013Zva2CMHLNnXjNJJKqJ2EF", "object": "chat.completion",
        "created": CREATED, "model": "claude-public",
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "Hi! My name is Claude.",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                  "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}}}


def test_usage_counts_cache_reads_and_writes_in_the_prompt() -> None:
    usage = {"input_tokens": 21, "cache_creation_input_tokens": 188086,
             "cache_read_input_tokens": 1000, "output_tokens": 393,
             "output_tokens_details": {"thinking_tokens": 120}}
    out = messages_response_to_chat(anthropic_message({"type": "text", "text": "x"},
                                                      usage=usage), "p")
    assert out["usage"] == {"prompt_tokens": 189107, "completion_tokens": 393,
                            "total_tokens": 189500,
                            "prompt_tokens_details": {"cached_tokens": 1000,
                                                      "cache_write_tokens": 188086},
                            "completion_tokens_details": {"reasoning_tokens": 120}}


def test_reasoning_tokens_are_anthropics_thinking_tokens_both_ways() -> None:
    """Anthropic's `usage.output_tokens_details.thinking_tokens` (a part of output_tokens,
    as reasoning_tokens are of completion_tokens); left out when there are none."""
    openai_usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
                    "completion_tokens_details": {"reasoning_tokens": 21}}
    translated = anthropic_stream.anthropic_usage(openai_usage)
    assert translated == {"input_tokens": 12, "output_tokens": 30,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                          "output_tokens_details": {"thinking_tokens": 21}}
    assert Usage.from_anthropic(translated) == Usage.from_openai(openai_usage) == Usage(
        input_tokens=12, output_tokens=30, reasoning_tokens=21)
    assert anthropic_stream.chat_usage(translated)["completion_tokens_details"] == {  # type: ignore[index]
        "reasoning_tokens": 21}
    no_reasoning = {**openai_usage, "completion_tokens_details": {"reasoning_tokens": 0}}
    assert "output_tokens_details" not in anthropic_stream.anthropic_usage(no_reasoning)


def test_reasoning_counted_beside_the_completion_is_anthropic_output_too() -> None:
    # xAI's: reasoning outside completion_tokens (the total adds it on). An Anthropic caller
    # is told the output it is billed for, thinking included, as Anthropic counts it.
    grok = {"prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
            "prompt_tokens_details": {"cached_tokens": 128},
            "completion_tokens_details": {"reasoning_tokens": 2809}}
    translated = anthropic_stream.anthropic_usage(grok)
    assert translated["output_tokens"] == 4308
    assert Usage.from_anthropic(translated) == Usage.from_openai(grok)


def test_tool_use_message_becomes_tool_calls_and_thinking_reasoning_and_blocks() -> None:
    resp = anthropic_message(
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "EqQBCgIYAh"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}},
        stop="tool_use")
    out = messages_response_to_chat(resp, "p")
    assert out["choices"][0] == {
        "index": 0, "logprobs": None, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "refusal": None,
                    "reasoning_content": "The user wants weather.",
                    "thinking_blocks": [
                        {"type": "thinking", "thinking": "The user wants weather.",
                         "signature": "EqQBCgIYAh"},
                        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}],
                    "tool_calls": [
            {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
                "name": "get_weather",
                "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"}}]}}
    ChatCompletion.model_validate(out)


def test_text_blocks_are_joined_around_citations() -> None:
    resp = anthropic_message({"type": "text", "text": "According to the document, "},
                             {"type": "text", "text": "the grass is green",
                              "citations": [{"type": "char_location", "cited_text": "green"}]},
                             {"type": "text", "text": "."})
    message = messages_response_to_chat(resp, "p")["choices"][0]["message"]
    assert message["content"] == "According to the document, the grass is green."


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"),
    ("max_tokens", "length"), ("model_context_window_exceeded", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("some_future_reason", "stop"),
])
def test_stop_reasons(stop: str, finish: str) -> None:
    resp = anthropic_message({"type": "text", "text": "x"}, stop=stop)
    assert messages_response_to_chat(resp, "p")["choices"][0]["finish_reason"] == finish


def test_empty_content_is_an_empty_string() -> None:
    out = messages_response_to_chat(anthropic_message(), "p")
    assert out["choices"][0]["message"]["content"] == ""
    ChatCompletion.model_validate(out)


# -- Anthropic stream -> chat chunks ---------------------------------------------------------

def ev(name: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return name, {"type": name, **data}


def message_start(usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev("message_start", message={
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant",
        "content": [], "model": "claude-sonnet-4-5-20250929", "stop_reason": None,
        "stop_sequence": None, "usage": usage})


def text_delta(index: int, text: str) -> tuple[str, dict[str, Any]]:
    return ev("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


def json_delta(index: int, text: str) -> tuple[str, dict[str, Any]]:
    return ev("content_block_delta", index=index,
              delta={"type": "input_json_delta", "partial_json": text})


# The "Basic streaming request" example of the streaming docs.
TEXT_EVENTS = [
    message_start({"input_tokens": 25, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0, "output_tokens": 1}),
    ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ev("ping"),
    text_delta(0, "Hello"),
    text_delta(0, "!"),
    ev("content_block_stop", index=0),
    ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
       usage={"output_tokens": 15}),
    ev("message_stop"),
]
# The "Streaming request with tool use" example, with a thinking block in front as extended
# thinking sends it.
TOOL_EVENTS = [
    message_start({"input_tokens": 472, "output_tokens": 2}),
    ev("content_block_start", index=0,
       content_block={"type": "thinking", "thinking": "", "signature": ""}),
    ev("content_block_delta", index=0,
       delta={"type": "thinking_delta", "thinking": "I need the weather tool."}),
    ev("content_block_delta", index=0, delta={"type": "signature_delta",
                                              "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}),
    ev("content_block_stop", index=0),
    ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    text_delta(1, "Okay"),
    text_delta(1, ", let's check the weather for San Francisco, CA:"),
    ev("content_block_stop", index=1),
    ev("content_block_start", index=2, content_block={
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
        "input": {}}),
    json_delta(2, ""),
    json_delta(2, "{\"location\":"),
    ev("ping"),
    json_delta(2, " \"San Francisc"),
    json_delta(2, "o, CA\", \"unit\": \"fahrenheit\"}"),
    ev("content_block_stop", index=2),
    ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
       usage={"output_tokens": 89}),
    ev("message_stop"),
]


def chunk(delta: dict[str, Any], finish: str | None = None, *,
          usage_key: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "chatcmpl-1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "object": "chat.completion.chunk",
        "created": CREATED, "model": "claude-public",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage_key:
        out["usage"] = None
    return out


def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {**chunk({}), "choices": [], "usage": usage}


def run_to_chat(events: list[tuple[str, dict[str, Any]]],
                include_usage: bool = True) -> tuple[MessagesStreamToChat, list[dict[str, Any]]]:
    translator = MessagesStreamToChat("claude-public", include_usage)
    out: list[dict[str, Any]] = []
    for name, data in events:
        out += translator.feed(name, data)
    return translator, out


def test_text_stream_chunks() -> None:
    translator, out = run_to_chat(TEXT_EVENTS)
    usage = {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40,
             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0}}
    assert out == [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
                   chunk({"content": "!"}), chunk({}, "stop"), usage_chunk(usage)]
    assert translator.finished and translator.usage == usage


def test_tool_stream_chunks() -> None:
    _, out = run_to_chat(TOOL_EVENTS)
    args = [{"index": 0, "function": {"arguments": text}} for text in (
        "{\"location\":", " \"San Francisc", "o, CA\", \"unit\": \"fahrenheit\"}")]
    assert out[:-1] == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "I need the weather tool."}),
        chunk({"thinking_blocks": [{"index": 0, "type": "thinking",
                                    "thinking": "I need the weather tool.",
                                    "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}]}),
        chunk({"content": "Okay"}),
        chunk({"content": ", let's check the weather for San Francisco, CA:"}),
        chunk({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                               "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        *[chunk({"tool_calls": [arg]}) for arg in args],
        chunk({}, "tool_calls"),
    ]
    assert out[-1]["usage"]["completion_tokens"] == 89


def test_streamed_chunks_assemble_in_the_openai_sdk() -> None:
    _, out = run_to_chat(TOOL_EVENTS)
    state = ChatCompletionStreamState()
    for item in out:
        state.handle_chunk(ChatCompletionChunk.model_validate(item))
    final = state.get_final_completion()
    assert final.choices[0].message.content == (
        "Okay, let's check the weather for San Francisco, CA:")
    calls = final.choices[0].message.tool_calls or []
    assert [(call.id, call.function.arguments) for call in calls] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6",
         "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}")]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.prompt_tokens == 472


def test_without_include_usage_there_is_no_usage_chunk_or_key() -> None:
    translator, out = run_to_chat(TEXT_EVENTS, include_usage=False)
    assert out == [chunk({"role": "assistant", "content": ""}, usage_key=False),
                   chunk({"content": "Hello"}, usage_key=False),
                   chunk({"content": "!"}, usage_key=False),
                   chunk({}, "stop", usage_key=False)]
    assert translator.usage is not None and translator.usage["total_tokens"] == 40


def test_stream_usage_with_cache_tokens_and_cumulative_input_in_message_delta() -> None:
    translator = MessagesStreamToChat("p", True)
    assert translator.usage is None
    translator.feed(*message_start({"input_tokens": 0, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 0, "output_tokens": 1}))
    assert translator.usage is not None and translator.usage["completion_tokens"] == 1
    translator.feed(*ev("message_delta", delta={"stop_reason": "end_turn"}, usage={
        "input_tokens": 10, "cache_creation_input_tokens": None, "cache_read_input_tokens": 2048,
        "output_tokens": 300}))
    assert translator.usage == {
        "prompt_tokens": 2058, "completion_tokens": 300, "total_tokens": 2358,
        "prompt_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}}
    assert not translator.finished


# A stream that wrote 3,000 input tokens to the prompt cache, 1,000 of them for an hour:
# message_start splits the writes by TTL; message_delta (MessageDeltaUsage) repeats the
# cumulative counts without the split.
_CACHING_STREAM = b"".join(
    b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    for kind, payload in (
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 3000,
                      "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 2000,
                                         "ephemeral_1h_input_tokens": 1000},
                      "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": 10, "cache_creation_input_tokens": 3000,
                                     "cache_read_input_tokens": None, "output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"})))
_CACHING_USAGE = Usage(input_tokens=3010, output_tokens=7, cache_write_tokens=3000,
                       cache_write_1h_tokens=1000)


def test_a_native_stream_keeps_what_message_start_said_and_message_delta_did_not() -> None:
    codec = PassthroughCodec(_stream_usage, _event_has_content)
    codec.feed(_CACHING_STREAM)
    codec.finish()
    assert codec.usage == _CACHING_USAGE  # the hour's 1,000 writes, the null read count


def test_a_translated_stream_keeps_the_writes_kept_for_an_hour() -> None:
    codec = TranslatingCodec(AnthropicSource(MessagesStreamToChat("claude-x", False)),
                             OpenAIChunkSink())
    codec.feed(_CACHING_STREAM)
    assert codec.usage == _CACHING_USAGE


def test_a_translated_stream_without_message_stop_ends_in_an_error_not_a_finish() -> None:
    cut = _CACHING_STREAM[:_CACHING_STREAM.index(b"event: content_block_stop")]
    codec = TranslatingCodec(AnthropicSource(MessagesStreamToChat("claude-x", False)),
                             OpenAIChunkSink())
    out = codec.feed(cut)
    assert b'"hi"' in out and b"finish_reason\":\"" not in out
    with pytest.raises(UpstreamStreamError) as caught:
        codec.finish()  # nothing made up to deliver: raised
    assert (caught.value.error_type, caught.value.from_provider) == ("incomplete_stream", False)
    whole = TranslatingCodec(AnthropicSource(MessagesStreamToChat("claude-x", False)),
                             OpenAIChunkSink())
    whole.feed(_CACHING_STREAM)
    assert whole.finish().endswith(b"data: [DONE]\n\n") and whole.error is None


def test_a_streamed_call_without_arguments_gets_empty_object_arguments() -> None:
    _, out = run_to_chat([
        message_start({"input_tokens": 10, "output_tokens": 1}),
        ev("content_block_start", index=0, content_block={
            "type": "tool_use", "id": "toolu_A", "name": "now", "input": {}}),
        json_delta(0, ""),
        ev("content_block_stop", index=0),
        ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
           usage={"output_tokens": 3}),
        ev("message_stop")], include_usage=False)
    assert [c["choices"][0]["delta"] for c in out][1:] == [
        {"tool_calls": [{"index": 0, "id": "toolu_A", "type": "function",
                         "function": {"name": "now", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, {}]


def test_server_tool_input_and_unknown_events_are_not_chunks() -> None:
    translator = MessagesStreamToChat("p", False)
    translator.feed(*message_start({"input_tokens": 5, "output_tokens": 1}))
    assert translator.feed(*ev("content_block_start", index=0, content_block={
        "type": "server_tool_use", "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
        "name": "web_search", "input": {}})) == []
    assert translator.feed(*json_delta(0, "{\"query\": \"weather\"}")) == []
    assert translator.feed(*ev("content_block_delta", index=1, delta={
        "type": "citations_delta", "citation": {"type": "char_location"}})) == []
    assert translator.feed(*ev("some_new_event", detail=1)) == []


def test_events_without_message_start_still_open_with_the_role() -> None:
    _, out = run_to_chat([text_delta(0, "Hi"), ev("message_stop")], include_usage=False)
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {}]
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert out[0]["id"] == out[-1]["id"] and out[0]["id"].startswith("chatcmpl-")


def test_error_event_raises_upstream_stream_error() -> None:
    translator = MessagesStreamToChat("p", True)
    translator.feed(*TEXT_EVENTS[0])
    with pytest.raises(UpstreamStreamError) as caught:
        translator.feed("error", {"type": "error", "error": {"type": "overloaded_error",
                                                             "message": "Overloaded"}})
    assert (caught.value.error_type, caught.value.message) == ("overloaded_error", "Overloaded")


# -- Messages request -> chat request --------------------------------------------------------

def messages_body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-public", "max_tokens": 1024,
            "messages": list(messages) or [{"role": "user", "content": "Hello, Claude"}],
            **fields}


def test_minimal_messages_request() -> None:
    assert messages_request_to_chat(messages_body()) == {
        "model": "gpt-public", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, Claude"}]}
    assert messages_request_to_chat(messages_body(), max_tokens_field="max_completion_tokens") \
        == {"model": "gpt-public", "max_completion_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello, Claude"}]}


@pytest.mark.parametrize(("system", "content"), [
    ("You are a pirate.", "You are a pirate."),
    ([{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
      {"type": "text", "text": "Use the tools."}], "You are Claude Code.\nUse the tools."),
])
def test_system_becomes_one_system_message(system: Any, content: str) -> None:
    out = messages_request_to_chat(messages_body(system=system))
    assert out["messages"][0] == {"role": "system", "content": content}


def test_images_and_documents_become_content_parts() -> None:
    blocks = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "title": "report.pdf", "source": {
            "type": "base64", "media_type": "application/pdf", "data": PDF_B64}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": "The grass is green."}},
        {"type": "text", "text": "Describe these.", "cache_control": {"type": "ephemeral"}},
    ]
    out = messages_request_to_chat(messages_body({"role": "user", "content": blocks}))
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"filename": "report.pdf",
                                  "file_data": f"data:application/pdf;base64,{PDF_B64}"}},
        {"type": "text", "text": "The grass is green."},
        {"type": "text", "text": "Describe these."}]}]


def test_tool_use_and_tool_results_become_tool_calls_and_tool_messages() -> None:
    out = messages_request_to_chat(messages_body(
        {"role": "user", "content": "What's the weather in SF?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "EqQBCgIYAh"},
            {"type": "text", "text": "I'll check."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
             "input": {"location": "San Francisco, CA"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
             "content": [{"type": "text", "text": "15 degrees"},
                         {"type": "text", "text": "cloudy"}]},
            {"type": "text", "text": "And tomorrow?"}]},
        tools=[ANTHROPIC_WEATHER_TOOL]))
    assert out["messages"] == [
        {"role": "user", "content": "What's the weather in SF?"},
        {"role": "assistant", "content": "I'll check.", "tool_calls": [
            {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
         "content": "15 degrees\ncloudy"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert out["tools"] == [WEATHER_TOOL]


def test_error_tool_results_keep_their_text_and_images_follow_the_tool_messages() -> None:
    out = messages_request_to_chat(messages_body(
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "is_error": True,
             "content": "ConnectionError: the weather service API is not available"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": [
                {"type": "text", "text": "Screenshot taken."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG_B64}}]}]}))
    assert out["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_01",
         "content": "ConnectionError: the weather service API is not available"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "Screenshot taken."},
        {"role": "user", "content": [
            {"type": "text", "text": "Attachments returned by tool call toolu_02:"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]},
    ]


def test_assistant_with_only_tool_use_has_null_content() -> None:
    out = messages_request_to_chat(messages_body(
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01",
                                           "name": "get_weather", "input": {}}]}))
    assert out["messages"][1]["content"] is None
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True},
     {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": True},
     {"tool_choice": "required", "parallel_tool_calls": False}),
])
def test_messages_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = messages_request_to_chat(messages_body(tools=[ANTHROPIC_WEATHER_TOOL],
                                                 tool_choice=choice))
    assert {key: out[key] for key in ("tool_choice", "parallel_tool_calls") if key in out} == (
        expected)


def test_strict_tools_and_tools_without_schema() -> None:
    out = messages_request_to_chat(messages_body(tools=[
        {**ANTHROPIC_WEATHER_TOOL, "strict": True, "cache_control": {"type": "ephemeral"}},
        {"name": "ping", "type": "custom", "input_schema": {}}]))
    assert out["tools"] == [
        {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}},
        {"type": "function", "function": {"name": "ping",
                                          "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(("fields", "message"), [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]},
     "server tool 'web_search_20250305'"),
    ({"messages": [{"role": "user", "content": "Search"}, {"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search",
         "input": {"query": "weather"}}]}]}, "'server_tool_use'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}]}]}, "'file'"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "url", "url": "https://example.com/a.pdf"}}]}]}, "'url'"),
    ({"mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}]},
     "MCP"),
    ({"output_config": {"format": {"type": "xml"}}}, "'xml'"),
])
def test_anthropic_only_features_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        messages_request_to_chat(messages_body(**fields))


def test_more_stop_sequences_than_openai_takes_are_refused_naming_the_callers_field() -> None:
    """(An Anthropic error names no field; `param` still says which one, for the logs'
    readers and any caller format that shows it.)"""
    with pytest.raises(TranslationError, match="at most 4 stop sequences") as refused:
        messages_request_to_chat(messages_body(stop_sequences=["1", "2", "3", "4", "5"]),
                                 max_stop_sequences=4)
    assert refused.value.param == "stop_sequences"


def test_parameters_stream_and_dropped_fields() -> None:
    out = messages_request_to_chat(messages_body(
        temperature=0.5, top_p=0.8, top_k=40, stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "13803d75-b4b5-4c3e-b2a2-6f21399b021b"}, stream=True,
        thinking={"type": "enabled", "budget_tokens": 2048}, service_tier="auto",
        tool_choice={"type": "auto"}))
    assert out == {"model": "gpt-public", "max_tokens": 1024,
                   "messages": [{"role": "user", "content": "Hello, Claude"}],
                   "temperature": 0.5, "top_p": 0.8, "top_k": 40, "stop": ["\n\nHuman:"],
                   "user": "13803d75-b4b5-4c3e-b2a2-6f21399b021b", "stream": True,
                   "stream_options": {"include_usage": True}}
    assert "stream_options" not in messages_request_to_chat(messages_body(stream=False))


@pytest.mark.parametrize("top_k", [0.5, "5", True])
def test_a_top_k_that_is_no_integer_is_refused_naming_it(top_k: Any) -> None:
    with pytest.raises(TranslationError, match="expected an integer") as refused:
        messages_request_to_chat(messages_body(top_k=top_k))
    assert refused.value.param == "top_k"


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_structured_output_becomes_response_format(field: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}
    output_format = {"type": "json_schema", "schema": schema}
    value = {"format": output_format, "effort": "high"} if field == "output_config" else (
        output_format)
    out = messages_request_to_chat(messages_body(**{field: value}))
    assert out["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": schema}}


# -- chat.completion -> Message --------------------------------------------------------------

def test_chat_completion_becomes_a_message() -> None:
    resp = completion({"content": "Hello there, how may I assist you today?"})
    out = chat_response_to_messages(resp, "gpt-public")
    assert out == {"id": "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "type": "message",
                   "role": "assistant", "model": "gpt-public",
                   "content": [{"type": "text",
                                "text": "Hello there, how may I assist you today?"}],
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 1117, "output_tokens": 46,
                             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}
    Message.model_validate(out)


def test_tool_calls_become_tool_use_blocks_and_bad_arguments_become_empty_input() -> None:
    resp = completion({"content": None, "tool_calls": [
        {"id": "call_12345xyz", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"}},
        {"id": "call_67890abc", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"location\": \"Bog"}}]}, finish="tool_calls")
    out = chat_response_to_messages(resp, "p")
    assert out["content"] == [
        {"type": "tool_use", "id": "call_12345xyz", "name": "get_weather",
         "input": {"location": "Paris, France"}},
        {"type": "tool_use", "id": "call_67890abc", "name": "get_weather", "input": {}}]
    assert out["stop_reason"] == "tool_use"
    Message.model_validate(out)


KIMI_ID = "functions.get_weather:0"  # an OpenAI-compatible provider's id Anthropic refuses
KIMI_ID_FOR_ANTHROPIC = anthropic_stream.tool_use_id(KIMI_ID)


def test_tool_ids_anthropic_refuses_are_mapped_alike_in_every_direction() -> None:
    assert re.fullmatch(r"toolu_[0-9a-f]{24}", KIMI_ID_FOR_ANTHROPIC)
    assert anthropic_stream.tool_use_id("call_ab-C9") == "call_ab-C9"  # valid: unchanged
    assert anthropic_stream.tool_use_id("call.1") != anthropic_stream.tool_use_id("call:1")
    history = chat_request_to_messages(chat(*tool_conversation_with(KIMI_ID)), "m")["messages"]
    assert history[1]["content"][0]["id"] == history[2]["content"][0]["tool_use_id"] == \
        KIMI_ID_FOR_ANTHROPIC
    resp = completion({"content": None, "tool_calls": [{"id": KIMI_ID, "type": "function",
                                                        "function": {"name": "get_weather",
                                                                     "arguments": "{}"}}]})
    assert chat_response_to_messages(resp, "p")["content"][0]["id"] == KIMI_ID_FOR_ANTHROPIC


def tool_conversation_with(call_id: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]


def test_usage_with_cached_prompt_tokens() -> None:
    usage = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
             "prompt_tokens_details": {"cached_tokens": 1920}}
    out = chat_response_to_messages(completion({"content": "x"}, usage=usage), "p")
    assert out["usage"] == {"input_tokens": 86, "output_tokens": 300,
                            "cache_read_input_tokens": 1920, "cache_creation_input_tokens": 0}


@pytest.mark.parametrize(("message", "finish", "stop"), [
    ({"content": "x"}, "stop", "end_turn"),
    ({"content": "x"}, "length", "max_tokens"),
    ({"content": "x"}, "content_filter", "refusal"),
    ({"content": "x"}, None, "end_turn"),
    ({"content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": "{}"}}]},
     "stop", "tool_use"),  # vLLM and Ollama say "stop" next to tool calls
    ({"content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": "{}"}}]},
     "function_call", "tool_use"),
    ({"content": None, "refusal": "I'm sorry, I cannot assist with that request."},
     "stop", "refusal"),
])
def test_finish_reasons(message: dict[str, Any], finish: str | None, stop: str) -> None:
    out = chat_response_to_messages(completion(message, finish=finish), "p")
    assert out["stop_reason"] == stop


def test_refusal_text_becomes_the_text_block() -> None:
    out = chat_response_to_messages(completion(
        {"content": None, "refusal": "I'm sorry, I cannot assist with that request."}), "p")
    assert out["content"] == [{"type": "text",
                               "text": "I'm sorry, I cannot assist with that request."}]


# -- chat chunks -> Anthropic stream ---------------------------------------------------------

def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None,
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    return {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices": choices,
            "usage": usage}


OPENAI_USAGE = {"prompt_tokens": 2006, "completion_tokens": 12, "total_tokens": 2018,
                "prompt_tokens_details": {"cached_tokens": 1920},
                "completion_tokens_details": {"reasoning_tokens": 0}}
START = ("message_start", {"type": "message_start", "message": {
    "id": "msg_123", "type": "message", "role": "assistant", "content": [],
    "model": "gpt-public", "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 0, "output_tokens": 0}}})
PING = ("ping", {"type": "ping"})


def block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev("content_block_start", index=index, content_block=block)


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return ev("content_block_stop", index=index)


def message_delta(stop: str, usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage=usage)


MESSAGE_STOP = ("message_stop", {"type": "message_stop"})
ANTHROPIC_USAGE = {"input_tokens": 86, "output_tokens": 12, "cache_read_input_tokens": 1920,
                   "cache_creation_input_tokens": 0}


def run_to_messages(chunks: list[dict[str, Any]]) -> tuple[ChatStreamToMessages,
                                                            list[tuple[str, dict[str, Any]]]]:
    translator = ChatStreamToMessages("gpt-public")
    events: list[tuple[str, dict[str, Any]]] = []
    for item in chunks:
        events += translator.feed(item)
    return translator, events + translator.finish()


def test_text_chunks_become_anthropic_events() -> None:
    translator, events = run_to_messages([
        openai_chunk({"role": "assistant", "content": "", "refusal": None}),
        openai_chunk({"content": "Hello"}),
        openai_chunk({"content": " there"}),
        openai_chunk({}, "stop"),
        openai_chunk(None, usage=OPENAI_USAGE),
    ])
    assert events == [
        START, PING,
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Hello"), text_delta(0, " there"),
        block_stop(0),
        message_delta("end_turn", ANTHROPIC_USAGE),
        MESSAGE_STOP,
    ]
    assert translator.usage == OPENAI_USAGE


def test_reasoning_chunks_become_a_thinking_block_before_the_text() -> None:
    """DeepSeek sends `reasoning_content` (vLLM once sent `reasoning` with the same text:
    one of them goes); a delta that carries reasoning and text opens the text block after
    the thinking one. No signature_delta: the reasoning has no signature."""
    def thinking(index: int, text: str) -> tuple[str, dict[str, Any]]:
        return ev("content_block_delta", index=index,
                  delta={"type": "thinking_delta", "thinking": text})

    _, events = run_to_messages([
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": None, "reasoning_content": "The user"}),
        openai_chunk({"reasoning_content": " greets.", "reasoning": " greets."}),
        openai_chunk({"reasoning": " Answer.", "content": "Hello"}),
        openai_chunk({}, "stop"),
        openai_chunk(None, usage=OPENAI_USAGE),
    ])
    assert events == [
        START, PING,
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        thinking(0, "The user"), thinking(0, " greets."), thinking(0, " Answer."),
        block_stop(0),
        block_start(1, {"type": "text", "text": ""}), text_delta(1, "Hello"), block_stop(1),
        message_delta("end_turn", ANTHROPIC_USAGE),
        MESSAGE_STOP,
    ]


def test_message_delta_waits_for_the_usage_chunk() -> None:
    translator = ChatStreamToMessages("gpt-public")
    translator.feed(openai_chunk({"role": "assistant", "content": "Hi"}))
    assert translator.feed(openai_chunk({}, "length")) == [block_stop(0)]
    assert translator.feed(openai_chunk(None, usage=OPENAI_USAGE)) == [
        message_delta("max_tokens", ANTHROPIC_USAGE)]
    assert translator.finish() == [MESSAGE_STOP]
    assert translator.finish() == []


def test_parallel_tool_call_chunks_become_sequential_tool_use_blocks() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    _, events = run_to_messages([
        openai_chunk({"role": "assistant", "content": None}),
        openai_chunk(call(0, id="call_DdmO9pD3xa9XTPNJ32zg2hcA", type="function",
                          function={"name": "get_weather", "arguments": ""})),
        openai_chunk(call(0, function={"arguments": "{\"location\": \"Pa"})),
        openai_chunk(call(0, function={"arguments": "ris\"}"})),
        openai_chunk(call(1, id="call_ABC", type="function",
                          function={"name": "get_time", "arguments": "{}"})),
        openai_chunk({}, "tool_calls", usage=OPENAI_USAGE),
    ])
    assert events == [
        START, PING,
        block_start(0, {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                        "name": "get_weather", "input": {}}),
        json_delta(0, "{\"location\": \"Pa"), json_delta(0, "ris\"}"),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "call_ABC", "name": "get_time", "input": {}}),
        json_delta(1, "{}"),
        block_stop(1),
        message_delta("tool_use", ANTHROPIC_USAGE),
        MESSAGE_STOP,
    ]


def test_a_streamed_tool_id_anthropic_refuses_is_mapped_and_repeating_it_keeps_one_block(
        ) -> None:
    """Some compatible servers repeat the id in every delta of a call."""
    def call(arguments: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "id": KIMI_ID, "type": "function",
                                "function": {"name": "get_weather", "arguments": arguments}}]}

    _, events = run_to_messages([openai_chunk(call("")), openai_chunk(call("{\"city\"")),
                                 openai_chunk(call(": \"Paris\"}")),
                                 openai_chunk({}, "tool_calls", usage=OPENAI_USAGE)])
    assert events[2:6] == [
        block_start(0, {"type": "tool_use", "id": KIMI_ID_FOR_ANTHROPIC, "name": "get_weather",
                        "input": {}}),
        json_delta(0, "{\"city\""), json_delta(0, ": \"Paris\"}"), block_stop(0)]


def test_text_after_a_tool_call_opens_a_new_block_and_same_index_new_id_too() -> None:
    _, events = run_to_messages([
        openai_chunk({"content": "Checking."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {
            "name": "a", "arguments": "{}"}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_2", "function": {
            "name": "b", "arguments": "{}"}}]}),
        openai_chunk({}, "stop"),
    ])
    starts = [(data["index"], data["content_block"]["type"]) for name, data in events
              if name == "content_block_start"]
    assert starts == [(0, "text"), (1, "tool_use"), (2, "tool_use")]
    assert events[-2] == message_delta("tool_use", anthropic_stream.anthropic_usage(None))


def test_finish_without_finish_reason_or_usage_still_closes_the_message() -> None:
    translator, events = run_to_messages([openai_chunk({"content": "partial"})])
    assert events[-3:] == [block_stop(0), message_delta("end_turn", {
        "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0}), MESSAGE_STOP]
    assert translator.usage is None


def test_empty_upstream_stream_is_still_a_valid_message() -> None:
    events = ChatStreamToMessages("gpt-public").finish()
    assert [name for name, _ in events] == ["message_start", "ping", "message_delta",
                                            "message_stop"]
    assert events[0][1]["message"]["id"].startswith("msg_")
    assert events[2][1]["delta"]["stop_reason"] == "end_turn"


def test_refusal_deltas_become_text_and_stop_reason_refusal() -> None:
    _, events = run_to_messages([
        openai_chunk({"role": "assistant", "content": None, "refusal": ""}),
        openai_chunk({"refusal": "I'm sorry, I cannot help with that."}),
        openai_chunk({}, "stop", usage=OPENAI_USAGE),
    ])
    assert text_delta(0, "I'm sorry, I cannot help with that.") in events
    assert message_delta("refusal", ANTHROPIC_USAGE) in events


def test_error_chunk_raises_upstream_stream_error() -> None:
    translator = ChatStreamToMessages("gpt-public")
    translator.feed(openai_chunk({"content": "Hi"}))
    with pytest.raises(UpstreamStreamError) as caught:
        translator.feed({"error": {"message": "The server had an error while processing "
                                              "your request.", "type": "server_error",
                                   "param": None, "code": None}})
    assert caught.value.error_type == "server_error"
    assert caught.value.message.startswith("The server had an error")


def test_events_assemble_in_the_anthropic_sdk() -> None:
    _, events = run_to_messages([
        openai_chunk({"role": "assistant", "content": "Let me look."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\""}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": \"Paris\"}"}}]}),
        openai_chunk({}, "tool_calls"),
        openai_chunk(None, usage=OPENAI_USAGE),
    ])
    snapshot = None
    buffers: dict[int, bytes] = {}
    for name, data in events:
        if name != "ping":
            snapshot = accumulate_event(event=EVENT.validate_python(data),
                                        current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    assert snapshot.content[0].type == "text" and snapshot.content[0].text == "Let me look."
    assert snapshot.content[1].type == "tool_use"
    assert snapshot.content[1].input == {"location": "Paris"}
    assert snapshot.stop_reason == "tool_use"
    assert (snapshot.usage.input_tokens, snapshot.usage.cache_read_input_tokens,
            snapshot.usage.output_tokens) == (86, 1920, 12)


# -- round trips -----------------------------------------------------------------------------

def test_chat_request_survives_a_trip_through_anthropic() -> None:
    conversation = [{"role": "system", "content": "Be terse."}, *tool_conversation()]
    original = chat(*conversation, tools=[WEATHER_TOOL], tool_choice="required",
                    max_tokens=300, temperature=0.3, stop=["END"], user="u-1", stream=True)
    anthropic = chat_request_to_messages(original, "claude-sonnet-4-5-20250929")
    back = messages_request_to_chat(anthropic)
    assert back["messages"] == [
        {"role": "system", "content": "Be terse."},
        conversation[1],
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_01A", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
            {"id": "toolu_01B", "type": "function", "function": {
                "name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "15 degrees, cloudy"},
        {"role": "tool", "tool_call_id": "toolu_01B", "content": "21:04 JST"},
        {"role": "user", "content": "Thanks! Summarise."},
    ]
    assert back["tools"] == [WEATHER_TOOL]
    assert {key: back[key] for key in ("tool_choice", "max_tokens", "temperature", "stop",
                                       "user", "stream")} == {
        "tool_choice": "required", "max_tokens": 300, "temperature": 0.3, "stop": ["END"],
        "user": "u-1", "stream": True}


def test_message_survives_a_trip_through_chat() -> None:
    original = anthropic_message(
        {"type": "text", "text": "Checking the weather."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}},
        stop="tool_use", usage={"input_tokens": 21, "cache_creation_input_tokens": 1500,
                                "cache_read_input_tokens": 3000, "output_tokens": 93})
    back = chat_response_to_messages(messages_response_to_chat(original, "p"),
                                     "claude-sonnet-4-5-20250929")
    assert back == {**original, "usage": {"input_tokens": 21, "output_tokens": 93,
                                          "cache_read_input_tokens": 3000,
                                          "cache_creation_input_tokens": 1500}}


def test_stream_survives_a_trip_through_chat() -> None:
    _, chunks = run_to_chat(TOOL_EVENTS)
    _, events = run_to_messages(chunks)
    text = "".join(d["delta"]["text"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    args = "".join(d["delta"]["partial_json"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert text == "Okay, let's check the weather for San Francisco, CA:"
    assert args == "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}"
    assert events[-2] == message_delta("tool_use", {
        "input_tokens": 472, "output_tokens": 89, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0})
    assert events[0][1]["message"]["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "body", "expected"), [
    (529, (b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
           b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}'), ("overloaded_error", "Overloaded")),
    (400, (b'{"type":"error","error":{"type":"invalid_request_error",'
           b'"message":"max_tokens: Field required"}}'),
     ("invalid_request_error", "max_tokens: Field required")),
    (413, b"<html><body>413 Request Entity Too Large</body></html>",
     ("request_too_large", "<html><body>413 Request Entity Too Large</body></html>")),
    (502, b"", ("api_error", "HTTP 502")),
    (418, b'{"error": "teapot"}', ("invalid_request_error", "teapot")),
    (429, b'{"error": {"message": "slow down"}}', ("rate_limit_error", "slow down")),
    (500, b"[1, 2]", ("api_error", "[1, 2]")),
])
def test_parse_anthropic_error(status: int, body: bytes, expected: tuple[str, str]) -> None:
    assert parse_anthropic_error(status, body) == expected


@pytest.mark.parametrize("usage", [{"prompt_tokens": "n/a", "completion_tokens": 1},
                                   {"prompt_tokens": 9, "completion_tokens": -4}])
def test_an_openai_streams_unreadable_usage_breaks_its_translation_as_it_comes(
        usage: dict[str, Any]) -> None:
    # As a passthrough stream's: an unreadable event once output has begun, the stream then
    # ends in an error event, and the usage read so far (none) is what is billed from, with
    # what was delivered; never an exception when the stream's usage is asked for at its end.
    codec = TranslatingCodec(OpenAIChunkSource(),
                             AnthropicEventSink(ChatStreamToMessages("claude-public")))
    events = [chunk({"role": "assistant", "content": "Hi"}), usage_chunk(usage)]
    out = codec.feed(b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events))
    assert b'"Hi"' in out
    assert codec.error is not None and codec.error.error_type == "bad_response"
    assert codec.usage is None
