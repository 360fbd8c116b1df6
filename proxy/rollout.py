"""Automated canary analysis (contract section 5): window figures, verdicts, the state machine.

The rollout controller in the supervisor owns the clock, the workers' counters and the state
file; this module only computes. Every interval the controller takes a `CounterSnapshot` of the
canary and of the baseline, turns the pair of snapshots into `Window`s with `window_between`,
asks `judge` for a `Verdict` and applies it with `advance`; the operator's calls map to `start`,
`pause`, `resume`, `abort` and `promote`; `effective_split` says which split the route gets.

This module must never do I/O, read the clock or draw random numbers (no asyncio, sockets, os,
time or random): time comes in as `now`, float seconds on whatever clock the caller keeps (wall
time, so that a step's timer means the same after a restart), and `at`, the same moment as
ISO-8601 text for the history. Every function returns a new immutable state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from proxy.spec import Rollout
from proxy.stats import DURATION_BUCKETS

STATES: tuple[str, ...] = ("idle", "running", "paused", "succeeded", "failed", "aborted")
VERDICTS: tuple[str, ...] = ("pass", "fail", "inconclusive")
# States in which a rollout is still in progress (a verdict or an operator call can move it on).
ACTIVE: tuple[str, ...] = ("running", "paused")

# One slot per finite bucket and a final +Inf slot, as in proxy.stats.
BUCKET_SLOTS = len(DURATION_BUCKETS) + 1
# One-sided test at 95% confidence (contract section 5).
SIGNIFICANCE = 0.05
# The third inconclusive window in a row pauses the rollout.
INCONCLUSIVE_LIMIT = 3
# The newest verdicts kept; an operator who resumes a starved rollout again and again must not
# grow the state file without bound.
HISTORY_LIMIT = 200

FIGURE_KEYS: tuple[str, ...] = ("requests", "errors", "error_rate", "p99_ms")
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
    `DURATION_BUCKETS` plus a final +Inf slot (each slot on its own, not cumulative).
    """

    codes: Mapping[int, int] = field(default_factory=dict)
    buckets: tuple[int, ...] = (0,) * BUCKET_SLOTS

    @classmethod
    def from_stats(cls, snapshots: Iterable[Mapping[str, object]]) -> CounterSnapshot:
        """Sum `RouteUpstreamStats.snapshot()`s of one (route, upstream) from every worker.

        The snapshots' `codes` are keyed by the code as text (they crossed a JSON channel).
        Raises ValueError when a snapshot does not have that shape.
        """
        codes: dict[int, int] = {}
        buckets = [0] * BUCKET_SLOTS
        for snapshot in snapshots:
            raw_codes = snapshot.get("codes")
            raw_buckets = snapshot.get("buckets")
            if not isinstance(raw_codes, Mapping):
                raise ValueError("stats snapshot: 'codes' must be a mapping")
            if not isinstance(raw_buckets, list | tuple) or len(raw_buckets) != BUCKET_SLOTS:
                raise ValueError(f"stats snapshot: 'buckets' must be a list of {BUCKET_SLOTS}")
            for key, count in raw_codes.items():
                try:
                    code = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"stats snapshot: bad status code {key!r}") from None
                codes[code] = codes.get(code, 0) + _count(count, f"codes[{key}]")
            for index, count in enumerate(raw_buckets):
                buckets[index] += _count(count, f"buckets[{index}]")
        return cls(codes=codes, buckets=tuple(buckets))


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"stats snapshot: {where} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Window:
    """What one upstream of a route served during one judged window.

    `errors` are responses with a 5xx code, proxy-made 502/503/504 included; `buckets` is the
    latency histogram of the window in the layout of `proxy.stats`.
    """

    requests: int
    errors: int
    buckets: tuple[int, ...] = (0,) * BUCKET_SLOTS

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
    """The figures of the window from `start` to `end` (two snapshots of the same counters).

    A restarted worker's counters start again from 0, so a sum over the workers can go down.
    Each field (every status code, every bucket) is clamped at 0 on its own: a window never
    has negative figures, and it undercounts (by at most what the restarted worker had served)
    rather than inventing requests. Raises ValueError when the histograms differ in layout.
    """
    if len(start.buckets) != BUCKET_SLOTS or len(end.buckets) != BUCKET_SLOTS:
        raise ValueError(f"counter snapshots need {BUCKET_SLOTS} buckets")
    requests = errors = 0
    for code in start.codes.keys() | end.codes.keys():
        served = max(0, end.codes.get(code, 0) - start.codes.get(code, 0))
        requests += served
        if code >= 500:
            errors += served
    buckets = tuple(
        max(0, after - before) for before, after in zip(start.buckets, end.buckets, strict=True)
    )
    return Window(requests=requests, errors=errors, buckets=buckets)


