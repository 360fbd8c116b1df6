"""An HTTP/1.1 client's request trailers (a chunked body's trailer section) reach the upstream."""

from __future__ import annotations

from tests.support.inprocess import start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.scripted import Connection, ScriptedUpstream


def test_chunked_request_trailers_end_the_upstream_body() -> None:
    # A client's trailer section reaches the upstream as the trailer section of the chunked
    # body it is sent; framing and connection fields among them never pass.
    received: list[bytes] = []

    def script(conn: Connection) -> None:
        data = conn.head
        while not (b"\r\n0\r\n" in data[data.index(b"\r\n\r\n") :] and data.endswith(b"\r\n\r\n")):
            chunk = conn.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        received.append(data)
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    upstream = ScriptedUpstream(script)
    cfg = {
        "upstreams": {"raw": {"endpoints": [upstream.address]}},
        "routes": [{"name": "all", "split": {"raw": 100}}],
    }
    raw = build_request("POST", "/up", [("Transfer-Encoding", "chunked")]) + (
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nKeep-Alive: 5\r\nX-Request-Id: spoof\r\n\r\n"
    )
    try:
        with start_inprocess(cfg) as turnout, RawConnection(turnout.port) as conn:
            conn.send(raw)
            response = conn.read_final_response("POST")[1]
    finally:
        upstream.close()
    assert (response.status, response.body) == (200, b"ok"), response.body
    forwarded = received[0]
    assert b"transfer-encoding: chunked\r\n" in forwarded.lower()
    assert forwarded.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"), forwarded
