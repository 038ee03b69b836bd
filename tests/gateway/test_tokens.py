"""The input-token estimator (gateway/tokens.py): a quarter of the UTF-8 bytes, rounded up,
plus 3 per message and 3 for the reply's priming, as OpenAI's chat format counts."""
from __future__ import annotations

from gateway.tokens import estimate_input, estimate_messages, estimate_text


def test_text_is_a_quarter_of_its_utf8_bytes_rounded_up() -> None:
    assert estimate_text("") == 0
    assert estimate_text("Say hello") == 3  # 9 bytes
    assert estimate_text("abcd") == 1
    assert estimate_text("abcde") == 2
    assert estimate_text("h\u00e9llo") == 2  # 6 bytes: \u00e9 is two
    assert estimate_text("\U0001f44b" * 3) == 3  # 12 bytes: four each
    assert estimate_text("\u4f60\u597d") == 2  # 6 bytes: three each


def test_messages_count_their_text_and_three_each() -> None:
    messages = [{"role": "user", "content": "Say hello"}]
    assert estimate_messages(messages) == 3 + 3 + 3
    messages.append({"role": "assistant", "content": "\u4f60\u597d\u4f60\u597d"})  # 12 bytes
    assert estimate_messages(messages) == 3 + (3 + 3) + (3 + 3)


def test_content_parts_tool_calls_system_and_tools_count_too() -> None:
    parts = [{"type": "text", "text": "abcdefgh"}, {"type": "image_url", "image_url": {}}]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": parts},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "assistant", "content": "ok", "tool_calls": None},
                "not a message"]
    expected = (3 + 2 + 85) + (3 + estimate_text(str(call))) + (3 + 1) + 3
    assert estimate_messages(messages) == expected
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert estimate_messages(messages, system="abcd", tools=tools) == \
        expected + 1 + estimate_text(str(tools))


def test_inputs_of_embeddings_and_completions() -> None:
    assert estimate_input("abcdefgh") == 2
    assert estimate_input(["abcd", "h\u00e9llo", [1, 2, 3], 7]) == 1 + 2 + 3 + 1
    # One prompt as token ids (the OpenAI APIs take `input: [id, ...]`): one token each.
    assert estimate_input(list(range(1000))) == 1000
    assert estimate_input([True, None, {"a": 1}]) == 0  # (the provider's to refuse)


def test_tool_calls_that_are_not_a_list_are_not_counted_and_raise_nothing() -> None:
    for calls in (1, "call", {"id": "c1"}, None):
        messages = [{"role": "assistant", "content": "hi", "tool_calls": calls}]
        assert estimate_messages(messages) == 3 + 1 + 3


def test_an_answer_without_usage_is_billed_its_input_and_every_string_it_generated() -> None:
    from gateway import context as c
    from gateway.context import RequestContext, Usage
    from gateway.tokens import answered_usage, estimate_input_tokens

    def usage(operation: str, answer: object, body: dict[str, object] | None = None
              ) -> Usage | None:
        ctx = RequestContext(request_id="r", operation=operation, api_format="openai",
                             body=body or {"messages": [{"role": "user", "content": "hi"}]},
                             raw_body=b"", model="m", stream=False)
        made = answered_usage(ctx, answer)
        if made is not None:
            assert made.input_tokens == estimate_input_tokens(ctx) > 0
        return made

    chat = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": {"content": [{"token": "x"}]},
        "message": {"role": "assistant", "content": "abcdefgh",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {
                        "name": "look", "arguments": '{"q":"z"}'}}]}}]}
    made = usage(c.OPENAI_CHAT, chat)
    # "abcdefgh" + "look" + '{"q":"z"}': 21 bytes, ids, types, roles and logprobs left out
    assert made is not None and made.output_tokens == (21 + 3) // 4
    claude = {"type": "message", "role": "assistant", "content": [
        {"type": "text", "text": "hello"}, {"type": "tool_use", "id": "toolu_1",
                                             "name": "f", "input": {"a": "bc"}}]}
    made = usage(c.ANTHROPIC_MESSAGES, claude)
    assert made is not None and made.output_tokens == (len("hello") + len("f") + 2 + 3) // 4
    responses = {"object": "response", "output": [{"type": "message", "id": "msg_1",
                                                   "status": "completed", "content": [
                                                       {"type": "output_text", "text": "x" * 40,
                                                        "annotations": []}]}]}
    made = usage(c.OPENAI_RESPONSES, responses, {"input": "hello there"})
    assert made is not None and made.output_tokens == 10
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [0.1]}]}
    made = usage(c.OPENAI_EMBEDDINGS, embeddings, {"input": "hello there"})
    assert made is not None and made.output_tokens == 0
    # Not the operation's answer: an error sent with a 200, a body without its member.
    assert usage(c.OPENAI_CHAT, {"error": {"message": "no"}, "choices": []}) is None
    assert usage(c.OPENAI_CHAT, {"choices": "x"}) is None
    assert usage(c.OPENAI_CHAT, ["x"]) is None
    # A deeply nested answer is read without recursion.
    deep: object = "x" * 8
    for _ in range(5000):
        deep = [deep]
    made = usage(c.OPENAI_CHAT, {"choices": [deep]})
    assert made is not None and made.output_tokens == 2