def p99(window: Window) -> float | None:
    """The window's 99th percentile latency in seconds, estimated from its histogram.

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


# --------------------------------------------------------------------------- verdicts


def z_test(errors_a: int, requests_a: int, errors_b: int, requests_b: int) -> tuple[float, float]:
    """One-sided two-proportion z-test that a's error ratio is above b's: `(z, p_value)`.

    Pooled standard error (the null hypothesis is that both ratios are equal). When the pooled
    ratio is 0 or 1 both ratios are equal and there is nothing to test: z 0, p-value 0.5.
    Both request counts must be > 0.
    """
    pooled = (errors_a + errors_b) / (requests_a + requests_b)
    variance = pooled * (1.0 - pooled) * (1.0 / requests_a + 1.0 / requests_b)
    if variance <= 0.0:
        return 0.0, 0.5
    z = (errors_a / requests_a - errors_b / requests_b) / math.sqrt(variance)
    # The upper tail of the standard normal; erfc keeps its precision far out in the tail.
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judgement of one window.

    `verdict` is "pass", "fail" or "inconclusive"; `reason` says why, with the numbers;
    `canary` and `baseline` are the figures for the history (`figures`). `z` and `p_value` are
    the error-ratio test's, None when it was not run (too few canary requests, or no baseline
    traffic).
    """

    verdict: str
    reason: str
    canary: dict[str, int | float | None]
    baseline: dict[str, int | float | None]
    z: float | None = None
    p_value: float | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {self.verdict!r}")


def figures(window: Window) -> dict[str, int | float | None]:
    """A window's figures as the history shows them: requests, errors, error_rate, p99_ms.

    `error_rate` and `p99_ms` are None (JSON null) when there were no requests.
    """
    latency = p99(window)
    return {
        "requests": window.requests,
        "errors": window.errors,
        "error_rate": window.error_rate,
        "p99_ms": None if latency is None else round(latency * 1000.0, 3),
    }


