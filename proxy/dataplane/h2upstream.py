"""Upstreams reached over HTTP/2: pooled connections, one carrier per request stream.

An `H2EndpointPool` (an upstream with `protocol: h2c` or `h2`) keeps a few HTTP/2 connections
to its endpoint and hands out `H2Stream`s, each carrying one request for an exchange, much as
an HTTP/1.1 pool hands out connections: a stream on a connection with room (fewer live streams
than the server's MAX_CONCURRENT_STREAMS, no GOAWAY received), else a new connection. Framing
is h2's (python-hyper's sans-IO state machine); this module moves its bytes and events.

A stream the server refuses unprocessed (beyond a GOAWAY's last stream id, or REFUSED_STREAM)
is sent again once on another connection by the stream itself, with the request body it kept
(up to REPLAY_LIMIT): servers that rotate connections (NGINX after `http2_max_requests`, gRPC
servers with a maximum connection age) would otherwise fail requests in flight at each turn.

What it must never do: open a stream on a connection that received GOAWAY, reset a whole
connection for one stream's trouble, acknowledge response data the client has not taken (that
acknowledgement is the server's permission to send more, so a slow client holds at most one
stream window), or send request data beyond the windows the server granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from proxy.core.headers import HOP_BY_HOP
from proxy.dataplane.upstream import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    POOL_IDLE_TIMEOUT,
    EndpointPool,
    OutgoingRequest,
    ResponseSink,
)
from proxy.dataplane.writes import CoalescingProtocol

if TYPE_CHECKING:
    from proxy.core.spec import Endpoint, UpstreamTls
    from proxy.dataplane.writes import WriteBatcher
    from proxy.runtime.tasks import TaskSet

log: Final = logging.getLogger("turnout.upstream")

# Receive windows: a stream may hold this much unacknowledged response data, which bounds
# what one slow client costs; the connection's window covers many streams at once.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
# An HTTP/2 connection with no stream is closed after this long. Servers announce their own
# idle close with GOAWAY, so a stale connection is rarely picked; it still stays below common
# server idle timeouts (NGINX's http2 keep-alive is 75 s).
H2_IDLE_TIMEOUT: Final = 30.0

# Request fields that belong to one HTTP/1.1 connection (RFC 9113 section 8.2.2) or that
# HTTP/2 carries as pseudo-header fields.
_CONNECTION_SPECIFIC: Final = HOP_BY_HOP | {b"host"}
_TE_TRAILERS: Final = (b"te", b"trailers")

# Stream error codes (RFC 9113 section 7).
_CANCEL: Final = h2.errors.ErrorCodes.CANCEL
_REFUSED: Final = h2.errors.ErrorCodes.REFUSED_STREAM
# Request body kept to send again when a stream is refused unprocessed (as much as the
# exchange keeps for its own retries, headers.RETRY_BODY_LIMIT).
REPLAY_LIMIT: Final = 64 * 1024
_NO_ERROR: Final = h2.errors.ErrorCodes.NO_ERROR


class _Connection(h2.connection.H2Connection):
    """h2's client connection, kept open for the streams a GOAWAY still covers.

    h2 (4.x, python-hyper/h2 issue 1181) moves to CLOSED on receiving GOAWAY and then refuses
    every later frame, while RFC 9113 section 6.8 lets streams up to the GOAWAY's last stream
    id finish. New streams are never opened after GOAWAY (H2ClientConnection.going_away), so
    putting the state back to open only lets those streams complete.
    """

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return result


def _config() -> h2.config.H2Configuration:
    # header_encoding None: names and values stay bytes, as the rest of the data plane has them.
    return h2.config.H2Configuration(client_side=True, header_encoding=None)


class H2ClientConnection(CoalescingProtocol):
    """One HTTP/2 connection to an endpoint, carrying many streams."""

    __slots__ = (
        "going_away",
        "h2",
        "idle_since",
        "live",
        "lost",
        "pool",
        "ready",
        "streams",
        "write_paused",
    )

    def __init__(self, pool: H2EndpointPool, ready: asyncio.Future[None]) -> None:
        super().__init__(pool.batcher)
        self.pool = pool
        self.h2 = _Connection(config=_config())
        # Streams that have sent their HEADERS, by id; `live` also holds those handed out and
        # not opened yet: its size is what counts against MAX_CONCURRENT_STREAMS.
        self.streams: dict[int, H2Stream] = {}
        self.live: set[H2Stream] = set()
        self.going_away = False
        self.lost = False
        self.write_paused = False
        self.idle_since = 0.0
        # Settled when the server's first SETTINGS arrive (its stream limit is known then).
        self.ready = ready

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.header_limit,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush_h2()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY naming the error: send it, then drop the connection.
            self.flush_h2()
            self.broken(f"HTTP/2 protocol error: {exc}")
            return
        for event in events:
            if self.lost:
                return
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        self.flush_h2()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget_h2(self)
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionResetError("the endpoint closed the connection before its SETTINGS")
            )
        for stream in list(self.live):
            stream.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.live):
            stream.sync_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.live):
            stream.sync_pause()

    # h2 events

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is not None:
            stream.on_head(event.headers or [], event.stream_ended is not None)

    def _on_interim(self, event: h2.events.InformationalResponseReceived) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is not None:
            stream.on_interim(event.headers or [])

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id or 0)
        size = event.flow_controlled_length or 0
        if stream is None:
            # A stream already given up: its data still counts against the connection window.
            if size and event.stream_id:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(size, event.stream_id)
            return
        stream.on_data(event.data or b"", size)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is not None:
            stream.on_trailers(event.headers or [])

    def _on_end(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is not None:
            stream.on_end()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is not None:
            stream.on_reset(int(event.error_code or 0))

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.push()
            return
        for stream in list(self.streams.values()):
            if stream.out:
                stream.push()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The server takes no new streams: those it will not process are retried elsewhere."""
        self.going_away = True
        last = event.last_stream_id or 0
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                stream.refused()
        if not self.live:
            self.close()

    # the pool's side

    def has_room(self) -> bool:
        """Whether a new stream may start here now."""
        transport = self.transport
        return (
            not self.going_away
            and not self.lost
            and transport is not None
            and not transport.is_closing()
            and len(self.live) < self.h2.remote_settings.max_concurrent_streams
        )

    def new_stream(self) -> H2Stream:
        """A carrier for one request on this connection."""
        stream = H2Stream(self)
        self.live.add(stream)
        return stream

    def retired(self, stream: H2Stream, now: float) -> None:
        """`stream` no longer counts: free its slot; a connection going away closes when empty."""
        self.live.discard(stream)
        if stream.stream_id:
            self.streams.pop(stream.stream_id, None)
        if not self.live:
            self.idle_since = now
            if self.going_away or self.pool.draining:
                self.close()

    def flush_h2(self) -> None:
        """Queue what h2 has to send (it leaves at the end of the loop pass)."""
        data = self.h2.data_to_send()
        if data:
            self.write(data)

    def broken(self, reason: str) -> None:
        """The endpoint broke HTTP/2: every stream on this connection is told, then it closes."""
        self.going_away = True
        for stream in list(self.live):
            stream.invalid(reason)
        self.abort()

    def close(self) -> None:
        """Say goodbye (GOAWAY) and close once what is buffered is written."""
        self.going_away = True
        if not self.lost and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush_h2()
        self.flush()
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.going_away = True
        self.flush()
        transport = self.transport
        if transport is not None:
            transport.abort()


