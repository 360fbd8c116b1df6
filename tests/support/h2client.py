"""A raw HTTP/2 client for tests: h2's state machine over a blocking socket, so a test controls
every frame (what is sent, what is acknowledged) and sees every frame Turnout sends back.

`RawH2(port)` connects (h2c with prior knowledge, or TLS with ALPN h2 given an ssl context),
sends the preface, and collects events; `events_until(pred)` reads until `pred(event)` holds
or a deadline passes (AssertionError). Flow control is the test's business: nothing is
acknowledged unless the test calls `ack`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from h2.connection import ConnectionState

READ_DEADLINE = 10.0


class RawH2:
    """One client connection; see the module docstring."""

    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        settings: dict[int, int] | None = None,
        validate: bool = True,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=READ_DEADLINE)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (
            tls.wrap_socket(raw, server_hostname=server_name) if tls is not None else raw
        )
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.events: list[h2.events.Event] = []
        self.pending = b""
        self.error: h2.exceptions.ProtocolError | None = None  # what ended our side
        self.closed = False
        self.flush()

    # -- sending -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        """Bytes that h2 did not make (hand-built frames)."""
        self.sock.sendall(data)

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "app.test",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        """Open a stream with a request; returns its id. `end=False` leaves the body open."""
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *(headers or []),
        ]
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def reset_burst(self, path: str, count: int) -> None:
        """Open `count` streams and reset each at once (rapid reset), sent in one write: the
        server answers the whole burst, never a client still writing into a closed socket."""
        for _ in range(count):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                sid,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"a"),
                    (b":path", path.encode()),
                ],
                end_stream=True,
            )
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def send_body(self, sid: int, data: bytes, *, end: bool = True) -> None:
        """Send `data` on stream `sid` as the server's windows allow (reading meanwhile)."""
        until = time.monotonic() + READ_DEADLINE
        while data:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                if time.monotonic() > until or not self.read_once():
                    raise AssertionError(f"stream {sid}: the server's window stayed shut")
                continue
            chunk, data = data[:window], data[window:]
            self.conn.send_data(sid, chunk)
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def ack(self, sid: int, size: int) -> None:
        """Give `size` bytes back to the server's window of stream `sid` and the connection."""
        if size:
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                self.conn.increment_flow_control_window(size, sid)
            self.conn.increment_flow_control_window(size)
            self.flush()

    # -- receiving ---------------------------------------------------------------------------

    def read_once(self) -> bool:
        """One read; False once the server closed the connection."""
        if self.closed:
            return False
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.pending += data
        # Fed one frame at a time: h2 refuses every frame after a GOAWAY, but a graceful
        # GOAWAY lets the streams it names go on, so its state is set back to open.
        while len(self.pending) >= 9:
            size = 9 + int.from_bytes(self.pending[:3], "big")
            if len(self.pending) < size:
                break
            frame, self.pending = self.pending[:size], self.pending[size:]
            try:
                events = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError as exc:
                self.error = exc
                self.closed = True
                return False
            self.events += events
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                self.conn.state_machine.state = ConnectionState.CLIENT_OPEN
        self.flush()
        return True

    def events_until(
        self, pred: Callable[[h2.events.Event], bool], deadline: float = READ_DEADLINE
    ) -> h2.events.Event:
        """Read until an event matching `pred` arrives (searching those already seen first)."""
        until = time.monotonic() + deadline
        seen = 0
        while True:
            for event in self.events[seen:]:
                if pred(event):
                    return event
            seen = len(self.events)
            if time.monotonic() > until:
                raise AssertionError(f"no matching event in {deadline}s; got {self.events}")
            if not self.read_once() and seen == len(self.events):
                raise AssertionError(f"connection closed; events: {self.events}")

    def response(self, sid: int, *, auto_ack: bool = True) -> tuple[int, dict[bytes, bytes], bytes]:
        """Wait for the whole response of stream `sid`: status, fields, body."""
        head: dict[bytes, bytes] = {}
        body: list[bytes] = []
        until = time.monotonic() + READ_DEADLINE
        index = 0
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if getattr(event, "stream_id", None) != sid:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    head = dict(event.headers or [])
                elif isinstance(event, h2.events.DataReceived):
                    body.append(event.data or b"")
                    if auto_ack:
                        self.ack(sid, event.flow_controlled_length or 0)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream {sid} reset: {event.error_code!r}")
                if isinstance(event, h2.events.StreamEnded):
                    return int(head[b":status"]), head, b"".join(body)
            if time.monotonic() > until or not self.read_once():
                raise AssertionError(f"no whole response on stream {sid}; events {self.events}")

    def goaway(self, deadline: float = READ_DEADLINE) -> h2.events.ConnectionTerminated:
        """Wait for the server's GOAWAY."""
        event = self.events_until(lambda e: isinstance(e, h2.events.ConnectionTerminated), deadline)
        assert isinstance(event, h2.events.ConnectionTerminated)
        return event

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
