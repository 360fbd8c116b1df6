"""The supervisor: the one process that knows the config, and the parent of every worker.

`turnout run` always has this shape, also with `workers: 1`:

    supervisor (this module)                      workers (proxy.dataplane.worker), N processes
      reads + validates the config file             bind `listen` with SO_REUSEPORT
      admin plane (aiohttp) on `admin`              serve the data plane
      reloads: SIGHUP, POST /admin/reload, watch    apply each table they are sent
      restarts workers that die                     drain on SIGTERM and exit
      SIGTERM/SIGINT: the shutdown sequence

Supervisor and worker talk over one socketpair per worker (`proxy.runtime.channel`). Workers run
in their own session so a Ctrl-C in a terminal reaches only the supervisor, which forwards
exactly one SIGTERM to each worker (a worker treats a second signal as "exit now").

The supervisor also owns what must be one per Turnout, not one per worker: the active health
checks (`proxy.control.prober`; the down set goes to every worker), runtime splits and their
state file (`proxy.control.state`), and the metrics, summed over the workers at scrape time
(`proxy.control.metrics`).

Generations: every new table gets the next generation number, whether it comes from the file
(a reload) or from a runtime split change (`set_split`); the sha256 is the file's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from gzip import compress as gzip_compress
from typing import Any

import aiohttp.helpers
import aiohttp.http_parser
import orjson
import uvloop

from proxy.control.admin import (
    BACKLOG,
    AdminServer,
    Readiness,
    ReloadOutcome,
    RouteNotFound,
    create_admin_app,
    is_loopback,
)
from proxy.control.annotations import (
    Annotator,
    Event,
    carried,
    grafana_token,
    reload_event,
    reload_failed_event,
    split_text,
)
from proxy.control.fleet import (
    WRITE_ATTEMPTS,
    FleetConflict,
    FleetDisagreement,
    FleetStore,
    FleetUnavailable,
    Heartbeat,
    expand_instance,
)
from proxy.control.metrics import MetricsInput, Totals, render
from proxy.control.prober import Prober
from proxy.control.rollouts import RolloutController, fingerprint
from proxy.control.state import SavedState, load_state, save_state
from proxy.control.watch import watch_file
from proxy.core.config import (
    MAX_FILE_BYTES,
    ConfigError,
    config_sha256,
    format_issues,
    parse_config,
    spec_to_dict,
)
from proxy.core.counters import PairCounts, WorkerSnapshot, read_worker_snapshot
from proxy.core.health import EndpointKey
from proxy.core.spec import ConfigSpec
from proxy.core.table import CompiledRoute, Table, TableDiff, compile_table, diff_tables
from proxy.runtime.channel import (
    OP_APPLIED,
    OP_READY,
    OP_STATS,
    ControlChannel,
    ControlError,
    certs_message,
    encode,
    health_message,
    open_channel,
    table_message,
)
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import (
    ListenerMaterial,
    LoadedCertificate,
    TlsFileError,
    expiry_warnings,
    load_listener,
    load_material,
    material_problems,
    read_material,
    tls_file_problems,
)

log = logging.getLogger("turnout.supervisor")

TOKEN_ENV = "TURNOUT_ADMIN_TOKEN"

# Restart back-off for a worker that died: 0.1 s, doubling to 5 s; a worker that stayed up for
# 10 s counts as healthy again and its next crash restarts it quickly.
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
BACKOFF_RESET_AFTER = 10.0

# Workers get drain.delay + drain.shutdown to exit after SIGTERM; this margin covers their own
# teardown (closing idle clients, flushing the access log) before they are killed.
EXIT_MARGIN = 5.0
# After SIGKILL, how long to wait for the kernel to reap the workers.
KILL_REAP_TIMEOUT = 2.0
# Background tasks left at the very end (watch, readers) get this long to stop.
TASKS_STOP_TIMEOUT = 2.0

# Certificate renewal: the TLS listeners' files are read every CERT_POLL seconds; changed bytes
# are taken once they read the same SETTLE seconds later (a renewal writes the certificate and
# the key one after the other), so a renewed pair is served within about 1 s (contract: 2 s).
CERT_POLL = 0.5
SETTLE = 0.3
# A certificate that expires within this long is logged at every load.
EXPIRY_WARNING = 14 * 86400.0

# Static settings: bound once at start. A reload that changes them is applied only on restart.
STATIC_SETTINGS = ("listen", "listeners", "admin", "workers", "fleet")

# How long a scrape waits for the workers' counters; a worker that misses it counts with its
# last snapshot.
SCRAPE_DEADLINE = 1.0
# Every worker's counters are also polled in the background, so that a worker killed between
# two scrapes loses at most one poll period of counts (docs/metrics.md). The period grows for
# tables so large that a poll is costly: POLL_COST_FACTOR times the time the answers took,
# at most POLL_MAX, so polling keeps to about a tenth of the supervisor's time.
POLL_EVERY = 1.0
POLL_COST_FACTOR = 10.0
POLL_MAX = 10.0
# A worker whose stats snapshots cannot be read is logged at most once per this many seconds
# (with how many were dropped meanwhile); every bad snapshot is ignored, the last good one stays.
BAD_STATS_LOG_EVERY = 60.0
# gzip level of /metrics: level 1 is 4x faster than the default 6 and a third larger, about 20
# times smaller than the text either way (benchmarks/metrics_cost.py).
METRICS_GZIP_LEVEL = 1
# How long a runtime split change waits for every worker to apply the new table before it
# answers anyway (a worker that slow is logged).
APPLY_DEADLINE = 2.0

# route -> (weights, source): the runtime ("runtime"; "fleet" when the fleet shares it) or
# rollout ("rollout") split in force.
SplitOverrides = dict[str, tuple[dict[str, float], str]]
RUNTIME_SOURCES = ("runtime", "fleet")


class ConfigLoadError(Exception):
    """The config file could not be read or is invalid; `lines` holds one message per error."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def read_config_text(path: str) -> str:
    """The file's text (UTF-8); OSError or UnicodeDecodeError when it cannot be read.

    At most one byte more than MAX_FILE_BYTES is read: parse_config refuses a longer file
    without the whole of it in memory.
    """
    with open(path, encoding="utf-8") as f:
        return f.read(MAX_FILE_BYTES + 1)


