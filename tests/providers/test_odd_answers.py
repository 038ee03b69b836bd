"""Answers no provider means to send, which still reach a gateway: usage counts that are not
counts (1e300, true, "x"), a translated answer too deeply nested to write back, the deltas of
parallel tool calls interleaved. Each is an error in the caller's shape or a correct
translation; never a 500, a cut-short body or a record lost. The upstream is a scripted
server on 127.0.0.1 (`tests.mock_providers.scripted`); the clients are the official SDKs.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from gateway import create_app
from gateway.context import Usage, request_context
from gateway.errors import UpstreamError
from providers.anthropic_stream import ChatStreamToMessages
from tests.harness import TEST_KEY, ThreadedServer, config_head, openai_client, write_config
from tests.mock_providers.scripted import Scripted, ScriptedUpstream

# What each request ended with, seen where the metering layer sits: its usage, and its error
# type (the stream's, or the error's that went up).
ENDED: list[tuple[Usage | None, str | None]] = []


class EndSeen:
    """Keeps each request's final usage and error type, as a metering layer reads them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        ctx = request_context(scope)
        try:
            await self.app(scope, receive, send)
        except UpstreamError as exc:
            ENDED.append((ctx.usage, exc.upstream_error_type))
            raise
        ENDED.append((ctx.usage, ctx.error_type))


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: ScriptedUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    text = f'''{config_head()}
from tests.providers.test_odd_answers import EndSeen
providers = {{
    "oai": Provider("openai", base_url="{upstream.url}/v1", api_key_env=KEY, timeouts=fast),
    "gem": Provider("gemini", base_url="{upstream.url}", api_key_env=KEY, timeouts=fast),
    "ant": Provider("anthropic", base_url="{upstream.url}", api_key_env=KEY, timeouts=fast),
}}
models = {{"gpt": [Deployment("oai", "gpt-4o-mini", price=PRICE)],
           "gemini": [Deployment("gem", "gemini-2.5-flash", price=PRICE)],
           "claude": [Deployment("ant", "claude-sonnet-4-5", price=PRICE)]}}
middleware = [Middleware(EndSeen)]
'''
    with ThreadedServer(create_app(write_config(tmp_path_factory.mktemp("odd"), text))) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(upstream: ScriptedUpstream) -> None:
    ENDED.clear()
    upstream.requests.clear()


ASK = [{"role": "user", "content": "hello"}]


def chat_answer(usage: Any, message: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": message or {"role": "assistant", "content": "hi"}}],
            "usage": usage}


