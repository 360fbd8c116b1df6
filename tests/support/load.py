"""A small asyncio load generator, and the keep-alive HTTP/1.1 client it is built on.

`Load` runs N concurrent clients, each on its own keep-alive connection, sending GETs in a loop
until it is stopped or a request count is reached. Every request leaves one `Outcome`: the
status, which upstream answered (the `X-Upstream` header the fake upstreams set), the error with
its exception text, and when the request started and ended on `time.monotonic()` -- the clock
the tests use for their own timestamps, so a response can be checked against the config
generation that was in force while it was on the wire. A client whose connection the server
closes reconnects for its next request and counts its connections, so a test can also see
whether keep-alive connections survived.

`BackgroundLoad` runs a `Load` on its own event loop in a thread, so that a synchronous test can
reload, signal and poll Turnout while the load goes on.

`HttpClient` is one keep-alive connection with a deadline on every read; besides whole
request/response exchanges it can stream a response body piece by piece (to hold a download
open across reloads) and wait for the server to close the connection.

At the end, the few admin-API calls the reload tests make between requests (`admin_call`,
`wait_generation`), `ConfigLayout` (a config file whose changes the test decides the file watch
sees or not), to run with `tests.support.turnout.launch`.

Only 127.0.0.1 is contacted; every read has a deadline; a count or the caller's stop bounds a
run.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httptools
import orjson
import uvloop

from tests.support import wait_until

LOOPBACK = "127.0.0.1"
READ_SIZE = 65536
DEFAULT_TIMEOUT = 10.0

Headers = Sequence[tuple[str, str]]


class ResponseBroken(ConnectionError):
    """The connection ended (or broke) before the response was complete."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One complete response; header names are lower-cased."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        lower = name.lower()
        for key, value in self.headers:
            if key == lower:
                return value
        return None


class _Message:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_done = False
        self.done = False
        self.keep_alive = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = int(self.parser.get_status_code())
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def build_request(
    method: str, path: str, host: str, headers: Headers = (), body: bytes = b""
) -> bytes:
    """A request head (Host and, with a body, Content-Length added) followed by the body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpClient:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:`port`; reconnects when it was closed.

    Every wait is bounded by `timeout` seconds (TimeoutError). A response the server marks
    `Connection: close` (or HTTP/1.0 without keep-alive) closes the connection after it.
    """

    def __init__(self, port: int, *, host: str = LOOPBACK, timeout: float = DEFAULT_TIMEOUT):
        self.port = port
        self.host = host
        self.timeout = timeout
        self.connections = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._message: _Message | None = None

    @property
    def connected(self) -> bool:
        """True while a connection is open (as far as this side knows)."""
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Open a new connection (closing any previous one)."""
        self.close()
        async with asyncio.timeout(self.timeout):
            self._reader, self._writer = await asyncio.open_connection(LOOPBACK, self.port)
        self.connections += 1

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self._message = None

    async def request(
        self, method: str, path: str, headers: Headers = (), body: bytes = b""
    ) -> HttpResponse:
        """Send one request and read its complete response."""
        await self.send(method, path, headers, body)
        message = self._message
        assert message is not None
        async with asyncio.timeout(self.timeout):
            while not message.done:
                await self._feed(message)
        return self._complete(message)

    async def send(self, method: str, path: str, headers: Headers = (), body: bytes = b"") -> None:
        """Send a request without waiting for the response (see `read_head`, `read_body`)."""
        if not self.connected:
            await self.connect()
        writer = self._writer
        assert writer is not None
        self._message = _Message()
        writer.write(build_request(method, path, f"{self.host}:{self.port}", headers, body))
        async with asyncio.timeout(self.timeout):
            await writer.drain()

    async def read_head(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the head of the response to the last `send`: (status, headers)."""
        message = self._message
        assert message is not None, "no request sent"
        async with asyncio.timeout(self.timeout):
            while not message.head_done:
                await self._feed(message)
        return message.status, list(message.headers)

    async def read_body(self, at_most: int = READ_SIZE) -> bytes:
        """The next piece of the response body (up to `at_most` bytes); b"" once it ended.

        Bytes are only read off the socket when nothing is pending, so a caller that stops
        calling holds the stream back (TCP backpressure all the way to the upstream).
        """
        message = self._message
        assert message is not None, "no request sent"
        async with asyncio.timeout(self.timeout):
            while not message.body and not message.done:
                await self._feed(message)
        piece = bytes(message.body[:at_most])
        del message.body[:at_most]
        if not piece and message.done:
            self._complete(message)
        return piece

    async def wait_closed(self, seconds: float) -> bool:
        """Wait up to `seconds` for the server to close (EOF or reset); bytes are discarded.

        True when the connection ended in time, False when it was still open at the deadline.
        """
        reader = self._reader
        if reader is None:
            return True
        try:
            async with asyncio.timeout(seconds):
                while await reader.read(READ_SIZE):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        self.close()
        return True

    async def _feed(self, message: _Message) -> None:
        reader = self._reader
        if reader is None:
            raise ResponseBroken("the connection is closed")
        data = await reader.read(READ_SIZE)
        if not data:
            self.close()
            where = "in the body" if message.head_done else "before the response head"
            raise ResponseBroken(f"connection closed by the server {where}")
        message.parser.feed_data(data)

    def _complete(self, message: _Message) -> HttpResponse:
        if not message.keep_alive:
            self.close()
        self._message = None
        return HttpResponse(
            message.status, message.headers, bytes(message.body), message.keep_alive
        )


