"""OpenAI legacy text completions, embeddings and the model lists (OpenAI and Azure).

Legacy completions (https://platform.openai.com/docs/api-reference/completions) default
`max_tokens` to 16 and answer one choice per prompt times `n`. Embeddings honour
`encoding_format` ("float", or "base64": little-endian float32, which the openai SDK asks for
by default) and `dimensions`.
"""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tests.mock_providers.behaviour import (
    DEFAULT_EMBEDDING_DIMS,
    Conversation,
    Reply,
    embed,
    embedding_base64,
    reply_for,
    split_chunks,
    word_logprob,
    words,
)
from tests.mock_providers.openai_chat import (
    DONE,
    FINGERPRINT,
    MAX_STOP_SEQUENCES,
    TOKEN_PATTERN,
    validate_stop,
)
from tests.mock_providers.wire import (
    JSON,
    BadRequest,
    Call,
    StreamItem,
    body_dict,
    check_openai_types,
    dumps,
    random_id,
    respond_json,
    respond_stream,
)

LEGACY_DEFAULT_MAX_TOKENS = 16
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o3-mini", "gpt-3.5-turbo-instruct",
          "text-embedding-3-small", "text-embedding-3-large")


# -- legacy completions -----------------------------------------------------------------------

async def completions(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    check_openai_types(body)
    if call.provider != "azure" and not body.get("model"):
        raise BadRequest("you must provide a model parameter")
    if "prompt" not in body:
        raise BadRequest("Missing required parameter: 'prompt'.", param="prompt",
                         code="missing_required_parameter")
    validate_stop(body, MAX_STOP_SEQUENCES)  # "Up to 4 sequences", as chat
    prompts = _prompts(body["prompt"])
    max_tokens = body.get("max_tokens", LEGACY_DEFAULT_MAX_TOKENS)
    replies = [reply_for(Conversation(last_user_text=p, input_tokens=words(p),
                                      max_tokens=max_tokens)) for p in prompts]
    meta: JSON = {"id": random_id("cmpl-", 29), "object": "text_completion",
                  "created": int(time.time()),
                  "model": str(body.get("model") or call.request.match_info.get("deployment")),
                  "system_fingerprint": FINGERPRINT}
    n = int(body.get("n") or 1)
    texts = [(p if body.get("echo") else "") + (r.text or "") for p, r in zip(prompts, replies)]
    top = body.get("logprobs")
    prompt_tokens = sum(r.input_tokens for r in replies)
    completion_tokens = sum(r.output_tokens for r in replies) * n
    if body.get("stream") is True:
        items = _completion_chunks(meta, replies, texts, n, call.config.chunk_chars, top)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            final = {**meta, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
            items.append((b"data: " + dumps(final) + b"\n\n", False))
        items.append((DONE, False))
        return await respond_stream(call, items, call.stream_error())
    choices = [{"text": texts[i], "index": i * n + j,
                "logprobs": _legacy_logprobs(texts[i], top),
                "finish_reason": replies[i].finish}
               for i in range(len(prompts)) for j in range(n)]
    return await respond_json(call, {**meta, "choices": choices,
                                     "usage": _usage(prompt_tokens, completion_tokens)})


def _prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [" ".join(str(p) for p in prompt)]  # one prompt of token ids
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [" ".join(str(t) for t in p) for p in prompt]
    raise BadRequest("Invalid 'prompt': expected a string, an array of strings or an array of "
                     "token arrays.", param="prompt", code="invalid_type")


def _completion_chunks(meta: JSON, replies: list[Reply], texts: list[str], n: int,
                       chunk_chars: int, top: Any) -> list[StreamItem]:
    items: list[StreamItem] = []
    for i, text in enumerate(texts):
        for j in range(n):
            index = i * n + j
            for piece in split_chunks(text, chunk_chars):
                choice = {"text": piece, "index": index,
                          "logprobs": _legacy_logprobs(piece, top), "finish_reason": None}
                items.append((_data({**meta, "choices": [choice]}), True))
            last = {"text": "", "index": index, "logprobs": None,
                    "finish_reason": replies[i].finish}
            items.append((_data({**meta, "choices": [last]}), False))
    return items


def _legacy_logprobs(text: str, top: Any) -> JSON | None:
    if not isinstance(top, int) or isinstance(top, bool):
        return None
    tokens = TOKEN_PATTERN.findall(text)
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    logprobs = [word_logprob(token) for token in tokens]
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)] if top else None,
            "text_offset": offsets}


