"""The raw HTTP test client itself: `send_raw` settles as soon as the answer is known.

A fake server on a real socket answers one request with a scripted response and either closes
or keeps the connection open until the client leaves.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.rawhttp import Framing, RawResponse, announces_close, send_raw


class OneShot:
    """Answers the first request of each connection with `response`; closes if `close`."""

    def __init__(self, response: bytes, close: bool) -> None:
        self.response = response
        self.close_after = close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(self.response)
            if self.close_after:
                return
            # Keep-alive: the server never closes; it waits for the client to leave.
            while conn.recv(65536):
                pass

    def stop(self) -> None:
        self.sock.close()
        self._thread.join(5.0)


@pytest.fixture
def serve() -> Iterator[list[OneShot]]:
    servers: list[OneShot] = []
    yield servers
    for server in servers:
        server.stop()


KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSING = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbad"


def test_a_keep_alive_answer_returns_without_waiting_for_a_close(serve: list[OneShot]) -> None:
    server = OneShot(KEEP_ALIVE, close=False)
    serve.append(server)
    response, closed = send_raw(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status, response.body, closed) == (200, b"ok", False)


def test_an_announced_close_is_waited_for(serve: list[OneShot]) -> None:
    server = OneShot(CLOSING, close=True)
    serve.append(server)
    response, closed = send_raw(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status, response.body, closed) == (400, b"bad", True)


def test_an_announced_close_that_does_not_come_is_reported(serve: list[OneShot]) -> None:
    server = OneShot(CLOSING, close=False)
    serve.append(server)
    response, closed = send_raw(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", deadline=0.5)
    assert (response.status, closed) == (400, False)


def response(version: str, headers: list[tuple[str, str]], framing: Framing) -> RawResponse:
    return RawResponse(version, 200, "OK", headers, framing=framing)


@pytest.mark.parametrize(
    ("version", "headers", "framing", "expected"),
    [
        ("HTTP/1.1", [], "content-length", False),
        ("HTTP/1.1", [("Connection", "keep-alive")], "chunked", False),
        ("HTTP/1.1", [("Connection", "Close")], "content-length", True),
        ("HTTP/1.1", [("connection", "x-foo, close")], "none", True),
        ("HTTP/1.1", [], "close", True),
        ("HTTP/1.0", [], "content-length", True),
        ("HTTP/1.0", [("Connection", "Keep-Alive")], "content-length", False),
    ],
)
def test_announces_close(
    version: str, headers: list[tuple[str, str]], framing: Framing, expected: bool
) -> None:
    assert announces_close(response(version, headers, framing)) is expected
