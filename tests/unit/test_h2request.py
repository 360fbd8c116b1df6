"""The checks of an HTTP/2 request head (proxy.core.h2request), RFC 9113 section 8."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.h2request import MalformedRequest, parse_request

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


def test_a_plain_request() -> None:
    head = parse_request([*BASE, (b"accept", b"*/*"), (b"x-a", b"1")])
    assert head.method == "GET"
    assert head.scheme == b"https"
    assert head.authority == b"a.test"
    assert head.path == b"/"
    assert head.protocol is None
    assert head.fields == ((b"accept", b"*/*"), (b"x-a", b"1"))
    assert head.size == sum(len(n) + len(v) for n, v in [*BASE, (b"accept", b"*/*")]) + 4


def test_cookies_are_joined() -> None:
    head = parse_request([*BASE, (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")])
    assert head.fields == ((b"x", b"y"), (b"cookie", b"a=1; b=2"))


def test_host_stands_for_a_missing_authority() -> None:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h:8")]
    head = parse_request(fields)
    assert head.authority == b"h:8"
    assert head.fields == ()
    same = parse_request([*BASE, (b"host", b"a.test")])
    assert same.authority == b"a.test"


def test_te_trailers_and_plain_connect_pass() -> None:
    assert parse_request([*BASE, (b"te", b"trailers")]).fields == ((b"te", b"trailers"),)
    head = parse_request([(b":method", b"CONNECT"), (b":authority", b"a:443")])
    assert head.method == "CONNECT"
    extended = parse_request([(b":method", b"CONNECT"), (b":protocol", b"websocket"), *BASE[1:]])
    assert extended.protocol == b"websocket"
    assert extended.path == b"/"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (BASE[1:], "no :method"),
        ([BASE[0], BASE[2], BASE[3]], "no :scheme"),
        (BASE[:3], "no :path"),
        ([*BASE[:3], (b":path", b"")], "no :path"),
        ([*BASE, (b":path", b"/x")], "repeated pseudo-header"),
        ([*BASE, (b":status", b"200")], "unknown pseudo-header"),
        ([(b"x", b"1"), *BASE], "after a regular field"),
        ([*BASE, (b"X-Up", b"1")], "invalid field name"),
        ([*BASE, (b"a b", b"1")], "invalid field name"),
        ([*BASE, (b"a:b", b"1")], "invalid field name"),
        ([*BASE, (b"", b"1")], "empty field name"),
        ([*BASE, (b"x", b"a\r\nb")], "invalid value"),
        ([*BASE, (b"x", b" a")], "white space"),
        ([*BASE, (b"connection", b"close")], "connection-specific"),
        ([*BASE, (b"transfer-encoding", b"chunked")], "connection-specific"),
        ([*BASE, (b"upgrade", b"h2c")], "connection-specific"),
        ([*BASE, (b"te", b"gzip")], "te other than"),
        ([*BASE, (b"host", b"other.test")], "another authority"),
        ([*BASE, (b"host", b"a"), (b"host", b"a")], "more than one host"),
        ([(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")], "CONNECT with"),
        ([(b":method", b"GET"), (b":protocol", b"ws"), *BASE[1:]], ":protocol outside"),
        ([(b":method", b"G T"), *BASE[1:]], "invalid :method"),
    ],
)
def test_malformed(fields: list[tuple[bytes, bytes]], message: str) -> None:
    with pytest.raises(MalformedRequest, match=message):
        parse_request(fields)


_NAME = st.binary(min_size=1, max_size=12).filter(lambda b: b[:1] != b":")
_VALUE = st.binary(max_size=20)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=8))
def test_any_field_list_is_parsed_or_refused_cleanly(fields: list[tuple[bytes, bytes]]) -> None:
    try:
        head = parse_request([*BASE, *fields])
    except MalformedRequest:
        return
    # What passes is lower case, free of connection-specific fields, and keeps every byte.
    for name, value in head.fields:
        assert name == name.lower()
        assert name not in (b"connection", b"transfer-encoding", b"keep-alive", b"upgrade")
        assert b"\r" not in value
        assert b"\n" not in value
        assert b"\x00" not in value
    kept = [(n, v) for n, v in fields if n not in (b"cookie", b"host")]
    assert [f for f in head.fields if f[0] != b"cookie"] == kept
    cookies = [v for n, v in fields if n == b"cookie"]
    assert [v for n, v in head.fields if n == b"cookie"] == (
        [b"; ".join(cookies)] if cookies else []
    )