def chunk(delta: dict[str, Any] | None, finish: str | None = None,
          usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "usage": usage,
            "choices": [] if delta is None else
            [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def gemini_event(text: str | None, usage: Any, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model",
                                             "parts": [{"text": text}] if text else []},
                                 "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage,
            "modelVersion": "gemini-2.0-flash", "responseId": "resp-1"}


def ended(count: int = 1) -> list[tuple[Usage | None, str | None]]:
    # (appended when the app returns, after the client has the body's last byte)
    for _ in range(500):
        if len(ENDED) >= count:
            break
        __import__("time").sleep(0.01)
    return ENDED


BAD_COUNTS = [1e300, 2**64, True, 2.5, -1, "many"]


@pytest.mark.parametrize("count", BAD_COUNTS)
def test_a_usage_count_that_is_not_a_count_is_a_502_not_a_lost_record(
        gateway: ThreadedServer, upstream: ScriptedUpstream, count: Any) -> None:
    upstream.queue(Scripted.json(chat_answer({"prompt_tokens": count, "completion_tokens": 1,
                                              "total_tokens": 2})))
    with pytest.raises(openai.APIStatusError) as failed:
        openai_client(gateway).chat.completions.create(model="gpt", messages=ASK)
    assert failed.value.status_code == 502
    assert "unreadable response" in failed.value.message
    assert ended() == [(None, "bad_response")]


def test_whole_counts_written_as_floats_or_digit_strings_are_read(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    upstream.queue(Scripted.json(chat_answer({"prompt_tokens": 12.0, "completion_tokens": "3",
                                              "total_tokens": 15})))
    answer = openai_client(gateway).chat.completions.create(model="gpt", messages=ASK)
    assert answer.choices[0].message.content == "hi"
    assert ended() == [(Usage(input_tokens=12, output_tokens=3), None)]


def test_a_huge_count_at_a_passthrough_streams_end_is_an_error_event_and_a_delivered_bill(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": "one"}), chunk({"content": " two"}, "stop"),
        chunk(None, usage={"prompt_tokens": 1e300, "completion_tokens": 2}), "[DONE]"))
    stream = openai_client(gateway).chat.completions.create(
        model="gpt", messages=ASK, stream=True, stream_options={"include_usage": True})
    texts = []
    with pytest.raises(openai.APIError, match="unreadable"):
        for part in stream:
            texts += [choice.delta.content for choice in part.choices]
    assert "".join(text or "" for text in texts) == "one two"
    [(usage, error_type)] = ended()
    assert error_type == "bad_response"
    assert usage is not None and 0 < usage.input_tokens < 100 and usage.output_tokens >= 1


@pytest.mark.parametrize("count", ["x", 1e300])
def test_gemini_stream_usage_that_is_not_a_count_before_any_text_is_a_502(
        gateway: ThreadedServer, upstream: ScriptedUpstream, count: Any) -> None:
    upstream.queue(Scripted.stream(
        gemini_event("hello", {"promptTokenCount": count, "candidatesTokenCount": 1}, "STOP")))
    with pytest.raises(openai.APIStatusError) as failed:
        list(openai_client(gateway).chat.completions.create(model="gemini", messages=ASK,
                                                           stream=True))
    assert failed.value.status_code == 502
    assert ended() == [(None, "bad_response")]


@pytest.mark.parametrize("count", ["x", 1e300])
def test_gemini_stream_usage_that_is_not_a_count_after_text_ends_the_stream_with_an_error(
        gateway: ThreadedServer, upstream: ScriptedUpstream, count: Any) -> None:
    upstream.queue(Scripted.stream(
        gemini_event("hello", {"promptTokenCount": 3, "candidatesTokenCount": 1}),
        gemini_event(" there", {"promptTokenCount": count, "candidatesTokenCount": 2},
                     "STOP")))
    stream = openai_client(gateway).chat.completions.create(
        model="gemini", messages=ASK, stream=True, stream_options={"include_usage": True})
    texts = []
    with pytest.raises(openai.APIError, match="unreadable"):
        for part in stream:
            texts += [choice.delta.content or "" for choice in part.choices]
    assert "".join(texts) == "hello"
    [(usage, error_type)] = ended()
    # (billed as a stream cut short: the input Gemini last said, an output token per delta)
    assert (usage, error_type) == (Usage(input_tokens=3, output_tokens=1), "bad_response")


def test_a_200_whose_error_is_a_bare_message_is_the_calls_failure(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # As `{"error": {...}}` with status 200 is (OpenRouter's): never passed on as an answer.
    upstream.queue(Scripted.json({"error": "upstream overloaded"}))
    with pytest.raises(openai.APIStatusError) as failed:
        openai_client(gateway).chat.completions.create(model="gpt", messages=ASK)
    assert failed.value.status_code == 502
    assert failed.value.message.endswith("answered 200 with an error: upstream overloaded")


def test_an_answer_too_deep_to_write_back_is_a_502_in_the_anthropic_shape(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    deep = '{"a":' * 300 + "1" + "}" * 300  # (orjson writes 254 levels at most)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "nest", "arguments": deep}}
    upstream.queue(Scripted.json(chat_answer(
        {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        {"role": "assistant", "content": None, "tool_calls": [call]})))
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as failed:
        sdk.messages.create(model="gpt", max_tokens=50, messages=ASK)
    assert failed.value.status_code == 502
    assert isinstance(failed.value.body, dict) and failed.value.body["type"] == "error"
    assert "unreadable response" in failed.value.message


def interleaved_calls() -> Scripted:
    def call(position: int, arguments: str, name: str | None = None) -> dict[str, Any]:
        made: dict[str, Any] = {"index": position, "function": {"arguments": arguments}}
        if name is not None:
            made.update(id=f"call_{name}", type="function")
            made["function"]["name"] = name
        return chunk({"tool_calls": [made]})

    return Scripted.stream(
        chunk({"role": "assistant", "content": None}),
        call(0, "", "get_weather"), call(1, "", "get_time"),
        call(0, '{"city": '), call(1, '{"zone": '), call(0, '"Paris"}'), call(1, '"UTC"}'),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}),
        "[DONE]")


def test_interleaved_parallel_tool_calls_reach_an_anthropic_client_whole(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    upstream.queue(interleaved_calls())
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
    with sdk.messages.stream(model="gpt", max_tokens=50,
                             messages=ASK) as stream:
        message = stream.get_final_message()
    assert [(block.type, getattr(block, "name", None), getattr(block, "input", None))
            for block in message.content] == [("tool_use", "get_weather", {"city": "Paris"}),
                                              ("tool_use", "get_time", {"zone": "UTC"})]
    assert len({getattr(block, "id", None) for block in message.content}) == 2
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (20, 12)
    assert ended() == [(Usage(input_tokens=20, output_tokens=12), None)]


def events_of(translator: ChatStreamToMessages, *chunks: dict[str, Any]) -> list[tuple[Any, ...]]:
    out = []
    for made in chunks:
        out += translator.feed(made)
    out += translator.finish()
    return [(name, data.get("index")) for name, data in out
            if name.startswith("content_block")]


def tool_chunk(position: int, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    made: dict[str, Any] = {"index": position, "function": {"arguments": arguments}}
    if call_id:
        made.update(id=call_id, type="function")
        made["function"]["name"] = "f"
    return chunk({"tool_calls": [made]})


def test_calls_sent_one_after_another_stay_one_block_after_another() -> None:
    # As Anthropic sends its own: a block stops before the next starts.
    assert events_of(ChatStreamToMessages("m"),
                     tool_chunk(0, '{"a": 1}', "call_a"), tool_chunk(1, "", "call_b"),
                     tool_chunk(1, '{"b": 2}'), chunk({}, "tool_calls")) == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1)]


def test_a_server_that_numbers_every_call_zero_gets_a_block_per_call() -> None:
    assert events_of(ChatStreamToMessages("m"),
                     tool_chunk(0, '{"a": ', "call_a"), tool_chunk(0, "1}"),
                     tool_chunk(0, '{"b": 2}', "call_b"), chunk({}, "tool_calls")) == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_stop", 1)]


def test_arguments_for_a_call_already_whole_are_unreadable_not_a_new_block() -> None:
    translator = ChatStreamToMessages("m")
    translator.feed(tool_chunk(0, '{"a": 1}', "call_a"))
    translator.feed(tool_chunk(1, '{"b": 2}', "call_b"))  # (closes call 0: whole)
    assert translator.feed(tool_chunk(0, "  ")) == []  # (white space adds nothing)
    with pytest.raises(ValueError, match="already whole"):
        translator.feed(tool_chunk(0, ', "c": 3}'))


def claude_sdk(gateway: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)


def test_a_calls_later_deltas_with_an_empty_id_stay_in_its_block(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # DashScope (Qwen) and GLM repeat `"id": ""` and `"name": ""` on a call's later deltas.
    def call(arguments: str, call_id: str = "", name: str = "") -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                      "function": {"name": name, "arguments": arguments}}]})

    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": None}), call("", "call_1", "bash"),
        call('{"cmd": '), call('"ls"}'), chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 5}), "[DONE]"))
    with claude_sdk(gateway).messages.stream(model="gpt", max_tokens=50,
                                             messages=ASK) as stream:
        message = stream.get_final_message()
    assert [(block.type, getattr(block, "id", None), getattr(block, "name", None),
             getattr(block, "input", None)) for block in message.content] == [
        ("tool_use", "call_1", "bash", {"cmd": "ls"})]