# -- the load generator ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of a `Load`: what came back (or what went wrong) and when."""

    client: int
    connection: int  # the client's connection serial: 1 while keep-alive holds
    started: float  # time.monotonic() just before the request was written
    finished: float  # time.monotonic() after its response ended (or it failed)
    status: int  # 0 when no response came
    upstream: str  # the upstream header's value, "" when absent
    error: str  # "" on success, else "ExceptionType: text"

    @property
    def ok(self) -> bool:
        """A complete 2xx response."""
        return not self.error and 200 <= self.status < 300

    @property
    def latency(self) -> float:
        """Seconds from sending to the end of the response."""
        return self.finished - self.started


class Load:
    """`clients` concurrent keep-alive clients sending GET `path` until stopped.

    `count` bounds the total number of requests; `pause` is each client's rest between two
    requests (it keeps the load modest on a shared machine); `timeout` bounds every request.
    `stop()` may be called from any thread: clients finish the request they are on and end.
    """

    def __init__(
        self,
        port: int,
        *,
        clients: int = 50,
        path: str = "/",
        headers: Headers = (),
        count: int | None = None,
        pause: float = 0.0,
        timeout: float = DEFAULT_TIMEOUT,
        upstream_header: str = "x-upstream",
    ) -> None:
        self.port = port
        self.clients = clients
        self.path = path
        self.headers = tuple(headers)
        self.count = count
        self.pause = pause
        self.timeout = timeout
        self.upstream_header = upstream_header.lower()
        self.outcomes: list[Outcome] = []
        self._issued = 0
        self._stopping = False

    def stop(self) -> None:
        """Ask every client to end after its current request (thread-safe)."""
        self._stopping = True

    @property
    def done(self) -> int:
        """Requests finished so far."""
        return len(self.outcomes)

    async def run(self) -> list[Outcome]:
        """Run every client until `stop()` or the count; the outcomes, in completion order."""
        await asyncio.gather(*(self._client(index) for index in range(self.clients)))
        return self.outcomes

    def _take_ticket(self) -> bool:
        if self._stopping:
            return False
        if self.count is not None and self._issued >= self.count:
            return False
        self._issued += 1
        return True

    async def _client(self, index: int) -> None:
        client = HttpClient(self.port, timeout=self.timeout)
        try:
            while self._take_ticket():
                started = time.monotonic()
                try:
                    response = await client.request("GET", self.path, self.headers)
                except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                    client.close()
                    self.outcomes.append(
                        Outcome(
                            index,
                            client.connections,
                            started,
                            time.monotonic(),
                            0,
                            "",
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
                else:
                    self.outcomes.append(
                        Outcome(
                            index,
                            client.connections,
                            started,
                            time.monotonic(),
                            response.status,
                            response.header(self.upstream_header) or "",
                            "",
                        )
                    )
                if self.pause:
                    await asyncio.sleep(self.pause)
        finally:
            client.close()


class BackgroundLoad:
    """Runs a `Load` on its own event loop (uvloop) in a daemon thread; a context manager."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self.load.run())
        except BaseException as exc:  # re-raised in the test's thread by stop()
            self._error = exc

    def start(self) -> BackgroundLoad:
        """Start the clients."""
        self._thread.start()
        return self

    @property
    def done(self) -> int:
        """Requests finished so far."""
        return self.load.done

    def wait_for_more(self, more: int, *, timeout: float = 15.0, what: str = "") -> None:
        """Wait until `more` further requests have finished (bounded)."""
        target = self.load.done + more
        wait_until(
            lambda: self.load.done >= target or not self._thread.is_alive(),
            timeout=timeout,
            what=what or f"{more} more requests under load",
        )
        assert self.load.done >= target, f"the load stopped early: {self._error!r}"

    def wait_for_total(self, total: int, *, timeout: float = 15.0) -> None:
        """Wait until `total` requests have finished since the start (bounded): unlike
        `wait_for_more`, not raced by requests that finish before the call."""
        wait_until(
            lambda: self.load.done >= total or not self._thread.is_alive(),
            timeout=timeout,
            what=f"{total} requests under load",
        )
        assert self.load.done >= total, f"the load stopped early: {self._error!r}"

    def stop(self, timeout: float = 30.0) -> list[Outcome]:
        """Stop, wait for in-flight requests to finish, and return every outcome."""
        self.load.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the load did not stop within {timeout}s")
        if self._error is not None:
            raise self._error
        return list(self.load.outcomes)

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.load.stop()
        self._thread.join(30.0)


# -- summaries -------------------------------------------------------------------------------


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Every outcome that is not a complete 2xx response."""
    return [outcome for outcome in outcomes if not outcome.ok]


def describe(outcomes: Sequence[Outcome], *, limit: int = 10) -> str:
    """A short human summary for assertion messages: counts, then the first failures."""
    statuses = Counter(outcome.status for outcome in outcomes)
    upstreams = Counter(outcome.upstream for outcome in outcomes)
    failed = failures(outcomes)
    errors = Counter(outcome.error for outcome in failed if outcome.error)
    lines = [
        f"{len(outcomes)} requests, {len(failed)} failed; statuses {dict(statuses)}; "
        f"upstreams {dict(upstreams)}"
    ]
    lines += [f"  {count} x {error}" for error, count in errors.most_common(limit)]
    for outcome in failed[:limit]:
        lines.append(f"  e.g. {outcome}")
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile `q` (0..100) of `values` (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts and latency percentiles (ms) of a run, for reports."""
    latencies = [outcome.latency for outcome in outcomes if outcome.ok]
    return {
        "requests": len(outcomes),
        "failed": len(failures(outcomes)),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
    }


# -- the admin API and the process, as the reload tests drive them ---------------------------


def admin_call(admin_url: str, method: str, path: str, *, timeout: float = 10.0) -> tuple[int, Any]:
    """One admin request: (status, JSON body or None)."""
    request = urllib.request.Request(f"{admin_url}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), exc.read()
    return status, orjson.loads(body) if body else None


def admin_text(admin_url: str, path: str, *, timeout: float = 10.0) -> tuple[int, str]:
    """One admin GET whose answer is text (/metrics): (status, body)."""
    try:
        with urllib.request.urlopen(f"{admin_url}{path}", timeout=timeout) as response:
            return int(response.status), response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def admin_config(admin_url: str) -> dict[str, Any]:
    """GET /admin/config (asserting 200)."""
    status, body = admin_call(admin_url, "GET", "/admin/config")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def at_generation(view: dict[str, Any], generation: int) -> bool:
    """The supervisor and every worker of an /admin/config view are at `generation`."""
    workers = view.get("workers", [])
    return (
        view["generation"] == generation
        and bool(workers)
        and all(worker["generation"] == generation for worker in workers)
    )


def wait_generation(admin_url: str, generation: int, *, timeout: float = 15.0) -> float:
    """Wait until the supervisor and every worker report `generation`; monotonic time seen."""
    wait_until(
        lambda: at_generation(admin_config(admin_url), generation),
        timeout=timeout,
        what=f"every worker at generation {generation}",
    )
    return time.monotonic()


class ConfigLayout:
    """`turnout.yaml` as a symlink into `versions/`, so the test chooses who sees a change.

    The watch looks at `turnout.yaml`'s own folder, not into others: replacing the file *inside*
    `versions/` is seen only by an explicit reload (POST /admin/reload, SIGHUP), while swapping
    the symlink itself is an event on `turnout.yaml` that the watch reloads on. Both replace
    atomically (rename), so no reader ever sees a half-written file.
    """

    def __init__(self, folder: Path, text: str) -> None:
        self.link = folder / "turnout.yaml"
        self.versions = folder / "versions"
        self.versions.mkdir()
        self.serial = 0
        self.target = "v0.yaml"
        (self.versions / self.target).write_text(text, encoding="utf-8")
        self.link.symlink_to(Path("versions") / self.target)

    def write_unwatched(self, text: str) -> None:
        """Replace the file the link points to; only POST /admin/reload or SIGHUP notice."""
        temporary = self.versions / ".next.yaml"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.versions / self.target)

    def write_watched(self, text: str) -> None:
        """Point the link at a new file (a rename in the watched folder)."""
        self.serial += 1
        self.target = f"v{self.serial}.yaml"
        (self.versions / self.target).write_text(text, encoding="utf-8")
        temporary = self.link.with_name(".turnout.yaml.next")
        temporary.symlink_to(Path("versions") / self.target)
        os.replace(temporary, self.link)
