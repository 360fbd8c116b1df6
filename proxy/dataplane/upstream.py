"""Connections to endpoints: the HTTP/1.1 client protocol and the keep-alive pools.

One `UpstreamConnection` carries one request at a time (no pipelining to endpoints). Response
bytes are parsed by llhttp (httptools) and handed to a `ResponseSink` (the data plane's exchange)
as they arrive, so bodies stream with backpressure instead of being buffered.

Pools are per endpoint, LIFO (the most recently used connection is the warmest and the least
likely to have been closed by the endpoint), and drop connections idle longer than
`POOL_IDLE_TIMEOUT`, which is kept below the keep-alive timeouts common servers use (Node,
uvicorn and Apache close after 5 s) so the proxy closes first and rarely reuses a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Final, Protocol, cast

import httptools

from proxy.core.headers import is_chunked, last_chunk
from proxy.core.health import CLEAR
from proxy.core.routing import pick_endpoint
from proxy.core.spec import Endpoint, UpstreamSpec, UpstreamTls
from proxy.dataplane.writes import CoalescingProtocol, WriteBatcher

log: Final = logging.getLogger("turnout.upstream")

POOL_IDLE_TIMEOUT: Final = 4.0
POOL_MAX_IDLE: Final = 256
# Methods bound once: compiled, `name.lower()` or `parser.feed_data(data)` looks the method up
# by name on every call.
_lower: Final[Callable[[bytes], bytes]] = bytes.lower
_feed_data: Final = httptools.HttpResponseParser.feed_data
_should_keep_alive: Final = httptools.HttpResponseParser.should_keep_alive
_get_status_code: Final = httptools.HttpResponseParser.get_status_code


class ResponseSink(Protocol):
    """What an upstream connection reports to, for the request it is carrying."""

    def upstream_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        body_framing: int,
        keep_alive: bool,
        connection: list[bytes],
    ) -> None:
        """The response head arrived (interim 1xx responses are not reported).

        `headers` are (lower-cased name, name, value); `connection` the Connection values.
        The reason phrase is not passed on: clients ignore it (RFC 9112 section 4), and not
        asking llhttp for it saves a callback per response.
        """

    def upstream_body(self, data: bytes) -> None:
        """A piece of the response body."""

    def upstream_trailers(self, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        """The response's trailer fields (HTTP/2), just before upstream_complete."""

    def upstream_complete(self) -> None:
        """The response ended cleanly."""

    def upstream_lost(self, got_response_bytes: bool) -> None:
        """The connection broke before the response ended."""

    def upstream_invalid(self, reason: str) -> None:
        """The endpoint broke HTTP (oversized or malformed head, unsolicited 101).

        The connection is already closed and will report nothing more.
        """

    def upstream_interim(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        """An interim response other than 100 (103 Early Hints, say), to pass on."""

    def upstream_upgraded(self, rest: bytes) -> None:
        """A 101 response ended the HTTP part; `rest` are the first tunnelled bytes."""

    def upstream_pause_writing(self) -> None:
        """The endpoint does not take request bytes as fast as the client sends them."""

    def upstream_resume_writing(self) -> None:
        """The endpoint drained its buffer."""

    def upstream_data(self, data: bytes) -> None:
        """Raw tunnelled bytes after an upgrade."""

    def go_away(self) -> None:
        """The endpoint is being closed under the request (drain deadline, shutdown)."""


class OutgoingRequest(Protocol):
    """The request a carrier sends, as the exchange (http1.Exchange) holds it."""

    method: str
    url: bytes  # origin form, normalised
    host: bytes | None
    kept_headers: list[tuple[bytes, bytes, bytes]]  # (lower name, name, value) that pass
    added: list[tuple[bytes, bytes]]  # the proxy's forwarding fields
    content_length: int | None
    chunked_in: bool  # the body's length is not known in advance
    grpc: bool
    te_trailers: bool

    def http1_head(self) -> bytes: ...


class UpstreamCarrier(Protocol):
    """What carries one request to an endpoint, as the exchange sees it: an HTTP/1.1
    connection (`UpstreamConnection`) or a stream of an HTTP/2 connection.

    The exchange decides what is sent (method, target, which fields, the body's pieces); the
    carrier decides how (a request line and chunks, or HEADERS and DATA frames).
    """

    endpoint: EndpointPool
    reusable: bool
    # The body's end is a signal of its own (HTTP/2 END_STREAM) even when its length is known:
    # otherwise only a chunked body needs end_body, and the exchange saves the call.
    framed_end: bool

    def start(
        self,
        sink: ResponseSink,
        head_request: bool,
        upgrade: bool,
        max_head: int,
        max_headers: int,
    ) -> None: ...
    def send_head(self, ex: OutgoingRequest) -> None: ...
    def send_body(self, data: bytes, chunked: bool) -> None: ...
    def end_body(self, chunked: bool, trailers: list[tuple[bytes, bytes]] | None) -> None: ...
    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def detach(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


# How the response body is delimited (RFC 9112 section 6.3).
FRAMING_NONE: Final = 0  # no body: HEAD, 204, 304
FRAMING_LENGTH: Final = 1
FRAMING_CHUNKED: Final = 2
FRAMING_CLOSE: Final = 3  # until the endpoint closes the connection

_FRAMING_HEADERS: Final = frozenset({b"transfer-encoding", b"content-length", b"connection"})


class UpstreamConnection(CoalescingProtocol):
    """One keep-alive connection to an endpoint."""

    __slots__ = (
        "_body_framing",
        "_body_seen",
        "_complete",
        "_connection",
        "_has_length",
        "_headers",
        "_interim",
        "_invalid",
        "_parser",
        "_raw",
        "_te",
        "endpoint",
        "framed_end",
        "got_bytes",
        "head_request",
        "idle_since",
        "max_head",
        "max_headers",
        "read_paused",
        "reusable",
        "sink",
        "tunnel",
        "upgrade_asked",
        "uses",
    )

    def __init__(self, endpoint: EndpointPool) -> None:
        super().__init__(endpoint.batcher)
        self.endpoint = endpoint
        self.framed_end = False
        self.sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        # (lower-cased name, name, value): names are lower-cased once, here.
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._te: bytes | None = None
        self._has_length = False
        self._connection: list[bytes] = []
        self._interim = False
        self._body_framing = FRAMING_LENGTH
        self.head_request = False
        self.upgrade_asked = False
        self.got_bytes = False
        self.reusable = False
        self.read_paused = False
        self.tunnel = False
        self.idle_since = 0.0
        self.uses = 0
        # The response head is bounded like a request head (limits.max_header_size and
        # max_headers): an endpoint streaming header lines must not grow the worker.
        self.max_head = 0
        self.max_headers = 0
        self._invalid = ""
        self._complete = False
        self._body_seen = False
        self._raw = 0

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            sink = self.sink
            if sink is not None:
                sink.upstream_data(data)
            return
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the endpoint broke the protocol; never reuse it.
            self.close()
            return
        self.got_bytes = True
        self._body_seen = False
        try:
            _feed_data(self._parser, data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.sink is not sink or not self.tunnel:
                self._fail("unsolicited 101 Switching Protocols")
                return
            sink.upstream_upgraded(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if not self._complete:
                reason = self._invalid or f"malformed response: {exc}"
                self._fail(reason)
                return
            # The response was whole; what followed it (bytes past its length, a body after
            # a HEAD answer) makes the connection unfit to carry another request.
            self.reusable = False
        if self._complete:
            # Completed only now that llhttp is done with this read: an exchange that starts
            # on this connection from upstream_complete must not see bytes of this one.
            self._complete = False
            self.sink = None
            if self.head_request:
                # llhttp cannot be told this answered a HEAD and would wait for the announced
                # body: the next response needs a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
            sink.upstream_complete()
            return
        if self._body_seen:
            self._raw = 0  # only an unbroken run of reads without body bytes counts
        else:
            # llhttp keeps an unfinished header or trailer line to itself (and httptools joins
            # its pieces by copying): bound the reads that carry no body byte, i.e. the head,
            # chunk framing and trailers, by the head limit. Counting whole reads, not fields,
            # keeps the per-header callback as cheap as it was.
            self._raw += len(data)
            if self._raw > self.max_head:
                self._fail("response head or trailers larger than limits.max_header_size")

    def _fail(self, reason: str) -> None:
        """The endpoint broke the protocol: drop the connection and tell the sink once."""
        sink = self.sink
        self.sink = None
        self.reusable = False
        self.abort()
        if sink is not None:
            sink.upstream_invalid(reason)

    def eof_received(self) -> bool | None:
        # A close-delimited body ends here; anything else ending here is a broken response.
        self.flush()  # the transport closes on return: bytes this loop pass wrote go first
        if self.sink is not None and not self.tunnel and self._body_framing == FRAMING_CLOSE:
            sink = self.sink
            self.sink = None
            self.reusable = False
            sink.upstream_complete()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.endpoint.forget(self)
        sink = self.sink
        if sink is not None:
            self.sink = None
            if self.tunnel or self._body_framing == FRAMING_CLOSE:
                sink.upstream_complete()
            else:
                sink.upstream_lost(self.got_bytes)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailer fields land here too, after the head: they are never forwarded, and start()
        # clears them (they must not become the next response's head).
        lname = _lower(name)
        self._headers.append((lname, name, value))
        if lname in _FRAMING_HEADERS:
            if lname == b"transfer-encoding":
                self._te = value
            elif lname == b"content-length":
                self._has_length = True
            else:
                self._connection.append(value)

    def on_headers_complete(self) -> None:
        if self._complete:
            # A second response to one request: never let it reach the next request's client.
            self._invalid = "more response bytes than the response announced"
            raise ValueError(self._invalid)
        if len(self._headers) > self.max_headers:
            self._invalid = "too many response header fields"
            raise ValueError(self._invalid)
        parser = self._parser
        status = _get_status_code(parser)
        if status == 101 and not self.upgrade_asked:
            # RFC 9110 section 15.2.2: a server must not switch protocols unasked; tunnelling
            # it would turn the client's connection into a raw pipe to the endpoint.
            self._invalid = "unsolicited 101 Switching Protocols"
            raise ValueError(self._invalid)
        if not 100 <= status <= 599:
            self._invalid = f"invalid status code {status}"
            raise ValueError(self._invalid)
        headers = self._headers
        self._headers = []
        te, has_length, connection = self._te, self._has_length, self._connection
        self._te, self._has_length = None, False
        if connection:
            self._connection = []
        if 100 <= status < 200 and status != 101:
            # Interim responses: 100 Continue is consumed (the proxy answers Expect itself);
            # others (103 Early Hints) are passed on, as RFC 9110 section 15.2 requires.
            self._interim = True
            sink = self.sink
            if status != 100 and sink is not None:
                sink.upstream_interim(status, headers)
            return
        if te is not None and not is_chunked(te) and b"chunked" in te.lower():
            # RFC 9112 section 6.1: chunked is applied once, last; anything else is garbage.
            self._invalid = "chunked is not the final transfer coding"
            raise ValueError(self._invalid)
        # A connection that already carried a kept-alive response speaks HTTP/1.1: only its
        # first response needs the version (the parser formats a string for it).
        keep_alive = _should_keep_alive(parser) and (
            self.uses > 1 or parser.get_http_version() == "1.1"
        )
        if status == 101:
            # llhttp reports the 101 message as complete before it stops at the upgrade: mark
            # the tunnel now so on_message_complete does not end the exchange.
            self.tunnel = True
            framing = FRAMING_NONE
        elif self.head_request or status in (204, 304):
            framing = FRAMING_NONE
        elif te is not None:
            framing = FRAMING_CHUNKED if is_chunked(te) else FRAMING_CLOSE
        elif has_length:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        if framing == FRAMING_CLOSE:
            keep_alive = False
        self._body_framing = framing
        self.reusable = keep_alive
        sink = self.sink
        if sink is not None:
            sink.upstream_head(status, headers, framing, keep_alive, connection)
        if self.head_request:
            # The answer to a HEAD has no body, whatever its head announces.
            self._complete = True

    def on_body(self, data: bytes) -> None:
        if self._complete:
            self._invalid = "a body after the response ended"
            raise ValueError(self._invalid)
        self._body_seen = True
        sink = self.sink
        if sink is not None and data:
            sink.upstream_body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._complete or self._body_framing == FRAMING_CLOSE or self.tunnel:
            return
        # A trailer section may say `Connection: close` too: llhttp's verdict at the end wins.
        if not _should_keep_alive(self._parser):
            self.reusable = False
        self._complete = True

    # the request side

    def start(
        self,
        sink: ResponseSink,
        head_request: bool,
        upgrade: bool,
        max_head: int,
        max_headers: int,
    ) -> None:
        """Carry one request for `sink`; the caller then writes the request bytes.

        `max_head` and `max_headers` bound the response head (the request's limits).
        """
        self.sink = sink
        if self.read_paused:
            # A pooled connection paused by its previous request's slow client.
            self.resume_reading()
        self.head_request = head_request
        self.upgrade_asked = upgrade
        self.max_head = max_head
        self.max_headers = max_headers
        self._invalid = ""
        self._complete = False
        self._raw = 0
        self._headers = []
        self._te = None
        self._has_length = False
        self._connection = []
        self.got_bytes = False
        self.reusable = False
        self._interim = False
        self._body_framing = FRAMING_LENGTH
        self.uses += 1

    def send_head(self, ex: OutgoingRequest) -> None:
        """The request line and fields."""
        self.write(ex.http1_head())

    def send_body(self, data: bytes, chunked: bool) -> None:
        """A piece of the request body, as a chunk when the body's length is not known."""
        if chunked:
            self.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.write(data)

    def end_body(self, chunked: bool, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """The request body is complete: only a chunked body says so on the wire, with the
        request's trailers in its trailer section (a body of known length has none)."""
        if chunked:
            self.write(last_chunk(trailers) if trailers else b"0\r\n\r\n")

    def detach(self) -> None:
        """Stop reporting to the current sink (the client went away)."""
        self.sink = None
        self.reusable = False

    def pause_reading(self) -> None:
        """Backpressure from the client side."""
        self.read_paused = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        """The client drained its buffer."""
        self.read_paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        """Close the connection (buffered bytes are still flushed)."""
        self.reusable = False
        self.flush()
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.reusable = False
        transport = self.transport
        if transport is not None:
            transport.abort()


class EndpointPool:
    """Idle connections, requests in flight and health of one endpoint."""

    __slots__ = (
        "active_up",
        "address",
        "batcher",
        "connections",
        "draining",
        "ejection",
        "endpoint",
        "healthy",
        "idle",
        "in_flight",
        "server_name",
        "ssl",
        "tls",
        "upstream",
    )

    def __init__(
        self,
        upstream: str,
        endpoint: Endpoint,
        batcher: WriteBatcher,
        tls: UpstreamTls | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream
        # TLS to this endpoint: the settings (to tell a changed upstream apart on reload) and
        # the context built from them; None: plain TCP.
        self.tls = tls
        self.ssl = ssl_context
        self.server_name = (tls.server_name if tls is not None else None) or endpoint.host
        self.batcher = batcher
        self.endpoint = endpoint
        self.address = endpoint.address
        self.idle: list[UpstreamConnection] = []
        self.connections: set[UpstreamConnection] = set()
        self.in_flight = 0
        # `healthy` is what request routing reads: the active check says up and passive
        # ejection is not in force. `refresh` recomputes it when either changes.
        self.healthy = True
        self.active_up = True
        # Passive ejection (health.EjectionRule, driven by Pools.passive_result).
        self.ejection = CLEAR
        self.draining = False

    def refresh(self, now: float) -> None:
        """Recompute `healthy` from the active check and passive ejection."""
        self.healthy = self.active_up and not self.ejection.out(now)

    def take_idle(self, now: float) -> UpstreamCarrier | None:
        """The warmest idle connection that is still open and fresh, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            if now - conn.idle_since > POOL_IDLE_TIMEOUT:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamCarrier:
        """Open a new connection (the caller bounds the time)."""
        endpoint = self.endpoint
        if self.ssl is None:
            _, protocol = await loop.create_connection(
                lambda: UpstreamConnection(self), endpoint.host, endpoint.port
            )
        else:
            # A failed handshake raises ssl.SSLError: the caller counts it as kind "tls".
            _, protocol = await loop.create_connection(
                lambda: UpstreamConnection(self),
                endpoint.host,
                endpoint.port,
                ssl=self.ssl,
                server_hostname=self.server_name,
            )
        self.connections.add(protocol)
        return protocol

    def release(self, carrier: UpstreamCarrier, now: float) -> None:
        """Return a connection after a response; keep it only if it can carry another."""
        conn = cast(UpstreamConnection, carrier)
        transport = conn.transport
        if (
            conn.reusable
            and not self.draining
            and transport is not None
            and not transport.is_closing()
            # Request bytes still unsent (the endpoint answered early): not reusable.
            and conn.out is None
            and not transport.get_write_buffer_size()
            and len(self.idle) < POOL_MAX_IDLE
        ):
            conn.idle_since = now
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the pool."""
        self.connections.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close idle connections past the pool's idle timeout."""
        idle = self.idle
        if idle and now - idle[0].idle_since > POOL_IDLE_TIMEOUT:
            keep = [c for c in idle if now - c.idle_since <= POOL_IDLE_TIMEOUT]
            for conn in idle:
                if now - conn.idle_since > POOL_IDLE_TIMEOUT:
                    conn.close()
            self.idle[:] = keep

    def drain(self) -> None:
        """Take no new requests; close idle connections now, busy ones when their request ends."""
        self.draining = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def close_all(self) -> None:
        """End every connection, busy ones too (end of a drain period).

        Requests still running are told first, so a WebSocket can leave with a close frame.
        """
        self.draining = True
        for conn in list(self.connections):
            sink = conn.sink
            if sink is not None:
                sink.go_away()
            conn.abort()
        self.idle.clear()


class UpstreamPool:
    """The endpoints of one upstream in one worker."""

    __slots__ = ("endpoints", "name", "spec")

    def __init__(self, spec: UpstreamSpec, endpoints: tuple[EndpointPool, ...]) -> None:
        self.spec = spec
        self.name = spec.name
        self.endpoints = endpoints

    def pick(self, rand: float, exclude: set[EndpointPool] | None) -> tuple[EndpointPool, bool]:
        """The endpoint for the next attempt: healthy, fewest in flight, not tried yet if possible.

        Returns the endpoint and whether the choice failed open (no healthy endpoint).
        """
        endpoints = self.endpoints
        if len(endpoints) == 1:
            only = endpoints[0]
            return only, not only.healthy
        candidates = endpoints
        if exclude:
            remaining = tuple(e for e in endpoints if e not in exclude)
            if remaining:
                candidates = remaining
        index, failed_open = pick_endpoint(
            [e.in_flight for e in candidates], [e.healthy for e in candidates], rand
        )
        return candidates[index], failed_open
