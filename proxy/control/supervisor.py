"""The supervisor: the one process that knows the config, and the parent of every worker.

`turnout run` always has this shape, also with `workers: 1`:

    supervisor (this module)                      workers (proxy.dataplane.worker), N processes
      reads + validates the config file             bind `listen` with SO_REUSEPORT
      admin plane (aiohttp) on `admin`              serve the data plane
      reloads: SIGHUP, POST /admin/reload, watch    apply each table they are sent
      restarts workers that die                     drain on SIGTERM and exit
      SIGTERM/SIGINT: the shutdown sequence

`Supervisor` is the coordinator: it owns the config generations and the order of the start and
of the shutdown, and hands every other job to a part with its own module:

    proxy.control.workers       the worker processes: spawn, restart, messages, stats intake
    proxy.control.overrides     which runtime and rollout splits are in force across changes
    proxy.control.persistence   where that state is kept: the state file, or the fleet
    proxy.control.fleetlink     what this instance publishes to its fleet and adopts from it
    proxy.control.certificates  the TLS listeners' certificates and their renewal
    proxy.control.views         the JSON of /admin/config and /admin/routes
    proxy.control.addresses     the `listen` and `admin` addresses, claimed before anything
    proxy.control.prober        active health checks (the down set goes to every worker)
    proxy.control.rollouts      the rollout driver
    proxy.control.metrics       /metrics, summed over the workers at scrape time

Generations: every new table gets the next generation number, whether it comes from the file
(a reload) or from a runtime split change (`set_split`), a rollout step or the fleet's shared
state; the sha256 is the file's. They are made here, one at a time (`_change_lock`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp.helpers
import aiohttp.http_parser
import uvloop

from proxy.control import views
from proxy.control.addresses import AddressClaims, StartError, claim_addresses, drop_connection
from proxy.control.admin import (
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
    grafana_token,
    reload_event,
    reload_failed_event,
    split_event,
)
from proxy.control.certificates import Certificates
from proxy.control.fleet import (
    WRITE_ATTEMPTS,
    FleetConflict,
    FleetUnavailable,
    expand_instance,
)
from proxy.control.fleetlink import FleetLink
from proxy.control.metrics import MetricsInput, Totals, metrics_body
from proxy.control.overrides import (
    RUNTIME_SOURCES,
    SplitOverrides,
    after_reload,
    changed_routes,
    from_splits,
    runtime_source,
    runtime_split,
    with_rollouts,
)
from proxy.control.persistence import StateKeeper
from proxy.control.prober import Prober
from proxy.control.rollouts import RolloutController
from proxy.control.state import SavedState, load_state
from proxy.control.views import LoadedConfig
from proxy.control.watch import watch_file
from proxy.control.workers import SCRAPE_DEADLINE, WorkerSet, resolve_workers
from proxy.core.config import (
    MAX_FILE_BYTES,
    ConfigError,
    config_sha256,
    format_issues,
    parse_config,
)
from proxy.core.counters import PairCounts
from proxy.core.health import EndpointKey
from proxy.core.spec import ConfigSpec
from proxy.core.table import Table, TableDiff, compile_table, diff_tables
from proxy.runtime.channel import health_message, table_message
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import tls_file_problems

log = logging.getLogger("turnout.supervisor")

TOKEN_ENV = "TURNOUT_ADMIN_TOKEN"

# Workers get drain.delay + drain.shutdown to exit after SIGTERM; this margin covers their own
# teardown (closing idle clients, flushing the access log) before they are killed.
EXIT_MARGIN = 5.0
# After SIGKILL, how long to wait for the kernel to reap the workers.
KILL_REAP_TIMEOUT = 2.0
# Background tasks left at the very end (watch, readers) get this long to stop.
TASKS_STOP_TIMEOUT = 2.0

# Static settings: bound once at start. A reload that changes them is applied only on restart.
STATIC_SETTINGS = ("listen", "listeners", "admin", "workers", "fleet")

# How long a runtime split change waits for every worker to apply the new table before it
# answers anyway (a worker that slow is logged).
APPLY_DEADLINE = 2.0


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


class Supervisor:
    """Owns the config generations and wires the parts together; `run` is the whole life.

    Every change of the table in force passes here, one at a time, and becomes the next
    generation: a reload of the file, a runtime split, a rollout step, the fleet's shared
    state. The parts it hands the rest to are passed what they need when they are made.
    """

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
        self._static = {name: getattr(spec, name) for name in STATIC_SETTINGS}
        sha = config_sha256(text)
        saved = load_state(spec.state_file) if spec.state_file is not None else SavedState()
        # In a fleet the state file is this instance's cache of the shared state, used when it
        # starts while Redis is away; the fleet's document replaces it once connected.
        self._runtime_source = runtime_source(spec.fleet is not None)
        self._split_overrides: SplitOverrides = from_splits(
            spec, saved.splits, self._runtime_source, "in the state file"
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
        self._state_stale = len(self._split_overrides) != len(saved.splits)
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

        self._tasks = TaskSet("supervisor")
        self.workers = WorkerSet(
            resolve_workers(spec),
            argv=worker_argv,
            access_log=access_log,
            tasks=self._tasks,
            first_messages=self._first_messages,
            table=lambda: self._current.table,
            on_fail=self._fail,
        )
        self._prober = Prober(self._on_health_change)

        self._stopping = False
        self._draining = False
        self._fatal: str | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._watch_stop = asyncio.Event()

        # TLS listeners are bound at start (static): their certificates in force, renewed by
        # the certificate watch.
        self.certificates = Certificates(
            spec.listeners, on_renewed=self.workers.broadcast, on_outcome=self._count_reload
        )

        self.fleet: FleetLink | None = None
        if spec.fleet is not None:
            self.fleet = FleetLink(
                spec.fleet,
                current=lambda: self._current,
                totals=lambda: self.workers.polled_totals()[0],
                seed=self._fleet_seed,
                on_document=self._on_fleet_document,
                on_leader=self._on_fleet_leader,
            )
        self._keeper = StateKeeper(
            fleet=self.fleet,
            rollouts=lambda marks: self.rollouts.state_json(marks=marks),
            state_file=lambda: self._current.spec.state_file,
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
        return self.workers.readiness()

    def config_view(self) -> dict[str, Any]:
        """The body of GET /admin/config."""
        return views.config_view(
            self._current,
            path=self.path,
            last_error=self._last_error,
            workers=self.workers.view(),
            pending_restart=self._pending_restart,
            reloads=self.reload_counts,
            certificates=self.certificates.loaded,
            certificates_error=self.certificates.error,
        )

    def routes_view(self) -> dict[str, Any]:
        """The body of GET /admin/routes: every route's splits, rules and rollout state."""
        return views.routes_view(self._current, self._split_overrides, self.rollouts.view)

    def polled_totals(self) -> tuple[Totals, float]:
        """The counters of the workers' latest poll and when it arrived (WorkerSet)."""
        return self.workers.polled_totals()

    def fleet_view(self) -> dict[str, Any] | None:
        """The body of GET /admin/fleet (None: not in a fleet)."""
        return None if self.fleet is None else self.fleet.view()

    def annotate(self, event: Event) -> None:
        """Post a deployment annotation for `event` when the config asks for them; never waits."""
        self.annotations.post(self._current.spec.annotations, event)

    def _count_reload(self, ok: bool) -> None:
        self.reload_counts["success" if ok else "failure"] += 1

    # --- runtime splits -------------------------------------------------------------------------

    async def set_split(self, route: str, weights: Mapping[str, float] | None) -> dict[str, Any]:
        """`_set_split`; in a fleet on the newest shared state, tried again when another
        instance changed it meanwhile (FleetUnavailable when Redis cannot be reached)."""
        if self.fleet is None:
            return await self._set_split(route, weights)
        for attempt in range(WRITE_ATTEMPTS):
            await self.fleet.refresh()
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
                await self._keeper.store(overrides, judged=False)
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
            self.annotate(split_event(current.table, table, route, what))
            await self.workers.wait_applied(generation, APPLY_DEADLINE)
            return self._route_answer(route)

    def _route_answer(self, name: str) -> dict[str, Any]:
        return views.route_answer(self.routes_view(), name)

    def _with_rollouts(self, overrides: SplitOverrides, table: Table) -> SplitOverrides:
        """`overrides` with every active rollout's split added; a runtime split wins."""
        return with_rollouts(overrides, self.rollouts.splits(table))

    def _install(self, loaded: LoadedConfig) -> None:
        """Make `loaded` the generation in force everywhere (no await: one swap)."""
        self._current = loaded
        # Series the new table no longer has leave the retired totals with it.
        self.workers.prune_retired(loaded.table)
        self.workers.broadcast(self._table_message())

    def _table_message(self) -> dict[str, object]:
        current = self._current
        return table_message(
            generation=current.generation,
            sha256=current.sha256,
            path=self.path,
            spec=current.spec,
            split_overrides=self._split_overrides,
        )

    def _first_messages(self) -> list[dict[str, object]]:
        """What a worker that just started is sent, in this order: the certificates before the
        first table (it binds its listeners when that table arrives), then the health right
        behind it, so a restarted worker never routes to an endpoint the health checks
        already took down."""
        certs = self.certificates.message()
        return [
            *([certs] if certs is not None else []),
            self._table_message(),
            health_message(sorted(self._prober.down)),
        ]

    async def _persist_after_change(self, why: str) -> None:
        """Save the state after a change the file forced; a failure is logged, not raised."""
        try:
            await self._keeper.store(self._split_overrides, judged=False)
        except FleetConflict:
            log.warning("fleet: %s: another instance changed the shared state first", why)
            # The newest shared state is in force instead (as after any refused change).
            self._undo_fleet_change()
        except FleetUnavailable as exc:
            log.warning("fleet: %s not shared (Redis unreachable: %s)", why, exc)
            await self._keeper.write_cache(self._keeper.export(self._split_overrides))
        except OSError as exc:
            log.error(
                "cannot write the state file %s (%s): %s; a restart may bring back what it held",
                self._current.spec.state_file,
                why,
                exc,
            )

    # --- metrics --------------------------------------------------------------------------------

    async def metrics(self, *, gzip: bool) -> bytes:
        """The Prometheus text for GET /metrics, gzip-compressed with `gzip`."""
        await self.workers.request_stats(SCRAPE_DEADLINE)
        totals = self.workers.polled_totals()[0]
        view = MetricsInput(
            table=self._current.table,
            totals=totals,
            down=self._prober.down,
            reloads=dict(self.reload_counts),
            generation=self.workers.applied_generation(self._current.generation),
            rollout_steps={
                name: state.step
                for name, state in self.rollouts.states.items()
                if self._current.table.route(name) is not None
            },
            rollout_verdicts=dict(self.rollouts.verdicts),
            config_loaded_at=self._current.loaded_at.timestamp(),
            certificate_expiry=self.certificates.expiry(),
            annotations=dict(self.annotations.counts),
            fleet=None if self.fleet is None else self.fleet.metrics(),
        )
        # Rendering takes ~0.7 us per series (0.2 s for 5,000 routes that all saw traffic, see
        # benchmarks/metrics_cost.py); off the loop, health checks and probes keep their pace.
        # The view is this scrape's own: nothing else touches it meanwhile.
        return await asyncio.to_thread(metrics_body, view, gzip)

    # --- health -----------------------------------------------------------------------------------

    def _on_health_change(self, down: frozenset[EndpointKey]) -> None:
        self.workers.broadcast(health_message(sorted(down)))

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
        overrides = self._with_rollouts(after_reload(self._split_overrides, diff, spec), file_table)
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
        self.certificates.warn_expiring()
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
                await self._keeper.store(self._split_overrides, judged=False)
                return
            except FleetUnavailable as exc:
                log.warning("fleet: the reload's changes are not shared (Redis: %s)", exc)
                await self._keeper.write_cache(self._keeper.export(self._split_overrides))
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

    def _check_static_settings(self, spec: ConfigSpec) -> None:
        changed = [name for name in STATIC_SETTINGS if getattr(spec, name) != self._static[name]]
        if changed and changed != self._pending_restart:
            log.warning(
                "%s changed in the file; restart turnout to apply (they are bound at start)",
                ", ".join(changed),
            )
        self._pending_restart = changed

    async def _on_file_change(self) -> None:
        await self.reload("watch")

    # --- rollouts (the controller's host, proxy.control.rollouts.RolloutHost) --------------------

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
                    await self._keeper.store(overrides, judged=judged)
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
        await self.workers.wait_applied(generation, APPLY_DEADLINE)
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
            await self.fleet.refresh()
            if action == "start":
                self.fleet.check_agrees(self._current.table, route)
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
                if runtime_split(self._split_overrides, route) is not None:
                    self._split_overrides = {
                        name: o for name, o in self._split_overrides.items() if name != route
                    }
        await self.rollouts.command(self._current.table, route, action)

    async def rollout_stats(
        self,
        timeout: float,  # noqa: ASYNC109
    ) -> Sequence[Sequence[PairCounts]]:
        """What rollouts judge on: every worker's pairs, or every fleet instance's."""
        stats = await self.workers.request_stats(timeout)
        if self.fleet is None:
            return [snapshot["routes"] for snapshot in stats]
        return await self.fleet.rollout_stats()

    def may_judge(self) -> bool:
        """Rollouts move here: always alone; in a fleet only on the leader, while it leads."""
        return self.fleet is None or self.fleet.may_judge()

    # --- the fleet's shared state (FleetLink's callbacks) ---------------------------------------

    async def _on_fleet_document(self, document: SavedState) -> None:
        async with self._change_lock:
            # The newest document known once the lock is ours, not the one that woke us: a
            # change this instance stored while we waited is newer than `document`, and
            # putting `document` in force would leave this instance behind at a revision
            # it already has (so no later look would correct it).
            assert self.fleet is not None
            newest = self.fleet.document or document
            self._adopt(newest)
        await self._keeper.write_cache(newest)

    def _fleet_seed(self) -> SavedState:
        """What this instance knows, for an empty store to start from."""
        return self._keeper.export(self._split_overrides)

    def _undo_fleet_change(self) -> None:
        """A change was refused by the fleet: back to the newest shared state known."""
        if self.fleet is not None and self.fleet.document is not None:
            self._adopt(self.fleet.document)

    def _adopt(self, document: SavedState) -> None:
        """Put the fleet's shared state in force here (the caller holds the change lock)."""
        assert self.fleet is not None
        self.fleet.adopted(document)
        current = self._current
        self.rollouts.adopt(document.rollouts, current.table)
        shared = from_splits(current.spec, document.splits, "fleet", "from the fleet")
        self._put_in_force(self._with_rollouts(shared, current.table))

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
        for name in changed_routes(self._split_overrides, overrides):
            log.info(
                "route %s: the fleet's split %s is in force; generation %d",
                name,
                overrides[name][0] if name in overrides else "(the file's)",
                generation,
            )
        self._split_overrides = overrides
        self._install(replace(current, generation=generation, table=table))

    def _on_fleet_leader(self, leading: bool) -> None:
        if not leading:
            self.rollouts.hold()

    # --- signals and shutdown -------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        log.error("%s; shutting down", reason)
        self._fatal = reason
        self._begin_stop()

    def _begin_stop(self) -> None:
        self._stopping = True
        self.workers.stop()
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
        self.workers.signal_all(signal.SIGKILL)
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
            loop.add_reader(lock.fileno(), drop_connection, lock)
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
            self.workers.count,
        )
        self.workers.start()
        self._tasks.spawn(
            watch_file(self.path, self._on_file_change, self._watch_stop), name="config-watch"
        )
        self._tasks.spawn(self.rollouts.run(), name="rollouts")
        if self.fleet is not None:
            self._tasks.spawn(self.fleet.run(), name="fleet")
        self._tasks.spawn(self.workers.poll_stats(), name="poll-stats")
        if self.certificates.watched:
            self._tasks.spawn(self.certificates.watch(), name="certificate-watch")
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
        self.workers.signal_all(signal.SIGTERM)

        # 4. Wait for every worker to exit, bounded by the drain budget plus a margin.
        budget = drain.delay + drain.shutdown + EXIT_MARGIN
        all_exited = await self.workers.wait_exited(budget, self._force)

        # 5. Forced path: SIGKILL whoever is still there (after the budget, or on a second
        #    signal, whose handler already sent SIGKILL).
        if not all_exited:
            stragglers = self.workers.live()
            if stragglers and not self._force.is_set():
                log.warning(
                    "%d worker(s) still running %.1fs after SIGTERM; killing them",
                    stragglers,
                    budget,
                )
            self.workers.signal_all(signal.SIGKILL)
            # A second signal does not cut the reaping short.
            await self.workers.wait_exited(KILL_REAP_TIMEOUT, None)
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
