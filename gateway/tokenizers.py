"""Local tokenizers: exact input-token counts where the model's tokenizer is on this machine.

Each deployment's tokenizer is resolved once, when the config loads (gateway/config.py), and
kept on the deployment; gateway/tokens.py counts with it and falls back to its heuristic
where there is none. Where a tokenizer comes from, first match wins:

1. explicit: `Deployment(tokenizer=...)`, or the first entry of the config module's
   `tokenizers` table (glob -> spec) matching the deployment's model id or public name: a
   `TiktokenFile` (a `.tiktoken` BPE file and the OpenAI split pattern its ranks go with), a
   `HuggingFaceTokenizer` (a `tokenizer.json`), any object with `encode(str) -> sequence`, or
   None for the heuristic. One that cannot load is a `TokenizerError` (the gateway refuses to
   start, never falls back silently).
2. automatic, for OpenAI model families by id (`AUTOMATIC_FAMILIES`): tiktoken's own
   encoding, only when tiktoken is installed and the encoding's file is already in
   tiktoken's cache with the expected hash. This module reads and checks that file itself and
   never calls tiktoken's loader, which would download a missing or damaged file (there may
   be no network; a download must never happen at startup or on a request). Unavailable
   means the heuristic, said at info level once per encoding when a config loads.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sized
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

__all__ = [
    "AUTOMATIC_FAMILIES", "ENCODINGS", "HuggingFaceTokenizer", "LoadedTokenizer", "OpenAIEncoding",
    "TiktokenFile", "Tokenizer", "TokenizerError", "automatic_tokenizer", "encoding_for_model",
    "load_tokenizer", "tiktoken_cache_dir",
]

logger = logging.getLogger("sluicegate")


class TokenizerError(Exception):
    """A configured tokenizer that cannot be used, stated as one sentence."""


class Tokenizer(Protocol):
    """Anything that turns text into tokens: the count is the length of what it returns."""

    def encode(self, text: str) -> Sized: ...


@dataclass(frozen=True, slots=True)
class TiktokenFile:
    """A `.tiktoken` BPE file (one `base64(token) rank` per line, tiktoken's own format) and
    the OpenAI split pattern its ranks were made with: "o200k" or "cl100k"."""

    path: str
    pattern: str = "o200k"


@dataclass(frozen=True, slots=True)
class HuggingFaceTokenizer:
    """A HuggingFace `tokenizer.json` (needs the `tokenizers` package). Counted without the
    special tokens, padding or truncation the file may ask for."""

    path: str


@dataclass(frozen=True, slots=True, eq=False)
class LoadedTokenizer:
    """A tokenizer ready to count: `count(text)` is its number of tokens; `source` says
    what it is (for check-config and logs)."""

    count: Callable[[str], int]
    source: str


@dataclass(frozen=True, slots=True)
class OpenAIEncoding:
    """One of OpenAI's encodings: its split pattern, and the file tiktoken would fetch."""

    name: str
    pattern: str
    url: str  # where tiktoken fetches it: its cache file is named by this URL's sha1
    sha256: str


# tiktoken_ext/openai_public.py (tiktoken 0.14.0); tests/gateway/test_tokenizers.py checks
# these against the installed tiktoken. Special tokens are left out: a count treats text such
# as "<|endoftext|>" in a prompt as text, as the provider does.
_O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
)
ENCODINGS = {
    "o200k": OpenAIEncoding(
        "o200k_base",
        "|".join(_O200K_PATTERN),
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k": OpenAIEncoding(
        "cl100k_base",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}

# Model ids (lower-cased, without a "provider/" prefix or a fine-tune's "ft:") -> encoding,
# as tiktoken.model maps them; the first pattern that matches wins.
AUTOMATIC_FAMILIES = (
    ("o200k", ("gpt-4o*", "gpt-4.1*", "gpt-4.5*", "gpt-5*", "o1*", "o3*", "o4*",
               "chatgpt-4o*")),
    ("cl100k", ("gpt-4", "gpt-4-*", "gpt-3.5-turbo*", "text-embedding-3-*",
                "text-embedding-ada-002")),
)


def load_tokenizer(spec: Any) -> LoadedTokenizer:
    """A configured tokenizer, loaded and tried once; TokenizerError when it cannot count."""
    if isinstance(spec, LoadedTokenizer):
        return spec
    if isinstance(spec, TiktokenFile):
        loaded = _load_tiktoken_file(spec)
    elif isinstance(spec, HuggingFaceTokenizer):
        loaded = _load_huggingface_file(spec.path)
    elif callable(getattr(spec, "encode", None)) and not isinstance(spec, (str, bytes)):
        loaded = _wrap_object(spec)  # (a str has an encode(), to bytes: no tokenizer)
    else:
        raise TokenizerError(f"{spec!r} is not a tokenizer: give a TiktokenFile(path, "
                             "pattern=...), a HuggingFaceTokenizer(path), an object with "
                             "encode(text), or None.")
    try:
        tokens = loaded.count("Hello, world")
    except Exception as exc:  # noqa: BLE001 (the operator's object may raise anything)
        raise TokenizerError(f"{loaded.source} failed to encode a test text: "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(tokens, int) or tokens < 1:
        raise TokenizerError(f"{loaded.source} counted {tokens!r} tokens in a test text; "
                             "encode(text) must return a sequence of tokens.")
    return loaded


# -- explicit sources: memoized per file (and its size and time), so every deployment and
# reload in a process shares one loaded copy ---------------------------------------------

_FILES: dict[tuple[Any, ...], LoadedTokenizer] = {}


def _file_key(kind: str, path: str, extra: str = "") -> tuple[Any, ...]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise TokenizerError(f"the tokenizer file {path} cannot be read: "
                             f"{exc.strerror or type(exc).__name__}.") from None
    return kind, os.path.abspath(path), extra, stat.st_size, stat.st_mtime_ns


def _load_tiktoken_file(spec: TiktokenFile) -> LoadedTokenizer:
    pattern = spec.pattern.removesuffix("_base")
    if pattern not in ENCODINGS:
        raise TokenizerError(f"TiktokenFile({spec.path!r}): pattern must be one of "
                             f"{', '.join(ENCODINGS)}, not {spec.pattern!r}.")
    key = _file_key("tiktoken", spec.path, pattern)
    if key not in _FILES:
        try:
            with open(spec.path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise TokenizerError(f"the tokenizer file {spec.path} cannot be read: "
                                 f"{exc.strerror or type(exc).__name__}.") from None
        encoding = _encoding(ENCODINGS[pattern], _parse_ranks(data, spec.path),
                             f"tiktoken {os.path.basename(spec.path)}")
        _FILES[key] = LoadedTokenizer(encoding, f"tiktoken {spec.path} ({pattern})")
    return _FILES[key]


def _parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"the tokenizer file {where} is not a .tiktoken file: line "
                                 f"{number} is not 'base64-token rank'.") from None
    # A byte with no rank of its own makes tiktoken's encoder panic on any text holding it.
    missing = sum(1 for byte in range(256) if bytes([byte]) not in ranks)
    if missing:
        raise TokenizerError(f"the tokenizer file {where} has no rank for {missing} of the 256 "
                             "single bytes, so it cannot encode every text.")
    return ranks


def _encoding(encoding: OpenAIEncoding, ranks: dict[bytes, int], name: str) -> Callable[[str], int]:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("a .tiktoken file needs the tiktoken package (pip install "
                             "'sluicegate[tokenizers]').") from None
    try:
        bpe = tiktoken.Encoding(name, pat_str=encoding.pattern, mergeable_ranks=ranks,
                                special_tokens={})
    except Exception as exc:  # noqa: BLE001 (tiktoken's core raises its own types)
        raise TokenizerError(f"tiktoken refused the ranks of {name}: {exc}") from None
    encode = bpe.encode_ordinary
    return lambda text: len(encode(text))


def _load_huggingface_file(path: str) -> LoadedTokenizer:
    key = _file_key("huggingface", path)
    if key not in _FILES:
        hf = _huggingface_module()
        try:
            tokenizer = hf.Tokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 (the Rust core raises plain Exception)
            raise TokenizerError(f"the tokenizer file {path} is not a HuggingFace "
                                 f"tokenizer.json: {_first_line(exc)}") from None
        _FILES[key] = LoadedTokenizer(_huggingface_count(tokenizer), f"tokenizer.json {path}")
    return _FILES[key]


def _huggingface_module() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("a tokenizer.json needs the tokenizers package (pip install "
                             "tokenizers, or 'sluicegate[semantic]').") from None
    return tokenizers


def _huggingface_count(tokenizer: Any) -> Callable[[str], int]:
    # A tokenizer.json may pad or truncate every encoding (all-MiniLM's pads to 128): counts
    # want neither, nor the special tokens a model input gets ([CLS], [SEP]).
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encode = tokenizer.encode
    return lambda text: len(encode(text, add_special_tokens=False))


def _wrap_object(tokenizer: Any) -> LoadedTokenizer:
    source = f"the tokenizer {type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    # A tiktoken.Encoding's encode() raises on a prompt holding special-token text
    # ("<|endoftext|>"): a 500 for the caller. encode_ordinary() counts it as text.
    if callable(getattr(tokenizer, "encode_ordinary", None)):
        encode_ordinary = tokenizer.encode_ordinary
        return LoadedTokenizer(lambda text: len(encode_ordinary(text)), source)
    if type(tokenizer).__module__.split(".")[0] == "tokenizers" and \
            callable(getattr(tokenizer, "to_str", None)):  # a HuggingFace Tokenizer: a copy,
        copy = _huggingface_module().Tokenizer.from_str(tokenizer.to_str())  # (ours to unpad)
        return LoadedTokenizer(_huggingface_count(copy), source)
    encode = tokenizer.encode
    return LoadedTokenizer(lambda text: len(encode(text)), source)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# -- the automatic source: tiktoken's cache, read and checked here -----------------------

# (encoding, cache file) -> the tokenizer, or None and why not
_AUTOMATIC: dict[tuple[str, str], tuple[LoadedTokenizer | None, str]] = {}


def automatic_tokenizer(model_id: str, logged: set[str] | None = None
                        ) -> LoadedTokenizer | None:
    """tiktoken's encoding for an OpenAI model id, when its file is in tiktoken's cache;
    else None (the heuristic). Read once per encoding and cache file in a process; said at
    info level once per encoding named in `logged` (a config load's set)."""
    pattern = encoding_for_model(model_id)
    if pattern is None:
        return None
    encoding = ENCODINGS[pattern]
    directory = tiktoken_cache_dir()
    path = os.path.join(directory, hashlib.sha1(encoding.url.encode()).hexdigest()) \
        if directory else ""
    key = (pattern, path)
    if key not in _AUTOMATIC:
        _AUTOMATIC[key] = _from_cache(encoding, path)
    tokenizer, why = _AUTOMATIC[key]
    if logged is not None and encoding.name not in logged:
        logged.add(encoding.name)
        if tokenizer is None:
            logger.info("token counts for %s models are estimated: %s", encoding.name, why)
        else:
            logger.info("token counts for %s models are exact: tiktoken's cached %s",
                        encoding.name, path)
    return tokenizer


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps its encodings (tiktoken/load.py: read_file_cached); "" when its
    cache is turned off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def encoding_for_model(model_id: str) -> str | None:
    """The `ENCODINGS` key of an OpenAI model id ("o200k", "cl100k"), None for others."""
    name = model_id.rsplit("/", 1)[-1].lower().removeprefix("ft:")
    for pattern, globs in AUTOMATIC_FAMILIES:
        if any(fnmatchcase(name, glob) for glob in globs):
            return pattern
    return None


def _from_cache(encoding: OpenAIEncoding, path: str) -> tuple[LoadedTokenizer | None, str]:
    data, why = _cached_file(encoding, path)
    if data is None:
        return None, why
    count = _encoding(encoding, _parse_ranks(data, path), encoding.name)
    return LoadedTokenizer(count, f"tiktoken {encoding.name}"), ""


def _cached_file(encoding: OpenAIEncoding, path: str) -> tuple[bytes | None, str]:
    """The encoding's file from tiktoken's cache, checked; else None and why not."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed (pip install 'sluicegate[tokenizers]')"
    if not path:
        return None, "tiktoken's cache is turned off (TIKTOKEN_CACHE_DIR is empty)"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None, f"{path} is not in tiktoken's cache"
    if hashlib.sha256(data).hexdigest() != encoding.sha256:
        return None, f"{path} in tiktoken's cache does not have the expected sha256"
    return data, ""
