"""The mock providers, driven by the official SDKs (OpenAI, Azure, Anthropic) and raw httpx
(Gemini): shapes, deterministic content, tool calls, usage and headers."""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.mock_providers import MockProviderServer

QUESTION = "What is the capital of France"  # 6 words
REPLY = "Mock reply to: " + QUESTION  # 9 words
WEATHER = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "tags": {"type": "array"}, "ratio": {"type": "number"}, "extra": {"type": "object"}}}
WEATHER_ARGS = {"city": "test", "days": 1, "metric": True, "tags": [], "ratio": 1.5, "extra": {}}
OPENAI_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def srv() -> Iterator[MockProviderServer]:
    with MockProviderServer() as server:
        yield server


@pytest.fixture
def oai(srv: MockProviderServer) -> openai.OpenAI:
    srv.reset_log()
    return openai.OpenAI(base_url=srv.base_url("openai"), api_key="sk-test", max_retries=0)


@pytest.fixture
def claude(srv: MockProviderServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base_url("anthropic"), api_key="sk-ant-test",
                               max_retries=0)


def gemini(srv: MockProviderServer, target: str, body: dict[str, Any], query: str = "",
           key: str = "g-key") -> httpx.Response:
    return httpx.post(f"{srv.base_url('gemini')}/v1beta/models/{target}{query}", json=body,
                      headers={"x-goog-api-key": key} if key else {})


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        name = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
                events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


# -- OpenAI -----------------------------------------------------------------------------------

def test_openai_chat_reply_usage_and_headers(oai: openai.OpenAI, srv: MockProviderServer) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": "Be brief"},
                                       {"role": "user", "content": QUESTION}])
    reply = raw.parse()
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2 + 6 + 3 * 2, 9)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
    logged = srv.requests[-1]
    assert (logged["provider"], logged["path"]) == ("openai", "/openai/v1/chat/completions")
    assert logged["headers"]["authorization"] == "Bearer sk-test"
    assert logged["json"]["messages"][1]["content"] == QUESTION


def test_openai_stream_usage_only_when_asked(oai: openai.OpenAI, srv: MockProviderServer) -> None:
    question: list[Any] = [{"role": "user", "content": QUESTION}]
    chunks = list(oai.chat.completions.create(model="m", messages=question, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9
    raw = httpx.post(srv.base_url("openai") + "/chat/completions", headers={
        "authorization": "Bearer k"}, json={"model": "m", "messages": question, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [data for _, data in sse_events(raw.text)]
    assert events[-1] == "[DONE]"
    assert all("usage" not in e and e["choices"] for e in events[:-1])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "stop"
    assert len(events) == 1 + math.ceil(len(REPLY) / 8) + 1 + 1  # role, pieces, finish, DONE


def test_openai_tool_call_streamed_and_round_trip(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris"}]
    stream = oai.chat.completions.create(model="m", messages=messages, tools=OPENAI_TOOLS,
                                         stream=True)
    arguments, names, finish = "", [], None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or ():
            assert call.index == 0
            arguments += call.function.arguments or ""  # type: ignore[union-attr]
            names += [call.function.name] if call.function and call.function.name else []
        finish = chunk.choices[0].finish_reason or finish
    assert (names, json.loads(arguments), finish) == (["get_weather"], WEATHER_ARGS, "tool_calls")
    first = oai.chat.completions.create(model="m", messages=messages, tools=OPENAI_TOOLS)
    made: Any = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert made.id.startswith("call_") and first.choices[0].message.content is None
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": made.id, "content": "sunny and 22C"}]
    second = oai.chat.completions.create(model="m", messages=messages, tools=OPENAI_TOOLS)
    assert second.choices[0].message.content == "Tool result received: sunny and 22C"


def test_openai_tool_choice_forced_and_none(oai: openai.OpenAI) -> None:
    question: list[Any] = [{"role": "user", "content": "What time is it"}]
    forced = oai.chat.completions.create(model="m", messages=question, tools=OPENAI_TOOLS,
                                         tool_choice={"type": "function",
                                                      "function": {"name": "get_time"}})
    call: Any = forced.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"tz": "test"})
    assert forced.choices[0].finish_reason == "stop"  # the real API's answer to a forced call
    plain = oai.chat.completions.create(model="m", messages=question, tools=OPENAI_TOOLS,
                                        tool_choice="none")
    assert plain.choices[0].message.content == "Mock reply to: What time is it"


def test_openai_n_logprobs_truncation_and_images(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="m", n=2, logprobs=True, top_logprobs=2,
                                        messages=[{"role": "user", "content": QUESTION}])
    assert [c.index for c in reply.choices] == [0, 1]
    tokens: Any = reply.choices[1].logprobs.content  # type: ignore[union-attr]
    assert "".join(t.token for t in tokens) == REPLY and len(tokens[0].top_logprobs) == 2
    assert reply.usage.completion_tokens == 18  # type: ignore[union-attr]
    texts = ["", ""]
    for chunk in oai.chat.completions.create(model="m", n=2, stream=True,
                                             messages=[{"role": "user", "content": QUESTION}]):
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == [REPLY, REPLY]
    short = oai.chat.completions.create(model="m", max_completion_tokens=3,
                                        messages=[{"role": "user", "content": QUESTION}])
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == \
        ("Mock reply to:", "length")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts: list[Any] = [{"type": "text", "text": "Compare"}, image, image]
    seen = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}])
    assert seen.choices[0].message.content == "Mock reply to: Compare [2 images]"