def judge(canary: Window, baseline: Window, rollout: Rollout) -> Verdict:
    """Judge one window of the canary against the baseline's same window (contract section 5).

    - fewer than `min_requests` canary requests: "inconclusive";
    - "fail" when the canary's error ratio is above `max_error_rate` and significantly above
      the baseline's (`z_test`, p-value < 0.05), or above it at all when the baseline had no
      requests; or when the canary's p99 is above `max_p99` while the baseline's is not (or is
      unknown: no baseline traffic);
    - otherwise "pass", also when both upstreams are over a threshold together (a burst they
      share is not the canary's fault).
    """
    canary_figures, baseline_figures = figures(canary), figures(baseline)
    # A validated config has min_requests >= 1; an empty window is never judged regardless.
    if canary.requests < max(rollout.min_requests, 1):
        reason = (
            f"{canary.requests} canary requests in the window, fewer than "
            f"min_requests {rollout.min_requests}"
        )
        return Verdict("inconclusive", reason, canary_figures, baseline_figures)

    z = p_value = None
    if baseline.requests:
        z, p_value = z_test(canary.errors, canary.requests, baseline.errors, baseline.requests)
    failures: list[str] = []
    shared: list[str] = []

    canary_rate = canary.errors / canary.requests
    if canary_rate > rollout.max_error_rate:
        over = (
            f"canary error rate {_ratio(canary.errors, canary.requests)} is above "
            f"max_error_rate {_percent(rollout.max_error_rate)}"
        )
        if z is None or p_value is None:
            failures.append(f"{over} and the baseline had no requests to compare")
        else:
            test = f"{_ratio(baseline.errors, baseline.requests)}; z={z:.2f}, p={p_value:.3g}"
            if p_value < SIGNIFICANCE:
                failures.append(f"{over} and significantly above the baseline's {test}")
            else:
                shared.append(f"{over} but not significantly above the baseline's {test}")

    canary_p99, baseline_p99 = p99(canary), p99(baseline)
    if canary_p99 is not None and canary_p99 > rollout.max_p99:
        over = f"canary p99 {_ms(canary_p99)} is above max_p99 {_ms(rollout.max_p99)}"
        if baseline_p99 is None:
            failures.append(f"{over} and the baseline had no requests to compare")
        elif baseline_p99 <= rollout.max_p99:
            failures.append(f"{over} while the baseline's is {_ms(baseline_p99)}")
        else:
            shared.append(f"{over} but so is the baseline's ({_ms(baseline_p99)})")

    if failures:
        return Verdict("fail", "; ".join(failures), canary_figures, baseline_figures, z, p_value)
    summary = f"canary {_summary(canary, canary_p99)}; baseline {_summary(baseline, baseline_p99)}"
    reason = "; ".join([summary, *shared])
    return Verdict("pass", reason, canary_figures, baseline_figures, z, p_value)


def _percent(rate: float) -> str:
    return f"{rate * 100.0:.2f}%"


def _ratio(errors: int, requests: int) -> str:
    return f"{_percent(errors / requests)} ({errors}/{requests})"


def _ms(seconds: float) -> str:
    millis = seconds * 1000.0
    if millis >= 100.0:
        return f"{millis:.0f} ms"
    if millis >= 1.0:
        return f"{millis:.1f} ms"
    return f"{millis:.3f} ms"


def _summary(window: Window, latency: float | None) -> str:
    if not window.requests:
        return "no requests"
    shown = "unknown" if latency is None else _ms(latency)
    return f"errors {_ratio(window.errors, window.requests)}, p99 {shown}"


# --------------------------------------------------------------------------- state machine


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One judged window: when, at which step and weight, the verdict and its figures."""

    at: str
    step: int
    weight: float
    verdict: str
    reason: str
    canary: Figures
    baseline: Figures
    z: float | None = None
    p_value: float | None = None


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where a route's rollout stands. `RolloutState()` is idle: the file's split is in force.

    `step` indexes `Rollout.steps`; `canary_weight` is the canary's share in percent (the
    baseline gets the rest); `started_at` (ISO-8601) is when the rollout was started;
    `step_started_at` is when the current window began, on the caller's clock;
    `inconclusive_in_a_row` counts the current step's inconclusive windows; `history` holds
    the verdicts, oldest first (at most `HISTORY_LIMIT`).
    """

    state: str = "idle"
    step: int = 0
    canary_weight: float = 0.0
    reason: str = ""
    started_at: str = ""
    step_started_at: float = 0.0
    inconclusive_in_a_row: int = 0
    history: tuple[HistoryEntry, ...] = ()


def start(state: RolloutState, rollout: Rollout, now: float, at: str) -> RolloutState:
    """Start a rollout at the first step: running, the canary at `steps[0]`, a fresh history.

    Allowed when no rollout is in progress (idle, or one that ended: succeeded, failed,
    aborted); raises RolloutError while one is running or paused.
    """
    if state.state in ACTIVE:
        raise RolloutError(
            f"the rollout is already {state.state} at step {state.step}; "
            "abort or promote it before starting another"
        )
    weight = rollout.steps[0]
    return RolloutState(
        state="running",
        step=0,
        canary_weight=weight,
        reason=f"started: canary at {_weight(weight)}",
        started_at=at,
        step_started_at=now,
    )