def load_config(path: str) -> tuple[str, ConfigSpec]:
    """Read and validate a config file: (text, spec), or ConfigLoadError with every problem."""
    try:
        text = read_config_text(path)
    except OSError as exc:
        raise ConfigLoadError([f"{path}: cannot read the config file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigLoadError([f"{path}: the config file is not UTF-8 text: {exc}"]) from exc
    try:
        spec = parse_config(text, path)
    except ConfigError as exc:
        raise ConfigLoadError([str(issue) for issue in exc.issues]) from exc
    problems = tls_file_problems(spec)
    if problems:
        raise ConfigLoadError([f"{path}: {problem}" for problem in problems])
    return text, spec


def certificate_warnings(spec: ConfigSpec) -> list[str]:
    """Listener certificates that expire within 14 days or have expired (files already checked)."""
    warnings: list[str] = []
    now = time.time()
    for listener in spec.listeners:
        if listener.tls is not None:
            try:
                loaded = load_listener(listener.address, listener.tls)
            except TlsFileError:
                continue  # changed since the check; `validate` reports what it checked
            warnings += expiry_warnings(listener.address, loaded, now, EXPIRY_WARNING)
    return warnings


def admin_token() -> str | None:
    """The admin token from the environment; unset and empty both mean: no authentication."""
    return os.environ.get(TOKEN_ENV) or None


def state_file_is_folder(spec: ConfigSpec) -> str | None:
    """The error when `state_file` names an existing folder (the pure config cannot tell)."""
    if spec.state_file is not None and os.path.isdir(spec.state_file):
        return f"state_file: {spec.state_file} is a folder; give a file"
    return None


def startup_refusals(spec: ConfigSpec, token: str | None) -> list[str]:
    """Reasons not to start at all (empty list: go ahead)."""
    reasons: list[str] = []
    # The admin plane parses HTTP with aiohttp; its pure-Python parser is slow and lenient, and
    # a silent fallback to it is how request smuggling bugs get in.
    if aiohttp.helpers.NO_EXTENSIONS:
        reasons.append(
            "aiohttp's C extensions are disabled (AIOHTTP_NO_EXTENSIONS is set); "
            "unset it: the admin plane needs aiohttp's C HTTP parser"
        )
    elif aiohttp.http_parser.HttpRequestParser is aiohttp.http_parser.HttpRequestParserPy:
        reasons.append(
            "aiohttp's C HTTP parser is not available in this installation; "
            "reinstall aiohttp from a wheel built with its C extensions"
        )
    folder = state_file_is_folder(spec)
    if folder is not None:
        reasons.append(folder)
    if spec.fleet is not None:
        try:
            expand_instance(spec.fleet.instance)
        except ValueError as exc:
            reasons.append(str(exc))
    host = spec.admin[0]
    if token is None and not is_loopback(host):
        reasons.append(
            f"admin listens on {host}, which is not a loopback address, and {TOKEN_ENV} "
            f"is not set; set {TOKEN_ENV} or bind admin to 127.0.0.1"
        )
    return reasons


class StartError(Exception):
    """An address Turnout must listen on is not available; the message is one line for stderr."""


def format_address(host: str, port: int) -> str:
    """`host:port`, `[v6]:port`: as the config file writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    # The workers' rule (proxy.dataplane.worker, WorkerContext.listen): a ':' in the host means
    # IPv6.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_lock_name(host: str, port: int) -> str:
    """The abstract unix socket that one Turnout per `listen` address holds.

    Abstract names live per network namespace, like ports, and vanish with the process, so
    a crashed Turnout leaves no stale lock behind.
    """
    return f"\0turnout/listen/{format_address(host.lower(), port)}"


@dataclass(slots=True)
class AddressClaims:
    """The sockets that keep `listen` and `admin` this Turnout's (see `claim_addresses`).

    `lock` and `hold` are the first listener's; `more` has the locks and holds of the others.
    """

    lock: socket.socket
    hold: socket.socket | None
    admin: socket.socket
    more: list[tuple[socket.socket, socket.socket | None]] = field(default_factory=list)

    @property
    def locks(self) -> list[socket.socket]:
        """Every listener's lock socket."""
        return [self.lock] + [lock for lock, _ in self.more]

    def close(self) -> None:
        """Let the addresses go (closing the admin socket again after its server did is a no-op)."""
        for sock in (self.lock, self.hold, self.admin):
            if sock is not None:
                sock.close()
        for lock, hold in self.more:
            lock.close()
            if hold is not None:
                hold.close()


def _holder_pid(name: str) -> int | None:
    """The pid of the process that holds the lock socket `name`, when it can be told."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def _bind_error(what: str, host: str, port: int, exc: OSError) -> StartError:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return StartError(f"{what} address {where} is already in use by another process")
    return StartError(f"cannot listen on {where} ({what}): {exc.strerror or exc}")


def _check_free(host: str, port: int, what: str) -> None:
    """StartError unless a socket could listen on the address now.

    Without SO_REUSEPORT, so that any listener on it counts, Turnout workers' included; with
    SO_REUSEADDR, like the workers, so that old connections in TIME_WAIT do not.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _bind_error(what, host, port, exc) from None


def _hold(host: str, port: int) -> socket.socket | None:
    """A socket bound to `listen` with SO_REUSEPORT (never listening: it gets no connections).

    Until the workers listen, it keeps every other program off the port (their bind fails,
    as does another Turnout's check on an overlapping address such as 0.0.0.0); the workers
    of this Turnout can still join, being of the same user.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        # Old connections of another program still in TIME_WAIT refuse this bind, which has
        # no SO_REUSEADDR, but not the workers'. Then there is no hold: the lock and the check
        # still stand; only a start at the very same moment could slip in.
        sock.close()
        return None
    return sock


def _claim_listen(host: str, port: int) -> tuple[socket.socket, socket.socket | None]:
    """The lock and the hold of one listener address (StartError naming it)."""
    name = listen_lock_name(host, port)
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(name)
    except OSError as exc:
        lock.close()
        where = format_address(host, port)
        if exc.errno != errno.EADDRINUSE:
            raise StartError(f"cannot lock the listen address {where}: {exc.strerror}") from None
        pid = _holder_pid(name)
        holder = f"another Turnout (pid {pid})" if pid else "another Turnout"
        raise StartError(f"listen address {where} is already in use by {holder}") from None
    try:
        # Listening, so a second Turnout can ask who holds it (SO_PEERCRED).
        lock.listen(8)
        lock.setblocking(False)
        _check_free(host, port, "listen")
    except BaseException:
        lock.close()
        raise
    return lock, _hold(host, port)


def claim_addresses(spec: ConfigSpec) -> AddressClaims:
    """Make every listener address and `admin` this Turnout's, or StartError naming the address.

    A listener: the workers share it with SO_REUSEPORT, which would let a second Turnout of
    the same user share it too, silently taking half the traffic. So: a lock (an abstract unix
    socket named after the address) that a second Turnout cannot take; then a bind without
    SO_REUSEPORT, which fails if anything listens there; then `_hold`. `admin`: bound here,
    without SO_REUSEPORT, which is exclusive by itself.
    """
    claimed: list[tuple[socket.socket, socket.socket | None]] = []
    try:
        for listener in spec.all_listeners():
            claimed.append(_claim_listen(listener.host, listener.port))
        admin_host, admin_port = spec.admin
        admin = socket.socket(_family(admin_host), socket.SOCK_STREAM)
        try:
            admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            admin.bind((admin_host, admin_port))
            admin.listen(BACKLOG)
        except OSError as exc:
            admin.close()
            raise _bind_error("admin", admin_host, admin_port, exc) from None
    except BaseException:
        for lock, hold in claimed:
            lock.close()
            if hold is not None:
                hold.close()
        raise
    (lock, hold), *more = claimed
    return AddressClaims(lock=lock, hold=hold, admin=admin, more=more)


def resolve_workers(spec: ConfigSpec) -> int:
    """`workers: auto` (stored as 0) is the number of CPUs this process may run on."""
    return spec.workers or len(os.sched_getaffinity(0))


def describe_exit(returncode: int) -> str:
    """`exit code 3` or `killed by SIGKILL`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _worker_counts(snapshot: WorkerSnapshot | None) -> dict[str, int | None]:
    """`requests` (answered, all routes) and open `connections` of a worker's last snapshot."""
    if snapshot is None:
        return {"requests": None, "connections": None}
    requests = snapshot["no_route"]["count"] + sum(pair["count"] for pair in snapshot["routes"])
    return {"requests": requests, "connections": snapshot["connections"]}


def _utc_iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _route_dicts(spec: ConfigSpec) -> list[dict[str, Any]]:
    """The routes as the file has them (`spec_to_dict`): what /admin/routes shows of each."""
    routes = spec_to_dict(spec)["routes"]
    assert isinstance(routes, list)
    return routes


def _usable_overrides(spec: ConfigSpec, overrides: SplitOverrides, where: str) -> SplitOverrides:
    """The overrides that compile against `spec`; the others are logged and dropped."""
    kept: SplitOverrides = {}
    routes = {route.name for route in spec.routes}
    for route, override in overrides.items():
        if route not in routes:
            log.warning(
                "route %s: dropping the %s split %s: the config has no such route",
                route,
                override[1],
                where,
            )
            continue
        try:
            compile_table(spec, generation=0, sha256="", split_overrides={route: override})
        except ValueError as exc:
            log.warning("route %s: dropping the %s split %s: %s", route, override[1], where, exc)
        else:
            kept[route] = override
    return kept


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """One generation of the config: the file's text, its spec and the compiled table."""

    generation: int
    sha256: str
    text: str
    spec: ConfigSpec
    table: Table
    loaded_at: datetime


@dataclass(slots=True)
class WorkerHandle:
    """A running worker process and the supervisor's end of its control channel."""

    index: int
    process: asyncio.subprocess.Process
    channel: ControlChannel
    started_at: float
    pid: int
    ready: bool = False
    generation: int = 0
    # Scrapes waiting for its answer, by request id; None: its answer was unreadable.
    pending_stats: dict[int, asyncio.Future[WorkerSnapshot | None]] = field(default_factory=dict)
    # The newest stats snapshot it sent (read once, when it arrived): counted in a scrape it
    # misses, and folded into the retired totals when it dies, so the summed counters never go
    # down.
    last_stats: WorkerSnapshot | None = None
    # When it arrived (loop time).
    stats_at: float = 0.0
    # Unreadable snapshots: when the last was logged (loop time), and how many since then.
    bad_stats_logged_at: float = -math.inf
    bad_stats_unlogged: int = 0


class Supervisor:
    """Owns the config, the admin plane and the worker processes; `run` is the whole life."""

    def __init__(
        self,
        path: str,
        text: str,
        spec: ConfigSpec,
        *,
        access_log: bool = True,
        token: str | None = None,
        grafana_token: str | None = None,
        worker_argv: Sequence[str] = (sys.executable, "-m", "proxy.dataplane.worker"),
    ) -> None:
        # Absolute, so the watch, reloads and workers (which parse the same path) agree even if
        # something changes the working directory.
        self.path = os.path.abspath(path)
        self._access_log = access_log
        self._worker_argv = tuple(worker_argv)
        self._worker_count = resolve_workers(spec)
        self._static = {name: getattr(spec, name) for name in STATIC_SETTINGS}
        sha = config_sha256(text)
        saved = load_state(spec.state_file) if spec.state_file is not None else SavedState()
        # In a fleet the state file is this instance's cache of the shared state, used when it
        # starts while Redis is away; the fleet's document replaces it once connected.
        self._runtime_source = "runtime" if spec.fleet is None else "fleet"
        restored = {
            route: (dict(weights), self._runtime_source) for route, weights in saved.splits.items()
        }
        self._split_overrides: SplitOverrides = _usable_overrides(
            spec, restored, "in the state file"
        )
        # Deployment annotations (contract section 12): posted in the background to the
        # Grafana of the config in force at the time of each event.
        self.annotations = Annotator(grafana_token)
        # Rollouts (contract section 5): restored before the first table is compiled, so a
        # restarted proxy serves the rollout's weights from its first request.
        self.rollouts = RolloutController(self, annotate=self.annotate)
        file_table = compile_table(spec, generation=1, sha256=sha)
        for warning in self.rollouts.load(saved.rollouts, file_table):
            log.warning("%s", warning)
        self._split_overrides = self._with_rollouts(self._split_overrides, file_table)
        # Entries that no longer fit the config are rewritten away at start (and logged).
        self._state_stale = len(self._split_overrides) != len(restored)
        for route, (weights, _) in self._split_overrides.items():
            log.info("route %s: runtime split %s from the state file is in force", route, weights)
        self._current = LoadedConfig(
            generation=1,
            sha256=sha,
            text=text,
            spec=spec,
            table=compile_table(
                spec, generation=1, sha256=sha, split_overrides=self._split_overrides
            ),
            loaded_at=datetime.now(UTC),
        )
        self._last_error: str | None = None
        self._last_failed_sha: str | None = None
        self._pending_restart: list[str] = []
        # Reloads and runtime split changes run one at a time: each makes the next generation.
        self._change_lock = asyncio.Lock()
        self.reload_counts = {"success": 0, "failure": 0}

        self._workers: dict[int, WorkerHandle] = {}
        self._slot_tasks: list[asyncio.Task[None]] = []
        self._tasks = TaskSet("supervisor")
        self._stats_seq = 0
        # Counters of workers that died (their last snapshots), see proxy.control.metrics.
        self._retired = Totals()
        # Notified whenever a worker reports the generation it applied (or exits).
        self._applied = asyncio.Condition()
        self._prober = Prober(self._on_health_change)

        self._stopping = False
        self._draining = False
        self._fatal: str | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._watch_stop = asyncio.Event()

        # TLS listeners are bound at start (static): their certificates in force, as bytes
        # (what workers load) and loaded (names, expiry), renewed by `check_certificates`.
        self._tls_listeners = [(i, x) for i, x in enumerate(spec.listeners) if x.tls is not None]
        self._tls_material: tuple[ListenerMaterial, ...] = ()
        self.certificates: dict[str, list[LoadedCertificate]] = {}
        self._cert_generation = 0
        self._cert_error: str | None = None
        self._cert_failed: tuple[ListenerMaterial, ...] | None = None
        if self._tls_listeners:
            material = self._read_tls_material()
            try:
                self._install_certificates(material, self._load_certificates(material))
            except TlsFileError as exc:
                # Changed since load_config checked them: the workers read the files themselves.
                log.error("TLS certificates: %s", exc)

        self.fleet: FleetStore | None = None
        # The shared document in force here: the last one adopted, written or seeded. One the
        # store read since (`fleet.document`) that is not in force yet must be adopted before
        # anything is written on top of the revision it came with (see `_store`).
        self._fleet_applied: SavedState | None = None
        # (config sha256, digest of its upstreams and routes), computed once per config.
        self._table_digest = ("", "")
        if spec.fleet is not None:
            self.fleet = FleetStore(
                spec.fleet,
                expand_instance(spec.fleet.instance),
                on_document=self._on_fleet_document,
                seed=self._fleet_seed,
                heartbeat=self._fleet_heartbeat,
                counters=self._fleet_counters,
                on_leader=self._on_fleet_leader,
            )

        app = create_admin_app(self, token=token)
        self.admin_app = app
        self._admin = AdminServer(app)

    # --- state, as the admin plane and metrics see it -----------------------------------------

    @property
    def current(self) -> LoadedConfig:
        """The config generation in force."""
        return self._current

    @property
    def table(self) -> Table:
        """The supervisor's own compiled table of the generation in force (for explain)."""
        return self._current.table

    def readiness(self) -> Readiness:
        """Ready: config loaded, every live worker has reported ready, and not draining."""
        if self._draining:
            return Readiness(False, "draining")
        live = list(self._workers.values())
        ready = sum(1 for handle in live if handle.ready)
        # A slot whose worker is being restarted has no live worker; at least one must serve.
        if ready == 0 or ready < len(live):
            return Readiness(False, f"waiting for workers ({ready}/{self._worker_count} ready)")
        return Readiness(True, "ready")

    def config_view(self) -> dict[str, Any]:
        """The body of GET /admin/config."""
        current = self._current
        return {
            "generation": current.generation,
            "sha256": current.sha256,
            "loaded_at": _utc_iso(current.loaded_at),
            "path": self.path,
            "last_error": self._last_error or self._cert_error,
            "config": spec_to_dict(current.spec),
            "workers": [
                {
                    "index": handle.index,
                    "pid": handle.pid,
                    "generation": handle.generation,
                    "ready": handle.ready,
                    **_worker_counts(handle.last_stats),
                }
                for handle in sorted(self._workers.values(), key=lambda h: h.index)
            ],
            "pending_restart": list(self._pending_restart),
            "reloads": dict(self.reload_counts),
            "certificates": self.certificates_view(),
            "certificates_error": self._cert_error,
        }

    def routes_view(self) -> dict[str, Any]:
        """The body of GET /admin/routes: every route's splits, rules and rollout state."""
        current = self._current
        in_file = {route["name"]: route for route in _route_dicts(current.spec)}
        return {
            "generation": current.generation,
            "routes": [
                self._route_state(route, in_file[route.name]) for route in current.table.routes
            ],
        }

    def _route_state(self, route: CompiledRoute, in_file: Mapping[str, Any]) -> dict[str, Any]:
        override = self._split_overrides.get(route.name)
        runtime = override[0] if override is not None and override[1] in RUNTIME_SOURCES else None
        return {
            "name": route.name,
            "match": in_file["match"],
            "configured_split": in_file["split"],
            "effective_split": dict(route.split.shares),
            "split_source": route.split_source,
            "runtime_split": runtime,
            "overrides": in_file.get("overrides", []),
            "sticky": in_file.get("sticky"),
            "mirror": in_file.get("mirror"),
            "retries": route.retries,
            "rollout": self.rollouts.view(route.name),
            "rollout_config": in_file.get("rollout"),
        }

    def applied_generation(self) -> int:
        """The generation every ready worker has applied (the supervisor's when none is ready)."""
        return min(
            [self._current.generation]
            + [handle.generation for handle in self._workers.values() if handle.ready]
        )

    def annotate(self, event: Event) -> None:
        """Post a deployment annotation for `event` when the config asks for them; never waits."""
        self.annotations.post(self._current.spec.annotations, event)

    # --- runtime splits -------------------------------------------------------------------------

    async def set_split(self, route: str, weights: Mapping[str, float] | None) -> dict[str, Any]:
        """`_set_split`; in a fleet on the newest shared state, tried again when another
        instance changed it meanwhile (FleetUnavailable when Redis cannot be reached)."""
        if self.fleet is None:
            return await self._set_split(route, weights)
        for attempt in range(WRITE_ATTEMPTS):
            await self._fleet_refresh()
            try:
                return await self._set_split(route, weights)
            except FleetConflict:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _set_split(self, route: str, weights: Mapping[str, float] | None) -> dict[str, Any]:
        """Put a runtime split in force on `route`, or drop it (`weights` None).

        Dropping also releases a rollout of the route that ended (succeeded, failed,
        aborted): the file's split is in force again (contract section 5); a rollout in
        progress keeps its weights. Order: compile the new table (ValueError: rejected,
        nothing changes), write the state file (OSError: nothing changes), swap the table in,
        send it to every worker and wait, bounded, until they applied it. The answer is the
        route's new state with the generation. Setting the split already in force, or
        dropping none when no ended rollout holds the route, is a no-op.
        """
        async with self._change_lock:
            current = self._current
            if current.table.route(route) is None:
                raise RouteNotFound(route)
            paused = weights is not None and self.rollouts.runtime_split_set(route)
            if paused:
                log.info("route %s: a runtime split pauses its running rollout", route)
            overrides = dict(self._split_overrides)
            existing = overrides.get(route)
            released = False
            if weights is None:
                released = self.rollouts.release(route)
                if not released and (existing is None or existing[1] not in RUNTIME_SOURCES):
                    return self._route_answer(route)
                overrides.pop(route, None)
                # A rollout in progress takes the route back (its split was under the runtime's).
                overrides = self._with_rollouts(overrides, current.table)
            else:
                wanted = (dict(weights), self._runtime_source)
                if existing == wanted:
                    return self._route_answer(route)
                overrides[route] = wanted
            generation = current.generation + 1
            table = compile_table(
                current.spec,
                generation=generation,
                sha256=current.sha256,
                split_overrides=overrides,
            )
            try:
                await self._store(overrides, judged=False)
            except BaseException:
                self._undo_fleet_change()
                raise
            self._split_overrides = overrides
            self._install(replace(current, generation=generation, table=table))
            if weights is None:
                log.info("route %s: runtime split dropped; generation %d", route, generation)
            else:
                log.info(
                    "route %s: runtime split %s; generation %d", route, dict(weights), generation
                )
            if weights is not None:
                what = "runtime split set" + (" (its running rollout is paused)" if paused else "")
            elif released:
                what = self.rollouts.states[route].reason
            else:
                source = "the rollout's" if route in overrides else "the file's"
                what = f"runtime split dropped, {source} split is in force"
            self.annotate(_split_event(current.table, table, route, what))
            await self._wait_applied(generation, APPLY_DEADLINE)
            return self._route_answer(route)

    def _route_answer(self, name: str) -> dict[str, Any]:
        view = self.routes_view()
        (route,) = (route for route in view["routes"] if route["name"] == name)
        return {"generation": view["generation"], **route}

    def _install(self, loaded: LoadedConfig) -> None:
        """Make `loaded` the generation in force everywhere (no await: one swap)."""
        self._current = loaded
        # Series the new table no longer has leave the retired totals with it.
        self._retired.prune(loaded.table)
        self.broadcast(self._table_message())

    async def _wait_applied(self, generation: int, seconds: float) -> None:
        def applied() -> bool:
            return all(h.generation >= generation for h in self._workers.values() if h.ready)

        try:
            async with asyncio.timeout(seconds), self._applied:
                await self._applied.wait_for(applied)
        except TimeoutError:
            log.warning("not every worker applied generation %d within %.1fs", generation, seconds)

    async def _notify_applied(self) -> None:
        async with self._applied:
            self._applied.notify_all()

    def _export(self, overrides: SplitOverrides) -> SavedState:
        """The runtime splits and rollout state as the state file (or the fleet) keeps them."""
        return SavedState(
            splits={
                route: weights
                for route, (weights, source) in overrides.items()
                if source in RUNTIME_SOURCES
            },
            rollouts=self.rollouts.state_json(marks=self.fleet is not None),
        )

    async def _store(self, overrides: SplitOverrides, *, judged: bool) -> None:
        """Store the state that `overrides` and the rollouts make before it is put in force.

        Alone: the state file (OSError on failure). In a fleet: the shared document first
        (FleetUnavailable, FleetConflict; `judged` changes only while leading), then the
        state file as a cache (a failure there is logged only: the fleet has the state).
        """
        state = self._export(overrides)
        if self.fleet is not None:
            fetched = self.fleet.document
            if fetched is not None and fetched is not self._fleet_applied:
                if fetched != self._fleet_applied:
                    # The store already read a newer revision (its document waits for the
                    # change lock): a write now would pass the compare-and-set on that
                    # revision with this instance's older picture, losing the newer change
                    # and leaving this instance on another state than the fleet's.
                    raise FleetConflict("a newer shared state arrived and is not in force here")
                self._fleet_applied = fetched
            await self.fleet.write(state, fenced=judged)
            self._fleet_applied = self.fleet.document
            await self._write_cache(state)
            return
        path = self._current.spec.state_file
        if path is not None:
            await asyncio.to_thread(save_state, path, state)

    async def _write_cache(self, state: SavedState) -> None:
        path = self._current.spec.state_file
        if path is None:
            return
        try:
            await asyncio.to_thread(save_state, path, state)
        except OSError as exc:
            log.error("cannot write the state file %s (the fleet's cache): %s", path, exc)

    async def _persist_after_change(self, why: str) -> None:
        """Save the state after a change the file forced; a failure is logged, not raised."""
        try:
            await self._store(self._split_overrides, judged=False)
        except FleetConflict:
            log.warning("fleet: %s: another instance changed the shared state first", why)
            # The newest shared state is in force instead (as after any refused change).
            self._undo_fleet_change()
        except FleetUnavailable as exc:
            log.warning("fleet: %s not shared (Redis unreachable: %s)", why, exc)
            await self._write_cache(self._export(self._split_overrides))
        except OSError as exc:
            log.error(
                "cannot write the state file %s (%s): %s; a restart may bring back what it held",
                self._current.spec.state_file,
                why,
                exc,
            )

    # --- metrics --------------------------------------------------------------------------------

    async def gather_totals(self, timeout: float) -> Totals:  # noqa: ASYNC109
        """The counters of every worker, summed with the retired ones (proxy.control.metrics)."""
        await self.request_stats(timeout)
        return self.polled_totals()[0]

    def polled_totals(self) -> tuple[Totals, float]:
        """Every worker's newest snapshot summed with the retired totals, asking nothing new,
        and the loop time the newest snapshot arrived (0.0: none yet). No await: the live
        handles and the retired totals are one consistent picture (a worker that died
        meanwhile is in exactly one of the two)."""
        totals = Totals()
        newest = 0.0
        for handle in self._workers.values():
            if handle.last_stats is not None:
                totals.add_snapshot(handle.last_stats)
                newest = max(newest, handle.stats_at)
        totals.add(self._retired)
        return totals, newest

    async def metrics(self, *, gzip: bool) -> bytes:
        """The Prometheus text for GET /metrics, gzip-compressed with `gzip`."""
        totals = await self.gather_totals(SCRAPE_DEADLINE)
        view = MetricsInput(
            table=self._current.table,
            totals=totals,
            down=self._prober.down,
            reloads=dict(self.reload_counts),
            generation=self.applied_generation(),
            rollout_steps={
                name: state.step
                for name, state in self.rollouts.states.items()
                if self._current.table.route(name) is not None
            },
            rollout_verdicts=dict(self.rollouts.verdicts),
            config_loaded_at=self._current.loaded_at.timestamp(),
            certificate_expiry={
                (listener, cert.names[0]): cert.not_after
                for listener, certs in self.certificates.items()
                for cert in certs
            },
            annotations=dict(self.annotations.counts),
            fleet=None
            if self.fleet is None
            else (self.fleet.connected, self.fleet.may_lead(), len(self.fleet.live_members())),
        )
        # Rendering takes ~0.7 us per series (0.2 s for 5,000 routes that all saw traffic, see
        # benchmarks/metrics_cost.py); off the loop, health checks and probes keep their pace.
        # The view is this scrape's own: nothing else touches it meanwhile.
        return await asyncio.to_thread(_metrics_body, view, gzip)

    # --- health -----------------------------------------------------------------------------------

    def _on_health_change(self, down: frozenset[EndpointKey]) -> None:
        self.broadcast(health_message(sorted(down)))

    # --- reload ---------------------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Read the file and, when its content changed and is valid, make it the new generation.

        Same sha256 as the config in force: a no-op. Invalid: logged, counted, kept in
        `last_error`, and the old config stays. Reloads run one at a time.
        """
        async with self._change_lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> ReloadOutcome:
        current = self._current
        try:
            text = await asyncio.to_thread(read_config_text, self.path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            return self._reload_failed(trigger, None, [f"{self.path}: cannot read: {reason}"])
        sha = config_sha256(text)
        if sha == current.sha256:
            # The file is back to (or still at) the config in force: nothing is wrong any more.
            self._last_error = None
            self._last_failed_sha = None
            level = logging.DEBUG if trigger == "watch" else logging.INFO
            log.log(
                level,
                "reload (%s): file unchanged, generation %d stays",
                trigger,
                current.generation,
            )
            return ReloadOutcome(current.generation, changed=False)
        if trigger == "watch" and sha == self._last_failed_sha:
            # Another event on a file already rejected: do not log and count it twice.
            return ReloadOutcome(current.generation, changed=False, errors=self._last_errors())
        try:
            # Parsing a big file takes a while; keep the admin plane (and its probes) answering.
            spec = await asyncio.to_thread(parse_config, text, self.path)
        except ConfigError as exc:
            return self._reload_failed(trigger, sha, [str(issue) for issue in exc.issues])
        folder = state_file_is_folder(spec)
        if folder is not None:
            return self._reload_failed(trigger, sha, [f"{self.path}: {folder}"])
        # The listeners in force are bound at start and their files are the certificate
        # watch's business: a bad renewal must not block unrelated config changes.
        problems = await asyncio.to_thread(
            tls_file_problems, spec, listeners=spec.listeners != self._static["listeners"]
        )
        if problems:
            return self._reload_failed(trigger, sha, [f"{self.path}: {p}" for p in problems])

        # Compile to the side, then swap one reference; no await in between, so nothing sees a
        # half-made generation.
        generation = current.generation + 1
        # What the file changed, judged on the file alone (runtime splits aside).
        file_table = compile_table(spec, generation=generation, sha256=sha)
        diff = diff_tables(current.table, file_table)
        # A file change to a route's split or rollout ends its rollout (contract section 5).
        rollouts_changed = self.rollouts.reconcile(
            file_table, set(diff.routes_split_changed) | set(diff.routes_rollout_changed)
        )
        overrides = self._with_rollouts(self._overrides_after_reload(diff, spec), file_table)
        table = compile_table(spec, generation=generation, sha256=sha, split_overrides=overrides)
        state_changed = overrides != self._split_overrides or rollouts_changed
        state_moved = spec.state_file != current.spec.state_file
        self._split_overrides = overrides
        self._install(
            LoadedConfig(
                generation=generation,
                sha256=sha,
                text=text,
                spec=spec,
                table=table,
                loaded_at=datetime.now(UTC),
            )
        )
        # After the table message, so a worker knows the endpoints a health message names.
        self._prober.update(spec)
        self.reload_counts["success"] += 1
        self._last_error = None
        self._last_failed_sha = None
        log.info("reload (%s): generation %d in force (sha256 %s)", trigger, generation, sha[:12])
        self.annotate(reload_event(trigger, generation, sha, current.table, table))
        self._check_static_settings(spec)
        self._warn_expiring()
        if state_moved:
            log.info("state_file is now %s", spec.state_file or "(none: memory only)")
        if self.fleet is not None and state_changed:
            await self._share_reload(diff, file_table)
        elif state_changed or state_moved:
            await self._persist_after_change(f"reload to generation {generation}")
        return ReloadOutcome(self._current.generation, changed=True)

    async def _share_reload(self, diff: TableDiff, file_table: Table) -> None:
        """Store what a reload changed in the fleet's state (the caller holds the change lock).

        When another instance changed the state first, the reload's decisions (rollouts of
        changed routes end, runtime splits of routes whose split changed go) are made again on
        the newest state; Redis away: kept here and in the cache only (the next change or
        document from the fleet decides).
        """
        assert self.fleet is not None
        changed = set(diff.routes_split_changed) | set(diff.routes_rollout_changed)
        for _ in range(WRITE_ATTEMPTS):
            try:
                await self._store(self._split_overrides, judged=False)
                return
            except FleetUnavailable as exc:
                log.warning("fleet: the reload's changes are not shared (Redis: %s)", exc)
                await self._write_cache(self._export(self._split_overrides))
                return
            except FleetConflict:
                if self.fleet.document is None:
                    return
                self._adopt(self.fleet.document)
                self.rollouts.reconcile(file_table, changed)
                kept = {
                    route: override
                    for route, override in self._split_overrides.items()
                    if route not in diff.routes_split_changed and override[1] != "rollout"
                }
                self._put_in_force(self._with_rollouts(kept, file_table))
        log.warning("fleet: the reload's changes were not shared: the fleet kept changing")

    def _overrides_after_reload(self, diff: TableDiff, spec: ConfigSpec) -> SplitOverrides:
        """The split overrides that survive a reload to `spec`.

        The file is the authority once it changes: a runtime split of a route whose `split` the
        file changed goes, and so does any override the new file makes impossible (its route or
        one of its upstreams is gone).
        """
        overrides: SplitOverrides = {}
        for route, override in self._split_overrides.items():
            if override[1] == "rollout":
                continue  # recomputed from the rollout controller by the caller
            if route in diff.routes_split_changed:
                log.info(
                    "route %s: the file changed its split; the runtime split %s is dropped",
                    route,
                    override[0],
                )
            else:
                overrides[route] = override
        return _usable_overrides(spec, overrides, "after the reload")

    def _with_rollouts(self, overrides: SplitOverrides, table: Table) -> SplitOverrides:
        """`overrides` with every active rollout's split added; a runtime split wins."""
        merged = {route: o for route, o in overrides.items() if o[1] in RUNTIME_SOURCES}
        for route, override in self.rollouts.splits(table).items():
            merged.setdefault(route, override)
        return merged

    async def rollout_changed(self, *, judged: bool = False) -> bool:
        """The rollout controller moved a weight or a state: persist, push the table.

        In a fleet the change is stored in the shared state first; when that is refused
        (Redis away, another instance first, or a judged change and this instance no longer
        leads) the change is undone here and, for an operator's call, the error raised.
        """
        async with self._change_lock:
            current = self._current
            overrides = self._with_rollouts(self._split_overrides, current.table)
            generation = current.generation
            if self.fleet is not None:
                try:
                    await self._store(overrides, judged=judged)
                except (FleetConflict, FleetUnavailable) as exc:
                    self._undo_fleet_change()
                    if not judged:
                        raise
                    log.warning("fleet: a rollout change was not stored, so not made: %s", exc)
                    return False
            if overrides != self._split_overrides:
                generation += 1
                table = compile_table(
                    current.spec,
                    generation=generation,
                    sha256=current.sha256,
                    split_overrides=overrides,
                )
                self._split_overrides = overrides
                self._install(replace(current, generation=generation, table=table))
            if self.fleet is None:
                await self._persist_after_change("rollout change")
        await self._wait_applied(generation, APPLY_DEADLINE)
        return True

    async def rollout_command(self, route: str, action: str) -> dict[str, Any]:
        """Run POST /admin/routes/{route}/rollout/{action}; the route's new state.

        RouteNotFound for an unknown route; RolloutError when the rollout's state does not
        allow the action (or the route has no rollout). Starting a rollout drops the route's
        runtime split: the rollout's weights take over.
        """
        if self._current.table.route(route) is None:
            raise RouteNotFound(route)
        if self.fleet is None:
            await self._rollout_command(route, action)
            return self._route_answer(route)
        for attempt in range(WRITE_ATTEMPTS):
            await self._fleet_refresh()
            if action == "start":
                self._check_fleet_agrees(route)
            try:
                await self._rollout_command(route, action)
            except FleetConflict:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
            else:
                break
        return self._route_answer(route)

    async def _rollout_command(self, route: str, action: str) -> None:
        if action == "start" and route in self._split_overrides:
            async with self._change_lock:
                if self._split_overrides.get(route, ("", ""))[1] in RUNTIME_SOURCES:
                    self._split_overrides = {
                        name: o for name, o in self._split_overrides.items() if name != route
                    }
        await self.rollouts.command(self._current.table, route, action)

    # --- fleet ----------------------------------------------------------------------------------

    def fleet_view(self) -> dict[str, Any] | None:
        """The body of GET /admin/fleet (None: not in a fleet)."""
        return None if self.fleet is None else self.fleet.view()

    async def rollout_stats(
        self,
        timeout: float,  # noqa: ASYNC109
    ) -> Sequence[Sequence[PairCounts]]:
        """What rollouts judge on: every worker's pairs, or every fleet instance's."""
        stats = await self.request_stats(timeout)
        if self.fleet is None:
            return [snapshot["routes"] for snapshot in stats]
        return await self.fleet.fleet_counters()

    def may_judge(self) -> bool:
        """Rollouts move here: always alone; in a fleet only on the leader, while it leads."""
        return self.fleet is None or self.fleet.may_lead()

    def _check_fleet_agrees(self, route: str) -> None:
        assert self.fleet is not None
        compiled = self._current.table.route(route)
        if compiled is None or compiled.rollout is None:
            return  # the controller says what is wrong
        others = self.fleet.disagreeing(route, fingerprint(compiled))
        if others:
            raise FleetDisagreement(route, others)

    async def _fleet_refresh(self) -> None:
        """Before a change: take the newest shared state (FleetUnavailable when unreachable)."""
        assert self.fleet is not None
        if await self.fleet.refresh():
            await self._on_fleet_document(self.fleet.document or SavedState())

    async def _on_fleet_document(self, document: SavedState) -> None:
        async with self._change_lock:
            # The newest document known once the lock is ours, not the one that woke us: a
            # change this instance stored while we waited is newer than `document`, and
            # putting `document` in force would leave this instance behind at a revision
            # it already has (so no later look would correct it).
            assert self.fleet is not None
            newest = self.fleet.document or document
            self._adopt(newest)
        await self._write_cache(newest)

    def _fleet_seed(self) -> SavedState:
        """What this instance knows, for an empty store to start from (then in force here)."""
        state = self._export(self._split_overrides)
        self._fleet_applied = state
        return state

    def _undo_fleet_change(self) -> None:
        """A change was refused by the fleet: back to the newest shared state known."""
        if self.fleet is not None and self.fleet.document is not None:
            self._adopt(self.fleet.document)

    def _adopt(self, document: SavedState) -> None:
        """Put the fleet's shared state in force here (the caller holds the change lock)."""
        self._fleet_applied = document
        current = self._current
        self.rollouts.adopt(document.rollouts, current.table)
        shared = {route: (dict(weights), "fleet") for route, weights in document.splits.items()}
        overrides = self._with_rollouts(
            _usable_overrides(current.spec, shared, "from the fleet"), current.table
        )
        self._put_in_force(overrides)

    def _put_in_force(self, overrides: SplitOverrides) -> None:
        """Compile and install a new generation with `overrides` (no-op when they are in
        force already); the caller holds the change lock."""
        current = self._current
        if overrides == self._split_overrides:
            return
        generation = current.generation + 1
        table = compile_table(
            current.spec, generation=generation, sha256=current.sha256, split_overrides=overrides
        )
        for name in sorted(set(overrides) | set(self._split_overrides)):
            if overrides.get(name) != self._split_overrides.get(name):
                log.info(
                    "route %s: the fleet's split %s is in force; generation %d",
                    name,
                    overrides[name][0] if name in overrides else "(the file's)",
                    generation,
                )
        self._split_overrides = overrides
        self._install(replace(current, generation=generation, table=table))

    def _fleet_heartbeat(self) -> Heartbeat:
        current = self._current
        if self._table_digest[0] != current.sha256:
            file = spec_to_dict(current.spec)
            routing = orjson.dumps({"upstreams": file["upstreams"], "routes": file["routes"]})
            self._table_digest = (current.sha256, hashlib.sha256(routing).hexdigest())
        return Heartbeat(
            generation=current.generation,
            sha256=current.sha256,
            table_sha256=self._table_digest[1],
            routes={r.name: fingerprint(r) for r in current.table.routes if r.rollout is not None},
        )

    def _fleet_counters(self) -> list[PairCounts]:
        """This instance's cumulative counters of every (route, upstream) a rollout judges."""
        table = self._current.table
        judged = {
            (route.name, upstream)
            for route in table.routes
            if route.rollout is not None
            for upstream in (route.rollout.canary, route.rollout.baseline)
        }
        if not judged:
            return []  # published every period: no summing of every pair for nothing
        totals = self.polled_totals()[0]
        return [
            {
                "route": route,
                "upstream": upstream,
                "codes": {str(code): count for code, count in pair.codes.items()},
                "buckets": list(pair.buckets),
            }
            for (route, upstream), pair in totals.pairs.items()
            if (route, upstream) in judged
        ]

    def _on_fleet_leader(self, leading: bool) -> None:
        if not leading:
            self.rollouts.hold()

    def _reload_failed(self, trigger: str, sha: str | None, errors: list[str]) -> ReloadOutcome:
        self.reload_counts["failure"] += 1
        # One file can hold 100,000 errors: the log, last_error and the 400 show the first.
        shown = format_issues(errors)
        self._last_error = "\n".join(shown)
        self._last_failed_sha = sha
        log.error(
            "reload (%s) failed; generation %d stays in force:\n  %s",
            trigger,
            self._current.generation,
            "\n  ".join(shown),
        )
        self.annotate(reload_failed_event(trigger, self._current.generation, errors))
        return ReloadOutcome(self._current.generation, changed=False, errors=tuple(shown))

    def _last_errors(self) -> tuple[str, ...]:
        return tuple(self._last_error.split("\n")) if self._last_error else ()

    # --- certificates -----------------------------------------------------------------------------

    def _read_tls_material(self) -> tuple[ListenerMaterial, ...]:
        """The bytes of every TLS listener's files (TlsFileError naming an unreadable one)."""
        return tuple(
            read_material(listener.address, listener.tls)
            for _, listener in self._tls_listeners
            if listener.tls is not None
        )

    def _load_certificates(
        self, material: tuple[ListenerMaterial, ...]
    ) -> dict[str, list[LoadedCertificate]]:
        return {
            listener.address: load_material(listener.tls, pem)
            for (_, listener), pem in zip(self._tls_listeners, material, strict=True)
            if listener.tls is not None
        }

    def _install_certificates(
        self, material: tuple[ListenerMaterial, ...], loaded: dict[str, list[LoadedCertificate]]
    ) -> None:
        self._tls_material = material
        self.certificates = loaded
        self._warn_expiring()

    def _warn_expiring(self) -> None:
        now = time.time()
        for listener, certs in self.certificates.items():
            for line in expiry_warnings(listener, certs, now, EXPIRY_WARNING):
                log.warning("%s", line)

    def certificates_view(self) -> list[dict[str, Any]]:
        """The TLS listeners' certificates in force, for GET /admin/config."""
        return [
            {
                "listener": listener,
                "cert": cert.files.cert,
                "key": cert.files.key,
                "names": list(cert.names),
                "not_after": _utc_iso(datetime.fromtimestamp(cert.not_after, UTC)),
            }
            for listener, certs in self.certificates.items()
            for cert in certs
        ]

    async def watch_certificates(self) -> None:
        """Look for renewed certificate files every CERT_POLL seconds, until cancelled."""
        while True:
            await asyncio.sleep(CERT_POLL)
            await self.check_certificates()

    async def check_certificates(self) -> bool:
        """Take renewed certificate files into use when they pass the checks; True if taken.

        A pair that fails (unreadable, not PEM, key not matching, no names) keeps the old one
        in force: logged, counted as a reload failure, shown in /admin/config until the files
        are good again.
        """
        try:
            material = await asyncio.to_thread(self._read_tls_material)
        except TlsFileError as exc:
            material = None
            error = str(exc)
        if material is not None:
            if material == self._tls_material:
                self._cert_failed = None
                self._cert_error = None
                return False
            if material == self._cert_failed:
                return False  # already reported
            # Wait for the writes of a renewal to settle: the key may lag the certificate.
            await asyncio.sleep(SETTLE)
            try:
                again = await asyncio.to_thread(self._read_tls_material)
            except TlsFileError:
                return False  # still moving: the next look decides
            if again != material:
                return False
            problems = [
                problem
                for (index, listener), pem in zip(self._tls_listeners, material, strict=True)
                if listener.tls is not None
                for problem in await asyncio.to_thread(material_problems, index, listener.tls, pem)
            ]
            if not problems:
                loaded = await asyncio.to_thread(self._load_certificates, material)
                self._cert_failed = None
                self._cert_error = None
                self._cert_generation += 1
                self._install_certificates(material, loaded)
                self.reload_counts["success"] += 1
                self.broadcast(certs_message(self._cert_generation, material))
                log.info(
                    "certificates renewed (certificate generation %d): %s",
                    self._cert_generation,
                    "; ".join(
                        f"{listener}: {', '.join(c.names[0] for c in certs)}"
                        for listener, certs in loaded.items()
                    ),
                )
                return True
            error = "; ".join(problems)
            self._cert_failed = material
        elif self._cert_error is not None:
            return False  # the same unreadable state, already reported
        self._cert_error = f"certificate renewal refused, the old certificates stay: {error}"
        self.reload_counts["failure"] += 1
        log.error("%s", self._cert_error)
        return False

    def _check_static_settings(self, spec: ConfigSpec) -> None:
        changed = [name for name in STATIC_SETTINGS if getattr(spec, name) != self._static[name]]
        if changed and changed != self._pending_restart:
            log.warning(
                "%s changed in the file; restart turnout to apply (they are bound at start)",
                ", ".join(changed),
            )
        self._pending_restart = changed

    def _table_message(self) -> dict[str, object]:
        current = self._current
        return table_message(
            generation=current.generation,
            sha256=current.sha256,
            path=self.path,
            spec=current.spec,
            split_overrides=self._split_overrides,
        )

    def broadcast(self, msg: dict[str, object]) -> None:
        """Send one control message to every live worker (e.g. a `health` message)."""
        # Encoded once for all workers: a table message carries the whole file.
        line = encode(msg)
        for handle in self._workers.values():
            self._send(handle, line)

    def _send(self, handle: WorkerHandle, line: bytes) -> None:
        handle.channel.send_encoded(line)
        self._tasks.spawn(self._drain_channel(handle), name=f"drain-worker-{handle.index}")

    async def _drain_channel(self, handle: WorkerHandle) -> None:
        # A worker that died mid-write is noticed (and restarted) by its slot; nothing to do here.
        with contextlib.suppress(ConnectionError):
            await handle.channel.drain()

    async def _on_file_change(self) -> None:
        await self.reload("watch")

    # --- stats ----------------------------------------------------------------------------------

    async def poll_stats(self) -> None:
        """Refresh every worker's last snapshot in the background, until cancelled.

        A worker's last snapshot is what survives it when it is killed (folded into the
        retired totals), so this bounds what a kill loses to one poll period: POLL_EVERY, or
        more for a table so large that polls are costly (see POLL_COST_FACTOR).
        """
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.request_stats(SCRAPE_DEADLINE)
            # The time the answers took, not the deadline a stopped worker makes us wait for.
            answered = [
                h.stats_at - started for h in self._workers.values() if h.stats_at > started
            ]
            cost = max(answered, default=0.0)
            period = min(POLL_MAX, max(POLL_EVERY, POLL_COST_FACTOR * cost))
            await asyncio.sleep(max(0.0, started + period - loop.time()))

    # The deadline is the caller's (a scrape has its own), so it is a parameter.
    async def request_stats(self, timeout: float) -> list[WorkerSnapshot]:  # noqa: ASYNC109
        """Ask every ready worker for its stats; the readable answers that arrive within
        `timeout`."""
        self._stats_seq += 1
        request_id = self._stats_seq
        loop = asyncio.get_running_loop()
        asked: list[tuple[WorkerHandle, asyncio.Future[WorkerSnapshot | None]]] = []
        for handle in self._workers.values():
            if not handle.ready:
                continue
            future: asyncio.Future[WorkerSnapshot | None] = loop.create_future()
            handle.pending_stats[request_id] = future
            handle.channel.send({"op": OP_STATS, "id": request_id})
            asked.append((handle, future))
        if not asked:
            return []
        await asyncio.wait([future for _, future in asked], timeout=timeout)
        answers: list[WorkerSnapshot] = []
        for handle, future in sorted(asked, key=lambda pair: pair[0].index):
            handle.pending_stats.pop(request_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled() and (answer := future.result()) is not None:
                answers.append(answer)
        return answers

    # --- workers --------------------------------------------------------------------------------

    async def _run_slot(self, index: int) -> None:
        """Keep one worker running in slot `index` until shutdown, restarting it when it dies."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_START
        ever_ready = False
        while not self._stopping:
            try:
                handle = await self._spawn(index)
            except OSError as exc:
                log.error("worker %d: cannot start: %s", index, exc)
                returncode, uptime, was_ready = 1, 0.0, False
            else:
                returncode = await self._supervise(handle)
                uptime = loop.time() - handle.started_at
                was_ready = handle.ready
            if self._stopping:
                return
            if not ever_ready and not was_ready:
                # The first worker of a slot never came up (port taken, bad environment):
                # restarting would only loop; stop with an error instead.
                self._fail(
                    f"worker {index} exited ({describe_exit(returncode)}) before it was ready"
                )
                return
            ever_ready = True
            if uptime >= BACKOFF_RESET_AFTER:
                delay = BACKOFF_START
            log.error(
                "worker %d exited unexpectedly (%s); restarting in %.1fs",
                index,
                describe_exit(returncode),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _spawn(self, index: int) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = child_sock.fileno()
            argv = [*self._worker_argv, "--control-fd", str(fd), "--index", str(index)]
            if not self._access_log:
                argv.append("--no-access-log")
            # stdout/stderr are inherited: stdout carries the access log, stderr the events.
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(fd,), start_new_session=True
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            # The child has its own copy; ours would keep the channel open after the child dies.
            child_sock.close()
        channel = await open_channel(parent_sock)
        handle = WorkerHandle(
            index=index,
            process=process,
            channel=channel,
            started_at=asyncio.get_running_loop().time(),
            pid=process.pid,
        )
        self._workers[index] = handle
        if self._tls_material:
            # Before the first table: the worker binds its listeners when that table arrives.
            self._send(handle, encode(certs_message(self._cert_generation, self._tls_material)))
        self._send(handle, encode(self._table_message()))
        # Right behind its first table, so a restarted worker never routes to an endpoint the
        # health checks already took down.
        self._send(handle, encode(health_message(sorted(self._prober.down))))
        if self._stopping:
            # Shutdown began while this worker was starting: it drains like the others.
            self._signal(handle, signal.SIGTERM)
        return handle

    async def _supervise(self, handle: WorkerHandle) -> int:
        """Serve one worker's messages until it exits; returns its exit status."""
        reader = self._tasks.spawn(self._read_worker(handle), name=f"read-worker-{handle.index}")
        returncode = await handle.process.wait()
        reader.cancel()
        handle.channel.close()
        for future in handle.pending_stats.values():
            future.cancel()
        # Fold and forget in one step (no await): a scrape sees this worker's counters either
        # live or retired, never both, never neither.
        if handle.last_stats is not None:
            self._retired.add_snapshot(handle.last_stats, gauges=False)
            self._retired.prune(self._current.table)
        if self._workers.get(handle.index) is handle:
            del self._workers[handle.index]
        # A split change waiting for every worker to apply it no longer waits for this one.
        await self._notify_applied()
        return returncode

    async def _read_worker(self, handle: WorkerHandle) -> None:
        while True:
            try:
                msg = await handle.channel.recv()
            except ControlError as exc:
                # A worker that speaks garbage is broken; its slot restarts it.
                log.error("worker %d (pid %d): %s; killing it", handle.index, handle.pid, exc)
                self._signal(handle, signal.SIGKILL)
                return
            if msg is None:
                return
            op = msg.get("op")
            if op == OP_READY:
                handle.ready = True
                handle.pid = int(msg.get("pid", handle.pid))
                handle.generation = int(msg.get("generation", 0))
                log.info(
                    "worker %d ready (pid %d, generation %d)",
                    handle.index,
                    handle.pid,
                    handle.generation,
                )
                await self._notify_applied()
            elif op == OP_APPLIED:
                handle.generation = int(msg.get("generation", 0))
                await self._notify_applied()
            elif op == OP_STATS:
                self._on_stats(handle, msg)
            else:
                log.warning("worker %d: unknown control message %r", handle.index, op)

    def _on_stats(self, handle: WorkerHandle, msg: Mapping[str, object]) -> None:
        """A worker's stats answer: the one place its snapshot is checked (every reader of
        `last_stats` and of `request_stats` trusts it). An unreadable one is logged, rate
        limited, and ignored: the worker's last good snapshot stays, and the scrape that asked
        goes on without waiting for it."""
        request_id = msg.get("id")
        future = (
            handle.pending_stats.get(request_id)
            if type(request_id) is int  # not a bool, not a float
            else None
        )
        try:
            snapshot: WorkerSnapshot | None = read_worker_snapshot(msg.get("data"))
        except ValueError as exc:
            snapshot = None
            self._bad_stats(handle, str(exc))
        else:
            # Kept even when the scrape that asked has given up: it is newer than the last.
            handle.last_stats = snapshot
            handle.stats_at = asyncio.get_running_loop().time()
        if future is not None and not future.done():
            future.set_result(snapshot)

    def _bad_stats(self, handle: WorkerHandle, error: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - handle.bad_stats_logged_at < BAD_STATS_LOG_EVERY:
            handle.bad_stats_unlogged += 1
            return
        also = (
            f" ({handle.bad_stats_unlogged} more since the last such message)"
            if handle.bad_stats_unlogged
            else ""
        )
        log.warning(
            "worker %d (pid %d): stats snapshot ignored, its last readable one counts: %s%s",
            handle.index,
            handle.pid,
            error,
            also,
        )
        handle.bad_stats_logged_at = now
        handle.bad_stats_unlogged = 0

    def _signal(self, handle: WorkerHandle, signum: signal.Signals) -> None:
        # The process may have exited since we last looked; that is fine.
        with contextlib.suppress(ProcessLookupError):
            handle.process.send_signal(signum)

    def _fail(self, reason: str) -> None:
        log.error("%s; shutting down", reason)
        self._fatal = reason
        self._begin_stop()

    # --- signals and shutdown -------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self._stopping = True
        # Set here, in the signal handler, so /readyz is 503 from the very next request.
        self._draining = True
        self._stop.set()

    def request_stop(self) -> None:
        """Start the shutdown sequence, as a first SIGTERM would (used by `turnout demo`)."""
        if not self._stopping:
            self._begin_stop()

    def _on_stop_signal(self, signum: signal.Signals) -> None:
        if not self._stopping:
            log.info("%s received: draining (send it again to exit at once)", signum.name)
            self._begin_stop()
            return
        log.warning("%s received again: killing the workers and exiting now", signum.name)
        for handle in self._workers.values():
            self._signal(handle, signal.SIGKILL)
        self._force.set()

    def _on_hangup(self) -> None:
        if not self._stopping:
            self._tasks.spawn(self.reload("SIGHUP"), name="reload-sighup")

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0 clean, 1 refused or forced).

        First `listen` and `admin` are made this Turnout's: when one is taken, one line on
        stderr names it and the status is 1, before anything was started.
        """
        try:
            claims = claim_addresses(self._current.spec)
        except StartError as exc:
            print(f"turnout: cannot start: {exc}", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        # Accept and drop the connections of Turnouts asking who holds the lock (SO_PEERCRED),
        # so they never fill its backlog.
        for lock in claims.locks:
            loop.add_reader(lock.fileno(), _drop_connection, lock)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            return await self._serve(claims)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for lock in claims.locks:
                loop.remove_reader(lock.fileno())
            claims.close()

    async def _serve(self, claims: AddressClaims) -> int:
        spec = self._current.spec
        await self._admin.start(claims.admin)
        if spec.state_file is None and spec.fleet is None:
            log.warning(
                "no state_file: runtime split changes and rollout state are kept in memory only"
            )
        elif spec.state_file is None:
            log.info(
                "fleet %s: no state_file, so no local cache: an instance that starts while "
                "Redis is away serves the file's splits until it connects",
                spec.fleet.name if spec.fleet is not None else "",
            )
        elif self._state_stale:
            await self._persist_after_change("dropping entries that no longer fit the config")
        if spec.annotations is not None and not self.annotations.authorized:
            log.warning(
                "annotations.grafana is set but TURNOUT_GRAFANA_TOKEN is not: annotations are "
                "posted without a token, which Grafana refuses unless it allows anonymous edits"
            )
        self._prober.update(spec)
        log.info(
            "turnout supervisor (pid %d): config %s generation 1, admin on %s:%d, %d worker(s)",
            os.getpid(),
            self.path,
            *spec.admin,
            self._worker_count,
        )
        for index in range(self._worker_count):
            self._slot_tasks.append(self._tasks.spawn(self._run_slot(index), name=f"slot-{index}"))
        self._tasks.spawn(
            watch_file(self.path, self._on_file_change, self._watch_stop), name="config-watch"
        )
        self._tasks.spawn(self.rollouts.run(), name="rollouts")
        if self.fleet is not None:
            self._tasks.spawn(self.fleet.run(), name="fleet")
        self._tasks.spawn(self.poll_stats(), name="poll-stats")
        if self._tls_listeners:
            self._tasks.spawn(self.watch_certificates(), name="certificate-watch")
        await self._stop.wait()
        return await self._shutdown()

    async def _shutdown(self) -> int:
        """The shutdown sequence. A second signal sets `_force` and cuts every wait short."""
        drain = self._current.spec.drain

        # 1. /readyz already answers 503 (set in the signal handler), so load balancers stop
        #    sending new connections while the workers keep serving for drain.delay.
        # 2. No more reloads from the file.
        self._watch_stop.set()

        # 3. Forward SIGTERM once to every worker. Each runs its own drain: serve on for
        #    drain.delay, close the listener, give in-flight requests up to drain.shutdown,
        #    close idle keep-alive clients, exit 0.
        for handle in self._workers.values():
            self._signal(handle, signal.SIGTERM)

        # 4. Wait for every worker to exit, bounded by the drain budget plus a margin.
        budget = drain.delay + drain.shutdown + EXIT_MARGIN
        all_exited = await self._wait_slots(budget)

        # 5. Forced path: SIGKILL whoever is still there (after the budget, or on a second
        #    signal, whose handler already sent SIGKILL).
        if not all_exited:
            stragglers = list(self._workers.values())
            if stragglers and not self._force.is_set():
                log.warning(
                    "%d worker(s) still running %.1fs after SIGTERM; killing them",
                    len(stragglers),
                    budget,
                )
            for handle in stragglers:
                self._signal(handle, signal.SIGKILL)
            await self._wait_slots(KILL_REAP_TIMEOUT, forced_ok=True)
        if self._force.is_set():
            # A second signal means now: no graceful close of the admin plane.
            return 1

        # 6. Health checks ran for as long as workers served; now they have no one to tell.
        #    Rollout webhooks: gates stop, notifications under way get a short grace; so do
        #    annotations under way.
        await self._prober.close()
        if self.fleet is not None:
            # Lets go of the leader lease, so another instance takes over at once.
            await self.fleet.close()
        await self.rollouts.close()
        await self.annotations.close()

        # 7. Stop the admin plane last, so /healthz and /readyz (503) answered during the drain.
        await self._admin.stop()

        # 8. Background tasks: the watch, channel readers.
        await self._tasks.cancel_all(TASKS_STOP_TIMEOUT)
        log.info("turnout stopped")
        return 1 if self._fatal else 0

    async def _wait_slots(self, seconds: float, *, forced_ok: bool = False) -> bool:
        """Wait until every slot's worker has exited: True; False at the deadline or on force.

        With `forced_ok`, a second signal does not cut the wait short (used while reaping).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        pending = {task for task in self._slot_tasks if not task.done()}
        force_wait = self._tasks.spawn(self._force.wait(), name="force-wait")
        try:
            while pending:
                if self._force.is_set() and not forced_ok:
                    return False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                waiting: set[asyncio.Future[Any]] = set(pending)
                if not forced_ok:
                    waiting.add(force_wait)
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
            return True
        finally:
            force_wait.cancel()


def _split_event(old: Table, new: Table, name: str, what: str) -> Event:
    """The annotation of a runtime split change of route `name`: `what` happened, and the
    split went from `old`'s to `new`'s."""
    before_route, after_route = old.route(name), new.route(name)
    assert before_route is not None
    assert after_route is not None
    before, after = dict(before_route.split.shares), dict(after_route.split.shares)
    text = f"{name}: {what}: {split_text(after)} (was {split_text(before)})"
    return Event(kind="split", text=text, routes=(name,), upstreams=carried(before, after))


def _metrics_body(view: MetricsInput, gzip: bool) -> bytes:
    text = render(view)
    return gzip_compress(text, compresslevel=METRICS_GZIP_LEVEL, mtime=0) if gzip else text


def _drop_connection(lock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn, _ = lock.accept()
        conn.close()


def run_supervisor(path: str, *, access_log: bool = True) -> int:
    """`turnout run`: validate, check the start conditions, then serve until stopped.

    Errors that prevent the start go to stderr and give exit status 1.
    """
    path = os.path.abspath(path)
    try:
        text, spec = load_config(path)
    except ConfigLoadError as exc:
        for line in format_issues(exc.lines):
            print(line, file=sys.stderr)
        return 1
    token = admin_token()
    refusals = startup_refusals(spec, token)
    if refusals:
        for reason in refusals:
            print(f"turnout: refusing to start: {reason}", file=sys.stderr)
        return 1

    async def main() -> int:
        supervisor = Supervisor(
            path, text, spec, access_log=access_log, token=token, grafana_token=grafana_token()
        )
        return await supervisor.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
