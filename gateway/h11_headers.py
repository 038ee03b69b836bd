"""Response headers validated once per distinct header, not on every response.

Hypercorn speaks HTTP/1.1 through h11, and h11 checks every response header against its
grammar (two regular expressions) each time it builds a `Response` from a list: once per
JSON response and three times per stream (the framing headers are set by rebuilding the
list). A gateway sends the same few dozen headers over and over, so a layer that adds two
headers paid about as much for h11's checks as for its own work.

`install()` replaces h11's `normalize_and_validate` for lists of `bytes` pairs: a (name,
value) pair that passed h11's checks once is remembered with what h11 makes of it (the raw
name, the lower-cased name, the value), and so is a name (up to 4,096 of each; a memo starts
over when full, since request ids and dates never repeat). A remembered pair costs a dict
lookup on each pass instead of h11's loop body (a lower(), three comparisons, a tuple): about
1.5k of the 10k instructions each of the quota layer's seven headers costs in h11 as a whole
(the rest is h11's other loops over the headers, and writing them). A value of letters and
digits alone, one dot allowed, needs no regex: it always matches h11's field-value grammar,
and such values (a rate limit's remaining count, a budget's USD) change on every response. The framing headers are never
remembered: one plain Content-Length and one `chunked` Transfer-Encoding are taken as h11
takes them; anything else about them (a repeat, a list, a bad value) goes to h11 whole, which
folds or refuses it with its own message. So do anything but a tuple of two `bytes`, and
anything but a list, a tuple or h11's own `Headers`.

Before h11, hypercorn checks the same headers its own way (`build_and_validate_headers`: no
pseudo-header, and each name and value stripped of surrounding whitespace, through `bytes()`
and `strip()` calls), about 3k instructions a header. `install_hypercorn()` puts a memo in
front of that too: a remembered (name, value) pair comes back as hypercorn made it, and a pair of
plain `bytes` seen for the first time gets hypercorn's steps inline, without the `bytes()`
copies (identities for `bytes`); anything else (a list of headers that is not a list or a
tuple, a pair that is not a tuple of two `bytes`) goes to hypercorn whole, which refuses it
with its own error or takes it as it would.

`gateway.asgi` (the app `sluicegate serve` runs) installs both. Mounted into a host's app, the
gateway leaves the host's h11 and hypercorn alone. An h11 or hypercorn without the
expected function is left as it is.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, cast

logger = logging.getLogger("sluicegate")

__all__ = ["hypercorn_installed", "install", "install_hypercorn", "installed"]

MEMO_MAX = 4096
CONTENT_LENGTH, TRANSFER_ENCODING = b"content-length", b"transfer-encoding"

_original: Callable[..., Any] | None = None
# (name, value) pairs that passed h11's checks, with what h11 makes of them (raw name,
# lower-cased name, value); never the framing headers, whose values change every response.
_memo: dict[tuple[bytes, bytes], tuple[bytes, bytes, bytes]] = {}
_names: dict[bytes, bytes] = {}  # names that passed, lower-cased


def installed() -> bool:
    return _original is not None


def install() -> bool:
    """Puts the memo in front of h11's header checks (once); False when h11 is not the shape
    this was written against, and then nothing changes."""
    global _original
    if _original is not None:
        return True
    try:
        import h11._events as events
        import h11._headers as headers
        from h11._util import validate
    except ImportError:
        return False
    found: Callable[..., Any] | None = getattr(headers, "normalize_and_validate", None)
    name_re = getattr(headers, "_field_name_re", None)
    value_re = getattr(headers, "_field_value_re", None)
    make_headers = getattr(headers, "Headers", None)
    max_digits = getattr(headers, "CONTENT_LENGTH_MAX_DIGITS", None)
    if found is None or name_re is None or value_re is None or make_headers is None \
            or not isinstance(max_digits, int) \
            or getattr(events, "normalize_and_validate", None) is not found:
        logger.info("h11 %s: response headers keep h11's own checks",
                    getattr(sys.modules.get("h11"), "__version__", "?"))
        return False
    original: Callable[..., Any] = cast("Callable[..., Any]", found)
    valid, names = _memo, _names
    # Iterated twice when h11 has to take over: a generator would arrive empty.
    reusable = (list, tuple, make_headers)

    def normalize_and_validate(items: Any, _parsed: bool = False) -> Any:
        if _parsed or not isinstance(items, reusable):
            return original(items, _parsed)
        full = []
        length: bytes | None = None
        chunked = False
        for pair in items:
            try:
                known = valid.get(pair)
            except TypeError:  # unhashable: a list, a bytearray
                return original(items, False)
            if known is not None:
                full.append(known)
                continue
            if type(pair) is not tuple or len(pair) != 2:
                return original(items, False)
            name, value = pair
            if type(name) is not bytes or type(value) is not bytes:
                return original(items, False)
            lowered = names.get(name)
            if lowered is None:
                validate(name_re, name, "Illegal header name {!r}", name)
                lowered = name.lower()
                if len(names) >= MEMO_MAX:
                    names.clear()
                names[name] = lowered
            # Letters and digits (and one dot) always match h11's field-value grammar; a
            # value that changes on every response (a rate limit's remaining count, a
            # budget's USD) skips the regex.
            if not value.isalnum() and not value.replace(b".", b"", 1).isalnum():
                validate(value_re, value, "Illegal header value {!r}", value)
            if lowered == CONTENT_LENGTH:
                # One plain length; anything else (a repeat, a list h11 folds, a bad
                # one) goes to h11, which folds it or refuses it with its own message.
                if length is not None or not value.isdigit() or len(value) > max_digits:
                    return original(items, False)
                length = value
                full.append((name, lowered, value))
            elif lowered == TRANSFER_ENCODING:
                if chunked or value.lower() != b"chunked":
                    return original(items, False)
                chunked = True
                full.append((name, lowered, b"chunked"))
            else:
                known = (name, lowered, value)
                if len(valid) >= MEMO_MAX:
                    valid.clear()
                valid[pair] = known
                full.append(known)
        return make_headers(full)

    headers.normalize_and_validate = normalize_and_validate  # type: ignore[assignment]
    events.normalize_and_validate = normalize_and_validate  # type: ignore[attr-defined,assignment]
    _original = original
    return True


_hypercorn_original: Callable[..., Any] | None = None
# (name, value) pairs hypercorn took, with what it made of them (the pair, stripped).
_checked: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}


def hypercorn_installed() -> bool:
    return _hypercorn_original is not None


def install_hypercorn() -> bool:
    """Puts the memo in front of hypercorn's response header checks (once); False when
    hypercorn is not the shape this was written against, and then nothing changes."""
    global _hypercorn_original
    if _hypercorn_original is not None:
        return True
    try:
        from hypercorn import utils
        from hypercorn.protocol import http_stream
    except ImportError:
        return False
    found: Callable[..., Any] | None = getattr(utils, "build_and_validate_headers", None)
    if found is None or getattr(http_stream, "build_and_validate_headers", None) is not found:
        logger.info("hypercorn: response headers keep hypercorn's own checks")
        return False
    original: Callable[..., Any] = cast("Callable[..., Any]", found)
    checked = _checked

    def build_and_validate_headers(headers: Any) -> list[tuple[bytes, bytes]]:
        if type(headers) is not list and type(headers) is not tuple:
            return cast("list[tuple[bytes, bytes]]", original(headers))  # read once
        out = []
        for pair in headers:
            try:
                known = checked.get(pair)
            except TypeError:  # unhashable: a list, a bytearray
                return cast("list[tuple[bytes, bytes]]", original(headers))
            if known is None:
                if type(pair) is not tuple or len(pair) != 2:
                    return cast("list[tuple[bytes, bytes]]", original(headers))
                name, value = pair
                if type(name) is not bytes or type(value) is not bytes:
                    return cast("list[tuple[bytes, bytes]]", original(headers))
                if name[0] == 58:  # hypercorn's check, its error (an empty name: IndexError)
                    raise ValueError("Pseudo headers are not valid")
                known = (name.strip(), value.strip())
                if len(checked) >= MEMO_MAX:
                    checked.clear()
                checked[pair] = known
            out.append(known)
        return out

    http_stream.build_and_validate_headers = build_and_validate_headers  # type: ignore[attr-defined]
    _hypercorn_original = original
    return True
