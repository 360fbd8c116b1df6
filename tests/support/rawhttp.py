"""Raw HTTP/1.1 over a blocking socket, with a deadline on every read.

The tests use this where a client library would hide what is on the wire: the exact header
lines, the framing (Content-Length, chunked, close-delimited), interim 1xx responses,
pipelining, and whether the peer closed the connection. It never normalises what it reads and it
never waits without a deadline.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import orjson

DEFAULT_DEADLINE = 10.0

Framing = Literal["content-length", "chunked", "close", "none"]
Headers = list[tuple[str, str]]


class ResponseError(AssertionError):
    """The peer sent something that is not a valid HTTP/1.1 response, or sent it too late."""


@dataclass
class RawResponse:
    """One response message exactly as received.

    `complete` is False only when the caller allowed an incomplete body and the connection ended
    before the framing said the body was over (fewer bytes than Content-Length, or no
    terminating chunk).
    """

    version: str
    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    framing: Framing = "none"
    complete: bool = True
    trailers: Headers = field(default_factory=list)
    head: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order received."""
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


def build_request(
    method: str,
    path: str,
    headers: Headers | None = None,
    body: bytes | None = None,
    *,
    host: str | None = "turnout.test",
    version: str = "HTTP/1.1",
) -> bytes:
    """Format a request head (and body). Host and Content-Length are added unless given."""
    lines = [f"{method} {path} {version}"]
    given = {name.lower() for name, _ in headers or []}
    if host is not None and "host" not in given:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers or [])
    if body is not None and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(parts: list[bytes]) -> bytes:
    """Encode `parts` as a chunked body, terminating chunk included (empty parts skipped)."""
    out = bytearray()
    for part in parts:
        if part:
            out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    out += b"0\r\n\r\n"
    return bytes(out)


