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

One reading for the whole head. With both installed, hypercorn's check also makes each pair's
h11 entry (kept in its memo with the pair), and when h11 would take every pair as it is (no
Host, one plain Content-Length, at most one `chunked`), it makes the headers h11 would make of
them (`Rendered`: h11's `Headers` with the same items, plus the lines h11's writer makes of
them and what they say about framing) and leaves them beside the list it returns. The h11
`Response` hypercorn builds next from that list (its own date header appended) takes them,
with the rest added from the memo, instead of reading the pairs again, when the list it gets
starts with those same pairs (compared in C) and the rest are remembered pairs; either way
the hand-off is used once. gateway/h11_cycle.py writes the response head from the lines,
without a loop of its own. A value of letters and digits under a name both have taken as it
is (remembered apart: stripped, valid, not Host, Connection or a framing header), one dot
allowed, needs neither's checks: its entry is the name's plus the value, and it is not
remembered, since a count, an id or an amount is new on the next response too. Together
about 1.3k instructions a header less than the two memos and the writer's loop apart
(callgrind: 167k instructions to 153k for a response of eleven headers, four of them new
values each time).

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
# What a header is to h11's clean-up and writer: a plain header, a Connection header with the
# close token, Host (a response carrying one goes to h11 whole), or a framing header.
PLAIN, CLOSE, HOST, LENGTH, CHUNKED = 0, 1, 2, 3, 4

# A (name, value) pair as h11 takes it: (raw name, lower-cased name, value), the line its
# writer makes of it, and its kind (above).
Entry = tuple[tuple[bytes, bytes, bytes], bytes, int]

_original: Callable[..., Any] | None = None
# (name, value) pairs that passed h11's checks, with their entries; never the framing
# headers, whose values change every response.
_memo: dict[tuple[bytes, bytes], Entry] = {}
_names: dict[bytes, bytes] = {}  # names that passed, lower-cased
# The entry of a pair seen for the first time (None: h11 has to look at it); set by install().
_entry_for: Callable[[bytes, bytes], Entry | None] | None = None
# The headers h11 makes of entries (see install()); set by install().
_headers_of: Callable[[list[Entry]], Any] | None = None
# The last header list hypercorn's checks passed that h11 would take as it is, with the
# headers h11 makes of it: (pairs, `Rendered`). The h11 `Response` hypercorn builds next from
# those pairs (and its own date) picks them up.
_handoff: list[Any] = [None]
# h11's Headers with the head lines its writer would make of them (see `Rendered`).
rendered_type: Any = None


def installed() -> bool:
    return _original is not None


def says_close(connection: bytes) -> bool:
    """Whether a Connection header's value holds the `close` token, read as h11 reads it
    (get_comma_header: lower-cased, split at commas, stripped) for its keep-alive rule."""
    return b"close" in [token.strip() for token in connection.lower().split(b",")]


