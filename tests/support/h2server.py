"""A small HTTP/2 upstream for the integration tests, built on h2 over asyncio.

`H2Upstream(name, tls=None, max_streams=None, alpn=("h2",))` serves h2c (prior knowledge) on
127.0.0.1, or HTTP/2 over TLS when given a `trustme` PEM pair (`tls`), selecting by ALPN from
`alpn` (give `("http/1.1",)` to play a server that refuses h2). It runs on the loop of
`tests.support.upstreams.UpstreamHost` (`host.call(upstream.start())`).

Answers are chosen by the last path segment, so they work behind any route prefix:

- anything else: JSON describing the request (method, path, authority, scheme, headers as
  received, body length and sha256, the connection's index and the stream id), with a
  content-length;
- `stream?n=&chunk=`: `n` pattern bytes (`tests.support.upstreams.pattern_chunks`) in DATA
  frames of `chunk` bytes, no content-length, sent as the client's windows allow;
- `status/NNN`: an empty answer with that status;
- `trailers`: a short body, then trailers `grpc-status: 0` and `x-checksum`;
- `many-headers?n=`: an answer with `n` header fields (default 200);
- `early-hints`: a 103 interim response, then the JSON answer;
- `trailers-only`: one HEADERS frame with END_STREAM (a gRPC error: grpc-status 5);
- `reset?code=`: RST_STREAM before any response (code as a number, default 2, INTERNAL_ERROR);
- `reset-after-head`: a head and some data, then RST_STREAM;
- `goaway`: answers, then GOAWAY naming this stream as the last one;
- `goaway-first`: GOAWAY naming this stream as the last one, then the answer;
- `goaway-unprocessed`: the first time, GOAWAY naming the stream before this one as the last
  (this one is left unprocessed) and no answer; after that, as any other path;
- `stall`: reads no request body (so grants no window) until `release_held()` (or 10 s),
  then resets the stream;
- `hold`: answers only once the test calls `release_held()` (or after 10 s);
- `slowupload?pause_ms=`: reads the body acknowledging one 16 KiB piece at a time with a
  pause between, then answers its length and sha256.

It records connections made (`connections`), streams seen (`streams`), the most streams open
at once on one connection (`max_open`), and the paths and header fields of requests (`paths`,
`heads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import orjson

from tests.support.certs import PemPair
from tests.support.upstreams import pattern_chunks

HOLD_LIMIT = 10.0


@dataclass
class _Stream:
    """One request as the server sees it."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: asyncio.Queue[tuple[bytes, int] | None] = field(default_factory=asyncio.Queue)
    window: asyncio.Event = field(default_factory=asyncio.Event)
    reset: bool = False
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


