"""Limits and codings at the edge: an unterminated giant header line is refused (431), a coded
close-delimited body keeps its coding, connections over `limits.max_connections` wait in the
kernel's backlog."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, ResponseError, send_raw


class CodedUpstream:
    """Answers every request with a gzip-coded, close-delimited body (no chunked coding)."""

    BODY = b"\x1f\x8b pretend-gzip-bytes \x00\x01\x02"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: gzip\r\nConnection: close\r\n\r\n" + self.BODY
                )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def coded() -> Iterator[CodedUpstream]:
    upstream = CodedUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def turnout(coded: CodedUpstream) -> Iterator[InProcessTurnout]:
    config = {
        "limits": {"max_header_size": 4096},
        "upstreams": {"coded": {"endpoints": [f"127.0.0.1:{coded.port}"]}},
        "routes": [{"name": "all", "split": {"coded": 100}}],
    }
    proc = start_inprocess(config)
    yield proc
    proc.close()


def test_unterminated_header_line_over_the_limit_gets_431(
    turnout: InProcessTurnout, coded: CodedUpstream
) -> None:
    before = coded.requests
    # One header line of 64 KiB with no end: llhttp would hold it until its CRLF.
    with RawConnection(turnout.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 65536)
        _, response = conn.read_final_response("GET")
        assert response.status == 431
        assert conn.wait_closed(5.0)
    assert coded.requests == before


def test_coded_close_delimited_body_keeps_its_coding(
    turnout: InProcessTurnout, coded: CodedUpstream
) -> None:
    response, _ = send_raw(turnout.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    assert response.header("transfer-encoding") == "gzip, chunked"
    assert response.body == CodedUpstream.BODY


def test_connections_beyond_max_connections_wait_in_the_backlog(coded: CodedUpstream) -> None:
    config = {
        "limits": {"max_connections": 2},
        "upstreams": {"coded": {"endpoints": [f"127.0.0.1:{coded.port}"]}},
        "routes": [{"name": "all", "split": {"coded": 100}}],
    }
    proc = start_inprocess(config)
    try:
        # `OPTIONS *` goes to the upstream like any request (the route has no path prefix);
        # the coded upstream answers it 200 with its body, which the proxy chunks.
        request = b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"
        held = [RawConnection(proc.port), RawConnection(proc.port)]
        for conn in held:
            conn.send(request)
            _, response = conn.read_final_response("OPTIONS")
            assert (response.status, response.body) == (200, CodedUpstream.BODY)
        answered = coded.requests
        # A third connection completes the TCP handshake (the kernel's backlog) but is not
        # accepted: its request is not answered, nor forwarded, while the two others stay open...
        waiting = RawConnection(proc.port, deadline=1.0)
        waiting.send(request)
        with pytest.raises(ResponseError, match="no data before the deadline"):
            waiting.read_final_response("OPTIONS")
        assert coded.requests == answered
        # ...and is served as soon as one of them closes.
        held[0].close()
        waiting.deadline = 10.0
        _, response = waiting.read_final_response("OPTIONS")
        assert (response.status, response.body) == (200, CodedUpstream.BODY)
        assert coded.requests == answered + 1
        waiting.close()
        held[1].close()
    finally:
        proc.close()
