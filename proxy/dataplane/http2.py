"""Downstream HTTP/2: a client connection speaking HTTP/2, one exchange per stream.

A connection becomes HTTP/2 in `ClientConnection` (http1.py): by its first bytes (the h2c
preface, prior knowledge) or by ALPN `h2` on a TLS listener; `adopt` then moves its transport
to an `Http2Connection`. h2 (python-hyper's sans-IO state machine) parses and writes frames;
this module decides what they mean:

- Each request stream is an `Exchange` (http1.py) with every routing feature; its `Downstream`
  is an `H2Stream`, which writes the response as HEADERS / DATA / trailers.
- Flow control: request DATA is given back to the client's stream window only as the
  exchange takes it (`pause`/`unpause`), the connection window at once, so a stalled upload
  holds at most its own stream window. Response DATA leaves within the client's windows; a
  stream's unsent bytes are bounded, and past the bound its upstream is not read.
- Limits and abuse: MAX_CONCURRENT_STREAMS (extra streams refused one by one), the header
  list size, a budget of resets (rapid reset), bounded output (control-frame floods), a
  credit of bytes read that only useful bytes refill (frames that carry nothing), and streams
  stalled at window 0. Each connection-ending case sends GOAWAY and is counted.

This module must never let one stream's error, slowness or abuse reach another connection,
and never let an exception escape into the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame

from proxy.core.exchange_state import DONE, IDLE, RECEIVED, WAITING
from proxy.core.h2request import MalformedRequest, parse_request
from proxy.dataplane.http1 import TRAILER_DROP, Exchange, HeadError, WorkerHooks
from proxy.dataplane.upstream import FRAMING_NONE, UpstreamCarrier
from proxy.dataplane.writes import WRITE_HIGH, WRITE_LOW

if TYPE_CHECKING:
    from proxy.dataplane.http1 import ClientConnection
    from proxy.dataplane.listeners import ClientSide

log: Final = logging.getLogger("turnout.dataplane")

# Each stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE): what one upload may have in
# flight and, when its upstream stops reading, what the proxy holds for it. Not below
# 65,535: a client may send that much before it has read our SETTINGS.
STREAM_WINDOW: Final = 256 * 1024
# The connection's receive window, given back as DATA arrives (streams bound the memory).
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
# Response bytes a stream holds beyond what the client's window lets out before its upstream
# is paused; reading resumes once the stream is down to RESUME_BELOW.
STREAM_BUFFER: Final = 64 * 1024
RESUME_BELOW: Final = 16 * 1024
# Bytes the transport may hold before the client is judged to be flooding us with frames
# that need an answer (PING, SETTINGS) without reading the answers: response DATA stops at
# WRITE_HIGH, so only such answers can get this far.
OUTPUT_LIMIT: Final = 4 * WRITE_HIGH
# Streams a client may reset (or get refused or rejected as malformed) beyond the ones it let
# finish: each finished response earns one back, up to this (CVE-2023-44487, "rapid reset").
RESET_BUDGET: Final = 200
# Frames that carry no request or response (empty DATA, PING, SETTINGS, PRIORITY, WINDOW_UPDATE,
# padding) cost h2 some microseconds each and show nowhere else: CVE-2019-9512, -9515, -9518.
# NGINX's rule, with a response's bytes counted as useful too (a long download's WINDOW_UPDATEs):
# each byte read spends one unit of credit, each useful byte (a header block or DATA payload
# in, whatever the stream's fate; a response's body out) earns FLOOD_RATIO, up to FLOOD_CREDIT,
# which is also where a connection starts. Below zero: GOAWAY ENHANCE_YOUR_CALM. The cap bounds
# what a connection's history can buy: about 116,000 empty frames, under a second of a worker.
FLOOD_RATIO: Final = 8
FLOOD_CREDIT: Final = 1024 * 1024
# How often streams stuck at a zero window are looked at.
STALL_CHECK: Final = 1.0
# How long a connection ended by an error GOAWAY still reads (and drops) what comes.
LINGER: Final = 1.0

# Why a connection was closed with GOAWAY: counted (ctx.count_h2_goaway, one of
# proxy.core.counters.GOAWAY_REASONS) and sent as the GOAWAY's debug data. An idle
# connection's close is not counted: it is no one's fault.
GOAWAY_PROTOCOL: Final = "protocol_error"
GOAWAY_RAPID_RESET: Final = "rapid_reset"
GOAWAY_CONTINUATION: Final = "continuation_flood"
GOAWAY_HEADER_LIST: Final = "header_list_too_large"
GOAWAY_FLOOD: Final = "control_flood"
GOAWAY_FRAME_FLOOD: Final = "frame_flood"
GOAWAY_STALLED: Final = "flow_control_stall"
GOAWAY_DRAIN: Final = "drain"
GOAWAY_IDLE: Final = "idle"


class Http2Hooks(WorkerHooks, Protocol):
    """What an HTTP/2 connection needs of its worker beyond what HTTP/1.1 does."""

    def connection_opened(self, conn: ClientSide) -> None: ...
    def connection_closed(self, conn: ClientSide) -> None: ...
    def count_h2_goaway(self, reason: str) -> None: ...


def body_length_message(actual: int, expected: int) -> str:
    """Why a request body that does not match its content-length is refused."""
    if actual > expected:
        return f"request body longer than its content-length ({expected} bytes)"
    return f"request body of {actual} bytes, shorter than its content-length ({expected})"


class BodyLengthMismatch(h2.events.Event):
    """A request's DATA went past its content-length, or ended short of it (h2 found it)."""

    def __init__(self, stream_id: int, message: str) -> None:
        self.stream_id = stream_id
        self.message = message