class _ServerConnection(asyncio.Protocol):
    """One client connection: h2's server state machine and a task per stream."""

    def __init__(self, server: H2Upstream, index: int) -> None:
        self.server = server
        self.index = index
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.conn_window = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings: dict[h2.settings.SettingCodes, int] = {}
        if self.server.max_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = self.server.max_streams
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            stream: _Stream | None
            if isinstance(event, h2.events.RequestReceived):
                stream = _Stream(event.stream_id or 0, list(event.headers or []))
                self.streams[stream.stream_id] = stream
                self.server.streams += 1
                open_now = sum(1 for s in self.streams.values() if not s.reset)
                self.server.max_open = max(self.server.max_open, open_now)
                task = asyncio.get_running_loop().create_task(self._run(stream))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                if event.stream_ended is not None:
                    stream.body.put_nowait(None)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id or 0)
                if stream is not None:
                    stream.body.put_nowait((event.data or b"", event.flow_controlled_length or 0))
            elif isinstance(event, h2.events.TrailersReceived):
                stream = self.streams.get(event.stream_id or 0)
                if stream is not None:
                    stream.trailers = list(event.headers or [])
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id or 0)
                if stream is not None:
                    stream.body.put_nowait(None)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id or 0, None)
                if stream is not None:
                    stream.reset = True
                    stream.window.set()
                    self.server.resets_received += 1
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        stream.window.set()
                else:
                    for stream in self.streams.values():
                        stream.window.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.server.goaways_received += 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()
        for stream in self.streams.values():
            stream.reset = True
            stream.window.set()

    # -- what handlers use ---------------------------------------------------------------------

    async def read_body(self, stream: _Stream, pause: float = 0.0) -> bytes:
        """The whole request body; acknowledged at once, or piece by piece with `pause`."""
        parts: list[bytes] = []
        while True:
            item = await stream.body.get()
            if item is None:
                return b"".join(parts)
            data, size = item
            parts.append(data)
            if pause:
                await asyncio.sleep(pause)
            if size and not stream.reset:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(size, stream.stream_id)
                self.flush()

    def send_headers(
        self, stream: _Stream, headers: list[tuple[bytes, bytes]], end: bool = False
    ) -> None:
        if not stream.reset:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
            self.flush()

    async def send_data(self, stream: _Stream, data: bytes, end: bool = False) -> None:
        """Send `data` within the client's windows (waiting for WINDOW_UPDATE as needed)."""
        view = memoryview(data)
        while view and not stream.reset:
            window = min(
                self.h2.local_flow_control_window(stream.stream_id),
                self.h2.max_outbound_frame_size,
            )
            if window <= 0:
                stream.window.clear()
                await stream.window.wait()
                continue
            piece = bytes(view[:window])
            view = view[window:]
            self.h2.send_data(stream.stream_id, piece)
            self.server.sent_bytes += len(piece)
            self.flush()
        if end and not stream.reset:
            self.h2.end_stream(stream.stream_id)
            self.flush()

    def reset(self, stream: _Stream, code: int) -> None:
        if not stream.reset:
            self.h2.reset_stream(stream.stream_id, code)
            stream.reset = True
            self.flush()

    # -- the answers ---------------------------------------------------------------------------

    async def _run(self, stream: _Stream) -> None:
        try:
            await self._answer(stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass
        finally:
            if self.streams.get(stream.stream_id) is stream:
                del self.streams[stream.stream_id]

    async def _answer(self, stream: _Stream) -> None:
        pseudo = {name: value for name, value in stream.headers if name.startswith(b":")}
        path = pseudo.get(b":path", b"/").decode("latin-1")
        target, _, query_text = path.partition("?")
        query = {key: values[0] for key, values in parse_qs(query_text).items()}
        last = target.rsplit("/", 1)[-1]
        self.server.paths.append(path)
        self.server.heads.append(list(stream.headers))
        if last == "reset":
            self.reset(stream, int(query.get("code", "2")))
            return
        if last == "goaway-unprocessed" and not self.server.refused_by_goaway:
            # As a server closing under load does: this stream is left out of the GOAWAY.
            self.server.refused_by_goaway += 1
            self.h2.close_connection(last_stream_id=max(0, stream.stream_id - 2))
            self.flush()
            return
        parent = target.rsplit("/", 2)[-2] if target.count("/") >= 2 else ""
        if parent == "status" and last.isdigit():
            self.send_headers(stream, [(b":status", last.encode())], end=True)
            return
        if last == "many-headers":
            fields = [(b":status", b"200")]
            fields += [(b"x-h%d" % index, b"v") for index in range(int(query.get("n", "200")))]
            self.send_headers(stream, fields, end=True)
            return
        if last == "early-hints":
            self.send_headers(stream, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
        if last == "trailers-only":
            self.send_headers(
                stream,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"5"),
                    (b"grpc-message", b"not found"),
                ],
                end=True,
            )
            return
        if last == "stall":
            # Reads (and acknowledges) nothing: the client's windows run out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_LIMIT):
                    await self.server.released.wait()
            self.reset(stream, 0)
            return
        if last == "goaway-first":
            # A graceful close: GOAWAY naming this stream as the last, then its answer.
            self.h2.close_connection(last_stream_id=stream.stream_id)
            self.flush()
            # h2 refuses every frame after its own GOAWAY (python-hyper/h2 issue 1181); the
            # stream it covers must still finish.
            self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        pause = int(query.get("pause_ms", "0")) / 1000 if last == "slowupload" else 0.0
        body = await self.read_body(stream, pause)
        if last == "hold":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_LIMIT):
                    await self.server.released.wait()
        if last == "stream":
            total, chunk = int(query.get("n", "0")), int(query.get("chunk", "16384"))
            self.send_headers(stream, [(b":status", b"200"), (b"x-upstream", self.server.name_b)])
            for block in pattern_chunks(total):
                for offset in range(0, len(block), chunk):
                    await self.send_data(stream, block[offset : offset + chunk])
            await self.send_data(stream, b"", end=True)
            return
        if last == "reset-after-head":
            self.send_headers(stream, [(b":status", b"200")])
            await self.send_data(stream, b"partial")
            self.reset(stream, 2)
            return
        if last == "trailers":
            self.send_headers(
                stream, [(b":status", b"200"), (b"content-type", b"application/octet-stream")]
            )
            await self.send_data(stream, b"payload")
            self.h2.send_headers(
                stream.stream_id,
                [(b"grpc-status", b"0"), (b"x-checksum", b"abc123")],
                end_stream=True,
            )
            self.flush()
            return
        authority = pseudo.get(b":authority")
        describe: dict[str, Any] = {
            "upstream": self.server.name,
            "method": pseudo.get(b":method", b"").decode("latin-1"),
            "path": path,
            "authority": authority.decode("latin-1") if authority is not None else None,
            "scheme": pseudo.get(b":scheme", b"").decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in stream.headers
                if not name.startswith(b":")
            ],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "trailers": [
                [name.decode("latin-1"), value.decode("latin-1")] for name, value in stream.trailers
            ],
            "connection": self.index,
            "stream_id": stream.stream_id,
        }
        payload = orjson.dumps(describe)
        head_only = pseudo.get(b":method") == b"HEAD"
        self.send_headers(
            stream,
            [
                (b":status", b"200"),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(payload)),
                (b"x-upstream", self.server.name_b),
            ],
            end=head_only,
        )
        if not head_only:
            await self.send_data(stream, payload, end=True)
        if last == "goaway":
            self.h2.close_connection(last_stream_id=stream.stream_id)
            self.flush()


