"""What every provider family shares: secrets, one pooled aiohttp session, timeouts, the
request/response cycle, error mapping, and streaming with the response start held back until
the first complete event (so a failure before it can still be retried elsewhere).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import orjson

from gateway.config import ConfigError, env_name, env_name_shown, is_header_name
from gateway.context import ANTHROPIC_COUNT_TOKENS, Attempt, RequestContext, Usage, add_usage
from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    StreamInterrupted,
    UntranslatableRequest,
    UpstreamError,
    stream_error_ending,
)
from gateway.pricing import bill_failed_call, with_earlier_calls
from gateway.sse import ContentCount, delivered_counting, opening_excess
from gateway.tokens import answered_usage, delivered_usage, estimate_input_tokens
from gateway.upstream import Deployment, ProviderKey, Send, Timeouts
from providers.streams import StreamError, reported_model
from providers.translation import TranslationError

logger = logging.getLogger("sluicegate")

JSON_RESPONSE_HEADERS = [(b"content-type", b"application/json")]
SSE_RESPONSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache")]
_MAX_ERROR_BODY = 64 * 1024
# The largest answer read (`max_answer_bytes`): an embeddings call's answer is the largest a
# provider gives, 2048 inputs of 3072 floats each (OpenAI's limits) written as JSON one float a
# line ("        -0.0012345678,\n", about 25 bytes) is 6.3 M floats, about 150 MiB.
_MAX_ANSWER_BYTES = 256 * 1024 * 1024
_MAX_PARTS_AT_ONCE = 4  # requests in flight for one call sent in parts (Exchange.more_bodies)
# Provider keys (masked with asterisks, as OpenAI quotes a wrong one, or with an ellipsis),
# and the OpenAI organization and project ids its rate-limit messages name ("... in project
# proj_... organization org-... on tokens per min", vercel/ai#6534): the operator's account,
# none of a caller's business.
_SECRET_LIKE = re.compile(r"\b(?:sk|key|AIza)[-_A-Za-z0-9*]{8,}"
                          r"|\bsk-[-_A-Za-z0-9]*(?:\.\.\.|\u2026)[-_A-Za-z0-9]+"
                          r"|\b(?:org-|proj_)[A-Za-z0-9]{16,}")

# In-band errors the caller must fix, a 400 as they would be as a response (never retried
# elsewhere): OpenAI's type for them, and the Responses API's ResponseError codes for a
# prompt or an image it refuses (the enum in OpenAI's API spec; its other codes,
# server_error, rate_limit_exceeded and vector_store_timeout, are the provider's).
_CALLERS_STREAM_ERRORS = (
    "invalid_request_error", "invalid_prompt", "invalid_image", "invalid_image_format",
    "invalid_base64_image", "invalid_image_url", "image_too_large", "image_too_small",
    "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
    "image_file_too_large", "unsupported_image_media_type", "empty_image_file",
    "failed_to_download_image", "image_file_not_found")
# In-band error types (or codes) -> the status a caller would have seen had it come as a
# response. (`rate_limit_exceeded`: the Responses API's code for it, in `response.failed`;
# `too_many_requests`: the type of its live `error` event, openai/openai-dotnet#881.
# Anthropic's error types and Gemini's google.rpc statuses map as their responses do: the
# Anthropic API's errors page; Gemini's troubleshooting page, google.rpc.Code.)
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "RESOURCE_EXHAUSTED": 429,
                        "UNAVAILABLE": 503, "api_error": 502, "server_error": 502,
                        "rate_limit_exceeded": 429, "too_many_requests": 429,
                        "authentication_error": 401, "permission_error": 403,
                        "not_found_error": 404, "request_too_large": 413,
                        "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
                        "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                        "NOT_FOUND": 404, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504,
                        **dict.fromkeys(_CALLERS_STREAM_ERRORS, 400)}


@dataclass(slots=True)
class Exchange:
    """One planned upstream call and how to turn its answer into the caller's format."""

    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool
    # Non-stream: upstream JSON -> (client JSON or None to forward the bytes untouched, usage).
    decode: Callable[[dict[str, Any]], tuple[dict[str, Any] | None, Usage | None]]
    # Stream: builds the codec for this call (providers/streams.py).
    codec: Callable[[], Any] | None = None
    # Non-stream: more bodies for the same URL, when one request cannot carry the call (a
    # provider's batch limit), and how the JSON answers to all of them, in order, combine
    # into the one `decode` reads (which then gives the client JSON).
    more_bodies: tuple[bytes, ...] = ()
    combine: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    # What each body (`body`, then `more_bodies`) costs once its provider has answered it:
    # when another part fails, the call is billed the parts answered (their provider bills
    # each request it answers, Gemini's batchEmbedContents does).
    part_usage: tuple[Usage, ...] = ()