def test_a_passthrough_stream_cut_short_is_no_success_when_every_chunk_says_finish_reason_empty(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # Ollama and SGLang send `"finish_reason": ""` (not null) on every chunk before the last.
    upstream.queue(Scripted.stream(
        {**chunk({"role": "assistant", "content": ""}), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": ""}]},
        {**chunk({"content": "Hel"}), "choices": [
            {"index": 0, "delta": {"content": "Hel"}, "finish_reason": ""}]}))
    stream = openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                            stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="ended before"):
        for part in stream:
            texts += [choice.delta.content or "" for choice in part.choices]
    assert "".join(texts) == "Hel"
    assert ended()[0][1] == "incomplete_stream"


def test_a_keep_alive_comment_before_the_usage_chunk_is_no_cut_short_stream(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # No `[DONE]` (some OpenAI-compatible servers): the finish chunk ends the stream, also
    # when a comment came in a read of its own after it.
    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
        chunk({}, "stop"), b": keep-alive\n\n",
        chunk(None, usage={"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5})))
    stream = openai_client(gateway).chat.completions.create(
        model="gpt", messages=ASK, stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(choice.delta.content or "" for part in parts
                   for choice in part.choices) == "Hello"
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 1
    assert ended() == [(Usage(input_tokens=4, output_tokens=1), None)]


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/json"])
def test_events_sent_under_another_content_type_are_read_as_events(
        gateway: ThreadedServer, upstream: ScriptedUpstream, content_type: str) -> None:
    # LitServe's OpenAI spec says application/x-ndjson, some proxies application/json.
    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
        chunk({}, "stop"), "[DONE]", content_type=content_type))
    stream = openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                            stream=True)
    assert "".join(choice.delta.content or "" for part in stream
                   for choice in part.choices) == "Hello"


def test_a_json_answer_to_a_stream_request_is_still_a_502(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    upstream.queue(Scripted.json(chat_answer({"prompt_tokens": 1, "completion_tokens": 1})))
    with pytest.raises(openai.APIStatusError) as failed:
        list(openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                           stream=True))
    assert failed.value.status_code == 502
    assert "without an event stream" in failed.value.message


def test_an_anthropic_caller_gets_the_usage_that_came_after_the_finish(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # A running usage on the content chunks, none on the finish chunk, the final one last.
    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": "one"},
              usage={"prompt_tokens": 7, "completion_tokens": 1}),
        chunk({"content": " two"}, usage={"prompt_tokens": 7, "completion_tokens": 2}),
        chunk({}, "stop"), chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 3}),
        "[DONE]"))
    with claude_sdk(gateway).messages.stream(model="gpt", max_tokens=50,
                                             messages=ASK) as stream:
        message = stream.get_final_message()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)
    assert ended() == [(Usage(input_tokens=7, output_tokens=3), None)]