class _ServerH2(h2.connection.H2Connection):
    """h2's connection, with the concurrent-stream limit and a request body that does not
    match its content-length left to `Http2Connection`.

    h2 answers both with a connection error, which would end every other stream too; RFC 9113
    asks for stream errors (sections 5.1.2 and 8.1.1), which the connection makes itself.
    """

    @property
    def open_inbound_streams(self) -> int:
        # Counting is also when h2 forgets closed streams: keep that, report no limit.
        self._open_streams(1)
        return 0

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        # h2 (python-hyper/h2 issue 1181) closes on a received GOAWAY and then refuses to send
        # anything, while RFC 9113 section 6.8 lets the streams already open finish: a client
        # that says goodbye gracefully still gets its answers. The connection takes no new
        # streams after it (Http2Connection closes once the open ones are done).
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        return result

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        # h2 counts the body against content-length after it has taken the frame into the
        # flow-control windows and the stream's state: only the END_STREAM, if any, is not
        # taken, and the stream stays open for the connection to answer or reset.
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError as exc:
            message = body_length_message(exc.actual_length, exc.expected_length)
            return [], [BodyLengthMismatch(frame.stream_id, message)]


class _BoundedFrames(FrameBuffer):
    """h2's frame reader, with a header block held across CONTINUATION frames bounded by
    bytes, not only by h2's count of frames (64 of up to 16 KiB: 1 MiB per connection)."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit
        # Bytes of header blocks and DATA payloads (not padding) read since the connection last
        # took them: counted here, for every frame, since DATA of a stream already reset (still
        # on its way when it ended) makes no event.
        self.payload_bytes = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, (DataFrame, HeadersFrame, ContinuationFrame)):
            self.payload_bytes += len(f.data)
        frame = super()._update_header_buffer(f)
        held = self._headers_buffer
        if held and sum(len(part.data) for part in held) > self.limit:
            raise h2.exceptions.ProtocolError(
                "header block in continuation frames larger than the header list limit"
            )
        return frame


def adopt(old: ClientConnection, initial: bytes) -> None:
    """Take over the transport of `old`, which turned out to speak HTTP/2, and feed `initial`
    (the h2c preface and what followed it; empty after ALPN `h2`)."""
    transport = old.transport
    hooks = cast("Http2Hooks", old.ctx)
    conn = Http2Connection(hooks, old.client_ip, old.forwarded_proto, old.tls_version, old.sni)
    if transport is None or transport.is_closing():
        hooks.connection_closed(old)
        return
    if old.paused:
        transport.resume_reading()
    transport.set_protocol(conn)
    conn.connection_made(transport)
    old.transport = None
    if initial:
        # The requests that came with the preface are taken even in a drain: a GOAWAY then
        # names them as the last it serves.
        conn.data_received(initial)
    # Opened before the old one is forgotten: a drain waiting for the last connection must
    # not see none in between. The worker sets `closing` here if it drains.
    hooks.connection_opened(conn)
    hooks.connection_closed(old)


class H2Stream:
    """One request stream: the `Downstream` of its exchange (see http1.Downstream)."""

    __slots__ = (
        "blocked_since",
        "client_ip",
        "close_after",
        "conn",
        "ctx",
        "done",
        "end_pending",
        "ended",
        "ex",
        "forwarded_proto",
        "head",
        "out",
        "out_size",
        "paused",
        "paused_upstream",
        "request_ended",
        "reset",
        "sid",
        "sni",
        "tls_version",
        "unacked",
    )

    # HTTP/2 has neither Expect handshakes to answer by hand nor connection reuse to decide
    # per stream: the exchange's connection-level knobs mean nothing here.
    write_paused = False

    def __init__(self, conn: Http2Connection, sid: int) -> None:
        self.conn = conn
        self.ctx: WorkerHooks = conn.ctx
        self.sid = sid
        # The connection's facts, as the exchange and its access-log line read them.
        self.client_ip = conn.client_ip
        self.forwarded_proto = conn.forwarded_proto
        self.tls_version = conn.tls_version
        self.sni = conn.sni
        self.ex: Exchange | None = None
        # A head with no body to follow, held to go out with END_STREAM (one HEADERS frame:
        # what a gRPC client needs of a "trailers-only" answer).
        self.head: list[tuple[bytes, bytes]] | None = None
        self.paused = 0
        self.close_after = False
        self.out: deque[bytes] = deque()
        self.out_size = 0
        self.end_pending = False  # the response is complete; END_STREAM after `out`
        self.ended = False  # END_STREAM (or trailers) sent
        self.reset = False  # RST_STREAM sent or received
        self.request_ended = False
        self.done = False  # the exchange finished
        self.unacked = 0  # request bytes not yet given back to the stream's window
        self.paused_upstream: UpstreamCarrier | None = None
        self.blocked_since = 0.0  # when unsent bytes met a zero window (0: not blocked)

    # ---- the request side: acknowledging DATA is reading it ----

    def pause(self, reason: int) -> None:
        """Stop giving the client window for this stream's body (reasons are bit flags)."""
        self.paused |= reason

    def unpause(self, reason: int) -> None:
        """Drop one reason; with none left, give back the window held so far."""
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused:
            self.conn.ack_stream(self, 0)

    # ---- the response side ----

    def send_continue(self, ex: Exchange) -> None:
        """Not sent: the exchange asks only HTTP/1.1 clients (RFC 9113 section 8.1 lets an
        HTTP/2 client send its body at once)."""

    def send_interim(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
    ) -> None:
        """An interim response (103 Early Hints) as a HEADERS frame of its own."""
        fields = [(b":status", b"%d" % status)]
        fields += [(lname, value) for lname, _, value in headers if lname not in drop]
        self.conn.send_headers(self, fields, end=False)

    def send_head(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
        body_framing: int,
    ) -> None:
        """The response head: the upstream's fields but `drop`, then the proxy's own."""
        fields = [(b":status", b"%d" % status)]
        fields += [(lname, value) for lname, _, value in headers if lname not in drop]
        fields.append((b"x-request-id", ex.request_id.encode("latin-1")))
        fields.append((b"via", ex.gen.via_value if ex.upstream_http1() else ex.gen.via_value_2))
        if ex.set_cookie is not None:
            fields.append((b"set-cookie", ex.sticky_cookie()))
        if body_framing == FRAMING_NONE:
            self.head = fields
        else:
            self.conn.send_headers(self, fields, end=False)
        # A new upstream carrier: apply whatever pause the client side calls for.
        self.sync_upstream()

    def send_data(self, ex: Exchange, data: bytes) -> None:
        """A piece of the response body: sent within the windows, the rest held."""
        if self.reset or not data:
            return
        self.out.append(data)
        self.out_size += len(data)
        self.conn.pump(self)

    def finish_response(self, ex: Exchange) -> None:
        """The response is complete: END_STREAM, or trailers, once the held bytes are out."""
        if self.reset:
            return
        self.end_pending = True
        self.conn.pump(self)

    def send_local(
        self,
        ex: Exchange,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        close: bool,
    ) -> None:
        """A response the proxy makes itself; an empty one (a gRPC trailers-only answer, a
        HEAD) is one HEADERS frame that ends the stream."""
        fields = [(b":status", b"%d" % status)]
        fields += [(name.lower(), value) for name, value in headers]
        if not ex.grpc:
            fields.append((b"content-length", b"%d" % len(body)))
        fields.append((b"x-request-id", ex.request_id.encode("latin-1")))
        if not body or ex.method == "HEAD":
            self.conn.send_headers(self, fields, end=True)
            return
        self.conn.send_headers(self, fields, end=False)
        self.send_data(ex, body)
        self.finish_response(ex)

    def abort(self) -> None:
        """A broken response must look broken: reset this stream (only).

        The exchange also aborts a stream whose client left its window shut for the idle
        timeout; when every stream of the connection is stuck so, the connection goes.
        """
        conn = self.conn
        if self.blocked_since and conn.all_blocked():
            conn.stalled()
        else:
            conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def start_tunnel(self, ex: Exchange) -> None:
        """Never called: an HTTP/2 request is never an upgrade (WebSocket over HTTP/2,
        RFC 8441, is refused before routing)."""

    def linger(self, seconds: float) -> None:
        """Nothing to wait for: a WebSocket close handshake never happens on a stream."""

    def exchange_done(self, ex: Exchange) -> None:
        """The exchange is over: the stream goes once its response is out."""
        self.done = True
        self.sync_upstream()
        self.conn.stream_progress(self)

    # ---- helpers ----

    def sync_upstream(self) -> None:
        """Pause the upstream's reading while this stream holds too much or the client's
        transport is full; resume it when neither holds."""
        ex = self.ex
        carrier = ex.upstream_conn if ex is not None and not self.done else None
        held = self.paused_upstream
        want = carrier is not None and (
            self.conn.write_paused
            or self.out_size > STREAM_BUFFER
            or (held is not None and self.out_size > RESUME_BELOW)
        )
        if want:
            if held is not carrier:
                assert carrier is not None
                carrier.pause_reading()
                self.paused_upstream = carrier
        elif held is not None:
            self.paused_upstream = None
            if carrier is not None and held is carrier:
                carrier.resume_reading()