def pause(state: RolloutState, reason: str = "paused by operator") -> RolloutState:
    """Hold the rollout at its current weights: no window is judged until `resume`.

    Only a running rollout can be paused.
    """
    _expect(state, ("running",), "pause")
    return replace(state, state="paused", reason=reason)


def resume(state: RolloutState, now: float, reason: str = "resumed by operator") -> RolloutState:
    """Run a paused rollout again; the current step's window starts over at `now`.

    The inconclusive count starts over too, so a rollout paused for lack of traffic gets
    `INCONCLUSIVE_LIMIT` more windows. Only a paused rollout can be resumed.
    """
    _expect(state, ("paused",), "resume")
    return replace(
        state, state="running", reason=reason, step_started_at=now, inconclusive_in_a_row=0
    )


def abort(state: RolloutState, reason: str = "aborted by operator") -> RolloutState:
    """Roll back now: the canary's weight to 0, state "aborted". Running or paused only."""
    _expect(state, ACTIVE, "abort")
    return replace(state, state="aborted", canary_weight=0.0, reason=reason)


def promote(state: RolloutState, reason: str = "promoted by operator") -> RolloutState:
    """Skip the remaining steps: the canary's weight to 100, state "succeeded".

    Allowed while running or paused, and after a fail or an abort (the operator overrides the
    verdict); not when idle or already succeeded.
    """
    _expect(state, ("running", "paused", "failed", "aborted"), "promote")
    return replace(state, state="succeeded", canary_weight=100.0, reason=reason)


def config_changed(state: RolloutState, reason: str = "config changed") -> RolloutState:
    """A change of the route's `split` or `rollout` in the file ends a rollout in progress.

    Running or paused: "aborted", the canary's weight 0. Any other state is returned as is (no
    error: the controller calls this for every changed route).
    """
    if state.state not in ACTIVE:
        return state
    return replace(state, state="aborted", canary_weight=0.0, reason=reason)


def restart_window(state: RolloutState, now: float) -> RolloutState:
    """After a restart of the proxy, start the current step's window over at `now`.

    The counters of the window that was in progress died with the workers, so a running
    rollout is judged on a whole fresh window. Other states are returned as is.
    """
    if state.state != "running":
        return state
    return replace(state, step_started_at=now)


def due(state: RolloutState, rollout: Rollout, now: float) -> bool:
    """Whether the current window has lasted `interval` and is to be judged."""
    return state.state == "running" and now >= state.step_started_at + rollout.interval


def advance(
    state: RolloutState, rollout: Rollout, verdict: Verdict, now: float, at: str
) -> RolloutState:
    """Apply the verdict of the window that ends at `now`; record it in the history.

    - pass: the next step, whose window starts at `now`; passing the last step, or the step
      before a step of 100, sets the canary to 100 and the state to "succeeded";
    - fail: the canary's weight to 0 at once, state "failed", the figures in the reason;
    - inconclusive: the same step for one more window from `now`; the third inconclusive
      window in a row pauses the rollout.
    Raises RolloutError unless the rollout is running, or when its step is beyond `rollout`'s
    steps (the config changed under it: call `config_changed` first).
    """
    _expect(state, ("running",), "apply a verdict to")
    if state.step >= len(rollout.steps):
        raise RolloutError(
            f"the rollout is at step {state.step} but the route has {len(rollout.steps)} "
            "steps; the config changed under it"
        )
    entry = HistoryEntry(
        at=at,
        step=state.step,
        weight=state.canary_weight,
        verdict=verdict.verdict,
        reason=verdict.reason,
        canary=verdict.canary,
        baseline=verdict.baseline,
        z=verdict.z,
        p_value=verdict.p_value,
    )
    history = (*state.history, entry)[-HISTORY_LIMIT:]
    here = f"step {state.step} ({_weight(state.canary_weight)})"

    if verdict.verdict == "fail":
        return replace(
            state,
            state="failed",
            canary_weight=0.0,
            reason=f"failed at {here}: {verdict.reason}",
            history=history,
        )
    if verdict.verdict == "inconclusive":
        in_a_row = state.inconclusive_in_a_row + 1
        if in_a_row >= INCONCLUSIVE_LIMIT:
            return replace(
                state,
                state="paused",
                reason=(
                    f"paused: {in_a_row} inconclusive windows in a row at {here}; "
                    f"last: {verdict.reason}"
                ),
                inconclusive_in_a_row=in_a_row,
                history=history,
            )
        return replace(
            state,
            reason=f"inconclusive at {here} ({in_a_row} in a row): {verdict.reason}",
            step_started_at=now,
            inconclusive_in_a_row=in_a_row,
            history=history,
        )
    following = state.step + 1
    if following >= len(rollout.steps) or rollout.steps[following] >= 100.0:
        return replace(
            state,
            state="succeeded",
            canary_weight=100.0,
            reason=f"succeeded: passed {here}, canary at 100%",
            inconclusive_in_a_row=0,
            history=history,
        )
    weight = rollout.steps[following]
    return replace(
        state,
        step=following,
        canary_weight=weight,
        reason=f"passed {here}; canary at {_weight(weight)}",
        step_started_at=now,
        inconclusive_in_a_row=0,
        history=history,
    )


