"""The connection state machine: pipelining, framing, retries, hop-by-hop Connection, HTTP/1.0.

Every test talks raw HTTP/1.1 to a real Turnout and to `ScriptedUpstream`, a hand-written
upstream in this module whose behaviour is chosen per request by the path:

- `.../reset-once/KEY`: the first request with KEY is read whole, then the connection is reset
  (before any response byte); later ones are answered normally.
- `.../slow?ms=N`: answer after N ms.
- `.../cl-hop`: the response names `Content-Length` in its `Connection` header (RFC 9110 7.6.1
  makes it hop-by-hop, so the proxy must frame the body some other way).
- `.../big?n=N`: N bytes with a Content-Length; `.../stream?n=N`: N bytes chunked, 64 KiB per
  drained write, counted in `streamed` (how much the proxy has taken).
- `.../early?keep=N`: read the body slowly until N bytes are left, answer, then read the rest.
- anything else: 200 with a JSON description of the request as read off the wire.

The upstream records every request it parsed, so a test can tell exactly what the proxy sent.
`slow_reader` is the same upstream with a small socket receive buffer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.support import wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, RawResponse, build_request
from tests.support.upstreams import UpstreamHost

Headers = list[tuple[str, str]]


@dataclass
class Seen:
    """One request as the scripted upstream read it."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream whose answer depends on the request path (module docstring)."""

    def __init__(self, name: str, rcvbuf: int = 0) -> None:
        self.name = name
        self.rcvbuf = rcvbuf
        self.port = 0
        self.requests: list[Seen] = []
        self.connections = 0
        self.streamed = 0
        self.streams_done: list[str] = []
        self._reset_done: set[str] = set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """`127.0.0.1:port`."""
        return f"127.0.0.1:{self.port}"

    def targets(self) -> list[str]:
        """The request targets seen so far, in order."""
        return [seen.target for seen in list(self.requests)]

    async def start(self) -> None:
        """Bind 127.0.0.1:0 and serve (with a small receive buffer if `rcvbuf` is set)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf:
            # Set before listen so accepted sockets inherit it: the upstream is a slow reader.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        limit = 65536 if self.rcvbuf else 1 << 20
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=limit)
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop serving and abort open connections."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> Seen | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: Headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return Seen(method, target, version, headers, b"")

    async def _read_body(self, seen: Seen, reader: asyncio.StreamReader) -> None:
        lower = {name.lower(): value for name, value in seen.headers}
        body = bytearray()
        if "chunked" in lower.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                body += (await reader.readexactly(size + 2))[:-2]
        elif "content-length" in lower:
            body += await reader.readexactly(int(lower["content-length"]))
        seen.body = bytes(body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                seen = await self._read_head(reader)
                if seen is None:
                    break
                if seen.target.partition("?")[0].endswith("/early"):
                    self.requests.append(seen)
                    await self._answer_early(seen, reader, writer)
                    continue
                await self._read_body(seen, reader)
                self.requests.append(seen)
                if not await self._answer(seen, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer_early(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # `.../early?keep=N`: read the body slowly until N bytes are left, answer, then read and
        # discard the rest (RFC 9112 9.3: a server that answers early and keeps the connection
        # must read the body). The pauses let the proxy's buffer toward us fill and drain.
        lower = {name.lower(): value for name, value in seen.headers}
        left = int(lower.get("content-length", "0"))
        query = seen.target.partition("?")[2]
        keep = int(query.partition("keep=")[2] or str(left))
        while left > keep:
            data = await reader.read(min(65536, left - keep))
            if not data:
                return
            left -= len(data)
            await asyncio.sleep(0.002)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.2)
        while left:
            data = await reader.read(min(65536, left))
            if not data:
                return
            left -= len(data)

    async def _answer(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        path, _, query = seen.target.partition("?")
        segments = path.split("/")
        params = dict(part.partition("=")[::2] for part in query.split("&") if part)
        if len(segments) >= 2 and segments[-2] == "reset-once" and path not in self._reset_done:
            self._reset_done.add(path)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if segments[-1] == "slow":
            await asyncio.sleep(int(params.get("ms", "300")) / 1000)
        if segments[-1] == "cl-hop":
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
            )
            await writer.drain()
            return True
        if segments[-1] == "big":
            size = int(params["n"])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"b" * size)
            await writer.drain()
            return True
        if segments[-1] == "stream":
            # Chunked, 64 KiB at a time, each written only when the previous one drained.
            remaining = int(params["n"])
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"s" * 65536
            while remaining:
                step = min(remaining, len(piece))
                writer.write(b"%x\r\n%b\r\n" % (step, piece[:step]))
                await writer.drain()
                remaining -= step
                self.streamed += step
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.streams_done.append(seen.target)
            return True
        body = orjson.dumps(
            {
                "upstream": self.name,
                "method": seen.method,
                "target": seen.target,
                "version": seen.version,
                "headers": seen.headers,
                "body": seen.body.decode("latin-1"),
            }
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )
        await writer.drain()
        return True


@dataclass
class Upstreams:
    """The module's upstreams."""

    main: ScriptedUpstream
    internal: ScriptedUpstream
    slow_reader: ScriptedUpstream