def test_a_tool_input_sent_whole_in_its_block_start_reaches_an_openai_caller(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # Anthropic's own content_block_start says `input: {}` and deltas follow; a compatible
    # server may put the whole input there instead.
    upstream.queue(Scripted.stream(
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "weather",
            "input": {"city": "Paris"}}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 8}},
        {"type": "message_stop"}))
    stream = openai_client(gateway).chat.completions.create(model="claude", messages=ASK,
                                                            stream=True)
    calls = [call for part in stream for choice in part.choices
             for call in choice.delta.tool_calls or ()]
    assert "".join(call.function.arguments or "" for call in calls
                   if call.function is not None) == '{"city":"Paris"}'
    assert [call.function.name for call in calls if call.function and call.function.name] \
        == ["weather"]


def test_calls_at_index_zero_without_ids_are_told_apart_by_their_names() -> None:
    def nameless(arguments: str, name: str | None = None) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": arguments}
        if name is not None:
            function["name"] = name
        return chunk({"tool_calls": [{"index": 0, "function": function}]})

    assert events_of(ChatStreamToMessages("m"),
                     nameless('{"a": ', "f"), nameless("1}"), nameless('{"b": 2}', "g"),
                     nameless("", ""), chunk({}, "tool_calls")) == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_stop", 1)]


def gemini_answer(text: str) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 4},
            "modelVersion": "gemini-2.0-flash", "responseId": "r-1"}


