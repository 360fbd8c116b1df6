"""The rollout controller: runs contract section 5 in the supervisor, around `proxy.core.rollout`.

It owns each route's `RolloutState`, the counters at the start of each step, the wall clock,
the verdict counts and the webhooks; `proxy.core.rollout` decides. About every second (sooner for a
`check` below a second) it looks at every running step whose `check` came: it reads the
canary's and the baseline's counters summed over all workers, takes the difference from the
counters at the step's start (the evidence since the step began) and applies what
`proxy.core.rollout.look` says. It tells its host (the supervisor) when the effective splits
changed, so the host pushes a new table to every worker and writes the state file: a fail sets
the canary's weight to 0 in the same tick.

A step with `before_step` webhooks begins when they answered 2xx: the controller calls them in
a task of its own (never in the tick), and applies the answer if nothing changed the rollout
meanwhile. Notifications (`after_step`, `rollback`, `succeeded`) are handed to
`proxy.control.webhooks.Webhooks`, which delivers them in the background. Every change of a
rollout's state (an operator call, a step that begins, a verdict, a rollback by a config change)
is also handed to the `annotate` callback as a `proxy.control.annotations.Event`, which must not
wait.

State survives restarts through `state_json`/`load`. Each saved rollout carries a fingerprint of
its route's `split` and `rollout` in the file; a file changed while the proxy was down aborts it
on load, like a reload would, and a failed canary stays at 0 (never re-exposed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from proxy.control.annotations import Event
from proxy.control.webhooks import Webhooks
from proxy.core import rollout as core
from proxy.core.counters import Counts, PairCounts, read_counts
from proxy.core.spec import Rollout, Webhook
from proxy.core.table import CompiledRoute, Table
from proxy.runtime.tasks import TaskSet

log = logging.getLogger("turnout.rollout")

ACTIONS = ("start", "pause", "resume", "abort", "promote")
# The longest and the shortest sleep between two ticks.
TICK = 1.0
MIN_TICK = 0.05
# What pending notifications get at shutdown before they are cut.
SHUTDOWN_GRACE = 2.0


class RolloutHost(Protocol):
    """What the controller needs from the supervisor."""

    @property
    def table(self) -> Table:
        """The table in force."""

    async def rollout_stats(
        self,
        timeout: float,  # noqa: ASYNC109
    ) -> Sequence[Sequence[PairCounts]]:
        """The counters rollouts judge on: the pairs of every worker's snapshot (or, in a
        fleet, of every instance's), already read and checked; [] when none can be had."""

    def may_judge(self) -> bool:
        """True when this process runs the rollouts (always, except on a fleet's followers)."""

    async def rollout_changed(self, *, judged: bool = False) -> bool:
        """Effective splits or rollout state changed: push a new table and persist.

        `judged`: the change is the controller's own (a verdict, a step begun), which in a
        fleet only the leader may store; False when it was not stored (and so undone).
        """


def fingerprint(route: CompiledRoute) -> str:
    """A digest of the route's file `split` and `rollout`, to notice edits made while down.

    The rollout is written out as Turnout wrote it before `confidence`, `check` and
    `webhooks` existed, with those keys added only when they are not the defaults: a state
    file saved by that version still matches the same, unchanged config.
    """
    spec = route.spec
    data = orjson.dumps(
        {"split": [list(pair) for pair in spec.split], "rollout": _text(spec.rollout)}
    )
    return hashlib.sha256(data).hexdigest()[:16]


def _text(rollout: Rollout | None) -> str:
    if rollout is None:
        return "None"
    text = (
        f"Rollout(baseline={rollout.baseline!r}, canary={rollout.canary!r}, "
        f"steps={rollout.steps!r}, interval={rollout.interval!r}, "
        f"min_requests={rollout.min_requests!r}, max_error_rate={rollout.max_error_rate!r}, "
        f"max_p99={rollout.max_p99!r})"
    )
    plain = Rollout(baseline=rollout.baseline, canary=rollout.canary, interval=rollout.interval)
    added = {
        "confidence": (rollout.confidence, plain.confidence),
        "check": (rollout.check, min(plain.check, rollout.interval)),
        "webhooks": (rollout.webhooks, plain.webhooks),
    }
    extra = [f"{key}={value!r}" for key, (value, default) in added.items() if value != default]
    return f"{text} {' '.join(extra)}" if extra else text


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def counters(
    stats: Sequence[Sequence[PairCounts]], route: str, upstream: str
) -> core.CounterSnapshot:
    """The cumulative counters of (route, upstream) summed over the workers' (or instances')
    pairs."""
    picked = [
        entry
        for pairs in stats
        for entry in pairs
        if entry["route"] == route and entry["upstream"] == upstream
    ]
    return core.CounterSnapshot.from_stats(picked)


