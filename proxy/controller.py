"""The rollout controller: runs contract section 5 in the supervisor, around `proxy.rollout`.

It owns each route's `RolloutState`, the counters at the start of each window, the wall clock
and the verdict counts; `proxy.rollout` decides. Every second it judges the windows that are
due, with the canary's and the baseline's counters summed over all workers, and tells its host
(the supervisor) when the effective splits changed, so the host pushes a new table to every
worker and writes the state file. A fail sets the canary's weight to 0 in the same step.

State survives restarts through `state_json`/`load`. Each saved rollout carries a fingerprint of
its route's `split` and `rollout` in the file; a file changed while the proxy was down aborts it
on load, like a reload would, and a failed canary stays at 0 (never re-exposed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from proxy import rollout as core
from proxy.table import CompiledRoute, Table

log = logging.getLogger("turnout.rollout")

ACTIONS = ("start", "pause", "resume", "abort", "promote")
TICK = 1.0


class RolloutHost(Protocol):
    """What the controller needs from the supervisor."""

    @property
    def table(self) -> Table:
        """The table in force."""

    async def request_stats(self, timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
        """Every worker's stats snapshot."""

    async def rollout_changed(self) -> None:
        """Effective splits or rollout state changed: push a new table and persist."""


def fingerprint(route: CompiledRoute) -> str:
    """A digest of the route's file `split` and `rollout`, to notice edits made while down."""
    spec = route.spec
    data = orjson.dumps(
        {"split": [list(pair) for pair in spec.split], "rollout": repr(spec.rollout)}
    )
    return hashlib.sha256(data).hexdigest()[:16]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def counters(stats: Sequence[Mapping[str, Any]], route: str, upstream: str) -> core.CounterSnapshot:
    """The cumulative counters of (route, upstream) summed over the workers' snapshots."""
    picked = [
        entry
        for worker in stats
        for entry in worker.get("routes", ())
        if entry.get("route") == route and entry.get("upstream") == upstream
    ]
    return core.CounterSnapshot.from_stats(picked)


