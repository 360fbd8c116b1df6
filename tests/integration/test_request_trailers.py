"""Request trailers reach an HTTP/1.1 upstream as the trailer section of the chunked body it is
sent, whether the client spoke HTTP/1.1 (its own chunked body's trailers) or HTTP/2 (a HEADERS
frame after its data); framing and connection fields among them never pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.h2client import RawH2
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.scripted import Connection, ScriptedUpstream


class Recorded:
    """A raw HTTP/1.1 upstream that keeps each whole request, its chunked body included."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.upstream = ScriptedUpstream(self._script)

    def _script(self, conn: Connection) -> None:
        data = conn.head
        # The whole chunked body: its last chunk, then the trailer section's blank line.
        while not (b"\r\n0\r\n" in data[data.index(b"\r\n\r\n") :] and data.endswith(b"\r\n\r\n")):
            chunk = conn.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.requests.append(data)
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
def recorded() -> Iterator[tuple[Recorded, InProcessTurnout]]:
    recorder = Recorded()
    cfg: dict[str, Any] = {
        "upstreams": {"raw": {"endpoints": [recorder.upstream.address]}},
        "routes": [{"name": "all", "split": {"raw": 100}}],
    }
    try:
        with start_inprocess(cfg) as turnout:
            yield recorder, turnout
    finally:
        recorder.upstream.close()


def test_an_http1_clients_trailers_end_the_upstream_body(
    recorded: tuple[Recorded, InProcessTurnout],
) -> None:
    recorder, turnout = recorded
    raw = build_request("POST", "/up", [("Transfer-Encoding", "chunked")]) + (
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nKeep-Alive: 5\r\nX-Request-Id: spoof\r\n\r\n"
    )
    with RawConnection(turnout.port) as conn:
        conn.send(raw)
        response = conn.read_final_response("POST")[1]
    assert (response.status, response.body) == (200, b"ok"), response.body
    forwarded = recorder.requests[0]
    assert b"transfer-encoding: chunked\r\n" in forwarded.lower()
    assert forwarded.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"), forwarded


def test_an_http2_clients_trailers_end_a_chunked_body(
    recorded: tuple[Recorded, InProcessTurnout],
) -> None:
    recorder, turnout = recorded
    with RawH2(turnout.port) as client:
        sid = client.request("/up", method="POST", body=b"hello", end=False)
        client.conn.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
        client.flush()
        status, _, body = client.response(sid)
    assert (status, body) == (200, b"ok")
    forwarded = recorder.requests[0]
    assert b"transfer-encoding: chunked\r\n" in forwarded.lower()
    assert forwarded.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"), forwarded