def _figures(entry: core.HistoryEntry | None) -> dict[str, object]:
    """The `figures` of a webhook body: the evidence and statistics of a verdict."""
    if entry is None:
        return {}
    shown = core.entry_json(entry)
    return {key: shown[key] for key in ("canary", "baseline", "tests")}


class RolloutController:
    """Every route's rollout, driven by operator calls, by the clock and by webhooks."""

    def __init__(
        self,
        host: RolloutHost,
        *,
        clock: Any = time.time,
        stats_timeout: float = 1.0,
        webhooks: Webhooks | None = None,
        annotate: Callable[[Event], None] | None = None,
    ) -> None:
        self._host = host
        self._annotate = annotate
        self._clock = clock
        self._stats_timeout = stats_timeout
        self.webhooks = webhooks if webhooks is not None else Webhooks()
        self.states: dict[str, core.RolloutState] = {}
        self._fingerprints: dict[str, str] = {}
        # Per running route: the canary's and the baseline's counters when its step began.
        self._marks: dict[str, tuple[core.CounterSnapshot, core.CounterSnapshot]] = {}
        self.verdicts: dict[tuple[str, str], int] = {}
        # Per route: the task calling the before_step webhooks of its waiting step.
        self._gates: dict[str, asyncio.Task[None]] = {}
        self._tasks = TaskSet("rollout-gates")
        self._lock = asyncio.Lock()
        # The last tick found no worker to answer: wait a whole TICK, not for overdue looks.
        self._starved = False
        # Set when a step begins, so that a `check` shorter than TICK is kept from the start.
        self._wake = asyncio.Event()

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

    def state_json(self, *, marks: bool = False) -> dict[str, Mapping[str, object]]:
        """Everything to persist: per route the state and the config fingerprint.

        An idle rollout (one that a DELETE of the split released) is kept for its reason and
        history; the latest look is left out (a restored step starts its evidence over).
        `marks` (a fleet's shared state) adds the counters each running step's evidence is
        measured from, so another instance that takes over goes on with the same evidence.
        """
        saved: dict[str, Mapping[str, object]] = {}
        for name, state in self.states.items():
            data = core.to_json(state)
            del data["last_check"]
            data["fingerprint"] = self._fingerprints.get(name, "")
            mark = self._marks.get(name) if marks else None
            if mark is not None:
                data["mark"] = {
                    "canary": _snapshot_json(mark[0]),
                    "baseline": _snapshot_json(mark[1]),
                }
            saved[name] = data
        return saved

    def adopt(self, saved: Mapping[str, object], table: Table) -> None:
        """Take a fleet's shared rollout states (and marks) as they are, replacing this
        instance's; a rollout whose route has no rollout here is left out."""
        states: dict[str, core.RolloutState] = {}
        marks: dict[str, tuple[core.CounterSnapshot, core.CounterSnapshot]] = {}
        prints: dict[str, str] = {}
        for name, raw in saved.items():
            route = table.route(name)
            if route is None or route.rollout is None or not isinstance(raw, Mapping):
                continue
            try:
                state = core.from_json(raw)
                mark = raw.get("mark")
                if isinstance(mark, Mapping):
                    # Another instance wrote it: read (and checked) here, once.
                    canary = read_counts(mark.get("canary"), "mark.canary")
                    baseline = read_counts(mark.get("baseline"), "mark.baseline")
                    marks[name] = (
                        core.CounterSnapshot.from_stats([canary]),
                        core.CounterSnapshot.from_stats([baseline]),
                    )
            except (core.StateError, ValueError, KeyError, TypeError) as exc:
                log.warning("rollout state of route '%s' in the fleet unreadable: %s", name, exc)
                continue
            before = self.states.get(name)
            if before is not None and before == state:
                state = before  # keeps the latest look shown by /admin/routes
            elif before is None or before.step != state.step or before.state != state.state:
                self._cancel_gate(name)
            states[name] = state
            prints[name] = str(raw.get("fingerprint", ""))
        for name in set(self.states) - set(states):
            self._cancel_gate(name)
        self.states = states
        self._marks = marks
        self._fingerprints = prints
        self._wake.set()

    def hold(self) -> None:
        """This instance stopped leading: no webhook gate may begin a step from here."""
        for name in list(self._gates):
            self._cancel_gate(name)

    def view(self, route: str) -> dict[str, object] | None:
        """The `rollout` object of /admin/routes for `route` (None when it never ran)."""
        state = self.states.get(route)
        return None if state is None else core.to_json(state)

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
            self.states[name] = core.restart_step(state, now)
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
            before = self.states.get(name, core.RolloutState())
            now = self._clock()
            if action == "start":
                state = core.start(before, rollout, now, _now_iso())
            elif action == "pause":
                state = core.pause(before)
            elif action == "resume":
                state = core.resume(before, now)
            elif action == "abort":
                state = core.abort(before)
            else:
                state = core.promote(before)
            self.states[name] = state
            self._fingerprints[name] = fingerprint(route)
            self._cancel_gate(name)
            self._marks.pop(name, None)
            if state.state == "running":
                if not state.waiting:
                    await self._mark(route)
                elif self._host.may_judge():
                    self._spawn_gate(route, rollout, state)
            self._log(name, f"{action}: {state.reason}", state)
            # Stored first (in a fleet it may be refused): nothing is announced that did not happen.
            await self._host.rollout_changed()
            self._event(name, rollout, state, state.reason, rollback=action == "abort")
            if action == "abort":
                self._notify(name, rollout, "rollback", before, None, state.reason, None)
            elif action == "promote":
                self._notify(name, rollout, "succeeded", before, None, state.reason, None)
            return state

    def runtime_split_set(self, name: str) -> bool:
        """A PUT on the route's split pauses a running rollout; True when it did."""
        state = self.states.get(name)
        if state is None or state.state != "running":
            return False
        self.states[name] = core.pause(state, "paused: a runtime split was set on the route")
        self._cancel_gate(name)
        return True

    def release(self, name: str) -> bool:
        """A DELETE of the route's split: a rollout that ended lets go of the route.

        Its state becomes idle (the history stays) and the file's split is in force again.
        True when it did; a rollout in progress, or none, is left alone.
        """
        state = self.states.get(name)
        if state is None or state.state not in core.ENDED:
            return False
        after = core.release(state, f"{state.state} rollout released: the file's split is in force")
        self.states[name] = after
        self._log(name, after.reason, after)
        return True

    def reconcile(self, table: Table, changed: set[str]) -> bool:
        """After a reload: a file change to a route's split or rollout ends its rollout.

        `changed` names the routes whose split or rollout changed in the file: a rollout in
        progress there is aborted, one that ended is released (the file is the authority once
        it changes, and an old state must not steer a new canary). Rollouts of routes that are
        gone, or that lost their `rollout` block, are dropped. True when anything changed.
        """
        dirty = False
        for name in list(self.states):
            route = table.route(name)
            if route is None or route.rollout is None:
                del self.states[name]
                self._fingerprints.pop(name, None)
                self._marks.pop(name, None)
                self._cancel_gate(name)
                dirty = True
                continue
            if name in changed:
                before = self.states[name]
                after = core.config_changed(before)
                if before.state in core.ENDED:
                    after = core.release(before, "config changed: the file's split is in force")
                if after != before:
                    self.states[name] = after
                    self._marks.pop(name, None)
                    self._cancel_gate(name)
                    self._log(name, after.reason, after)
                    if after.state == "aborted":
                        self._event(name, route.rollout, after, after.reason, rollback=True)
                        self._notify(
                            name, route.rollout, "rollback", before, None, after.reason, None
                        )
                self._fingerprints[name] = fingerprint(route)
                dirty = True
        return dirty

    async def close(self) -> None:
        """Stop the webhook calls: gates at once, notifications after a short grace."""
        self._gates.clear()
        await self._tasks.cancel_all(1.0)
        await self.webhooks.close(SHUTDOWN_GRACE)

    # ---- the clock ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Look at the evidence of running steps as their `check` comes, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sleep()):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                # One bad tick must not stop every rollout for good.
                log.exception("rollout tick failed")

    def _sleep(self) -> float:
        if self._starved:
            return TICK
        now = self._clock()
        table = self._host.table
        wait = TICK
        for name, state in self.states.items():
            route = table.route(name)
            if route is None or route.rollout is None or name not in self._marks:
                continue
            due = core.next_look(state, route.rollout)
            if due is not None:
                wait = min(wait, due - now)
        return max(MIN_TICK, wait)

    async def tick(self) -> None:
        """Look at every step whose `check` came and apply the verdicts."""
        if not self._host.may_judge():
            return  # a fleet's follower, or a leader cut off from Redis: rollouts hold
        table = self._host.table
        now = self._clock()
        running = [
            (route, route.rollout, state)
            for name, state in self.states.items()
            if state.state == "running"
            and (route := table.route(name)) is not None
            and route.rollout is not None
        ]
        unmarked: list[CompiledRoute] = []
        due: list[CompiledRoute] = []
        for route, rollout, state in running:
            if state.waiting:
                if route.name not in self._gates:
                    # Restored after a restart, or resumed: call the webhooks (again).
                    self._spawn_gate(route, rollout, state)
            elif route.name not in self._marks:
                unmarked.append(route)
            elif (when := core.next_look(state, rollout)) is not None and now >= when:
                due.append(route)
        if not unmarked and not due:
            return
        async with self._lock:
            stats = await self._host.rollout_stats(self._stats_timeout)
            self._starved = not stats
            if not stats:
                return  # no worker answered: no evidence to judge or to start from
            now = self._clock()
            changed = False
            for route in unmarked:
                restored = self.states.get(route.name)
                if restored is None or restored.state != "running" or route.name in self._marks:
                    continue
                # A rollout restored after a restart: its step's evidence starts with these.
                self._marks[route.name] = self._counters_of(route, stats)
                self.states[route.name] = core.restart_step(restored, now)
            announce: list[Callable[[], None]] = []
            for route in due:
                changed |= self._look(route, stats, now, announce)
            # Verdicts are counted, logged and told (webhooks, annotations) only once stored:
            # in a fleet a leader that lost its lease has its verdict undone, never announced.
            if (changed or unmarked) and await self._host.rollout_changed(judged=True):
                for told in announce:
                    told()

    def _look(
        self,
        route: CompiledRoute,
        stats: Sequence[Sequence[PairCounts]],
        now: float,
        announce: list[Callable[[], None]],
    ) -> bool:
        """One look at `route`'s step; True when it changed what is stored (to push and
        persist). What a verdict tells (counts, log, events, webhooks) goes to `announce`."""
        rollout = route.rollout
        state = self.states.get(route.name)
        mark = self._marks.get(route.name)
        if rollout is None or state is None or mark is None:
            return False
        when = core.next_look(state, rollout)
        if when is None or now < when:
            return False
        canary_now, baseline_now = self._counters_of(route, stats)
        after, entry = core.look(
            state,
            rollout,
            core.window_between(mark[0], canary_now),
            core.window_between(mark[1], baseline_now),
            now,
            _now_iso(),
        )
        self.states[route.name] = after
        if after.state != "running" or after.waiting:
            self._marks.pop(route.name, None)
        elif core.starts_evidence(after):
            # The next step, or evidence started over (counters went down): it starts with
            # the counters of this look.
            self._marks[route.name] = (canary_now, baseline_now)
        if entry is None:
            if after.last_check is not None:
                log.debug(
                    "rollout %s: look at step %d after %.1fs: %s",
                    route.name,
                    after.step,
                    after.last_check.elapsed,
                    "; ".join(test.describe() for test in after.last_check.tests),
                )
            # A look that spent a share of alpha, or started the evidence over, is stored:
            # after a crash the next segment must not spend the same share again.
            return after.spent != state.spent or core.starts_evidence(after)
        announce.append(lambda: self._tell(route, state, after, entry))
        return True

    def _tell(
        self,
        route: CompiledRoute,
        before: core.RolloutState,
        after: core.RolloutState,
        entry: core.HistoryEntry,
    ) -> None:
        """Count, log and announce a stored verdict; begin the gate of a waiting next step."""
        rollout = route.rollout
        assert rollout is not None
        key = (route.name, entry.verdict)
        self.verdicts[key] = self.verdicts.get(key, 0) + 1
        self._log(route.name, f"verdict {entry.verdict}: {entry.reason}", after)
        self._event(
            route.name,
            rollout,
            after,
            f"verdict {entry.verdict}: {after.reason}",
            verdict=entry.verdict,
            rollback=after.state == "failed",
        )
        self._notify(route.name, rollout, "after_step", before, entry.verdict, entry.reason, entry)
        if after.state == "failed":
            self._notify(route.name, rollout, "rollback", before, "fail", after.reason, entry)
        elif after.state == "succeeded":
            self._notify(route.name, rollout, "succeeded", before, "pass", after.reason, entry)
        elif after.waiting and self.states.get(route.name) is after:
            self._spawn_gate(route, rollout, after)

    # ---- webhooks ----------------------------------------------------------------------------

    def _spawn_gate(self, route: CompiledRoute, rollout: Rollout, state: core.RolloutState) -> None:
        hooks = [hook for hook in rollout.webhooks if hook.on == "before_step"]
        body = _body(
            "before_step", route.name, state.step, rollout.steps[state.step], None, state.reason
        )
        task = self._tasks.spawn(
            self._gate(route.name, state, hooks, body), name=f"before-step-{route.name}"
        )
        self._gates[route.name] = task

    def _cancel_gate(self, name: str) -> None:
        task = self._gates.pop(name, None)
        if task is not None:
            task.cancel()

    async def _gate(
        self,
        name: str,
        waiting: core.RolloutState,
        hooks: Sequence[Webhook],
        body: Mapping[str, object],
    ) -> None:
        """Call the before_step webhooks of `waiting`'s step and apply their answer."""
        refusal = await self.webhooks.gate(hooks, body)
        async with self._lock:
            if self._gates.get(name) is asyncio.current_task():
                del self._gates[name]
            route = self._host.table.route(name)
            if self.states.get(name) is not waiting or route is None or route.rollout is None:
                log.info("rollout %s: before_step answer dropped: the rollout moved on", name)
                return
            rollout = route.rollout
            if refusal is None:
                state = core.begin_step(waiting, rollout, self._clock())
                self.states[name] = state
                await self._mark(route)
                if await self._host.rollout_changed(judged=True):
                    self._log(name, state.reason, state)
                    self._event(name, rollout, state, state.reason)
                return
            state = core.refuse_step(waiting, rollout, refusal, _now_iso())
            self.states[name] = state
            if not await self._host.rollout_changed(judged=True):
                return
            key = (name, "fail")
            self.verdicts[key] = self.verdicts.get(key, 0) + 1
            log.warning("rollout %s: %s", name, state.reason)
            entry = state.history[-1]
            self._event(name, rollout, state, state.reason, verdict="fail", rollback=True)
            self._notify(name, rollout, "rollback", waiting, "fail", state.reason, entry)

    def _notify(
        self,
        name: str,
        rollout: Rollout,
        event: str,
        before: core.RolloutState,
        verdict: str | None,
        reason: str,
        entry: core.HistoryEntry | None,
    ) -> None:
        hooks = [hook for hook in rollout.webhooks if hook.on == event]
        if not hooks:
            return
        # The step and weight the event is about: a verdict's own, else where the canary was.
        step = before.step if entry is None else entry.step
        weight = before.canary_weight if entry is None else entry.weight
        body = _body(event, name, step, weight, verdict, reason, _figures(entry))
        body["state"] = self.states[name].state
        self.webhooks.notify(hooks, body)

    def _event(
        self,
        name: str,
        rollout: Rollout,
        state: core.RolloutState,
        what: str,
        *,
        verdict: str | None = None,
        rollback: bool = False,
    ) -> None:
        """Hand one rollout event to the `annotate` callback (a deployment annotation)."""
        if self._annotate is None:
            return
        labels = [f"verdict:{verdict}"] if verdict is not None else []
        if rollback:
            labels.append("rollback")
        self._annotate(
            Event(
                kind="rollout",
                text=(
                    f"{name}: rollout {what} (state {state.state}, step {state.step}, "
                    f"canary {state.canary_weight:g}%)"
                ),
                routes=(name,),
                upstreams=(rollout.baseline, rollout.canary),
                labels=tuple(labels),
            )
        )

    # ---- counters ----------------------------------------------------------------------------

    async def _mark(self, route: CompiledRoute) -> None:
        """The route's step begins now: keep the counters its evidence is measured from.

        When no worker answers the mark is left unset, and the next tick sets it.
        """
        stats = await self._host.rollout_stats(self._stats_timeout)
        if stats:
            self._marks[route.name] = self._counters_of(route, stats)
        self._wake.set()

    @staticmethod
    def _counters_of(
        route: CompiledRoute, stats: Sequence[Sequence[PairCounts]]
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


def _snapshot_json(snapshot: core.CounterSnapshot) -> Counts:
    """A mark as `read_counts` reads it back."""
    return {
        "codes": {str(code): count for code, count in snapshot.codes.items()},
        "buckets": list(snapshot.buckets),
        "grpc_errors": snapshot.grpc_errors,
    }


def _body(
    event: str,
    route: str,
    step: int,
    weight: float,
    verdict: str | None,
    reason: str,
    figures: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """A webhook's JSON body (contract section 5), plus the event and the time."""
    return {
        "event": event,
        "route": route,
        "step": step,
        "weight": weight,
        "verdict": verdict,
        "reason": reason,
        "figures": dict(figures or {}),
        "at": _now_iso(),
    }
