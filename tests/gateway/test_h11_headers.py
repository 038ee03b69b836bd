"""The memo in front of h11's header checks (gateway/h11_headers.py) keeps h11's answers:
the same normalised headers for good input, the same errors for bad input, the first time a
header is seen and every time after."""
from __future__ import annotations

import re

import h11
import h11._events
import h11._headers
import pytest

from gateway import h11_headers


@pytest.fixture(scope="module")
def original():
    assert h11_headers.install()
    assert h11_headers.install()  # once is enough; a second call changes nothing
    assert h11_headers.installed()
    return h11_headers._original


def _items(headers):
    return list(headers._full_items)


GOOD = [
    [(b"content-type", b"application/json"), (b"content-length", b"676"),
     (b"x-request-id", b"63966cc975961f18820cd1a277f0a649"), (b"X-Sluicegate-Attempts", b"1")],
    [(b"Content-Type", b"text/event-stream; charset=utf-8"), (b"transfer-encoding", b"Chunked"),
     (b"cache-control", b"no-cache")],
    [("content-type", "application/json"), ("x-str", "values too")],  # h11 takes str
    [(b"content-length", b"5, 5"), (b"x-empty", b"")],  # a repeated length h11 folds
    [(bytearray(b"x-bytearray"), b"ok")],  # unhashable: h11 alone
    [(b"Content-Length", b"12"), (b"X-Mixed-Case", b"Kept")],  # raw casing kept, lowered too
    [(b"content-length", b"5"), (b"content-length", b"5")],  # a repeat of the same: one
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"3"), (b"x-a", b"b")],
    [(b"content-length", b"0" * 20)],  # the longest length h11 takes
    (( b"x-tuple", b"of tuples"),),
]


@pytest.mark.parametrize("headers", GOOD)
def test_good_headers_come_out_as_h11_makes_them(original, headers) -> None:
    for _ in range(2):  # first sight, then from the memo
        assert _items(h11._headers.normalize_and_validate(headers)) == \
            _items(original(list(headers)))
        response = h11.Response(status_code=200, headers=headers)
        assert _items(response.headers) == _items(original(list(headers)))


def test_h11s_own_headers_object_comes_out_the_same(original) -> None:
    made = original(GOOD[0])
    assert _items(h11._headers.normalize_and_validate(made)) == _items(original(made))


def test_the_framing_headers_are_never_remembered(original) -> None:
    for length in (b"1", b"22", b"333"):
        h11.Response(status_code=200, headers=[(b"content-length", length),
                                               (b"transfer-encoding", b"chunked")])
    assert not any(name.lower() in (b"content-length", b"transfer-encoding")
                   for name, _value in h11_headers._memo)


def test_a_generator_is_read_once_and_still_checked(original) -> None:
    made = h11._headers.normalize_and_validate(pair for pair in GOOD[0])
    assert _items(made) == _items(original(GOOD[0]))
    with pytest.raises(h11.LocalProtocolError, match="Illegal header value"):
        h11._headers.normalize_and_validate((b"x-bad", v) for v in (b"a\r\nb",))


BAD = [
    ([(b"x-ok", b"fine"), (b"x-bad", b"line\r\nbreak")], "Illegal header value"),
    ([(b"bad name", b"value")], "Illegal header name"),
    ([(b"x-lead", b" leading space")], "Illegal header value"),
    ([(b"x-dot", b"1.5\r\n")], "Illegal header value"),
    ([(b"content-length", b"5"), (b"content-length", b"6")], "conflicting Content-Length"),
    ([(b"content-length", b"five")], "bad Content-Length"),
    ([(b"content-length", b"")], "bad Content-Length"),
    ([(b"content-length", b"1" * 21)], "bad Content-Length"),
    ([(b"content-length", b"5"), (b"Content-Length", b"6")], "conflicting Content-Length"),
    ([(b"content-length", b"5, 6")], "conflicting Content-Length"),
    ([(b"Transfer-Encoding", b"Chunked"), (b"transfer-encoding", b"chunked")],
     "multiple Transfer-Encoding"),
    ([(b"transfer-encoding", b"gzip")], "Only Transfer-Encoding: chunked"),
    ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
     "multiple Transfer-Encoding"),
]


@pytest.mark.parametrize(("headers", "message"), BAD)
def test_bad_headers_are_refused_with_h11s_message(original, headers, message) -> None:
    with pytest.raises(h11.LocalProtocolError, match=message) as theirs:
        original(list(headers))
    for _ in range(2):  # a refused pair is never remembered as good
        with pytest.raises(h11.LocalProtocolError) as ours:
            h11.Response(status_code=200, headers=headers)
        assert str(ours.value) == str(theirs.value)
        assert ours.value.error_status_hint == theirs.value.error_status_hint


