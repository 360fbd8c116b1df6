"""What the access log and metrics say about refused requests and clients that leave early.

A refused head is timed from its first byte (not from the host's boot); a client that leaves
before its response is complete is recorded with NGINX's 499, whatever status had begun; an
aborted upload releases its upstream connection at once instead of at `timeouts.idle`; a
client that resets its connection while the upstream has not answered yet is noticed at once,
not when the answer comes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.upstreams import EchoUpstream


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        # Long enough that a test waiting for the abort to be noticed would time out first.
        "timeouts": {"idle": "60s"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    with start_inprocess(config, access_log=True) as process:
        yield process


def entry_for(turnout: InProcessTurnout, request_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = turnout.wait_for_log({request_id})[request_id]
    return entry


def test_a_refused_head_is_timed_from_its_first_byte(turnout: InProcessTurnout) -> None:
    started = time.monotonic()
    with RawConnection(turnout.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
        _, response = conn.read_final_response("GET")
    elapsed_ms = (time.monotonic() - started) * 1000
    assert response.status == 400
    entry = entry_for(turnout, response.json()["request_id"])
    assert entry["status"] == 400
    assert 0 <= entry["duration_ms"] <= elapsed_ms


def test_an_aborted_download_is_499(turnout: InProcessTurnout, blue: EchoUpstream) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/bytes?n=50000000", [("X-Request-Id", "abort-download")]))
        conn.sock.recv(1024)  # the head has begun: 200 is on its way
        conn.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
    entry = entry_for(turnout, "abort-download")
    assert (entry["status"], entry["flags"]) == (499, "client_abort")
    assert entry["bytes_out"] < 50_000_000


def test_an_aborted_upload_is_499_at_once(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: abort-upload\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"u" * 10_000
        )
        conn.sock.shutdown(socket.SHUT_WR)
        # Turnout hangs up without waiting for timeouts.idle (60 s).
        assert conn.wait_closed(10.0)
    entry = entry_for(turnout, "abort-upload")
    assert (entry["status"], entry["flags"]) == (499, "client_abort")


def test_a_reset_while_waiting_for_the_upstream_is_499_at_once(turnout: InProcessTurnout) -> None:
    started = time.monotonic()
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/slow?ms=30000", [("X-Request-Id", "abort-waiting")]))
        conn.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
    # Reading the client goes on while its request is answered, so the reset ends the exchange
    # (and frees its upstream connection) long before the upstream's 30 s answer.
    entry = entry_for(turnout, "abort-waiting")
    assert (entry["status"], entry["flags"]) == (499, "client_abort")
    assert entry["duration_ms"] < 30_000
    assert time.monotonic() - started < 30
