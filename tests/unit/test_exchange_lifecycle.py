"""The exchange's two states as the data plane moves them (proxy.dataplane.http1).

A real `ClientConnection` and a pooled `UpstreamConnection` on in-memory transports (as in
benchmarks/hotpath.py), driven by hand byte by byte, so each transition of
proxy/core/exchange_state.py's tables is seen where the data plane makes it. What the client
and the upstream see is the integration tests' business; this checks the bookkeeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.core.config import parse_config
from proxy.core.exchange_state import (
    BROKEN,
    DONE,
    IDLE,
    READING_BODY,
    READING_HEAD,
    RECEIVED,
    STREAMING,
    TUNNEL,
    WAITING,
)
from proxy.core.table import compile_table
from proxy.dataplane.http1 import ClientConnection, Exchange
from proxy.dataplane.upstream import UpstreamConnection
from proxy.dataplane.worker import WorkerContext
from proxy.runtime.build import data_plane_build

CONFIG = """
listen: 127.0.0.1:18080
upstreams:
  backend: {endpoints: [127.0.0.1:19003]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {backend: 100}
"""

GET = b"GET /api/x HTTP/1.1\r\nHost: example.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class MemoryTransport(asyncio.Transport):
    """Keeps what is written; enough of the transport API for the data plane."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.data += piece

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


# A compiled class cannot be subclassed from Python: with the compiled build these tests are
# skipped (the same source runs; the integration tests check its behaviour on both builds).
pytestmark = pytest.mark.skipif(
    data_plane_build() == "compiled", reason="subclasses ClientConnection to record exchanges"
)


class RecordingConnection(ClientConnection):
    """A client connection that keeps every exchange it creates, to look at after the end."""

    __slots__ = ("seen",)

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.seen: list[Exchange] = []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        assert self.parsing is not None
        self.seen.append(self.parsing)


@dataclass
class Plane:
    ctx: WorkerContext
    client: RecordingConnection
    client_transport: MemoryTransport
    upstream: UpstreamConnection
    upstream_transport: MemoryTransport

    def send(self, data: bytes) -> None:
        self.client.data_received(data)
        self.ctx.batcher.flush()

    def answer(self, data: bytes) -> None:
        self.upstream.data_received(data)
        self.ctx.batcher.flush()

    @property
    def seen(self) -> list[Exchange]:
        return self.client.seen

    def states(self, ex: Exchange) -> tuple[int, int]:
        return ex.request_state, ex.response_state


@pytest.fixture
def plane() -> Iterator[Plane]:
    loop = asyncio.new_event_loop()
    ctx = WorkerContext(loop, 0, access_log=False)
    ctx.apply(compile_table(parse_config(CONFIG, "test.yaml"), generation=1, sha256="x"))
    client = RecordingConnection(ctx)
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    pool = next(iter(ctx.pools.endpoints.values()))
    upstream = UpstreamConnection(pool)
    upstream_transport = MemoryTransport()
    upstream.connection_made(upstream_transport)
    pool.connections.add(upstream)
    upstream.reusable = True
    pool.release(upstream, ctx.state.now)
    try:
        yield Plane(ctx, client, client_transport, upstream, upstream_transport)
    finally:
        loop.close()


def test_a_plain_exchange_goes_waiting_streaming_done(plane: Plane) -> None:
    plane.send(GET)
    (ex,) = plane.seen
    assert plane.states(ex) == (RECEIVED, WAITING)
    plane.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert plane.states(ex) == (RECEIVED, STREAMING)
    plane.answer(b"ok")
    assert plane.states(ex) == (RECEIVED, DONE)
    assert plane.client.current is None
    assert plane.client_transport.data.endswith(b"\r\n\r\nok")


def test_the_request_side_follows_the_parser(plane: Plane) -> None:
    plane.send(b"POST /api/x HTTP/1.1\r\nHost: example.test\r\n")
    (ex,) = plane.seen
    assert plane.states(ex) == (READING_HEAD, IDLE)
    plane.send(b"Content-Length: 4\r\n\r\nab")
    assert plane.states(ex) == (READING_BODY, WAITING)  # routed and forwarded while it streams
    plane.send(b"cd")
    assert plane.states(ex) == (RECEIVED, WAITING)
    assert plane.upstream_transport.data.endswith(b"\r\n\r\nabcd")


def test_a_refused_head_is_answered_without_beginning(plane: Plane) -> None:
    plane.send(b"GET /api/x HTTP/1.1\r\n\r\n")  # HTTP/1.1 without Host: 400
    (ex,) = plane.seen
    assert ex.response_state == DONE
    assert ex.status == 400
    assert ex.upstream_conn is None
    assert plane.client_transport.data.startswith(b"HTTP/1.1 400 ")


def test_no_route_is_answered_after_beginning(plane: Plane) -> None:
    plane.send(b"GET /elsewhere HTTP/1.1\r\nHost: example.test\r\n\r\n")
    (ex,) = plane.seen
    assert plane.states(ex) == (RECEIVED, DONE)
    assert ex.status == 404
    assert not plane.upstream_transport.data


def test_a_queued_request_breaks_with_its_connection(plane: Plane) -> None:
    plane.send(GET + GET)
    first, second = plane.seen
    assert plane.states(first) == (RECEIVED, WAITING)
    assert plane.states(second) == (RECEIVED, IDLE)  # pipelined: waits for the first
    plane.client.connection_lost(None)
    assert first.response_state == BROKEN
    assert first.status == 499
    assert second.response_state == BROKEN


def test_the_next_pipelined_request_begins_when_the_first_is_done(plane: Plane) -> None:
    plane.send(GET + GET)
    first, second = plane.seen
    plane.answer(OK)
    assert first.response_state == DONE
    assert plane.states(second) == (RECEIVED, WAITING)
    plane.answer(OK)
    assert second.response_state == DONE


def test_a_response_broken_midway_ends_broken(plane: Plane) -> None:
    plane.send(GET)
    (ex,) = plane.seen
    plane.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert ex.response_state == STREAMING
    plane.upstream.connection_lost(None)
    assert ex.response_state == BROKEN
    assert plane.client_transport.aborted
    # A late notice finds the exchange over and changes nothing.
    ex.timed_out()
    ex.client_lost()
    assert ex.response_state == BROKEN


def test_a_websocket_goes_through_a_tunnel(plane: Plane) -> None:
    plane.send(
        b"GET /api/ws HTTP/1.1\r\nHost: example.test\r\nConnection: upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    (ex,) = plane.seen
    assert plane.states(ex) == (RECEIVED, WAITING)
    plane.answer(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert ex.response_state == TUNNEL
    plane.upstream.connection_lost(None)  # the upstream closed the tunnel
    assert ex.response_state == DONE


def test_a_timeout_before_the_response_is_a_local_answer(plane: Plane) -> None:
    plane.send(GET)
    (ex,) = plane.seen
    ex.timed_out()
    assert ex.response_state == DONE
    assert ex.status == 504
    assert plane.client_transport.data.startswith(b"HTTP/1.1 504 ")