def test_values_of_letters_and_digits_are_checked_like_any_other(original) -> None:
    for number in range(3):
        headers = [(b"x-ratelimit-remaining-requests", b"%d" % (99 - number)),
                   (b"x-id", b"abcDEF%d" % number), (b"x-tricky", b"12\x80"),
                   (b"x-sluicegate-budget-remaining", b"99.%06d" % number),
                   (b"x-dots", b"1.2.%d" % number), (b"x-dot", b".")]
        assert _items(h11.Response(status_code=200, headers=headers).headers) == \
            _items(original(headers))
    for bad_name in (b"x y", b"x:y", b"", b"x\xe9"):  # an alnum value does not vouch for a name
        with pytest.raises(h11.LocalProtocolError, match="Illegal header name"):
            h11.Response(status_code=200, headers=[(bad_name, b"123")])


def test_the_memo_stays_bounded(original) -> None:
    for number in range(h11_headers.MEMO_MAX + 50):
        h11.Response(status_code=200, headers=[(b"x-request-id", b"%d" % number)])
    assert 0 < len(h11_headers._memo) <= h11_headers.MEMO_MAX
    assert (b"x-request-id", b"%d" % (h11_headers.MEMO_MAX + 49)) in h11_headers._memo
    for number in range(h11_headers.MEMO_MAX + 50):
        h11.Response(status_code=200, headers=[(b"x-name-%d" % number, b"v")])
    assert 0 < len(h11_headers._names) <= h11_headers.MEMO_MAX
    assert (b"x-name-%d" % (h11_headers.MEMO_MAX + 49), b"v") in h11_headers._memo


def test_parsed_requests_go_straight_to_h11(original) -> None:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                            b"Content-Length: 2\r\nX-Thing: yes\r\n\r\n{}")
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    assert (b"x-thing", b"yes") in list(request.headers)


def test_a_whole_exchange_through_h11(original) -> None:
    """What hypercorn does per response: Response, Data, EndOfMessage, for a sized body and
    for a stream (where h11 rewrites the framing headers)."""
    for headers, framing in (([(b"content-length", b"2")], b"content-length: 2"),
                             ([(b"content-type", b"text/event-stream")],
                              b"Transfer-Encoding: chunked")):
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        connection.next_event()
        head = connection.send(h11.Response(status_code=200, headers=headers))
        assert head is not None and framing in head
        assert connection.send(h11.Data(data=b"{}")) is not None
        connection.send(h11.EndOfMessage())
        assert connection.our_state is h11.DONE


# -- hypercorn's checks (build_and_validate_headers, before h11's) --------------------------

@pytest.fixture(scope="module")
def hypercorn_original():
    import hypercorn.utils
    assert h11_headers.install_hypercorn()
    assert h11_headers.install_hypercorn()  # once is enough
    assert h11_headers.hypercorn_installed()
    assert h11_headers._hypercorn_original is hypercorn.utils.build_and_validate_headers
    return h11_headers._hypercorn_original


def _hypercorn_checks():
    import hypercorn.protocol.http_stream
    return hypercorn.protocol.http_stream.build_and_validate_headers


HYPERCORN_GOOD = [
    [(b"content-type", b"application/json"), (b"x-request-id", b"abc")],
    [(b" x-padded ", b"  value with spaces  "), (b"x-empty", b"")],  # stripped, as hypercorn does
    ((b"x-tuple", b"of tuples"),),
    [[b"x-list", b"pair"]],  # unhashable pair: hypercorn alone
    [(bytearray(b"x-bytearray"), b"ok"), (b"x-after", b"it")],
    [(memoryview(b"x-view"), b"ok")],  # bytes() copies it; hypercorn alone
    [],
]


@pytest.mark.parametrize("headers", HYPERCORN_GOOD)
def test_hypercorn_headers_come_out_as_hypercorn_makes_them(hypercorn_original,
                                                            headers) -> None:
    checks = _hypercorn_checks()
    assert checks is not hypercorn_original
    for _ in range(2):  # first sight, then from the memo
        assert checks(headers) == hypercorn_original(list(headers))


def test_hypercorn_reads_a_generator_once(hypercorn_original) -> None:
    checks = _hypercorn_checks()
    assert checks(pair for pair in HYPERCORN_GOOD[0]) == hypercorn_original(HYPERCORN_GOOD[0])


