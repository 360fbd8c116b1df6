"""The data plane: client connections, one exchange per request, streaming both ways.

Built on asyncio protocols (uvloop) and llhttp through httptools rather than aiohttp's web and
client layers: a request costs callbacks, not coroutines and tasks, which is what lets a Python
proxy keep up with NGINX (see docs/benchmarks.md). The life of a request:

1. `ClientConnection` feeds bytes to the request parser; `on_headers_complete` has the head.
2. The exchange snapshots `ctx.generation` once, when the request's first byte is parsed, and
   keeps it: head rules, routing, pools, counters, limits, timeouts and Via all come from it.
3. `routing.decide` picks route and upstream; no route -> local 404, no endpoint -> local 503.
4. An `UpstreamCarrier` from the endpoint's pool (an HTTP/1.1 connection or an HTTP/2 stream)
   carries the request; bodies are streamed and each side's transport pauses the other when
   its buffer fills (backpressure).
5. Failures are mapped once: connect failure -> next endpoint; reset before any response byte ->
   retried for idempotent methods with a small body; then 502/503/504 with a JSON body.
6. Counters bound at compile time are updated; one access-log line is written.

Where an exchange is in that life is two states, the request side's and the response side's,
changed only by the events of the tables in proxy/core/exchange_state.py.

This module must never buffer a whole body, never block, and never let an exception from one
exchange escape into the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools
import orjson

from proxy.core import grpc
from proxy.core.exchange_state import (
    ANSWER,
    BEGIN,
    BREAK,
    BROKEN,
    DONE,
    HEAD_COMPLETE,
    IDLE,
    MESSAGE_COMPLETE,
    READING_HEAD,
    RECEIVED,
    RESPONSE_END,
    RESPONSE_HEAD,
    STREAMING,
    TUNNEL,
    UPGRADE,
    WAITING,
    Event,
    advance,
)
from proxy.core.grpc import is_grpc, parse_timeout
from proxy.core.headers import (
    HOP_BY_HOP,
    IDEMPOTENT_RETRY_METHODS,
    RETRY_BODY_LIMIT,
    connection_tokens,
    field,
    forwarded_for,
    last_chunk,
    via_names_us,
)
from proxy.core.routing import RequestView, decide, normalize_host, normalize_target, parse_cookies
from proxy.core.table import PathError
from proxy.core.wsframes import GOING_AWAY, FrameTracker, close_frame
from proxy.dataplane.accesslog import AccessRecord
from proxy.dataplane.h2upstream import H2Stream
from proxy.dataplane.upstream import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_NONE,
    EndpointPool,
    UpstreamConnection,
    UpstreamPool,
)
from proxy.dataplane.writes import CoalescingProtocol
from proxy.runtime.tls import sni_of

if TYPE_CHECKING:
    from proxy.core.counters import MirrorStats, RouteUpstreamStats
    from proxy.core.spec import Limits, Timeouts
    from proxy.core.table import CompiledRoute, Table
    from proxy.dataplane.accesslog import AccessLog
    from proxy.dataplane.mirror import MirrorCopy, Mirrorer
    from proxy.dataplane.writes import WriteBatcher
    from proxy.runtime.tasks import TaskSet

log: Final = logging.getLogger("turnout.dataplane")

# The carriers, as concrete classes: mypyc calls their methods natively (a Protocol-typed
# receiver costs a generic call each time).
Carrier = UpstreamConnection | H2Stream

# A connection that starts with this is HTTP/2 with prior knowledge (RFC 9113 section 3.4);
# llhttp stops on it with this error, having consumed all of it.
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PREFACE_PAUSE: Final = "Pause on PRI/Upgrade"

# Reason phrases for every registered status code (a proxy may replace the upstream's).
REASONS: Final[dict[int, bytes]] = {status.value: status.phrase.encode() for status in HTTPStatus}

# Request headers the parser callback must look at; everything else is copied untouched.
_H_HOST: Final = 1
_H_CONTENT_LENGTH: Final = 2
_H_TRANSFER_ENCODING: Final = 3
_H_CONNECTION: Final = 4
_H_HOP: Final = 5
_H_UPGRADE: Final = 6
_H_EXPECT: Final = 7
_H_XFF: Final = 8
_H_REQUEST_ID: Final = 9
_H_DROP: Final = 10
_H_COOKIE: Final = 11
_H_VIA: Final = 12
_H_MAX_FORWARDS: Final = 13
_SPECIAL: Final[dict[bytes, int]] = {
    # Every hop-by-hop header is dropped; the three that carry framing or an upgrade are read
    # first (their entries below replace these).
    **dict.fromkeys(HOP_BY_HOP, _H_HOP),
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"upgrade": _H_UPGRADE,
    b"expect": _H_EXPECT,
    b"x-forwarded-for": _H_XFF,
    b"x-request-id": _H_REQUEST_ID,
    b"x-forwarded-proto": _H_DROP,
    b"x-forwarded-host": _H_DROP,
    b"cookie": _H_COOKIE,
    b"via": _H_VIA,
    b"max-forwards": _H_MAX_FORWARDS,
}

# What a Host value may hold (RFC 3986 reg-name or IP literal, and a port): anything else, a
# space, '/', '@' or a control character, is a 400 (RFC 9112 section 3.2).
_HOST_CHARS: Final = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:[]"
)

# Methods an OPTIONS request with `Max-Forwards: 0` is told about.
_ALLOW: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# Response headers never copied to the client (framing and our own are rebuilt).
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"x-request-id"}
# Fields a trailer section must not carry (RFC 9110 section 6.5.1: framing, routing, controls).
TRAILER_DROP: Final = HOP_BY_HOP | {b"content-length", b"host", b"content-type", b"x-request-id"}

# Connection options that are not header names, and headers whose removal would change the
# framing or the target: a `Connection: content-length` must not smuggle a body (it would be
# sent without its length) nor `Connection: host` strip the Host.
_NEVER_HOP: Final = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"content-length", b"host", b"transfer-encoding"}
)

_CHUNKED_ONLY: Final = [b"chunked"]

# The Connection header nearly every keep-alive upstream sends: nothing to strip.
_KEEP_ALIVE: Final = [b"keep-alive"]
_JSON_HEADERS: Final = ((b"Content-Type", b"application/json"),)

# Why reading from the client is paused; reading resumes only when no reason is left.
PAUSE_BACKPRESSURE: Final = 1
PAUSE_PIPELINE: Final = 2
PAUSE_CONNECTING: Final = 4
PAUSE_UPGRADE: Final = 8
PAUSE_BROKEN: Final = 16  # a malformed request follows the one answered: nothing more to read

# How long a WebSocket client gets to answer our close frame before its connection is closed.
CLOSE_HANDSHAKE_WAIT: Final = 1.0

# Methods bound once: compiled, `name.lower()` or `parser.feed_data(data)` looks the method up
# by name on every call.
_lower: Final[Callable[[bytes], bytes]] = bytes.lower
_feed_data: Final = httptools.HttpRequestParser.feed_data
_should_keep_alive: Final = httptools.HttpRequestParser.should_keep_alive
_get_method: Final = httptools.HttpRequestParser.get_method
_should_upgrade: Final = httptools.HttpRequestParser.should_upgrade

# Bytes of request body held while the endpoint connection is being opened, or while a
# pipelined request waits for the one before it.
CONNECT_BUFFER: Final = 64 * 1024

# errno values that mean this process is short of descriptors or memory, not that the
# endpoint failed.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Generation:
    """Everything one config generation needs at request time, swapped as one reference.

    A request takes this reference once, when its first byte is parsed, and uses nothing else
    for its whole life: the head rules, routing, pools, limits, timeouts and Via name all come
    from the same config even if a reload swaps the worker's generation meanwhile. Never
    changed after construction.
    """

    __slots__ = (
        "limits",
        "mirror_stats",
        "no_route",
        "pools",
        "route_by_name",
        "stats",
        "table",
        "timeouts",
        "uses_host",
        "via_line",
        "via_line_2",
        "via_name",
        "via_value",
        "via_value_2",
        "wanted_headers",
    )

    def __init__(
        self,
        table: Table,
        pools: dict[str, UpstreamPool],
        stats: tuple[dict[str, RouteUpstreamStats], ...],
        no_route: RouteUpstreamStats,
        mirror_stats: tuple[MirrorStats | None, ...],
        via_name: str,
    ) -> None:
        self.table = table
        self.mirror_stats = mirror_stats
        self.pools = pools
        self.stats = stats
        self.no_route = no_route
        self.limits: Limits = table.spec.limits
        self.timeouts: Timeouts = table.spec.timeouts
        # This instance's received-by name in Via (RFC 9110 section 7.6.3), ready to write,
        # after the version of the message received: HTTP/1.1, or HTTP/2 (`_2`).
        self.via_name = via_name.encode("ascii")
        self.via_value = b"1.1 " + self.via_name
        self.via_line = b"Via: " + self.via_value + b"\r\n"
        self.via_value_2 = b"2 " + self.via_name
        self.via_line_2 = b"Via: " + self.via_value_2 + b"\r\n"
        self.route_by_name: dict[str, CompiledRoute] = {r.name: r for r in table.routes}
        self.wanted_headers = frozenset(name.encode("latin-1") for name in table.header_names)
        # Without a host-matching route the Host header need not be normalised per request.
        self.uses_host = any(r.host_exact or r.host_suffix for r in table.routes)


class RequestIds:
    """X-Request-Id values: a random prefix per worker process and a counter (32 hex digits),
    unique without a system call per request; compiled with the data plane."""

    __slots__ = ("_next", "_prefix")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix  # 16 hex digits
        self._next = 0

    def new(self) -> str:
        """The next id."""
        n = self._next
        self._next = n + 1
        # to_bytes().hex() is the cheapest 16 hex digits compiled (a format spec costs more).
        return self._prefix + n.to_bytes(8, "big").hex()


class LoopState:
    """What every exchange reads of its worker, as a compiled object (a read of the worker
    itself is a dictionary lookup): the loop's time at the last tick, the exchanges with a
    deadline or an idle timeout (checked each tick), the access log, the request-id source."""

    __slots__ = ("access_log", "now", "request_ids", "watched")

    def __init__(self, now: float, access_log: AccessLog | None, request_ids: RequestIds) -> None:
        self.now = now
        self.access_log = access_log
        self.request_ids = request_ids
        self.watched: set[Exchange] = set()


class WorkerHooks(Protocol):
    """What the data plane needs of the worker that runs it (`worker.WorkerContext`).

    Written here, as a protocol, so that the data plane does not import the worker, which
    imports the data plane.
    """

    loop: asyncio.AbstractEventLoop
    generation: Generation  # the one in force; an exchange reads it once, when it begins
    tasks: TaskSet
    batcher: WriteBatcher
    state: LoopState

    def mirrorer(self) -> Mirrorer: ...
    def count_fail_open(self, upstream: str) -> None: ...
    def passive_result(self, endpoint: EndpointPool, status: int) -> None: ...
    def resource_shortage(self, exc: OSError) -> None: ...
    def warn_limited(self, key: str, message: str, *args: object) -> None: ...
    def connection_opened(self, conn: ClientConnection) -> None: ...
    def connection_closed(self, conn: ClientConnection) -> None: ...
    def adopt_http2(self, conn: ClientConnection, initial: bytes) -> None:
        """Hand `conn` over to the HTTP/2 side (proxy.dataplane.http2 builds on this module,
        so the worker, which imports both, makes the call)."""


class Downstream(Protocol):
    """The client side an exchange answers, as the exchange sees it.

    Today an HTTP/1.1 connection (ClientConnection); an HTTP/2 stream implements the same.
    The exchange decides *what* the client gets (the status, which upstream fields pass, the
    proxy's own fields, when the response ends or breaks); the downstream decides *how*
    (status line or pseudo-headers, chunked or length or frames, connection reuse). The
    exchange never writes bytes to the client itself.
    """

    ctx: WorkerHooks
    client_ip: str
    forwarded_proto: bytes
    tls_version: str | None
    sni: str | None
    # Reasons (bit flags) the request side is not being read; backpressure from the client.
    paused: int
    write_paused: bool
    # Set to end the connection once the current response is done.
    close_after: bool

    def pause(self, reason: int) -> None: ...
    def unpause(self, reason: int) -> None: ...
    def send_continue(self, ex: Exchange) -> None: ...
    def send_interim(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
    ) -> None: ...
    def send_head(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
        body_framing: int,
    ) -> None: ...
    def send_data(self, ex: Exchange, data: bytes) -> None: ...
    def finish_response(self, ex: Exchange) -> None: ...
    def send_local(
        self,
        ex: Exchange,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        close: bool,
    ) -> None: ...
    def abort(self) -> None: ...
    def start_tunnel(self, ex: Exchange) -> None: ...
    def linger(self, seconds: float) -> None: ...
    def exchange_done(self, ex: Exchange) -> None: ...


class TargetParts(Protocol):
    """What `httptools.parse_url` returns: its stubs say `bytes` and `int`, but a part the
    target lacks is None (the compiled build checks the declared types).
    """

    host: bytes | None
    port: int | None
    path: bytes | None
    query: bytes | None
    fragment: bytes | None


class HeadError(Exception):
    """A request the proxy refuses before any byte reaches an upstream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _new_sticky_id() -> str:
    # Sticky ids are long-lived and end up in cookies: unguessable, not just unique.
    return os.urandom(16).hex()


class Exchange:
    """One request and its response through the proxy.

    Its lifecycle is `request_state` (how much of the request the client has sent) and
    `response_state` (where its response is), each changed only by an event of its side's table
    (proxy/core/exchange_state.py). A notice that arrives once the exchange is over
    (`response_state >= DONE`: a timeout sweep, a lost client, a drain) is ignored.
    """

    __slots__ = (
        "added",
        "answer_here",
        "attempts",
        "bytes_in",
        "bytes_out",
        "chunked_in",
        "conn",
        "conn_tokens",
        "connect_task",
        "content_length",
        "cookie_values",
        "deadline",
        "decision",
        "endpoint",
        "endpoint_address",
        "expect_continue",
        "flag",
        "frames_down",
        "frames_up",
        "gen",
        "grpc",
        "grpc_deadline",
        "grpc_status",
        "head",
        "head_size",
        "header_count",
        "host",
        "host_count",
        "in_flight_counted",
        "keep_alive",
        "kept_headers",
        "last_io",
        "max_forwards",
        "method",
        "mirror",
        "pending",
        "pending_size",
        "raw_head",
        "request_id",
        "request_id_in",
        "request_state",
        "request_trailers",
        "response_chunked",
        "response_state",
        "retained",
        "retained_size",
        "route_name",
        "sent_at",
        "set_cookie",
        "start_time",
        "state",
        "stats",
        "status",
        "te_trailers",
        "te_values",
        "trailers",
        "tried",
        "ttfb",
        "upgrade",
        "upgrade_values",
        "upstream",
        "upstream_conn",
        "upstream_name",
        "url",
        "version",
        "wanted",
        "xff",
    )

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.url = b""
        self.kept_headers: list[tuple[bytes, bytes, bytes]] = []  # (lower name, name, value)
        self.wanted: dict[str, str] = {}
        # Tuples, not lists, for fields few requests carry: the empty one is shared, and a
        # request that has one pays for it (`+=`) instead of every request for a list.
        self.cookie_values: tuple[str, ...] = ()
        self.head_size = 0
        self.raw_head = 0
        self.header_count = 0
        self.host: bytes | None = None
        self.host_count = 0
        self.content_length: int | None = None
        self.chunked_in = False
        self.te_values: tuple[bytes, ...] = ()
        self.conn_tokens: tuple[bytes, ...] = ()
        self.upgrade_values: tuple[bytes, ...] = ()
        self.expect_continue = False
        self.xff: tuple[bytes, ...] = ()
        self.request_id_in: bytes | None = None
        self.max_forwards: bytes | None = None
        self.answer_here = False
        self.te_trailers = False
        # gRPC (HTTP/2 only): the call's deadline (loop time, 0: none) and its status (-1:
        # none yet), from the response's head or trailers, or the proxy's own answer.
        self.grpc = False
        self.grpc_deadline = 0.0
        self.grpc_status = -1
        self.trailers: list[tuple[bytes, bytes, bytes]] | None = None
        # The request's trailer fields (lower name, value) from an HTTP/2 client, passed on
        # when the upstream side can carry them (HTTP/2, or a chunked HTTP/1.1 body).
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        self.added: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        # The lifecycle, one state per side (proxy/core/exchange_state.py has the tables).
        self.request_state = READING_HEAD
        self.response_state = IDLE
        self.in_flight_counted = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.retained: list[bytes] | None = []
        self.retained_size = 0
        self.request_id = ""
        self.head = b""
        # The one read of the generation: a reload after this never reaches this request, so
        # a pipelined request waiting behind another is filtered and routed by the same table.
        ctx = conn.ctx
        gen = ctx.generation
        self.gen: Generation = gen
        self.state = ctx.state
        self.decision = ""
        self.route_name = ""
        self.upstream_name = ""
        self.stats = gen.no_route
        self.upstream: UpstreamPool | None = None
        self.upstream_conn: Carrier | None = None
        self.endpoint: EndpointPool | None = None
        self.endpoint_address = ""
        self.mirror: MirrorCopy | None = None
        self.frames_down: FrameTracker | None = None
        self.frames_up: FrameTracker | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.tried: set[EndpointPool] = set()
        self.attempts = 0
        self.set_cookie: str | None = None
        self.response_chunked = False
        self.status = 0
        # From the request's first byte, so a refused head is timed too (NGINX's
        # $request_time counts the same way).
        self.start_time = perf_counter()
        self.last_io = 0.0
        self.deadline = 0.0
        # Why the proxy made or cut the response ("" when the upstream's answer went through),
        # and the upstream's time to first byte: for the access log only.
        self.flag = ""
        self.sent_at = 0.0
        self.ttfb = -1.0

    # ---- request head -------------------------------------------------------------------

    def add_header(
        self,
        lname: bytes,
        name: bytes,
        value: bytes,
        limits: Limits,
        wanted: frozenset[bytes],
    ) -> None:
        """Classify one request header line (the parser's slow path: limits, special names)."""
        if self.head_size > limits.max_header_size:
            raise HeadError(431, "request head larger than limits.max_header_size")
        if self.header_count > limits.max_headers:
            raise HeadError(431, "too many header fields")
        if 95 in lname:
            # A name with '_' is dropped (NGINX's default): CGI-style servers read `X_Real_Ip`
            # as `X-Real-Ip`, which would get round the headers the proxy sets itself.
            return
        kind = _SPECIAL.get(lname)
        if kind is None:
            self.kept_headers.append((lname, name, value))
            if lname in wanted:
                self.wanted.setdefault(lname.decode("latin-1"), value.decode("latin-1"))
            return
        if kind == _H_HOST:
            if value.translate(None, _HOST_CHARS):
                raise HeadError(400, "invalid Host header")
            self.host_count += 1
            self.host = value
            self.kept_headers.append((lname, name, value))
        elif kind == _H_CONTENT_LENGTH:
            # llhttp already rejects duplicates and non-digits; this keeps the value.
            self.content_length = int(value)
            self.kept_headers.append((lname, name, value))
        elif kind == _H_TRANSFER_ENCODING:
            self.te_values += (value,)
        elif kind == _H_CONNECTION:
            self.conn_tokens += (value,)
        elif kind == _H_UPGRADE:
            self.upgrade_values += (value,)
        elif kind == _H_EXPECT:
            if value.strip().lower() == b"100-continue":
                self.expect_continue = True
            else:
                raise HeadError(417, "unsupported expectation")
        elif kind == _H_XFF:
            self.xff += (value.strip(),)
        elif kind == _H_REQUEST_ID:
            if self.request_id_in is None:
                self.request_id_in = value
        elif kind == _H_COOKIE:
            self.kept_headers.append((lname, name, value))
            self.cookie_values += (value.decode("latin-1"),)
        elif kind == _H_MAX_FORWARDS:
            self.max_forwards = value
            self.kept_headers.append((lname, name, value))
        elif kind == _H_VIA:
            if via_names_us(value, self.gen.via_name):
                # RFC 9110 section 7.6.3: Via is how a proxy sees its own requests come back.
                raise HeadError(508, "forwarding loop: the request already passed this proxy")
            self.kept_headers.append((lname, name, value))
        elif kind == _H_HOP and lname == b"te" and b"trailers" in value.lower():
            # TE is hop-by-hop, but an HTTP/2 upstream (gRPC) must hear that the client takes
            # trailers.
            self.te_trailers = True
        # _H_HOP and _H_DROP: not forwarded.

    def finish_head(self, method: str, version: str, keep_alive: bool, upgrading: bool) -> None:
        """Validate the complete head and remember what the response needs.

        The downstream read the request line: `upgrading` says its parser saw a protocol
        upgrade asked for (the head's Connection and Upgrade fields say which).
        """
        # advance(), inlined here and on the other per-request transitions (one row each).
        if self.request_state != HEAD_COMPLETE.source:
            raise HEAD_COMPLETE.illegal(self.request_state)
        self.request_state = HEAD_COMPLETE.target
        self.method = method
        self.version = version
        self.keep_alive = keep_alive
        if self.version != "1.1" and self.version != "1.0":
            if self.version != "2":
                raise HeadError(505, "HTTP version not supported")
            self._http2_head()
        if self.te_values:
            if self.version != "1.1":
                # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
                raise HeadError(400, "transfer-encoding in an HTTP/1.0 request")
            codings = [
                token.strip().lower() for value in self.te_values for token in value.split(b",")
            ]
            if codings != _CHUNKED_ONLY:
                # Only chunked is decoded and re-applied: another coding would reach the
                # upstream as if the body were plain (RFC 9112 section 6.1: 501).
                raise HeadError(501, "transfer codings other than chunked are not supported")
            self.chunked_in = True
        if self.version == "1.1" and self.host_count != 1:
            raise HeadError(400, "an HTTP/1.1 request needs exactly one Host header")
        if self.host_count > 1:
            raise HeadError(400, "more than one Host header")
        if self.method == "CONNECT":
            raise HeadError(405, "CONNECT is not supported by a reverse proxy")
        if self.method == "TRACE":
            # As NGINX: TRACE would echo credentials back to a script (cross-site tracing).
            raise HeadError(405, "TRACE is not allowed")
        if self.max_forwards is not None and self.method == "OPTIONS":
            self._max_forwards()
        if self.conn_tokens:
            tokens = connection_tokens(self.conn_tokens)
            if (
                b"upgrade" in tokens
                and self.upgrade_values
                and upgrading
                and any(b"websocket" in v.lower() for v in self.upgrade_values)
            ):
                self.upgrade = True
            extra = tokens - _NEVER_HOP
            if extra:
                # Headers named by Connection are hop-by-hop too (RFC 9110 section 7.6.1).
                self.kept_headers = [h for h in self.kept_headers if h[0] not in extra]
                self.wanted = {k: v for k, v in self.wanted.items() if k.encode() not in extra}
                if b"x-forwarded-for" in extra:
                    self.xff = ()
                if b"x-request-id" in extra:
                    self.request_id_in = None
        limit = self.gen.limits.max_request_body
        if self.content_length is not None and self.content_length > limit:
            raise HeadError(413, "request body larger than limits.max_request_body")
        if self.request_id_in is not None:
            self.request_id = self.request_id_in.decode("latin-1")
        else:
            self.request_id = self.state.request_ids.new()

    def _http2_head(self) -> None:
        """What only an HTTP/2 request can be: a gRPC call, with a deadline."""
        for lname, _, value in self.kept_headers:
            if lname == b"content-type":
                self.grpc = is_grpc(value)
            elif lname == b"grpc-timeout":
                seconds = parse_timeout(value)
                if seconds is None:
                    raise HeadError(400, "malformed grpc-timeout")
                self.grpc_deadline = self.state.now + seconds

    def _max_forwards(self) -> None:
        """RFC 9110 section 7.6.2: OPTIONS stops here at 0, else goes on with one less."""
        assert self.max_forwards is not None
        text = self.max_forwards.strip()
        if not text.isdigit():
            raise HeadError(400, "invalid Max-Forwards header")
        hops = int(text[:10])
        if hops == 0:
            self.answer_here = True
            return
        self.kept_headers = [
            (lname, name, b"%d" % (hops - 1) if lname == b"max-forwards" else value)
            for lname, name, value in self.kept_headers
        ]

    # ---- routing and forwarding ---------------------------------------------------------

    def begin(self) -> None:
        """Decide where the request goes and start the first attempt."""
        conn = self.conn
        if self.response_state != BEGIN.source:
            raise BEGIN.illegal(self.response_state)
        self.response_state = BEGIN.target
        self.last_io = self.state.now
        if self.answer_here:
            self._local_answer(200, b"", ((b"Allow", _ALLOW),), close=False)
            return
        gen = self.gen
        table = gen.table
        url = self.url
        if url[:1] != b"/":
            if url == b"*":
                if self.method != "OPTIONS":
                    # RFC 9112 section 3.2.4: the asterisk form is for OPTIONS only.
                    self.local_error(400, "'*' is a target for OPTIONS only", close=True)
                    return
                path = "*"
            else:
                try:
                    parsed = cast("TargetParts", httptools.parse_url(url))
                except httptools.HttpParserInvalidURLError:
                    self.local_error(400, "invalid request target", close=True)
                    return
                if parsed.fragment:
                    self.local_error(
                        400, "a fragment ('#') is not allowed in a request target", close=True
                    )
                    return
                target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
                try:
                    target = normalize_target(target)
                except PathError as exc:
                    self.local_error(400, str(exc), close=True)
                    return
                q = target.find(b"?")
                path = (target if q < 0 else target[:q]).decode("latin-1")
                if parsed.host:
                    # RFC 9112 section 3.2.2: the target's authority wins over Host, and the
                    # request goes on in origin form with a Host made from that authority.
                    authority = parsed.host
                    if parsed.port:
                        authority += b":%d" % parsed.port
                    self.host = authority
                    self.kept_headers = [h for h in self.kept_headers if h[0] != b"host"]
                    self.kept_headers.append((b"host", b"Host", authority))
                    self.url = target
        else:
            # Routes match, and upstreams get, the path in normal form (RFC 3986 dot
            # segments removed), so `/api/../admin` is never judged as `/api`.
            try:
                url = normalize_target(url)
            except PathError as exc:
                self.local_error(400, str(exc), close=True)
                return
            self.url = url
            q = url.find(b"?")
            path = (url if q < 0 else url[:q]).decode("latin-1")
        host = (
            normalize_host(self.host.decode("latin-1"))
            if self.host is not None and gen.uses_host
            else ""
        )
        cookies = (
            parse_cookies(self.cookie_values, table.cookie_names)
            if table.cookie_names and self.cookie_values
            else {}
        )
        view = RequestView(self.method, host, path, self.wanted, cookies)
        rnd = random.random
        decision = decide(table, view, rnd(), rnd(), _new_sticky_id)
        route = decision.route
        if route is None or decision.upstream is None:
            self.flag = "no_route"
            self.local_error(404, "no route matches the request", close=False)
            return
        upstream_name = decision.upstream
        self.route_name = route.name
        self.upstream_name = upstream_name
        self.decision = decision.reason
        self.set_cookie = decision.set_cookie
        stats = gen.stats[route.index][upstream_name]
        self.stats = stats
        stats.in_flight += 1
        self.in_flight_counted = True
        pool = gen.pools.get(upstream_name)
        if pool is None or not pool.endpoints:
            self.flag = "no_endpoints"
            self.local_error(503, f"upstream '{upstream_name}' has no endpoints", close=False)
            return
        if self.grpc and pool.spec.protocol == "http1":
            # gRPC needs HTTP/2 end to end (trailers carry its status): never downgraded.
            self.flag = "upstream_protocol"
            self.local_error(
                502,
                f"upstream '{upstream_name}' is reached over HTTP/1.1;"
                " gRPC needs protocol h2c or h2",
                close=False,
            )
            return
        self.upstream = pool
        added = self._added_headers()
        self.added = added
        if decision.mirror is not None and not self.upgrade:
            # A WebSocket cannot be replayed as a plain request: upgrades are never mirrored.
            self._start_mirror(gen, route, decision.mirror, added)
        if (
            self.expect_continue
            and self.version == "1.1"
            and self.request_state != RECEIVED
            and (self.chunked_in or (self.content_length or 0) > 0)
        ):
            conn.send_continue(self)
        self.attempt()

    def upstream_http1(self) -> bool:
        """The response comes from an HTTP/1.1 upstream (for Via's received-protocol)."""
        upstream = self.upstream
        return upstream is None or upstream.spec.protocol == "http1"

    def _added_headers(self) -> list[tuple[bytes, bytes]]:
        """The forwarding headers the proxy sets (contract section 3)."""
        added = [
            (b"X-Forwarded-For", forwarded_for(self.xff, self.conn.client_ip)),
            (b"X-Forwarded-Proto", self.conn.forwarded_proto),
        ]
        if self.host is not None:
            added.append((b"X-Forwarded-Host", self.host))
        added.append((b"X-Request-Id", self.request_id.encode("latin-1")))
        gen = self.gen
        added.append((b"Via", gen.via_value_2 if self.version == "2" else gen.via_value))
        return added

    def http1_head(self) -> bytes:
        """The request head as HTTP/1.1 bytes (built once: a retry sends the same)."""
        head = self.head
        if head:
            return head
        parts = [f"{self.method} ".encode("latin-1"), self.url, b" HTTP/1.1\r\n"]
        # Appends, not `+= (...)`: no tuple made and freed per field.
        for _, name, value in self.kept_headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        for name, value in self.added:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if self.host is None:
            # An HTTP/1.0 request may come without Host; HTTP/1.1 requires the field, empty when
            # the target has no authority (RFC 9112 section 3.2).
            parts.append(b"Host: \r\n")
        if self.upgrade:
            parts.append(b"Connection: upgrade\r\n")
            for value in self.upgrade_values:
                parts += (b"Upgrade: ", value, b"\r\n")
        elif self.chunked_in:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        self.head = head
        return head

    def _start_mirror(
        self,
        gen: Generation,
        route: CompiledRoute,
        verdict: str,
        added: list[tuple[bytes, bytes]],
    ) -> None:
        mirror_stats = gen.mirror_stats[route.index]
        mirror = route.mirror
        if mirror_stats is None or mirror is None:
            return
        if verdict == "skip":
            mirror_stats.outcomes["skipped"] += 1
            return
        shadow = gen.table.upstreams[mirror.to]
        headers = [(name, value) for _, name, value in self.kept_headers]
        headers += added
        has_body = self.chunked_in or (self.content_length or 0) > 0
        copy = self.conn.ctx.mirrorer().start(
            route,
            shadow,
            mirror_stats,
            self.method,
            self.url,
            headers,
            has_body,
            gen.pools.get(mirror.to),
            gen.limits,
        )
        if copy is None:
            return
        self.mirror = copy
        for chunk in self.pending:
            copy.feed(chunk)
        if self.request_state == RECEIVED:
            copy.end()

    def attempt(self) -> None:
        """Send the request to an endpoint: a pooled connection now, or a new one."""
        pool = self.upstream
        assert pool is not None
        ctx = self.conn.ctx
        endpoint, failed_open = pool.pick(random.random(), self.tried)
        if failed_open:
            ctx.count_fail_open(pool.name)
        self.endpoint = endpoint
        self.endpoint_address = endpoint.address
        self.tried.add(endpoint)
        self.attempts += 1
        endpoint.in_flight += 1
        conn = endpoint.take_idle(self.state.now)
        if conn is not None:
            self._send_on(cast(Carrier, conn))
            return
        self.conn.pause(PAUSE_CONNECTING)
        self.connect_task = ctx.tasks.spawn(self._connect(endpoint), name="connect")

    async def _connect(self, endpoint: EndpointPool) -> None:
        ctx = self.conn.ctx
        try:
            async with asyncio.timeout(self.gen.timeouts.connect):
                upstream_conn = await endpoint.connect(ctx.loop)
        except (OSError, TimeoutError) as exc:
            if self.connect_task is None:
                return  # the exchange was abandoned meanwhile
            self.connect_task = None
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                # Our own fd table (or memory) is full: the endpoint is not at fault, and
                # another endpoint would fail the same way.
                self._out_of_resources(endpoint, exc)
                return
            if isinstance(exc, TimeoutError):
                kind = "timeout"
            elif isinstance(exc, ssl.SSLError):
                kind = "tls"  # the handshake failed (certificate refused, protocol mismatch)
            else:
                kind = "connect"
            self._attempt_failed(kind, nothing_sent=True)
            return
        if self.connect_task is None:
            # The exchange was abandoned while connecting: the fresh connection is still good,
            # keep it warm in the pool (cancelling the connect instead could leak its socket).
            upstream_conn.reusable = True
            endpoint.release(upstream_conn, self.state.now)
            return
        self.connect_task = None
        self.conn.unpause(PAUSE_CONNECTING)
        self._send_on(cast(Carrier, upstream_conn))

    def _send_on(self, upstream_conn: Carrier) -> None:
        self.upstream_conn = upstream_conn
        limits = self.gen.limits
        upstream_conn.start(
            self,
            self.method == "HEAD",
            self.upgrade,
            limits.max_header_size,
            limits.max_headers,
        )
        if self.conn.write_paused:
            upstream_conn.pause_reading()
        if self.state.access_log is not None:
            self.sent_at = perf_counter()
        upstream_conn.send_head(self)
        chunked = self.chunked_in
        if self.retained is not None and self.attempts > 1:
            for chunk in self.retained:
                upstream_conn.send_body(chunk, chunked)
        else:
            for chunk in self.pending:
                upstream_conn.send_body(chunk, chunked)
        if self.pending:
            self.pending = []
            self.pending_size = 0
        if self.request_state == RECEIVED:
            if chunked or upstream_conn.framed_end:
                upstream_conn.end_body(chunked, self.request_trailers)
            self._response_deadline(self.state.now)
        else:
            # While the body streams, the idle timeout applies; the response timeout starts
            # when the whole request is out (a long upload is not a slow upstream). A gRPC
            # call's own deadline holds throughout.
            self.deadline = self.grpc_deadline
        self.state.watched.add(self)

    def _out_of_resources(self, endpoint: EndpointPool, exc: OSError) -> None:
        endpoint.in_flight -= 1
        self.endpoint = None
        self.conn.unpause(PAUSE_CONNECTING)
        self.conn.ctx.resource_shortage(exc)
        self.flag = "out_of_fds"
        self.local_error(503, "proxy out of file descriptors", close=self.request_state != RECEIVED)

    def _response_deadline(self, now: float) -> None:
        deadline = now + self.gen.timeouts.response
        grpc_deadline = self.grpc_deadline
        self.deadline = grpc_deadline if grpc_deadline and grpc_deadline < deadline else deadline

    def _attempt_failed(self, kind: str, nothing_sent: bool) -> None:
        """An attempt ended before any response byte: retry or answer with an error."""
        endpoint = self.endpoint
        ctx = self.conn.ctx
        if endpoint is not None:
            endpoint.in_flight -= 1
            ctx.passive_result(endpoint, 0)
            self.endpoint = None
        self.upstream_conn = None
        self.conn.unpause(PAUSE_CONNECTING)
        self.stats.errors[kind] += 1
        # Only while nothing went to the client and the exchange is not over (client gone).
        can_retry = self.response_state == WAITING and self.attempts <= self._route_retries()
        if can_retry and not nothing_sent:
            # Bytes went out: only a method that may run twice, with its body kept, is retried.
            can_retry = self.method in IDEMPOTENT_RETRY_METHODS and self.retained is not None
        if can_retry:
            self.stats.retries += 1
            self.attempt()
            return
        self.conn.unpause(PAUSE_CONNECTING)
        self.flag = f"upstream_{kind}"
        close = self.request_state != RECEIVED
        if kind == "timeout":
            self.local_error(504, "upstream timed out", close=close)
        else:
            self.local_error(502, f"upstream {kind} failure", close=close)

    def _drop_attempt(self) -> None:
        """Abandon the attempt in progress: cancel its connect or cut its connection."""
        # A connect in progress is left to finish (bounded by timeouts.connect); it sees
        # connect_task cleared and parks its connection in the pool.
        self.connect_task = None
        upstream_conn = self.upstream_conn
        if upstream_conn is not None:
            self.upstream_conn = None
            upstream_conn.detach()
            upstream_conn.abort()
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            endpoint.in_flight -= 1

    def _route_retries(self) -> int:
        route = self.gen.route_by_name.get(self.route_name)
        return route.retries if route is not None else 0

    # ---- request body -------------------------------------------------------------------

    def body(self, chunk: bytes) -> None:
        """A piece of the request body from the client."""
        size = len(chunk)
        self.bytes_in += size
        self.last_io = self.state.now
        if self.bytes_in > self.gen.limits.max_request_body:
            if self.response_state == WAITING:
                self.local_error(
                    413, "request body larger than limits.max_request_body", close=True
                )
            else:
                self.conn.abort()
            return
        self.keep_for_retry(chunk)
        mirror = self.mirror
        if mirror is not None:
            mirror.feed(chunk)
        if self.response_state >= DONE:
            return
        upstream_conn = self.upstream_conn
        if upstream_conn is not None:
            upstream_conn.send_body(chunk, self.chunked_in)
        else:
            self.pending.append(chunk)
            self.pending_size += size
            if self.pending_size > CONNECT_BUFFER:
                self.conn.pause(PAUSE_CONNECTING)

    def keep_for_retry(self, chunk: bytes) -> None:
        """Keep body bytes for a retry while the body stays within RETRY_BODY_LIMIT."""
        retained = self.retained
        if retained is not None:
            self.retained_size += len(chunk)
            if self.retained_size > RETRY_BODY_LIMIT:
                self.retained = None
            else:
                retained.append(chunk)

    def body_complete(self) -> None:
        """The client sent its whole request.

        An exchange still queued (IDLE) has no mirror nor upstream yet: begin() sends it all.
        """
        if self.request_state != MESSAGE_COMPLETE.source:
            raise MESSAGE_COMPLETE.illegal(self.request_state)
        self.request_state = MESSAGE_COMPLETE.target
        if self.mirror is not None:
            self.mirror.end()
        if self.response_state >= DONE:
            return
        upstream_conn = self.upstream_conn
        if upstream_conn is not None:
            if self.chunked_in or upstream_conn.framed_end:
                upstream_conn.end_body(self.chunked_in, self.request_trailers)
            if self.response_state == WAITING:
                self._response_deadline(self.state.now)

    # ---- ResponseSink: the upstream side ------------------------------------------------

    def upstream_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        body_framing: int,
        keep_alive: bool,
        connection: list[bytes],
    ) -> None:
        """Relay the response head, with framing and hop-by-hop headers rebuilt."""
        conn = self.conn
        self.state.watched.discard(self)
        self.last_io = self.state.now
        self.status = status
        if self.response_state != RESPONSE_HEAD.source:
            raise RESPONSE_HEAD.illegal(self.response_state)
        self.response_state = RESPONSE_HEAD.target
        if self.state.access_log is not None:
            self.ttfb = perf_counter() - self.sent_at
        # Hop-by-hop fields never pass (RFC 9110 section 7.6.1), nor those Connection names.
        drop = _RESPONSE_DROP
        if connection and connection != _KEEP_ALIVE:
            extra = connection_tokens(connection) - _NEVER_HOP
            if extra:
                drop = drop | extra
        if status == 204 or body_framing == FRAMING_CHUNKED:
            drop = drop | {b"content-length"}
        conn.send_head(self, status, headers, drop, body_framing)
        mirror = self.mirror
        if mirror is not None:
            content_type = field(headers, b"content-type")
            mirror.primary_head(status, content_type.decode("latin-1") if content_type else None)
        if self.grpc:
            # A trailers-only answer carries the call's status in its head.
            self._grpc_status_of(headers)
        if body_framing != FRAMING_NONE:
            self.state.watched.add(self)
            self.deadline = self.grpc_deadline

    def upstream_trailers(self, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        """The response's trailers (an HTTP/2 upstream): passed on when the response ends."""
        self.trailers = headers
        if self.grpc:
            self._grpc_status_of(headers)

    def _grpc_status_of(self, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        code = grpc.status_of(headers)
        if code >= 0:
            self.grpc_status = code

    def sticky_cookie(self) -> bytes:
        """The Set-Cookie value that keeps a new visitor in its sticky cohort."""
        route = self.gen.route_by_name[self.route_name]
        sticky = route.sticky
        assert sticky is not None
        assert sticky.cookie is not None
        assert self.set_cookie is not None
        return (
            f"{sticky.cookie}={self.set_cookie}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"
        ).encode("latin-1")

    def upstream_body(self, data: bytes) -> None:
        """Relay a piece of the response body."""
        conn = self.conn
        self.last_io = self.state.now
        self.bytes_out += len(data)
        conn.send_data(self, data)
        mirror = self.mirror
        if mirror is not None and mirror.wants_primary_body:
            mirror.primary_body(data)

    def upstream_complete(self) -> None:
        """The response ended: release the connection, record, and serve the next request."""
        conn = self.conn
        conn.finish_response(self)
        upstream_conn = self.upstream_conn
        endpoint = self.endpoint
        ctx = conn.ctx
        if upstream_conn is not None and endpoint is not None:
            endpoint.in_flight -= 1
            if self.status >= 500 or endpoint.ejection.streak:
                # A success with no failure streak to reset needs no bookkeeping.
                ctx.passive_result(endpoint, self.status)
            if self.request_state == RECEIVED:
                endpoint.release(upstream_conn, self.state.now)
            else:
                # The request is not fully sent: this connection cannot carry another.
                upstream_conn.close()
                conn.close_after = True
            self.endpoint = None
            self.upstream_conn = None
        self._finish(RESPONSE_END)

    def upstream_lost(self, got_response_bytes: bool) -> None:
        """The endpoint connection broke before the response ended."""
        state = self.response_state
        if state >= DONE:
            return
        if state == WAITING and not got_response_bytes:
            self._attempt_failed("reset", nothing_sent=False)
            return
        # Part of the response is already out: the client must see a broken response, never a
        # clean short one, so its connection is cut without the final chunk.
        self._upstream_broke("reset", "upstream sent a malformed response")

    def upstream_invalid(self, reason: str) -> None:
        """The endpoint broke HTTP: 502 (never retried: it answered), counted as `protocol`."""
        if self.response_state >= DONE:
            return
        self.conn.ctx.warn_limited(
            "invalid-response",
            "upstream %s endpoint %s: %s (request %s)",
            self.upstream_name,
            self.endpoint_address,
            reason,
            self.request_id,
        )
        self._upstream_broke("protocol", f"upstream sent an invalid response: {reason}")

    def _upstream_broke(self, kind: str, message: str) -> None:
        """The endpoint failed after answering: count it, tell passive health, 502 or cut."""
        self.stats.errors[kind] += 1
        self.flag = f"upstream_{kind}"
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint.in_flight -= 1
            self.conn.ctx.passive_result(endpoint, 0)
            self.endpoint = None
        self.upstream_conn = None
        if self.response_state >= STREAMING and not self.grpc:
            self.conn.abort()
            self._finish(BREAK)
        else:
            # A gRPC call that has begun ends with its status in trailers (UNAVAILABLE).
            self.local_error(502, message, close=True)

    def upstream_interim(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        """Pass an interim response (103 Early Hints) on, unless the response began."""
        if self.response_state == WAITING:
            self.conn.send_interim(self, status, headers, _RESPONSE_DROP)

    def upstream_upgraded(self, rest: bytes) -> None:
        """The endpoint accepted the WebSocket upgrade: both sides become a byte tunnel."""
        self.response_state = advance(self.response_state, UPGRADE)
        self.frames_down = FrameTracker()
        self.frames_up = FrameTracker()
        conn = self.conn
        self.stats.observe(101, perf_counter() - self.start_time)
        conn.start_tunnel(self)
        if rest:
            self.upstream_data(rest)

    def upstream_data(self, data: bytes) -> None:
        """Tunnelled bytes from the endpoint."""
        self.last_io = self.state.now
        self.bytes_out += len(data)
        if self.frames_down is not None:
            self.frames_down.feed(data)
        self.conn.send_data(self, data)

    def go_away(self) -> None:
        """End this exchange now: shutdown, or its endpoint was removed and drained.

        A WebSocket gets a close frame with 1001 (going away) both ways when both directions
        sit at a frame boundary; otherwise, and for plain HTTP, the connections are cut.
        """
        if self.response_state >= DONE:
            return
        conn = self.conn
        upstream_conn = self.upstream_conn
        down, up = self.frames_down, self.frames_up
        ending = BREAK
        if (
            self.response_state == TUNNEL
            and upstream_conn is not None
            and down is not None
            and up is not None
            and down.at_boundary
            and up.at_boundary
        ):
            conn.send_data(self, close_frame(GOING_AWAY, None))
            upstream_conn.write(close_frame(GOING_AWAY, os.urandom(4)))
            upstream_conn.detach()
            upstream_conn.close()
            self.upstream_conn = None
            # RFC 6455 section 7.1.1: let the client answer with its own close frame before
            # the TCP connection goes, or it may report 1006 instead of our 1001.
            conn.linger(CLOSE_HANDSHAKE_WAIT)
            ending = RESPONSE_END
        else:
            conn.abort()
        self._drop_attempt()
        self._finish(ending)

    def upstream_pause_writing(self) -> None:
        """The endpoint's socket buffer is full: stop reading the client."""
        self.conn.pause(PAUSE_BACKPRESSURE)

    def upstream_resume_writing(self) -> None:
        """The endpoint drained: read the client again."""
        self.conn.unpause(PAUSE_BACKPRESSURE)

    # ---- endings ------------------------------------------------------------------------

    def local_error(self, status: int, message: str, close: bool) -> None:
        """Answer with a proxy-made JSON error (or cut the connection if a response began).

        A gRPC call is answered the gRPC way instead: HTTP 200 with the status in the head
        (trailers-only), or in trailers when the response has begun.
        """
        if self.grpc:
            passed = bool(self.grpc_deadline) and self.state.now >= self.grpc_deadline
            self._grpc_answer(grpc.status_for_local(status, passed), message, close)
            return
        body = orjson.dumps({"error": message, "request_id": self.request_id})
        self._local_answer(status, body, _JSON_HEADERS, close)

    def _grpc_answer(self, code: int, message: str, close: bool) -> None:
        fields = (
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code),
            (b"grpc-message", grpc.encode_message(message)),
        )
        if not self.flag:
            self.flag = "local"
        self.grpc_status = code
        if self.response_state == STREAMING:
            # The upstream's messages are out: end the call with the status in trailers.
            self._drop_attempt()
            self.trailers = [(name, name, value) for name, value in fields]
            self.conn.finish_response(self)
            self._finish(RESPONSE_END)
            return
        self._local_answer(200, b"", fields, close)

    def _local_answer(
        self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...], close: bool
    ) -> None:
        conn = self.conn
        if not self.flag:
            self.flag = "refused" if 400 <= status < 500 else "local"
        if self.response_state >= STREAMING:
            conn.abort()
            self._drop_attempt()
            self._finish(BREAK)
            return
        self.status = status
        mirror = self.mirror
        if mirror is not None:
            mirror.primary_head(status, "application/json")
        self.bytes_out += len(body)
        conn.send_local(self, status, headers, body, close)
        self._drop_attempt()
        self._finish(ANSWER)

    def timed_out(self) -> None:
        """The sweeper saw this exchange pass its deadline or sit idle too long."""
        state = self.response_state
        if state >= DONE:
            return
        grpc_deadline = self.grpc_deadline
        if grpc_deadline and self.state.now >= grpc_deadline:
            # The call's own deadline (grpc-timeout): not the endpoint's fault, so passive
            # health is not told; the client gets DEADLINE_EXCEEDED as its stub would report.
            self.stats.errors["timeout"] += 1
            self.flag = "grpc_deadline"
            self.local_error(504, "deadline exceeded", close=True)
            return
        if state == WAITING:
            if self.deadline or self.conn.paused & PAUSE_BACKPRESSURE:
                # The request is out (or the endpoint stopped reading it): the upstream is slow.
                self.stats.errors["timeout"] += 1
                if self.endpoint is not None:
                    self.conn.ctx.passive_result(self.endpoint, 0)
                self.flag = "upstream_timeout"
                self.local_error(504, "upstream timed out", close=True)
            else:
                self.flag = "client_timeout"
                self.local_error(408, "request body idle too long", close=True)
            return
        self.stats.errors["timeout"] += 1
        self.flag = "upstream_timeout"
        if self.grpc and state == STREAMING:
            self.local_error(504, "upstream idle too long", close=True)
            return
        self.conn.abort()
        self._drop_attempt()
        self._finish(BREAK)

    def client_lost(self) -> None:
        """The client went away mid-exchange: drop the upstream side too."""
        state = self.response_state
        if state >= DONE:
            return
        self._drop_attempt()
        if state != TUNNEL:
            # NGINX's 499: the client left before the whole response was delivered, whatever
            # status the upstream had begun to send.
            self.status = 499
            self.flag = "client_abort"
        self._finish(BREAK)

    def _finish(self, ending: Event) -> None:
        """End the exchange with `ending` (response_end, answer or break), once."""
        state = self.response_state
        after = ending.column[state]
        if after < 0:
            if state >= DONE:
                return  # over already: no event leaves DONE or BROKEN
            raise ending.illegal(state)
        self.response_state = after
        mirror = self.mirror
        if mirror is not None:
            if self.request_state == RECEIVED:
                mirror.primary_end(self.grpc_status if self.grpc else -1)
            else:
                mirror.cancel()
        conn = self.conn
        self.state.watched.discard(self)
        stats = self.stats
        if self.in_flight_counted:
            stats.in_flight -= 1
        duration = perf_counter() - self.start_time
        if self.grpc:
            code = self.grpc_status
            if code < 0:
                # No status came: the client cancelled, or the call broke without one.
                code = grpc.CANCELLED if self.status == 499 else grpc.UNKNOWN
            stats.observe_grpc(self.status, code, duration)
        elif state != TUNNEL:
            # A tunnel was counted as a 101 when it opened.
            stats.observe(self.status, duration)
        access_log = self.state.access_log
        if access_log is not None:
            access_log.record(
                AccessRecord(
                    self.request_id,
                    conn.client_ip,
                    self.method,
                    self.url,
                    self.status,
                    self.route_name,
                    self.upstream_name,
                    self.decision,
                    self.endpoint_address,
                    self.attempts,
                    duration,
                    self.bytes_in,
                    self.bytes_out,
                    mirror is not None,
                    self.version,
                    self.host,
                    self.kept_headers,
                    self.ttfb,
                    self.flag,
                    conn.tls_version,
                    conn.sni,
                )
            )
        if after == BROKEN:
            conn.close_after = True
        conn.exchange_done(self)


class ClientConnection(CoalescingProtocol):
    """A downstream connection: parses requests and runs their exchanges in order."""

    __slots__ = (
        "begun",
        "body_seen",
        "client_ip",
        "close_after",
        "closing",
        "ctx",
        "current",
        "error",
        "held",
        "idle_since",
        "lingering",
        "parser",
        "parsing",
        "paused",
        "queue",
        "refusal",
        "state",
        "tunnel",
        "upgrading",
        "write_paused",
    )

    # What the client spoke: class attributes, so a plain connection pays nothing for TLS;
    # TlsClientConnection sets them per connection.
    forwarded_proto = b"http"
    tls_version: str | None = None
    sni: str | None = None

    def __init__(self, ctx: WorkerHooks) -> None:
        super().__init__(ctx.batcher)
        self.ctx = ctx
        self.state = ctx.state
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        # A malformed request pipelined behind others: its answer, due when they are answered.
        self.refusal: tuple[Exchange, int, str] | None = None
        self.client_ip = ""
        self.paused = 0
        self.write_paused = False
        self.close_after = False
        self.closing = False
        self.tunnel: Exchange | None = None
        self.idle_since = 0.0
        self.error: BaseException | None = None
        self.lingering = False
        # llhttp stops after a request that asks for an upgrade; what the client sent after it
        # waits here until the upstream accepts (tunnel) or declines (more HTTP requests).
        self.upgrading: Exchange | None = None
        self.held: list[bytes] = []
        self.begun = 0  # requests begun on this connection
        self.body_seen = False  # the current read carried request body bytes

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unknown"
        self.idle_since = self.state.now
        self.ctx.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            # The client's answer to our close frame: the handshake is done.
            self.close()
            return
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.last_io = self.state.now
            tunnel.bytes_in += len(data)
            if tunnel.frames_up is not None:
                tunnel.frames_up.feed(data)
            upstream_conn = tunnel.upstream_conn
            if upstream_conn is not None:
                upstream_conn.write(data)
            return
        if self.close_after and self.current is None:
            return
        if self.upgrading is not None:
            self.held.append(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            before = self.parsing
            begun = self.begun
            self.body_seen = False
            _feed_data(self.parser, data)
            ex = self.parsing
            if ex is not None and self.body_seen:
                ex.raw_head = 0  # only an unbroken run of reads without body bytes counts
            elif ex is not None and (ex is before or (before is None and self.begun == begun + 1)):
                # llhttp holds a header or trailer line until it is complete: bound the head
                # (and the trailers, and chunk framing) by the bytes of reads that carry no
                # body byte. Only reads that are all this request's count: a read may also
                # carry the end of the previous request (its body, or pipelined requests).
                ex.raw_head += len(data)
                if ex.raw_head > ex.gen.limits.max_header_size:
                    self._reject(431, "request head larger than limits.max_header_size")
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError:
            # httptools hides the callback's exception; the callbacks keep it in self.error.
            error = self.error
            self.error = None
            if isinstance(error, HeadError):
                self._reject(error.status, error.message)
            else:
                log.error("request handling failed", exc_info=error)
                self._reject(500, "internal error")
        except httptools.HttpParserError as exc:
            if self.begun == 1 and self.current is None and str(exc) == _PREFACE_PAUSE:
                self._become_http2(data)
                return
            self._reject(400, f"malformed request: {exc}")
        except Exception:
            log.exception("request handling failed")
            self._reject(500, "internal error")

    def _become_http2(self, data: bytes) -> None:
        """The connection began with the HTTP/2 preface (h2c with prior knowledge).

        llhttp consumed the whole preface before it stopped; what followed it in this read
        (the client's SETTINGS and first requests) goes to the HTTP/2 side with the preface.
        """
        ex = self.parsing
        earlier = ex.raw_head if ex is not None else 0  # preface bytes of earlier reads
        self.parsing = None
        self.begun = 0
        self.ctx.adopt_http2(self, H2_PREFACE + data[len(H2_PREFACE) - earlier :])

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish what is in flight, then close. A response this
        # loop pass wrote is still buffered here, and returning None closes the transport.
        self.flush()
        if self.current is None and self.tunnel is None:
            return None
        current = self.current
        if current is not None and current.request_state != RECEIVED and self.tunnel is None:
            # The request body will never be complete: an aborted upload. Release the
            # upstream side now rather than when the idle timeout notices.
            self.close_after = True
            current.client_lost()
            return None
        self.close_after = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connection_closed(self)
        self.transport = None
        current = self.current
        if current is not None:
            current.client_lost()
        for queued in self.queue:
            # Never begun, so nothing to release: the exchange just ends where it waited.
            queued.response_state = advance(queued.response_state, BREAK)
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        current = self.tunnel or self.current
        if current is not None and current.upstream_conn is not None:
            current.upstream_conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        current = self.tunnel or self.current
        if current is not None and current.upstream_conn is not None:
            current.upstream_conn.resume_reading()

    def is_idle(self) -> bool:
        """No request in progress, not even part of a head: closing now loses nothing."""
        return (
            self.current is None
            and self.parsing is None
            and self.upgrading is None
            and self.tunnel is None
            and not self.lingering
        )

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        ex.head_size += len(url)
        if ex.head_size > ex.gen.limits.max_header_size:
            self.error = HeadError(414, "request target longer than limits.max_header_size")
            raise self.error

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.head_size += len(name) + len(value) + 4
        ex.header_count += 1
        gen = ex.gen
        limits = gen.limits
        if ex.request_state:
            # Past READING_HEAD (0): trailer fields of a chunked body, bounded like the head
            # (with it). They end the upstream's request as trailers (a chunked body's trailer
            # section, or HTTP/2 trailers); framing and connection fields never pass.
            if ex.head_size > limits.max_header_size or ex.header_count > limits.max_headers:
                self.error = HeadError(431, "request trailers larger than the head limits")
                raise self.error
            if _lower(name) not in TRAILER_DROP:
                if ex.request_trailers is None:
                    ex.request_trailers = []
                ex.request_trailers.append((name, value))
            return
        lname = _lower(name)
        wanted = gen.wanted_headers
        if (
            lname not in _SPECIAL
            and lname not in wanted
            and 95 not in lname
            and ex.head_size <= limits.max_header_size
            and ex.header_count <= limits.max_headers
        ):
            # The common case, inline: a header copied as it came.
            ex.kept_headers.append((lname, name, value))
            return
        try:
            ex.add_header(lname, name, value, limits, wanted)
        except Exception as exc:
            self.error = exc
            raise

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        try:
            parser = self.parser
            keep_alive = bool(_should_keep_alive(parser))
            ex.finish_head(
                _get_method(parser).decode("ascii"),
                # llhttp keeps an HTTP/1.0 request alive only when its Connection field says
                # keep-alive: alive without that field it is HTTP/1.1, and asking the parser
                # (which formats a string) is spared on the common request.
                "1.1" if keep_alive and not ex.conn_tokens else parser.get_http_version(),
                keep_alive,
                bool(_should_upgrade(parser)),
            )
            if self.current is None:
                self.current = ex
                ex.begin()
            else:
                self.queue.append(ex)
        except Exception as exc:
            self.error = exc
            raise

    def on_body(self, body: bytes) -> None:
        self.body_seen = True
        ex = self.parsing
        if ex is None:
            return
        try:
            if ex.response_state != IDLE:
                ex.body(body)
            else:
                # A pipelined request waiting for the one before it: hold its body up to
                # CONNECT_BUFFER, then stop reading until it begins.
                size = len(body)
                ex.bytes_in += size
                ex.pending.append(body)
                ex.pending_size += size
                ex.keep_for_retry(body)
                if ex.bytes_in > ex.gen.limits.max_request_body:
                    raise HeadError(413, "request body larger than limits.max_request_body")
                if ex.pending_size > CONNECT_BUFFER:
                    self.pause(PAUSE_PIPELINE)
        except Exception as exc:
            self.error = exc
            raise

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        ex.body_complete()
        if ex.upgrade:
            return
        current = self.current
        if current is not ex and current is not None and current.response_state < DONE:
            # A pipelined request is complete while an earlier one is still answered: read no
            # further until that response is out. The request being answered does not pause
            # reading by itself: toggling it on every request cost two epoll_ctl calls each.
            self.pause(PAUSE_PIPELINE)

    # exchange plumbing

    def pause(self, reason: int) -> None:
        """Stop reading the client for `reason` (reasons are bit flags)."""
        was = self.paused
        self.paused = was | reason
        if not was and self.transport is not None:
            # No is_closing() first: uvloop's transports ignore a pause once closing.
            self.transport.pause_reading()

    def unpause(self, reason: int) -> None:
        """Drop one reason to pause; read again when none is left."""
        was = self.paused
        if not was & reason:
            return
        self.paused = was & ~reason
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()  # ignored by a closing transport, as above

    def exchange_done(self, ex: Exchange) -> None:
        """An exchange finished: close, or go on with the next pipelined request."""
        if ex is not self.current:
            return
        self.current = None
        if self.lingering:
            return
        if self.close_after or self.transport is None:
            self.close()
            return
        # Whatever paused reading for the finished exchange no longer applies.
        if self.paused:
            self.unpause(PAUSE_BACKPRESSURE)
        if ex is self.upgrading:
            # The upstream declined the upgrade: the connection goes on as HTTP/1.1.
            self._resume_http()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            # Read on: the next request's body may still be on its way. on_message_complete
            # pauses again if yet another request is complete before this one is answered.
            self.unpause(PAUSE_PIPELINE)
            nxt.begin()
            return
        self.idle_since = self.state.now
        if self.paused:
            refusal = self.refusal
            if refusal is not None:
                # Every request before the malformed one is answered: now its turn.
                self.refusal = None
                self._answer_refused(*refusal)
                return
            self.unpause(PAUSE_PIPELINE)
        if self.closing:
            self.close()

    # ---- the response, written as HTTP/1.1 (the exchange decides what, this decides how) ----

    def send_continue(self, ex: Exchange) -> None:
        """Tell the client to send the body it holds back (Expect: 100-continue)."""
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def send_interim(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
    ) -> None:
        """An interim response (103 Early Hints); never to an HTTP/1.0 client (RFC 9110
        section 15.2)."""
        if ex.version != "1.1":
            return
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b""))]
        for lname, name, value in headers:
            if lname not in drop:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.write(b"".join(parts))

    def send_head(
        self,
        ex: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: frozenset[bytes],
        body_framing: int,
    ) -> None:
        """The response head: the upstream's fields but `drop`, the proxy's own fields, and
        framing for this client (chunked for HTTP/1.1, the connection's end for 1.0)."""
        # close_after: the connection ends after this response (a half-closed client); the
        # head says so, as RFC 9112 section 9.6 asks.
        close = (
            not ex.keep_alive or ex.request_state != RECEIVED or self.closing or self.close_after
        )
        if status == 101:
            close = False
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b""))]
        if body_framing in (FRAMING_CHUNKED, FRAMING_CLOSE):
            chunked = ex.version == "1.1"
            ex.response_chunked = chunked
            if not chunked:
                close = True
        for lname, name, value in headers:
            if lname not in drop:
                # Appends, not `+= (...)`: no tuple made and freed per field.
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
        parts += (b"X-Request-Id: ", ex.request_id.encode("latin-1"), b"\r\n")
        parts.append(ex.gen.via_line if ex.upstream_http1() else ex.gen.via_line_2)
        if ex.set_cookie is not None:
            parts += (b"Set-Cookie: ", ex.sticky_cookie(), b"\r\n")
        if status == 101:
            parts.append(b"Connection: upgrade\r\n")
            for value in ex.upgrade_values:
                parts += (b"Upgrade: ", value, b"\r\n")
        else:
            if ex.response_chunked:
                codings = b""
                if body_framing == FRAMING_CLOSE:
                    # A body coded (gzip...) but not chunked: keep the codings, add chunked.
                    for lname, _, value in headers:
                        if lname == b"transfer-encoding":
                            codings = value + b", "
                parts += (b"Transfer-Encoding: ", codings, b"chunked\r\n")
            if close:
                parts.append(b"Connection: close\r\n")
                self.close_after = True
            elif ex.version == "1.0":
                parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.write(b"".join(parts))

    def send_data(self, ex: Exchange, data: bytes) -> None:
        """A piece of the response body (or of a tunnel), framed as the head said."""
        if ex.response_chunked:
            self.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.write(data)

    def finish_response(self, ex: Exchange) -> None:
        """The response body is complete; trailers (from an HTTP/2 upstream) end a chunked body."""
        if ex.response_chunked:
            trailers = ex.trailers
            if trailers is None:
                self.write(b"0\r\n\r\n")
                return
            self.write(
                last_chunk(
                    (name, value) for lname, name, value in trailers if lname not in TRAILER_DROP
                )
            )

    def send_local(
        self,
        ex: Exchange,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        close: bool,
    ) -> None:
        """A response the proxy makes itself (errors, OPTIONS *): whole, with its length."""
        close = close or not ex.keep_alive or ex.request_state != RECEIVED or self.closing
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b"Error"))]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"Content-Length: %d\r\nX-Request-Id: %b\r\n"
            % (len(body), ex.request_id.encode("latin-1")),
        )
        if close:
            parts.append(b"Connection: close\r\n")
            self.close_after = True
        parts.append(b"\r\n")
        if ex.method != "HEAD":
            parts.append(body)
        self.write(b"".join(parts))

    def _reject(self, status: int, message: str) -> None:
        ex = self.parsing or Exchange(self)
        if not ex.request_id:
            request_id = ex.request_id_in
            ex.request_id = (
                request_id.decode("latin-1")
                if request_id is not None
                else self.state.request_ids.new()
            )
        self.parsing = None
        if self.current is not None and self.current is not ex:
            # A response is in progress: the malformed request is answered after the requests
            # before it, as NGINX does (exchange_done). The parser is in its error state, so
            # nothing read from here on could be parsed: stop reading rather than fail llhttp
            # again on every read.
            queue = self.queue
            if queue and queue[-1] is ex:
                queue.pop()  # queued at its head, refused in its body: it never begins
            if self.refusal is None:
                self.refusal = (ex, status, message)
            self.pause(PAUSE_BROKEN)
            return
        self._answer_refused(ex, status, message)

    def _answer_refused(self, ex: Exchange, status: int, message: str) -> None:
        """Answer a request refused while it was parsed (4xx), then end the connection."""
        self.close_after = True
        self.current = ex
        ex.flag = "refused"
        ex.local_error(status, message, close=True)

    def _upgraded(self, rest: bytes) -> None:
        # The request that asked for the upgrade is the last one parsed: the current one or
        # the last queued. If it is already answered (a local error), HTTP goes on at once.
        ex = self.queue[-1] if self.queue else self.current
        if ex is None:
            if not self.close_after:
                self.held = [rest]
                self._resume_http()
            return
        self.upgrading = ex
        self.held = [rest] if rest else []
        self.pause(PAUSE_UPGRADE)

    def _resume_http(self) -> None:
        """Parse what followed a declined upgrade (or an Upgrade we do not proxy, e.g. h2c)."""
        self.upgrading = None
        held = b"".join(self.held)
        self.held = []
        self.parser = httptools.HttpRequestParser(self)
        self.unpause(PAUSE_UPGRADE)
        if held:
            self._feed(held)
        elif self.current is None:
            self.idle_since = self.state.now
            if self.closing:
                self.close()

    def start_tunnel(self, ex: Exchange) -> None:
        """The upgrade completed: from now on bytes flow untouched both ways."""
        self.tunnel = ex
        self.upgrading = None
        self.close_after = True
        self.state.watched.add(ex)
        ex.deadline = 0.0
        upstream_conn = ex.upstream_conn
        if upstream_conn is not None:
            for chunk in self.held:
                if ex.frames_up is not None:
                    ex.frames_up.feed(chunk)
                upstream_conn.write(chunk)
        self.held = []
        self.unpause(PAUSE_UPGRADE)

    def linger(self, seconds: float) -> None:
        """Wait up to `seconds` for the peer's next bytes (its close frame), then close."""
        self.lingering = True
        self.tunnel = None
        self.ctx.loop.call_later(seconds, self.close)

    def close(self) -> None:
        """Close the connection after what is buffered has been written."""
        self.flush()
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Cut the connection now (a broken response must look broken)."""
        self.flush()
        transport = self.transport
        if transport is not None:
            transport.abort()


class TlsClientConnection(ClientConnection):
    """A downstream connection on a TLS listener (the handshake is done when it is made)."""

    __slots__ = ("sni", "tls_version")
    forwarded_proto = b"https"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_version = sslobj.version() if sslobj is not None else None
        self.sni = sni_of(sslobj)
        super().connection_made(transport)
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            self.ctx.adopt_http2(self, b"")