def test_openai_embeddings_base64_float_and_dimensions(oai: openai.OpenAI) -> None:
    default = oai.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    floats = oai.embeddings.create(model="text-embedding-3-small", input="one",
                                   encoding_format="float")
    first = default.data[0].embedding
    assert len(first) == 8 and abs(sum(x * x for x in first) - 1) < 1e-5
    assert first == floats.data[0].embedding and first != default.data[1].embedding
    wide = oai.embeddings.create(model="text-embedding-3-small", input="one", dimensions=32)
    assert len(wide.data[0].embedding) == 32 and default.usage.prompt_tokens == 2


def test_openai_legacy_completions_and_models(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert done.choices[0].text == "Mock reply to: Say hi" and done.object == "text_completion"
    pieces = list(oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi",
                                         stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "stop"
    long = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="word " * 30)
    assert long.choices[0].finish_reason == "length"  # legacy max_tokens defaults to 16
    assert "gpt-4o-mini" in [model.id for model in oai.models.list()]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_openai_more_than_four_stop_sequences_are_a_400(oai: openai.OpenAI,
                                                        endpoint: str) -> None:
    """Chat and legacy completions both take "up to 4 sequences" (the API reference)."""
    stops = ["one", "two", "three", "four", "five"]
    with pytest.raises(openai.BadRequestError) as refused:
        if endpoint == "chat":
            oai.chat.completions.create(model="m", stop=stops,
                                        messages=[{"role": "user", "content": "Hi"}])
        else:
            oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi", stop=stops)
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "Invalid 'stop': array too long. Expected an array with maximum length 4, "
                   "but got an array with length 5 instead.",
        "type": "invalid_request_error", "param": "stop", "code": "array_above_max_length"}


def test_openai_responses_json_and_event_sequence(oai: openai.OpenAI,
                                                  srv: MockProviderServer) -> None:
    response = oai.responses.create(model="gpt-4o-mini", input="Say hi")
    assert response.output_text == "Mock reply to: Say hi" and response.status == "completed"
    assert response.usage is not None and response.usage.output_tokens == 5
    with oai.responses.stream(model="gpt-4o-mini", input="Say hi") as events:
        assert events.get_final_response().output_text == "Mock reply to: Say hi"
    raw = httpx.post(srv.base_url("openai") + "/responses", headers={"authorization": "Bearer k"},
                     json={"model": "m", "input": "Say hi", "stream": True})
    names = [name for name, _ in sse_events(raw.text)]
    assert names[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    numbers = [data["sequence_number"] for _, data in sse_events(raw.text)]
    assert numbers == list(range(len(names)))
    tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    tool = oai.responses.create(model="m", input="Weather?", tools=tools)
    assert tool.output[0].type == "function_call"
    assert json.loads(tool.output[0].arguments) == WEATHER_ARGS


def test_openai_responses_previous_response_id_is_found_only_by_the_key_that_made_it(
        srv: MockProviderServer) -> None:
    url = srv.base_url("openai")
    mine = openai.OpenAI(base_url=url, api_key="sk-mine", max_retries=0)
    other = openai.OpenAI(base_url=url, api_key="sk-other", max_retries=0)
    first = mine.responses.create(model="m", input="Say hi")
    assert mine.responses.create(model="m", input="And again",
                                 previous_response_id=first.id).previous_response_id == first.id
    with mine.responses.stream(model="m", input="Say hi") as events:
        streamed = events.get_final_response().id
    assert mine.responses.create(model="m", input="Go on", previous_response_id=streamed).output
    unstored = mine.responses.create(model="m", input="Say hi", store=False)
    for client, previous in [(other, first.id), (mine, unstored.id), (mine, "resp_unknown")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="m", input="Go on", previous_response_id=previous)
        assert refused.value.status_code == 400
        assert refused.value.body == {
            "message": f"Previous response with id '{previous}' not found.",
            "type": "invalid_request_error", "param": "previous_response_id",
            "code": "previous_response_not_found"}


def test_azure_sdk_chat_embeddings_and_api_version(srv: MockProviderServer) -> None:
    azure = openai.AzureOpenAI(azure_endpoint=srv.base_url("azure"), api_key="azure-key",
                               api_version="2024-10-21", max_retries=0)
    reply = azure.chat.completions.create(model="my-deployment",
                                          messages=[{"role": "user", "content": QUESTION}])
    assert reply.choices[0].message.content == REPLY
    logged = srv.requests[-1]
    assert logged["path"] == "/azure/openai/deployments/my-deployment/chat/completions"
    assert (logged["headers"]["api-key"], logged["query"]) == ("azure-key",
                                                               {"api-version": "2024-10-21"})
    vectors = azure.embeddings.create(model="my-embedder", input="one")
    assert len(vectors.data[0].embedding) == 8
    missing = httpx.post(srv.base_url("azure") + "/openai/deployments/d/chat/completions",
                         headers={"api-key": "k"}, json={"messages": []})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "404", "message": "Resource not found"}}


