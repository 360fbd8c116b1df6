"""Every pipelined request is answered, in order, whatever precedes it on the connection.

After a body larger than the connect buffer with the next head split across reads, behind
thousands of small requests in one write, and after an Upgrade the upstream declines. The body
of a request pipelined behind one still being answered is held only up to the connect buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.dataplane.http1 import CONNECT_BUFFER, PAUSE_PIPELINE, ClientConnection
from tests.support import wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.upstreams import EchoUpstream


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    with start_inprocess(config) as process:
        yield process


def test_request_after_a_large_body_with_its_head_split(turnout: InProcessTurnout) -> None:
    # The upstream reads slowly, so Turnout stops reading the client and then takes the end of
    # the body and the start of the next head in one large read.
    body = b"p" * 2_000_000
    second = build_request("GET", "/second")
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("POST", "/slowupload?pause_ms=20", body=body) + second[:10])
        conn.send(second[10:])
        first = conn.read_final_response("POST")[1]
        assert first.status == 200
        assert first.json()["body_len"] == len(body)
        answer = conn.read_final_response("GET")[1]
        assert answer.status == 200
        assert answer.json()["path"] == "/second"


def test_a_pipelined_body_is_held_only_up_to_the_connect_buffer(turnout: InProcessTurnout) -> None:
    body = b"q" * 8_000_000
    ctx = turnout.ctx

    def held() -> list[tuple[int, int]]:
        # (pause reasons, body bytes held) of a request waiting behind another, per client.
        return [
            (conn.paused, conn.queue[0].pending_size)
            for conn in ctx.acceptor.connections
            if isinstance(conn, ClientConnection) and conn.queue
        ]

    with RawConnection(turnout.port, deadline=30) as conn:
        conn.send(build_request("GET", "/slow?ms=2000"))
        # The second request goes out from a thread: its body is more than the kernel's
        # buffers hold, so sending it blocks once Turnout stops reading.
        sender = threading.Thread(
            target=conn.sock.sendall, args=(build_request("POST", "/echo", body=body),)
        )
        sender.start()
        wait_until(
            lambda: any(paused for paused, _ in turnout.call_soon(held)),
            what="reading paused behind the slow request",
        )
        [(paused, size)] = turnout.call_soon(held)
        assert paused & PAUSE_PIPELINE
        # One read past the buffer at most (uvloop reads up to 256 KiB at a time).
        assert CONNECT_BUFFER < size <= CONNECT_BUFFER + 256 * 1024
        first = conn.read_final_response("GET")[1]
        assert first.status == 200
        answer = conn.read_final_response("POST")[1]
        sender.join(30)
        assert answer.status == 200
        assert answer.json()["body_len"] == len(body)


def test_thousands_of_pipelined_requests_in_one_write(turnout: InProcessTurnout) -> None:
    count = 4000
    data = b"".join(build_request("GET", f"/n/{i}") for i in range(count))
    assert len(data) > 150_000
    with RawConnection(turnout.port, deadline=60) as conn:
        conn.send(data)
        paths = [conn.read_final_response("GET")[1].json()["path"] for _ in range(count)]
    assert paths == [f"/n/{i}" for i in range(count)]


def test_request_after_a_declined_upgrade_is_answered(turnout: InProcessTurnout) -> None:
    # The echo upstream answers a WebSocket handshake on /echo with a plain 200.
    upgrade = build_request(
        "GET",
        "/echo",
        [
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    with RawConnection(turnout.port) as conn:
        conn.send(upgrade + build_request("GET", "/after"))
        declined = conn.read_final_response("GET")[1]
        assert declined.status == 200
        after = conn.read_final_response("GET")[1]
        assert after.status == 200
        assert after.json()["path"] == "/after"
        # The connection goes on as HTTP/1.1.
        assert conn.request("GET", "/again").json()["path"] == "/again"


def test_request_after_an_h2c_upgrade_request_is_answered(turnout: InProcessTurnout) -> None:
    upgrade = build_request(
        "GET", "/h2c", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")]
    )
    with RawConnection(turnout.port) as conn:
        conn.send(upgrade + build_request("GET", "/after-h2c"))
        assert conn.read_final_response("GET")[1].status == 200
        assert conn.read_final_response("GET")[1].json()["path"] == "/after-h2c"
