"""RFC 9110/9112 rules for an intermediary, and the desync cases a review found.

Each test names the rule; together they pin what Turnout forwards, refuses and rewrites:
a response never bleeds into another client's, heads and trailers are bounded both ways,
codings, versions, Host, Max-Forwards, header names and request paths are checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, RawResponse, build_request, get, send_raw
from tests.support.scripted import Connection, ScriptedUpstream
from tests.support.upstreams import EchoUpstream

CAP = 64 * 1024 * 1024
CUT_BELOW = 16 * 1024 * 1024

# Canned answers by the last path segment; a connection serves requests until it is closed.
ANSWERS: dict[str, bytes] = {
    "alice": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    b"HTTP/1.1 200 OK\r\nSet-Cookie: session=ALICE\r\nX-Pad: ",
    "bob": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsecond!",
    "head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
    b"3\r\nabc\r\n0\r\nSet-Cookie: leaked=1\r\nX-T: t\r\n\r\n",
    "status600": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "status099": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nxyz",
}


# Connections that were asked for endless trailers.
ENDLESS: list[Connection] = []


def keep_answering(conn: Connection) -> None:
    head = conn.head
    while True:
        target = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "/"
        name = target.rsplit("/", 1)[-1]
        if name == "endless-trailer":
            ENDLESS.append(conn)
            conn.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
            )
            conn.stream(itertools.repeat(b"t" * 65536), CAP)
            return
        if not conn.send(ANSWERS.get(name, ANSWERS["bob"])):
            return
        head = _read_head(conn)
        if not head:
            return


def _read_head(conn: Connection) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.sock.recv(65536)
            if not chunk:
                return b""
            data += chunk
    except OSError:
        return b""
    return data


@dataclass
class Setup:
    turnout: InProcessTurnout
    scripted: ScriptedUpstream


@pytest.fixture(scope="module")
def setup(blue: EchoUpstream) -> Iterator[Setup]:
    upstream = ScriptedUpstream(keep_answering)
    config: dict[str, Any] = {
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "raw": {"endpoints": [upstream.address]},
        },
        "routes": [
            {"name": "raw", "match": {"path_prefix": "/raw"}, "split": {"raw": 100}, "retries": 0},
            {"name": "admin", "match": {"path_prefix": "/admin"}, "split": {"blue": 100}},
            {"name": "api", "match": {"path_prefix": "/api"}, "split": {"blue": 100}},
            {"name": "rest", "split": {"blue": 100}},
        ],
    }
    with start_inprocess(config) as process:
        yield Setup(process, upstream)
    upstream.close()


@pytest.fixture
def port(setup: Setup) -> int:
    return setup.turnout.port


def forwarded(response: RawResponse, name: str) -> list[str]:
    """Values of header `name` as the echo upstream received it."""
    return [value for key, value in response.json()["headers"] if key.lower() == name]


# -- a response never reaches another client -------------------------------------------------


def test_bytes_past_a_response_never_reach_the_next_client(port: int) -> None:
    assert get(port, "/raw/alice").body == b"hello"
    bob = get(port, "/raw/bob")
    assert bob.status == 200
    assert bob.body == b"second!"
    assert b"ALICE" not in bob.head


def test_a_body_after_a_head_answer_does_not_answer_the_next_request(port: int) -> None:
    get(port, "/raw/bob")  # leaves a warm pooled connection
    with RawConnection(port) as conn:
        conn.send(build_request("HEAD", "/raw/head") + build_request("GET", "/raw/bob"))
        head = conn.read_final_response("HEAD")[1]
        assert head.status == 200
        answer = conn.read_final_response("GET")[1]
        assert answer.body == b"second!"


def test_trailers_are_not_merged_into_the_next_response(port: int) -> None:
    first = get(port, "/raw/trailers")
    assert first.body == b"abc"
    second = get(port, "/raw/bob")
    assert b"leaked" not in second.head
    assert b"X-T" not in second.head


def test_endless_response_trailers_are_cut(setup: Setup) -> None:
    with RawConnection(setup.turnout.port) as conn:
        conn.send(build_request("GET", "/raw/endless-trailer"))
        conn.read_final_response("GET", allow_incomplete=True)
    wait_until(lambda: bool(ENDLESS), what="the upstream request")
    upstream_conn = ENDLESS[0]
    wait_until(lambda: upstream_conn.cut, timeout=10, what="Turnout to cut the trailers")
    assert upstream_conn.sent < CUT_BELOW


def test_endless_request_trailers_get_431(port: int) -> None:
    with RawConnection(port) as conn:
        conn.send(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: "
        )
        for _ in range(64):
            try:
                conn.send(b"a" * 16384)
            except OSError:
                break
        _, response = conn.read_final_response("POST")
    assert response.status == 431


# -- status codes and codings from the upstream ----------------------------------------------


@pytest.mark.parametrize("name", ["status600", "status099", "twice"])
def test_invalid_status_or_coding_from_upstream_is_502(port: int, name: str) -> None:
    response = get(port, f"/raw/{name}")
    assert response.status == 502
    assert "invalid response" in response.json()["error"]


def test_early_hints_are_passed_on(port: int) -> None:
    with RawConnection(port) as conn:
        conn.send(build_request("GET", "/raw/hints"))
        interim, final = conn.read_final_response("GET")
    assert [r.status for r in interim] == [103]
    assert interim[0].header("link") == "</s.css>; rel=preload"
    assert final.body == b"ok"


def test_early_hints_never_reach_an_http10_client(port: int) -> None:
    with RawConnection(port) as conn:
        conn.send(build_request("GET", "/raw/hints", version="HTTP/1.0"))
        interim, final = conn.read_final_response("GET")
    assert interim == []
    assert final.body == b"ok"


def test_an_http10_keep_alive_client_is_told_the_connection_stays(port: int) -> None:
    with RawConnection(port) as conn:
        for _ in range(2):
            response = conn.request("GET", "/x", [("Connection", "keep-alive")], version="HTTP/1.0")
            assert response.status == 200
            assert response.header("connection") == "keep-alive"
        assert not conn.closed_already()


# -- what the client may send ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET /.. HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a/../../b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET http://a/b#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\nMax-Forwards: two\r\n\r\n", 400),
    ],
)
def test_refused_requests(port: int, request_bytes: bytes, status: int) -> None:
    response, _ = send_raw(port, request_bytes)
    assert response.status == status
    assert response.json()["error"]


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/api/../admin/x", "/admin/x"),
        ("/api/%2e%2e/admin?x=%2e%2e", "/admin?x=%2e%2e"),
        ("/api/./v1/%7Euser", "/api/v1/~user"),
    ],
)
def test_routes_match_and_upstreams_get_the_normal_path(port: int, target: str, path: str) -> None:
    response = get(port, target)
    assert response.status == 200
    assert response.json()["path"] == path


def test_header_names_with_underscores_are_dropped(port: int) -> None:
    response = get(port, "/x", [("X_Forwarded_For", "6.6.6.6"), ("X-Kept", "1")])
    names = [key.lower() for key, _ in response.json()["headers"]]
    assert "x_forwarded_for" not in names
    assert "x-kept" in names
    assert forwarded(response, "x-forwarded-for") == ["127.0.0.1"]


def test_headers_named_by_connection_are_not_forwarded(port: int) -> None:
    response = get(
        port,
        "/x",
        [
            ("Connection", "x-forwarded-for, x-request-id"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Request-Id", "client-id"),
        ],
    )
    assert forwarded(response, "x-forwarded-for") == ["127.0.0.1"]
    assert forwarded(response, "x-request-id") != ["client-id"]


def test_options_with_max_forwards_0_is_answered_here(setup: Setup, blue: EchoUpstream) -> None:
    before = blue.requests
    with RawConnection(setup.turnout.port) as conn:
        response = conn.request("OPTIONS", "/x", [("Max-Forwards", "0")])
    assert response.status == 200
    assert "OPTIONS" in (response.header("allow") or "")
    assert blue.requests == before


def test_max_forwards_is_decremented(port: int) -> None:
    with RawConnection(port) as conn:
        response = conn.request("OPTIONS", "/x", [("Max-Forwards", "5")])
    assert forwarded(response, "max-forwards") == ["4"]
