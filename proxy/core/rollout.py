"""Automated canary analysis (contract section 5): evidence, looks, verdicts, the state machine.

The rollout controller in the supervisor owns the clock, the workers' counters, the webhooks and
the state file; this module only computes. When a step begins the controller takes a
`CounterSnapshot` of the canary and of the baseline; every `check` it takes another, turns the
pairs into the `Window`s served since the step began (`window_between`) and hands them to `look`,
which runs the anytime-valid tests of `proxy.core.sequential` on that cumulative evidence and
applies what they say: a rejection rolls back at once; a step that lasted `interval` with
`min_requests` passes; one without enough traffic is inconclusive, and pauses after
`INCONCLUSIVE_LIMIT` intervals. The false-rollback budget `1 - confidence` is shared among the
steps that can be judged (`judged_steps`), and each step's among its evidence segments: the
step's evidence starts over after a pause, a restart of the proxy, or counters that went down
(`Window.reset`), and each fresh start spends a share of its own (`segment_alpha`,
`RolloutState.spent`). The operator's calls map to `start`, `pause`, `resume`, `abort`,
`promote` and `release`; `begin_step`/`refuse_step` apply a `before_step` webhook's answer;
`effective_split` says which split the route gets.

This module must never do I/O, read the clock or draw random numbers (no asyncio, sockets, os,
time or random): time comes in as `now`, float seconds on whatever clock the caller keeps (wall
time, so that a step's timer means the same after a restart), and `at`, the same moment as
ISO-8601 text for the history. Every function returns a new immutable state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from proxy.core import sequential
from proxy.core.counters import DURATION_BUCKETS, Counts
from proxy.core.spec import Rollout

STATES: tuple[str, ...] = ("idle", "running", "paused", "succeeded", "failed", "aborted")
VERDICTS: tuple[str, ...] = ("pass", "fail", "inconclusive")
# States in which a rollout is still in progress (a verdict or an operator call can move it on).
ACTIVE: tuple[str, ...] = ("running", "paused")
# States of a rollout that ended; its split holds until a new start or a DELETE of the split.
ENDED: tuple[str, ...] = ("succeeded", "failed", "aborted")

# One slot per finite bucket and a final +Inf slot, as in proxy.core.counters.
BUCKET_SLOTS = len(DURATION_BUCKETS) + 1
# The third interval in a row without `min_requests` pauses the rollout (contract section 5).
INCONCLUSIVE_LIMIT = 3
# The newest verdicts kept; an operator who resumes a starved rollout again and again must not
# grow the state file without bound.
HISTORY_LIMIT = 200

Figures = Mapping[str, int | float | None]


class RolloutError(Exception):
    """An operator call that the rollout's current state does not allow.

    The message says why and what to do instead; the admin API answers 409 Conflict with it.
    """


class StateError(ValueError):
    """Saved rollout state that cannot be read back; the message names the bad key."""


# --------------------------------------------------------------------------- window figures


@dataclass(frozen=True, slots=True)
class CounterSnapshot:
    """Cumulative counters of one (route, upstream), summed over the workers.

    `codes` counts responses per status code; `buckets` counts durations per slot of
    `DURATION_BUCKETS` plus a final +Inf slot (each slot on its own, not cumulative);
    `grpc_errors` the gRPC error statuses that `codes` does not count as 5xx already
    (`proxy.core.counters.Counts`).
    """

    codes: Mapping[int, int] = field(default_factory=dict)
    buckets: tuple[int, ...] = (0,) * BUCKET_SLOTS
    grpc_errors: int = 0

    @classmethod
    def from_stats(cls, snapshots: Iterable[Counts]) -> CounterSnapshot:
        """Sum the `Counts` of one (route, upstream) from every worker (or fleet instance).

        Their `codes` are keyed by the code as text (they crossed a JSON channel). They were
        checked when they arrived (`proxy.core.counters.read_worker_snapshot` and friends), so
        they are trusted here.
        """
        codes: dict[int, int] = {}
        buckets = [0] * BUCKET_SLOTS
        grpc_errors = 0
        for snapshot in snapshots:
            for key, count in snapshot["codes"].items():
                code = int(key)
                codes[code] = codes.get(code, 0) + count
            for index, count in enumerate(snapshot["buckets"]):
                buckets[index] += count
            grpc_errors += snapshot["grpc_errors"]
        return cls(codes=codes, buckets=tuple(buckets), grpc_errors=grpc_errors)


@dataclass(frozen=True, slots=True)
class Window:
    """What one upstream of a route served since the current step began (its evidence).

    `errors` are responses with a 5xx code, proxy-made 502/503/504 included, and gRPC calls
    that ended with an error status (`proxy.core.grpc.ERROR_CODES`); `buckets` is the
    latency histogram of the window in the layout of `proxy.core.counters`. `reset` means that the
    counters went down since the step's evidence began (a worker died or restarted): there is
    no window to measure (the figures are 0) and `look` starts the step's evidence over.
    """

    requests: int
    errors: int
    buckets: tuple[int, ...] = (0,) * BUCKET_SLOTS
    reset: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            raise ValueError(f"window: need 0 <= errors <= requests, got {self.errors}")
        if len(self.buckets) != BUCKET_SLOTS or min(self.buckets) < 0:
            raise ValueError(f"window: buckets must be {BUCKET_SLOTS} counts >= 0")

    @property
    def error_rate(self) -> float | None:
        """Errors per request, or None when the window has no requests."""
        return self.errors / self.requests if self.requests else None


def window_between(start: CounterSnapshot, end: CounterSnapshot) -> Window:
    """What was served between `start` and `end` (two snapshots of the same counters).

    A restarted or dead worker's counters leave the sum over the workers, so it can go down.
    When any field (a status code's count, a bucket's) is below its value in `start`, the
    difference is not what was served since `start`: the window is empty with `reset` set,
    and `look` starts the step's evidence over from `end` (clamping each field at 0 instead
    would mix counts from before `start` with a partial undercount, evidence that is no
    longer cumulative). The same when more gRPC errors were served than answers below 500
    (a worker's counters left the sum while another's grew): the counts do not add up. Raises
    ValueError when the histograms differ in layout.
    """
    if len(start.buckets) != BUCKET_SLOTS or len(end.buckets) != BUCKET_SLOTS:
        raise ValueError(f"counter snapshots need {BUCKET_SLOTS} buckets")
    requests = errors = 0
    for code in start.codes.keys() | end.codes.keys():
        served = end.codes.get(code, 0) - start.codes.get(code, 0)
        if served < 0:
            return Window(requests=0, errors=0, reset=True)
        requests += served
        if code >= 500:
            errors += served
    grpc_errors = end.grpc_errors - start.grpc_errors
    if not 0 <= grpc_errors <= requests - errors:
        return Window(requests=0, errors=0, reset=True)
    errors += grpc_errors
    buckets = tuple(
        after - before for before, after in zip(start.buckets, end.buckets, strict=True)
    )
    if min(buckets) < 0:
        return Window(requests=0, errors=0, reset=True)
    return Window(requests=requests, errors=errors, buckets=buckets)


def p99(window: Window) -> float | None:
    """The 99th percentile latency in seconds, estimated from the window's histogram.

    As Prometheus' `histogram_quantile`: find the bucket holding the rank 0.99 * count and
    interpolate linearly between its bounds (the first bucket's lower bound is 0), so the
    estimate is only as fine as the buckets around it. When the rank falls in the +Inf slot
    there is no upper bound to interpolate toward and the last finite bound (60 s) is reported:
    "at least 60 s". None when the histogram holds no requests.
    """
    total = sum(window.buckets)
    if total == 0:
        return None
    rank = 0.99 * total
    below = 0
    lower = 0.0
    for upper, count in zip(DURATION_BUCKETS, window.buckets, strict=False):
        if count and below + count >= rank:
            return lower + (upper - lower) * (rank - below) / count
        below += count
        lower = upper
    return DURATION_BUCKETS[-1]


# --------------------------------------------------------------------------- looks


def figures(window: Window) -> dict[str, int | float | None]:
    """An upstream's figures as the history shows them: requests, errors, error_rate, p99_ms.

    `error_rate` and `p99_ms` are None (JSON null) when there were no requests.
    """
    latency = p99(window)
    return {
        "requests": window.requests,
        "errors": window.errors,
        "error_rate": window.error_rate,
        "p99_ms": None if latency is None else round(latency * 1000.0, 3),
    }


@dataclass(frozen=True, slots=True)
class Statistic:
    """One test's outcome at one look, as the history and the state file keep it.

    The fields of `proxy.core.sequential.Test`; a value that is not finite (an e-value of 0 or of
    infinity) is kept as None, which JSON can carry.
    """

    name: str
    reject: bool
    log_e: float | None
    threshold: float | None
    figures: Mapping[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, test: sequential.Test) -> Statistic:
        """The record of a `sequential.Test`."""
        return cls(
            name=test.name,
            reject=test.reject,
            log_e=_finite(test.log_e),
            threshold=_finite(test.threshold),
            figures={key: _finite(value) for key, value in test.figures.items()},
        )

    def describe(self) -> str:
        """`name: log e 7.12 >= 5.99` (rejected) or `name: log e 1.30 < 5.99`."""
        log_e = "unknown" if self.log_e is None else f"{self.log_e:.2f}"
        threshold = "unknown" if self.threshold is None else f"{self.threshold:.2f}"
        return f"{self.name}: log e {log_e} {'>=' if self.reject else '<'} {threshold}"


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Look:
    """One look at the current step's evidence: when, how far into the step, what it showed.

    `canary` and `baseline` are `figures` of everything served since the step began; `tests`
    the statistics of every test and gate at that moment.
    """

    at: str
    elapsed: float
    canary: Figures
    baseline: Figures
    tests: tuple[Statistic, ...]


def judged_steps(rollout: Rollout) -> int:
    """How many steps a walk can judge: those before the first step of 100% after the first.

    The first step is always judged (its weight is in force from `start`); passing a step
    whose next step is 100% (or the last step) promotes the canary (`_next_step`), so a step
    of 100% after the first is never looked at and spends nothing.
    """
    for index, weight in enumerate(rollout.steps[1:], start=1):
        if weight >= 100.0:
            return index
    return len(rollout.steps)


def step_alpha(rollout: Rollout) -> float:
    """The false-rollback budget of one step: `1 - confidence` shared among the judged steps."""
    return sequential.step_alpha(rollout.confidence, judged_steps(rollout))


def segment_alpha(rollout: Rollout, segment: int) -> float:
    """The alpha of a step's evidence segment number `segment` (0: the step's first evidence).

    The segments of one step spend less than `step_alpha` in all (`sequential.segment_share`),
    however many times the step's evidence starts over.
    """
    return sequential.segment_alpha(step_alpha(rollout), segment)


def examine(
    rollout: Rollout,
    canary: Window,
    baseline: Window,
    elapsed: float,
    at: str,
    *,
    segment: int = 0,
) -> Look:
    """Run every test and gate on the evidence since the step began (no verdict yet).

    The tests get the alpha of the step's evidence segment `segment` (`segment_alpha`).
    """
    tests = sequential.judge(
        (canary.requests, canary.errors, canary.buckets),
        (baseline.requests, baseline.errors, baseline.buckets),
        alpha=segment_alpha(rollout, segment),
        max_error_rate=rollout.max_error_rate,
        max_p99=rollout.max_p99,
    )
    return Look(
        at=at,
        elapsed=elapsed,
        canary=figures(canary),
        baseline=figures(baseline),
        tests=tuple(Statistic.of(test) for test in tests),
    )


def _percent(rate: float) -> str:
    return f"{rate * 100.0:.2f}%"


def _ms(millis: float) -> str:
    if millis >= 100.0:
        return f"{millis:.0f} ms"
    if millis >= 1.0:
        return f"{millis:.1f} ms"
    return f"{millis:.3f} ms"


def _summary(shown: Figures) -> str:
    requests, errors, latency = shown.get("requests"), shown.get("errors"), shown.get("p99_ms")
    if not requests or errors is None:
        return "no requests"
    p99_text = "unknown" if latency is None else _ms(latency)
    return f"errors {_percent(errors / requests)} ({errors}/{requests}), p99 {p99_text}"


def _evidence(seen: Look) -> str:
    return f"canary {_summary(seen.canary)}; baseline {_summary(seen.baseline)}"


# --------------------------------------------------------------------------- state machine


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One verdict: when, at which step and weight, the verdict, why, and the evidence.

    `canary` and `baseline` are the figures since the step began and `tests` every test's
    statistics at the look that gave the verdict (both empty for a step refused by a
    `before_step` webhook).
    """

    at: str
    step: int
    weight: float
    verdict: str
    reason: str
    canary: Figures
    baseline: Figures
    tests: tuple[Statistic, ...] = ()


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where a route's rollout stands. `RolloutState()` is idle: the file's split is in force.

    `step` indexes `Rollout.steps`; `canary_weight` is the canary's share in percent (the
    baseline gets the rest); `started_at` (ISO-8601) is when the rollout was started;
    `step_started_at` is when the current step's evidence began, on the caller's clock;
    `inconclusive_in_a_row` counts the step's intervals that ended without `min_requests`;
    `waiting` means that `step` has not begun yet: its `before_step` webhooks have not
    answered, and `canary_weight` is still the previous step's (0 before the first);
    `history` holds the verdicts, oldest first (at most `HISTORY_LIMIT`); `last_check` is the
    latest look at the current evidence of the step (None before its first look).

    `spent` counts the evidence segments of the current step that were looked at, each of
    which spent its share of the step's alpha (`segment_alpha`), and `spent_at` is the
    `step_started_at` of the newest of them (None before the first). The step's evidence
    starts over (a new `step_started_at`) at `begin_step`, `resume`, `restart_step` and when
    the counters go down; the first look at it (`step_started_at` is not `spent_at`) tests it
    at `segment_alpha(spent)` and counts it. Both are saved, unlike `last_check`, so that a
    segment is counted once however the state travels (a state file, a fleet's store). A new
    step starts at 0.
    """

    state: str = "idle"
    step: int = 0
    canary_weight: float = 0.0
    reason: str = ""
    started_at: str = ""
    step_started_at: float = 0.0
    inconclusive_in_a_row: int = 0
    waiting: bool = False
    history: tuple[HistoryEntry, ...] = ()
    last_check: Look | None = None
    spent: int = 0
    spent_at: float | None = None


def gated(rollout: Rollout) -> bool:
    """Whether each step waits for `before_step` webhooks before it begins."""
    return any(hook.on == "before_step" for hook in rollout.webhooks)


def start(state: RolloutState, rollout: Rollout, now: float, at: str) -> RolloutState:
    """Start a rollout at the first step: running, a fresh history.

    The canary gets `steps[0]` at once, or, when the rollout has `before_step` webhooks,
    once they answered (`begin_step`); until then it is `waiting` at 0. Allowed when no
    rollout is in progress (idle, or one that ended: succeeded, failed, aborted); raises
    RolloutError while one is running or paused.
    """
    if state.state in ACTIVE:
        raise RolloutError(
            f"the rollout is already {state.state} at step {state.step}; "
            "abort or promote it before starting another"
        )
    weight = rollout.steps[0]
    if gated(rollout):
        return RolloutState(
            state="running",
            reason=f"started: waiting for the before_step webhooks of step 0 ({_weight(weight)})",
            started_at=at,
            step_started_at=now,
            waiting=True,
        )
    return RolloutState(
        state="running",
        canary_weight=weight,
        reason=f"started: canary at {_weight(weight)}",
        started_at=at,
        step_started_at=now,
    )


def begin_step(state: RolloutState, rollout: Rollout, now: float) -> RolloutState:
    """Every `before_step` webhook of the waiting step answered 2xx: the step begins at `now`.

    Only for a running rollout that is `waiting`.
    """
    _expect_waiting(state, rollout, "begin")
    weight = rollout.steps[state.step]
    return replace(
        state,
        canary_weight=weight,
        reason=f"step {state.step} began: canary at {_weight(weight)}",
        step_started_at=now,
        inconclusive_in_a_row=0,
        waiting=False,
        last_check=None,
    )


def refuse_step(state: RolloutState, rollout: Rollout, reason: str, at: str) -> RolloutState:
    """A `before_step` webhook refused the waiting step (`reason` says how): a fail.

    The canary's weight goes to 0, the state to "failed", and the fail is in the history
    (with no figures: the step never began). Only for a running rollout that is `waiting`.
    """
    _expect_waiting(state, rollout, "refuse")
    here = f"step {state.step} ({_weight(rollout.steps[state.step])})"
    entry = HistoryEntry(
        at=at,
        step=state.step,
        weight=rollout.steps[state.step],
        verdict="fail",
        reason=reason,
        canary={},
        baseline={},
    )
    return replace(
        state,
        state="failed",
        canary_weight=0.0,
        reason=f"failed at {here} before it began: {reason}",
        waiting=False,
        history=_append(state.history, entry),
    )


def look(
    state: RolloutState,
    rollout: Rollout,
    canary: Window,
    baseline: Window,
    now: float,
    at: str,
) -> tuple[RolloutState, HistoryEntry | None]:
    """Look at the evidence since the current step began (`canary`, `baseline`) at `now`.

    The look is kept as `last_check`; the entry returned is the verdict it gave, if any (it
    is in the new state's history too):
    - fail, at any look, when a test or gate rejects: the canary's weight to 0 at once, state
      "failed", the statistics in the reason;
    - pass, once the step has lasted `interval` and the canary saw `min_requests`: the next
      step (passing the last step, or the step before a step of 100, sets the canary to 100
      and the state to "succeeded");
    - inconclusive, at each whole `interval` the step lasted without `min_requests`: the step
      runs on (its evidence keeps growing); the `INCONCLUSIVE_LIMIT`th pauses the rollout;
    - otherwise no verdict.
    When a counter went down (`canary.reset` or `baseline.reset`, or fewer requests or errors
    than at the previous look of the same evidence) nothing is tested: the step's evidence
    starts over at `now` (as `restart_step`), and the caller takes this look's counters as the
    step's new start. The state returned then has `last_check` None, as when the next step
    began: `starts_evidence` says when to take new marks. The tests get the alpha of the
    step's current evidence segment (`current_segment`); the first look at new evidence
    counts it in `spent` (the caller should store the state when `spent` changed).
    Raises RolloutError unless the rollout is running and its step has begun, or when its
    step is beyond `rollout`'s steps (the config changed under it: call `config_changed`).
    """
    _expect(state, ("running",), "look at")
    _check_step(state, rollout)
    if state.waiting:
        raise RolloutError(
            f"step {state.step} has not begun: its before_step webhooks have not answered"
        )
    here = f"step {state.step} ({_weight(state.canary_weight)})"
    last = state.last_check
    went_down = [
        name
        for name, window, before in (
            ("canary", canary, None if last is None else last.canary),
            ("baseline", baseline, None if last is None else last.baseline),
        )
        if window.reset or (before is not None and _shrank(window, before))
    ]
    if went_down:
        which = " and ".join(went_down)
        restarted = replace(
            state,
            reason=f"evidence of {here} started over: the {which} counters went down "
            "(a worker died or restarted)",
            step_started_at=now,
            inconclusive_in_a_row=0,
            last_check=None,
        )
        return restarted, None
    elapsed = max(0.0, now - state.step_started_at)
    segment = current_segment(state)
    seen = examine(rollout, canary, baseline, elapsed, at, segment=segment)
    state = replace(state, last_check=seen, spent=segment + 1, spent_at=state.step_started_at)

    rejected = [test for test in seen.tests if test.reject]
    if rejected:
        reason = "; ".join([*(test.describe() for test in rejected), _evidence(seen)])
        entry = _entry(state, seen, "fail", reason)
        failed = replace(
            state,
            state="failed",
            canary_weight=0.0,
            reason=f"failed at {here} after {elapsed:.1f}s: {reason}",
            history=_append(state.history, entry),
        )
        return failed, entry
    if elapsed < rollout.interval:
        return state, None
    if canary.requests >= rollout.min_requests:
        reason = "; ".join([_evidence(seen), *(test.describe() for test in seen.tests)])
        entry = _entry(state, seen, "pass", reason)
        passed = replace(state, history=_append(state.history, entry))
        return _next_step(passed, rollout, now, here), entry

    intervals = state.inconclusive_in_a_row + 1
    if elapsed < intervals * rollout.interval:
        return state, None  # this interval was already found short of traffic
    reason = (
        f"{canary.requests} canary requests in {elapsed:.1f}s, fewer than "
        f"min_requests {rollout.min_requests}"
    )
    entry = _entry(state, seen, "inconclusive", reason)
    state = replace(state, inconclusive_in_a_row=intervals, history=_append(state.history, entry))
    if intervals >= INCONCLUSIVE_LIMIT:
        paused = replace(
            state,
            state="paused",
            reason=f"paused: {intervals} intervals in a row without enough traffic at {here}; "
            f"last: {reason}",
        )
        return paused, entry
    return replace(state, reason=f"inconclusive at {here} ({intervals} in a row): {reason}"), entry


def _shrank(window: Window, before: Figures) -> bool:
    """Whether `window` has fewer requests or errors than the same step's previous look.

    Both count everything since the same marks, so they only grow while the counters do: a
    worker that died after the marks took its counts since then with it, even when the sum
    stayed above the marks (which `window_between` alone cannot see).
    """
    requests, errors = before.get("requests"), before.get("errors")
    return (isinstance(requests, int) and window.requests < requests) or (
        isinstance(errors, int) and window.errors < errors
    )


def current_segment(state: RolloutState) -> int:
    """The number (from 0) of the step's evidence segment that the next look tests.

    Evidence not looked at yet (its `step_started_at` is not `spent_at`: the step just began,
    or its evidence started over) is a new segment, number `spent`; otherwise the look
    continues the segment already counted in `spent`.
    """
    if state.spent == 0 or state.spent_at != state.step_started_at:
        return state.spent
    return state.spent - 1


def starts_evidence(state: RolloutState) -> bool:
    """Whether `state`'s step is running on evidence that was not looked at yet.

    After `look`, True means that the look began new evidence (the next step began, or the
    counters went down): the caller takes that look's counters as the step's start.
    """
    return state.state == "running" and not state.waiting and state.last_check is None


def _entry(state: RolloutState, seen: Look, verdict: str, reason: str) -> HistoryEntry:
    return HistoryEntry(
        at=seen.at,
        step=state.step,
        weight=state.canary_weight,
        verdict=verdict,
        reason=reason,
        canary=seen.canary,
        baseline=seen.baseline,
        tests=seen.tests,
    )


def _append(history: tuple[HistoryEntry, ...], entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    return (*history, entry)[-HISTORY_LIMIT:]


def _next_step(state: RolloutState, rollout: Rollout, now: float, here: str) -> RolloutState:
    following = state.step + 1
    if following >= len(rollout.steps) or rollout.steps[following] >= 100.0:
        return replace(
            state,
            state="succeeded",
            canary_weight=100.0,
            reason=f"succeeded: passed {here}, canary at 100%",
            inconclusive_in_a_row=0,
            spent=0,
            spent_at=None,
        )
    weight = rollout.steps[following]
    moved = replace(
        state, step=following, inconclusive_in_a_row=0, last_check=None, spent=0, spent_at=None
    )
    if gated(rollout):
        return replace(
            moved,
            reason=f"passed {here}; waiting for the before_step webhooks of step "
            f"{following} ({_weight(weight)})",
            waiting=True,
        )
    return replace(
        moved,
        canary_weight=weight,
        reason=f"passed {here}; canary at {_weight(weight)}",
        step_started_at=now,
    )


def next_look(state: RolloutState, rollout: Rollout) -> float | None:
    """When the current step's evidence is to be looked at next, on the caller's clock.

    Every `check` from the step's start, and at each whole `interval` too (so that a step
    passes when it has lasted `interval`, not at the first check after). None when there is
    nothing to look at: not running, or waiting for `before_step` webhooks.
    """
    if state.state != "running" or state.waiting:
        return None
    done = state.last_check.elapsed if state.last_check is not None else 0.0
    by_check = (math.floor(done / rollout.check) + 1) * rollout.check
    by_interval = (math.floor(done / rollout.interval) + 1) * rollout.interval
    return state.step_started_at + min(by_check, by_interval)


def pause(state: RolloutState, reason: str = "paused by operator") -> RolloutState:
    """Hold the rollout at its current weights: nothing is looked at until `resume`.

    Only a running rollout can be paused.
    """
    _expect(state, ("running",), "pause")
    return replace(state, state="paused", reason=reason)


def resume(state: RolloutState, now: float, reason: str = "resumed by operator") -> RolloutState:
    """Run a paused rollout again; the current step's evidence starts over at `now`.

    The new evidence is a new segment of the step: its first look spends the next share of
    the step's alpha (`spent`). The inconclusive count starts over too, so a rollout paused
    for lack of traffic gets `INCONCLUSIVE_LIMIT` more intervals. A step still `waiting` for
    its `before_step` webhooks waits for them again. Only a paused rollout can be resumed.
    """
    _expect(state, ("paused",), "resume")
    return replace(
        state,
        state="running",
        reason=reason,
        step_started_at=now,
        inconclusive_in_a_row=0,
        last_check=None,
    )


def abort(state: RolloutState, reason: str = "aborted by operator") -> RolloutState:
    """Roll back now: the canary's weight to 0, state "aborted". Running or paused only."""
    _expect(state, ACTIVE, "abort")
    return replace(state, state="aborted", canary_weight=0.0, reason=reason, waiting=False)


def promote(state: RolloutState, reason: str = "promoted by operator") -> RolloutState:
    """Skip the remaining steps: the canary's weight to 100, state "succeeded".

    Allowed while running or paused, and after a fail or an abort (the operator overrides the
    verdict); not when idle or already succeeded.
    """
    _expect(state, ("running", "paused", "failed", "aborted"), "promote")
    return replace(state, state="succeeded", canary_weight=100.0, reason=reason, waiting=False)


def config_changed(state: RolloutState, reason: str = "config changed") -> RolloutState:
    """A change of the route's `split` or `rollout` in the file ends a rollout in progress.

    Running or paused: "aborted", the canary's weight 0. Any other state is returned as is (no
    error: the controller calls this for every changed route).
    """
    if state.state not in ACTIVE:
        return state
    return replace(state, state="aborted", canary_weight=0.0, reason=reason, waiting=False)


def release(state: RolloutState, reason: str) -> RolloutState:
    """An ended rollout lets go of the route: idle, the file's split in force, history kept.

    Only a rollout that ended (succeeded, failed, aborted): one in progress must be aborted
    or promoted first.
    """
    _expect(state, ENDED, "release")
    return replace(
        state,
        state="idle",
        canary_weight=0.0,
        reason=reason,
        inconclusive_in_a_row=0,
        waiting=False,
        last_check=None,
    )


def restart_step(state: RolloutState, now: float) -> RolloutState:
    """After a restart of the proxy, start the current step's evidence over at `now`.

    The counters the evidence was measured on died with the workers, so a running rollout's
    step is judged on fresh evidence (and gets its `INCONCLUSIVE_LIMIT` intervals again), a
    new segment whose first look spends the next share of the step's alpha (`spent`; calling
    this again before that look spends nothing more). Other states are returned as is.
    A fleet instance that takes over a step with its marks (the same evidence) must not call
    this: the evidence goes on, and so does its segment.
    """
    if state.state != "running":
        return state
    return replace(state, step_started_at=now, inconclusive_in_a_row=0, last_check=None)


def effective_split(
    state: RolloutState, rollout: Rollout, file_split: Mapping[str, float]
) -> dict[str, float] | None:
    """The split the rollout puts in force on the route, or None when idle (the file's split).

    In every other state, finished ones included, the canary gets `canary_weight`, the baseline
    the rest, and every other upstream of the file's split 0: a failed or aborted canary stays
    at 0 until the operator starts a new rollout or releases the route (`release`).
    """
    if state.state == "idle":
        return None
    split = dict.fromkeys(file_split, 0.0)
    split[rollout.baseline] = 100.0 - state.canary_weight
    split[rollout.canary] = state.canary_weight
    return split


def _expect(state: RolloutState, allowed: tuple[str, ...], action: str) -> None:
    if state.state not in allowed:
        raise RolloutError(
            f"cannot {action} a rollout that is {state.state} (only when {' or '.join(allowed)})"
        )


def _check_step(state: RolloutState, rollout: Rollout) -> None:
    if state.step >= len(rollout.steps):
        raise RolloutError(
            f"the rollout is at step {state.step} but the route has {len(rollout.steps)} "
            "steps; the config changed under it"
        )


def _expect_waiting(state: RolloutState, rollout: Rollout, action: str) -> None:
    _expect(state, ("running",), f"{action} a step of")
    _check_step(state, rollout)
    if not state.waiting:
        raise RolloutError(f"step {state.step} already began")


def _weight(weight: float) -> str:
    return f"{weight:g}%"


# --------------------------------------------------------------------------- state file


def to_json(state: RolloutState) -> dict[str, object]:
    """The state as JSON-able data: the state file's entry and `/admin/routes`' `rollout`."""
    return {
        "state": state.state,
        "step": state.step,
        "canary_weight": state.canary_weight,
        "reason": state.reason,
        "started_at": state.started_at,
        "step_started_at": state.step_started_at,
        "inconclusive_in_a_row": state.inconclusive_in_a_row,
        "waiting": state.waiting,
        "spent": state.spent,
        "spent_at": state.spent_at,
        "history": [entry_json(entry) for entry in state.history],
        "last_check": None if state.last_check is None else look_json(state.last_check),
    }


def entry_json(entry: HistoryEntry) -> dict[str, object]:
    """A verdict as the history shows it."""
    return {
        "at": entry.at,
        "step": entry.step,
        "weight": entry.weight,
        "verdict": entry.verdict,
        "reason": entry.reason,
        "canary": dict(entry.canary),
        "baseline": dict(entry.baseline),
        "tests": [_statistic_json(test) for test in entry.tests],
    }


def look_json(seen: Look) -> dict[str, object]:
    """A look as `/admin/routes` shows it (`rollout.last_check`)."""
    return {
        "at": seen.at,
        "elapsed_s": round(seen.elapsed, 3),
        "canary": dict(seen.canary),
        "baseline": dict(seen.baseline),
        "tests": [_statistic_json(test) for test in seen.tests],
    }


def _statistic_json(test: Statistic) -> dict[str, object]:
    return {
        "name": test.name,
        "reject": test.reject,
        "log_e": test.log_e,
        "threshold": test.threshold,
        "figures": dict(test.figures),
    }


def from_json(obj: object) -> RolloutState:
    """Read back what `to_json` wrote (after a trip through a JSON file).

    Tolerant where that is safe: unknown keys are ignored (a newer Turnout may add some, an
    older one wrote `z` and `p_value` in history entries), keys missing but "state" take the
    idle defaults, integers are accepted for numbers. `last_check` is not read back: a
    restored step starts its evidence over (`restart_step`). A state written before `spent`
    existed gets 1 when its step was running on evidence (running or paused, not waiting),
    so that the segment the older Turnout may have looked at is paid for, else 0 (and
    `spent_at` None either way). Anything else raises StateError naming the key, rather than
    resuming a rollout from garbage.
    """
    data = _mapping(obj, "rollout state")
    state = _choice(data, "state", STATES, "rollout state", required=True)
    history = _list(data, "history", "rollout state")
    waiting = _bool(data, "waiting", "rollout state")
    if "spent" in data:
        spent = _int(data, "spent", "rollout state")
    else:
        spent = 1 if state in ACTIVE and not waiting else 0
    return RolloutState(
        state=state,
        step=_int(data, "step", "rollout state"),
        canary_weight=_weight_in(data, "canary_weight", "rollout state"),
        reason=_text(data, "reason", "rollout state"),
        started_at=_text(data, "started_at", "rollout state"),
        step_started_at=_number(data, "step_started_at", "rollout state"),
        inconclusive_in_a_row=_int(data, "inconclusive_in_a_row", "rollout state"),
        waiting=waiting,
        history=tuple(
            _history_entry(item, f"rollout state: history[{index}]")
            for index, item in enumerate(history)
        ),
        spent=spent,
        spent_at=_optional_number(data, "spent_at", "rollout state"),
    )


def _history_entry(obj: object, where: str) -> HistoryEntry:
    data = _mapping(obj, where)
    tests = _list(data, "tests", where)
    return HistoryEntry(
        at=_text(data, "at", where, required=True),
        step=_int(data, "step", where),
        weight=_weight_in(data, "weight", where),
        verdict=_choice(data, "verdict", VERDICTS, where, required=True),
        reason=_text(data, "reason", where),
        canary=_figures(data.get("canary", {}), f"{where}.canary"),
        baseline=_figures(data.get("baseline", {}), f"{where}.baseline"),
        tests=tuple(
            _statistic(item, f"{where}.tests[{index}]") for index, item in enumerate(tests)
        ),
    )


def _statistic(obj: object, where: str) -> Statistic:
    data = _mapping(obj, where)
    return Statistic(
        name=_text(data, "name", where, required=True),
        reject=_bool(data, "reject", where),
        log_e=_optional_number(data, "log_e", where),
        threshold=_optional_number(data, "threshold", where),
        figures=_figures(data.get("figures", {}), f"{where}.figures"),
    )


def _figures(obj: object, where: str) -> dict[str, int | float | None]:
    data = _mapping(obj, where)
    out: dict[str, int | float | None] = {}
    for key, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise StateError(f"{where}.{key}: expected a number or null, got {_kind(value)}")
        out[key] = value
    return out


def _mapping(obj: object, where: str) -> Mapping[str, object]:
    if not isinstance(obj, Mapping) or not all(isinstance(key, str) for key in obj):
        raise StateError(f"{where}: expected an object, got {_kind(obj)}")
    return obj


def _list(data: Mapping[str, object], key: str, where: str) -> Sequence[object]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise StateError(f"{where}: {key}: expected a list, got {_kind(value)}")
    return value


def _choice(
    data: Mapping[str, object],
    key: str,
    choices: tuple[str, ...],
    where: str,
    *,
    required: bool,
) -> str:
    value = _text(data, key, where, required=required)
    if value not in choices:
        raise StateError(f"{where}: {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _text(data: Mapping[str, object], key: str, where: str, *, required: bool = False) -> str:
    if key not in data:
        if required:
            raise StateError(f"{where}: {key}: missing")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise StateError(f"{where}: {key}: expected a string, got {_kind(value)}")
    return value


def _bool(data: Mapping[str, object], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise StateError(f"{where}: {key}: expected true or false, got {_kind(value)}")
    return value


def _int(data: Mapping[str, object], key: str, where: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"{where}: {key}: expected an integer >= 0, got {value!r}")
    return value


def _number(data: Mapping[str, object], key: str, where: str) -> float:
    value = data.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StateError(f"{where}: {key}: expected a finite number, got {value!r}")
    return float(value)


def _optional_number(data: Mapping[str, object], key: str, where: str) -> float | None:
    if data.get(key) is None:
        return None
    return _number(data, key, where)


def _weight_in(data: Mapping[str, object], key: str, where: str) -> float:
    value = _number(data, key, where)
    if not 0.0 <= value <= 100.0:
        raise StateError(f"{where}: {key}: expected a percent in 0..100, got {value!r}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