def test_azure_models_list_checks_key_and_api_version(srv: MockProviderServer) -> None:
    azure = openai.AzureOpenAI(azure_endpoint=srv.base_url("azure"), api_key="azure-key",
                               api_version="2024-10-21", max_retries=0)
    listed = azure.models.list()
    assert "gpt-4o-mini" in [model.id for model in listed]
    logged = srv.requests[-1]
    assert (logged["method"], logged["path"], logged["query"]) == (
        "GET", "/azure/openai/models", {"api-version": "2024-10-21"})
    first = httpx.get(srv.base_url("azure") + "/openai/models?api-version=2024-10-21",
                      headers={"api-key": "k"}).json()
    assert first["object"] == "list"
    assert {"status", "capabilities", "lifecycle_status", "id", "created_at", "object"} <= \
        set(first["data"][0])
    no_key = httpx.get(srv.base_url("azure") + "/openai/models?api-version=2024-10-21")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "401"
    no_version = httpx.get(srv.base_url("azure") + "/openai/models", headers={"api-key": "k"})
    assert no_version.status_code == 404


# -- Anthropic --------------------------------------------------------------------------------

def test_anthropic_message_usage_and_headers(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=100, system="Be brief",
        messages=[{"role": "user", "content": QUESTION}])
    message = raw.parse()
    assert message.content[0].text == REPLY  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.id.startswith("msg_")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2 + 6 + 3, 9)
    assert message.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    short = claude.messages.create(model="c", max_tokens=2,
                                   messages=[{"role": "user", "content": QUESTION}])
    assert (short.content[0].text, short.stop_reason) == ("Mock reply", "max_tokens")  # type: ignore[union-attr]


def test_anthropic_prompt_cache_writes_a_marked_prefix_then_reads_it(
        claude: anthropic.Anthropic) -> None:
    def usage(text: str, **control: str) -> tuple[int, int, int, int]:
        system = [{"type": "text", "text": text,
                   "cache_control": {"type": "ephemeral", **control}}]
        got = claude.messages.create(model="claude-haiku-4-5", max_tokens=5, system=system,  # type: ignore[arg-type]
                                     messages=[{"role": "user", "content": QUESTION}]).usage
        assert got.cache_creation is not None
        return (got.input_tokens, got.cache_read_input_tokens or 0,
                got.cache_creation.ephemeral_5m_input_tokens,
                got.cache_creation.ephemeral_1h_input_tokens)

    prefix = uuid.uuid4().hex + " " + "word " * 1100  # 1,101 tokens to the mark
    fresh = 6 + 3  # the question, and three a message (the mock's count)
    assert usage(prefix) == (fresh, 0, 1101, 0)
    assert usage(prefix) == (fresh, 1101, 0, 0)
    assert usage(prefix + "more", ttl="1h") == (fresh, 0, 0, 1102)
    assert usage("short " + uuid.uuid4().hex) == (fresh + 2, 0, 0, 0)  # below the minimum