class H2Upstream:
    """An HTTP/2 server on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        tls: PemPair | None = None,
        max_streams: int | None = None,
        alpn: tuple[str, ...] = ("h2",),
    ) -> None:
        self.name = name
        self.name_b = name.encode()
        self.tls = tls
        self.alpn = alpn
        self.max_streams = max_streams
        self.port = 0
        self.connections = 0
        self.streams = 0
        self.max_open = 0
        self.resets_received = 0
        self.goaways_received = 0
        self.refused_by_goaway = 0
        self.paths: list[str] = []
        self.heads: list[list[tuple[bytes, bytes]]] = []
        self._server: asyncio.Server | None = None
        self._conns: list[_ServerConnection] = []
        self.released = asyncio.Event()
        self.sent_bytes = 0

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, as written in a Turnout config."""
        return f"127.0.0.1:{self.port}"

    def release_held(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let every `hold` request answer (call from any thread; they hold again after)."""
        loop.call_soon_threadsafe(self.released.set)

    def hold_again(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make later `hold` requests wait again."""
        loop.call_soon_threadsafe(self.released.clear)

    def _connection(self) -> _ServerConnection:
        self.connections += 1
        conn = _ServerConnection(self, self.connections)
        self._conns.append(conn)
        return conn

    async def start(self) -> None:
        """Bind 127.0.0.1:0 and serve."""
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            context.set_alpn_protocols(list(self.alpn))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, "127.0.0.1", 0, ssl=context)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop serving and close open connections."""
        if self._server is not None:
            self._server.close()
            for conn in self._conns:
                if conn.transport is not None:
                    conn.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