def test_a_responses_input_counts_every_item_instructions_and_tools() -> None:
    """Agent loops send tool output as `function_call_output` items: a stream cut short
    before its usage, and the quota's reservation, count them, and a string input's
    `instructions` and `tools`; an image is `_PER_IMAGE` (85), not its base64."""
    from gateway import context as c
    from gateway.context import RequestContext
    from gateway.tokens import estimate_input_tokens

    def tokens(body: dict[str, object]) -> int:
        return estimate_input_tokens(RequestContext(
            request_id="r", operation=c.OPENAI_RESPONSES, api_format="openai", body=body,
            raw_body=b"", model="m", stream=False))

    output = "x" * 4000  # 1000 tokens
    assert tokens({"input": "hi"}) == 3 + 1 + 3
    assert tokens({"input": "hi", "instructions": output}) == 1000 + 3 + 1 + 3
    assert tokens({"input": "hi", "tools": [{"type": "function", "name": output}]}) > 1000
    loop = [{"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "call_1", "name": "read",
             "arguments": '{"id": 7}'},
            {"type": "function_call_output", "call_id": "call_1", "output": output}]
    # the message (3 + 1), each item (3 each), "read" + '{"id": 7}' + the output, priming 3
    assert tokens({"input": loop}) == 3 + 1 + 3 * 2 + (4 + 9 + 4000 + 3) // 4 + 3
    image = "data:image/png;base64," + "A" * 40000
    parts = [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_text", "text": "abcd"},
        {"type": "input_image", "image_url": image, "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "encrypted_content": "Z" * 4000,
         "summary": [{"type": "summary_text", "text": "efgh"}]}]
    assert tokens({"input": parts}) == 3 * 2 + 2 + 85 + 3
    # (items of no known shape count by their text, and raise nothing)
    assert tokens({"input": [{"type": ["x"], "text": "abcd"}, {"type": {}}, 7]}) == \
        3 * 3 + 1 + 3


def test_a_responses_follow_up_counts_the_conversation_it_continues() -> None:
    """OpenAI bills a follow-up (`previous_response_id`) the stored conversation as input:
    the answer's input and output, less its reasoning (which a follow-up's context leaves
    out). Noted from a JSON answer's id or a stream's `response.created`; not from a cache
    hit (its usage is the original call's) nor from a failed request."""
    from gateway import context as c
    from gateway.context import RequestContext, Usage
    from gateway.tokens import estimate_input_tokens, remember_conversation

    def ctx(body: dict[str, object], **fields: object) -> RequestContext:
        made = RequestContext(request_id="r", operation=c.OPENAI_RESPONSES, api_format="openai",
                              body=body, raw_body=b"", model="m", stream=False)
        for name, value in fields.items():
            setattr(made, name, value)
        return made

    def follow_up(previous: str) -> int:
        return estimate_input_tokens(ctx({"input": "hi", "previous_response_id": previous}))

    alone = estimate_input_tokens(ctx({"input": "hi"}))
    usage = Usage(input_tokens=4000, output_tokens=300, reasoning_tokens=100)
    remember_conversation(ctx({}, status=200, usage=usage, sent_json=(b"", {"id": "resp_j"})))
    remember_conversation(ctx({}, status=200, usage=usage, stream=True,
                              first_event={"type": "response.created",
                                           "response": {"id": "resp_s"}}))
    assert follow_up("resp_j") == follow_up("resp_s") == alone + 4200
    for unnoted in ({"status": 200, "cache_status": "hit"}, {"status": 500},
                    {"status": 200, "usage": None}):
        remember_conversation(ctx({}, **{"usage": usage, **unnoted},
                                  sent_json=(b"", {"id": "resp_x"})))
    assert follow_up("resp_x") == follow_up("resp_unknown") == alone