class HTTPAdapter:
    """Base class of the provider adapters (see gateway.upstream.ProviderAdapter)."""

    type_name = "http"
    wire_format = ""  # the API the provider speaks: "openai", "anthropic" or "gemini"
    default_base_url = ""
    operations: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 512,
        max_connections_per_host: int = 0,
        max_answer_bytes: int = _MAX_ANSWER_BYTES,
        headers: dict[str, str] | None = None,
    ) -> None:
        url = base_url or self.default_base_url
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"a {self.type_name} provider needs an http(s) base_url, "
                              f"not {_url_shown(url)}.")
        self.base_url = url.rstrip("/")
        if not _authority_readable(self.base_url):
            # (aiohttp refused every call, a 500; a "/", "?" or "#" in a proxy's password
            # ends its host early, and the rest of the password became the port)
            raise ConfigError(f"a {self.type_name} provider's base_url "
                              f"{_url_shown(self.base_url)} has no host and port that can be "
                              "read: a port is a number from 1 to 65535, and a '/', '?', '#' or "
                              "'@' in a user:password@ must be percent-encoded (%2F, %3F, "
                              "%23, %40).")
        if "?" in self.base_url or "#" in self.base_url:
            # (a query would end up before every path the adapter appends, silently sent
            # nowhere: headers go in headers=, the key in api_key_env)
            raise ConfigError(f"a {self.type_name} provider's base_url must have no query or "
                              f"fragment (not {_url_shown(self.base_url)}): put headers in "
                              "headers=, the key in api_key_env.")
        self.api_key_env = env_name(api_key_env, f"Provider({self.type_name!r}) api_key_env") \
            if api_key_env else None
        self.timeouts = timeouts or Timeouts()
        if not isinstance(self.timeouts, Timeouts):
            raise ConfigError(f"a {self.type_name} provider's timeouts must be "
                              f"Timeouts(...), not {self.timeouts!r}.")
        for name in ("max_connections", "max_connections_per_host"):
            value = max_connections if name == "max_connections" else max_connections_per_host
            if type(value) is not int or value < 0 or (name == "max_connections" and not value):
                raise ConfigError(f"a {self.type_name} provider's {name} must be a "
                                  f"{'positive' if name == 'max_connections' else 'whole'} "
                                  f"number{'' if name == 'max_connections' else ' (0: none)'}, "
                                  f"not {value!r}.")
        if type(max_answer_bytes) is not int or max_answer_bytes < 1:
            raise ConfigError(f"a {self.type_name} provider's max_answer_bytes must be a "
                              f"positive number of bytes, not {max_answer_bytes!r}.")
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        # (an answer is read whole before it is decoded: an endless or huge one would take
        # all the memory there is; one over this is a 502 bad_response)
        self.max_answer_bytes = max_answer_bytes
        self.extra_headers = _checked_headers(self.type_name, headers)
        self._check_url_credentials()
        self.name = self.type_name
        self._api_key = ""
        self._secrets: set[str] = set()  # deployments' own keys, seen in calls (for redact)
        self._session: aiohttp.ClientSession | None = None
        # `connect` also bounds DNS and the wait for a free pooled connection. First byte and
        # idle gaps of streams are timed in _call_stream; a non-stream answer comes whole
        # when the model is done, so only `total_s` bounds it.
        self._timeout = aiohttp.ClientTimeout(
            total=self.timeouts.total_s, connect=self.timeouts.connect_s,
            sock_connect=self.timeouts.connect_s)

    def _check_url_credentials(self) -> None:
        self.check_url_credentials(keyed=bool(self.api_key_env))

    def check_url_credentials(self, *, keyed: bool) -> None:
        """A base URL's `user:password@` (for an authenticating proxy in front of the
        provider) goes, as HTTP Basic, in the Authorization header: not where a key goes
        there too (the OpenAI family's Bearer: `keyed`, the provider's own key or a
        deployment's), nor with an Authorization of `headers=` (aiohttp refused every call,
        a 500). Anthropic's, Gemini's and Azure's keys travel in headers of their own, and a
        server that takes no key has none: those keep it."""
        if "@" not in urlsplit(self.base_url).netloc:
            return
        filled = {name.lower() for name in self.extra_headers}
        if keyed:
            filled.update(name.lower() for name in self.key_headers(""))
        if "authorization" in filled:
            raise ConfigError(f"Provider({self.type_name!r}): its base_url "
                              f"({_url_shown(self.base_url)}) cannot carry user:password@: "
                              "they would go in the Authorization header, which its key or "
                              "headers= fills.")

    # -- configuration and lifecycle ----------------------------------------------------------

    def resolve(self, name: str) -> None:
        self.name = name
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip()  # (a trailing newline)
            if not key:
                shown = self.api_key_env if env_name_shown(self.api_key_env) else \
                    "its api_key_env names (not shown)"
                raise ConfigError(f"provider {name!r} needs the environment variable {shown}, "
                                  "which is not set.")
            self._api_key = key

    def supports(self, operation: str) -> bool:
        return operation in self.operations

    async def startup(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=self.max_connections_per_host,
                keepalive_timeout=75, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("user-agent",))

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what subclasses provide -------------------------------------------------------------

    def plan(self, ctx: RequestContext, deployment: Deployment) -> Exchange:
        raise NotImplementedError

    def parse_error(self, status: int, body: bytes) -> tuple[str, str]:
        """(error type, message) from a provider error body."""
        raise NotImplementedError

    def native_error(self, error_type: str, body: bytes) -> tuple[str | None, str | None,
                                                                  str | None]:
        """(type, code, param) as the provider's error body gave them, for a caller of the
        same format; by default the type `parse_error` found, alone."""
        return error_type, None, None

    def retry_after(self, status: int, headers: Mapping[str, str], body: bytes) -> str | None:
        """The Retry-After of an error answer with `status` (delta-seconds or an HTTP date),
        which the failover layer waits or cools the deployment down for, and the caller is
        given: its header, by default; a provider that says it elsewhere reads it there."""
        return headers.get("retry-after")

    def key_headers(self, secret: str) -> dict[str, str]:
        """The headers that carry a provider key (each provider family names its own)."""
        raise NotImplementedError

    def broken_stream_ending(self, ctx: RequestContext, codec: Any, error: GatewayError,
                             by_provider: bool) -> bytes:
        """The last bytes of a stream that broke after it started: the gateway's ending in
        the caller's API, or nothing after the provider's own error event (`by_provider`:
        it went to the client as it was)."""
        if by_provider:
            return b""
        # (A Responses stream's `response.failed`: a server error in the words of a
        # ResponseError, whose codes are a closed set; its `error` event has the gateway's.)
        return stream_error_ending(ctx.api_format, error, operation=ctx.operation,
                                   sequence_number=getattr(codec, "next_sequence_number", 0),
                                   first_event=getattr(codec, "first_event", None))

    def redact(self, text: str) -> str:
        """Provider messages sometimes quote the key they were sent; never pass that on."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return _SECRET_LIKE.sub("[redacted]", text)

    # -- a health probe (`sluicegate doctor`) ------------------------------------------------

    def probe_request(self, secret: str) -> tuple[str, dict[str, str]]:
        """(URL, headers) of a cheap authenticated GET: the family's model list. With an
        empty `secret`, the headers carry no key (e.g. to show the URL)."""
        headers = dict(self.extra_headers)
        if secret:
            headers.update(self.key_headers(secret))
        return self.base_url + "/models", headers

    async def probe(self, key: ProviderKey | None = None, *,
                    timeout_s: float = 10.0) -> tuple[bool, str]:
        """GETs the model list with the provider's own key, or with `key` (a deployment's):
        (True, "HTTP 200") or (False, one redacted line saying why). Never follows a redirect
        (it would carry the key elsewhere); raises nothing but cancellation."""
        secret = self._api_key if key is None else key.secret
        if key is not None and key.secret:
            self._secrets.add(key.secret)
        url, headers = self.probe_request(secret)
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(self.timeouts.connect_s,
                                                                     timeout_s))
        session = self._session
        own = session is None
        if session is None:
            session = aiohttp.ClientSession(skip_auto_headers=("user-agent",))
        try:
            async with session.get(url, headers=headers, timeout=timeout,
                                   allow_redirects=False) as response:
                status = response.status
                if status < 300:
                    kind = response.headers.get("content-type", "")
                    if "json" not in kind.lower():
                        return False, (f"HTTP {status} but not JSON ({self.redact(kind)[:60]}); "
                                       "is base_url right?")
                    return True, f"HTTP {status}"
                if status < 400:
                    return False, f"HTTP {status}: a redirect, not followed (check base_url)"
                try:
                    body = await _read_capped(response, _MAX_ERROR_BODY)
                except (TimeoutError, aiohttp.ClientError):
                    body = b""
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return False, f"timed out after {timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return False, _one_line(f"cannot connect: {type(exc).__name__}: "
                                    f"{self.redact(str(exc))}")
        except OSError as exc:
            return False, _one_line(f"cannot connect: {type(exc).__name__}")
        finally:
            if own:
                await session.close()
        error_type, message = self.parse_error(status, body)
        return False, _one_line(f"HTTP {status} {self.redact(error_type)}: "
                                f"{self.redact(message)}")

    # -- the call ----------------------------------------------------------------------------

    # Operations the adapter answers itself, without a provider call (e.g. a local token
    # count where the provider has no counting endpoint).
    answered_locally: frozenset[str] = frozenset()

    async def answer_locally(self, ctx: RequestContext, send: Send) -> None:
        raise NotImplementedError

    async def call(self, ctx: RequestContext, deployment: Deployment, send: Send) -> None:
        if ctx.operation in self.answered_locally:
            try:
                await self.answer_locally(ctx, send)
            except GatewayError:
                raise
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                raise _unreadable(exc, "The request cannot be counted") from None
            return
        try:
            exchange = self.plan(ctx, deployment)
        except UntranslatableRequest:
            raise
        except GatewayError as error:
            raise UntranslatableRequest(error.status, error.message, code=error.code,
                                        param=error.param, error_type=error.error_type,
                                        headers=error.headers) from error
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise _unreadable(exc, "The request cannot be sent to this model") from None
        key = ctx.provider_key or (deployment.keys[0] if deployment.keys else None)
        if key is not None:
            exchange.headers.update(self.key_headers(key.secret))
            self._secrets.add(key.secret)
        ctx.provider, ctx.served_model = self.name, deployment.model
        attempt = Attempt(provider=self.name, deployment=deployment.name, status=0,
                          key=None if key is None else key.env)
        ctx.attempts.append(attempt)
        trace = ctx.trace
        span = None if trace is None else trace.start_attempt(
            self.type_name, self.name, deployment.model, exchange.url, exchange.headers)
        began = time.monotonic()
        failure: str | None = None
        # (a non-stream call's usage before it has its own: earlier calls' that failed and
        # cost something, `_call_json`)
        unbilled = None if exchange.stream else ctx.usage
        try:
            if exchange.stream:
                await self._call_stream(ctx, exchange, send, attempt)
            else:
                await self._call_json(ctx, exchange, send, attempt)
        except BaseException as exc:  # noted on the attempt's span, then on its way
            failure = attempt.error_type or getattr(exc, "upstream_error_type", None) or \
                type(exc).__name__
            if ctx.usage is unbilled and ctx.client_disconnected \
                    and attempt.status in (0, 200) and isinstance(exc, asyncio.CancelledError) \
                    and ctx.operation != ANTHROPIC_COUNT_TOKENS:  # (free)
                # The client left before the answer came (a stream cut after it started
                # bills itself). A departure is seen from `WATCH_AFTER_S` into the request
                # (gateway/disconnect.py), by when the request has as a rule gone out: the
                # provider bills its input at least.
                estimate = Usage(input_tokens=estimate_input_tokens(ctx))
                ctx.usage = estimate if exchange.stream else with_earlier_calls(ctx, estimate)
            raise
        finally:
            attempt.duration_s = time.monotonic() - began
            if span is not None:
                trace.end_attempt(span, ctx, attempt.status, failure or attempt.error_type)

    async def _post(self, exchange: Exchange) -> aiohttp.ClientResponse:
        assert self._session is not None, "provider used before startup"
        try:
            # No redirects: they would carry the provider key and the prompt to another host.
            return await self._session.post(exchange.url, data=exchange.body,
                                            headers=exchange.headers, timeout=self._timeout,
                                            allow_redirects=False)
        except aiohttp.ServerTimeoutError:
            raise self._timeout_error("waiting for the response") from None
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc) from None
        except TimeoutError:
            raise self._timeout_error("waiting for the response") from None

    async def _raise_for_status(self, response: aiohttp.ClientResponse, attempt: Attempt) -> None:
        attempt.status = response.status
        if response.status < 300:
            return
        try:
            body = await _read_capped(response, _MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            body = b""
        finally:
            response.release()
        error_type, message = self.parse_error(response.status, body)
        error_type = self.redact(error_type)  # (it reaches the caller as `code`, and logs)
        attempt.error_type = error_type
        status = response.status if response.status >= 400 else 502  # a redirect we won't follow
        raise self._failure(status, f"Provider '{self.name}' returned {response.status}: "
                                    f"{self.redact(message)}", error_type, body,
                            response.headers,
                            self.wire_format if status == response.status else None)

    def _failure(self, status: int, said: str, error_type: str, body: bytes,
                 headers: Mapping[str, str], wire_format: str | None) -> UpstreamError:
        """The UpstreamError of a failed call (`error_type` redacted already)."""
        native_type, native_code, param = (self._redacted(field) for field in
                                           self.native_error(error_type, body))
        return UpstreamError(
            status, said, provider=self.name, error_type=error_type,
            retry_after=self.retry_after(status, headers, body),
            # A provider key that fails auth or billing may work on another deployment.
            retryable=status in (401, 402, 403, 408, 429) or status >= 500,
            wire_format=wire_format, native_type=native_type, native_code=native_code,
            param=param)

    def _error_answered(self, error: dict[str, Any], body: bytes,
                        attempt: Attempt) -> UpstreamError:
        """The failure a 200 reports in its body instead of an answer: `{"error": {...}}`,
        as OpenRouter answers an error met while generating, and some OpenAI-compatible
        servers and proxies do. It is the call's failure, as the same error sent with its
        status would be (retried, failed over, never cached or answered as an empty
        message): at the status its `code` gives (a number from 400 to 599), else 502."""
        code = error.get("code")
        status = code if type(code) is int and 400 <= code <= 599 else 502
        error_type, message = self.parse_error(status, body)
        error_type = self.redact(error_type)
        attempt.status, attempt.error_type = status, error_type
        # (a delay it names in the body, as Gemini's RetryInfo, is waited for as a header's)
        return self._failure(status, f"Provider '{self.name}' answered 200 with an error: "
                                     f"{self.redact(message)}", error_type, body, {}, None)

    def _redacted(self, text: str | None) -> str | None:
        return None if text is None else self.redact(text)

    async def _call_json(self, ctx: RequestContext, exchange: Exchange, send: Send,
                         attempt: Attempt) -> None:
        parts: list[bytes] | None = None
        if exchange.more_bodies:
            raw, parts = b"", await self._read_answers(ctx, exchange, attempt)
        else:
            raw = await self._read_answer(exchange, attempt)
        ctx.first_byte_s = time.monotonic() - ctx.started_monotonic
        try:
            payload = orjson.loads(raw) if parts is None else _combined(exchange, parts)
            if (error := _answered_error(payload)) is not None:
                raise self._error_answered(error, raw, attempt)
            if ctx.trace is not None:
                ctx.finish_reasons = finish_reasons(payload)
                ctx.response_model = reported_model(payload)
            client_json, ctx.usage = exchange.decode(payload)
            if client_json is not None:  # (orjson's JSONEncodeError, nested too deep, a TypeError)
                raw = orjson.dumps(client_json)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UpstreamError(502, f"Provider '{self.name}' sent an unreadable response "
                                     f"({type(exc).__name__}).", provider=self.name,
                                error_type="bad_response") from None
        assert raw, "an answer combined from parts is the decoder's client JSON"
        answer = payload if client_json is None else client_json
        ctx.sent_json = (raw, answer)
        if ctx.usage is None:  # (a server that sends none: billed what it answered)
            ctx.usage = answered_usage(ctx, answer)
        # An earlier call of the request that failed may have cost something (a call sent in
        # parts, some of them answered: `_read_answers`). (A stream's earlier attempt, broken
        # and continued, is the failover layer's to add.)
        ctx.usage = with_earlier_calls(ctx, ctx.usage)
        headers = [*JSON_RESPONSE_HEADERS, (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    async def _read_answer(self, exchange: Exchange, attempt: Attempt) -> bytes:
        response = await self._post(exchange)
        await self._raise_for_status(response, attempt)
        try:
            if (response.content_length or 0) <= self.max_answer_bytes:
                body = await _read_capped(response, self.max_answer_bytes + 1)
                if len(body) <= self.max_answer_bytes:
                    return body
            response.close()  # (the rest unread: the connection cannot be used again)
        except TimeoutError:  # (total_s, after the headers; aiohttp's ServerTimeoutError too)
            raise self._timeout_error("reading the response") from None
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc) from None
        finally:
            response.release()
        attempt.error_type = "bad_response"
        raise UpstreamError(502, f"Provider '{self.name}' sent a response larger than its "
                                 f"max_answer_bytes ({self.max_answer_bytes}).",
                            provider=self.name, error_type="bad_response")

    async def _read_answers(self, ctx: RequestContext, exchange: Exchange,
                            attempt: Attempt) -> list[bytes]:
        """The answers to each of the exchange's bodies, in order, a few posted at once. The
        first failure is the call's, and the attempt's status and error type are that
        part's; after it no other part is sent, and the parts in flight are waited for: sent,
        they are answered and billed whether read or not. Those answered are billed
        (`Exchange.part_usage`)."""
        slots = asyncio.Semaphore(_MAX_PARTS_AT_ONCE)
        bodies = (exchange.body, *exchange.more_bodies)
        records = [replace(attempt) for _ in bodies]  # each part's own (they end in any order)
        failed: list[tuple[Attempt, Exception]] = []

        async def answer(body: bytes, record: Attempt) -> bytes | None:
            async with slots:
                if failed:
                    return None
                try:
                    return await self._read_answer(replace(exchange, body=body, more_bodies=()),
                                                   record)
                except Exception as exc:  # noqa: BLE001 (the call raises it: below)
                    failed.append((record, exc))
                    return None

        # (cancelled, the call cancels every part: gather's)
        answers = await asyncio.gather(*map(answer, bodies, records))
        if failed:
            record, error = failed[0]
            attempt.status, attempt.error_type = record.status, record.error_type
            answered = [usage for got, usage in zip(answers, exchange.part_usage, strict=False)
                        if got is not None]
            if answered:
                ctx.usage = bill_failed_call(ctx, functools.reduce(add_usage, answered))
            raise error
        attempt.status = records[-1].status
        return [got for got in answers if got is not None]

    async def _call_stream(self, ctx: RequestContext, exchange: Exchange, send: Send,
                           attempt: Attempt) -> None:
        assert exchange.codec is not None
        codec = exchange.codec()
        response: aiohttp.ClientResponse | None = None
        deadline = StreamDeadline(self.timeouts.first_byte_s, self.timeouts.idle_s,
                                  self.timeouts.total_s)
        finished = False
        broken: GatewayError | None = None
        # Content deltas sent on (what a stream cut short is billed at least: gateway/sse.py).
        delivered = [0]
        # How they are counted, from the stream's first bytes (`gateway.sse.delivered_counting`:
        # one `bytes.count` of a marker a message; the opening's hits are taken off only when
        # the count is used, `_final_usage`).
        marker: bytes | None = None
        count: ContentCount | None = None
        first = b""
        try:
            try:
                async with deadline:
                    response = await self._post(exchange)
                    await self._raise_for_status(response, attempt)
                    opening = b""
                    if "content-type" in response.headers and \
                            response.content_type != "text/event-stream":
                        opening = await self._sniffed_events(response, attempt)
                    first = await self._first_events(response, codec, opening)
                    marker, count = delivered_counting(ctx.operation, first)
                    ctx.first_byte_s = time.monotonic() - ctx.started_monotonic
                    ctx.first_event = getattr(codec, "first_event", None)
                    ctx.response_model = getattr(codec, "reported_model", None)
                    await send({"type": "http.response.start", "status": 200,
                                "headers": SSE_RESPONSE_HEADERS})
                    deadline.streaming = True
                    try:
                        last = await self._relay(response, codec, send, first, deadline,
                                                 delivered, marker, count)
                        tail = await self._finish_codec(codec, last, send, delivered, marker,
                                                        count, deadline)
                        _count_delivered(delivered, tail, marker, count)  # (sent below)
                        finished = True
                    except StreamErrorTypes as exc:
                        broken = self._mid_stream_error(exc)
            except TimeoutError:
                if deadline.waiting_on_client:
                    raise self._client_gone(ctx) from None
                if not deadline.streaming:
                    raise self._timeout_error("waiting for the first event") from None
                broken = self._mid_stream_error(TimeoutError())
            # The provider's own error event went to the client (a Responses stream's): it
            # is the stream's error, even when the stream then broke before its last event.
            sent: StreamError | None = getattr(codec, "sent_error", None)
            ended_by_provider = False
            if broken is not None and sent is not None:
                broken, ended_by_provider = self._mid_stream_error(sent), True
            if broken is not None:
                # (the attempt failed, though its status is 200: its span says so, as it
                # says so of a call that failed before output)
                attempt.error_type = broken.code
                # The failover layer goes on from elsewhere, unless the client already has
                # the provider's error event.
                if ctx.continue_streams and not ended_by_provider:
                    raise StreamInterrupted(broken)
                ctx.error_type, ctx.stream_error = broken.code, broken
                tail = self.broken_stream_ending(ctx, codec, broken, ended_by_provider)
            # (set before the last message: a layer may record the request as it passes,
            # the metering layer's durability="response" does)
            ctx.usage = _final_usage(ctx, codec, finished, deadline.streaming,
                                     (delivered[0], first, marker))
            _let_go(response, finished)  # (the upstream is done with: not held by the client)
            try:
                async with asyncio.timeout_at(deadline.total_at):
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
            except TimeoutError:
                raise self._client_gone(ctx) from None
        finally:
            _let_go(response, finished)
            ctx.usage = _final_usage(ctx, codec, finished, deadline.streaming,
                                     (delivered[0], first, marker))

    async def _sniffed_events(self, response: aiohttp.ClientResponse,
                              attempt: Attempt) -> bytes:
        """The first bytes of a stream answered with another content type: events all the
        same when they read as such (LitServe's OpenAI spec says `application/x-ndjson`,
        some proxies `application/json`, of a body of `data:` events, which the SDKs read);
        a JSON body is a server that ignored `stream` (502, no event in it)."""
        try:
            opening = await response.content.readany()
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc) from None
        start = opening.lstrip()[:6]
        if start.startswith((b"data:", b"event:", b":", b"id:", b"retry:")) or (
                not start and opening):
            return opening
        if start.startswith(b"{"):  # an error answered with 200, as a non-stream one is
            try:
                body = opening + await _read_capped(response, _MAX_ERROR_BODY)
                payload = orjson.loads(body)
            except (aiohttp.ClientError, ValueError):
                payload = None
            if (error := _answered_error(payload)) is not None:
                raise self._error_answered(error, body, attempt)
        attempt.error_type = "bad_response"
        raise UpstreamError(502, f"Provider '{self.name}' answered a stream request without "
                                 "an event stream "
                                 f"({self.redact(response.content_type)[:60]}).",
                            provider=self.name, error_type="bad_response")

    async def _first_events(self, response: aiohttp.ClientResponse, codec: Any,
                            opening: bytes = b"") -> bytes:
        """Reads until the codec yields client bytes (`opening`: read already); failures
        here are still retryable."""
        try:
            if opening:
                out = codec.feed(opening)
                if out:
                    return bytes(out)
            while True:
                chunk = await response.content.readany()
                if not chunk:
                    out = codec.finish()
                    if out:
                        return bytes(out)
                    raise UpstreamError(502, f"Provider '{self.name}' closed the stream before "
                                             "sending any event.", provider=self.name,
                                        error_type="empty_stream")
                out = codec.feed(chunk)
                if out:
                    return bytes(out)
        except StreamError as exc:
            what = "reported an error in its stream" if exc.from_provider else "sent a broken stream"
            raise self._stream_error(exc, f"Provider '{self.name}' {what}") from None
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc) from None

    async def _finish_codec(self, codec: Any, last: bytes, send: Send, delivered: list[int],
                            marker: bytes | None, count: ContentCount | None,
                            deadline: StreamDeadline) -> bytes:
        """The stream's last bytes once the upstream ended. An error found at the end (a
        stream without its final event, a last error event) is raised after the output
        before it has gone out."""
        error: StreamError | None
        try:
            out: bytes = codec.finish()
            error = codec.error
        except StreamError as exc:
            out, error = b"", exc
        tail = last + out
        if error is None:
            return tail
        if tail:
            deadline.pause()
            await send({"type": "http.response.body", "body": tail, "more_body": True})
            _count_delivered(delivered, tail, marker, count)
        raise error

    async def _relay(self, response: aiohttp.ClientResponse, codec: Any, send: Send,
                     pending: bytes, deadline: StreamDeadline, delivered: list[int],
                     marker: bytes | None, count: ContentCount | None) -> bytes:
        """Forwards the stream; returns the last bytes, to go out with the end of the body.

        Each output is sent as soon as the next read shows the upstream is not done, so a
        short stream (often one read) costs one body message. Every read moves the idle
        deadline on, and so does the end of every send: the time a send waits on the client
        (one that reads slowly) is not the provider's (`StreamDeadline.pause`).
        """
        content = response.content
        while True:
            if codec.error is not None:
                deadline.pause()
                await send({"type": "http.response.body", "body": pending, "more_body": True})
                _count_delivered(delivered, pending, marker, count)
                raise codec.error
            if content.at_eof():
                return pending
            if pending:
                deadline.pause()
                await send({"type": "http.response.body", "body": pending, "more_body": True})
                deadline.touch()
                if marker is not None:  # (`_count_delivered`, inline: it runs every message)
                    delivered[0] += pending.count(marker)
                else:
                    _count_delivered(delivered, pending, marker, count)
            chunk = await content.readany()
            if not chunk:
                return b""
            deadline.touch()
            pending = codec.feed(chunk)

    def _mid_stream_error(self, exc: BaseException) -> UpstreamError:
        """What ends a stream that broke after it started (sent in-band)."""
        if isinstance(exc, StreamError):
            return self._stream_error(exc, f"Provider '{self.name}' failed mid-stream")
        if isinstance(exc, asyncio.TimeoutError):
            error_type, message = "timeout", "the stream timed out (idle gap or total time)"
        else:
            error_type, message = "connection_error", "the connection broke mid-stream"
        return UpstreamError(502, f"Provider '{self.name}' failed mid-stream: {message}",
                             provider=self.name, error_type=error_type)

    def _stream_error(self, exc: StreamError, what: str) -> UpstreamError:
        """An error event (or a broken stream) as an UpstreamError with the status its type
        would have had as a response; the provider's own words kept for its own format."""
        status = _stream_error_status(exc) if exc.from_provider else 502
        return UpstreamError(status, f"{what}: {self.redact(exc.message)}", provider=self.name,
                             error_type=self.redact(exc.error_type),
                             wire_format=self.wire_format if exc.from_provider else None,
                             native_type=self._redacted(exc.native_type),
                             native_code=self._redacted(exc.code),
                             param=self._redacted(exc.param))

    @staticmethod
    def _client_gone(ctx: RequestContext) -> ClientDisconnected:
        """A stream's end when its time (`total_s`) ran out while it waited on its client: a
        client that stopped reading, as one that left (billed what it was sent, no verdict on
        the provider, which had the next bytes ready)."""
        ctx.client_disconnected = True
        return ClientDisconnected()

    def _connection_error(self, exc: BaseException) -> UpstreamError:
        return UpstreamError(502, f"Could not reach provider '{self.name}': "
                                  f"{type(exc).__name__}.",
                             provider=self.name, error_type="connection_error", retryable=True)

    def _timeout_error(self, what: str) -> UpstreamError:
        return UpstreamError(504, f"Provider '{self.name}' timed out {what}.",
                             provider=self.name, error_type="timeout", retryable=True)