def _usage(prompt: int, completion: int) -> JSON:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _data(payload: JSON) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


# -- embeddings -------------------------------------------------------------------------------

async def embeddings(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    check_openai_types(body)
    if call.provider != "azure" and not body.get("model"):
        raise BadRequest("you must provide a model parameter")
    texts = embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"Invalid value for 'encoding_format': {encoding!r}. Supported values "
                         "are: 'float' and 'base64'.", param="encoding_format",
                         code="invalid_value")
    dims = body.get("dimensions", DEFAULT_EMBEDDING_DIMS)
    if not isinstance(dims, int) or dims < 1:
        raise BadRequest("Invalid 'dimensions': must be a positive integer.",
                         param="dimensions", code="invalid_value")
    data = []
    for index, text in enumerate(texts):
        vector = embed(text, dims)
        data.append({"object": "embedding", "index": index,
                     "embedding": embedding_base64(vector) if encoding == "base64" else vector})
    tokens = sum(max(1, words(text)) for text in texts)
    model = str(body.get("model") or call.request.match_info.get("deployment"))
    return await respond_json(call, {"object": "list", "data": data, "model": model,
                                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def embedding_inputs(value: Any) -> list[str]:
    """Texts to embed: a string, strings, or token arrays (embedded as their id text)."""
    if value is None:
        raise BadRequest("Missing required parameter: 'input'.", param="input",
                         code="missing_required_parameter")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest("'$.input' is invalid. Please check the API reference: "
                         "https://platform.openai.com/docs/api-reference.", param="input")
    if all(isinstance(item, int) for item in value):
        return [" ".join(str(item) for item in value)]
    texts = []
    for item in value:
        if isinstance(item, list):
            item = " ".join(str(token) for token in item)
        if not isinstance(item, str) or not item:
            raise BadRequest("'$.input' is invalid. Please check the API reference: "
                             "https://platform.openai.com/docs/api-reference.", param="input")
        texts.append(item)
    return texts


# -- models -----------------------------------------------------------------------------------

_MODEL_LIST = dumps({"object": "list", "data": [
    {"id": model, "object": "model", "created": 1721172741, "owned_by": "system"}
    for model in MODELS]})


async def list_models(call: Call) -> web.StreamResponse:
    return await respond_json(call, _MODEL_LIST)


def _azure_model(model: str) -> JSON:
    embeddings = model.startswith("text-embedding")
    return {"status": "succeeded",
            "capabilities": {"fine_tune": False, "inference": True,
                             "completion": model == "gpt-3.5-turbo-instruct",
                             "chat_completion": not embeddings
                             and model != "gpt-3.5-turbo-instruct",
                             "embeddings": embeddings},
            "lifecycle_status": "generally-available",
            "deprecation": {"inference": 1767225600},
            "id": model, "created_at": 1721172741, "object": "model"}


# Azure OpenAI's data-plane model list (`GET {endpoint}/openai/models?api-version=...`, "Models
# - List"): the base models the resource offers, with capabilities and lifecycle, not the
# deployments; the `api-key` and `api-version` checks are the Azure wire's.
_AZURE_MODEL_LIST = dumps({"data": [_azure_model(model) for model in MODELS],
                           "object": "list"})


async def list_azure_models(call: Call) -> web.StreamResponse:
    return await respond_json(call, _AZURE_MODEL_LIST)