def install() -> bool:
    """Puts the memo in front of h11's header checks (once); False when h11 is not the shape
    this was written against, and then nothing changes."""
    global _original, _entry_for, _headers_of, rendered_type
    if _original is not None:
        return True
    try:
        import h11._events as events
        import h11._headers as headers
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
    valid, names, handoff = _memo, _names, _handoff
    # Iterated twice when h11 has to take over: a generator would arrive empty.
    reusable = (list, tuple, make_headers)

    class Rendered(make_headers):  # type: ignore[misc,valid-type]
        """h11's Headers (equal to them, the same items) that also carry the lines h11's
        writer makes of them, in order, and what they say about framing: the Content-Length
        value (None without one), whether they hold `Transfer-Encoding: chunked`, and whether
        a Connection header says close. gateway/h11_cycle.py writes a response head from
        them without reading the headers again. Never made for headers with Host (h11 writes
        it first)."""

        __slots__ = ("chunked", "close", "length", "lines")

    def headers_of(entries: list[Entry]) -> Any:
        """The headers h11 makes of these entries: `Rendered`, or h11's own Headers when they
        hold Host; None when h11 has to fold or refuse them (a second Content-Length or
        Transfer-Encoding), which it then does with its own words."""
        full = []
        lines = []
        length: bytes | None = None
        chunked = close = host = False
        for triple, line, kind in entries:
            if kind:
                if kind == LENGTH:
                    if length is not None:
                        return None
                    length = triple[2]
                elif kind == CHUNKED:
                    if chunked:
                        return None
                    chunked = True
                elif kind == CLOSE:
                    close = True
                else:
                    host = True
            full.append(triple)
            lines.append(line)
        if host:
            return make_headers(full)
        made = Rendered(full)
        made.lines = lines
        made.length = length
        made.chunked = chunked
        made.close = close
        return made

    def entry_for(name: bytes, value: bytes) -> Entry | None:
        """What h11 makes of a pair of `bytes` seen for the first time; None when it would
        refuse it, fold it or rewrite it (h11 then does, with its own words)."""
        lowered = names.get(name)
        if lowered is None:
            if name_re.fullmatch(name) is None:
                return None
            lowered = name.lower()
            if len(names) >= MEMO_MAX:
                names.clear()
            names[name] = lowered
        # Letters and digits (and one dot) always match h11's field-value grammar; a value
        # that changes on every response (a rate limit's remaining count, a budget's USD)
        # skips the regex.
        if not value.isalnum() and not value.replace(b".", b"", 1).isalnum() \
                and value_re.fullmatch(value) is None:
            return None
        if lowered == CONTENT_LENGTH:
            # One plain length; a list h11 folds, a bad one, go to h11.
            if not value.isdigit() or len(value) > max_digits:
                return None
            return (name, lowered, value), b"%s: %s\r\n" % (name, value), LENGTH
        if lowered == TRANSFER_ENCODING:
            if value.lower() != b"chunked":
                return None
            return (name, lowered, b"chunked"), b"%s: chunked\r\n" % name, CHUNKED
        kind = HOST if lowered == b"host" else \
            CLOSE if lowered == b"connection" and says_close(value) else PLAIN
        return (name, lowered, value), b"%s: %s\r\n" % (name, value), kind

    def normalize_and_validate(items: Any, _parsed: bool = False) -> Any:
        if _parsed or not isinstance(items, reusable):
            return original(items, _parsed)
        handed = handoff[0]
        if handed is not None:
            # A list that starts with the pairs hypercorn's checks passed: the headers made
            # of them there, then the rest (hypercorn's date) from the memo.
            handoff[0] = None  # those headers become this response's
            pairs, made = handed
            count = len(pairs)
            if type(items) is list and items[:count] == pairs:
                for pair in items[count:]:
                    try:
                        known = valid.get(pair)
                    except TypeError:
                        break
                    if known is None or known[2] == HOST:  # (the memo holds no framing)
                        break
                    made._full_items.append(known[0])
                    made.lines.append(known[1])
                    if known[2] == CLOSE:
                        made.close = True
                else:
                    return made
        entries = []
        for pair in items:
            try:
                known = valid.get(pair)
            except TypeError:  # unhashable: a list, a bytearray
                return original(items, False)
            if known is None:
                if type(pair) is not tuple or len(pair) != 2:
                    return original(items, False)
                name, value = pair
                if type(name) is not bytes or type(value) is not bytes:
                    return original(items, False)
                known = entry_for(name, value)
                if known is None:
                    return original(items, False)
                if known[2] < LENGTH:  # the framing headers are never remembered
                    if len(valid) >= MEMO_MAX:
                        valid.clear()
                    valid[pair] = known
            entries.append(known)
        made = headers_of(entries)
        return made if made is not None else original(items, False)

    headers.normalize_and_validate = normalize_and_validate  # type: ignore[assignment]
    events.normalize_and_validate = normalize_and_validate  # type: ignore[attr-defined,assignment]
    _original = original
    _entry_for = entry_for
    _headers_of = headers_of
    rendered_type = Rendered
    return True


_hypercorn_original: Callable[..., Any] | None = None
# (name, value) pairs hypercorn took, with what it made of them (the pair, stripped) and the
# entry h11 makes of that (None: h11 has to look at it, or install() did not run).
_checked: dict[tuple[bytes, bytes], tuple[tuple[bytes, bytes], Entry | None]] = {}


# Names hypercorn and h11 both take as they are (stripped, valid, not Host, Connection or a
# framing header), with h11's lower-cased name and the start of the line h11 writes.
_plain_names: dict[bytes, tuple[bytes, bytes]] = {}


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
    checked, handoff, plain_names = _checked, _handoff, _plain_names
    # None unless install() ran first: then there is nothing to hand on
    entry_for, headers_of, rendered = _entry_for, _headers_of, rendered_type

    def build_and_validate_headers(headers: Any) -> list[tuple[bytes, bytes]]:
        if type(headers) is not list and type(headers) is not tuple:
            return cast("list[tuple[bytes, bytes]]", original(headers))  # read once
        out = []
        # h11's entries for the pairs, while h11 would take every one as it is
        entries: list[Entry] | None = [] if entry_for is not None else None
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
                plain = plain_names.get(name)
                if plain is not None and (value.isalnum()
                                          or value.replace(b".", b"", 1).isalnum()):
                    # A count, an id or an amount (one dot: a budget's USD) under a name both
                    # take as it is: nothing to strip or match, and likely new next time (not
                    # remembered).
                    known = (pair, ((name, plain[0], value), plain[1] + value + b"\r\n", PLAIN))
                else:
                    if name[0] == 58:  # hypercorn's check, its error (an empty name: IndexError)
                        raise ValueError("Pseudo headers are not valid")
                    stripped = (name.strip(), value.strip())
                    entry = entry_for(*stripped) if entry_for is not None else None
                    known = (stripped, entry)
                    if len(checked) >= MEMO_MAX:
                        checked.clear()
                    checked[pair] = known
                    if entry is not None and entry[2] == PLAIN and stripped[0] is name \
                            and entry[0][1] != b"connection":  # (its value decides its kind)
                        if len(plain_names) >= MEMO_MAX:
                            plain_names.clear()
                        plain_names[name] = (entry[0][1], name + b": ")
            out.append(known[0])
            if entries is not None:
                entry = known[1]
                if entry is None:
                    entries = None
                else:
                    entries.append(entry)
        made = headers_of(entries) if entries is not None and headers_of is not None else None
        handoff[0] = (out, made) if type(made) is rendered else None
        return out

    http_stream.build_and_validate_headers = build_and_validate_headers  # type: ignore[attr-defined]
    _hypercorn_original = original
    return True
