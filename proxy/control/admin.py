"""The admin plane: an aiohttp application served on the `admin` address by the supervisor.

The app only translates HTTP to calls on an `AdminBackend` (the supervisor) and back to JSON;
it holds no state of its own. Routes are added by small `add_*_routes(app)` functions so later
features (metrics, runtime splits, rollout, explain) plug in without touching the others.

Security: with a token, every call but the probes, /metrics and the dashboard's files needs
`Authorization: Bearer`, whatever the path: an unknown path answers 401 too, so that nobody
without the token learns which paths exist (as Envoy's and Traefik's auth filters do).
Errors are JSON too: `{"error": "..."}` with 400 (bad input), 404 (unknown route or path), 405
(with `Allow`), 409 (a rollout call the rollout's state does not allow), 413 (a body over
1 MiB) or 500 (the state file could not be written; nothing changed). aiohttp's own errors
(its HTTPExceptions: unknown path, wrong method, body too large) become that shape in
`_json_errors`. docs/admin.md describes every call.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import resource
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from proxy.control.dashboard import PAGE_PATHS, add_dashboard_routes
from proxy.control.fleet import FleetConflict, FleetDisagreement, FleetUnavailable
from proxy.control.metrics import CONTENT_TYPE, Totals
from proxy.control.rollouts import ACTIONS
from proxy.core.rollout import RolloutError
from proxy.core.routing import explain, make_view
from proxy.core.spec import MAX_WEIGHT
from proxy.core.table import Table

log = logging.getLogger("turnout.admin")

# The largest request body the admin API reads (aiohttp's default, made explicit: the 413 names
# it); a split is a few hundred bytes.
MAX_BODY = 1 << 20

# Probes and scraping must work without credentials (kubelet and Prometheus rarely have them);
# the dashboard's page and assets hold no data (its data calls need the token).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"}) | PAGE_PATHS


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """The result of one reload attempt.

    `errors` empty: the file is in force as `generation`; `changed` is False when its content
    equalled the config already in force (a no-op). `errors` non-empty: the old config stays.
    """

    generation: int
    changed: bool
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the proxy should get traffic, and why not when it should not."""

    ready: bool
    reason: str


class RouteNotFound(LookupError):
    """The route named in the call does not exist in the table in force (404)."""


class AdminBackend(Protocol):
    """What the admin routes need from the supervisor."""

    @property
    def table(self) -> Table:
        """The routing table in force (explain and input checks read it)."""
        ...

    def readiness(self) -> Readiness:
        """Ready means: a config is loaded, the workers serve it, and not draining."""
        ...

    def config_view(self) -> dict[str, Any]:
        """The body of GET /admin/config."""
        ...

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Reload the config file now; `trigger` names the cause for the log."""
        ...

    def routes_view(self) -> dict[str, Any]:
        """The body of GET /admin/routes."""
        ...

    async def set_split(self, route: str, weights: Mapping[str, float] | None) -> dict[str, Any]:
        """Put a runtime split in force on `route` (None: drop it); the route's new state.

        RouteNotFound for an unknown route, ValueError for weights the table rejects, OSError
        when the state file cannot be written (then nothing changed).
        """
        ...

    async def metrics(self, *, gzip: bool) -> bytes:
        """The Prometheus text of all workers, aggregated; gzip-compressed with `gzip`."""
        ...

    async def rollout_command(self, route: str, action: str) -> dict[str, Any]:
        """Drive a route's rollout; RouteNotFound, RolloutError (answered 409)."""
        ...

    def polled_totals(self) -> tuple[Totals, float]:
        """The counters of the latest poll and when it arrived (see proxy.control.dashboard)."""
        ...

    def fleet_view(self) -> dict[str, Any] | None:
        """The body of GET /admin/fleet; None when the config has no `fleet`."""
        ...


BACKEND = web.AppKey("backend", AdminBackend)


