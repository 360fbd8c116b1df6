"""Fake upstream servers for the integration tests, all on 127.0.0.1 with OS-chosen ports.

They run on an event loop in a background thread (`UpstreamHost`), so that a test may block its
own thread (raw sockets, subprocess waits) without stalling the upstreams, and so that module-
or session-scoped fixtures can share them across tests whose event loops are function-scoped.

- `EchoUpstream` (aiohttp) answers JSON describing the request it saw, plus a few special paths
  chosen by the *last* path segments, so that they work behind any route prefix:
  `.../status/{code}`, `.../slow?ms=`, `.../bytes?n=` (chunked), `.../fixed?n=` (Content-Length),
  `.../sha?n=&seed=&mode=chunked|fixed`, `.../upload`, `.../slowupload?pause_ms=` (a pause
  per 256 KiB read), `.../cookies`, `.../ws` (WebSocket echo). Every response carries
  `X-Upstream: <name>`.
- `RawUpstream` speaks HTTP/1.1 by hand over asyncio streams for the faults a library would not
  produce: truncated bodies, resets, silent closes, HTTP/1.0 close-delimited bodies, hop-by-hop
  response headers. It records every request and counts connections.

Counters are plain ints and lists written on the upstream thread and read by tests; reads of a
single int or list length are atomic under the GIL, which is all the tests need.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import WSMsgType, web

T = TypeVar("T")
Headers = list[tuple[str, str]]

BLOCK = 65536
SLOW_READ_STEP = 256 * 1024


# -- deterministic payloads ------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _base_block(seed: str) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(BLOCK // 32))


def pattern_chunks(n: int, seed: str = "turnout") -> Iterator[bytes]:
    """`n` deterministic bytes in 64 KiB blocks; each block starts with its own index."""
    base = _base_block(seed)
    for index, offset in enumerate(range(0, n, BLOCK)):
        block = index.to_bytes(8, "big") + base[8:]
        yield block[: min(BLOCK, n - offset)]


def pattern_bytes(n: int, seed: str = "turnout") -> bytes:
    """All of `pattern_chunks(n, seed)` joined."""
    return b"".join(pattern_chunks(n, seed))


def pattern_sha256(n: int, seed: str = "turnout") -> str:
    """The hex sha256 of `pattern_bytes(n, seed)`, computed without holding it whole."""
    digest = hashlib.sha256()
    for chunk in pattern_chunks(n, seed):
        digest.update(chunk)
    return digest.hexdigest()


# -- the thread hosting every fake upstream --------------------------------------------------


class UpstreamHost:
    """An asyncio event loop in a daemon thread that runs the fake upstream servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[EchoUpstream | RawUpstream] = []
        self._thread = threading.Thread(target=self._run, name="fake-upstreams", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        """Run `coro` on the upstream loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def echo(self, name: str) -> EchoUpstream:
        """Start an echo upstream called `name`."""
        upstream = EchoUpstream(name)
        self.call(upstream.start())
        self._servers.append(upstream)
        return upstream

    def raw(self, name: str, mode: RawMode) -> RawUpstream:
        """Start a hand-written upstream with the behaviour `mode` (see `RawUpstream`)."""
        upstream = RawUpstream(name, mode)
        self.call(upstream.start())
        self._servers.append(upstream)
        return upstream

    def stop(self, upstream: EchoUpstream | RawUpstream) -> None:
        """Stop one upstream now (its port then refuses connections)."""
        if upstream in self._servers:
            self._servers.remove(upstream)
            self.call(upstream.stop())

    def close(self) -> None:
        """Stop every upstream, then the loop and its thread."""
        for upstream in list(self._servers):
            self.stop(upstream)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# -- the aiohttp echo upstream ---------------------------------------------------------------


class EchoUpstream:
    """An aiohttp server answering JSON about each request; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.requests = 0
        self.ws_close_codes: list[int | None] = []
        self.ws_sessions = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, as written in a Turnout config."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Bind 127.0.0.1:0 and serve."""
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_response_prepare.append(self._tag)
        # A handler ends when its client goes: a slow answer nobody waits for does not outlive
        # the test (nor leave its task pending when the loop closes).
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _tag(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Upstream"] = self.name

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        segments = request.path.split("/")
        last = segments[-1]
        if len(segments) >= 2 and segments[-2] == "status" and last.isdigit():
            return await self._status(request, int(last))
        handler = {
            "slow": self._slow,
            "bytes": self._bytes,
            "fixed": self._fixed,
            "sha": self._sha,
            "slowupload": self._slow_upload,
            "cookies": self._cookies,
            "ws": self._ws,
        }.get(last, self._echo)
        return await handler(request)

    async def describe(self, request: web.Request, *, pause_s: float = 0.0) -> dict[str, Any]:
        """Read the whole body (streamed) and describe the request.

        With `pause_s`, the body is read slowly: a pause after every 256 KiB.
        """
        digest = hashlib.sha256()
        length = 0
        unpaused = 0
        async for chunk in request.content.iter_chunked(BLOCK):
            digest.update(chunk)
            length += len(chunk)
            unpaused += len(chunk)
            if pause_s and unpaused >= SLOW_READ_STEP:
                unpaused = 0
                await asyncio.sleep(pause_s)
        return {
            "upstream": self.name,
            "method": request.method,
            "path": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in request.raw_headers
            ],
            "body_len": length,
            "body_sha256": digest.hexdigest(),
        }

    def _json(self, data: dict[str, Any], status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        return self._json(await self.describe(request))

    async def _status(self, request: web.Request, code: int) -> web.StreamResponse:
        described = await self.describe(request)
        if code in (204, 304):
            return web.Response(status=code)
        return self._json(described, status=code)

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        described = await self.describe(request)
        await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
        return self._json(described)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "0"))
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        for chunk in pattern_chunks(n, request.query.get("seed", "turnout")):
            for start in range(0, len(chunk), 16384):
                await response.write(chunk[start : start + 16384])
        await response.write_eof()
        return response

    async def _fixed(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "0"))
        return web.Response(
            body=pattern_bytes(n, request.query.get("seed", "turnout")),
            content_type="application/octet-stream",
        )

    async def _sha(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "0"))
        seed = request.query.get("seed", "turnout")
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        if request.query.get("mode", "chunked") == "fixed":
            response.content_length = n
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in pattern_chunks(n, seed):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _slow_upload(self, request: web.Request) -> web.StreamResponse:
        pause_s = int(request.query.get("pause_ms", "8")) / 1000
        return self._json(await self.describe(request, pause_s=pause_s))

    async def _cookies(self, request: web.Request) -> web.StreamResponse:
        await self.describe(request)
        response = web.Response(text="cookies\n")
        for value in ("a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3; Path=/; Secure"):
            response.headers.add("Set-Cookie", value)
        response.headers.add("X-Multi", "first")
        response.headers.add("X-Multi", "second")
        return response

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.ws_sessions += 1
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                if message.data.startswith("close-me:"):
                    await ws.close(code=int(message.data.split(":", 1)[1]), message=b"bye")
                    break
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        self.ws_close_codes.append(ws.close_code)
        return ws