def effective_split(
    state: RolloutState, rollout: Rollout, file_split: Mapping[str, float]
) -> dict[str, float] | None:
    """The split the rollout puts in force on the route, or None when idle (the file's split).

    In every other state, finished ones included, the canary gets `canary_weight`, the baseline
    the rest, and every other upstream of the file's split 0: a failed or aborted canary stays
    at 0 until the operator starts a new rollout or the controller returns the route to idle.
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
        "history": [
            {
                "at": entry.at,
                "step": entry.step,
                "weight": entry.weight,
                "verdict": entry.verdict,
                "reason": entry.reason,
                "canary": dict(entry.canary),
                "baseline": dict(entry.baseline),
                "z": entry.z,
                "p_value": entry.p_value,
            }
            for entry in state.history
        ],
    }


def from_json(obj: object) -> RolloutState:
    """Read back what `to_json` wrote (after a trip through a JSON file).

    Tolerant where that is safe: unknown keys are ignored (a newer Turnout may add some), keys
    missing but "state" take the idle defaults, integers are accepted for numbers. Anything
    else raises StateError naming the key, rather than resuming a rollout from garbage.
    """
    data = _mapping(obj, "rollout state")
    state = _choice(data, "state", STATES, "rollout state", required=True)
    history = data.get("history", [])
    if not isinstance(history, list):
        raise StateError(f"rollout state: history: expected a list, got {_kind(history)}")
    return RolloutState(
        state=state,
        step=_int(data, "step", "rollout state"),
        canary_weight=_weight_in(data, "canary_weight", "rollout state"),
        reason=_text(data, "reason", "rollout state"),
        started_at=_text(data, "started_at", "rollout state"),
        step_started_at=_number(data, "step_started_at", "rollout state"),
        inconclusive_in_a_row=_int(data, "inconclusive_in_a_row", "rollout state"),
        history=tuple(
            _history_entry(item, f"rollout state: history[{index}]")
            for index, item in enumerate(history)
        ),
    )


def _history_entry(obj: object, where: str) -> HistoryEntry:
    data = _mapping(obj, where)
    return HistoryEntry(
        at=_text(data, "at", where, required=True),
        step=_int(data, "step", where),
        weight=_weight_in(data, "weight", where),
        verdict=_choice(data, "verdict", VERDICTS, where, required=True),
        reason=_text(data, "reason", where),
        canary=_figures(data.get("canary", {}), f"{where}.canary"),
        baseline=_figures(data.get("baseline", {}), f"{where}.baseline"),
        z=_optional_number(data, "z", where),
        p_value=_optional_number(data, "p_value", where),
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