class Http2Connection(asyncio.Protocol):
    """A downstream HTTP/2 connection: frames in and out, one `H2Stream` per request."""

    tunnel: None = None  # never a WebSocket tunnel (the worker's drain asks)

    def __init__(
        self,
        ctx: Http2Hooks,
        client_ip: str,
        forwarded_proto: bytes,
        tls_version: str | None,
        sni: str | None,
    ) -> None:
        self.ctx = ctx
        self.client_ip = client_ip
        self.forwarded_proto = forwarded_proto
        self.tls_version = tls_version
        self.sni = sni
        self.transport: asyncio.Transport | None = None
        limits = ctx.generation.limits
        self.max_streams = limits.max_concurrent_streams
        self.max_header_list = limits.max_header_size
        self.h2 = _ServerH2(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # Heads are checked by proxy.core.h2request (stream errors, not connection
                # errors); response fields are made lower-case and clean by the exchange.
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_list,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        # The decoder stops (an HPACK bomb) as soon as a decoded list passes the limit; an
        # encoded block is held up to twice the limit (HPACK may code a field longer).
        self.h2.decoder.max_header_list_size = self.max_header_list
        self.frames = _BoundedFrames(2 * self.max_header_list)
        self.h2.incoming_buffer = self.frames
        self.streams: dict[int, H2Stream] = {}
        self.write_paused = False
        self.idle_since = ctx.state.now
        self._closing = False
        self.goaway_sent = False
        self.last_stream = 0  # the highest stream id taken (for GOAWAY)
        self.reset_credit = RESET_BUDGET
        self.flood_credit = FLOOD_CREDIT
        self.queued = 0  # DATA bytes handed to h2 since the last flush
        self.receiving = False
        self.flush_scheduled = False
        self.stall_timer: asyncio.TimerHandle | None = None
        self.waiting: set[H2Stream] = set()
        self.closed = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only `adopt` makes these: it tells the worker (connection_opened) once the first
        # bytes are in.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.receiving = True
        self.flood_credit -= len(data)
        try:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._protocol_error(exc)
                return
            frames = self.frames
            if frames.payload_bytes:
                self.earn(frames.payload_bytes)
                frames.payload_bytes = 0
            for event in events:
                self._event(event)
                if self.closed:
                    return
            if self.flood_credit < 0:
                self.ctx.warn_limited(
                    "h2-frame-flood",
                    "HTTP/2 client %s sends frames that carry no request or response: closed",
                    self.client_ip,
                )
                self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, GOAWAY_FRAME_FLOOD)
                return
            # The connection's window is given back at once: each stream's window bounds what
            # it may hold (a stalled upload must not stall the others). Topped up from h2's
            # count, which also has the DATA of streams already reset (no event for those).
            window = self.h2.inbound_flow_control_window
            if window < CONNECTION_WINDOW // 2:
                self.h2.increment_flow_control_window(CONNECTION_WINDOW - window)
        except Exception:
            log.exception("HTTP/2 connection handling failed")
            self._go_away(ErrorCodes.INTERNAL_ERROR, GOAWAY_PROTOCOL)
        finally:
            self.receiving = False
            self._flush()

    def eof_received(self) -> bool | None:
        # A client that half-closes will send nothing more: nothing of it is waited for.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        self._end_streams()
        self.ctx.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.sync_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            self.pump(stream)
        self._flush_soon()

    # ---- what the worker asks (listeners.ClientSide) ----

    @property
    def closing(self) -> bool:
        """Draining: GOAWAY was sent, open streams finish, no new ones are taken."""
        return self._closing

    @closing.setter
    def closing(self, value: bool) -> None:
        if not value or self._closing:
            return
        self._closing = True
        self._graceful_goaway(GOAWAY_DRAIN)
        if not self.streams:
            self._close_transport()

    def is_idle(self) -> bool:
        """No stream open: closing now loses nothing."""
        return not self.streams

    def close(self) -> None:
        """Close gracefully: GOAWAY (NO_ERROR), then the transport once what is queued is out."""
        if not self._closing:
            self._closing = True
            self._graceful_goaway(GOAWAY_IDLE if not self.streams else GOAWAY_DRAIN)
        self._close_transport()

    def abort(self) -> None:
        """Cut the connection now."""
        self._flush()
        transport = self.transport
        if transport is not None:
            transport.abort()

    # ---- frames in ----

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.TrailersReceived):
            self._request_trailers(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_end(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._client_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.pump(stream)
            else:
                for stream in list(self.streams.values()):
                    self.pump(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # A new initial window may have opened every stream's window.
            for stream in list(self.streams.values()):
                self.pump(stream)
        elif isinstance(event, BodyLengthMismatch):
            self._malformed_body(event.stream_id, event.message)
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code == ErrorCodes.NO_ERROR and self.streams:
                # The client's graceful GOAWAY: its open streams finish, then the connection
                # closes (_stream_gone); it opens no new ones.
                self._closing = True
            else:
                self._close_transport()
        # PING and SETTINGS are answered by h2; PRIORITY is advisory.

    def _request_trailers(self, event: h2.events.TrailersReceived) -> None:
        """The request's trailers (they end the stream: StreamEnded follows). Passed on when
        the upstream side can carry them; framing and connection fields never are."""
        stream = self.streams.get(event.stream_id)
        ex = stream.ex if stream is not None else None
        if ex is None or ex.request_state == RECEIVED:
            return
        ex.request_trailers = [
            (name.lower(), value)
            for name, value in event.headers or ()
            if name[:1] != b":" and name.lower() not in TRAILER_DROP
        ]

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        assert event.headers is not None
        self.last_stream = max(self.last_stream, sid)
        if self._closing:
            # Past our GOAWAY's last stream id: the client retries it elsewhere.
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:
            self._charge_reset()
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = parse_request(event.headers)
        except MalformedRequest as exc:
            self.ctx.warn_limited(
                "h2-malformed", "HTTP/2 client %s: malformed request: %s", self.client_ip, exc
            )
            self._charge_reset()
            self._refuse(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = H2Stream(self, sid)
        self.streams[sid] = stream
        ex = Exchange(stream)
        stream.ex = ex
        ended = event.stream_ended is not None
        try:
            self._begin(ex, head.method, head.path, head.authority, head.fields, head.protocol)
            if not ended and ex.content_length is None:
                # A body of unknown length: chunked to an HTTP/1.1 upstream.
                ex.chunked_in = True
            ex.finish_head(head.method, "2", True, False)
            ex.begin()
        except HeadError as error:
            self._reject(stream, ex, error.status, error.message)
        except Exception:
            log.exception("HTTP/2 request handling failed")
            self._reject(stream, ex, 500, "internal error")
        if ended:
            self._request_end(sid)

    def _begin(
        self,
        ex: Exchange,
        method: str,
        path: bytes,
        authority: bytes | None,
        fields: tuple[tuple[bytes, bytes], ...],
        protocol: bytes | None,
    ) -> None:
        """Hand the head to the exchange as its HTTP/1.1 parser would (HeadError)."""
        if protocol is not None:
            raise HeadError(501, "extended CONNECT (WebSocket over HTTP/2) is not supported")
        gen = ex.gen
        limits = gen.limits
        wanted = gen.wanted_headers
        ex.url = path
        ex.head_size = len(path) + len(method)
        if ex.head_size > limits.max_header_size:
            raise HeadError(414, "request target longer than limits.max_header_size")
        if authority is not None:
            ex.head_size += len(authority) + 4
            ex.header_count += 1
            ex.add_header(b"host", b"host", authority, limits, wanted)
        for name, value in fields:
            ex.head_size += len(name) + len(value) + 4
            ex.header_count += 1
            ex.add_header(name, name, value, limits, wanted)

    def _reject(self, stream: H2Stream, ex: Exchange, status: int, message: str) -> None:
        """A head the proxy refuses: a JSON error on this stream (as HTTP/1.1's _reject)."""
        if ex.response_state != IDLE:
            # Routing began and failed in a way the exchange did not answer: end the stream.
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            if ex.response_state < DONE:
                ex.client_lost()
            return
        if not ex.request_id:
            request_id = ex.request_id_in
            ex.request_id = (
                request_id.decode("latin-1")
                if request_id is not None
                else self.ctx.state.request_ids.new()
            )
        ex.flag = "refused"
        ex.local_error(status, message, close=False)

    def earn(self, useful: int) -> None:
        """`useful` bytes of a request or response went through: credit against a frame flood."""
        self.flood_credit = min(FLOOD_CREDIT, self.flood_credit + FLOOD_RATIO * useful)

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length or 0
        data = event.data or b""
        stream = self.streams.get(sid)
        if stream is None:
            return
        ex = stream.ex
        if ex is not None and data and not stream.done and ex.request_state != RECEIVED:
            ex.body(data)
        self.ack_stream(stream, size)

    def ack_stream(self, stream: H2Stream, size: int) -> None:
        """Give `size` more bytes (and what was held) back to the stream's window, unless the
        exchange does not take its body now."""
        stream.unacked += size
        if stream.paused or stream.reset or stream.request_ended:
            return
        if stream.unacked >= STREAM_WINDOW // 2 or (size == 0 and stream.unacked):
            increment = stream.unacked
            stream.unacked = 0
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.increment_flow_control_window(increment, stream.sid)
            self._flush_soon()

    def _request_end(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.request_ended:
            return
        ex = stream.ex
        if ex is not None and not stream.done and ex.request_state != RECEIVED:
            length = ex.content_length
            if length is not None and ex.bytes_in != length:
                # Ended by trailers, or by the head itself: h2 counts only DATA frames.
                self._malformed_body(sid, body_length_message(ex.bytes_in, length))
                return
            stream.request_ended = True
            ex.body_complete()
        else:
            stream.request_ended = True
        self.stream_progress(stream)

    def _malformed_body(self, sid: int, message: str) -> None:
        """A request whose body does not match its content-length: a stream error (RFC 9113
        section 8.1.1), the connection's other streams go on. Answered 400 if its response
        has not begun (then RST_STREAM NO_ERROR, as for any answer given before the body
        ends), else reset with PROTOCOL_ERROR; either way its upstream request is dropped."""
        stream = self.streams.get(sid)
        self.ctx.warn_limited("h2-body-length", "HTTP/2 client %s: %s", self.client_ip, message)
        self._charge_reset()
        if stream is None:
            self._refuse(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        ex = stream.ex
        if ex is not None and not stream.done:
            if ex.response_state == WAITING:
                ex.local_error(400, message, close=True)
                return
            ex.client_lost()
        self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)

    def _client_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream.reset = True
        if event.remote_reset and not stream.ended:
            # Given up before its response was out: what rapid reset is made of.
            self._charge_reset()
        ex = stream.ex
        if ex is not None and not stream.done:
            ex.client_lost()
        stream.sync_upstream()
        self._stream_gone()

    def _charge_reset(self) -> None:
        self.reset_credit -= 1
        if self.reset_credit < 0 and not self.closed:
            self.ctx.warn_limited(
                "h2-rapid-reset",
                "HTTP/2 client %s resets streams faster than it lets them finish: closed",
                self.client_ip,
            )
            self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, GOAWAY_RAPID_RESET)

    def _refuse(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.h2.reset_stream(sid, code)

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """h2 found the client breaking HTTP/2 and queued its GOAWAY: send it and close."""
        text = str(exc)
        if isinstance(exc, h2.exceptions.DenialOfServiceError):
            reason = GOAWAY_HEADER_LIST
        elif "continuation" in text.lower():
            reason = GOAWAY_CONTINUATION
        else:
            reason = GOAWAY_PROTOCOL
        self.ctx.warn_limited(
            f"h2-{reason}", "HTTP/2 client %s: %s (GOAWAY %s)", self.client_ip, text, reason
        )
        self.ctx.count_h2_goaway(reason)
        self.goaway_sent = True
        self._end_streams()
        self._linger_close()

    # ---- frames out ----

    def send_headers(self, stream: H2Stream, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        """A HEADERS frame (a head, an interim head, or trailers when `end`)."""
        if stream.reset or self.closed:
            return
        try:
            self.h2.send_headers(stream.sid, fields, end_stream=end)
        except (h2.exceptions.ProtocolError, KeyError):
            # The stream closed under us (the client reset it meanwhile).
            stream.reset = True
            return
        if end:
            stream.ended = True
            self.stream_progress(stream)
        self._flush_soon()

    def pump(self, stream: H2Stream) -> None:
        """Send what the windows allow of `stream`'s held bytes; end it when all is out."""
        if stream.reset or self.closed:
            return
        h2conn = self.h2
        out = stream.out
        blocked = False
        try:
            while out and not self.write_paused:
                window = h2conn.local_flow_control_window(stream.sid)
                if window <= 0:
                    blocked = True
                    break
                room = WRITE_HIGH - self.queued - self._buffered()
                if room <= 0:
                    # Sent on once what is queued has gone to the transport (_flush).
                    self.waiting.add(stream)
                    break
                window = min(window, room)
                chunk = out[0]
                size = min(len(chunk), window, h2conn.max_outbound_frame_size)
                if size == len(chunk):
                    out.popleft()
                else:
                    out[0] = chunk[size:]
                    chunk = chunk[:size]
                h2conn.send_data(stream.sid, chunk)
                stream.out_size -= size
                self.queued += size
                self.earn(size)
            if not out and stream.end_pending and not stream.ended:
                stream.end_pending = False
                ex = stream.ex
                trailers = ex.trailers if ex is not None else None
                head = stream.head
                if head is not None:
                    # No body came: the head ends the stream, unless trailers follow it.
                    stream.head = None
                    h2conn.send_headers(stream.sid, head, end_stream=trailers is None)
                if trailers is not None:
                    fields = [
                        (lname, value)
                        for lname, _, value in trailers
                        if lname not in TRAILER_DROP and lname[:1] != b":"
                    ]
                    h2conn.send_headers(stream.sid, fields, end_stream=True)
                elif head is None:
                    h2conn.end_stream(stream.sid)
                stream.ended = True
        except (h2.exceptions.ProtocolError, KeyError):
            stream.reset = True
            stream.out.clear()
            stream.out_size = 0
        if blocked:
            if not stream.blocked_since:
                stream.blocked_since = self.ctx.state.now
                self._watch_stalls()
        else:
            stream.blocked_since = 0.0
        stream.sync_upstream()
        self._flush_soon()
        if stream.ended or stream.reset:
            self.stream_progress(stream)

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        """RST_STREAM: this stream ends, broken; the others go on."""
        if stream.reset:
            return
        stream.reset = True
        stream.out.clear()
        stream.out_size = 0
        if not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.reset_stream(stream.sid, code)
            self._flush_soon()
        stream.sync_upstream()
        self.stream_progress(stream)

    def stream_progress(self, stream: H2Stream) -> None:
        """Forget a stream once its exchange is over and nothing more will go either way."""
        if not stream.done or self.streams.get(stream.sid) is not stream:
            return
        if not stream.reset:
            if not stream.ended:
                return
            if not stream.request_ended:
                # RFC 9113 section 8.1: the response is complete, the rest of the request is
                # not wanted; NO_ERROR tells the client to stop sending it.
                self.reset_stream(stream, ErrorCodes.NO_ERROR)
                return
            self.reset_credit = min(RESET_BUDGET, self.reset_credit + 1)
        del self.streams[stream.sid]
        self._stream_gone()

    def _stream_gone(self) -> None:
        if not self.streams:
            self.idle_since = self.ctx.state.now
            if self._closing:
                self._close_transport()

    def _graceful_goaway(self, reason: str) -> None:
        """GOAWAY with NO_ERROR naming the last stream taken; open streams go on.

        Written past h2, whose state machine would refuse every frame after its own GOAWAY.
        """
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        if reason != GOAWAY_IDLE:
            self.ctx.count_h2_goaway(reason)
        self._flush()
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=self.last_stream,
            error_code=0,
            additional_data=reason.encode("ascii"),
        )
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame.serialize())

    def _go_away(self, code: ErrorCodes, reason: str) -> None:
        """End the connection for `reason`: GOAWAY `code`, every stream ends, close."""
        if self.closed:
            return
        self.ctx.count_h2_goaway(reason)
        if not self.goaway_sent:
            self.goaway_sent = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                # The reason as debug data: what a client's log can show (RFC 9113 6.8).
                self.h2.close_connection(
                    code, additional_data=reason.encode("ascii"), last_stream_id=self.last_stream
                )
        self._end_streams()
        self._linger_close()

    def _end_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.reset = True
            ex = stream.ex
            if ex is not None and not stream.done:
                ex.client_lost()
            stream.sync_upstream()

    def _close_transport(self) -> None:
        self._flush()
        self.closed = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _linger_close(self) -> None:
        """Close after an error GOAWAY without losing it: what the client still sends would
        make the kernel answer with a reset, which discards unread data on the client's side
        (the GOAWAY too). So: our side ends (FIN after the GOAWAY), the client's bytes are
        read and dropped for LINGER, then the connection goes (NGINX's lingering close)."""
        self._flush()
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.ctx.loop.call_later(LINGER, transport.abort)

    def _buffered(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _flush_soon(self) -> None:
        if self.receiving or self.flush_scheduled:
            return
        self.flush_scheduled = True
        self.ctx.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand what h2 has queued to the transport; too much unread output is a flood."""
        self.flush_scheduled = False
        self.queued = 0
        data = self.h2.data_to_send()
        transport = self.transport
        if not data or transport is None or transport.is_closing():
            return
        transport.write(data)
        if self.waiting and not self.write_paused:
            waiting = list(self.waiting)
            self.waiting.clear()
            for stream in waiting:
                self.pump(stream)
        if transport.get_write_buffer_size() > OUTPUT_LIMIT and not self.goaway_sent:
            self.ctx.warn_limited(
                "h2-flood",
                "HTTP/2 client %s does not read what it asks for (PING/SETTINGS flood?): closed",
                self.client_ip,
            )
            self.ctx.count_h2_goaway(GOAWAY_FLOOD)
            self.goaway_sent = True
            self._end_streams()
            self.closed = True
            # The client does not read: a GOAWAY queued behind megabytes would never arrive.
            transport.abort()

    # ---- streams stuck at a zero window ----

    def all_blocked(self) -> bool:
        """Every open stream waits for the client to open its window."""
        return all(stream.blocked_since for stream in self.streams.values())

    def stalled(self) -> None:
        """The client reads none of its streams: GOAWAY and close."""
        self.ctx.warn_limited(
            "h2-stalled",
            "HTTP/2 client %s left every stream at a zero window past the idle timeout: closed",
            self.client_ip,
        )
        self._go_away(ErrorCodes.NO_ERROR, GOAWAY_STALLED)

    def _watch_stalls(self) -> None:
        if self.stall_timer is None and not self.closed:
            self.stall_timer = self.ctx.loop.call_later(STALL_CHECK, self._check_stalls)

    def _check_stalls(self) -> None:
        """Reset streams whose client has not opened their window for the idle timeout;
        close the connection when every stream is stuck so."""
        self.stall_timer = None
        if self.closed:
            return
        now = self.ctx.loop.time()
        idle = self.ctx.generation.timeouts.idle
        blocked = [s for s in self.streams.values() if s.blocked_since]
        stalled = [s for s in blocked if now - s.blocked_since > idle]
        if stalled and self.all_blocked():
            self.stalled()
            return
        for stream in stalled:
            self.reset_stream(stream, ErrorCodes.CANCEL)
            ex = stream.ex
            if ex is not None and not stream.done:
                ex.client_lost()
        if len(blocked) > len(stalled):
            self._watch_stalls()
        self._flush()