_HANDLERS: Final[dict[type[h2.events.Event], Callable[[H2ClientConnection, Any], None]]] = {
    h2.events.RemoteSettingsChanged: H2ClientConnection._on_settings,
    h2.events.ResponseReceived: H2ClientConnection._on_response,
    h2.events.InformationalResponseReceived: H2ClientConnection._on_interim,
    h2.events.DataReceived: H2ClientConnection._on_data,
    h2.events.TrailersReceived: H2ClientConnection._on_trailers,
    h2.events.StreamEnded: H2ClientConnection._on_end,
    h2.events.StreamReset: H2ClientConnection._on_reset,
    h2.events.WindowUpdated: H2ClientConnection._on_window,
    h2.events.ConnectionTerminated: H2ClientConnection._on_goaway,
}


class H2Stream:
    """One request and its response on an HTTP/2 connection: an exchange's upstream carrier."""

    __slots__ = (
        "body_ended",
        "conn",
        "end_pending",
        "endpoint",
        "framed_end",
        "framing",
        "got_head",
        "head_copy",
        "head_fields",
        "head_request",
        "held",
        "max_head",
        "max_headers",
        "moved",
        "out",
        "read_paused",
        "replay",
        "replay_size",
        "request_done",
        "retired",
        "reusable",
        "sink",
        "sink_paused",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: H2ClientConnection) -> None:
        self.conn = conn
        self.endpoint: EndpointPool = conn.pool
        self.sink: ResponseSink | None = None
        self.stream_id = 0
        self.reusable = True
        # END_STREAM ends every request, whatever its framing: end_body is always wanted.
        self.framed_end = True
        self.head_request = False
        self.max_head = 0
        self.max_headers = 0
        # Request data waiting for flow-control window, and END_STREAM waiting behind it.
        self.out: list[bytes] = []
        self.end_pending = False
        self.request_done = False
        self.sink_paused = False
        self.got_head = False
        self.framing = FRAMING_CHUNKED
        # Response bytes passed on but not acknowledged while the client is slow.
        self.read_paused = False
        self.held = 0
        self.retired = False
        # A complete request's HEADERS, held until its body or END_STREAM is known.
        self.head_fields: list[tuple[bytes, bytes]] | None = None
        # What it takes to send the request again on another connection when the server
        # refuses the stream unprocessed (GOAWAY, REFUSED_STREAM): its HEADERS and its body up
        # to REPLAY_LIMIT (None past it), once.
        self.head_copy: list[tuple[bytes, bytes]] | None = None
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.body_ended = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.moved = False

    # the exchange's side (UpstreamCarrier)

    def start(
        self,
        sink: ResponseSink,
        head_request: bool,
        upgrade: bool,
        max_head: int,
        max_headers: int,
    ) -> None:
        """Carry one request for `sink`; `send_head` follows."""
        self.sink = sink
        self.head_request = head_request
        self.max_head = max_head
        self.max_headers = max_headers
        if upgrade:
            # RFC 8441 (WebSocket over HTTP/2) is not supported: refused before a byte is sent.
            self._fail_soon("a WebSocket upgrade cannot be carried to an HTTP/2 upstream")

    def send_head(self, ex: OutgoingRequest) -> None:
        """The request's HEADERS: sent with the body's first frame, or with END_STREAM when
        `end_body` comes first, or alone at the end of this loop pass (a body yet to come).

        The exchange sends what it holds of the request in the same pass, so a complete
        bodyless request leaves as one HEADERS frame with END_STREAM.
        """
        if self.sink is None or self.stream_id or self.request_done:
            return
        pool = self.conn.pool
        authority = ex.host
        if authority is None:
            # An HTTP/1.0 request without Host: http and https URIs need an authority (RFC 9113
            # section 8.3.1), so the endpoint's own stands in, as the target it was sent to.
            authority = pool.address.encode("latin-1")
        fields: list[tuple[bytes, bytes]] = [
            (b":method", ex.method.encode("latin-1")),
            (b":scheme", b"https" if pool.ssl is not None else b"http"),
            (b":authority", authority),
            (b":path", ex.url),
        ]
        for lname, _, value in ex.kept_headers:
            if lname not in _CONNECTION_SPECIFIC:
                fields.append((lname, value))
        for name, value in ex.added:
            fields.append((name.lower(), value))
        if ex.te_trailers or ex.grpc:
            fields.append(_TE_TRAILERS)
        self.head_fields = fields
        asyncio.get_running_loop().call_soon(self._head_alone)

    def _head_alone(self) -> None:
        fields = self.head_fields
        if fields is not None and not self.retired:
            self._open(fields, end_stream=False)

    def _open(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Send HEADERS on a new stream id (END_STREAM too for a bodyless request)."""
        self.head_fields = None
        self.head_copy = fields
        conn = self.conn
        if conn.going_away or conn.lost:
            # The connection went away between being chosen and this request's head: nothing
            # reached the server, so the exchange may retry.
            self._fail_soon("")
            return
        h2conn = conn.h2
        try:
            stream_id = h2conn.get_next_available_stream_id()
            h2conn.send_headers(stream_id, fields, end_stream=end_stream)
        except h2.exceptions.NoAvailableStreamIDError:
            # Every stream id of this connection is used: it takes no more.
            conn.going_away = True
            self._fail_soon("")
            return
        except h2.exceptions.TooManyStreamsError:
            # The server lowered its stream limit after this stream was handed out.
            self._fail_soon("")
            return
        except h2.exceptions.ProtocolError as exc:
            self._fail_soon(f"the request cannot be sent over HTTP/2: {exc}")
            return
        self.stream_id = stream_id
        conn.streams[stream_id] = self
        self.request_done = end_stream
        conn.flush_h2()

    def send_body(self, data: bytes, chunked: bool) -> None:
        """Request body bytes, sent as the windows allow (HTTP/2 frames them itself)."""
        replay = self.replay
        if replay is not None and data:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                replay.append(data)
        if self.head_fields is not None:
            self._open(self.head_fields, end_stream=False)
        if not data or self.request_done or not self.stream_id:
            return
        self.out.append(data)
        self.push()

    def end_body(self, chunked: bool, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """The request is complete: END_STREAM, after any data still waiting for window, on
        the request's trailers when it has some."""
        self.body_ended = True
        self.trailers = trailers or None
        if self.head_fields is not None:
            if self.trailers is None:
                self._open(self.head_fields, end_stream=True)
                return
            self._open(self.head_fields, end_stream=False)
        if self.request_done or not self.stream_id:
            return
        self.end_pending = True
        self.push()

    def write(self, data: bytes) -> None:
        """Raw tunnel bytes: never asked of a stream, as upgrades are refused in `start`."""

    def pause_reading(self) -> None:
        """The client is slow: stop acknowledging this stream's data."""
        self.read_paused = True

    def resume_reading(self) -> None:
        """The client drained: acknowledge what was held, so the server sends on."""
        self.read_paused = False
        held = self.held
        if held and self.stream_id:
            self.held = 0
            self._acknowledge(held)
            self.conn.flush_h2()

    def detach(self) -> None:
        """Forget the sink (the client went away); a stream still open is cancelled."""
        self.sink = None
        self._reset(_CANCEL)

    def close(self) -> None:
        """Done with this stream: cancel it if still open, and free its slot."""
        self._reset(_CANCEL)
        self.retire(self.conn.pool.now())

    def abort(self) -> None:
        """End this stream now (RST_STREAM), never the connection."""
        self.close()

    # the pool's side

    def retire(self, now: float) -> None:
        """Free this stream's slot on its connection, once; a stream still open is cancelled."""
        if self.retired:
            return
        self.retired = True
        self.sink = None
        if self.held:
            # Data held back from a slow client still counts against the connection's window:
            # give it back, or the connection would starve after enough abandoned streams.
            self._acknowledge(self.held)
            self.held = 0
        self._reset(_CANCEL)
        self.out = []
        self.conn.retired(self, now)

    # flow control, request side

    def push(self) -> None:
        """Send waiting request data within the stream's and the connection's windows."""
        if not self.stream_id or self.request_done:
            return
        conn = self.conn
        h2conn = conn.h2
        out = self.out
        try:
            while out:
                window = min(
                    h2conn.local_flow_control_window(self.stream_id),
                    h2conn.max_outbound_frame_size,
                )
                if window <= 0:
                    break
                chunk = out[0]
                if len(chunk) <= window:
                    out.pop(0)
                    h2conn.send_data(self.stream_id, chunk)
                else:
                    out[0] = chunk[window:]
                    h2conn.send_data(self.stream_id, chunk[:window])
            if not out and self.end_pending:
                self.end_pending = False
                self.request_done = True
                if self.trailers is not None:
                    h2conn.send_headers(self.stream_id, self.trailers, end_stream=True)
                else:
                    h2conn.end_stream(self.stream_id)
        except h2.exceptions.StreamClosedError:
            # The server reset or ended the stream meanwhile: the rest of the body is moot.
            out.clear()
            self.request_done = True
        conn.flush_h2()
        self.sync_pause()

    def sync_pause(self) -> None:
        """Pause the client while request data waits for window or the socket is full."""
        sink = self.sink
        if sink is None:
            return
        want = bool(self.out) or (self.conn.write_paused and not self.request_done)
        if want != self.sink_paused:
            self.sink_paused = want
            if want:
                sink.upstream_pause_writing()
            else:
                sink.upstream_resume_writing()

    # response events, from the connection

    def on_head(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        status, fields, problem = self._fields(headers)
        if problem:
            self.invalid(problem)
            return
        self.got_head = True
        if self.head_request or status in (204, 304):
            framing = FRAMING_NONE
        elif ended:
            # A HEADERS frame with END_STREAM (a gRPC "trailers-only" answer): nothing follows.
            # An HTTP/1.1 client learns that from a zero length, an HTTP/2 one from the frame.
            framing = FRAMING_NONE
            if not any(lname == b"content-length" for lname, _, _ in fields):
                fields.append((b"content-length", b"content-length", b"0"))
        elif any(lname == b"content-length" for lname, _, _ in fields):
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CHUNKED
        self.framing = framing
        sink.upstream_head(status, fields, framing, True, [])

    def on_interim(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is None:
            return
        status, fields, problem = self._fields(headers)
        if problem:
            self.invalid(problem)
        elif status != 100:
            sink.upstream_interim(status, fields)

    def on_data(self, data: bytes, size: int) -> None:
        sink = self.sink
        if sink is not None and data and self.framing != FRAMING_NONE:
            # A body after HEAD, 204 or 304 is dropped (the head said there is none).
            sink.upstream_body(data)
        if self.read_paused and self.sink is not None:
            self.held += size
        elif size:
            self._acknowledge(size)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is None:
            return
        fields: list[tuple[bytes, bytes, bytes]] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
            fields.append((name, name, value))
        if size > self.max_head or len(fields) > self.max_headers:
            self.invalid("response trailers larger than the head limits")
            return
        sink.upstream_trailers(fields)

    def on_end(self) -> None:
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if not self.request_done:
            # The server answered before the whole request was sent (RFC 9113 section 8.1):
            # the rest of the request is not wanted.
            self.out = []
            self.end_pending = False
        sink.upstream_complete()

    def on_reset(self, code: int) -> None:
        """The server reset the stream (REFUSED_STREAM: it did not process it)."""
        if code == _REFUSED and not self.got_head:
            self.refused()
            return
        self.request_done = True
        self.out = []
        sink = self.sink
        self.retire(self.conn.pool.now())
        if sink is not None:
            sink.upstream_lost(self.got_head)

    def refused(self, _reason: str = "") -> None:
        """Nothing of the request was processed (GOAWAY, REFUSED_STREAM, or no stream could
        open): sent again on another connection once when it can be, else the exchange is told
        (lost before any response byte: its retry rules apply)."""
        sink = self.sink
        if (
            sink is not None
            and not self.moved
            and not self.retired
            and self.replay is not None
            and (self.head_copy is not None or self.head_fields is not None)
        ):
            self._move()
            return
        self.request_done = True
        self.retire(self.conn.pool.now())
        if sink is not None:
            sink.upstream_lost(False)

    def connection_gone(self) -> None:
        """The connection closed under this stream."""
        sink = self.sink
        self.request_done = True
        self.retire(self.conn.pool.now())
        if sink is not None:
            sink.upstream_lost(self.got_head)

    def invalid(self, reason: str) -> None:
        """The response broke HTTP: this stream is reset and the exchange told, once."""
        sink = self.sink
        self.sink = None
        self.retire(self.conn.pool.now())
        if sink is not None:
            sink.upstream_invalid(reason)

    def go_away(self) -> None:
        """The endpoint is being closed under this request (end of a drain)."""
        sink = self.sink
        if sink is not None:
            sink.go_away()

    def _move(self) -> None:
        """Leave this connection, and carry the request on another one."""
        self.moved = True
        old = self.conn
        self._reset(_CANCEL)
        old.retired(self, old.pool.now())
        self.stream_id = 0
        self.out = []
        self.end_pending = False
        self.request_done = False
        pool = old.pool
        conn = pool.room()
        if conn is not None:
            self._rebind(conn)
        else:
            pool.tasks.spawn(self._rebind_later(pool), name="h2-resend")

    async def _rebind_later(self, pool: H2EndpointPool) -> None:
        conn: H2ClientConnection | None
        try:
            async with asyncio.timeout(pool.connect_timeout):
                conn = await pool.acquire(asyncio.get_running_loop())
        except (OSError, TimeoutError):
            conn = None
        if self.retired or self.sink is None:
            return  # the exchange gave up meanwhile
        if conn is None or not conn.has_room():
            self._lost_unmoved()
            return
        self._rebind(conn)

    def _lost_unmoved(self) -> None:
        """No connection took the request again: the exchange's retry rules decide."""
        sink = self.sink
        self.retired = True
        self.sink = None
        if sink is not None:
            sink.upstream_lost(False)

    def _rebind(self, conn: H2ClientConnection) -> None:
        fields = self.head_fields or self.head_copy
        replay = self.replay
        if fields is None or replay is None:
            # More body came while waiting for a connection than is kept to send again.
            self._lost_unmoved()
            return
        self.conn = conn
        conn.live.add(self)
        if not self.body_ended and self.head_fields is not None:
            # The exchange has not sent the body yet: HEADERS leave at the end of the pass.
            return
        ends_here = self.body_ended and not replay and self.trailers is None
        self._open(fields, end_stream=ends_here)
        if (replay or (self.body_ended and not ends_here)) and self.stream_id:
            self.out.extend(replay)
            self.end_pending = self.body_ended
            self.push()

    # helpers

    def _fields(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, list[tuple[bytes, bytes, bytes]], str]:
        """Status and regular fields of a response head, or a reason it is unacceptable."""
        status = 0
        fields: list[tuple[bytes, bytes, bytes]] = []
        size = 0
        for name, value in headers:
            # RFC 9113 section 4.3.1's accounting: name, value and 32 bytes of overhead.
            size += len(name) + len(value) + 32
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name[:1] != b":":
                fields.append((name, name, value))
        if size > self.max_head:
            return status, fields, "response head larger than limits.max_header_size"
        if len(fields) > self.max_headers:
            return status, fields, "too many response header fields"
        if not 100 <= status <= 599 or status == 101:
            return status, fields, f"invalid status code {status}"
        return status, fields, ""

    def _acknowledge(self, size: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.h2.acknowledge_received_data(size, self.stream_id)

    def _reset(self, code: h2.errors.ErrorCodes) -> None:
        stream_id = self.stream_id
        conn = self.conn
        if not stream_id or conn.lost:
            return
        stream = conn.h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.h2.reset_stream(stream_id, code)
        conn.flush_h2()

    def _fail_soon(self, reason: str) -> None:
        """Report a failure before anything was sent: invalid with `reason`, or (no reason)
        lost with nothing sent, so the exchange may retry elsewhere.

        Told on the next loop pass: the exchange is still inside the call that started this.
        """
        self.request_done = True
        asyncio.get_running_loop().call_soon(self.invalid if reason else self.refused, reason)


class H2EndpointPool(EndpointPool):
    """One endpoint of an `h2c` or `h2` upstream: streams on a few shared connections."""

    __slots__ = (
        "alpn_warned",
        "connect_timeout",
        "h2_connections",
        "header_limit",
        "loop",
        "opening",
        "tasks",
    )

    def __init__(
        self,
        upstream: str,
        endpoint: Endpoint,
        batcher: WriteBatcher,
        tls: UpstreamTls | None,
        ssl_context: ssl.SSLContext | None,
        header_limit: int,
        connect_timeout: float,
        tasks: TaskSet,
    ) -> None:
        super().__init__(upstream, endpoint, batcher, tls, ssl_context)
        # A refused stream's request is sent again from a task of this set (see H2Stream).
        self.tasks = tasks
        self.connect_timeout = connect_timeout
        self.h2_connections: list[H2ClientConnection] = []
        # A connection being opened: exchanges that need one meanwhile wait for it rather
        # than each opening their own.
        self.opening: asyncio.Future[H2ClientConnection] | None = None
        self.header_limit = header_limit
        self.loop: asyncio.AbstractEventLoop | None = None
        # Logged once until a handshake succeeds again: every request would repeat it.
        self.alpn_warned = False

    def now(self) -> float:
        """The loop's time (streams retire with it as their idle mark)."""
        return self.loop.time() if self.loop is not None else 0.0

    def room(self) -> H2ClientConnection | None:
        """The first connection that can take a stream now."""
        for conn in self.h2_connections:
            if conn.has_room():
                return conn
        return None

    def take_idle(self, now: float) -> H2Stream | None:
        """A stream on the first connection with room, or None."""
        conn = self.room()
        return conn.new_stream() if conn is not None else None

    async def connect(self, loop: asyncio.AbstractEventLoop) -> H2Stream:
        """A stream on a connection with room (see `acquire`)."""
        conn = await self.acquire(loop)
        return conn.new_stream()

    async def acquire(self, loop: asyncio.AbstractEventLoop) -> H2ClientConnection:
        """A connection with room: one that has it, the one being opened, or a new one.

        Several exchanges needing a connection at once open one, not one each (more only as
        each fills up). The caller takes its slot before anything else runs.
        """
        self.loop = loop
        while True:
            # A connection may have opened (or freed a slot) since the exchange found none.
            conn = self.room()
            if conn is not None:
                return conn
            opening = self.opening
            if opening is None:
                return await self._open(loop)
            try:
                await asyncio.shield(opening)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The opener gave up on its own deadline: try again, maybe opening one.

    async def _open(self, loop: asyncio.AbstractEventLoop) -> H2ClientConnection:
        opening: asyncio.Future[H2ClientConnection] = loop.create_future()
        self.opening = opening
        try:
            conn = await self._handshake(loop)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                opening.cancel()
            else:
                opening.set_exception(exc)
                opening.exception()  # waiters get the error; none has to read it
            raise
        else:
            opening.set_result(conn)
        finally:
            if self.opening is opening:
                self.opening = None
        if not conn.lost:
            self.h2_connections.append(conn)
        return conn

    async def _handshake(self, loop: asyncio.AbstractEventLoop) -> H2ClientConnection:
        endpoint = self.endpoint
        ready: asyncio.Future[None] = loop.create_future()
        if self.ssl is None:
            transport, conn = await loop.create_connection(
                lambda: H2ClientConnection(self, ready), endpoint.host, endpoint.port
            )
        else:
            transport, conn = await loop.create_connection(
                lambda: H2ClientConnection(self, ready),
                endpoint.host,
                endpoint.port,
                ssl=self.ssl,
                server_hostname=self.server_name,
            )
            sslobj = transport.get_extra_info("ssl_object")
            chosen = sslobj.selected_alpn_protocol() if sslobj is not None else None
            if chosen != "h2":
                ready.cancel()  # nobody will wait for the server's SETTINGS now
                transport.abort()
                message = (
                    f"endpoint {self.address} of upstream {self.upstream} did not select h2 by "
                    f"ALPN (it chose {chosen or 'nothing'}): protocol h2 needs an HTTP/2 server"
                )
                if not self.alpn_warned:
                    self.alpn_warned = True
                    log.warning("%s", message)
                # An SSLError: the exchange counts it as a `tls` failure.
                raise ssl.SSLError(message)
            self.alpn_warned = False
        try:
            await ready
        except BaseException:
            conn.abort()
            raise
        return conn

    def release(self, conn: object, now: float) -> None:
        """A stream is done: free its slot (its connection stays for other streams)."""
        if isinstance(conn, H2Stream):
            conn.retire(now)

    def forget_h2(self, conn: H2ClientConnection) -> None:
        """A connection closed: drop it from the pool."""
        with contextlib.suppress(ValueError):
            self.h2_connections.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections without streams: the first after H2_IDLE_TIMEOUT, others (left
        from a burst) after POOL_IDLE_TIMEOUT."""
        kept = False
        for conn in list(self.h2_connections):
            if conn.live:
                continue
            limit = POOL_IDLE_TIMEOUT if kept else H2_IDLE_TIMEOUT
            kept = True
            if now - conn.idle_since > limit:
                conn.close()

    def drain(self) -> None:
        """Take no new streams; connections close (GOAWAY) once their streams are done."""
        self.draining = True
        for conn in list(self.h2_connections):
            conn.going_away = True
            if not conn.live:
                conn.close()

    def close_all(self) -> None:
        """End every connection, streams in progress too (end of a drain period); one
        without streams says GOAWAY first."""
        self.draining = True
        for conn in list(self.h2_connections):
            if not conn.live:
                conn.close()
                continue
            for stream in list(conn.live):
                stream.go_away()
            conn.abort()
        self.h2_connections.clear()
