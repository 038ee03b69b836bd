"""Example: an operator's own layer, declared in their config module.

`PromptGuard` rejects prompts matching configured regexes (400 in the caller's API shape)
and redacts secrets (API keys, private keys, ...) before anything reaches a provider. It uses
the same contract and helpers as the built-in layers (gateway.layers).

Run it against the local mock: `make mock &` then
`sluicegate serve --config deploy/examples/custom_layer.py`.
"""
import os
import re

from gateway.config import Deployment, Middleware, Model
from gateway.layers import (
    ASGIApp,
    GatewayError,
    Receive,
    Scope,
    Send,
    find_request_context,
    map_prompt_texts,
    text_of_messages,
)
from middleware.auth import AuthMiddleware, StaticKey
from middleware.metering import MeteringMiddleware
from providers import Provider

SECRET_PATTERNS = (
    r"\bsk-[A-Za-z0-9_-]{20,}",                       # OpenAI-style and Sluicegate virtual keys
    r"\bAKIA[0-9A-Z]{16}\b",                          # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",                # GitHub tokens
    r"\bAIza[0-9A-Za-z_-]{35}\b",                     # Google API keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]+?-----END [A-Z ]*PRIVATE KEY-----",
)


class PromptGuard:
    """Blocks prompts matching `block_patterns`; replaces matches of `redact_patterns` (and,
    with `redact_secrets`, of common secret formats) by `replacement`."""

    # It changes requests, never answers: a cache layer above it may keep the passthrough's
    # record of a JSON answer instead of copying it on its way out (see gateway/layers.py).
    passes_json_through = True

    def __init__(self, app: ASGIApp, *, block_patterns: list[str] | tuple[str, ...] = (),
                 redact_patterns: list[str] | tuple[str, ...] = (), redact_secrets: bool = True,
                 replacement: str = "[REDACTED]") -> None:
        self.app = app
        self.block = [re.compile(p) for p in block_patterns]
        redact = [*redact_patterns, *(SECRET_PATTERNS if redact_secrets else ())]
        self.redact = re.compile("|".join(f"(?:{p})" for p in redact)) if redact else None
        self.replacement = replacement

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = find_request_context(scope)
        if ctx is not None:
            texts = text_of_messages(ctx.body)
            for pattern in self.block:
                if any(pattern.search(text) for text in texts):
                    raise GatewayError(400, "The prompt was blocked by the gateway's content "
                                            "policy.", code="prompt_blocked")
            if self.redact is not None and any(self.redact.search(text) for text in texts):
                # (the texts text_of_messages read, wherever the request's API puts them)
                ctx.body = map_prompt_texts(ctx.body, self._redacted)
                ctx.state["prompt_guard_redacted"] = True
        await self.app(scope, receive, send)

    def _redacted(self, text: str) -> str:
        assert self.redact is not None
        return self.redact.sub(self.replacement, text)


os.environ.setdefault("SLUICEGATE_DEMO_KEY", "demo-key-not-a-secret")
upstream = os.environ.get("SLUICEGATE_DEMO_UPSTREAM", "http://127.0.0.1:18080")
providers = {"mock": Provider("openai", base_url=f"{upstream}/openai/v1",
                              api_key_env="SLUICEGATE_DEMO_KEY")}
# free=True: the mock is no real model, so there is nothing to bill.
models = {"demo": Model([Deployment("mock", "mock-gpt", free=True)], owned_by="sluicegate-demo")}
middleware = [
    # Virtual keys: one declared here (its plaintext in $SLUICEGATE_API_KEY; only the hash is
    # kept), or store=PostgresKeyStore(dsn) for keys made with the admin API.
    Middleware(AuthMiddleware, keys=[StaticKey("my-team", key_env="SLUICEGATE_API_KEY")]),
    Middleware(MeteringMiddleware),
    Middleware(PromptGuard, block_patterns=[r"(?i)ignore (all )?previous instructions"]),
]
