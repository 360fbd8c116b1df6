"""Shadow traffic: copies of sampled requests sent to a route's mirror upstream.

`routing.decide` samples the request; the data plane then calls `Mirrorer.start` and tees the
request body into the returned `MirrorCopy` as it streams it to the primary, and (with
`compare_json`) the primary's response too. Each copy is one task in a `TaskSet`, sending with
aiohttp (or as an HTTP/2 stream, below) to one endpoint of the shadow upstream (round-robin),
reading the shadow's answer to the end, and comparing it with the primary's.

What this module must never do: delay, fail or alter the primary exchange. So no method the
data plane calls awaits, blocks or raises (each is wrapped; a bug is logged and the copy is
given up), body chunks are queued rather than pushed (the shadow's speed never pauses the
client), a copy never holds more than `mirror.max_body` bytes of request body, copies in flight
are bounded per route, and each copy has its own total timeout.

Every started copy ends with exactly one outcome in `MirrorStats.outcomes`: `sent` (the shadow's
response came back whole), `error` (connect, reset or timeout; also: the shadow's endpoints
are resting after failed copies, see REST_AFTER), `dropped` (the route's copies in flight
were at `max_in_flight`; nothing was sent) or `skipped` (the body went over `max_body`, the
client went away before its body was complete, or an `OPTIONS *` / absolute-form target that a
copy cannot repeat). A shadow with `protocol: h2c | h2` (a gRPC service, say) gets its copies as
streams on the worker's own HTTP/2 connections to it (the pools the data plane uses), with the
same bounds, outcomes and comparisons.
Status mismatches count in `MirrorStats.mismatch`, JSON body mismatches (statuses equal,
bodies not) in `MirrorStats.body_mismatch`; both only for copies `sent`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
import orjson
from yarl import URL

from proxy.core import grpc
from proxy.core.counters import MirrorStats
from proxy.core.headers import field
from proxy.core.health import CLEAR, Ejection, EjectionRule, after_failure, after_success
from proxy.core.jsondiff import IgnorePaths, diff
from proxy.core.spec import Limits, Mirror, UpstreamSpec, UpstreamTls
from proxy.core.table import CompiledRoute
from proxy.dataplane.upstream import EndpointPool, UpstreamCarrier, UpstreamPool
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import TlsFileError, client_context

log = logging.getLogger("turnout.mirror")

MIRROR_HEADER = ("X-Turnout-Mirror", "1")
# Differing JSON paths named in one mismatch log line.
MISMATCH_SAMPLE = 5
# At most one mismatch log line per route and kind (status, body) per this many seconds: a
# shadow that differs on every request must not turn stderr writes into the event loop's
# bottleneck. The lines left out are counted in the next one.
LOG_INTERVAL = 1.0
# How long worker shutdown waits for cancelled copies to unwind.
CLOSE_WAIT = 1.0
# A shadow endpoint that failed this many copies in a row (refused, reset or broke the
# connection; timeouts do not count) rests: copies meant for it go to another endpoint, or are
# counted as `error` without a connection attempt, first for REST_BASE seconds, doubling on each
# failure after a rest up to REST_MAX; a whole response ends it. A failed copy costs a worker
# about as much CPU as proxying a request, so without this a broken shadow would tax the primary.
# Once rested, the endpoint rests again on its first failure (a copy after a rest is a probe).
REST_AFTER = 5
REST_BASE = 1.0
REST_MAX = 30.0
REST = EjectionRule(
    after=REST_AFTER, base=REST_BASE, cap=REST_MAX, again_after=1, success_ends=True
)

# Headers the copy must not take from the primary's list: framing is aiohttp's to write, and
# the mirror marker is set exactly once by us.
_NOT_COPIED = frozenset({b"transfer-encoding", b"x-turnout-mirror"})
# aiohttp adds these when absent; a copy carries the primary's headers and nothing else.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def is_json_type(content_type: str | None) -> bool:
    """True for `application/json` and any `+json` media type, parameters ignored."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class _GivenUp(Exception):
    """Raised into aiohttp's body writer so a given-up copy's request is cut, not ended."""