StreamErrorTypes = (StreamError, aiohttp.ClientError)


def _stream_error_status(error: StreamError) -> int:
    """The status of a provider's error event: by its type, else by its code (the live
    Responses API's `error` event may say `"type": "tokens"`, `"code":
    "rate_limit_exceeded"`, vercel/ai#6534), else 502."""
    status = _STREAM_ERROR_STATUS.get(error.error_type)
    if status is None and error.code is not None:
        status = _STREAM_ERROR_STATUS.get(error.code)
    return status or 502


def _combined(exchange: Exchange, parts: list[bytes]) -> dict[str, Any]:
    assert exchange.combine is not None, "an exchange sent in parts says how they combine"
    return exchange.combine([orjson.loads(part) for part in parts])


def finish_reasons(payload: Any) -> list[str] | None:
    """Why the model stopped, from an OpenAI, Anthropic or Gemini response (for traces)."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("stop_reason"), str):  # Anthropic
        return [payload["stop_reason"]]
    for field, key in (("choices", "finish_reason"), ("candidates", "finishReason")):
        items = payload.get(field)
        if isinstance(items, list):
            reasons = [str(item[key]) for item in items
                       if isinstance(item, dict) and item.get(key)]
            return reasons or None
    return None


class StreamDeadline:
    """One timer for a whole stream: first the time to the first event, then the longest
    idle gap between reads, and while the stream waits on its client, what is left of the
    total time (`waiting_on_client` then tells a client that stopped reading from a provider
    that stalled).

    `asyncio.timeout` would need its timer moved on every chunk (a cancelled handle and a new
    heap entry each time). Here a read only records a new deadline, and the timer, when it
    fires early, re-arms itself for it. On expiry the task is cancelled and the cancellation
    leaves the `async with` as TimeoutError, as with `asyncio.timeout`.
    """

    __slots__ = ("_expired", "_handle", "_loop", "_task", "deadline", "first_byte_s", "idle_s",
                 "streaming", "total_at", "total_s", "waiting_on_client")

    def __init__(self, first_byte_s: float, idle_s: float, total_s: float) -> None:
        self.first_byte_s = first_byte_s
        self.idle_s = idle_s
        self.total_s = total_s
        self.streaming = False  # set once the response has started
        self.waiting_on_client = False  # between a `pause` and the next `touch`
        self.deadline = self.total_at = 0.0
        self._expired = False
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Self:
        task = asyncio.current_task()
        assert task is not None
        self._task, self._loop = task, task.get_loop()
        now = self._loop.time()
        self.deadline, self.total_at = now + self.first_byte_s, now + self.total_s
        self._handle = self._loop.call_at(self.deadline, self._on_timer)
        return self

    def touch(self) -> None:
        self.deadline = self._loop.time() + self.idle_s
        self.waiting_on_client = False

    def pause(self) -> None:
        """Holds the idle clock until the next `touch`: while the stream waits on its client
        (a send held by a client that reads slowly), which says nothing about the provider.
        Such a wait was taken for the provider's idle gap: the stream was cut as a provider
        failure, counted against its deployment (and its breaker), and continued elsewhere.
        The wait still ends with the total time: the server's send to a client that stopped
        reading waits for as long as it stays away, and aiohttp's `total` fires only in a
        read that waits, never while the stream waits here (the connection was held, a slot
        of the provider's pool, until the client left)."""
        self.deadline, self.waiting_on_client = self.total_at, True
        handle = self._handle
        if handle is not None and handle.when() > self.total_at:  # (due after it: sooner)
            handle.cancel()
            self._handle = self._loop.call_at(self.total_at, self._on_timer)

    def _on_timer(self) -> None:
        now = self._loop.time()
        if self.deadline > now:  # (paused: looks again an idle gap later)
            self._handle = self._loop.call_at(min(self.deadline, now + self.idle_s),
                                              self._on_timer)
            return
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._expired and exc_type is asyncio.CancelledError and self._task.uncancel() == 0:
            raise TimeoutError from exc


def _unreadable(exc: Exception, what: str) -> UntranslatableRequest:
    """The refusal of a request a translator (or a local answer) could not read.

    Translators raise TranslationError, in API words, naming the field. Any other error is
    a request shape one of them failed to check: its Python words ("'int' object is not
    iterable") mean nothing to an API caller, so it gets the API's, and the log the kind
    and place of the error (never its text, which may quote the request)."""
    if isinstance(exc, TranslationError):
        return UntranslatableRequest(400, f"{what}: {exc}", param=exc.param, code=exc.code)
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = "?" if frame is None else \
        f"{frame.tb_frame.f_code.co_filename.rpartition('/')[2]}:{frame.tb_lineno}"
    logger.warning("a request shape was not checked before it was read: %s at %s",
                   type(exc).__name__, where)
    return UntranslatableRequest(400, f"{what}: a field has a type or value this model's API "
                                      "does not take; check the request against the API "
                                      "reference.", code="invalid_request")


def _one_line(text: str, limit: int = 240) -> str:
    """`text` on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to `limit` bytes (one `read(n)` returns only what is buffered so far)."""
    parts, size = [], 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _let_go(response: aiohttp.ClientResponse | None, finished: bool) -> None:
    """A stream's upstream response, once the gateway is done with it: a finished one goes
    back to the pool; one cut short (an error, a timeout, the client gone) is closed, so the
    provider stops generating."""
    if response is not None and finished:
        response.release()
    elif response is not None:
        response.close()


def _count_delivered(delivered: list[int], sent: bytes, marker: bytes | None,
                     count: ContentCount | None) -> None:
    """Adds the content deltas of bytes sent on to `delivered` by `marker`, else by `count`
    (`gateway.sse.delivered_counting`); the opening's are taken off at the end."""
    if marker is not None:
        delivered[0] += sent.count(marker)
    elif count is not None:
        delivered[0] += count(sent)


# The members an answer has, whatever the API (chat and completions' `choices`, Responses'
# `output`, embeddings' `data`, Anthropic's `content`, Gemini's `candidates`, `embedding` and
# `embeddings`): a 200 with an `error` object and none of them is a failure (`_error_answered`).
_ANSWER_KEYS = frozenset({"choices", "output", "data", "content", "candidates", "embedding",
                          "embeddings"})


def _answered_error(payload: Any) -> dict[str, Any] | None:
    """The error a 200 reports in its body instead of an answer (an error and none of
    `_ANSWER_KEYS`), as an object (some servers send a bare message), else None."""
    if type(payload) is not dict or payload.get("error") is None \
            or not _ANSWER_KEYS.isdisjoint(payload):
        return None
    error = payload["error"]
    return error if type(error) is dict else {"message": str(error)}


def _url_shown(url: Any) -> str:
    """A base URL as an error may print it: without credentials, query or fragment (each may
    hold a secret); what is not a string, by its type alone."""
    if not isinstance(url, str):
        return "None" if url is None else type(url).__name__
    from gateway.doctor import redact_target
    return repr(redact_target(url))


def _authority_readable(url: str) -> bool:
    """Whether `url` has a host, and a port (if any) from 1 to 65535, where aiohttp (yarl)
    and urllib find them (RFC 3986: the authority ends at the first "/", "?" or "#")."""
    try:
        parts = urlsplit(url)
        port = parts.port  # (a ValueError for one that is not a number up to 65535)
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


# RFC 9110 5.5: a value holds no control character but the tab, and a CR or LF would end
# the header early. (A name: `gateway.config.is_header_name`.)
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")


def _checked_headers(type_name: str, headers: object) -> dict[str, str]:
    """`headers=` as a dict of header names to string values, else a ConfigError that names
    the header but never shows a value (an Authorization's holds a key). aiohttp took any
    and refused each at every call, a 500."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"a {type_name} provider's headers must be a dict such as "
                          f"{{'x-org-id': 'org-1'}}, not {type(headers).__name__}.")
    for name, value in headers.items():
        if not is_header_name(name):
            raise ConfigError(f"a {type_name} provider's headers must be named by HTTP "
                              "header names (letters, digits and !#$%&'*+-.^_`|~), which one "
                              "of them is not (not shown: it may hold a key).")
        if not isinstance(value, str):
            raise ConfigError(f"a {type_name} provider's header {name!r} must be a string, "
                              f"not {type(value).__name__}.")
        if not _HEADER_VALUE.fullmatch(value):
            raise ConfigError(f"a {type_name} provider's header {name!r} holds a line break "
                              "or another control character, which HTTP does not allow (its "
                              "value is not shown).")
    return dict(headers)


def _final_usage(ctx: RequestContext, codec: Any, finished: bool, streaming: bool,
                 delivered: tuple[int, bytes, bytes | None]) -> Usage | None:
    """A stream's usage at its end: the codec's, or for a stream cut short after it started
    (the client left, the provider broke) at least what it delivered, as its provider may
    never have said (see `gateway.tokens.delivered_usage`). A stream that finished without
    a usage report (a provider or API version that sends none) is billed what it delivered
    too, never nothing. `delivered`: the marker's count of what was sent on, the stream's
    first bytes and the marker (`gateway.sse.opening_excess`, only when it is used). A
    stream that ended before its response started has none: it failed before any content
    (an error costs nothing), whatever its opening said (a translated Anthropic
    `message_start` gives a usage at once), as a passthrough stream's codec, which reads no
    usage from its held opening, has none; a client that left then is billed the estimate
    (`ProviderAdapter.call`)."""
    if not streaming:
        return None
    try:
        usage: Usage | None = codec.usage
    except (ValueError, TypeError, KeyError, AttributeError):  # (unreadable: none said)
        usage = None
    if finished and usage is not None:
        return usage
    return delivered_usage(ctx, usage, _content_deltas(ctx, delivered))


def _content_deltas(ctx: RequestContext, delivered: tuple[int, bytes, bytes | None]) -> int:
    counted, first, marker = delivered
    return max(0, counted - opening_excess(ctx.operation, first, marker)) if counted else 0