def test_anthropic_stream_event_sequence(claude: anthropic.Anthropic,
                                         srv: MockProviderServer) -> None:
    with claude.messages.stream(model="c", max_tokens=100,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        assert "".join(stream.text_stream) == REPLY
        assert stream.get_final_message().usage.output_tokens == 9
    raw = httpx.post(srv.base_url("anthropic") + "/v1/messages",
                     headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
                     json={"model": "c", "max_tokens": 50, "stream": True,
                           "messages": [{"role": "user", "content": QUESTION}]})
    events = sse_events(raw.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    # (the cumulative counts, as MessageDeltaUsage has them: no split of writes by TTL)
    assert events[-2][1]["usage"] == {"input_tokens": 9, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0, "output_tokens": 9}


def test_anthropic_tool_use_stream_and_result(claude: anthropic.Anthropic) -> None:
    tools: list[Any] = [{"name": "get_time", "input_schema": {"type": "object", "properties": {
        "tz": {"type": "string"}}}}, {"name": "get_weather", "input_schema": WEATHER}]
    question: Any = {"role": "user", "content": "Weather in Paris"}
    with claude.messages.stream(model="c", max_tokens=100, tools=tools, messages=[question],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        message = stream.get_final_message()
    use = message.content[0]
    assert message.stop_reason == "tool_use" and use.type == "tool_use"
    assert (use.name, use.input, use.id[:6]) == ("get_weather", WEATHER_ARGS, "toolu_")
    answer = claude.messages.create(model="c", max_tokens=100, tools=tools, messages=[
        question, {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": "sunny"}]}]}])
    assert answer.content[0].text == "Tool result received: sunny"  # type: ignore[union-attr]


def test_anthropic_tool_use_without_arguments_streams_an_empty_partial_json(
        claude: anthropic.Anthropic) -> None:
    tools: list[Any] = [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]
    with claude.messages.stream(model="c", max_tokens=100, tools=tools,
                                messages=[{"role": "user", "content": "Time?"}]) as stream:
        events = list(stream)
        message = stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [(d.type, d.partial_json) for d in deltas] == [("input_json_delta", "")]  # type: ignore[union-attr]
    assert message.content[0].input == {}  # type: ignore[union-attr]


def test_anthropic_count_tokens_models_and_errors(claude: anthropic.Anthropic,
                                                  srv: MockProviderServer) -> None:
    count = claude.messages.count_tokens(model="c", system="Be brief",
                                         messages=[{"role": "user", "content": QUESTION}])
    assert count.input_tokens == 11
    assert "claude-haiku-4-5-20251001" in [m.id for m in claude.models.list()]
    with pytest.raises(anthropic.BadRequestError) as failure:
        claude.messages.create(model="c", messages=[], max_tokens=10)
    assert failure.value.body["error"] == {  # type: ignore[index]
        "type": "invalid_request_error", "message": "messages: at least one message is required"}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    no_limit = httpx.post(srv.base_url("anthropic") + "/v1/messages", headers=headers,
                          json={"model": "c", "messages": [{"role": "user", "content": "hi"}]})
    assert no_limit.status_code == 400 and no_limit.json()["type"] == "error"
    assert no_limit.json()["error"]["message"] == "max_tokens: Field required"
    unversioned = httpx.post(srv.base_url("anthropic") + "/v1/messages",
                             headers={"x-api-key": "k"}, json={})
    assert unversioned.status_code == 400
    assert unversioned.json()["error"]["message"] == "anthropic-version: header is required"


# -- Gemini -----------------------------------------------------------------------------------

def test_gemini_generate_content(srv: MockProviderServer) -> None:
    body = {"systemInstruction": {"parts": [{"text": "Be brief"}]},
            "contents": [{"role": "user", "parts": [
                {"text": QUESTION}, {"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]}
    result = gemini(srv, "gemini-2.0-flash:generateContent", body).json()
    candidate = result["candidates"][0]
    assert candidate["content"] == {"role": "model", "parts": [{"text": REPLY + " [1 image]"}]}
    assert candidate["finishReason"] == "STOP" and result["modelVersion"] == "gemini-2.0-flash"
    usage = result["usageMetadata"]
    assert (usage["promptTokenCount"], usage["candidatesTokenCount"]) == (2 + 6 + 3, 11)
    assert usage["totalTokenCount"] == 22 and result["responseId"]
    body["generationConfig"] = {"maxOutputTokens": 2}
    short = gemini(srv, "gemini-2.0-flash:generateContent", body).json()["candidates"][0]
    assert (short["content"]["parts"][0]["text"], short["finishReason"]) == \
        ("Mock reply", "MAX_TOKENS")


def test_gemini_stream_sse_and_json_array(srv: MockProviderServer) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}
    raw = gemini(srv, "gemini-2.0-flash:streamGenerateContent", body, "?alt=sse")
    assert raw.headers["content-type"] == "text/event-stream" and "event:" not in raw.text
    chunks = [data for _, data in sse_events(raw.text)]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == REPLY
    assert [("finishReason" in c["candidates"][0]) for c in chunks][-2:] == [False, True]
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 9
    array = gemini(srv, "gemini-2.0-flash:streamGenerateContent", body).json()
    assert [c["candidates"][0]["content"] for c in array] == \
        [c["candidates"][0]["content"] for c in chunks]


def test_gemini_function_call_and_response(srv: MockProviderServer) -> None:
    tools = [{"functionDeclarations": [
        {"name": "get_time", "parameters": {"type": "OBJECT", "properties": {
            "tz": {"type": "STRING"}}}},
        {"name": "get_weather", "parametersJsonSchema": WEATHER}]}]
    ask = {"role": "user", "parts": [{"text": "Weather in Paris"}]}
    forced = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    raw = gemini(srv, "gemini-2.0-flash:streamGenerateContent",
                 {"contents": [ask], "tools": tools, "toolConfig": forced}, "?alt=sse")
    chunks = [data for _, data in sse_events(raw.text)]
    assert len(chunks) == 1 and chunks[0]["candidates"][0]["finishReason"] == "STOP"
    part = chunks[0]["candidates"][0]["content"]["parts"][0]
    assert part == {"functionCall": {"name": "get_weather", "args": WEATHER_ARGS}}
    first = gemini(srv, "gemini-2.0-flash:generateContent", {"contents": [ask], "tools": tools})
    assert first.json()["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == \
        "get_time"
    answer = gemini(srv, "gemini-2.0-flash:generateContent", {"tools": tools, "contents": [
        ask, {"role": "model", "parts": [part]}, {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}]}]})
    text = answer.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert text == "Tool result received: sunny"


def test_gemini_count_embed_models_and_auth(srv: MockProviderServer) -> None:
    contents = [{"role": "user", "parts": [{"text": QUESTION}]}]
    count = gemini(srv, "gemini-2.0-flash:countTokens", {"contents": contents}).json()
    assert count["totalTokens"] == 9
    one = gemini(srv, "text-embedding-004:embedContent",
                 {"content": {"parts": [{"text": "one"}]}}).json()["embedding"]["values"]
    batch = gemini(srv, "text-embedding-004:batchEmbedContents", {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]},
         "outputDimensionality": 4 if t == "two" else 8} for t in ("one", "two")]}).json()
    assert [len(e["values"]) for e in batch["embeddings"]] == [8, 4]
    assert batch["embeddings"][0]["values"] == one
    requests = [{"model": "models/text-embedding-004", "content": {"parts": [{"text": "t"}]}}]
    full = gemini(srv, "text-embedding-004:batchEmbedContents", {"requests": requests * 100})
    assert len(full.json()["embeddings"]) == 100
    over = gemini(srv, "text-embedding-004:batchEmbedContents", {"requests": requests * 101})
    assert (over.status_code, over.json()) == (400, {"error": {
        "code": 400, "status": "INVALID_ARGUMENT",
        "message": "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one "
                   "batch\n"}})
    listed = httpx.get(srv.base_url("gemini") + "/v1beta/models?key=k").json()
    assert "models/gemini-2.0-flash" in [m["name"] for m in listed["models"]]
    missing = gemini(srv, "gemini-2.0-flash:generateContent", {"contents": contents}, key="")
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    empty = gemini(srv, "gemini-2.0-flash:generateContent", {"contents": []})
    assert empty.status_code == 400
    assert empty.json()["error"]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("/chat/completions", {"tools": True}, "tools", "invalid_type"),
    ("/chat/completions", {"max_tokens": "5"}, "max_tokens", "invalid_type"),
    ("/chat/completions", {"max_completion_tokens": 1.5}, "max_completion_tokens",
     "invalid_type"),
    ("/completions", {"n": 129}, "n", "integer_above_max_value"),
    ("/completions", {"n": 1e308}, "n", "invalid_type"),
    ("/responses", {"max_output_tokens": [1]}, "max_output_tokens", "invalid_type"),
    ("/embeddings", {"dimensions": 2 ** 63 - 1}, "dimensions", "integer_above_max_value"),
])
def test_openai_fields_of_the_wrong_type_or_size_are_a_400(
        oai: openai.OpenAI, path: str, body: dict[str, Any], param: str, code: str) -> None:
    """As the API answers them; the mock once failed with a 500 (which opened the gateway's
    breaker on a caller's mistake), or allocated gigabytes for a huge `n`."""
    base = {"/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
            "/completions": {"prompt": "Hi"}, "/responses": {"input": "Hi"},
            "/embeddings": {"input": "Hi"}}[path]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.post(path, cast_to=object, body={"model": "m", **base, **body})
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", param, code)