@pytest.mark.parametrize("headers", [
    [(b"x-ok", b"fine"), (b":status", b"200")],
    [(b"", b"no name")],
    [(b"x-three", b"values", b"here")],
    [("x-str", "not bytes")],
    [(b"x-none", None)],
])
def test_bad_hypercorn_headers_get_hypercorns_error(hypercorn_original, headers) -> None:
    checks = _hypercorn_checks()
    with pytest.raises(Exception) as expected:
        hypercorn_original(list(headers))
    for _ in range(2):
        with pytest.raises(type(expected.value)) as got:
            checks(headers)
        assert str(got.value) == str(expected.value)
    bad = headers[-1]  # the pair hypercorn refuses is never remembered
    assert not (len(bad) == 2 and isinstance(bad[1], bytes) and bad in h11_headers._checked)


def test_the_hypercorn_memo_stays_bounded(hypercorn_original) -> None:
    checks = _hypercorn_checks()
    for number in range(h11_headers.MEMO_MAX + 50):
        assert checks([(b"x-request-id", b"%d" % number)]) == \
            [(b"x-request-id", b"%d" % number)]
    assert 0 < len(h11_headers._checked) <= h11_headers.MEMO_MAX


# -- one reading for the whole head: hypercorn's checks hand h11 its entries, and the lines
# -- h11's writer would make go with them to gateway/h11_cycle.py ---------------------------

