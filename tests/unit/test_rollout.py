"""Automated canary analysis, the pure part: window figures, p99, verdicts, state machine, JSON."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import replace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rollout import (
    BUCKET_SLOTS,
    HISTORY_LIMIT,
    CounterSnapshot,
    HistoryEntry,
    RolloutError,
    RolloutState,
    StateError,
    Verdict,
    Window,
    abort,
    advance,
    config_changed,
    due,
    effective_split,
    figures,
    from_json,
    judge,
    p99,
    pause,
    promote,
    restart_window,
    resume,
    start,
    to_json,
    window_between,
)
from proxy.rollout import z_test as z_test_of
from proxy.spec import Rollout
from proxy.stats import DURATION_BUCKETS, RouteUpstreamStats

ROLLOUT = Rollout(baseline="blue", canary="canary")  # the contract's defaults
AT = "2026-01-01T00:00:00Z"


def histogram(*groups: tuple[int, float]) -> tuple[int, ...]:
    """Bucket counts with `count` requests at `seconds` for each (count, seconds)."""
    slots = [0] * BUCKET_SLOTS
    for count, seconds in groups:
        slots[bisect_left(DURATION_BUCKETS, seconds)] += count
    return tuple(slots)


def window(requests: int, errors: int = 0, seconds: float = 0.05) -> Window:
    """A window whose requests all took `seconds`."""
    return Window(requests, errors, histogram((requests, seconds)))


# --------------------------------------------------------------------------- window figures


def snapshot(codes: dict[int, int], buckets: tuple[int, ...] | None = None) -> CounterSnapshot:
    return CounterSnapshot(codes, buckets if buckets is not None else (0,) * BUCKET_SLOTS)


@pytest.mark.parametrize(
    ("start_codes", "end_codes", "requests", "errors"),
    [
        pytest.param({}, {200: 10}, 10, 0, id="from nothing"),
        pytest.param({200: 5, 500: 1}, {200: 15, 500: 3}, 12, 2, id="deltas"),
        pytest.param({}, {200: 1, 404: 2, 502: 3, 503: 4, 504: 5}, 15, 12, id="proxy 5xx count"),
        pytest.param({200: 5}, {200: 5, 503: 2}, 2, 2, id="code new in the window"),
        pytest.param({200: 100, 500: 10}, {200: 30, 500: 12}, 2, 2, id="reset clamps per code"),
        pytest.param({200: 100, 418: 3}, {200: 100}, 0, 0, id="code gone: clamped at 0"),
        pytest.param({200: 7}, {200: 7}, 0, 0, id="idle"),
    ],
)
def test_window_between_counts(
    start_codes: dict[int, int], end_codes: dict[int, int], requests: int, errors: int
) -> None:
    got = window_between(snapshot(start_codes), snapshot(end_codes))
    assert (got.requests, got.errors) == (requests, errors)


def test_window_between_buckets_and_reset() -> None:
    before = histogram((10, 0.01), (5, 0.2))
    after = histogram((12, 0.01), (2, 0.2), (4, 1.0))  # 0.2 s went down: a worker restarted
    got = window_between(snapshot({}, before), snapshot({}, after))
    assert got.buckets == histogram((2, 0.01), (4, 1.0))
    assert min(got.buckets) >= 0


def test_window_between_rejects_other_layouts() -> None:
    with pytest.raises(ValueError, match="buckets"):
        window_between(snapshot({}, (0,) * 3), snapshot({}))


def test_counter_snapshot_sums_worker_stats() -> None:
    one, two = RouteUpstreamStats("api", "canary"), RouteUpstreamStats("api", "canary")
    one.observe(200, 0.01)
    one.observe(503, 2.0)
    two.observe(200, 0.01)
    two.observe(200, 100.0)
    got = CounterSnapshot.from_stats([one.snapshot(), two.snapshot()])
    assert got.codes == {200: 3, 503: 1}
    assert got.buckets == histogram((2, 0.01), (1, 2.0), (1, 100.0))
    assert CounterSnapshot.from_stats([]) == CounterSnapshot()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"buckets": [0] * BUCKET_SLOTS}, "codes"),
        ({"codes": {}, "buckets": [0] * 3}, "buckets"),
        ({"codes": {"ok": 1}, "buckets": [0] * BUCKET_SLOTS}, "status code"),
        ({"codes": {"200": -1}, "buckets": [0] * BUCKET_SLOTS}, "codes"),
        ({"codes": {}, "buckets": [True] * BUCKET_SLOTS}, "buckets"),
    ],
)
def test_counter_snapshot_rejects_bad_stats(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CounterSnapshot.from_stats([bad])


@pytest.mark.parametrize(
    ("requests", "errors", "buckets"),
    [(1, 2, (0,) * BUCKET_SLOTS), (-1, 0, (0,) * BUCKET_SLOTS), (1, 0, (0,)), (1, 0, (-1,) * 19)],
)
def test_window_rejects_impossible_figures(
    requests: int, errors: int, buckets: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="window"):
        Window(requests, errors, buckets)


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        pytest.param(histogram(), None, id="no requests"),
        # rank 99 of 100, all in (0.05, 0.1]: 0.05 + 0.05 * 99/100
        pytest.param(histogram((100, 0.07)), 0.0995, id="interpolated in the bucket"),
        pytest.param(histogram((100, 0.00005)), 0.000099, id="first bucket starts at 0"),
        pytest.param(histogram((99, 0.07), (1, 0.7)), 0.1, id="rank on a bucket's upper bound"),
        # rank 99: 98 below, 2 in (0.5, 1.0]: 0.5 + 0.5 * 1/2
        pytest.param(histogram((98, 0.03), (2, 0.7)), 0.75, id="tail bucket"),
        pytest.param(histogram((10, 75.0)), 60.0, id="+Inf reports the last bound"),
        pytest.param(histogram((1, 0.3)), 0.25 + 0.25 * 0.99, id="one request"),
    ],
)
def test_p99(buckets: tuple[int, ...], expected: float | None) -> None:
    got = p99(Window(sum(buckets), 0, buckets))
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- verdicts


def test_z_test_known_values() -> None:
    # pooled 0.075: sd sqrt(0.075 * 0.925 * 0.02) = 0.037249, z = 0.05 / 0.037249
    z, p = z_test_of(10, 100, 5, 100)
    assert z == pytest.approx(1.34231, abs=1e-4)
    assert p == pytest.approx(0.089753, abs=1e-5)
    z_back, p_back = z_test_of(5, 100, 10, 100)
    assert z_back == pytest.approx(-z)
    assert p + p_back == pytest.approx(1.0)
    assert z_test_of(3, 300, 57, 5700) == (0.0, 0.5)  # equal ratios
    assert z_test_of(0, 300, 0, 5700) == (0.0, 0.5)  # nothing to test
    assert z_test_of(300, 300, 5700, 5700) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("canary", "baseline", "verdict", "reason_parts"),
    [
        pytest.param(
            window(49, 49, 9.0),
            window(5000),
            "inconclusive",
            ["49 canary requests in the window, fewer than min_requests 50"],
            id="below min_requests, however bad",
        ),
        pytest.param(
            window(50),
            window(5000),
            "pass",
            ["canary errors 0.00% (0/50), p99 49.8 ms", "baseline errors 0.00% (0/5000)"],
            id="exactly min_requests is judged",
        ),
        pytest.param(
            window(300, 1),
            window(5700, 28),
            "pass",
            ["canary errors 0.33% (1/300)", "baseline errors 0.49% (28/5700)"],
            id="healthy",
        ),
        pytest.param(
            window(300, 8),
            window(5700, 28),
            "fail",
            [
                "canary error rate 2.67% (8/300) is above max_error_rate 1.00%",
                "significantly above the baseline's 0.49% (28/5700); z=",
            ],
            id="errors: over the threshold and above the baseline",
        ),
        pytest.param(
            window(300, 24),
            window(5700, 456),
            "pass",
            ["8.00% (24/300) is above max_error_rate 1.00%", "but not significantly above"],
            id="errors: a burst the baseline shares",
        ),
        pytest.param(
            window(300, 2),
            window(5700, 0),
            "pass",
            ["canary errors 0.67% (2/300)"],
            id="errors: above the baseline but under the threshold",
        ),
        pytest.param(
            window(300, 3),
            window(0),
            "pass",
            ["canary errors 1.00% (3/300)", "baseline no requests"],
            id="errors: at the threshold is not above it",
        ),
        pytest.param(
            window(300, 4),
            window(0),
            "fail",
            ["1.33% (4/300) is above max_error_rate 1.00% and the baseline had no requests"],
            id="errors: no baseline traffic, the threshold alone",
        ),
        pytest.param(
            window(300, 0, 0.9),
            window(5700, 0, 0.05),
            "fail",
            ["canary p99 995 ms is above max_p99 500 ms while the baseline's is 49.8 ms"],
            id="latency: slower than the threshold and the baseline",
        ),
        pytest.param(
            window(300, 0, 0.9),
            window(5700, 0, 0.9),
            "pass",
            ["canary p99 995 ms is above max_p99 500 ms but so is the baseline's (995 ms)"],
            id="latency: a spike the baseline shares",
        ),
        pytest.param(
            window(300, 0, 0.9),
            window(0),
            "fail",
            ["canary p99 995 ms is above max_p99 500 ms and the baseline had no requests"],
            id="latency: no baseline traffic, the threshold alone",
        ),
        pytest.param(
            window(300, 0, 0.4),
            window(5700, 0, 0.05),
            "pass",
            ["p99 498 ms"],
            id="latency: under the threshold",
        ),
        pytest.param(
            window(300, 30, 0.9),
            window(5700, 5),
            "fail",
            ["10.00% (30/300) is above max_error_rate", "; canary p99 995 ms is above"],
            id="both gates",
        ),
    ],
)
def test_judge(canary: Window, baseline: Window, verdict: str, reason_parts: list[str]) -> None:
    got = judge(canary, baseline, ROLLOUT)
    assert got.verdict == verdict
    for part in reason_parts:
        assert part in got.reason
    assert got.canary == figures(canary)
    assert got.baseline == figures(baseline)


def test_judge_reports_the_test_statistics() -> None:
    got = judge(window(300, 8), window(5700, 28), ROLLOUT)
    z, p = z_test_of(8, 300, 28, 5700)
    assert (got.z, got.p_value) == (z, p)
    assert z > 1.6449
    assert p < 0.05
    assert f"z={z:.2f}, p={p:.3g}" in got.reason
    assert judge(window(10), window(100), ROLLOUT).z is None  # inconclusive: no test
    no_baseline = judge(window(300, 9), window(0), ROLLOUT)
    assert (no_baseline.z, no_baseline.p_value) == (None, None)


def test_judge_uses_the_rollout_thresholds() -> None:
    strict = replace(ROLLOUT, min_requests=10, max_error_rate=0.0, max_p99=0.02)
    assert judge(window(20, 1), window(0), strict).verdict == "fail"
    assert judge(window(20, 0, 0.03), window(0), strict).verdict == "fail"
    assert judge(window(20, 0, 0.009), window(0), strict).verdict == "pass"
    empty = judge(window(0), window(100), replace(strict, min_requests=0))
    assert empty.verdict == "inconclusive"


def test_figures() -> None:
    assert figures(Window(200, 3, histogram((200, 0.07)))) == {
        "requests": 200,
        "errors": 3,
        "error_rate": 0.015,
        "p99_ms": 99.5,
    }
    assert figures(Window(0, 0)) == {
        "requests": 0,
        "errors": 0,
        "error_rate": None,
        "p99_ms": None,
    }


def test_verdict_must_be_known() -> None:
    with pytest.raises(ValueError, match="verdict"):
        Verdict("maybe", "", {}, {})


# --------------------------------------------------------------------------- state machine

PASS = Verdict("pass", "fine", {"requests": 300}, {"requests": 5700})
FAIL = Verdict("fail", "canary error rate 3.00% (9/300) is above ...", {}, {}, 3.1, 0.001)
INCONCLUSIVE = Verdict("inconclusive", "12 canary requests in the window", {}, {})


def running(step: int = 0) -> RolloutState:
    state = start(RolloutState(), ROLLOUT, 1000.0, AT)
    for _ in range(step):
        state = advance(state, ROLLOUT, PASS, state.step_started_at + 60.0, AT)
    return state


STATES_BY_NAME: dict[str, RolloutState] = {
    "idle": RolloutState(),
    "running": running(1),
    "paused": pause(running(1)),
    "succeeded": promote(running(1)),
    "failed": advance(running(1), ROLLOUT, FAIL, 1120.0, AT),
    "aborted": abort(running(1)),
}
ACTIONS: dict[str, Callable[[RolloutState], RolloutState]] = {
    "start": lambda state: start(state, ROLLOUT, 5000.0, AT),
    "pause": pause,
    "resume": lambda state: resume(state, 5000.0),
    "abort": abort,
    "promote": promote,
    "advance": lambda state: advance(state, ROLLOUT, PASS, 5000.0, AT),
}
ALLOWED = {
    "start": {"idle", "succeeded", "failed", "aborted"},
    "pause": {"running"},
    "resume": {"paused"},
    "abort": {"running", "paused"},
    "promote": {"running", "paused", "failed", "aborted"},
    "advance": {"running"},
}
RESULT = {
    "start": "running",
    "pause": "paused",
    "resume": "running",
    "abort": "aborted",
    "promote": "succeeded",
    "advance": "running",
}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("state_name", STATES_BY_NAME)
def test_transitions(action: str, state_name: str) -> None:
    state = STATES_BY_NAME[state_name]
    assert state.state == state_name
    if state_name in ALLOWED[action]:
        assert ACTIONS[action](state).state == RESULT[action]
    else:
        with pytest.raises(
            RolloutError, match=f"(a rollout that is|rollout is already) {state_name}"
        ):
            ACTIONS[action](state)


def test_start() -> None:
    old = STATES_BY_NAME["failed"]
    state = start(old, ROLLOUT, 1000.0, AT)
    assert state == RolloutState(
        state="running",
        step=0,
        canary_weight=1.0,
        reason="started: canary at 1%",
        started_at=AT,
        step_started_at=1000.0,
    )
    with pytest.raises(RolloutError, match="already running at step 0; abort or promote"):
        start(state, ROLLOUT, 1001.0, AT)


def test_operator_calls_keep_or_set_the_weight() -> None:
    state = running(2)  # 25%
    paused = pause(state)
    assert (paused.state, paused.canary_weight, paused.reason) == (
        "paused",
        25.0,
        "paused by operator",
    )
    resumed = resume(replace(paused, inconclusive_in_a_row=3), 7000.0)
    assert (resumed.state, resumed.canary_weight) == ("running", 25.0)
    assert (resumed.step_started_at, resumed.inconclusive_in_a_row) == (7000.0, 0)
    assert abort(paused).canary_weight == 0.0
    assert abort(state, "page from on-call").reason == "page from on-call"
    assert promote(paused).canary_weight == 100.0
    assert promote(STATES_BY_NAME["failed"]).state == "succeeded"


def test_a_passing_walk_succeeds_at_the_step_before_100() -> None:
    state = running()
    weights = [state.canary_weight]
    now = state.step_started_at
    while state.state == "running":
        now += 60.0
        state = advance(state, ROLLOUT, PASS, now, f"t{now:.0f}")
        weights.append(state.canary_weight)
        if state.state == "running":
            assert state.step_started_at == now
    assert weights == [1.0, 5.0, 25.0, 50.0, 100.0]
    assert state.state == "succeeded"
    assert state.reason == "succeeded: passed step 3 (50%), canary at 100%"
    assert [(entry.step, entry.weight, entry.verdict) for entry in state.history] == [
        (0, 1.0, "pass"),
        (1, 5.0, "pass"),
        (2, 25.0, "pass"),
        (3, 50.0, "pass"),
    ]
    assert state.history[0].at == "t1060"
    assert state.history[0].canary == {"requests": 300}


@pytest.mark.parametrize(
    ("steps", "walk"),
    [
        ((10.0, 50.0), [10.0, 50.0, 100.0]),  # the last step passed
        ((100.0,), [100.0, 100.0]),  # one step, already 100
        ((20.0, 100.0), [20.0, 100.0]),
        ((2.5, 7.5, 99.5), [2.5, 7.5, 99.5, 100.0]),
    ],
)
def test_other_step_lists(steps: tuple[float, ...], walk: list[float]) -> None:
    rollout = replace(ROLLOUT, steps=steps)
    state = start(RolloutState(), rollout, 0.0, AT)
    weights = [state.canary_weight]
    while state.state == "running":
        state = advance(state, rollout, PASS, 0.0, AT)
        weights.append(state.canary_weight)
    assert (state.state, weights) == ("succeeded", walk)


def test_fail_rolls_back_with_the_figures() -> None:
    state = advance(running(1), ROLLOUT, FAIL, 1120.0, AT)
    assert (state.state, state.canary_weight, state.step) == ("failed", 0.0, 1)
    assert state.reason == f"failed at step 1 (5%): {FAIL.reason}"
    entry = state.history[-1]
    assert (entry.verdict, entry.weight, entry.z, entry.p_value) == ("fail", 5.0, 3.1, 0.001)


def test_three_inconclusive_windows_in_a_row_pause() -> None:
    state = running(1)
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1120.0, AT)
    assert (state.state, state.step, state.inconclusive_in_a_row) == ("running", 1, 1)
    assert state.step_started_at == 1120.0  # one more interval from now
    assert (
        state.reason == "inconclusive at step 1 (5%) (1 in a row): 12 canary requests in the window"
    )
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1180.0, AT)
    assert (state.state, state.inconclusive_in_a_row) == ("running", 2)
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1240.0, AT)
    assert (state.state, state.canary_weight) == ("paused", 5.0)
    assert state.reason.startswith("paused: 3 inconclusive windows in a row at step 1 (5%)")
    assert [entry.verdict for entry in state.history] == ["pass"] + ["inconclusive"] * 3
    assert not due(state, ROLLOUT, 10_000.0)


def test_a_pass_resets_the_inconclusive_count() -> None:
    state = running(1)
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1120.0, AT)
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1180.0, AT)
    state = advance(state, ROLLOUT, PASS, 1240.0, AT)
    assert (state.step, state.inconclusive_in_a_row) == (2, 0)
    state = advance(state, ROLLOUT, INCONCLUSIVE, 1300.0, AT)
    assert (state.state, state.inconclusive_in_a_row) == ("running", 1)


def test_history_keeps_the_newest_entries() -> None:
    state = running(1)
    for index in range(HISTORY_LIMIT + 10):
        state = advance(state, ROLLOUT, replace(INCONCLUSIVE, reason=str(index)), 0.0, AT)
        state = resume(state, 0.0) if state.state == "paused" else state
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].reason == str(HISTORY_LIMIT + 9)


def test_advance_beyond_the_steps_is_refused() -> None:
    state = running(3)
    with pytest.raises(RolloutError, match="config changed"):
        advance(state, replace(ROLLOUT, steps=(10.0, 50.0)), PASS, 0.0, AT)


def test_due() -> None:
    state = running()  # step_started_at 1000, interval 60
    assert not due(state, ROLLOUT, 1059.9)
    assert due(state, ROLLOUT, 1060.0)
    assert not due(pause(state), ROLLOUT, 2000.0)
    assert not due(RolloutState(), ROLLOUT, 2000.0)


@pytest.mark.parametrize("state_name", STATES_BY_NAME)
def test_config_changed(state_name: str) -> None:
    state = STATES_BY_NAME[state_name]
    got = config_changed(state)
    if state_name in ("running", "paused"):
        assert (got.state, got.canary_weight, got.reason) == ("aborted", 0.0, "config changed")
        assert got.history == state.history
    else:
        assert got == state


@pytest.mark.parametrize("state_name", STATES_BY_NAME)
def test_restart_window(state_name: str) -> None:
    state = STATES_BY_NAME[state_name]
    got = restart_window(state, 99_999.0)
    if state_name == "running":
        assert got == replace(state, step_started_at=99_999.0)
    else:
        assert got == state


FILE_SPLIT = {"blue": 90.0, "canary": 10.0, "green": 0.0, "shadow": 5.0}


@pytest.mark.parametrize(
    ("state_name", "expected"),
    [
        ("idle", None),
        ("running", {"blue": 95.0, "canary": 5.0, "green": 0.0, "shadow": 0.0}),
        ("paused", {"blue": 95.0, "canary": 5.0, "green": 0.0, "shadow": 0.0}),
        ("succeeded", {"blue": 0.0, "canary": 100.0, "green": 0.0, "shadow": 0.0}),
        ("failed", {"blue": 100.0, "canary": 0.0, "green": 0.0, "shadow": 0.0}),
        ("aborted", {"blue": 100.0, "canary": 0.0, "green": 0.0, "shadow": 0.0}),
    ],
)
def test_effective_split(state_name: str, expected: dict[str, float] | None) -> None:
    assert effective_split(STATES_BY_NAME[state_name], ROLLOUT, FILE_SPLIT) == expected


def test_effective_split_adds_upstreams_the_file_split_lacks() -> None:
    got = effective_split(running(1), ROLLOUT, {"green": 100.0})
    assert got == {"green": 0.0, "blue": 95.0, "canary": 5.0}


# --------------------------------------------------------------------------- state file

finite = st.floats(allow_nan=False, allow_infinity=False)
figure_values = st.one_of(st.none(), st.integers(0, 10**9), finite)
figure_maps = st.dictionaries(
    st.sampled_from(["requests", "errors", "error_rate", "p99_ms"]), figure_values
)
percents = st.floats(0.0, 100.0)
entries = st.builds(
    HistoryEntry,
    at=st.text(),
    step=st.integers(0, 50),
    weight=percents,
    verdict=st.sampled_from(["pass", "fail", "inconclusive"]),
    reason=st.text(),
    canary=figure_maps,
    baseline=figure_maps,
    z=st.none() | finite,
    p_value=st.none() | st.floats(0.0, 1.0),
)
states = st.builds(
    RolloutState,
    state=st.sampled_from(["idle", "running", "paused", "succeeded", "failed", "aborted"]),
    step=st.integers(0, 50),
    canary_weight=percents,
    reason=st.text(),
    started_at=st.text(),
    step_started_at=finite,
    inconclusive_in_a_row=st.integers(0, 3),
    history=st.lists(entries, max_size=5).map(tuple),
)


@given(states)
def test_json_round_trip(state: RolloutState) -> None:
    assert from_json(orjson.loads(orjson.dumps(to_json(state)))) == state


def test_json_shape_for_admin_routes() -> None:
    state = advance(running(1), ROLLOUT, FAIL, 1120.0, "2026-05-01T10:00:00Z")
    data = to_json(state)
    assert {"state", "step", "canary_weight", "reason", "history"} <= data.keys()
    history = data["history"]
    assert isinstance(history, list)
    assert {"at", "step", "weight", "verdict", "reason", "canary", "baseline"} <= history[-1].keys()
    assert history[-1]["at"] == "2026-05-01T10:00:00Z"


def test_from_json_is_tolerant() -> None:
    assert from_json({"state": "idle"}) == RolloutState()
    got = from_json({"state": "running", "step": 2, "canary_weight": 25, "future_key": [1]})
    assert (got.step, got.canary_weight) == (2, 25.0)
    assert isinstance(got.canary_weight, float)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "rollout state: expected an object, got list"),
        ({}, "rollout state: state: missing"),
        ({"state": "done"}, "state: expected one of idle, running, paused"),
        ({"state": 3}, "state: expected a string, got int"),
        ({"state": "running", "step": -1}, "step: expected an integer >= 0, got -1"),
        ({"state": "running", "step": True}, "step: expected an integer >= 0, got True"),
        ({"state": "running", "step": 1.5}, "step: expected an integer >= 0"),
        ({"state": "running", "canary_weight": 101}, "canary_weight: expected a percent in 0..100"),
        ({"state": "running", "canary_weight": "5"}, "canary_weight: expected a finite number"),
        ({"state": "running", "step_started_at": math.nan}, "step_started_at: expected a finite"),
        ({"state": "running", "reason": None}, "reason: expected a string, got null"),
        ({"state": "running", "history": {}}, "history: expected a list, got dict"),
        ({"state": "running", "history": [1]}, r"history\[0\]: expected an object, got int"),
        ({"state": "running", "history": [{"verdict": "pass"}]}, r"history\[0\]: at: missing"),
        (
            {"state": "running", "history": [{"at": "t", "verdict": "ok"}]},
            r"history\[0\]: verdict: expected one of pass, fail, inconclusive, got 'ok'",
        ),
        (
            {"state": "running", "history": [{"at": "t", "verdict": "pass", "canary": []}]},
            r"history\[0\].canary: expected an object",
        ),
        (
            {
                "state": "running",
                "history": [{"at": "t", "verdict": "pass", "baseline": {"requests": "9"}}],
            },
            r"history\[0\].baseline.requests: expected a number or null, got str",
        ),
        (
            {"state": "running", "history": [{"at": "t", "verdict": "pass", "z": "x"}]},
            r"history\[0\]: z: expected a finite number",
        ),
    ],
)
def test_from_json_rejects_bad_state(obj: object, message: str) -> None:
    with pytest.raises(StateError, match=message):
        from_json(obj)