class _BodyStream:
    """The copy's request body as aiohttp reads it: chunks queued by `push`, never awaited.

    A plain async iterator rather than an async generator, so that a cancelled copy leaves no
    half-run generator for the garbage collector to finalise.
    """

    __slots__ = ("chunks", "ended", "given_up", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks: deque[bytes] = deque()
        self.ended = False
        self.given_up = False
        self.waiter: asyncio.Future[None] | None = None

    def push(self, chunk: bytes) -> None:
        """Queue a chunk and wake the reader if it waits."""
        self.chunks.append(chunk)
        self._wake()

    def end(self) -> None:
        """No more chunks will come."""
        self.ended = True
        self._wake()

    def discard(self) -> None:
        """Drop what is queued and fail the next read (the copy was given up).

        Ending the stream cleanly instead would let aiohttp finish the request, and the shadow
        would take a truncated body for a whole one.
        """
        self.chunks.clear()
        self.given_up = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self.chunks:
            if self.given_up:
                raise _GivenUp
            if self.ended:
                raise StopAsyncIteration
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        return self.chunks.popleft()


class _H2Request:
    """A copy's request as an HTTP/2 stream sends it (`upstream.OutgoingRequest`)."""

    __slots__ = (
        "added",
        "chunked_in",
        "content_length",
        "grpc",
        "host",
        "kept_headers",
        "method",
        "te_trailers",
        "url",
    )

    def __init__(
        self,
        method: str,
        url: bytes,
        kept_headers: list[tuple[bytes, bytes, bytes]],
        has_body: bool,
    ) -> None:
        self.method = method
        self.url = url
        self.kept_headers = kept_headers
        self.added: list[tuple[bytes, bytes]] = []
        fields = {lname: value for lname, _, value in kept_headers}
        self.host = fields.get(b"host")
        length = fields.get(b"content-length")
        self.content_length = int(length) if length is not None else None
        self.chunked_in = has_body and length is None
        self.grpc = grpc.is_grpc(fields.get(b"content-type", b""))
        self.te_trailers = self.grpc  # TE is hop-by-hop: the primary's was not copied

    def http1_head(self) -> bytes:
        """Never asked of an HTTP/2 stream."""
        raise NotImplementedError


class _H2Sink:
    """Where an HTTP/2 stream reports the shadow's answer (`upstream.ResponseSink`): the
    status, the body when it is kept for comparison, and how it ended (`done`: "" for a whole
    response, else why not)."""

    __slots__ = ("body", "done", "grpc_status", "limit", "size", "status", "want_body")

    def __init__(self, loop: asyncio.AbstractEventLoop, want_body: bool, limit: int) -> None:
        self.done: asyncio.Future[str] = loop.create_future()
        self.want_body = want_body
        self.limit = limit
        self.status = 0
        self.grpc_status = -1  # from a trailers-only head, or from the trailers
        self.body: list[bytes] | None = None
        self.size = 0

    def _end(self, why: str) -> None:
        if not self.done.done():
            self.done.set_result(why)

    def upstream_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        body_framing: int,
        keep_alive: bool,
        connection: list[bytes],
    ) -> None:
        self.status = status
        self.grpc_status = grpc.status_of(headers)
        if self.want_body:
            content_type = field(headers, b"content-type")
            if is_json_type(content_type.decode("latin-1") if content_type else None):
                self.body = []

    def upstream_body(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            body.append(data)
            self.size += len(data)
            if self.size > self.limit:
                self.body = None

    def upstream_trailers(self, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        code = grpc.status_of(headers)
        if code >= 0:
            self.grpc_status = code

    def upstream_complete(self) -> None:
        self._end("")

    def upstream_lost(self, got_response_bytes: bool) -> None:
        self._end("the stream broke")

    def upstream_invalid(self, reason: str) -> None:
        self._end(reason or "an invalid response")

    def upstream_interim(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        """Interim answers of the shadow are nobody's business."""

    def upstream_upgraded(self, rest: bytes) -> None:
        self._end("an upgrade")  # never asked for: copies are not upgrades

    def upstream_pause_writing(self) -> None:
        """The copy's body is bounded by max_body: it waits in the stream, not in the client."""

    def upstream_resume_writing(self) -> None:
        """See upstream_pause_writing."""

    def upstream_data(self, data: bytes) -> None:
        """No tunnel: see upstream_upgraded."""

    def go_away(self) -> None:
        self._end("the connection was closed under the copy")


class MirrorCopy:
    """One shadow copy of one request, fed by the data plane; see `Mirrorer.start`.

    The data plane reads `wants_primary_body` before teeing each primary response chunk into
    `primary_body`; it turns False when the body will not be compared (comparison off, the
    primary's answer is not JSON or is over `max_body`, or the copy failed).
    """

    __slots__ = (
        "_address",
        "_body_size",
        "_ended",
        "_grpc_compared",
        "_ignore",
        "_mirror",
        "_mirrorer",
        "_outcome",
        "_primary_chunks",
        "_primary_done",
        "_primary_grpc",
        "_primary_size",
        "_primary_status",
        "_request_id",
        "_route",
        "_shadow_body",
        "_shadow_grpc",
        "_shadow_status",
        "_stats",
        "_status_compared",
        "_stream",
        "_task",
        "wants_primary_body",
    )

    def __init__(
        self,
        mirrorer: Mirrorer,
        route: str,
        mirror: Mirror,
        stats: MirrorStats,
        ignore: IgnorePaths | None,
        request_id: str,
        stream: _BodyStream | None,
        address: str,
    ) -> None:
        self._mirrorer = mirrorer
        self._address = address
        self._route = route
        self._mirror = mirror
        self._stats = stats
        self._ignore = ignore
        self._request_id = request_id
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        self._outcome: str | None = None
        self._body_size = 0
        self._ended = stream is None
        self._primary_status = 0
        self._primary_done = False
        self._primary_chunks: list[bytes] | None = [] if ignore is not None else None
        self._primary_size = 0
        self._shadow_status = 0
        self._shadow_body: bytes | None = None
        self._status_compared = False
        # gRPC calls: the grpc-status of each side (-1 until known), compared once.
        self._primary_grpc = -1
        self._shadow_grpc = -1
        self._grpc_compared = False
        self.wants_primary_body = ignore is not None

    # ---- request side: called by the data plane ---------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """A request-body chunk, as the primary streams it; queued, never awaited."""
        try:
            stream = self._stream
            if stream is None or self._outcome is not None:
                return
            self._body_size += len(chunk)
            if self._body_size > self._mirror.max_body:
                self._give_up("skipped")
                return
            stream.push(chunk)
        except Exception:
            log.exception("feed failed (route %s)", self._route)
            self._give_up("error")

    def end(self) -> None:
        """The request body is complete."""
        try:
            self._ended = True
            if self._stream is not None:
                self._stream.end()
        except Exception:
            log.exception("end failed (route %s)", self._route)
            self._give_up("error")

    def cancel(self) -> None:
        """The primary exchange died before `end()`: the copy is given up (`skipped`).

        After `end()` the copy is complete and goes on; then this does nothing.
        """
        try:
            if not self._ended:
                self._give_up("skipped")
        except Exception:
            log.exception("cancel failed (route %s)", self._route)

    # ---- response side: called by the data plane --------------------------------------------

    def primary_head(self, status: int, content_type: str | None) -> None:
        """The status the client got, and the primary response's Content-Type."""
        try:
            self._primary_status = status
            if self.wants_primary_body and not is_json_type(content_type):
                self._no_body_compare()
            self._compare_status()
        except Exception:
            log.exception("primary_head failed (route %s)", self._route)

    def primary_body(self, chunk: bytes) -> None:
        """A chunk of the primary's response body (only while `wants_primary_body`)."""
        try:
            chunks = self._primary_chunks
            if chunks is None:
                return
            self._primary_size += len(chunk)
            if self._primary_size > self._mirror.max_body:
                self._no_body_compare()
                return
            chunks.append(chunk)
        except Exception:
            log.exception("primary_body failed (route %s)", self._route)
            self._no_body_compare()

    def primary_end(self, grpc_status: int = -1) -> None:
        """The primary response is complete (`grpc_status`: a gRPC call's status, else -1):
        compare now, or when the shadow's arrives."""
        try:
            self._primary_done = True
            self._primary_grpc = grpc_status
            self._compare_grpc()
            self._schedule_body_compare()
        except Exception:
            log.exception("primary_end failed (route %s)", self._route)

    # ---- the copy's task ------------------------------------------------------------------

    async def run(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        tls: tuple[ssl.SSLContext, str] | None = None,
    ) -> None:
        """Send the copy and read the shadow's response to the end (the task's body).

        `tls`: the client context and server name for a shadow reached over TLS.
        """
        mirror = self._mirror
        limit = mirror.max_body
        try:
            async with (
                asyncio.timeout(mirror.timeout),
                session.request(
                    method,
                    url,
                    headers=headers,
                    data=self._stream,
                    allow_redirects=False,
                    ssl=tls[0] if tls is not None else True,
                    server_hostname=tls[1] if tls is not None else None,
                ) as response,
            ):
                keep: list[bytes] | None = None
                if self._primary_chunks is not None and is_json_type(
                    response.headers.get("Content-Type")
                ):
                    keep = []
                kept = 0
                async for chunk in response.content.iter_any():
                    if keep is not None:
                        kept += len(chunk)
                        if kept > limit:
                            keep = None
                        else:
                            keep.append(chunk)
                status = response.status
        except TimeoutError:
            # Slow, not broken: the in-flight bound already limits what a slow shadow costs.
            log.debug("copy of %s timed out", self._request_id)
            self._settle("error")
            return
        except (aiohttp.ClientError, OSError) as exc:
            log.debug("copy of %s failed: %r", self._request_id, exc)
            if self._outcome is None:
                # Refused, reset or broken by the endpoint, not cut because we gave it up.
                self._mirrorer.copy_failed(self._address)
            self._settle("error")
            return
        except ValueError as exc:
            # A request aiohttp refuses to build (a header value it rejects): not the
            # endpoint's fault.
            log.debug("copy of %s not sent: %r", self._request_id, exc)
            self._settle("error")
            return
        self._mirrorer.answered(self._address)
        self._settle("sent")
        self._shadow_status = status
        if keep is None:
            # Not JSON or over the cap: no body comparison, so the primary's need not be kept.
            self._no_body_compare()
        else:
            self._shadow_body = b"".join(keep)
        self._compare_status()
        self._schedule_body_compare()

    async def run_h2(
        self, endpoint: EndpointPool, request: _H2Request, max_head: int, max_headers: int
    ) -> None:
        """Send the copy as a stream on one of the worker's HTTP/2 connections to `endpoint`
        (an h2c or h2 shadow) and read the answer to the end (the task's body)."""
        mirror = self._mirror
        loop = asyncio.get_running_loop()
        sink = _H2Sink(loop, self._primary_chunks is not None, mirror.max_body)
        carrier: UpstreamCarrier | None = None
        endpoint.in_flight += 1
        try:
            async with asyncio.timeout(mirror.timeout):
                carrier = endpoint.take_idle(loop.time())
                if carrier is None:
                    carrier = await endpoint.connect(loop)
                carrier.start(sink, request.method == "HEAD", False, max_head, max_headers)
                carrier.send_head(request)
                if self._stream is not None:
                    async for chunk in self._stream:
                        carrier.send_body(chunk, False)
                carrier.end_body(False, None)
                problem = await sink.done
        except TimeoutError:
            log.debug("copy of %s timed out", self._request_id)
            self._settle("error")
            return
        except _GivenUp:
            return  # given up by the data plane: already counted
        except OSError as exc:  # refused, reset, or a TLS handshake that failed
            log.debug("copy of %s failed: %r", self._request_id, exc)
            self._mirrorer.copy_failed(self._address)
            self._settle("error")
            return
        finally:
            endpoint.in_flight -= 1
            if carrier is not None:
                # Frees the stream's slot, and resets the stream if it is still open.
                endpoint.release(carrier, loop.time())
        if problem:
            log.debug("copy of %s failed: %s", self._request_id, problem)
            self._mirrorer.copy_failed(self._address)
            self._settle("error")
            return
        self._mirrorer.answered(self._address)
        self._settle("sent")
        self._shadow_status = sink.status
        self._shadow_grpc = sink.grpc_status
        if sink.body is None:
            self._no_body_compare()
        else:
            self._shadow_body = b"".join(sink.body)
        self._compare_status()
        self._compare_grpc()
        self._schedule_body_compare()

    def attach(self, task: asyncio.Task[None]) -> None:
        """Keep the task that runs this copy, to cancel it and to account for its end."""
        self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._mirrorer.release(self._route)
        if task.cancelled() or task.exception() is not None:
            # Cancelled by worker shutdown, or a bug (TaskSet logs it): the copy did not land.
            self._settle("error")

    # ---- bookkeeping ----------------------------------------------------------------------

    def _settle(self, outcome: str) -> None:
        """Count the copy's one outcome; later calls do nothing."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._stats.outcomes[outcome] += 1
        if outcome != "sent":
            self._no_body_compare()

    def _give_up(self, outcome: str) -> None:
        """End the copy now with `outcome`: drop the queued body and cancel the request."""
        self._settle(outcome)
        if self._stream is not None:
            self._stream.discard()
        task = self._task
        if task is not None and not task.done():
            task.cancel()

    def _no_body_compare(self) -> None:
        """Bodies will not be compared: stop teeing the primary's and drop what is kept."""
        self.wants_primary_body = False
        self._primary_chunks = None
        self._shadow_body = None

    def _compare_status(self) -> None:
        """Count a status mismatch once both statuses are known (only for copies `sent`)."""
        if self._status_compared or not self._shadow_status or not self._primary_status:
            return
        self._status_compared = True
        if self._shadow_status != self._primary_status:
            # Bodies are compared only when statuses agree: this one differs already.
            self._no_body_compare()
            self._stats.mismatch += 1
            self._mirrorer.log_mismatch(
                self._route,
                "status",
                self._request_id,
                f"shadow {self._shadow_status}, primary {self._primary_status}",
            )

    def _compare_grpc(self) -> None:
        """A gRPC call's outcome is its grpc-status (its HTTP status is 200 either way): count
        a status mismatch once both are known, for a copy `sent` whose HTTP status agreed."""
        primary, shadow = self._primary_grpc, self._shadow_grpc
        if self._grpc_compared or primary < 0 or shadow < 0 or self._outcome != "sent":
            return
        self._grpc_compared = True
        if primary != shadow and self._shadow_status == self._primary_status:
            self._stats.mismatch += 1
            self._mirrorer.log_mismatch(
                self._route,
                "status",
                self._request_id,
                f"shadow grpc-status {grpc.NAMES.get(shadow, shadow)}, "
                f"primary grpc-status {grpc.NAMES.get(primary, primary)}",
            )

    def _schedule_body_compare(self) -> None:
        """Compare bodies once both are complete, in a callback of its own.

        Parsing up to 2 x max_body of JSON is real work: it must not run inside the data
        plane's call, where it would delay the primary's next bytes.
        """
        if (
            self._primary_done
            and self._shadow_body is not None
            and self._primary_chunks is not None
            and self._status_compared
            and self._shadow_status == self._primary_status
        ):
            primary = b"".join(self._primary_chunks)
            shadow = self._shadow_body
            self._no_body_compare()
            self._mirrorer.loop.call_soon(self._compare_bodies, primary, shadow)

    def _compare_bodies(self, primary: bytes, shadow: bytes) -> None:
        try:
            try:
                left = orjson.loads(primary)
                right = orjson.loads(shadow)
            except orjson.JSONDecodeError:
                # Not JSON after all (or compressed): there is nothing to compare.
                return
            paths = diff(left, right, self._ignore, MISMATCH_SAMPLE + 1)
            if paths:
                self._stats.body_mismatch += 1
                more = ", ..." if len(paths) > MISMATCH_SAMPLE else ""
                detail = "JSON differs at " + ", ".join(paths[:MISMATCH_SAMPLE]) + more
                self._mirrorer.log_mismatch(self._route, "body", self._request_id, detail)
        except Exception:
            log.exception("body comparison failed (route %s)", self._route)


class Mirrorer:
    """Sends shadow copies for one worker; owns an aiohttp ClientSession and a TaskSet.

    `max_in_flight` is per route name in this worker; the count carries across reloads.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._tasks = TaskSet("mirror")
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._in_flight: dict[str, int] = {}
        self._next_endpoint: dict[str, int] = {}
        # Back-off states of shadow endpoints that failed copies (no entry: CLEAR).
        self._resting: dict[str, Ejection] = {}
        self._ignores: dict[tuple[str, ...], IgnorePaths] = {}
        self._contexts: dict[UpstreamTls, ssl.SSLContext] = {}
        self._last_log: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    def in_flight(self, route: str) -> int:
        """Copies of `route` in flight in this worker."""
        return self._in_flight.get(route, 0)

    def start(
        self,
        route: CompiledRoute,
        shadow: UpstreamSpec,
        stats: MirrorStats,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        pool: UpstreamPool | None = None,
        limits: Limits | None = None,
    ) -> MirrorCopy | None:
        """Begin one copy.

        `target` is the request target as received (path and query); `headers` are exactly the
        header lines the primary got (hop-by-hop already removed, X-Forwarded-*, X-Request-Id
        already added). A `Content-Length` among them is kept, so the shadow sees the same
        framing, and one over `max_body` skips the copy at once (outcome `skipped`, None
        returned); without it the body goes chunked and is checked against `max_body` as it
        is fed. Returns None (and counts outcome `dropped`) when the route's copies in flight
        are already at `mirror.max_in_flight`. Never raises, never blocks.

        `pool` is the worker's pool of the shadow and `limits` the request's limits: an h2c or
        h2 shadow is reached through that pool's HTTP/2 connections, its answer's head bounded
        by those limits. Without them an HTTP/2 shadow's copies are skipped.
        """
        try:
            return self._start(
                route, shadow, stats, method, target, headers, has_body, pool, limits
            )
        except Exception:
            log.exception("could not start a copy (route %s)", route.name)
            stats.outcomes["error"] += 1
            return None

    def _start(
        self,
        route: CompiledRoute,
        shadow: UpstreamSpec,
        stats: MirrorStats,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        pool: UpstreamPool | None,
        limits: Limits | None,
    ) -> MirrorCopy | None:
        mirror = route.mirror
        if mirror is None:
            return None
        name = route.name
        h2 = shadow.protocol != "http1"
        if h2 and (pool is None or limits is None):
            # Copies to an HTTP/2 shadow ride the worker's HTTP/2 pool of it; without one
            # (nobody to send them) they are skipped, counted always.
            stats.outcomes["skipped"] += 1
            return None
        in_flight = self._in_flight.get(name, 0)
        if self._closed or in_flight >= mirror.max_in_flight:
            stats.outcomes["dropped"] += 1
            return None
        copied: list[tuple[str, str]] = []
        kept: list[tuple[bytes, bytes, bytes]] = []  # the same fields, as an HTTP/2 copy sends them
        request_id = ""
        length: int | None = None
        for raw_name, raw_value in headers:
            lower = raw_name.lower()
            if lower in _NOT_COPIED:
                continue
            value = raw_value.decode("latin-1")
            if lower == b"content-length":
                length = int(value)
            elif lower == b"x-request-id":
                request_id = value
            copied.append((raw_name.decode("latin-1"), value))
            if h2:
                kept.append((lower, raw_name, raw_value))
        copied.append(MIRROR_HEADER)
        if (length is not None and length > mirror.max_body) or target[:1] != b"/":
            # Over the cap before a byte is read; or an `OPTIONS *` / absolute-form target,
            # which the shadow's origin-form request line cannot repeat as received.
            stats.outcomes["skipped"] += 1
            return None
        address = self._pick(shadow)
        if address is None:
            # No endpoint, or every endpoint resting after failed copies.
            stats.outcomes["error"] += 1
            return None
        endpoint: EndpointPool | None = None
        request: _H2Request | None = None
        tls: tuple[ssl.SSLContext, str] | None = None
        if h2 and pool is not None:
            # A stream on the worker's own HTTP/2 connections to that endpoint (its TLS too).
            endpoint = next((e for e in pool.endpoints if e.address == address), None)
            if endpoint is None:
                stats.outcomes["error"] += 1
                return None
            marker, flag = (part.encode() for part in MIRROR_HEADER)
            kept.append((marker.lower(), marker, flag))
            request = _H2Request(method, target, kept, has_body)
        elif shadow.tls is not None:
            context = self._contexts.get(shadow.tls)
            if context is None:
                try:
                    context = self._contexts[shadow.tls] = client_context(shadow.tls)
                except TlsFileError as exc:
                    # The files changed since the supervisor checked them: no copy can go.
                    key = (shadow.name, "tls")
                    now = self.loop.time()
                    if now - self._last_log.get(key, float("-inf")) >= LOG_INTERVAL:
                        self._last_log[key] = now
                        log.warning("shadow %s: cannot send copies over TLS: %s", shadow.name, exc)
                    stats.outcomes["error"] += 1
                    return None
            host = address.rpartition(":")[0].strip("[]")
            tls = (context, shadow.tls.server_name or host)
        ignore: IgnorePaths | None = None
        if mirror.compare_json:
            ignore = self._ignores.get(mirror.compare_json_ignore)
            if ignore is None:
                ignore = self._ignores[mirror.compare_json_ignore] = IgnorePaths(
                    mirror.compare_json_ignore
                )
        stream = _BodyStream(self.loop) if has_body else None
        copy = MirrorCopy(self, name, mirror, stats, ignore, request_id, stream, address)
        if endpoint is not None and request is not None and limits is not None:
            task = self._tasks.spawn(
                copy.run_h2(endpoint, request, limits.max_header_size, limits.max_headers),
                "mirror",
            )
        else:
            scheme = "http" if tls is None else "https"
            url = URL(f"{scheme}://{address}{target.decode('latin-1')}", encoded=True)
            task = self._tasks.spawn(copy.run(self._client(), method, url, copied, tls), "mirror")
        # Counted only once the task exists: its done callback is what gives the slot back.
        self._in_flight[name] = in_flight + 1
        copy.attach(task)
        return copy

    def _pick(self, shadow: UpstreamSpec) -> str | None:
        """The next endpoint of `shadow` in round-robin order that is not resting."""
        endpoints = shadow.endpoints
        count = len(endpoints)
        first = self._next_endpoint.get(shadow.name, 0)
        for step in range(count):
            index = (first + step) % count
            address = endpoints[index].address
            resting = self._resting.get(address)
            if resting is None or not resting.out(self.loop.time()):
                self._next_endpoint[shadow.name] = index + 1
                return address
        return None

    def copy_failed(self, address: str) -> None:
        """`address` refused, reset or broke a copy; enough in a row and the endpoint rests."""
        state = self._resting.get(address, CLEAR)
        # Copies already in flight fail together: only the first failure after a rest counts.
        self._resting[address] = after = after_failure(state, self.loop.time(), REST)
        if after.until != state.until:
            log.warning(
                "shadow endpoint %s failed %d copies in a row: no copies to it for %.0fs",
                address,
                after.streak,
                after.backoff,
            )

    def answered(self, address: str) -> None:
        """A response came from `address`: it is healthy again."""
        if self._resting:
            state = self._resting.pop(address, None)
            if state is not None:
                state = after_success(state, REST)
                if state != CLEAR:
                    self._resting[address] = state

    def _client(self) -> aiohttp.ClientSession:
        """The worker's session to every shadow, made on first use (inside the running loop)."""
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                # Copies are bounded per route above; a connector limit would queue them unseen.
                connector=aiohttp.TCPConnector(limit=0),
                # Each copy's total time is `mirror.timeout`, enforced around the whole copy.
                timeout=aiohttp.ClientTimeout(total=None),
                # Cookies the shadow sets must not leak into later copies.
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                # The body is read and discarded, or compared as the primary's was received.
                auto_decompress=False,
            )
        return session

    def release(self, route: str) -> None:
        """A copy of `route` ended (its task is done)."""
        left = self._in_flight.get(route, 0) - 1
        if left > 0:
            self._in_flight[route] = left
        else:
            self._in_flight.pop(route, None)

    def log_mismatch(self, route: str, kind: str, request_id: str, detail: str) -> None:
        """One stderr line for a mismatch; at most one per route and kind per LOG_INTERVAL."""
        key = (route, kind)
        now = self.loop.time()
        if now - self._last_log.get(key, float("-inf")) < LOG_INTERVAL:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        self._last_log[key] = now
        unlogged = self._unlogged.pop(key, 0)
        log.warning(
            "route %s: %s mismatch (request_id %s): %s%s",
            route,
            kind,
            request_id or "-",
            detail,
            f" (and {unlogged} more not logged)" if unlogged else "",
        )

    async def close(self) -> None:
        """Cancel the copies in flight and close the session (worker shutdown)."""
        self._closed = True
        await self._tasks.cancel_all(CLOSE_WAIT)
        session = self._session
        self._session = None
        if session is not None:
            await session.close()