class RolloutController:
    """Every route's rollout, driven by operator calls and by the clock."""

    def __init__(
        self,
        host: RolloutHost,
        *,
        clock: Any = time.time,
        stats_timeout: float = 1.0,
    ) -> None:
        self._host = host
        self._clock = clock
        self._stats_timeout = stats_timeout
        self.states: dict[str, core.RolloutState] = {}
        self._fingerprints: dict[str, str] = {}
        self._window: dict[str, tuple[core.CounterSnapshot, core.CounterSnapshot]] = {}
        self.verdicts: dict[tuple[str, str], int] = {}
        self._figures: dict[str, dict[str, object]] = {}
        self._lock = asyncio.Lock()

    # ---- what the supervisor reads ----------------------------------------------------------

    def splits(self, table: Table) -> dict[str, tuple[dict[str, float], str]]:
        """The split overrides (source "rollout") of every route whose rollout is not idle."""
        result: dict[str, tuple[dict[str, float], str]] = {}
        for name, state in self.states.items():
            route = table.route(name)
            if route is None or route.rollout is None:
                continue
            split = core.effective_split(state, route.rollout, dict(route.spec.split))
            if split is not None:
                result[name] = (split, "rollout")
        return result

    def state_json(self) -> dict[str, Mapping[str, object]]:
        """Everything to persist: per route the state and the config fingerprint."""
        return {
            name: {**core.to_json(state), "fingerprint": self._fingerprints.get(name, "")}
            for name, state in self.states.items()
            if state.state != "idle"
        }

    def view(self, route: str) -> dict[str, object] | None:
        """The `rollout` object of /admin/routes for `route` (None when it never ran).

        A running rollout also shows `window`: the current window's figures so far, as of the
        last `refresh_windows`.
        """
        state = self.states.get(route)
        if state is None:
            return None
        answer = core.to_json(state)
        window = self._figures.get(route)
        if state.state == "running" and window is not None:
            answer["window"] = window
        return answer

    async def refresh_windows(self, table: Table) -> None:
        """Read the workers' counters and update every running rollout's window figures."""
        running = [
            route
            for name, state in self.states.items()
            if state.state == "running"
            and name in self._window
            and (route := table.route(name)) is not None
            and route.rollout is not None
        ]
        if not running:
            return
        stats = await self._host.request_stats(self._stats_timeout)
        now = self._clock()
        for route in running:
            start = self._window[route.name]
            canary_now, baseline_now = self._counters_of(route, stats)
            self._figures[route.name] = {
                "since_s": round(now - self.states[route.name].step_started_at, 3),
                "canary": core.figures(core.window_between(start[0], canary_now)),
                "baseline": core.figures(core.window_between(start[1], baseline_now)),
            }

    # ---- persistence ------------------------------------------------------------------------

    def load(self, saved: Mapping[str, object], table: Table) -> list[str]:
        """Restore saved rollouts at start; returns warnings for what could not be restored."""
        warnings: list[str] = []
        now = self._clock()
        for name, raw in saved.items():
            route = table.route(name)
            if route is None or route.rollout is None:
                warnings.append(f"rollout state of route '{name}' dropped: no rollout in the file")
                continue
            try:
                state = core.from_json(raw)
            except core.StateError as exc:
                warnings.append(f"rollout state of route '{name}' unreadable: {exc}")
                continue
            saved_print = raw.get("fingerprint") if isinstance(raw, Mapping) else None
            if saved_print != fingerprint(route):
                state = core.config_changed(state, "config changed while the proxy was down")
            self.states[name] = core.restart_window(state, now)
            self._fingerprints[name] = fingerprint(route)
        return warnings

    # ---- operator calls ---------------------------------------------------------------------

    async def command(self, table: Table, name: str, action: str) -> core.RolloutState:
        """Run an operator call on route `name`'s rollout; raises RolloutError or KeyError."""
        route = table.route(name)
        if route is None:
            raise KeyError(name)
        rollout = route.rollout
        if rollout is None:
            raise core.RolloutError(f"route '{name}' has no rollout in the config")
        if action not in ACTIONS:
            raise core.RolloutError(f"unknown rollout action '{action}' (use {', '.join(ACTIONS)})")
        async with self._lock:
            state = self.states.get(name, core.RolloutState())
            now = self._clock()
            if action == "start":
                state = core.start(state, rollout, now, _now_iso())
            elif action == "pause":
                state = core.pause(state)
            elif action == "resume":
                state = core.resume(state, now)
            elif action == "abort":
                state = core.abort(state)
            else:
                state = core.promote(state)
            self.states[name] = state
            self._fingerprints[name] = fingerprint(route)
            if action in ("start", "resume"):
                await self._mark_window(route)
            self._log(name, f"{action}: {state.reason}", state)
            await self._host.rollout_changed()
            return state

    def runtime_split_set(self, name: str) -> bool:
        """A PUT on the route's split pauses a running rollout; True when it did."""
        state = self.states.get(name)
        if state is None or state.state != "running":
            return False
        self.states[name] = core.pause(state, "paused: a runtime split was set on the route")
        return True

    def reconcile(self, table: Table, changed: set[str]) -> bool:
        """After a reload: a file change to a route's split or rollout ends its rollout.

        `changed` names the routes whose split or rollout changed in the file. Rollouts of routes
        that are gone, or that lost their `rollout` block, are dropped. True when anything
        changed.
        """
        dirty = False
        for name in list(self.states):
            route = table.route(name)
            if route is None or route.rollout is None:
                del self.states[name]
                self._fingerprints.pop(name, None)
                self._window.pop(name, None)
                dirty = True
                continue
            if name in changed:
                before = self.states[name]
                after = core.config_changed(before)
                if after != before:
                    self.states[name] = after
                    self._log(name, f"aborted: {after.reason}", after)
                self._fingerprints[name] = fingerprint(route)
                dirty = True
        return dirty

    # ---- the clock ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Judge due windows every TICK seconds until cancelled."""
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except Exception:
                # One bad tick must not stop every rollout for good.
                log.exception("rollout tick failed")

    async def tick(self) -> None:
        """Judge every window that is due and apply the verdicts."""
        table = self._host.table
        now = self._clock()
        running = [
            route
            for name, state in self.states.items()
            if state.state == "running"
            and (route := table.route(name)) is not None
            and route.rollout is not None
        ]
        unmarked = [route for route in running if route.name not in self._window]
        due = [
            route
            for route in running
            if route.rollout is not None and core.due(self.states[route.name], route.rollout, now)
        ]
        if not unmarked and not due:
            return
        async with self._lock:
            stats = await self._host.request_stats(self._stats_timeout)
            for route in unmarked:
                # A rollout restored after a restart: its window starts with these counters.
                self._window[route.name] = self._counters_of(route, stats)
                self.states[route.name] = core.restart_window(self.states[route.name], now)
            changed = False
            for route in due:
                if route not in unmarked:
                    changed |= self._judge(route, stats, now)
            if changed:
                await self._host.rollout_changed()

    def _judge(self, route: CompiledRoute, stats: list[dict[str, Any]], now: float) -> bool:
        rollout = route.rollout
        state = self.states.get(route.name)
        if rollout is None or state is None or not core.due(state, rollout, now):
            return False
        canary_now, baseline_now = self._counters_of(route, stats)
        start = self._window[route.name]
        verdict = core.judge(
            core.window_between(start[0], canary_now),
            core.window_between(start[1], baseline_now),
            rollout,
        )
        after = core.advance(state, rollout, verdict, now, _now_iso())
        self.states[route.name] = after
        self._window[route.name] = (canary_now, baseline_now)
        key = (route.name, verdict.verdict)
        self.verdicts[key] = self.verdicts.get(key, 0) + 1
        self._log(route.name, f"verdict {verdict.verdict}: {verdict.reason}", after)
        return True

    async def _mark_window(self, route: CompiledRoute) -> None:
        stats = await self._host.request_stats(self._stats_timeout)
        self._window[route.name] = self._counters_of(route, stats)

    @staticmethod
    def _counters_of(
        route: CompiledRoute, stats: Sequence[Mapping[str, Any]]
    ) -> tuple[core.CounterSnapshot, core.CounterSnapshot]:
        rollout = route.rollout
        assert rollout is not None
        return (
            counters(stats, route.name, rollout.canary),
            counters(stats, route.name, rollout.baseline),
        )

    def _log(self, route: str, message: str, state: core.RolloutState) -> None:
        log.info(
            "rollout %s: %s (state %s, step %d, canary %s%%)",
            route,
            message,
            state.state,
            state.step,
            f"{state.canary_weight:g}",
        )
