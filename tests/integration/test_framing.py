"""HTTP/1.1 framing through a real Turnout, on raw sockets.

Valid framings must survive the trip intact. Ambiguous or malformed requests (the raw material
of request smuggling) must get a 400 (or 431/413 for the limits) and reach the upstream not at
all: the `sink` upstream records every byte it reads, and after each bad request a marker
request is sent to it, which must be the only thing it saw.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.dataplane.http1 import PAUSE_BROKEN, ClientConnection
from tests.support import rawhttp, wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request, chunked
from tests.support.upstreams import EchoUpstream, RawUpstream, UpstreamHost, pattern_bytes

MAX_HEADER_SIZE = 8 * 1024
MAX_HEADERS = 50
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def sink(upstream_host: UpstreamHost) -> Iterator[RawUpstream]:
    upstream = upstream_host.raw("sink", "ok")
    yield upstream
    upstream_host.stop(upstream)


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream, sink: RawUpstream) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "limits": {
            "max_header_size": "8KiB",
            "max_headers": MAX_HEADERS,
            "max_request_body": "1MiB",
        },
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "sink": {"endpoints": [sink.address]},
        },
        "routes": [
            {"name": "sink", "match": {"path_prefix": "/sink"}, "split": {"sink": 100}},
            {"name": "main", "split": {"blue": 100}},
        ],
    }
    with start_inprocess(config) as process:
        yield process


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- valid framings ---------------------------------------------------------------------------


def test_chunked_request_body_is_forwarded_intact(turnout: InProcessTurnout) -> None:
    parts = [b"a", pattern_bytes(10), pattern_bytes(4096, "x"), pattern_bytes(70000, "y"), b"zz"]
    body = b"".join(parts)
    encoded = b"1;ext=1\r\na\r\n" + chunked(parts[1:])  # a chunk extension too
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("POST", "/upload", [("Transfer-Encoding", "chunked")]) + encoded)
        _, response = conn.read_final_response()
    assert response.status == 200, response
    described = response.json()
    assert described["body_len"] == len(body)
    assert described["body_sha256"] == sha(body)
    framing = {name.lower() for name, _ in described["headers"]} & {
        "content-length",
        "transfer-encoding",
    }
    assert len(framing) == 1, f"upstream saw framing headers {framing}"


def test_content_length_request_body_is_forwarded_intact(turnout: InProcessTurnout) -> None:
    body = pattern_bytes(100_000, "cl")
    with RawConnection(turnout.port) as conn:
        response = conn.request("POST", "/upload", body=body)
        empty = conn.request("POST", "/upload", [("Content-Length", "0")], b"")
    assert response.status == 200
    assert response.json()["body_len"] == len(body)
    assert response.json()["body_sha256"] == sha(body)
    assert empty.json()["body_len"] == 0


def test_body_at_the_limit_is_accepted(turnout: InProcessTurnout) -> None:
    body = pattern_bytes(MAX_BODY, "limit")
    with RawConnection(turnout.port) as conn:
        response = conn.request("POST", "/upload", body=body)
    assert response.status == 200
    assert response.json()["body_sha256"] == sha(body)


def test_chunked_response_arrives_whole(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        response = conn.request("GET", "/bytes?n=200000&seed=chunky")
    assert response.status == 200
    assert response.framing in ("chunked", "content-length")
    assert response.body == pattern_bytes(200_000, "chunky")


def test_fixed_response_keeps_its_content_length(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        response = conn.request("GET", "/fixed?n=50000&seed=fixed")
    assert response.status == 200
    assert response.framing == "content-length"
    assert response.header_values("content-length") == ["50000"]
    assert response.body == pattern_bytes(50_000, "fixed")


def test_head_gets_content_length_and_no_body(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        head = conn.request("HEAD", "/fixed?n=1234")
        # Had the proxy sent body bytes after the HEAD response, they would be parsed as the
        # start of this response and fail.
        after = conn.request("GET", "/after-head")
    assert head.status == 200
    assert head.header_values("content-length") == ["1234"]
    assert head.body == b""
    assert after.status == 200
    assert after.json()["path"] == "/after-head"


def test_204_and_304_have_no_body(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        no_content = conn.request("GET", "/status/204")
        not_modified = conn.request("GET", "/status/304", [("If-None-Match", '"v1"')])
        after = conn.request("GET", "/after-empty")
    assert no_content.status == 204
    assert not_modified.status == 304
    assert no_content.body == b""
    assert not_modified.body == b""
    assert no_content.header("transfer-encoding") is None
    assert after.json()["path"] == "/after-empty"


def test_keep_alive_serves_many_requests_on_one_connection(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        for index in range(10):
            body = pattern_bytes(index * 1000, str(index)) if index % 2 else None
            method = "POST" if body is not None else "GET"
            response = conn.request(method, f"/ka/{index}", body=body)
            assert response.status == 200
            described = response.json()
            assert described["path"] == f"/ka/{index}"
            assert described["body_len"] == (len(body) if body is not None else 0)


def test_http10_client_gets_unchunked_response_and_close(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/bytes?n=5000&seed=old", version="HTTP/1.0"))
        _, response = conn.read_final_response()
        closed = conn.wait_closed()
    assert response.status == 200
    assert response.framing in ("content-length", "close"), "chunked sent to an HTTP/1.0 client"
    assert response.body == pattern_bytes(5000, "old")
    assert closed, "connection of an HTTP/1.0 client without keep-alive stayed open"


def test_pipelined_requests_are_answered_in_order(turnout: InProcessTurnout) -> None:
    body = pattern_bytes(20000, "pipe")
    batch = (
        build_request("GET", "/pipe/1")
        + build_request("POST", "/pipe/2", body=body)
        + build_request("GET", "/pipe/3/slow?ms=200")
        + build_request("GET", "/pipe/4")
    )
    with RawConnection(turnout.port) as conn:
        conn.send(batch)
        responses = [conn.read_final_response()[1] for _ in range(4)]
    paths = [response.json()["path"] for response in responses]
    assert paths == ["/pipe/1", "/pipe/2", "/pipe/3/slow?ms=200", "/pipe/4"]
    assert responses[1].json()["body_sha256"] == sha(body)


def test_expect_100_continue(turnout: InProcessTurnout) -> None:
    body = b"hello world"
    with RawConnection(turnout.port) as conn:
        conn.send(
            build_request(
                "POST",
                "/expect",
                [("Expect", "100-continue"), ("Content-Length", str(len(body)))],
            )
        )
        interim = conn.read_response(deadline=5.0)
        assert interim.status == 100, f"expected 100 Continue before the body, got {interim}"
        conn.send(body)
        _, response = conn.read_final_response()
    assert response.status == 200
    assert response.json()["body_len"] == len(body)
    assert response.json()["body_sha256"] == sha(body)


# -- requests that must be refused without reaching the upstream ---------------------------


def assert_refused_and_not_forwarded(
    turnout: InProcessTurnout,
    sink: RawUpstream,
    raw: bytes,
    statuses: tuple[int, ...] = (400,),
    *,
    must_close: bool = True,
) -> None:
    seen_before = len(sink.requests)
    unparsed_before = len(sink.unparsed)
    with RawConnection(turnout.port) as conn:
        conn.send(raw)
        _, response = conn.read_final_response()
        assert response.status in statuses, response
        if must_close:
            assert conn.wait_closed(), "connection open after a request of unknown framing"
    # The marker request must be the next and only request the sink ever sees.
    marker = f"/sink/marker-{uuid.uuid4().hex}"
    assert rawhttp.get(turnout.port, marker).status == 200
    targets = [request.target for request in sink.requests[seen_before:]]
    assert targets == [marker], f"the sink received more than the marker: {targets}"
    assert sink.unparsed[unparsed_before:] == []


AMBIGUOUS: dict[str, bytes] = {
    "content-length-and-transfer-encoding": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-and-content-length": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "duplicate-differing-content-length": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "duplicate-equal-content-length": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "content-length-plus-sign": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc"
    ),
    "content-length-two-numbers": (
        b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: 3 3\r\n\r\nabc"
    ),
    "content-length-negative": b"POST /sink/a HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    "obs-fold": b"GET /sink/a HTTP/1.1\r\nHost: t\r\nX-Folded: one\r\n two\r\n\r\n",
    "bare-lf": b"GET /sink/a HTTP/1.1\nHost: t\nX-A: 1\n\n",
    "nul-in-header": b"GET /sink/a HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "cr-in-header-value": b"GET /sink/a HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",
    "transfer-encoding-in-http10": (
        b"POST /sink/a HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "space-before-colon": b"GET /sink/a HTTP/1.1\r\nHost: t\r\nX-A : 1\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
def test_ambiguous_framing_gets_400_and_nothing_is_forwarded(
    turnout: InProcessTurnout, sink: RawUpstream, raw: bytes
) -> None:
    assert_refused_and_not_forwarded(turnout, sink, raw)


def test_transfer_encoding_not_ending_in_chunked_is_refused(
    turnout: InProcessTurnout, sink: RawUpstream
) -> None:
    # RFC 9112 6.3: the body length cannot be known; 400 (or 501 for an unknown coding).
    raw = b"POST /sink/a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc"
    assert_refused_and_not_forwarded(turnout, sink, raw, (400, 501))


def test_request_head_over_max_header_size_gets_431(
    turnout: InProcessTurnout, sink: RawUpstream
) -> None:
    raw = build_request("GET", "/sink/big", [("X-Big", "b" * (MAX_HEADER_SIZE + 2048))])
    assert_refused_and_not_forwarded(turnout, sink, raw, (431,), must_close=False)


def test_more_than_max_headers_gets_431(turnout: InProcessTurnout, sink: RawUpstream) -> None:
    headers = [(f"X-H{index}", "v") for index in range(MAX_HEADERS + 10)]
    raw = build_request("GET", "/sink/many", headers)
    assert_refused_and_not_forwarded(turnout, sink, raw, (431,), must_close=False)


def test_heads_under_the_limits_are_forwarded(turnout: InProcessTurnout, sink: RawUpstream) -> None:
    seen_before = len(sink.requests)
    many = [(f"X-H{index}", "v") for index in range(MAX_HEADERS - 10)]
    large = [("X-Big", "b" * (MAX_HEADER_SIZE - 2048))]
    with RawConnection(turnout.port) as conn:
        assert conn.request("GET", "/sink/many-ok", many).status == 200
        assert conn.request("GET", "/sink/large-ok", large).status == 200
    received = sink.requests[seen_before:]
    assert [request.target for request in received] == ["/sink/many-ok", "/sink/large-ok"]
    assert received[1].header_values("x-big") == ["b" * (MAX_HEADER_SIZE - 2048)]


def test_content_length_over_max_request_body_gets_413(
    turnout: InProcessTurnout, sink: RawUpstream
) -> None:
    # Only the head is sent: the proxy must answer from the Content-Length alone.
    raw = build_request("POST", "/sink/huge", [("Content-Length", str(MAX_BODY + 1))])
    assert_refused_and_not_forwarded(turnout, sink, raw, (413,), must_close=False)


def test_chunked_body_over_max_request_body_is_cut_off(turnout: InProcessTurnout) -> None:
    # The size is known only while streaming: the proxy must stop at the limit and answer 413
    # (nothing was answered yet: the echo upstream replies only after the whole body).
    piece = pattern_bytes(64 * 1024, "over")
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("POST", "/upload", [("Transfer-Encoding", "chunked")]))
        try:
            for _ in range(2 * MAX_BODY // len(piece)):
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the proxy stopped reading and closed: expected once the limit is passed
        _, response = conn.read_final_response()
    assert response.status == 413, response


def test_garbage_gets_400_and_the_connection_closes(
    turnout: InProcessTurnout, sink: RawUpstream
) -> None:
    assert_refused_and_not_forwarded(turnout, sink, b"this is not http at all\r\n\r\n")


def test_a_stalled_half_head_does_not_block_other_clients(turnout: InProcessTurnout) -> None:
    stalled = [RawConnection(turnout.port) for _ in range(5)]
    try:
        for conn in stalled:
            conn.send(b"GET /stalled HTTP/1.1\r\nHost: turnout.test\r\nX-Partial: ")
        for index in range(10):
            response = rawhttp.get(turnout.port, f"/while-stalled/{index}")
            assert response.status == 200
            assert response.json()["path"] == f"/while-stalled/{index}"
    finally:
        for conn in stalled:
            conn.close()


def test_a_request_body_that_stops_arriving_gets_408(blue: EchoUpstream) -> None:
    config: dict[str, Any] = {
        "timeouts": {"idle": "300ms"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "main", "split": {"blue": 100}}],
    }
    with start_inprocess(config, access_log=True) as turnout, RawConnection(turnout.port) as conn:
        head = build_request("POST", "/upload", [("Content-Length", "10"), ("X-Request-Id", "b1")])
        conn.send(head + b"12")
        _, response = conn.read_final_response()
        assert response.status == 408
        assert response.json()["error"]
        assert conn.wait_closed(5.0)
        assert turnout.wait_for_log({"b1"})["b1"]["flags"] == "client_timeout"


def test_a_broken_request_pipelined_behind_running_ones_is_answered_after_them(
    turnout: InProcessTurnout,
) -> None:
    def broken() -> list[int]:
        # The pause reasons of every client connection that met a broken pipelined request.
        return [
            conn.paused
            for conn in turnout.ctx.acceptor.connections
            if isinstance(conn, ClientConnection) and conn.paused & PAUSE_BROKEN
        ]

    with RawConnection(turnout.port) as conn:
        conn.send(
            build_request("GET", "/slow?ms=2000")
            + build_request("GET", "/second")
            + b"this is not http\r\n\r\n"
        )
        # Nothing after the broken request can be parsed: reading stops while the requests
        # before it are answered, instead of failing the parser again on each read.
        wait_until(lambda: bool(turnout.call_soon(broken)), what="reading stopped")
        conn.send(b"more garbage\r\n\r\n")
        # Every request before the broken one is answered, in order, on a connection that
        # stays open for them; then the broken one gets its 400, and the connection ends.
        _, first = conn.read_final_response()
        assert first.status == 200
        assert first.json()["path"] == "/slow?ms=2000"
        assert first.header("connection") is None
        _, second = conn.read_final_response()
        assert second.status == 200
        assert second.json()["path"] == "/second"
        _, refused = conn.read_final_response()
        assert refused.status == 400
        assert refused.json()["error"].startswith("malformed request")
        assert refused.header("connection") == "close"
        assert conn.wait_closed(5.0)
        assert conn.buffered == b""


def test_a_queued_request_whose_body_passes_the_limit_is_never_forwarded(
    blue: EchoUpstream,
) -> None:
    # The queued request's body arrives with the running request (one write, one read): it is
    # bounded while it waits, and refused before it ever starts.
    config: dict[str, Any] = {
        "limits": {"max_request_body": "1KiB"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "main", "split": {"blue": 100}}],
    }
    second = build_request("POST", "/queued", [("Transfer-Encoding", "chunked")])
    second += chunked([b"q" * 1024, b"q" * 1024])
    before = blue.requests
    with start_inprocess(config) as turnout, RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/slow?ms=300") + second)
        _, first = conn.read_final_response()
        assert first.status == 200
        # Its turn comes after the running request's: 413, and the connection ends.
        _, refused = conn.read_final_response()
        assert refused.status == 413
        assert refused.header("connection") == "close"
        assert conn.wait_closed(5.0)
        assert conn.buffered == b""
    assert blue.requests == before + 1, "the over-limit request reached the upstream"
