"""The admin plane: an aiohttp application served on the `admin` address by the supervisor.

The app only translates HTTP to calls on an `AdminBackend` (the supervisor) and back to JSON;
it holds no state of its own. Routes are added by small `add_*_routes(app)` functions so later
features (metrics, runtime splits, rollout, explain) plug in without touching the others.

Security: with a token, every call but the probes and /metrics needs `Authorization: Bearer`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("turnout.admin")

# Probes and scraping must work without credentials (kubelet and Prometheus rarely have them).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


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


class AdminBackend(Protocol):
    """What the admin routes need from the supervisor."""

    def readiness(self) -> Readiness:
        """Ready means: a config is loaded, the workers serve it, and not draining."""
        ...

    def config_view(self) -> dict[str, Any]:
        """The body of GET /admin/config."""
        ...

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Reload the config file now; `trigger` names the cause for the log."""
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


def create_admin_app(backend: AdminBackend, *, token: str | None) -> web.Application:
    """Build the admin application; `token` None disables authentication."""
    middlewares = [_auth_middleware(token)] if token else []
    app = web.Application(middlewares=middlewares)
    app[BACKEND] = backend
    add_core_routes(app)
    return app


class AdminServer:
    """Runs an admin application on one address; `start` binds, `stop` closes."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        # No access log: the admin plane is polled by probes and would drown the event log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        self._host = host
        self._port = port

    async def start(self) -> None:
        """Bind and serve (OSError when the address is taken or not local)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        """Close the listener and the open admin connections."""
        await self._runner.cleanup()