def test_results_of_two_calls_of_one_function_reach_gemini_in_the_calls_order(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # OpenAI pairs results by tool_call_id, in any order; Gemini pairs them by position.
    def call(call_id: str, city: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}

    upstream.queue(Scripted.json(gemini_answer("Sunny in Paris, rain in London.")))
    answer = openai_client(gateway).chat.completions.create(model="gemini", messages=[
        {"role": "user", "content": "Weather in Paris and London?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("call_paris", "Paris"), call("call_london", "London")]},
        {"role": "tool", "tool_call_id": "call_london", "content": "London: rain"},
        {"role": "tool", "tool_call_id": "call_paris", "content": "Paris: sun"},
    ])
    assert answer.choices[0].message.content == "Sunny in Paris, rain in London."
    [(_path, sent)] = upstream.requests
    calls, results = sent["contents"][1]["parts"], sent["contents"][2]["parts"]
    assert [part["functionCall"]["args"]["city"] for part in calls] == ["Paris", "London"]
    assert [part["functionResponse"] for part in results] == [
        {"name": "get_weather", "response": {"result": "Paris: sun"}},
        {"name": "get_weather", "response": {"result": "London: rain"}}]


@pytest.mark.parametrize("model", ["claude", "gemini"])
def test_openai_moderation_is_refused_where_it_cannot_run_not_dropped(
        gateway: ThreadedServer, upstream: ScriptedUpstream, model: str) -> None:
    moderation = {"model": "omni-moderation-latest",
                  "policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(gateway).chat.completions.create(
            model=model, messages=ASK, extra_body={"moderation": moderation})
    assert refused.value.status_code == 400
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "moderation"
    assert upstream.requests == []  # (nothing was sent)


def test_a_documents_title_and_context_reach_another_apis_model(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # Anthropic passes a document's title and context to the model (its citations docs).
    document = {"type": "document", "title": "Q3 report (ACME Corp)",
                "context": "Unaudited; figures in EUR.",
                "source": {"type": "text", "media_type": "text/plain",
                           "data": "Revenue grew 12%."}}
    question = {"type": "text", "text": "Which company, and in what currency?"}
    upstream.queue(Scripted.json(chat_answer({"prompt_tokens": 30, "completion_tokens": 5})))
    claude_sdk(gateway).messages.create(model="gpt", max_tokens=50, messages=[
        {"role": "user", "content": [document, question]}])
    [(_path, sent)] = upstream.requests
    texts = [part["text"] for part in sent["messages"][-1]["content"]]
    said = "Document title: Q3 report (ACME Corp)\nDocument context: Unaudited; figures in EUR."
    assert texts == [said, "Revenue grew 12%.", "Which company, and in what currency?"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_sdk(gateway).messages.create(model="gpt", max_tokens=50, messages=[
            {"role": "user", "content": [{**document, "citations": {"enabled": True}},
                                         question]}])
    assert "cannot cite" in refused.value.message
    assert len(upstream.requests) == 1  # (the refused one was not sent)


def test_an_image_url_gemini_cannot_read_is_a_400_naming_it(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(gateway).chat.completions.create(model="gemini", messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://[bad/x.png"}}]}])
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "messages[0].content[1].image_url.url"
    assert upstream.requests == []


def test_a_stream_request_answered_200_with_a_json_error_is_that_error(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # (as a non-stream request's is: at the status its code gives, not a retried 502)
    upstream.queue(Scripted.json({"error": {"code": 400, "type": "invalid_request_error",
                                            "message": "maximum context length exceeded"}}))
    with pytest.raises(openai.BadRequestError) as refused:
        list(openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                           stream=True))
    assert "maximum context length" in refused.value.message
    assert len(upstream.requests) == 1


@pytest.fixture(scope="module")
def continuing(upstream: ScriptedUpstream,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """A gateway whose failover layer continues a broken stream on the second deployment
    (both at the scripted upstream, which answers them in turn)."""
    text = f'''{config_head()}
from tests.providers.test_odd_answers import EndSeen
providers = {{
    "one": Provider("openai", base_url="{upstream.url}/v1", api_key_env=KEY, timeouts=fast),
    "two": Provider("openai", base_url="{upstream.url}/v1", api_key_env=KEY, timeouts=fast),
    "ant": Provider("anthropic", base_url="{upstream.url}", api_key_env=KEY, timeouts=fast),
    "ant2": Provider("anthropic", base_url="{upstream.url}", api_key_env=KEY, timeouts=fast),
}}
models = {{"gpt": [Deployment("one", "gpt-4o-mini", price=PRICE),
                   Deployment("two", "gpt-4o", price=PRICE)],
           "claude": [Deployment("ant", "claude-sonnet-4-5", price=PRICE),
                      Deployment("ant2", "claude-opus-4-5", price=PRICE)]}}
NEVER = BreakerSettings(consecutive_failures=10**9, min_requests=10**9)
middleware = [Middleware(EndSeen), Middleware(
    FailoverMiddleware, breaker=NEVER, retry=RetryPolicy(max_attempts=2),
    routes={{name: Route(strategy="priority", continuation=True) for name in models}})]
'''
    path = write_config(tmp_path_factory.mktemp("continuing"), text)
    with ThreadedServer(create_app(path)) as server:
        yield server


def test_a_stream_broken_after_its_finish_is_ended_not_continued(
        continuing: ThreadedServer, upstream: ScriptedUpstream) -> None:
    # (continued, it got a second answer after the first, and a second call was billed)
    upstream.queue(Scripted.stream(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello world."}),
        chunk({}, "stop"), reset=True))
    parts = list(openai_client(continuing).chat.completions.create(
        model="gpt", messages=ASK, stream=True))
    assert "".join(choice.delta.content or "" for part in parts
                   for choice in part.choices) == "Hello world."
    assert [choice.finish_reason for part in parts for choice in part.choices
            if choice.finish_reason] == ["stop"]
    assert len(upstream.requests) == 1


def test_an_anthropic_stream_broken_after_its_stop_reason_is_ended_not_continued(
        continuing: ThreadedServer, upstream: ScriptedUpstream) -> None:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    upstream.queue(Scripted.stream(
        event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta",
                                                "text": "The answer is 42."}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": 6}}),
        reset=True))
    with claude_sdk(continuing).messages.stream(model="claude", max_tokens=50,
                                                messages=ASK) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert [block.text for block in message.content if block.type == "text"] == [
        "The answer is 42."]
    assert kinds.count("message_delta") == 1 and kinds[-1] == "message_stop"
    assert message.stop_reason == "end_turn"
    assert len(upstream.requests) == 1