HEADS = [
    [(b"content-type", b"application/json"), (b"content-length", b"676"),
     (b"x-request-id", b"63966cc975961f18820cd1a277f0a649"),
     (b"x-ratelimit-remaining-requests", b"99999"), (b"x-sluicegate-budget-remaining", b"9.5")],
    [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")],  # no length
    [(b"content-type", b"text/event-stream"), (b"Transfer-Encoding", b"CHUNKED"),
     (b"content-length", b"12"), (b"x-after", b"framing")],  # chunked wins, both dropped
    [(b"content-length", b"2"), (b"Connection", b"keep-alive, Close")],  # closes
    [(b"content-length", b"2"), (b"connection", b"keep-alive")],
    [(b"content-length", b"2"), (b"x-empty", b""), (b"X-Spaces", b"a  b")],
    [(b"content-length", b"2"), (b"host", b"elsewhere")],  # h11 writes Host first
    [(b"content-length", b"2"), (b"content-length", b"2")],  # h11 folds the repeat
    [(b"content-length", b"5, 5")],  # and the list
    [],
]
DATE = (b"date", b"Sun, 29 Nov 2026 18:00:00 GMT")


def _head(response: h11.Response) -> tuple[bytes | None, object]:
    """The head a server writes for `response` after a plain GET, and its states after."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    connection.next_event()
    connection.next_event()
    head = connection.send(response)
    return head, (connection.our_state, connection.their_state, connection._cstate.keep_alive,
                  type(connection._writer))


def _stock_head(pairs) -> tuple[bytes | None, object]:
    from tests.harness import stock_h11
    with stock_h11():
        return _head(h11.Response(status_code=200, headers=h11_headers._original(list(pairs))))


@pytest.fixture(scope="module")
def whole_cycle(original, hypercorn_original):
    from gateway import h11_body, h11_cycle
    assert h11_body.install() and h11_cycle.install()
    assert h11_headers.rendered_type is not None


@pytest.mark.parametrize("pairs", HEADS)
def test_a_head_is_written_as_h11_writes_it(whole_cycle, pairs) -> None:
    for _ in range(2):  # first sight, then from the memo
        response = h11.Response(status_code=200, headers=[*pairs, DATE])
        assert _items(response.headers) == _items(h11_headers._original([*pairs, DATE]))
        assert _head(response) == _stock_head([*pairs, DATE])
    assert (type(response.headers) is h11_headers.rendered_type) is not _h11s_own(pairs)


def _h11s_own(pairs) -> bool:
    """Headers h11 writes its own way (Host first) or folds (a repeated or listed length)."""
    names = [name.lower() for name, _value in pairs]
    return b"host" in names or names.count(b"content-length") > 1 or \
        any(b"," in value for name, value in pairs if name.lower() == b"content-length")


@pytest.mark.parametrize("pairs", HEADS)
def test_hypercorns_checks_hand_h11_the_same_headers(whole_cycle, pairs) -> None:
    """What hypercorn does for a response start: its checks, then an h11 Response of what
    they passed followed by its own date header."""
    checks = _hypercorn_checks()
    for _ in range(3):  # first sight (the date too), then from the memos
        passed = checks(pairs)
        handed = h11_headers._handoff[0]
        response = h11.Response(status_code=200, headers=[*passed, DATE])
        assert h11_headers._handoff[0] is None  # taken once
        assert _items(response.headers) == _items(h11_headers._original([*pairs, DATE]))
        assert _head(response) == _stock_head([*pairs, DATE])
    assert (handed is None) is _h11s_own(pairs)
    if handed is not None:
        assert type(response.headers) is h11_headers.rendered_type
        assert response.headers is handed[1]  # h11 read nothing again


def test_a_handed_list_is_taken_only_by_the_same_pairs(whole_cycle) -> None:
    checks = _hypercorn_checks()
    checks([(b"content-length", b"3"), (b"x-a", b"1")])
    other = [(b"content-length", b"4"), (b"x-a", b"2"), DATE]  # another response's headers
    response = h11.Response(status_code=200, headers=other)
    assert _items(response.headers) == _items(h11_headers._original(other))
    assert _head(response) == _stock_head(other)
    assert h11_headers._handoff[0] is None


def test_after_a_handed_list_anything_but_remembered_headers_goes_the_long_way(
        whole_cycle) -> None:
    checks = _hypercorn_checks()
    for tail in ([(b"x-new-each-time", b"tail")], [(b"Host", b"x")],
                 [(b"content-length", b"9")], [(b"x-bad", b"a\x00b")]):
        passed = checks([(b"content-type", b"text/plain"), (b"content-length", b"2")])
        headers = [*passed, *tail]
        try:
            expected = _items(h11_headers._original(headers))
        except h11.LocalProtocolError as exc:
            with pytest.raises(h11.LocalProtocolError, match=re.escape(str(exc))):
                h11.Response(status_code=200, headers=headers)
            continue
        response = h11.Response(status_code=200, headers=headers)
        assert _items(response.headers) == expected
        assert _head(response) == _stock_head(headers)


def test_keep_alive_ends_when_the_date_is_followed_by_connection_close(whole_cycle) -> None:
    """Hypercorn appends `connection: close` after its date when a connection has served its
    quota of requests."""
    checks = _hypercorn_checks()
    for _ in range(2):
        passed = checks([(b"content-length", b"2")])
        headers = [*passed, DATE, (b"connection", b"close")]
        response = h11.Response(status_code=200, headers=headers)
        head, states = _head(response)
        assert (head, states) == _stock_head(headers)
        assert states[2] is False  # keep-alive off


def test_new_counts_under_a_known_name_come_out_as_both_make_them(whole_cycle) -> None:
    """A value of letters and digits under a name both took as it is skips the memo: the
    same pair, entry and head as a first sight gives."""
    checks = _hypercorn_checks()
    names = (b"x-ratelimit-remaining-requests", b"X-Request-Id", b" x-padded ",
             b"content-length", b"connection", b"host")
    values = [b"%d" % (100 + number) for number in range(3)]
    # Amounts (a budget's USD) too; two dots, or a dot alone, take the checks' long way.
    values += [b"999.997500", b"5.", b".5", b"1.2.3", b"."]
    for value in values:
        pairs = [(name, value if name != b"connection" else b"close") for name in names]
        for pair in pairs:
            expected = h11_headers._hypercorn_original([pair])
            assert checks([pair]) == expected
            if pair[0] == b"x-ratelimit-remaining-requests" and value != b"100":
                # (a value with at most one dot is new every time: not remembered)
                assert (pair in h11_headers._checked) == (value.count(b".") > 1
                                                          or value == b".")
            if pair[0] == b"content-length" and not value.isdigit():
                with pytest.raises(h11.LocalProtocolError, match="bad Content-Length"):
                    h11.Response(status_code=200, headers=[*expected, DATE])
                with pytest.raises(h11.LocalProtocolError, match="bad Content-Length"):
                    h11_headers._original([*expected, DATE])
            elif pair[0] != b"host":
                response = h11.Response(status_code=200, headers=[*expected, DATE])
                assert _items(response.headers) == _items(h11_headers._original([*expected,
                                                                                  DATE]))
                assert _head(response) == _stock_head([*expected, DATE])
    plain = set(h11_headers._plain_names)
    assert {b"x-ratelimit-remaining-requests", b"X-Request-Id"} <= plain
    assert not plain & {b" x-padded ", b"content-length", b"connection", b"host"}
    with pytest.raises(ValueError, match="Pseudo headers"):
        checks([(b":status", b"200")])