@pytest.fixture(scope="module")
def ups(upstream_host: UpstreamHost) -> Iterator[Upstreams]:
    started = Upstreams(
        ScriptedUpstream("main"),
        ScriptedUpstream("internal"),
        ScriptedUpstream("slow_reader", rcvbuf=16384),
    )
    for upstream in vars(started).values():
        upstream_host.call(upstream.start())
    yield started
    for upstream in vars(started).values():
        upstream_host.call(upstream.stop())


@pytest.fixture(scope="module")
def turnout(ups: Upstreams) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        # Short timeouts so that a hung exchange shows up as a 408/504 within the test deadline.
        "timeouts": {"connect": "1s", "response": "3s", "idle": "3s"},
        "upstreams": {
            "main": {"endpoints": [ups.main.address]},
            "internal": {"endpoints": [ups.internal.address]},
            "slowreader": {"endpoints": [ups.slow_reader.address]},
        },
        "routes": [
            {
                "name": "slowreader",
                "match": {"host": "slow-reader.test"},
                "split": {"slowreader": 100},
            },
            {"name": "internal", "match": {"host": "internal.test"}, "split": {"internal": 100}},
            {"name": "main", "split": {"main": 100}},
        ],
    }
    with start_inprocess(config) as process:
        yield process


def described(response: RawResponse) -> dict[str, Any]:
    assert response.status == 200, response
    value = response.json()
    assert isinstance(value, dict)
    return value


# -- pipelining -------------------------------------------------------------------------------


def test_pipelined_request_whose_body_follows_later_is_served(turnout: InProcessTurnout) -> None:
    # RFC 9112 9.3.2: a client may pipeline. The second request's head arrives with the first
    # request; its body only later (e.g. a client that streams an upload). The proxy must read
    # that body once the second request becomes current.
    first = build_request("GET", "/pipe-late/1/slow?ms=200")
    second_head = build_request("POST", "/pipe-late/2", [("Content-Length", "5")])
    with RawConnection(turnout.port, deadline=8.0) as conn:
        conn.send(first + second_head)
        assert described(conn.read_final_response()[1])["target"] == "/pipe-late/1/slow?ms=200"
        conn.send(b"hello")
        _, response = conn.read_final_response()
    seen = described(response)
    assert seen["target"] == "/pipe-late/2"
    assert seen["body"] == "hello"


def test_pipelined_expect_continue_request_gets_its_100(turnout: InProcessTurnout) -> None:
    # Same state, with the client waiting for 100 Continue before sending the body (RFC 9110
    # 10.1.1): it gets the 100 only if the proxy reads on after the first response.
    first = build_request("GET", "/pipe-expect/1")
    second_head = build_request(
        "PUT", "/pipe-expect/2", [("Expect", "100-continue"), ("Content-Length", "5")]
    )
    with RawConnection(turnout.port, deadline=8.0) as conn:
        conn.send(first + second_head)
        assert described(conn.read_final_response()[1])["target"] == "/pipe-expect/1"
        interim = conn.read_response()
        assert interim.status == 100, interim
        conn.send(b"hello")
        _, response = conn.read_final_response()
    seen = described(response)
    assert seen["target"] == "/pipe-expect/2"
    assert seen["body"] == "hello"


