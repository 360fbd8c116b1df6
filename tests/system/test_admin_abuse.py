"""The admin plane under clients that hold connections: probes keep being answered.

Kubernetes restarts a pod whose /healthz fails, so slow heads, idle connections and clients that
never read must not be able to starve the admin port: connections are bounded in number (one
more closes the one that has waited longest for a head) and in time (a head must be complete
within `head_timeout`, a request done within `request_timeout`). A real Turnout with its file
limit lowered, flooded with slow heads, and `AdminServer` in process with short bounds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from proxy.control.admin import HEAD_TIMEOUT, MAX_CONNECTIONS, AdminServer
from tests.support import async_wait_until, wait_until
from tests.support.turnout import TurnoutFactory, http_status
from tests.support.upstreams import EchoUpstream

SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Slow: "
# Without the cap, this many held connections exhaust the supervisor's file limit below.
FLOOD = 600
FILE_LIMIT = 512
DEADLINE = 15.0
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(sock: socket.socket) -> bool:
    """The peer closed (FIN) or aborted (RST) the connection; nothing is read from it."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)


@pytest.fixture
def flood() -> Iterator[list[socket.socket]]:
    """Client sockets of the test, closed at the end."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def slow_head(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.sendall(SLOW_HEAD)
    return sock


def test_probes_answer_while_slow_heads_hold_the_admin_port(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, flood: list[socket.socket]
) -> None:
    proc = turnout_factory(
        {
            "workers": 1,
            "upstreams": {"blue": {"endpoints": [blue.address]}},
            "routes": [{"name": "all", "split": {"blue": 100}}],
        }
    )
    supervisor = proc.proc.pid
    resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))
    baseline = open_fds(supervisor)
    port = int(proc.config["admin"].rsplit(":", 1)[1])
    for _ in range(FLOOD):
        flood.append(slow_head(port))
    for _ in range(5):
        assert http_status(f"{proc.admin_url}/healthz") == 200
        assert http_status(f"{proc.admin_url}/readyz") == 200
    # Bounded in number: the supervisor holds no more than the cap (plus a few being closed).
    assert open_fds(supervisor) <= baseline + MAX_CONNECTIONS + 16
    evicted = sum(1 for sock in flood if closed_by_peer(sock))
    assert evicted >= FLOOD - MAX_CONNECTIONS
    assert proc.proc.poll() is None


@pytest.mark.slow
def test_a_slow_head_is_closed_after_the_head_timeout(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, flood: list[socket.socket]
) -> None:
    proc = turnout_factory(
        {
            "workers": 1,
            "upstreams": {"blue": {"endpoints": [blue.address]}},
            "routes": [{"name": "all", "split": {"blue": 100}}],
        }
    )
    flood.append(slow_head(int(proc.config["admin"].rsplit(":", 1)[1])))
    wait_until(
        lambda: closed_by_peer(flood[0]),
        timeout=HEAD_TIMEOUT + DEADLINE,
        what="the slow head to be closed",
    )
    assert http_status(f"{proc.admin_url}/healthz") == 200


# --- AdminServer in process, with short bounds ------------------------------------------------

BIG = 16 * 1024 * 1024


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * BIG)


Start = Callable[..., Awaitable[int]]


@pytest.fixture
async def start_admin() -> AsyncIterator[Start]:
    """`await start_admin(**bounds)`: an AdminServer with those bounds on a free port."""
    servers: list[AdminServer] = []

    async def start(**bounds: Any) -> int:
        app = web.Application()
        app.router.add_get("/healthz", _ok)
        app.router.add_put("/echo", _echo)
        app.router.add_get("/big", _big)
        server = AdminServer(app, **bounds)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await server.start(sock)
        servers.append(server)
        return int(sock.getsockname()[1])

    yield start
    for server in servers:
        await server.stop()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, data: bytes = b"") -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def ended(stream: Stream) -> bool:
    """Read until the server closes or resets the connection: True then (bounded wait)."""
    reader, _ = stream
    try:
        async with asyncio.timeout(DEADLINE):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    return True


async def status_line(stream: Stream, head: bytes) -> bytes:
    """Send (the rest of) a head and its end; the status line of the answer."""
    reader, writer = stream
    writer.write(head + b"\r\n")
    await writer.drain()
    async with asyncio.timeout(DEADLINE):
        return await reader.readline()


OK = b"HTTP/1.1 200 OK\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\n"


async def test_head_not_complete_within_the_timeout_is_closed(start_admin: Start) -> None:
    port = await start_admin(head_timeout=0.5)
    slow = await connect(port, SLOW_HEAD)
    quick = await connect(port)
    assert await status_line(quick, HEALTHZ) == OK
    assert await ended(slow)
    quick[1].close()


async def test_a_connection_over_the_cap_closes_the_one_waiting_longest(
    start_admin: Start,
) -> None:
    port = await start_admin(max_connections=4)
    waiting = [await connect(port, b"GET /healthz HTTP/1.1\r\n") for _ in range(4)]
    probe = await connect(port)
    assert await status_line(probe, HEALTHZ) == OK
    oldest, *others = waiting
    assert await ended(oldest)
    # The others were left alone: they complete their heads and are answered.
    for stream in others:
        assert await status_line(stream, b"Host: a\r\n") == OK
        stream[1].close()
    probe[1].close()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_when_every_connection_is_busy_the_oldest_request_gives_way(
    start_admin: Start, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start_admin(max_connections=2)
    # Two uploads that never finish: both connections run a request.
    uploads = [
        await connect(port, b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nab")
        for _ in range(2)
    ]
    probe = await connect(port)
    assert await status_line(probe, HEALTHZ) == OK
    assert await ended(uploads[0])
    probe[1].close()
    for _, writer in uploads:
        writer.close()
    # An aborted request is not an error of the server's: no "Error handling request" traceback.
    assert errors_logged(caplog) == []


async def test_an_upload_slower_than_the_request_timeout_is_aborted(
    start_admin: Start, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start_admin(request_timeout=0.5)
    upload = await connect(port, b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nab")
    assert await ended(upload)
    # A request in time on another connection is unaffected.
    quick = await connect(port, b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab")
    assert await status_line(quick, b"") == OK
    quick[1].close()
    assert errors_logged(caplog) == []


async def test_a_client_that_does_not_read_is_aborted_after_the_request_timeout(
    start_admin: Start,
) -> None:
    port = await start_admin(request_timeout=0.5)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    # A small window: the 16 MiB answer stalls in the server's write buffer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await async_wait_until(
            lambda: closed_by_peer(sock), seconds=DEADLINE, what="the stuck download aborted"
        )
    finally:
        sock.close()