def json_response(data: object, status: int = 200) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's error answers (404 for an unknown path, 405, 413, ...) as `{"error": ...}`."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_error_message(request, exc), exc.status)
        allow = exc.headers.get("Allow")
        if allow is not None:
            response.headers["Allow"] = allow
        return response


def _error_message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"unknown path {request.path!r}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {exc.method} is not allowed on {request.path!r} (allowed: {allowed})"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"the request body is over {MAX_BODY} bytes (1 MiB), the admin API's limit"
    return exc.reason.lower()


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        # Constant-time comparison, so response timing does not leak a prefix of the token.
        if not hmac.compare_digest(given, expected):
            response = json_response({"error": "missing or wrong admin token"}, status=401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="turnout-admin"'
            return response
        return await handler(request)

    return auth


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    readiness = request.app[BACKEND].readiness()
    if readiness.ready:
        return json_response({"status": "ready"})
    return json_response({"status": "not ready", "reason": readiness.reason}, status=503)


async def _get_config(request: web.Request) -> web.Response:
    return json_response(request.app[BACKEND].config_view())


async def _post_reload(request: web.Request) -> web.Response:
    outcome = await request.app[BACKEND].reload("admin")
    if outcome.errors:
        return json_response({"errors": list(outcome.errors)}, status=400)
    return json_response({"generation": outcome.generation, "changed": outcome.changed})


def add_core_routes(app: web.Application) -> None:
    """Probes, the config in force and reload."""
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/config", _get_config)
    app.router.add_post("/admin/reload", _post_reload)


# --- metrics ----------------------------------------------------------------------------------


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header value allows gzip (RFC 9110 section 12.5.3)."""
    allowed: dict[str, bool] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        allowed[coding.strip().lower()] = quality > 0
    return allowed.get("gzip", allowed.get("x-gzip", allowed.get("*", False)))


async def _get_metrics(request: web.Request) -> web.Response:
    # Prometheus asks for gzip: the text of a large table shrinks about 20 times.
    compress = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    body = await request.app[BACKEND].metrics(gzip=compress)
    headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if compress:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def add_metrics_routes(app: web.Application) -> None:
    """`GET /metrics`: every worker's counters, aggregated (docs/metrics.md)."""
    app.router.add_get("/metrics", _get_metrics)


# --- routes and runtime splits ----------------------------------------------------------------


def error_response(message: str, status: int) -> web.Response:
    """`{"error": message}` with `status`."""
    return json_response({"error": message}, status=status)


def fleet_error(exc: Exception) -> web.Response:
    """The answer to a change the fleet refused: nothing changed anywhere."""
    if isinstance(exc, FleetUnavailable):
        outcome = (
            "Redis did not answer in time after the change was sent: it may have been stored; "
            "check GET /admin/routes before retrying"
            if exc.ambiguous
            else "nothing changed, retry later"
        )
        return json_response(
            {"error": "fleet store unavailable", "detail": f"Redis: {exc}; {outcome}"},
            status=503,
        )
    if isinstance(exc, FleetDisagreement):
        return json_response({"error": str(exc), "instances": exc.instances}, status=409)
    return json_response(
        {"error": "the fleet's state changed meanwhile", "detail": f"{exc}; nothing changed"},
        status=409,
    )


def parse_split(body: bytes, upstreams: Sequence[str]) -> dict[str, float]:
    """The weights of a `PUT .../split` body; ValueError with a message for the client.

    The body is a JSON object of upstream name -> weight: names of the config's upstreams,
    weights finite numbers >= 0 (not booleans), at least one > 0. Upstreams left out get 0.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            'the body must be a JSON object of weights, e.g. {"blue": 0, "green": 100}'
        )
    unknown = [name for name in data if name not in upstreams]
    if unknown:
        raise ValueError(
            f"unknown upstream(s) {', '.join(repr(name) for name in unknown)} "
            f"(known: {', '.join(upstreams)})"
        )
    weights: dict[str, float] = {}
    for name, value in data.items():
        # bool is an int to Python, but `true` is not a weight.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"weight of {name!r} must be a number, got {orjson.dumps(value).decode()}"
            )
        weight = float(value)
        if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(
                f"weight of {name!r} must be a number from 0 to {MAX_WEIGHT:.0f}, got {value!r}"
            )
        weights[name] = weight
    if not sum(weights.values()) > 0:
        raise ValueError("at least one weight must be > 0")
    return weights


async def _change_split(request: web.Request, weights: Mapping[str, float] | None) -> web.Response:
    name = request.match_info["name"]
    try:
        state = await request.app[BACKEND].set_split(name, weights)
    except RouteNotFound:
        return error_response(f"unknown route {name!r}", 404)
    except (FleetUnavailable, FleetConflict) as exc:
        return fleet_error(exc)
    except ValueError as exc:
        return error_response(str(exc), 400)
    except OSError as exc:
        log.error("route %s: cannot write the state file: %s", name, exc)
        return error_response(
            f"cannot write the state file ({exc.strerror or exc}); nothing changed", 500
        )
    return json_response(state)


async def _put_split(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    name = request.match_info["name"]
    # Unknown route first: a 404 says more than a complaint about a body meant for a typo.
    if backend.table.route(name) is None:
        return error_response(f"unknown route {name!r}", 404)
    try:
        weights = parse_split(await request.read(), tuple(backend.table.upstreams))
    except ValueError as exc:
        return error_response(str(exc), 400)
    return await _change_split(request, weights)


async def _delete_split(request: web.Request) -> web.Response:
    return await _change_split(request, None)


async def _post_rollout(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    action = request.match_info["action"]
    try:
        state = await request.app[BACKEND].rollout_command(name, action)
    except RouteNotFound:
        return error_response(f"unknown route {name!r}", 404)
    except (FleetUnavailable, FleetConflict, FleetDisagreement) as exc:
        return fleet_error(exc)
    except RolloutError as exc:
        return error_response(str(exc), 409)
    except OSError as exc:
        log.error("route %s: cannot write the state file: %s", name, exc)
        return error_response(f"cannot write the state file ({exc.strerror or exc})", 500)
    return json_response(state)


async def _get_routes(request: web.Request) -> web.Response:
    return json_response(request.app[BACKEND].routes_view())


def add_rollout_routes(app: web.Application) -> None:
    """`POST /admin/routes/{name}/rollout/{start,pause,resume,abort,promote}` (contract 5)."""
    actions = "|".join(ACTIONS)
    app.router.add_post(f"/admin/routes/{{name}}/rollout/{{action:{actions}}}", _post_rollout)


async def _get_fleet(request: web.Request) -> web.Response:
    view = request.app[BACKEND].fleet_view()
    if view is None:
        return error_response("fleet mode is off: the config has no `fleet` block", 404)
    return json_response(view)


def add_route_routes(app: web.Application) -> None:
    """`GET /admin/routes` and the runtime split: `PUT`/`DELETE /admin/routes/{name}/split`."""
    app.router.add_get("/admin/routes", _get_routes)
    app.router.add_put("/admin/routes/{name}/split", _put_split)
    app.router.add_delete("/admin/routes/{name}/split", _delete_split)
    app.router.add_get("/admin/fleet", _get_fleet)


# --- explain ----------------------------------------------------------------------------------

EXPLAIN_PARAMS = ("path", "host", "method", "header", "cookie")


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    """`name:value` query values as pairs; ValueError naming the malformed one."""
    pairs: list[tuple[str, str]] = []
    for raw in values:
        name, colon, value = raw.partition(":")
        name = name.strip()
        if not colon or not name or any(c in name for c in " \t;=,"):
            raise ValueError(
                f"{what}={raw!r}: expected {what}=NAME:VALUE, e.g. {what}=x-user-id:42"
            )
        pairs.append((name, value.strip()))
    return pairs


def explain_request(
    table: Table, query: Mapping[str, str], multi: Sequence[tuple[str, str]]
) -> Any:
    """The answer of `/admin/explain` for the query string; ValueError for a malformed one.

    `query` holds the single-valued parameters, `multi` every (key, value) in order (header
    and cookie repeat).
    """
    unknown = sorted({key for key, _ in multi if key not in EXPLAIN_PARAMS})
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(EXPLAIN_PARAMS)})"
        )
    for single in ("path", "host", "method"):
        if sum(1 for key, _ in multi if key == single) > 1:
            raise ValueError(f"{single} is given more than once")
    path = query.get("path", "/")
    if not path.startswith("/"):
        raise ValueError(f"path={path!r}: must start with '/'")
    method = query.get("method", "GET").upper()
    if not method.isascii() or not method.isalpha():
        raise ValueError(f"method={method!r}: expected an HTTP method such as GET")
    headers = _pairs([value for key, value in multi if key == "header"], "header")
    cookies = _pairs([value for key, value in multi if key == "cookie"], "cookie")
    for name, value in cookies:
        if ";" in value:
            raise ValueError(f"cookie={name}:{value!r}: a cookie value cannot contain ';'")
    if cookies:
        headers.append(("cookie", "; ".join(f"{name}={value}" for name, value in cookies)))
    # The same view the data plane builds from a request head, then the same `decide`.
    view = make_view(table, method, query.get("host", ""), path, headers)
    answer = explain(table, view)
    answer["request"] = {
        "method": method,
        "host": view.host,
        "path": view.path,
        "headers": dict(view.headers),
        "cookies": dict(view.cookies),
    }
    return answer


async def _get_explain(request: web.Request) -> web.Response:
    table = request.app[BACKEND].table
    try:
        answer = explain_request(table, request.query, list(request.query.items()))
    except ValueError as exc:
        return error_response(str(exc), 400)
    return json_response(answer)


def add_explain_routes(app: web.Application) -> None:
    """`GET /admin/explain`: where a request would go now, and why."""
    app.router.add_get("/admin/explain", _get_explain)


def create_admin_app(backend: AdminBackend, *, token: str | None) -> web.Application:
    """Build the admin application; `token` None disables authentication."""
    # The error shape outermost: a 404 or 405 behind the token check is JSON too.
    middlewares = [_json_errors, *([_auth_middleware(token)] if token else [])]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[BACKEND] = backend
    add_core_routes(app)
    add_metrics_routes(app)
    add_route_routes(app)
    add_explain_routes(app)
    add_rollout_routes(app)
    add_dashboard_routes(app, backend)
    return app


# Bounds of the admin plane, so that clients that hold connections open (slow heads, idle
# keep-alives, slow readers; on purpose or not) can never keep the probes from being answered.
# docs/admin.md, "Limits", describes them.
MAX_CONNECTIONS = 256
# From connect, or from the end of the previous response, to a complete request head.
HEAD_TIMEOUT = 10.0
# From a complete head to the last byte of the response handed to the kernel.
REQUEST_TIMEOUT = 60.0
SWEEP_EVERY = 1.0
BACKLOG = 1024


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """`wanted`, lowered to a quarter of the open-files limit (the rest is for everything else)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft // 4))


class _Connection(asyncio.Protocol):
    """One admin connection: aiohttp's protocol, wrapped so the server sees it come and go.

    aiohttp's `Server.connections` lists a connection only from its `connection_made`, which
    the event loop calls after a whole batch of accepts; counting and closing here keeps the
    cap exact under a burst.
    """

    __slots__ = ("_server", "busy", "closing", "connected", "handler", "since")

    def __init__(self, server: AdminServer, handler: RequestHandler, now: float) -> None:
        self._server = server
        self.handler = handler
        # Accept time, then the time its latest request head was complete.
        self.since = now
        # A handler is running for it (from the complete head until it returns).
        self.busy = False
        # The server is closing it (counted no more against the cap).
        self.closing = False
        self.connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = True
        self.handler.connection_made(transport)
        self._server.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        self.handler.eof_received()
        return None

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.on_lost(self)
        self.handler.connection_lost(exc)

    @property
    def sending(self) -> bool:
        """A response waits in the write buffer: the client reads slowly or not at all."""
        transport = self.handler.transport
        return (
            isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() > 0
        )

    def close(self) -> None:
        """Close it: a plain close when it waits for a head, an abort (a reset) when it is busy;
        a close would wait for a write buffer that a stuck client never drains."""
        self.closing = True
        transport = self.handler.transport
        if transport is None:
            return
        if self.busy or self.sending:
            # Linger 0: the kernel resets the connection and drops the unsent response, rather
            # than keep it for a client that does not read.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


class AdminServer:
    """Runs an admin application on a bound socket; `start` serves, `stop` closes.

    aiohttp bounds a head's size but neither the number of connections nor the time they take,
    so the server adds that (see the constants above):
    - at most `max_connections` connections: one more closes the connection that has waited
      longest for a request head (an idle keep-alive or a slow head); when every one is running
      a request, the one whose request began first. A probe always gets in.
    - `head_timeout`: aiohttp's keep-alive timer, which also runs from the connect and closes a
      connection that has not completed a head when it fires.
    - `request_timeout`: a request whose handler or response write (a client that does not read)
      takes longer is aborted.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int | None = None,
        head_timeout: float = HEAD_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._max_connections = max_connections or connection_cap()
        self._request_timeout = request_timeout
        # Every connection from accept to connection_lost, by aiohttp protocol.
        self._connections: dict[RequestHandler, _Connection] = {}
        self._listener: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        app.middlewares.insert(0, self._track_requests())
        # No access log: the admin plane is polled by probes and would drown the event log.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=head_timeout
        )

    def _track_requests(self) -> Middleware:
        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = self._connections.get(request.protocol)
            if connection is None:
                return await handler(request)
            connection.busy = True
            connection.since = asyncio.get_running_loop().time()
            try:
                return await handler(request)
            except ConnectionResetError:
                if request.transport is not None and not request.transport.is_closing():
                    raise
                # The client went away, or was aborted for holding its connection: there is
                # no one to answer (this response is never sent) and nothing to log.
                return web.Response(status=499)
            finally:
                connection.busy = False

        return track

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, a bound socket (listening or not); the server owns it from now on."""
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._accepted, sock=sock, backlog=BACKLOG)
        self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep)

    def _accepted(self) -> _Connection:
        server = self._runner.server
        assert server is not None, "start() first"
        connection = _Connection(self, server(), asyncio.get_running_loop().time())
        self._connections[connection.handler] = connection
        return connection

    def on_connected(self, new: _Connection) -> None:
        """Make room for `new` when the cap is reached (called once its transport exists)."""
        open_now = [c for c in self._connections.values() if not c.closing]
        if len(open_now) <= self._max_connections:
            return
        # Waiting for a head first (oldest wait first), then busy ones (oldest request first);
        # only connections that are connected already can be closed.
        candidates = [c for c in open_now if c is not new and c.handler.transport is not None]
        if candidates:
            min(candidates, key=lambda c: (c.busy or c.sending, c.since)).close()

    def on_lost(self, connection: _Connection) -> None:
        """Forget a connection that ended."""
        self._connections.pop(connection.handler, None)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for connection in list(self._connections.values()):
            if not connection.connected:
                # Accepted, but the loop failed to set the transport up (it then calls neither
                # connection_made nor connection_lost): not a connection to count.
                if now - connection.since > self._request_timeout:
                    self.on_lost(connection)
            elif (connection.busy or connection.sending) and (
                now - connection.since > self._request_timeout
            ):
                connection.close()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    async def stop(self) -> None:
        """Close the listener and the open admin connections."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