class RawConnection:
    """A blocking client socket with a receive buffer; every read has a deadline."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", *, deadline: float = DEFAULT_DEADLINE
    ) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection((host, port), timeout=deadline)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.eof = False
        self.reset = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send all of `data`."""
        self.sock.sendall(data)

    # -- reading -------------------------------------------------------------------------------

    def _fill(self, until: float) -> bool:
        """Receive more bytes into the buffer; False on EOF or reset. Raises after `until`."""
        if self.eof:
            return False
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise ResponseError(f"deadline passed; buffered so far: {bytes(self._buf)[:300]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise ResponseError(
                f"no data before the deadline; buffered so far: {bytes(self._buf)[:300]!r}"
            ) from None
        except ConnectionResetError:
            self.eof = True
            self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def _read_line(self, until: float) -> bytes | None:
        """One CRLF-terminated line without the CRLF; None on EOF before a full line."""
        while True:
            index = self._buf.find(b"\r\n")
            if index >= 0:
                line = bytes(self._buf[:index])
                del self._buf[: index + 2]
                return line
            if not self._fill(until):
                return None

    def _read_exact(self, count: int, until: float) -> tuple[bytes, bool]:
        """Up to `count` bytes; the flag says whether all of them arrived before EOF."""
        while len(self._buf) < count:
            if not self._fill(until):
                break
        data = bytes(self._buf[:count])
        del self._buf[:count]
        return data, len(data) == count

    def _read_head(self, until: float) -> bytes:
        while True:
            index = self._buf.find(b"\r\n\r\n")
            if index >= 0:
                head = bytes(self._buf[: index + 4])
                del self._buf[: index + 4]
                return head
            if not self._fill(until):
                raise ResponseError(
                    f"connection closed before a full response head: {bytes(self._buf)[:300]!r}"
                )

    def read_response(
        self,
        method: str = "GET",
        *,
        deadline: float | None = None,
        allow_incomplete: bool = False,
    ) -> RawResponse:
        """Read the next response message (an interim 1xx counts as one message)."""
        until = time.monotonic() + (self.deadline if deadline is None else deadline)
        head = self._read_head(until)
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ResponseError(f"bad status line {status_line!r}")
        headers: Headers = []
        for raw in lines[1:]:
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise ResponseError(f"bad response header line {raw!r}")
            headers.append((name, value.strip(" \t")))
        response = RawResponse(
            version=parts[0],
            status=int(parts[1]),
            reason=parts[2] if len(parts) > 2 else "",
            headers=headers,
            head=head,
        )
        self._read_body(response, method, until, allow_incomplete)
        return response

    def _read_body(
        self, response: RawResponse, method: str, until: float, allow_incomplete: bool
    ) -> None:
        status = response.status
        if method == "HEAD" or status < 200 or status in (204, 304):
            response.framing = "none"
            return
        transfer = [
            token.strip().lower()
            for value in response.header_values("transfer-encoding")
            for token in value.split(",")
        ]
        lengths = {value.strip() for value in response.header_values("content-length")}
        if transfer and lengths:
            raise ResponseError("response has both Transfer-Encoding and Content-Length")
        if transfer and transfer[-1] == "chunked":
            response.framing = "chunked"
            self._read_chunked(response, until)
        elif lengths and not transfer:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise ResponseError(f"bad Content-Length {sorted(lengths)}")
            response.framing = "content-length"
            response.body, response.complete = self._read_exact(int(next(iter(lengths))), until)
        else:
            response.framing = "close"
            while self._fill(until):
                pass
            response.body = bytes(self._buf)
            self._buf.clear()
        if not response.complete and not allow_incomplete:
            raise ResponseError(
                f"connection ended inside a {response.framing} body after "
                f"{len(response.body)} bytes; head: {response.head!r}"
            )

    def _read_chunked(self, response: RawResponse, until: float) -> None:
        body = bytearray()
        while True:
            line = self._read_line(until)
            if line is None:
                response.body, response.complete = bytes(body), False
                return
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ResponseError(f"bad chunk size line {line!r}") from None
            if size == 0:
                break
            data, whole = self._read_exact(size, until)
            body += data
            crlf = self._read_line(until) if whole else None
            if crlf is None:
                response.body, response.complete = bytes(body), False
                return
            if crlf != b"":
                raise ResponseError(f"chunk not followed by CRLF: {crlf!r}")
        while True:
            trailer = self._read_line(until)
            if trailer is None:
                response.body, response.complete = bytes(body), False
                return
            if trailer == b"":
                break
            name, _, value = trailer.decode("latin-1").partition(":")
            response.trailers.append((name, value.strip()))
        response.body = bytes(body)

    def read_final_response(
        self,
        method: str = "GET",
        *,
        deadline: float | None = None,
        allow_incomplete: bool = False,
    ) -> tuple[list[RawResponse], RawResponse]:
        """Skip interim 1xx responses; return them and the final response."""
        interim: list[RawResponse] = []
        while True:
            response = self.read_response(
                method, deadline=deadline, allow_incomplete=allow_incomplete
            )
            if response.status >= 200 or response.status == 101:
                return interim, response
            interim.append(response)

    def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
        *,
        host: str | None = "turnout.test",
        version: str = "HTTP/1.1",
    ) -> RawResponse:
        """Send one request and return its final response."""
        self.send(build_request(method, path, headers, body, host=host, version=version))
        return self.read_final_response(method)[1]

    def wait_closed(self, deadline: float | None = None) -> bool:
        """Wait for the peer to close (EOF or reset). Bytes that arrive meanwhile are buffered.

        True when the connection ended before the deadline, False when it was still open then.
        """
        until = time.monotonic() + (self.deadline if deadline is None else deadline)
        try:
            while self._fill(until):
                pass
        except ResponseError:
            return False
        return True

    def closed_already(self) -> bool:
        """Whether the peer has closed by now, without waiting. Bytes already there are
        buffered."""
        while not self.eof:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            self._fill(time.monotonic() + self.deadline)
        return True

    @property
    def buffered(self) -> bytes:
        """Bytes received but not consumed by a read."""
        return bytes(self._buf)


def announces_close(response: RawResponse) -> bool:
    """Whether the response says the connection ends after it (RFC 9112 section 9.3): a
    `Connection: close`, an HTTP/1.0 response without keep-alive, or a close-delimited body."""
    tokens = {
        token.strip().lower()
        for value in response.header_values("connection")
        for token in value.split(",")
    }
    if "close" in tokens or response.framing == "close":
        return True
    return response.version == "HTTP/1.0" and "keep-alive" not in tokens


def send_raw(
    port: int,
    data: bytes,
    *,
    method: str = "GET",
    deadline: float = DEFAULT_DEADLINE,
) -> tuple[RawResponse, bool]:
    """Send `data` on a fresh connection; the final response and whether the peer then closed.

    Returns as soon as the answer is settled. A response that announces the close (see
    `announces_close`) is followed by a wait for it, up to `deadline`: the flag says whether
    the peer kept its word. A response that keeps the connection alive is not waited on: the
    flag says whether the peer had closed by then (to see a late close, use
    `RawConnection.wait_closed`).
    """
    with RawConnection(port, deadline=deadline) as conn:
        conn.send(data)
        _, response = conn.read_final_response(method)
        if announces_close(response):
            return response, conn.wait_closed(deadline)
        return response, conn.closed_already()


def get(
    port: int,
    path: str,
    headers: Headers | None = None,
    *,
    host: str = "turnout.test",
    deadline: float = DEFAULT_DEADLINE,
) -> RawResponse:
    """One GET on a fresh connection."""
    with RawConnection(port, deadline=deadline) as conn:
        return conn.request("GET", path, headers, host=host)
