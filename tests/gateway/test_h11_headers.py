"""The memo in front of h11's header checks (gateway/h11_headers.py) keeps h11's answers:
the same normalised headers for good input, the same errors for bad input, the first time a
header is seen and every time after."""
from __future__ import annotations

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
