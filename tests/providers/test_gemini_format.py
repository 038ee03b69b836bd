"""providers.gemini_format / gemini_stream: OpenAI chat <-> Gemini v1beta, without I/O.

Gemini payloads follow https://ai.google.dev/api/generate-content (camelCase proto JSON, an
omitted field means its default) and the SSE chunks of streamGenerateContent?alt=sse.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pytest

from providers import gemini_stream
from providers.gemini_format import (
    PLACEHOLDER_SIGNATURE,
    GeminiStreamToChat,
    TranslationError,
    UpstreamStreamError,
    chat_request_to_gemini,
    combine_embeddings,
    embeddings_batches,
    embeddings_request_to_gemini,
    fetches_urls,
    gemini_count_tokens_result,
    gemini_embeddings_to_openai,
    gemini_response_to_chat,
    messages_count_request_to_gemini,
    parse_gemini_error,
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "strict": True,
    "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                   "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}
SIGNATURE = "CiQBjz1rX6FzJ2mJ7bVq1yR1WbV0a7dBmhIuXf3+oTqvCkB7Ww0="
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gemini-pro", "messages": [{"role": "user", "content": "Hi"}], **fields}


def model_turn(*parts: dict[str, Any], finish: str | None = "STOP",
               index: int | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}}
    if finish:
        candidate["finishReason"] = finish
    if index is not None:
        candidate["index"] = index
    return candidate


def call_part(name: str, args: dict[str, Any], signature: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if signature:
        part["thoughtSignature"] = signature
    return part


# -- chat request ----------------------------------------------------------------------------

def test_multi_turn_conversation_with_tools_images_and_system() -> None:
    body = {
        "model": "gemini-pro", "stream": True, "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture, and the weather there?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                    "detail": "high"}}]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_b", "type": "function",
                 "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 22, "sky": "sunny"}'},
            {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
            {"role": "assistant", "content": "Sunny, 22C, 14:05."},
            {"role": "user", "content": "Thanks!"},
        ],
        "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "auto",
    }
    assert chat_request_to_gemini(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [
                {"text": "What is in this picture, and the weather there?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
            {"role": "model", "parts": [
                {"text": "Let me check."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                 "thoughtSignature": PLACEHOLDER_SIGNATURE},
                {"functionCall": {"name": "get_time", "args": {"tz": "Europe/Paris"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather",
                                      "response": {"temp_c": 22, "sky": "sunny"}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "14:05"}}}]},
            {"role": "model", "parts": [{"text": "Sunny, 22C, 14:05."}]},
            {"role": "user", "parts": [{"text": "Thanks!"}]},
        ],
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Current weather in a city",
             "parametersJsonSchema": {
                 "type": "object", "required": ["city"], "additionalProperties": False,
                 "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}},
            {"name": "get_time", "parametersJsonSchema": {
                "type": "object", "properties": {"tz": {"type": "string"}}}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
    }


def test_system_and_developer_messages_all_become_the_system_instruction() -> None:
    request = chat_request_to_gemini({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Rule two."}]})
    assert request["systemInstruction"] == {"parts": [{"text": "Rule one."}, {"text": "Rule two."}]}
    assert request["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]
    assert "generationConfig" not in request and "tools" not in request


def test_consecutive_same_role_messages_merge_and_empty_ones_vanish() -> None:
    request = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "First."}, {"role": "user", "content": "Second."},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "Third."}]})
    assert request["contents"] == [{"role": "user", "parts": [
        {"text": "First."}, {"text": "Second."}, {"text": "Third."}]}]


@pytest.mark.parametrize(("url", "mime"), [
    ("https://example.com/cat.PNG?size=large#top", "image/png"),
    ("https://example.com/photos/cat.webp", "image/webp"),
    ("http://example.com/scan.pdf", "application/pdf"),
    ("https://example.com/image?id=42", "image/jpeg"),
])
def test_http_image_urls_become_file_data_with_a_guessed_type(url: str, mime: str) -> None:
    request = chat_request_to_gemini(chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]))
    assert request["contents"][0]["parts"] == [{"fileData": {"mimeType": mime, "fileUri": url}}]


@pytest.mark.parametrize(("model", "fetches"), [
    ("gemini-2.0-flash", False), ("models/gemini-2.0-flash-lite-001", False),
    ("gemini-2.5-flash", True), ("gemini-3-pro-preview", True),
])
def test_only_the_gemini_20_models_do_not_fetch_urls(model: str, fetches: bool) -> None:
    assert fetches_urls(model) is fetches


def test_image_urls_for_a_model_that_does_not_fetch_them_are_refused_but_files_api_uris(
        ) -> None:
    def parts(url: str) -> list[dict[str, Any]]:
        return chat_request_to_gemini(chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]),
            fetches_urls=False)["contents"][0]["parts"]  # type: ignore[no-any-return]
    with pytest.raises(TranslationError, match="Gemini 2.0 models do not fetch images"):
        parts("https://example.com/cat.png")
    uri = "https://generativelanguage.googleapis.com/v1beta/files/abc-123"
    assert parts(uri) == [{"fileData": {"mimeType": "image/jpeg", "fileUri": uri}}]
    assert parts("data:image/png;base64,iVBO") == [
        {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}]


def test_audio_and_inline_files_become_inline_data() -> None:
    request = chat_request_to_gemini(chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"filename": "a.pdf",
                                  "file_data": "data:application/pdf;base64,JVBERi0="}},
        {"type": "file", "file": {"filename": "b.pdf", "file_data": "JVBERi0x"}}]}]))
    assert request["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0x"}}]


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
    {"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}},
    {"type": "file", "file": {"file_id": "file-abc123"}},
    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
])
def test_content_gemini_cannot_take_is_refused(part: dict[str, Any]) -> None:
    with pytest.raises(TranslationError):
        chat_request_to_gemini(chat(messages=[{"role": "user", "content": [part]}]))


def test_tool_results_text_parts_and_non_object_json_are_wrapped() -> None:
    request = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "list_files", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1",
         "content": [{"type": "text", "text": '["a.txt", '}, {"type": "text", "text": '"b"]'}]}]})
    assert request["contents"][1]["parts"][0]["functionCall"] == {"name": "list_files", "args": {}}
    assert request["contents"][2] == {"role": "user", "parts": [{"functionResponse": {
        "name": "list_files", "response": {"result": '["a.txt", "b"]'}}}]}


def test_legacy_function_role_message_names_its_function() -> None:
    request = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "Go"},
        {"role": "function", "name": "lookup", "content": '{"found": true}'}]})
    assert request["contents"][0]["parts"][1] == {
        "functionResponse": {"name": "lookup", "response": {"found": True}}}


def test_thought_signatures_come_back_and_only_the_first_call_gets_a_placeholder() -> None:
    request = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "assistant", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "a", "arguments": "{}"},
             "extra_content": {"google": {"thought_signature": SIGNATURE}}}]},
        {"role": "tool", "tool_call_id": "c3", "content": "3"}]})
    first_turn, second_turn = request["contents"][1]["parts"], request["contents"][3]["parts"]
    assert first_turn[0]["thoughtSignature"] == PLACEHOLDER_SIGNATURE
    assert "thoughtSignature" not in first_turn[1]
    assert second_turn == [{"functionCall": {"name": "a", "args": {}},
                            "thoughtSignature": SIGNATURE}]


def test_a_tool_call_and_signature_round_trip_through_the_chat_format() -> None:
    reply = gemini_response_to_chat({"responseId": "r1", "candidates": [model_turn(
        call_part("get_weather", {"city": "Paris"}, SIGNATURE))]}, "pub")
    message = reply["choices"][0]["message"]
    request = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "Weather?"}, message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}]})
    assert request["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                      "args": {"city": "Paris"}},
                                     "thoughtSignature": SIGNATURE}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                         "response": {"result": "sunny"}}}]}]


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "tool_call_id": "call_nobody_made", "content": "x"}],
    [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}],
    [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1, 2]"}}]}],
    [{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {
        "name": "f", "input": "x"}}]}],
    [{"role": "critic", "content": "x"}],
    [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y"}}]}],
])
def test_message_shapes_gemini_cannot_express_are_refused(messages: list[Any]) -> None:
    with pytest.raises(TranslationError):
        chat_request_to_gemini({"messages": [{"role": "user", "content": "Hi"}, *messages]})


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_time"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
])
def test_tool_choice_modes(choice: Any, config: dict[str, Any]) -> None:
    request = chat_request_to_gemini(chat(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice))
    assert request["toolConfig"] == {"functionCallingConfig": config}
    assert len(request["tools"][0]["functionDeclarations"]) == 2


def test_no_tool_choice_leaves_the_default_and_no_tools_means_no_tool_config() -> None:
    assert "toolConfig" not in chat_request_to_gemini(chat(tools=[WEATHER_TOOL]))
    assert "toolConfig" not in chat_request_to_gemini(chat(tool_choice="required"))


@pytest.mark.parametrize(("mode", "config"), [
    ("required", {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
    ("auto", {"mode": "AUTO"}),
])
def test_allowed_tools_keeps_only_the_named_declarations(mode: str,
                                                         config: dict[str, Any]) -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {
        "mode": mode, "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    request = chat_request_to_gemini(chat(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice))
    assert request["toolConfig"] == {"functionCallingConfig": config}
    assert [d["name"] for d in request["tools"][0]["functionDeclarations"]] == ["get_time"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "tools"),
    ({"functions": [WEATHER_TOOL["function"]], "function_call": "auto"}, None),  # (two fields)
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, None),
    ({"response_format": {"type": "grammar", "grammar": "root ::= 'a'"}}, "response_format"),
    ({"stop": ["1", "2", "3", "4", "5", "6"]}, "stop"),  # stopSequences takes up to 5
])
def test_requests_gemini_cannot_express_are_refused_naming_the_field(
        fields: dict[str, Any], param: str | None) -> None:
    with pytest.raises(TranslationError) as refused:
        chat_request_to_gemini(chat(**fields))
    assert refused.value.param == param


def test_a_function_without_parameters_declares_none() -> None:
    tool = {"type": "function", "function": {"name": "ping", "parameters": {}}}
    assert chat_request_to_gemini(chat(tools=[tool]))["tools"] == [
        {"functionDeclarations": [{"name": "ping"}]}]


def test_generation_config_from_sampling_fields() -> None:
    request = chat_request_to_gemini(chat(
        temperature=0.3, top_p=0.9, max_tokens=50, max_completion_tokens=200, stop=["END", "##"],
        n=2, seed=42, presence_penalty=0.5, frequency_penalty=0, logprobs=True, top_logprobs=3,
        logit_bias={"1234": -100}, parallel_tool_calls=False, user="u-1", reasoning_effort="low"))
    assert request["generationConfig"] == {
        "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 200, "stopSequences": ["END", "##"],
        "candidateCount": 2, "seed": 42, "presencePenalty": 0.5, "responseLogprobs": True,
        "logprobs": 3}


@pytest.mark.parametrize("model, effort, thinking", [
    # Gemini 3 and later: a level (Pro: low or high; thinking cannot be turned off)
    ("gemini-3-pro-preview", "medium", {"thinkingLevel": "high"}),
    ("gemini-3-pro-preview", "none", {"thinkingLevel": "low"}),
    ("models/gemini-3-flash-preview", "medium", {"thinkingLevel": "medium"}),
    ("gemini-3.5-flash", "none", {"thinkingLevel": "minimal"}),
    ("gemini-3-flash-preview", "xhigh", {"thinkingLevel": "high"}),
    # Gemini 2.5: a budget (Pro's least is 128, its most 32768)
    ("gemini-2.5-flash", "none", {"thinkingBudget": 0}),
    ("gemini-2.5-flash-lite", "minimal", {"thinkingBudget": 512}),
    ("gemini-2.5-flash", "medium", {"thinkingBudget": 8192}),
    ("gemini-2.5-pro", "none", {"thinkingBudget": 128}),
    ("gemini-2.5-pro", "xhigh", {"thinkingBudget": 32768}),
    ("gemini-2.5-pro", "high", {"thinkingBudget": 24576}),
    # no thinking to control
    ("gemini-2.0-flash", "high", None),
    ("gemma-3-27b-it", "high", None),
])
def test_reasoning_effort_becomes_a_thinking_config(model: str, effort: str,
                                                    thinking: Any) -> None:
    request = chat_request_to_gemini(chat(reasoning_effort=effort, temperature=0.2),
                                     model=model)
    assert request["generationConfig"].get("thinkingConfig") == thinking
    assert request["generationConfig"]["temperature"] == 0.2


@pytest.mark.parametrize("effort", ["maximum", "High", 2, ["low"]])
def test_an_unknown_reasoning_effort_is_refused_for_gemini(effort: Any) -> None:
    with pytest.raises(TranslationError) as refused:
        chat_request_to_gemini(chat(reasoning_effort=effort), model="gemini-2.5-flash")
    assert refused.value.param == "reasoning_effort"


def test_generation_config_single_stop_string_and_defaults() -> None:
    config = chat_request_to_gemini(chat(stop="END", max_tokens=10, n=1))["generationConfig"]
    assert config == {"stopSequences": ["END"], "maxOutputTokens": 10}


@pytest.mark.parametrize(("response_format", "config"), [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
            "$ref": "#/$defs/tag"}}},
        "$defs": {"tag": {"type": "string"}}, "required": ["name"],
        "additionalProperties": False}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {
         "type": "object",
         "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
             "$ref": "#/$defs/tag"}}},
         "$defs": {"tag": {"type": "string"}}, "required": ["name"],
         "additionalProperties": False}}),
])
def test_response_format(response_format: dict[str, Any], config: dict[str, Any] | None) -> None:
    request = chat_request_to_gemini(chat(response_format=response_format))
    assert request.get("generationConfig") == config


# -- chat response ---------------------------------------------------------------------------

def test_text_response_with_thoughts_and_cached_tokens() -> None:
    response = {
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"text": "The user wants a greeting...", "thought": True},
                {"text": "Hello"}, {"text": " there!"}]},
            "finishReason": "STOP", "index": 0, "avgLogprobs": -0.21,
            "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT",
                               "probability": "NEGLIGIBLE"}]}],
        "usageMetadata": {"promptTokenCount": 1200, "candidatesTokenCount": 3,
                          "totalTokenCount": 1251, "thoughtsTokenCount": 48,
                          "cachedContentTokenCount": 1024,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}]},
        "modelVersion": "gemini-2.5-flash", "responseId": "Y9u8aO-QJ4ak1dkP0YfuoQs",
    }
    reply = gemini_response_to_chat(response, "my-gemini")
    assert isinstance(reply.pop("created"), int)
    assert reply == {
        "id": "chatcmpl-Y9u8aO-QJ4ak1dkP0YfuoQs", "object": "chat.completion",
        "model": "my-gemini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 51, "total_tokens": 1251,
                  "prompt_tokens_details": {"cached_tokens": 1024},
                  "completion_tokens_details": {"reasoning_tokens": 48}},
    }


def test_function_calls_become_tool_calls_with_stable_ids() -> None:
    response = {"responseId": "resp-1", "candidates": [model_turn(
        {"text": "Checking both."},
        call_part("get_weather", {"city": "Paris", "unit": "C"}, SIGNATURE),
        call_part("get_time", {"tz": "Europe/Paris"}))],
        "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 18,
                          "totalTokenCount": 58}}
    reply = gemini_response_to_chat(response, "pub")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking both."
    first, second = choice["message"]["tool_calls"]
    assert CALL_ID.match(first["id"]) and CALL_ID.match(second["id"]) and first["id"] != second["id"]
    assert first == {"id": first["id"], "type": "function",
                     "function": {"name": "get_weather",
                                  "arguments": '{"city":"Paris","unit":"C"}'},
                     "extra_content": {"google": {"thought_signature": SIGNATURE}}}
    assert second == {"id": second["id"], "type": "function",
                      "function": {"name": "get_time", "arguments": '{"tz":"Europe/Paris"}'}}
    assert gemini_response_to_chat(response, "pub")["choices"][0]["message"]["tool_calls"][0][
        "id"] == first["id"]
    other = gemini_response_to_chat({**response, "responseId": "resp-2"}, "pub")
    assert other["choices"][0]["message"]["tool_calls"][0]["id"] != first["id"]
    assert reply["usage"]["completion_tokens"] == 18 and reply["usage"]["total_tokens"] == 58


def test_a_call_without_args_has_empty_object_arguments() -> None:
    reply = gemini_response_to_chat({"candidates": [model_turn(
        {"functionCall": {"name": "ping"}})]}, "pub")
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert reply["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(("reason", "with_call", "expected"), [
    ("STOP", False, "stop"), ("STOP", True, "tool_calls"), (None, True, "tool_calls"),
    ("MAX_TOKENS", False, "length"), ("MAX_TOKENS", True, "length"),
    ("SAFETY", False, "content_filter"), ("RECITATION", False, "content_filter"),
    ("BLOCKLIST", False, "content_filter"), ("PROHIBITED_CONTENT", False, "content_filter"),
    ("SPII", False, "content_filter"), ("IMAGE_SAFETY", False, "content_filter"),
    ("LANGUAGE", False, "stop"), ("OTHER", False, "stop"),
    ("MALFORMED_FUNCTION_CALL", False, "stop"), ("FINISH_REASON_UNSPECIFIED", False, "stop"),
])
def test_finish_reasons(reason: str | None, with_call: bool, expected: str) -> None:
    parts = [call_part("f", {})] if with_call else [{"text": "partial"}]
    reply = gemini_response_to_chat({"candidates": [model_turn(*parts, finish=reason)]}, "pub")
    assert reply["choices"][0]["finish_reason"] == expected


def test_one_choice_per_candidate() -> None:
    reply = gemini_response_to_chat({"candidates": [
        model_turn({"text": "Red."}, index=0), model_turn({"text": "Blue."}, finish="MAX_TOKENS",
                                                          index=1)]}, "pub")
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in reply["choices"]] == [(0, "Red.", "stop"), (1, "Blue.", "length")]


def test_a_prompt_blocked_before_generation() -> None:
    reply = gemini_response_to_chat({
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": "gemini-2.5-flash", "responseId": "blk"}, "pub")
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": None,
                                                         "refusal": None},
                                 "logprobs": None, "finish_reason": "content_filter"}]
    assert reply["usage"]["prompt_tokens"] == 9 and reply["usage"]["completion_tokens"] == 0


def test_without_response_id_or_usage() -> None:
    reply = gemini_response_to_chat({"candidates": [model_turn({"text": "ok"})]}, "pub")
    assert reply["id"].startswith("chatcmpl-") and len(reply["id"]) > len("chatcmpl-")
    assert "usage" not in reply


def test_tool_use_prompt_tokens_count_as_input() -> None:
    usage = gemini_stream.chat_usage({"promptTokenCount": 10, "toolUsePromptTokenCount": 5,
                                      "candidatesTokenCount": 2})
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (15, 2, 17)


def test_logprobs_result() -> None:
    candidate = model_turn({"text": "Hi!"})
    candidate["logprobsResult"] = {
        "topCandidates": [
            {"candidates": [{"token": "Hi", "tokenId": 5, "logProbability": -0.1},
                            {"token": "Hey", "tokenId": 7, "logProbability": -2.5}]},
            {"candidates": [{"token": "!", "tokenId": 9, "logProbability": -0.01}]}],
        "chosenCandidates": [{"token": "Hi", "tokenId": 5, "logProbability": -0.1},
                             {"token": "!", "tokenId": 9}]}
    logprobs = gemini_response_to_chat({"candidates": [candidate]}, "pub")["choices"][0][
        "logprobs"]
    assert logprobs == {"refusal": None, "content": [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
            {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}]},
        {"token": "!", "logprob": 0.0, "bytes": [33], "top_logprobs": [
            {"token": "!", "logprob": -0.01, "bytes": [33]}]}]}


# -- stream ----------------------------------------------------------------------------------

def usage_metadata(prompt: int, output: int, **extra: int) -> dict[str, Any]:
    return {"promptTokenCount": prompt, "candidatesTokenCount": output,
            "totalTokenCount": prompt + output + sum(extra.values()), **extra}


def stream(translator: GeminiStreamToChat, *payloads: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = [chunk for payload in payloads for chunk in translator.feed(payload)]
    return chunks + translator.finish()


def deltas(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
            if c["choices"] else ("usage", c["usage"]) for c in chunks]


def test_streamed_text_in_several_chunks_with_usage() -> None:
    translator = GeminiStreamToChat("my-gemini", include_usage=True)
    chunks = stream(
        translator,
        {"candidates": [model_turn({"text": "The capital"}, finish=None)],
         "usageMetadata": usage_metadata(9, 2), "modelVersion": "gemini-2.5-flash",
         "responseId": "sse-1"},
        {"candidates": [model_turn({"text": " of France"}, finish=None)],
         "usageMetadata": usage_metadata(9, 5), "responseId": "sse-1"},
        {"candidates": [model_turn({"text": " is Paris."}, finish="STOP")],
         "usageMetadata": usage_metadata(9, 8, thoughtsTokenCount=20,
                                         cachedContentTokenCount=4),
         "responseId": "sse-1"})
    final_usage = {"prompt_tokens": 9, "completion_tokens": 28, "total_tokens": 37,
                   "prompt_tokens_details": {"cached_tokens": 4},
                   "completion_tokens_details": {"reasoning_tokens": 20}}
    assert deltas(chunks) == [
        (0, {"role": "assistant", "content": ""}, None), (0, {"content": "The capital"}, None),
        (0, {"content": " of France"}, None), (0, {"content": " is Paris."}, None),
        (0, {}, "stop"), ("usage", final_usage)]
    assert {c["id"] for c in chunks} == {"chatcmpl-sse-1"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"my-gemini"}
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert translator.usage == final_usage


def test_stream_without_usage_requested_has_no_usage_anywhere() -> None:
    translator = GeminiStreamToChat("pub", include_usage=False)
    chunks = stream(translator, {"candidates": [model_turn({"text": "Hi"})],
                                 "usageMetadata": usage_metadata(3, 1)})
    assert deltas(chunks) == [(0, {"role": "assistant", "content": ""}, None),
                              (0, {"content": "Hi"}, None), (0, {}, "stop")]
    assert all("usage" not in c for c in chunks)
    assert translator.usage is not None and translator.usage["total_tokens"] == 4


def test_streamed_function_calls_arrive_whole() -> None:
    translator = GeminiStreamToChat("pub", include_usage=True)
    chunks = stream(
        translator,
        {"candidates": [model_turn(call_part("get_weather", {"city": "Paris"}, SIGNATURE),
                                   finish=None)], "responseId": "fc"},
        {"candidates": [model_turn(call_part("get_time", {"tz": "UTC"}), finish="STOP")],
         "usageMetadata": usage_metadata(30, 12), "responseId": "fc"})
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks[1:3]]
    assert calls == [
        [{"index": 0, "id": calls[0][0]["id"], "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
          "extra_content": {"google": {"thought_signature": SIGNATURE}}}],
        [{"index": 1, "id": calls[1][0]["id"], "type": "function",
          "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}]]
    assert CALL_ID.match(calls[0][0]["id"]) and calls[0][0]["id"] != calls[1][0]["id"]
    assert deltas(chunks)[3] == (0, {}, "tool_calls")
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_stream_and_non_stream_give_a_call_the_same_id() -> None:
    part = call_part("get_weather", {"city": "Paris"})
    whole = gemini_response_to_chat({"responseId": "same", "candidates": [model_turn(part)]}, "p")
    chunks = GeminiStreamToChat("p", False).feed({"responseId": "same",
                                                  "candidates": [model_turn(part)]})
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["id"] == \
        whole["choices"][0]["message"]["tool_calls"][0]["id"]


def test_finish_closes_a_stream_that_ended_without_a_finish_reason() -> None:
    translator = GeminiStreamToChat("pub", include_usage=False)
    chunks = stream(translator, {"candidates": [model_turn(call_part("f", {}), finish=None)]})
    assert deltas(chunks)[-1] == (0, {}, "tool_calls")
    assert translator.finish() == []


def test_the_stream_has_ended_once_every_candidate_has_its_finish_reason() -> None:
    translator = GeminiStreamToChat("pub", include_usage=False)
    assert not translator.ended
    translator.feed({"candidates": [model_turn({"text": "A"}, finish=None),
                                    model_turn({"text": "B"}, finish=None, index=1)]})
    translator.feed({"candidates": [model_turn({"text": "!"}, index=1)]})
    assert not translator.ended  # candidate 0 was cut short
    translator.feed({"candidates": [model_turn({"text": "?"})]})
    assert translator.ended
    blocked = GeminiStreamToChat("pub", include_usage=False)
    blocked.feed({"promptFeedback": {"blockReason": "SAFETY"}})
    assert blocked.ended


def test_finish_on_an_empty_stream_still_makes_a_valid_reply() -> None:
    chunks = GeminiStreamToChat("pub", include_usage=True).finish()
    assert deltas(chunks) == [(0, {"role": "assistant", "content": ""}, None), (0, {}, "stop")]
    assert chunks[0]["id"] == chunks[1]["id"]


def test_stream_skips_thoughts_and_maps_max_tokens() -> None:
    chunks = stream(GeminiStreamToChat("pub", include_usage=False),
                    {"candidates": [model_turn({"text": "Pondering", "thought": True},
                                               finish=None)]},
                    {"candidates": [model_turn({"text": "Answer"}, {"text": "",
                                               "thoughtSignature": SIGNATURE},
                                               finish="MAX_TOKENS")]})
    assert deltas(chunks) == [(0, {"role": "assistant", "content": ""}, None),
                              (0, {"content": "Answer"}, None), (0, {}, "length")]


def test_stream_of_a_blocked_prompt() -> None:
    translator = GeminiStreamToChat("pub", include_usage=True)
    chunks = stream(translator, {"promptFeedback": {"blockReason": "SAFETY"},
                                 "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}})
    assert deltas(chunks)[:2] == [(0, {"role": "assistant", "content": ""}, None),
                                  (0, {}, "content_filter")]
    assert chunks[-1]["usage"]["prompt_tokens"] == 7 and len(chunks) == 3


def test_stream_of_a_safety_stop_mid_answer() -> None:
    chunks = stream(GeminiStreamToChat("pub", include_usage=False),
                    {"candidates": [model_turn({"text": "Well"}, finish=None)]},
                    {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                         "blocked": True}]}]})
    assert deltas(chunks)[-1] == (0, {}, "content_filter")


def test_stream_with_two_candidates() -> None:
    chunks = stream(GeminiStreamToChat("pub", include_usage=False),
                    {"candidates": [model_turn({"text": "A"}, finish=None),
                                    model_turn({"text": "B"}, finish=None, index=1)]},
                    {"candidates": [model_turn({"text": "!"}, index=1)]},
                    {"candidates": [model_turn({"text": "?"})]})
    assert deltas(chunks) == [
        (0, {"role": "assistant", "content": ""}, None), (0, {"content": "A"}, None),
        (1, {"role": "assistant", "content": ""}, None), (1, {"content": "B"}, None),
        (1, {"content": "!"}, None), (1, {}, "stop"),
        (0, {"content": "?"}, None), (0, {}, "stop")]


def test_stream_logprobs_ride_on_the_text_chunk() -> None:
    candidate = model_turn({"text": "Hi"}, finish=None)
    candidate["logprobsResult"] = {"chosenCandidates": [{"token": "Hi", "logProbability": -0.5}],
                                   "topCandidates": [{"candidates": []}]}
    chunks = GeminiStreamToChat("pub", False).feed({"candidates": [candidate]})
    assert chunks[1]["choices"][0]["logprobs"] == {"refusal": None, "content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]}


def test_an_error_inside_the_stream_raises() -> None:
    translator = GeminiStreamToChat("pub", include_usage=True)
    translator.feed({"candidates": [model_turn({"text": "Par"}, finish=None)]})
    with pytest.raises(UpstreamStreamError) as caught:
        translator.feed({"error": {"code": 503, "message": "The model is overloaded.",
                                   "status": "UNAVAILABLE"}})
    assert (caught.value.error_type, caught.value.message) == ("UNAVAILABLE",
                                                               "The model is overloaded.")


def test_the_stream_names_are_re_exported() -> None:
    from providers import gemini_format
    assert gemini_format.GeminiStreamToChat is gemini_stream.GeminiStreamToChat
    assert gemini_format.UpstreamStreamError is gemini_stream.UpstreamStreamError


# -- embeddings, token counting, errors ------------------------------------------------------

def test_embeddings_request() -> None:
    body = {"model": "embed", "input": ["first text", "second text"], "dimensions": 256,
            "encoding_format": "float", "user": "u"}
    assert embeddings_request_to_gemini(body, "gemini-embedding-001") == {"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "first text"}]},
         "outputDimensionality": 256},
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "second text"}]},
         "outputDimensionality": 256}]}
    assert embeddings_request_to_gemini({"input": "one"}, "models/text-embedding-004") == {
        "requests": [{"model": "models/text-embedding-004",
                      "content": {"parts": [{"text": "one"}]}}]}


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]], [], None, 5])
def test_embeddings_input_gemini_cannot_take(value: Any) -> None:
    with pytest.raises(TranslationError) as refused:
        embeddings_request_to_gemini({"input": value}, "gemini-embedding-001")
    assert refused.value.param == "input"


def test_embeddings_in_batches_of_at_most_100_and_their_answers_as_one() -> None:
    request = embeddings_request_to_gemini({"input": [f"t{n}" for n in range(201)]}, "e")
    batches = embeddings_batches(request)
    assert [len(batch["requests"]) for batch in batches] == [100, 100, 1]
    assert [r for batch in batches for r in batch["requests"]] == request["requests"]
    assert embeddings_batches({"requests": request["requests"][:100]}) == [
        {"requests": request["requests"][:100]}]
    answers = [{"embeddings": [{"values": [float(n)]} for n in range(at, at + len(b["requests"]))]}
               for at, b in zip((0, 100, 200), batches, strict=True)]
    assert combine_embeddings(answers) == {"embeddings": [{"values": [float(n)]}
                                                          for n in range(201)]}


def test_embeddings_response() -> None:
    response = {"embeddings": [{"values": [0.013, -0.008, 0.25]}, {"values": [0.5, 0.0, -1.0]}]}
    assert gemini_embeddings_to_openai(response, "my-embed", 6) == {
        "object": "list", "model": "my-embed",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.013, -0.008, 0.25]},
                 {"object": "embedding", "index": 1, "embedding": [0.5, 0.0, -1.0]}],
        "usage": {"prompt_tokens": 6, "total_tokens": 6}}


def test_count_tokens_request_carries_system_and_tools() -> None:
    request = chat_request_to_gemini(chat(messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"}],
                                          tools=[TIME_TOOL], max_tokens=100))
    body = messages_count_request_to_gemini({**request, "model": "models/gemini-2.5-flash"})
    assert body == {"generateContentRequest": {
        "model": "models/gemini-2.5-flash", "contents": request["contents"],
        "systemInstruction": {"parts": [{"text": "Be brief."}]}, "tools": request["tools"]}}
    with pytest.raises(TranslationError):
        messages_count_request_to_gemini(request)


def test_count_tokens_result() -> None:
    assert gemini_count_tokens_result({"totalTokens": 31, "promptTokensDetails": [
        {"modality": "TEXT", "tokenCount": 31}]}) == 31
    assert gemini_count_tokens_result({}) == 0


@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, json.dumps({"error": {
        "code": 429, "status": "RESOURCE_EXHAUSTED",
        "message": "You exceeded your current quota, please check your plan.",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                     "retryDelay": "21s"}]}}).encode(),
     ("RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan.")),
    (400, json.dumps([{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                 "message": "Request contains an invalid argument."}}]).encode(),
     ("INVALID_ARGUMENT", "Request contains an invalid argument.")),
    (404, json.dumps({"error": {"code": 404, "message": "models/gemini-9 is not found"}}).encode(),
     ("NOT_FOUND", "models/gemini-9 is not found")),
    (502, b"<html><body>502 Bad Gateway</body></html>",
     ("UNKNOWN", "<html><body>502 Bad Gateway</body></html>")),
    (503, b"", ("UNAVAILABLE", "HTTP 503")),
    (500, b'{"unexpected": true}', ("INTERNAL", '{"unexpected": true}')),
])
def test_parse_gemini_error(status: int, body: bytes, expected: tuple[str, str]) -> None:
    assert parse_gemini_error(status, body) == expected