def test_pipelined_put_retried_after_a_reset_resends_its_body(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    # Contract 3: a PUT whose connection breaks before any response byte is retried when its
    # body (here 5 bytes) was kept. The retry must carry the same body. Pipelined behind a GET,
    # the PUT's body is read before the exchange begins.
    key = uuid.uuid4().hex
    target = f"/pipe-retry/reset-once/{key}"
    batch = build_request("GET", "/pipe-retry/first") + build_request("PUT", target, body=b"hello")
    with RawConnection(turnout.port, deadline=8.0) as conn:
        conn.send(batch)
        assert described(conn.read_final_response()[1])["target"] == "/pipe-retry/first"
        _, response = conn.read_final_response()
    assert response.status == 200, (response, [s for s in ups.main.requests if s.target == target])
    seen = described(response)
    assert seen["target"] == target
    assert seen["body"] == "hello"


def test_first_put_retried_after_a_reset_resends_its_body(turnout: InProcessTurnout) -> None:
    # The non-pipelined case of the test above (covered for contrast: this one passes).
    key = uuid.uuid4().hex
    target = f"/retry/reset-once/{key}"
    with RawConnection(turnout.port) as conn:
        response = conn.request("PUT", target, body=b"hello")
    seen = described(response)
    assert seen["target"] == target
    assert seen["body"] == "hello"


def test_half_closed_client_gets_every_pipelined_response(turnout: InProcessTurnout) -> None:
    # A client may send its requests and shut down its sending side (RFC 9112 9.6): every
    # complete request received before the FIN is still answered, in order.
    batch = build_request("GET", "/half/1/slow?ms=200") + build_request("GET", "/half/2")
    with RawConnection(turnout.port, deadline=8.0) as conn:
        conn.send(batch)
        conn.sock.shutdown(socket.SHUT_WR)
        first = conn.read_final_response()[1]
        assert described(first)["target"] == "/half/1/slow?ms=200"
        try:
            second = conn.read_final_response()[1]
        except AssertionError as exc:
            raise AssertionError(
                "the second pipelined request, sent before the client's FIN, was never answered"
            ) from exc
    assert described(second)["target"] == "/half/2"


# -- hop-by-hop rules must not break framing --------------------------------------------------


def test_connection_naming_content_length_does_not_smuggle_a_request(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    # RFC 9110 7.6.1 makes a header named by Connection hop-by-hop; RFC 9112 6.3 needs the
    # forwarded request framed. If the proxy drops Content-Length but still sends the body, the
    # upstream reads the body as a second request: request smuggling past the routing table.
    tag = uuid.uuid4().hex
    smuggled = f"GET /smuggled-{tag} HTTP/1.1\r\nHost: internal.test\r\n\r\n".encode()
    raw = build_request(
        "POST",
        f"/carrier-{tag}",
        [("Connection", "content-length"), ("Content-Length", str(len(smuggled)))],
    )
    with RawConnection(turnout.port) as conn:
        conn.send(raw + smuggled)
        _, response = conn.read_final_response()
    seen = described(response)
    # Whatever reached the upstream next on that connection was parsed by now or never will be;
    # a marker on a new connection gives it time without a bare sleep.
    with RawConnection(turnout.port) as conn:
        described(conn.request("GET", f"/marker-{tag}"))
    wait_until(lambda: f"/marker-{tag}" in ups.main.targets(), what="the marker request")
    assert f"/smuggled-{tag}" not in ups.main.targets(), "a request was smuggled in a body"
    assert seen["body"] == smuggled.decode("latin-1")


def test_connection_naming_content_length_in_a_response_keeps_the_framing(
    turnout: InProcessTurnout,
) -> None:
    # The same rule on the way back: the client must still be able to find the end of the body
    # on a keep-alive connection (RFC 9112 6.3; a body without length must end with a close).
    with RawConnection(turnout.port, deadline=5.0) as conn:
        response = conn.request("GET", "/resp/cl-hop")
        assert response.status == 200, response
        assert response.body == b"hello", response
        assert described(conn.request("GET", "/resp/after"))["target"] == "/resp/after"


def test_connection_naming_host_keeps_the_host(turnout: InProcessTurnout, ups: Upstreams) -> None:
    # Host is required in every HTTP/1.1 request (RFC 9112 3.2) and the contract passes it
    # unchanged; a Connection token cannot make it disappear from the forwarded request.
    with RawConnection(turnout.port) as conn:
        seen = described(conn.request("GET", "/conn-host", [("Connection", "host")]))
    hosts = [value for name, value in seen["headers"] if name.lower() == "host"]
    assert hosts == ["turnout.test"]


# -- request targets, Host and HTTP/1.0 ---------------------------------------------------------


def test_absolute_form_target_routes_by_its_authority(turnout: InProcessTurnout) -> None:
    # RFC 9112 3.2.2: with an absolute-form target the Host header is ignored and the target's
    # authority identifies the origin; a proxy forwarding it must send a Host matching it.
    # Routing by the Host header instead lets a client reach `internal` while the routing table
    # thinks it asked for something else (and vice versa).
    raw = b"GET http://internal.test/abs HTTP/1.1\r\nHost: public.test\r\n\r\n"
    with RawConnection(turnout.port) as conn:
        conn.send(raw)
        seen = described(conn.read_final_response()[1])
    hosts = [value for name, value in seen["headers"] if name.lower() == "host"]
    assert seen["upstream"] == "internal", f"routed by the Host header: {seen}"
    assert hosts == ["internal.test"]


def test_http10_request_without_host_is_forwarded_with_one(turnout: InProcessTurnout) -> None:
    # HTTP/1.0 requests need no Host, but the proxy forwards them as HTTP/1.1, and an HTTP/1.1
    # request without Host is invalid (RFC 9112 3.2: a client MUST send Host; a server MUST
    # answer 400 without it).
    with RawConnection(turnout.port) as conn:
        conn.send(b"GET /old-no-host HTTP/1.0\r\n\r\n")
        seen = described(conn.read_final_response()[1])
    assert seen["version"] == "HTTP/1.1"
    hosts = [value for name, value in seen["headers"] if name.lower() == "host"]
    assert len(hosts) == 1, f"forwarded as HTTP/1.1 with Host headers {hosts}"


def test_http10_client_gets_no_interim_response(turnout: InProcessTurnout) -> None:
    # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored, and
    # RFC 9110 15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client.
    raw = build_request(
        "POST",
        "/old-expect",
        [("Expect", "100-continue"), ("Content-Length", "5")],
        b"hello",
        version="HTTP/1.0",
    )
    with RawConnection(turnout.port) as conn:
        conn.send(raw)
        first = conn.read_response()
    assert first.status == 200, f"an HTTP/1.0 client got {first.status} first"
    assert described(first)["body"] == "hello"


# -- upgrades ---------------------------------------------------------------------------------


def test_refused_websocket_upgrade_leaves_the_connection_usable(turnout: InProcessTurnout) -> None:
    # The upstream answers the upgrade request with a plain 200 (no 101): the connection is still
    # HTTP/1.1 (RFC 9110 7.8). Either the proxy says `Connection: close` and closes, or the next
    # request on it is answered; a silently dead connection is neither.
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    with RawConnection(turnout.port, deadline=5.0) as conn:
        first = conn.request("GET", "/ws-refused", upgrade)
        assert first.status == 200, first
        if "close" in (first.header("connection") or "").lower():
            assert conn.wait_closed(), "said Connection: close but stayed open"
            return
        conn.send(build_request("GET", "/after-refused-upgrade"))
        try:
            _, second = conn.read_final_response()
        except AssertionError as exc:
            raise AssertionError(
                "the connection stayed open after a refused upgrade but never answered again"
            ) from exc
    assert described(second)["target"] == "/after-refused-upgrade"


# -- passing tests for edges not covered elsewhere ---------------------------------------------


def test_client_closing_mid_body_frees_the_upstream(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    # The client sends half a body and leaves; the next client is served at once.
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("POST", "/gone-mid-body", [("Content-Length", "100")]) + b"x" * 10)
    with RawConnection(turnout.port) as conn:
        assert described(conn.request("GET", "/after-gone"))["target"] == "/after-gone"


def test_head_then_get_on_a_pooled_upstream_connection(turnout: InProcessTurnout) -> None:
    # HEAD answered with a Content-Length: the pooled upstream connection must not wait for a
    # body and must carry the next request cleanly.
    with RawConnection(turnout.port) as conn:
        for index in range(3):
            head = conn.request("HEAD", f"/head/{index}")
            assert head.status == 200
            assert head.body == b""
            assert described(conn.request("GET", f"/head-after/{index}"))["target"] == (
                f"/head-after/{index}"
            )


def test_chunked_request_trailers_stay_out_of_the_head_and_body_is_intact(
    turnout: InProcessTurnout,
) -> None:
    raw = build_request("POST", "/trailers", [("Transfer-Encoding", "chunked")]) + (
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n"
    )
    with RawConnection(turnout.port) as conn:
        conn.send(raw)
        seen = described(conn.read_final_response()[1])
        again = described(conn.request("GET", "/after-trailers"))
    assert seen["body"] == "abcde"
    names = {name.lower() for name, _ in seen["headers"]}
    assert "x-trailer" not in names
    assert again["target"] == "/after-trailers"


def test_many_pipelined_requests_in_one_packet_keep_order(turnout: InProcessTurnout) -> None:
    batch = b"".join(
        build_request("POST" if index % 3 == 0 else "GET", f"/burst/{index}", body=None)
        if index % 3
        else build_request("POST", f"/burst/{index}", body=str(index).encode())
        for index in range(30)
    )
    with RawConnection(turnout.port) as conn:
        conn.send(batch)
        targets = [described(conn.read_final_response()[1])["target"] for _ in range(30)]
    assert targets == [f"/burst/{index}" for index in range(30)]


# -- flow control left over from the previous exchange -----------------------------------------

MIB = 1024 * 1024


def eventually(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` holds at some point within `seconds` (polled)."""
    try:
        wait_until(condition, timeout=seconds)
    except AssertionError:
        return False
    return True


def test_backpressure_holds_for_the_next_request_of_a_slow_client(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    # A slow client (small receive window, reads only a little) pipelines a 2 MiB download and a
    # 48 MiB one served by another upstream. The first response ends inside the proxy while the
    # client's buffer is over its high-water mark; the second must still be paused by it, so the
    # upstream cannot push all 48 MiB into the proxy's memory (contract 3: nothing is buffered
    # whole; bodies stream with backpressure).
    tag = uuid.uuid4().hex
    first = build_request("GET", f"/bp/{tag}/big?n={2 * MIB}")
    second_target = f"/bp/{tag}/stream?n={48 * MIB}"
    second = build_request("GET", second_target, host="internal.test")
    before = ups.internal.streamed
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(10.0)
    try:
        sock.connect(("127.0.0.1", turnout.port))
        sock.sendall(first + second)
        received = 0
        while received < 256 * 1024:
            data = sock.recv(65536)
            assert data, "proxy closed the connection"
            received += len(data)
        # The first response ended inside the proxy when the second request reached its upstream.
        wait_until(lambda: second_target in ups.internal.targets(), what="the second request")
        flooded = eventually(lambda: ups.internal.streamed - before >= 40 * MIB, 4.0)
        rss = turnout.rss_kib()
        assert not flooded, (
            f"the upstream pushed {(ups.internal.streamed - before) // MIB} MiB into the proxy "
            f"while the client read {received // 1024} KiB (proxy RSS now {rss // 1024} MiB)"
        )
    finally:
        sock.close()


def test_keep_alive_connection_reads_again_after_an_early_answer(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    # The upstream reads a 10 MiB body slowly, answers with 1 MiB still unread, then reads the
    # rest (allowed, RFC 9112 9.3). By then the proxy has the whole body (so the connection stays
    # open) and had stopped reading the client because the upstream was slow to take the body.
    # That exchange is over: the next request on the keep-alive connection must be read.
    body = b"x" * (10 * MIB)
    errors: list[BaseException] = []
    target = f"/bp/{uuid.uuid4().hex}/early?keep={MIB}"
    with RawConnection(turnout.port, deadline=10.0) as conn:

        def send_all() -> None:
            try:
                conn.send(build_request("POST", target, body=body, host="slow-reader.test"))
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        _, first = conn.read_final_response()
        assert first.status == 200, first
        sender.join(10.0)
        assert not sender.is_alive()
        assert not errors, errors
        assert "close" not in (first.header("connection") or "").lower(), (
            "precondition: the proxy had the whole body when the answer came"
        )
        after = f"/bp/{uuid.uuid4().hex}/after-early"
        conn.send(build_request("GET", after, host="slow-reader.test"))
        try:
            _, second = conn.read_final_response(deadline=5.0)
        except AssertionError as exc:
            reached = after in ups.slow_reader.targets()
            raise AssertionError(
                "keep-alive connection never answered the next request after an early answer "
                f"(request reached the upstream: {reached})"
            ) from exc
    assert described(second)["target"] == after
