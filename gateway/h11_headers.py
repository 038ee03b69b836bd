"""Response headers validated once per distinct header, not on every response.

Hypercorn speaks HTTP/1.1 through h11, and h11 checks every response header against its
grammar (two regular expressions) each time it builds a `Response`: twice per JSON response
and four times per stream (the framing headers are set by rebuilding the list). A gateway
sends the same few dozen headers over and over, so a layer that adds two headers paid about
as much for h11's checks as for its own work.

`install()` wraps h11's `normalize_and_validate`: a (name, value) pair of bytes that passed
h11's own checks once is remembered, and so is a name (up to 4,096 of each; a memo starts over
when full, since request ids and dates never repeat). A value of letters and digits alone
needs no regex: it always matches h11's field-value grammar, and such values (a rate limit's
remaining count) change on every response. h11 then runs with the checks it skips for parsed
input. Everything else stays h11's: lower-casing, the Content-Length and Transfer-Encoding
rules, the errors and their messages. Anything but a tuple of two `bytes` goes to h11
untouched, and so does anything but a list, a tuple or h11's own `Headers`.

`gateway.asgi` (the app `sluicegate serve` runs) installs it. Mounted into a host's app, the
gateway leaves the host's h11 alone. An h11 without the expected function is left as it is.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, cast

logger = logging.getLogger("sluicegate")

__all__ = ["install", "installed"]

MEMO_MAX = 4096

_original: Callable[..., Any] | None = None
_memo: set[tuple[bytes, bytes]] = set()  # (name, value) pairs that passed h11's checks
_names: set[bytes] = set()  # and the names that did


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
    if found is None or name_re is None or value_re is None \
            or getattr(events, "normalize_and_validate", None) is not found:
        logger.info("h11 %s: response headers keep h11's own checks",
                    getattr(sys.modules.get("h11"), "__version__", "?"))
        return False
    original: Callable[..., Any] = cast("Callable[..., Any]", found)
    valid, names = _memo, _names
    # Iterated twice when h11 has to take over: a generator would arrive empty.
    reusable = (list, tuple, getattr(headers, "Headers", tuple))

    def normalize_and_validate(items: Any, _parsed: bool = False) -> Any:
        if _parsed or not isinstance(items, reusable):
            return original(items, _parsed)
        pairs = []
        for pair in items:
            try:
                known = pair in valid
            except TypeError:  # unhashable: a list, a bytearray
                return original(items, False)
            if not known:
                if type(pair) is not tuple or len(pair) != 2:
                    return original(items, False)
                name, value = pair
                if type(name) is not bytes or type(value) is not bytes:
                    return original(items, False)
                if name not in names:
                    validate(name_re, name, "Illegal header name {!r}", name)
                    if len(names) >= MEMO_MAX:
                        names.clear()
                    names.add(name)
                # Letters and digits alone always match h11's field-value grammar; a count
                # that changes on every response (a rate limit's remaining) skips the regex.
                if not value.isalnum():
                    validate(value_re, value, "Illegal header value {!r}", value)
                if len(valid) >= MEMO_MAX:
                    valid.clear()
                valid.add(pair)
            pairs.append(pair)
        return original(pairs, True)

    headers.normalize_and_validate = normalize_and_validate  # type: ignore[assignment]
    events.normalize_and_validate = normalize_and_validate  # type: ignore[attr-defined,assignment]
    _original = original
    return True