# -- hand-written upstreams for faults -------------------------------------------------------


RawMode = Literal[
    "ok",
    "truncate_length",
    "truncate_chunked",
    "reset",
    "close_no_answer",
    "close_after_response",
    "connection_close",
    "http10",
    "hop_by_hop",
]


@dataclass
class RecordedRequest:
    """One request as a `RawUpstream` read it off the wire."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes
    raw: bytes = field(repr=False)

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


class BadRequestBytes(Exception):
    """The peer (the proxy) sent bytes that are not a request this reader understands."""


async def read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    """Read one request (head, then a Content-Length or chunked body); None on EOF before it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise BadRequestBytes(exc.partial) from None
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequestBytes(head)
    headers: Headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequestBytes(head)
        headers.append((name, value.strip()))
    lower = {name.lower(): value for name, value in headers}
    raw = bytearray(head)
    body = bytearray()
    if "chunked" in lower.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        break
                break
            data = await reader.readexactly(size + 2)
            raw += data
            body += data[:-2]
    elif "content-length" in lower:
        data = await reader.readexactly(int(lower["content-length"]))
        raw += data
        body += data
    return RecordedRequest(parts[0], parts[1], parts[2], headers, bytes(body), bytes(raw))


class RawUpstream:
    """A hand-written HTTP/1.1 upstream; `mode` says how it answers every request.

    - `ok`: 200 with a Content-Length body, keep-alive (also the recording sink and the
      connection counter for pooling tests).
    - `truncate_length`: promises Content-Length 1000, sends 100 bytes, closes.
    - `truncate_chunked`: a chunked body with no terminating chunk, then closes.
    - `reset`: reads the request, then resets the connection (SO_LINGER 0) before any byte.
    - `close_no_answer`: reads the request, then closes (FIN) without answering.
    - `close_after_response`: a keep-alive-looking response (no `Connection` header), then
      closes at once: the next request on that pooled connection would find it dead.
    - `connection_close`: answers with `Connection: close`, then closes.
    - `http10`: an HTTP/1.0 response with a close-delimited body.
    - `hop_by_hop`: a chunked response (with a trailer) carrying every hop-by-hop header.
    """

    def __init__(self, name: str, mode: RawMode) -> None:
        self.name = name
        self.mode: RawMode = mode
        self.port = 0
        self.connections = 0
        self.requests: list[RecordedRequest] = []
        self.unparsed: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, as written in a Turnout config."""
        return f"127.0.0.1:{self.port}"

    @property
    def body(self) -> bytes:
        """The complete body this upstream sends in the modes that answer normally."""
        return f"hello from {self.name}\n".encode()

    async def start(self) -> None:
        """Bind 127.0.0.1:0 and serve."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting and abort every open connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await read_request(reader)
                except BadRequestBytes as exc:
                    self.unparsed.append(bytes(exc.args[0]))
                    break
                except (asyncio.IncompleteReadError, ValueError) as exc:
                    self.unparsed.append(repr(exc).encode())
                    break
                if request is None:
                    break
                self.requests.append(request)
                if not await self._answer(request, writer):
                    break
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(self, request: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep reading requests on this connection."""
        body = self.body
        tag = f"X-Upstream: {self.name}\r\n"
        if self.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if self.mode == "close_no_answer":
            writer.close()
            return False
        if self.mode == "truncate_length":
            writer.write(
                f"HTTP/1.1 200 OK\r\n{tag}Content-Length: 1000\r\n\r\n".encode() + b"x" * 100
            )
            await writer.drain()
            writer.close()
            return False
        if self.mode == "truncate_chunked":
            writer.write(
                f"HTTP/1.1 200 OK\r\n{tag}Transfer-Encoding: chunked\r\n\r\n".encode()
                + b"64\r\n"
                + b"y" * 100
                + b"\r\n"
            )
            await writer.drain()
            writer.close()
            return False
        if self.mode == "http10":
            writer.write(f"HTTP/1.0 200 OK\r\n{tag}Content-Type: text/plain\r\n\r\n".encode())
            writer.write(body)
            await writer.drain()
            writer.close()
            return False
        if self.mode == "hop_by_hop":
            writer.write(
                (
                    "HTTP/1.1 200 OK\r\n"
                    f"{tag}"
                    "Connection: x-secret, keep-alive\r\n"
                    "X-Secret: 1\r\n"
                    "Keep-Alive: timeout=5\r\n"
                    "Proxy-Connection: keep-alive\r\n"
                    "Proxy-Authenticate: Basic realm=upstream\r\n"
                    "Trailer: X-Trail\r\n"
                    "Upgrade: h2c\r\n"
                    "X-Kept: yes\r\n"
                    "Transfer-Encoding: chunked\r\n"
                    "\r\n"
                ).encode()
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n0\r\nX-Trail: t\r\n\r\n"
            )
            await writer.drain()
            return True
        close = self.mode in ("close_after_response", "connection_close")
        connection = "Connection: close\r\n" if self.mode == "connection_close" else ""
        writer.write(
            f"HTTP/1.1 200 OK\r\n{tag}{connection}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        if close:
            writer.close()
            return False
        return True
