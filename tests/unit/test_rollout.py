"""Automated canary analysis, the pure part: evidence, looks, verdicts, state machine, JSON.

The looks run the real tests of `proxy.core.sequential` on evidence with clear answers: a canary
with 30% errors against a baseline at 1% (any sound test rejects it), and versions that serve
alike (no test may reject them). The statistics themselves are checked in test_sequential.py.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import replace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core import grpc
from proxy.core.counters import (
    DURATION_BUCKETS,
    RouteUpstreamStats,
    read_counts,
    read_pair_snapshot,
)
from proxy.core.rollout import (
    BUCKET_SLOTS,
    HISTORY_LIMIT,
    INCONCLUSIVE_LIMIT,
    CounterSnapshot,
    HistoryEntry,
    RolloutError,
    RolloutState,
    StateError,
    Statistic,
    Window,
    abort,
    begin_step,
    config_changed,
    effective_split,
    figures,
    from_json,
    judged_steps,
    look,
    next_look,
    p99,
    pause,
    promote,
    refuse_step,
    release,
    restart_step,
    resume,
    segment_alpha,
    start,
    starts_evidence,
    step_alpha,
    to_json,
    window_between,
)
from proxy.core.sequential import GATE_SHARE, RESTART_RESERVE, segments_spent
from proxy.core.spec import Rollout, Webhook

# The contract's defaults, but a 10 s check to keep the arithmetic readable.
ROLLOUT = Rollout(baseline="blue", canary="canary", check=10.0)
GATED = replace(ROLLOUT, webhooks=(Webhook(on="before_step", url="http://127.0.0.1:9/gate"),))
AT = "2026-01-01T00:00:00Z"
T0 = 1000.0


def histogram(*groups: tuple[int, float]) -> tuple[int, ...]:
    """Bucket counts with `count` requests at `seconds` for each (count, seconds)."""
    slots = [0] * BUCKET_SLOTS
    for count, seconds in groups:
        slots[bisect_left(DURATION_BUCKETS, seconds)] += count
    return tuple(slots)


def window(requests: int, errors: int = 0, seconds: float = 0.05) -> Window:
    """Evidence whose requests all took `seconds`."""
    return Window(requests, errors, histogram((requests, seconds)))


# Evidence with a clear answer (see the module docstring).
BAD = (window(300, 90), window(3000, 30))
ALIKE = (window(300, 3), window(3000, 30))
QUIET = (window(20, 0), window(200, 2))


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
        pytest.param({200: 7}, {200: 7}, 0, 0, id="idle"),
    ],
)
def test_window_between_counts(
    start_codes: dict[int, int], end_codes: dict[int, int], requests: int, errors: int
) -> None:
    got = window_between(snapshot(start_codes), snapshot(end_codes))
    assert (got.requests, got.errors, got.reset) == (requests, errors, False)


def test_window_between_buckets() -> None:
    before = histogram((10, 0.01), (5, 0.2))
    after = histogram((12, 0.01), (5, 0.2), (4, 1.0))
    got = window_between(snapshot({}, before), snapshot({}, after))
    assert (got.buckets, got.reset) == (histogram((2, 0.01), (4, 1.0)), False)


@pytest.mark.parametrize(
    ("start_codes", "end_codes", "before", "after"),
    [
        pytest.param({200: 100, 500: 10}, {200: 30, 500: 12}, None, None, id="a code went down"),
        pytest.param({200: 100, 418: 3}, {200: 100}, None, None, id="a code is gone"),
        pytest.param(
            {200: 15},
            {200: 20},
            histogram((10, 0.01), (5, 0.2)),
            histogram((18, 0.01), (2, 0.2)),  # more requests in all, but 0.2 s went down
            id="a bucket went down",
        ),
    ],
)
def test_window_between_counters_that_went_down_reset_the_evidence(
    start_codes: dict[int, int],
    end_codes: dict[int, int],
    before: tuple[int, ...] | None,
    after: tuple[int, ...] | None,
) -> None:
    """A worker died or restarted: no window is measured (clamping would mix in old counts)."""
    got = window_between(snapshot(start_codes, before), snapshot(end_codes, after))
    assert got == Window(0, 0, reset=True)


@given(
    st.lists(st.integers(0, 50), min_size=BUCKET_SLOTS, max_size=BUCKET_SLOTS),
    st.lists(st.integers(-50, 50), min_size=BUCKET_SLOTS, max_size=BUCKET_SLOTS),
    st.dictionaries(st.sampled_from([200, 404, 500, 503]), st.integers(0, 50)),
    st.dictionaries(st.sampled_from([200, 404, 500, 503]), st.integers(-50, 50)),
)
def test_window_between_is_the_difference_or_a_reset(
    start_buckets: list[int],
    bucket_moves: list[int],
    start_codes: dict[int, int],
    code_moves: dict[int, int],
) -> None:
    end_buckets = tuple(max(0, a + b) for a, b in zip(start_buckets, bucket_moves, strict=True))
    end_codes = {
        code: max(0, start_codes.get(code, 0) + code_moves.get(code, 0))
        for code in start_codes.keys() | code_moves.keys()
    }
    got = window_between(
        snapshot(start_codes, tuple(start_buckets)), snapshot(end_codes, end_buckets)
    )
    went_down = any(end_codes.get(code, 0) < count for code, count in start_codes.items()) or any(
        after < before for before, after in zip(start_buckets, end_buckets, strict=True)
    )
    assert got.reset == went_down
    if went_down:
        assert (got.requests, got.errors, sum(got.buckets)) == (0, 0, 0)
    else:
        served = {code: end_codes[code] - start_codes.get(code, 0) for code in end_codes}
        assert got.requests == sum(served.values())
        assert got.errors == sum(n for code, n in served.items() if code >= 500)
        assert got.buckets == tuple(
            after - before for before, after in zip(start_buckets, end_buckets, strict=True)
        )


@pytest.mark.parametrize(
    ("start", "end", "requests", "errors"),
    [
        pytest.param(({200: 5}, 1), ({200: 15}, 4), 10, 3, id="grpc errors under 200"),
        pytest.param(({200: 5, 503: 1}, 0), ({200: 9, 503: 3}, 4), 6, 6, id="with 5xx"),
        pytest.param(({200: 5}, 5), ({200: 5}, 5), 0, 0, id="idle"),
    ],
)
def test_window_between_counts_grpc_errors(
    start: tuple[dict[int, int], int], end: tuple[dict[int, int], int], requests: int, errors: int
) -> None:
    got = window_between(
        CounterSnapshot(start[0], grpc_errors=start[1]), CounterSnapshot(end[0], grpc_errors=end[1])
    )
    assert (got.requests, got.errors, got.reset) == (requests, errors, False)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param(({200: 5}, 3), ({200: 9}, 2), id="grpc errors went down"),
        # A worker with 10 answers left the sum while another served 12 gRPC errors: more
        # errors than answers below 500, counts that do not add up.
        pytest.param(({200: 10}, 0), ({200: 12, 503: 1}, 12), id="more than the non-5xx"),
    ],
)
def test_window_between_grpc_errors_that_do_not_add_up_reset_the_evidence(
    start: tuple[dict[int, int], int], end: tuple[dict[int, int], int]
) -> None:
    got = window_between(
        CounterSnapshot(start[0], grpc_errors=start[1]), CounterSnapshot(end[0], grpc_errors=end[1])
    )
    assert got == Window(0, 0, reset=True)


def grpc_evidence(calls: int, status: int, errors: int = 0) -> CounterSnapshot:
    """One worker's counters after `calls` gRPC calls answered with HTTP 200 and `status` (and
    `errors` of them INTERNAL), as the supervisor reads them back."""
    stats = RouteUpstreamStats("api", "x")
    for index in range(calls):
        stats.observe_grpc(200, grpc.INTERNAL if index < errors else status, 0.05)
    sent = read_pair_snapshot(orjson.loads(orjson.dumps(stats.snapshot())))
    return CounterSnapshot.from_stats([sent])


def test_a_canary_failing_only_with_grpc_internal_is_rolled_back() -> None:
    """Every canary call is HTTP 200 with grpc-status INTERNAL: an error, as a 5xx would be."""
    state = running(1)  # 5%
    canary = window_between(CounterSnapshot(), grpc_evidence(300, grpc.INTERNAL))
    baseline = window_between(CounterSnapshot(), grpc_evidence(3000, grpc.OK, errors=30))
    assert (canary.requests, canary.errors, baseline.errors) == (300, 300, 30)
    failed, entry = look(state, ROLLOUT, canary, baseline, state.step_started_at + 10.0, "t")
    assert (failed.state, failed.canary_weight) == ("failed", 0.0)
    assert entry is not None
    assert (entry.verdict, entry.canary["errors"], entry.canary["error_rate"]) == ("fail", 300, 1.0)
    assert any(test.reject and test.name == "errors" for test in entry.tests)
    assert "canary errors 100.00% (300/300)" in failed.reason


def test_grpc_statuses_that_are_not_errors_pass_like_2xx() -> None:
    state = running()
    canary = window_between(CounterSnapshot(), grpc_evidence(300, grpc.NOT_FOUND))
    baseline = window_between(CounterSnapshot(), grpc_evidence(3000, grpc.OK))
    passed, entry = look(state, ROLLOUT, canary, baseline, T0 + ROLLOUT.interval, "t")
    assert entry is not None
    assert (entry.verdict, passed.step, entry.canary["errors"]) == ("pass", 1, 0)


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
def test_counts_that_cannot_be_summed_are_refused_when_read(
    bad: dict[str, object], message: str
) -> None:
    # Checked once, where they arrive (proxy.core.counters); CounterSnapshot trusts what it gets.
    with pytest.raises(ValueError, match=message):
        read_counts(bad)


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
        # rank 99: 98 below, 2 in (0.5, 0.75]: 0.5 + 0.25 * 1/2
        pytest.param(histogram((98, 0.03), (2, 0.7)), 0.625, id="tail bucket"),
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


# --------------------------------------------------------------------------- looks


def running(step: int = 0, rollout: Rollout = ROLLOUT) -> RolloutState:
    """A rollout that passed its first `step` steps on evidence of alike versions."""
    state = start(RolloutState(), rollout, T0, AT)
    for _ in range(step):
        state, _ = look(state, rollout, *ALIKE, state.step_started_at + rollout.interval, AT)
    assert (state.state, state.step) == ("running", step)
    return state


def test_step_alpha_shares_one_minus_confidence_among_the_judged_steps() -> None:
    # 1, 5, 25, 50 are judged; reaching 100 is promotion, never judged: 4 shares, not 5.
    assert judged_steps(ROLLOUT) == 4
    assert step_alpha(ROLLOUT) == pytest.approx((1.0 - ROLLOUT.confidence) / 4)
    assert step_alpha(replace(ROLLOUT, steps=(100.0,))) == pytest.approx(0.01)
    assert step_alpha(replace(ROLLOUT, steps=(10.0, 100.0))) == pytest.approx(0.01)
    assert step_alpha(replace(ROLLOUT, steps=(10.0, 20.0))) == pytest.approx(0.005)
    assert step_alpha(replace(ROLLOUT, steps=(10.0, 20.0, 100.0))) == pytest.approx(0.005)


def walk_looked_at(rollout: Rollout) -> list[tuple[int, float]]:
    """(step, alpha) of every look of a walk of alike versions that passes each step."""
    state = start(RolloutState(), rollout, T0, AT)
    looked: list[tuple[int, float]] = []
    while state.state == "running":
        step = state.step
        state, _ = look(state, rollout, *ALIKE, state.step_started_at + rollout.interval, AT)
        assert state.history[-1].verdict == "pass"
        looked.append((step, look_alpha(state.history[-1].tests)))
    assert (state.state, state.canary_weight) == ("succeeded", 100.0)
    return looked


def look_alpha(tests: tuple[Statistic, ...]) -> float:
    """The alpha a look was given, read back from its error gate's threshold (a 10% share)."""
    (gate,) = [test for test in tests if test.name == "error_gate"]
    assert gate.threshold is not None
    return math.exp(-gate.threshold) / GATE_SHARE


@given(
    st.lists(st.floats(1.0, 100.0), min_size=1, max_size=8, unique=True).map(
        lambda steps: tuple(sorted(steps))
    ),
    st.sampled_from([0.9, 0.95, 0.99, 0.999]),
)
def test_the_budget_is_shared_by_exactly_the_steps_a_walk_looks_at(
    steps: tuple[float, ...], confidence: float
) -> None:
    rollout = replace(ROLLOUT, steps=steps, confidence=confidence)
    looked = walk_looked_at(rollout)
    assert [step for step, _ in looked] == list(range(judged_steps(rollout)))
    # No step of 100% after the first is looked at, so it gets no share.
    assert all(rollout.steps[step] < 100.0 or step == 0 for step, _ in looked)
    assert judged_steps(rollout) * step_alpha(rollout) == pytest.approx(1.0 - confidence)
    # Each step's only look is its first evidence segment's.
    for _, alpha in looked:
        assert alpha == pytest.approx(segment_alpha(rollout, 0), rel=1e-9)
        assert alpha == pytest.approx(step_alpha(rollout) * (1.0 - RESTART_RESERVE), rel=1e-9)
    assert sum(alpha for _, alpha in looked) <= 1.0 - confidence


def test_a_rejection_rolls_back_at_the_first_look() -> None:
    state = running(1)  # 5%
    failed, entry = look(state, ROLLOUT, *BAD, state.step_started_at + 10.0, "t-fail")
    assert (failed.state, failed.canary_weight, failed.step) == ("failed", 0.0, 1)
    assert entry is not None
    assert (entry.verdict, entry.step, entry.weight, entry.at) == ("fail", 1, 5.0, "t-fail")
    assert failed.history[-1] == entry
    assert (entry.canary["requests"], entry.canary["errors"]) == (300, 90)
    assert entry.baseline["requests"] == 3000
    rejected = [test for test in entry.tests if test.reject]
    assert rejected
    for test in rejected:
        assert test.log_e is not None
        assert test.threshold is not None
        assert test.log_e >= test.threshold
        assert test.describe() in entry.reason
    assert failed.reason.startswith("failed at step 1 (5%) after 10.0s: ")
    assert "canary errors 30.00% (90/300)" in failed.reason
    assert effective_split(failed, ROLLOUT, {"blue": 100.0, "canary": 0.0}) == {
        "blue": 100.0,
        "canary": 0.0,
    }


def test_alike_versions_give_no_verdict_before_the_interval() -> None:
    state = running()
    after, entry = look(state, ROLLOUT, *ALIKE, T0 + 59.0, "t")
    assert entry is None
    assert (after.state, after.step, after.history) == ("running", 0, ())
    assert after.last_check is not None
    assert after.last_check.elapsed == 59.0
    assert after.last_check.canary["requests"] == 300
    assert {test.name for test in after.last_check.tests} == {
        "errors",
        "latency",
        "error_gate",
        "p99_gate",
    }
    assert not any(test.reject for test in after.last_check.tests)
    # Each test gets a share of the step's alpha: a threshold at least log(1 / alpha).
    for test in after.last_check.tests:
        assert test.threshold is not None
        assert test.threshold >= math.log(1.0 / step_alpha(ROLLOUT))
    assert look_alpha(after.last_check.tests) == pytest.approx(segment_alpha(ROLLOUT, 0))
    assert after.spent == 1


def test_a_step_passes_when_it_lasted_interval_with_min_requests() -> None:
    state = running()
    after, entry = look(state, ROLLOUT, *ALIKE, T0 + 60.0, "t-pass")
    assert entry is not None
    assert (entry.verdict, entry.step, entry.weight) == ("pass", 0, 1.0)
    assert len(entry.tests) == 4
    assert not any(test.reject for test in entry.tests)
    assert entry.reason.startswith("canary errors 1.00% (3/300), p99 ")
    assert (after.state, after.step, after.canary_weight) == ("running", 1, 5.0)
    assert after.step_started_at == T0 + 60.0
    assert after.last_check is None  # the new step has not been looked at
    assert after.reason == "passed step 0 (1%); canary at 5%"


def test_a_passing_walk_succeeds_at_the_step_before_100() -> None:
    state = running()
    weights = [state.canary_weight]
    while state.state == "running":
        state, _ = look(state, ROLLOUT, *ALIKE, state.step_started_at + 60.0, AT)
        weights.append(state.canary_weight)
    assert weights == [1.0, 5.0, 25.0, 50.0, 100.0]
    assert state.state == "succeeded"
    assert state.reason == "succeeded: passed step 3 (50%), canary at 100%"
    assert [(entry.step, entry.weight, entry.verdict) for entry in state.history] == [
        (0, 1.0, "pass"),
        (1, 5.0, "pass"),
        (2, 25.0, "pass"),
        (3, 50.0, "pass"),
    ]


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
        state, _ = look(state, rollout, *ALIKE, state.step_started_at + 60.0, AT)
        weights.append(state.canary_weight)
    assert (state.state, weights) == ("succeeded", walk)


def test_too_little_traffic_is_inconclusive_once_per_interval_then_pauses() -> None:
    state = running(1)
    begun = state.step_started_at
    verdicts: list[tuple[float, str | None]] = []
    for elapsed in range(10, 190, 10):  # a look every check, 10 s to 180 s
        if state.state != "running":
            break
        state, entry = look(state, ROLLOUT, *QUIET, begun + elapsed, AT)
        verdicts.append((elapsed, None if entry is None else entry.verdict))
    assert [pair for pair in verdicts if pair[1] is not None] == [
        (60, "inconclusive"),
        (120, "inconclusive"),
        (180, "inconclusive"),
    ]
    assert INCONCLUSIVE_LIMIT == 3
    assert (state.state, state.step, state.canary_weight) == ("paused", 1, 5.0)
    assert state.step_started_at == begun  # the evidence was never started over
    assert state.reason.startswith(
        "paused: 3 intervals in a row without enough traffic at step 1 (5%); last: 20 canary "
        "requests in 180.0s, fewer than min_requests 50"
    )
    assert next_look(state, ROLLOUT) is None


def test_evidence_keeps_growing_after_an_inconclusive_interval() -> None:
    state = running(1)
    state, entry = look(state, ROLLOUT, *QUIET, state.step_started_at + 60.0, AT)
    assert entry is not None
    assert entry.verdict == "inconclusive"
    assert (state.state, state.inconclusive_in_a_row) == ("running", 1)
    assert state.reason == (
        "inconclusive at step 1 (5%) (1 in a row): 20 canary requests in 60.0s, fewer than "
        "min_requests 50"
    )
    # The same step's evidence, now with enough requests: passes at the next look.
    state, entry = look(state, ROLLOUT, *ALIKE, state.step_started_at + 70.0, AT)
    assert entry is not None
    assert entry.verdict == "pass"
    assert (state.step, state.inconclusive_in_a_row) == (2, 0)


def test_history_keeps_the_newest_entries() -> None:
    state = running(1)
    for _ in range(HISTORY_LIMIT // INCONCLUSIVE_LIMIT + 5):
        for interval in range(1, INCONCLUSIVE_LIMIT + 1):
            state, _ = look(state, ROLLOUT, *QUIET, state.step_started_at + 60.0 * interval, AT)
        state = resume(state, state.step_started_at + 1000.0)
    assert len(state.history) == HISTORY_LIMIT
    assert all(entry.verdict == "inconclusive" for entry in state.history)


def test_next_look_every_check_and_at_each_interval() -> None:
    rollout = replace(ROLLOUT, check=7.0, interval=20.0)
    state = start(RolloutState(), rollout, T0, AT)
    assert next_look(state, rollout) == T0 + 7.0
    times: list[float] = []
    while len(times) < 6:
        when = next_look(state, rollout)
        assert when is not None
        times.append(when - T0)
        state, _ = look(state, rollout, *QUIET, when, AT)
    assert times == [7.0, 14.0, 20.0, 21.0, 28.0, 35.0]
    assert next_look(pause(state), rollout) is None
    assert next_look(RolloutState(), rollout) is None


def test_look_is_refused_unless_running_and_begun() -> None:
    with pytest.raises(RolloutError, match="cannot look at a rollout that is paused"):
        look(pause(running()), ROLLOUT, *ALIKE, T0, AT)
    waiting = start(RolloutState(), GATED, T0, AT)
    with pytest.raises(RolloutError, match="step 0 has not begun"):
        look(waiting, GATED, *ALIKE, T0 + 60.0, AT)
    with pytest.raises(RolloutError, match="config changed"):
        look(running(3), replace(ROLLOUT, steps=(10.0, 50.0)), *ALIKE, T0, AT)


# --------------------------------------------------------------------------- before_step


def test_a_gated_rollout_waits_at_each_step_for_its_webhooks() -> None:
    state = start(RolloutState(), GATED, T0, AT)
    assert (state.state, state.step, state.canary_weight, state.waiting) == (
        "running",
        0,
        0.0,
        True,
    )
    assert state.reason == "started: waiting for the before_step webhooks of step 0 (1%)"
    assert next_look(state, GATED) is None
    state = begin_step(state, GATED, T0 + 3.0)
    assert (state.canary_weight, state.waiting, state.step_started_at) == (1.0, False, T0 + 3.0)
    assert state.reason == "step 0 began: canary at 1%"
    state, entry = look(state, GATED, *ALIKE, T0 + 63.0, AT)
    assert entry is not None
    assert entry.verdict == "pass"
    # Step 1 waits: the canary stays at step 0's weight until the webhooks answer.
    assert (state.step, state.canary_weight, state.waiting) == (1, 1.0, True)
    assert state.reason == "passed step 0 (1%); waiting for the before_step webhooks of step 1 (5%)"
    with pytest.raises(RolloutError, match="step 0 already began"):
        begin_step(begin_step(start(RolloutState(), GATED, T0, AT), GATED, T0), GATED, T0)


def test_a_refused_step_fails_the_rollout() -> None:
    state = start(RolloutState(), GATED, T0, AT)
    state = begin_step(state, GATED, T0)
    state, _ = look(state, GATED, *ALIKE, T0 + 60.0, AT)
    failed = refuse_step(state, GATED, "before_step webhook http://x answered 503", "t-refused")
    assert (failed.state, failed.canary_weight, failed.waiting) == ("failed", 0.0, False)
    assert failed.reason == (
        "failed at step 1 (5%) before it began: before_step webhook http://x answered 503"
    )
    entry = failed.history[-1]
    assert (entry.verdict, entry.step, entry.weight, entry.at) == ("fail", 1, 5.0, "t-refused")
    assert (entry.canary, entry.baseline, entry.tests) == ({}, {}, ())


def test_promote_and_abort_end_the_wait() -> None:
    waiting = start(RolloutState(), GATED, T0, AT)
    assert promote(waiting).waiting is False
    assert abort(waiting).waiting is False
    paused = pause(waiting)
    assert paused.waiting  # resumed, it waits for the webhooks again
    assert resume(paused, T0 + 5.0).waiting


# --------------------------------------------------------------------------- operator calls

STATES_BY_NAME: dict[str, RolloutState] = {
    "idle": RolloutState(),
    "running": running(1),
    "paused": pause(running(1)),
    "succeeded": promote(running(1)),
    "failed": look(running(1), ROLLOUT, *BAD, T0 + 70.0, AT)[0],
    "aborted": abort(running(1)),
}
ACTIONS: dict[str, Callable[[RolloutState], RolloutState]] = {
    "start": lambda state: start(state, ROLLOUT, 5000.0, AT),
    "pause": pause,
    "resume": lambda state: resume(state, 5000.0),
    "abort": abort,
    "promote": promote,
    "release": lambda state: release(state, "released"),
    "look": lambda state: look(state, ROLLOUT, *ALIKE, 5000.0, AT)[0],
}
ALLOWED = {
    "start": {"idle", "succeeded", "failed", "aborted"},
    "pause": {"running"},
    "resume": {"paused"},
    "abort": {"running", "paused"},
    "promote": {"running", "paused", "failed", "aborted"},
    "release": {"succeeded", "failed", "aborted"},
    "look": {"running"},
}
RESULT = {
    "start": "running",
    "pause": "paused",
    "resume": "running",
    "abort": "aborted",
    "promote": "succeeded",
    "release": "idle",
    "look": "running",
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
    state = start(STATES_BY_NAME["failed"], ROLLOUT, T0, AT)
    assert state == RolloutState(
        state="running",
        step=0,
        canary_weight=1.0,
        reason="started: canary at 1%",
        started_at=AT,
        step_started_at=T0,
    )
    with pytest.raises(RolloutError, match="already running at step 0; abort or promote"):
        start(state, ROLLOUT, T0 + 1.0, AT)


def test_operator_calls_keep_or_set_the_weight() -> None:
    state, _ = look(running(2), ROLLOUT, *QUIET, T0 + 190.0, AT)  # 25%, one inconclusive
    assert state.inconclusive_in_a_row == 1
    paused = pause(state)
    assert (paused.state, paused.canary_weight, paused.reason) == (
        "paused",
        25.0,
        "paused by operator",
    )
    resumed = resume(paused, 7000.0)
    assert (resumed.state, resumed.canary_weight) == ("running", 25.0)
    assert (resumed.step_started_at, resumed.inconclusive_in_a_row) == (7000.0, 0)
    assert resumed.last_check is None  # the step's evidence starts over
    assert abort(paused).canary_weight == 0.0
    assert abort(state, "page from on-call").reason == "page from on-call"
    assert promote(paused).canary_weight == 100.0
    assert promote(STATES_BY_NAME["failed"]).state == "succeeded"


@pytest.mark.parametrize("state_name", ["succeeded", "failed", "aborted"])
def test_release_returns_the_route_to_its_file_split(state_name: str) -> None:
    ended = STATES_BY_NAME[state_name]
    got = release(ended, "released by DELETE")
    assert (got.state, got.canary_weight, got.reason) == ("idle", 0.0, "released by DELETE")
    assert got.history == ended.history
    assert effective_split(got, ROLLOUT, {"blue": 90.0, "canary": 10.0}) is None
    assert start(got, ROLLOUT, T0, AT).history == ()


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
def test_restart_step(state_name: str) -> None:
    state = STATES_BY_NAME[state_name]
    got = restart_step(state, 99_999.0)
    if state_name == "running":
        assert got == replace(
            state, step_started_at=99_999.0, inconclusive_in_a_row=0, last_check=None
        )
    else:
        assert got == state


# --------------------------------------------------------------------------- alpha accounting

# Steps that never pass on their own (the accounting tests look many times within one step).
LONG = replace(ROLLOUT, interval=1e9)
RESET = Window(0, 0, reset=True)


def looked_alpha(state: RolloutState) -> float:
    assert state.last_check is not None
    return look_alpha(state.last_check.tests)


def test_each_fresh_start_of_a_steps_evidence_spends_a_share_of_its_own() -> None:
    """Resume, a restart of the proxy, counters that went down: each a new e-process."""
    state = running(1, LONG)
    alphas: list[float] = []
    state, _ = look(state, LONG, *ALIKE, T0 + 10.0, AT)
    state, _ = look(state, LONG, *ALIKE, T0 + 20.0, AT)  # the same evidence, looked at again
    alphas.append(looked_alpha(state))
    assert state.spent == 1
    state = resume(pause(state), T0 + 100.0)
    assert (state.spent, state.last_check) == (1, None)  # nothing spent before it is looked at
    state, _ = look(state, LONG, *ALIKE, T0 + 110.0, AT)
    alphas.append(looked_alpha(state))
    assert state.spent == 2
    state = restart_step(state, T0 + 200.0)
    state, _ = look(state, LONG, *ALIKE, T0 + 210.0, AT)
    alphas.append(looked_alpha(state))
    state, _ = look(state, LONG, ALIKE[0], RESET, T0 + 220.0, AT)
    state, _ = look(state, LONG, *ALIKE, T0 + 230.0, AT)
    alphas.append(looked_alpha(state))
    assert state.spent == 4
    budget = step_alpha(LONG)
    assert alphas == pytest.approx([segment_alpha(LONG, j) for j in range(4)], rel=1e-9)
    assert alphas == pytest.approx([budget * 3 / 4, budget / 8, budget / 24, budget / 48], rel=1e-9)
    assert sum(alphas) == pytest.approx(budget * segments_spent(4))
    assert sum(alphas) < budget


OPERATIONS = st.sampled_from(["look", "pause-resume", "restart", "reset", "look-reset"])


@given(st.lists(OPERATIONS, max_size=40))
def test_with_k_fresh_starts_a_step_spends_at_most_its_budget(operations: list[str]) -> None:
    """Any sequence of looks and fresh starts: one alpha per segment looked at, summing < budget.

    The segments are told apart as they happen (a fresh start, then a look); every look of a
    segment uses the same alpha, the k-th segment looked at gets `segment_alpha(k)` whatever
    fresh starts came between (those never looked at spend nothing), and `spent` counts them.
    """
    state = running(2, LONG)
    now = state.step_started_at
    segments: list[list[float]] = []
    fresh = True
    for operation in operations:
        now += 5.0
        if operation == "pause-resume":
            state = resume(pause(state), now)
            fresh = True
        elif operation == "restart":
            state = restart_step(state, now)
            fresh = True
        elif operation == "reset":  # the canary's counters went down at this look
            state, entry = look(state, LONG, RESET, ALIKE[1], now, AT)
            assert (entry, state.last_check, state.step_started_at) == (None, None, now)
            assert starts_evidence(state)
            fresh = True
        else:
            state, entry = look(state, LONG, *ALIKE, now, AT)
            assert entry is None
            assert not starts_evidence(state)
            if fresh:
                segments.append([])
                fresh = False
            segments[-1].append(looked_alpha(state))
            if operation == "look-reset":
                now += 5.0
                state, _ = look(state, LONG, *ALIKE[:1], RESET, now, AT)
                fresh = True
        assert (state.state, state.step) == ("running", 2)
        assert state.spent == len(segments)
    spent = [looks[0] for looks in segments]
    for index, looks in enumerate(segments):
        assert looks == pytest.approx([segment_alpha(LONG, index)] * len(looks), rel=1e-9)
    assert sum(spent) <= step_alpha(LONG) * segments_spent(len(segments)) * (1 + 1e-9)
    assert sum(spent) < step_alpha(LONG)


def test_a_reset_restarts_the_evidence_without_a_verdict() -> None:
    state = running(1)
    moment = state.step_started_at + ROLLOUT.interval
    state, _ = look(state, ROLLOUT, *QUIET, moment, AT)  # one inconclusive interval
    assert (state.inconclusive_in_a_row, state.spent) == (1, 1)
    after, entry = look(state, ROLLOUT, *BAD[:1], RESET, moment + 5.0, AT)
    assert entry is None
    assert after == replace(
        state,
        step_started_at=moment + 5.0,
        inconclusive_in_a_row=0,
        last_check=None,
        reason="evidence of step 1 (5%) started over: the baseline counters went down "
        "(a worker died or restarted)",
    )
    assert next_look(after, ROLLOUT) == moment + 5.0 + ROLLOUT.check
    # Even a look whose evidence is clearly bad: nothing is judged on counters that went down.
    both, entry = look(state, ROLLOUT, RESET, RESET, moment + 5.0, AT)
    assert (entry, both.state) == (None, "running")
    assert "the canary and baseline counters went down" in both.reason


@pytest.mark.parametrize(
    ("canary", "baseline", "which"),
    [
        pytest.param(window(200, 3), window(3100, 30), "canary", id="fewer canary requests"),
        pytest.param(window(400, 2), window(3100, 30), "canary", id="fewer canary errors"),
        pytest.param(window(400, 3), window(3100, 29), "baseline", id="fewer baseline errors"),
        pytest.param(window(100, 0), window(100, 0), "canary and baseline", id="both"),
    ],
)
def test_evidence_that_shrank_since_the_previous_look_starts_over(
    canary: Window, baseline: Window, which: str
) -> None:
    """A worker that died after the marks: the sums stay above them but below the last look."""
    state, _ = look(running(1), ROLLOUT, *ALIKE, T0 + 70.0, AT)  # 300 (3 errors) / 3000 (30)
    after, entry = look(state, ROLLOUT, canary, baseline, T0 + 75.0, AT)
    assert (entry, after.last_check, after.step_started_at) == (None, None, T0 + 75.0)
    assert f"the {which} counters went down" in after.reason
    assert after.spent == state.spent
    grown, _ = look(state, ROLLOUT, window(300, 3), window(3001, 30), T0 + 75.0, AT)
    assert grown.last_check is not None


def test_restarts_before_any_look_spend_nothing_more() -> None:
    """The controller calls restart_step at load and again when it marks the counters."""
    state, _ = look(running(1, LONG), LONG, *ALIKE, T0 + 10.0, AT)
    saved = from_json(orjson.loads(orjson.dumps(to_json(state))))
    assert saved.spent == 1
    state = restart_step(restart_step(saved, T0 + 100.0), T0 + 101.0)
    state = resume(pause(state), T0 + 102.0)
    state, _ = look(state, LONG, *ALIKE, T0 + 110.0, AT)
    assert looked_alpha(state) == pytest.approx(segment_alpha(LONG, 1))
    assert state.spent == 2


def test_a_state_that_lost_its_last_look_goes_on_with_the_same_segment() -> None:
    """A fleet instance takes over with the shared marks: same evidence, same segment."""
    state, _ = look(running(1, LONG), LONG, *ALIKE, T0 + 70.0, AT)
    state = resume(pause(state), T0 + 80.0)
    state, _ = look(state, LONG, *ALIKE, T0 + 90.0, AT)
    assert (state.spent, state.spent_at) == (2, T0 + 80.0)
    taken_over = from_json(orjson.loads(orjson.dumps(to_json(state))))
    assert (taken_over.last_check, taken_over.spent, taken_over.spent_at) == (None, 2, T0 + 80.0)
    after, _ = look(taken_over, LONG, *ALIKE, T0 + 95.0, AT)
    assert looked_alpha(after) == pytest.approx(segment_alpha(LONG, 1))
    assert after.spent == 2


def test_a_new_step_has_a_budget_of_its_own() -> None:
    state = running(1)
    for moment in (10.0, 20.0):
        state = resume(pause(state), T0 + moment)
        state, _ = look(state, ROLLOUT, *ALIKE, T0 + moment + 5.0, AT)
    assert state.spent == 2
    passed, entry = look(state, ROLLOUT, *ALIKE, state.step_started_at + 60.0, AT)
    assert entry is not None
    assert look_alpha(entry.tests) == pytest.approx(segment_alpha(ROLLOUT, 1))
    assert (passed.step, passed.spent, passed.last_check) == (2, 0, None)
    assert starts_evidence(passed)
    after, _ = look(passed, ROLLOUT, *ALIKE, passed.step_started_at + 5.0, AT)
    assert looked_alpha(after) == pytest.approx(segment_alpha(ROLLOUT, 0))
    # A gated next step waits: its evidence has not begun, no marks to take.
    begun = begin_step(start(RolloutState(), GATED, T0, AT), GATED, T0)
    gated_pass, _ = look(begun, GATED, *ALIKE, T0 + 60.0, AT)
    assert gated_pass.waiting
    assert not starts_evidence(gated_pass)
    assert not starts_evidence(STATES_BY_NAME["failed"])


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
statistics = st.builds(
    Statistic,
    name=st.sampled_from(["errors", "latency", "error_gate", "p99_gate"]),
    reject=st.booleans(),
    log_e=st.none() | finite,
    threshold=st.none() | finite,
    figures=st.dictionaries(st.text(max_size=8), st.none() | finite, max_size=3),
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
    tests=st.lists(statistics, max_size=4).map(tuple),
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
    waiting=st.booleans(),
    history=st.lists(entries, max_size=5).map(tuple),
    spent=st.integers(0, 1000),
    spent_at=st.none() | finite,
)


@given(states)
def test_json_round_trip(state: RolloutState) -> None:
    assert from_json(orjson.loads(orjson.dumps(to_json(state)))) == state


def test_json_shape_for_admin_routes() -> None:
    state, _ = look(running(1), ROLLOUT, *ALIKE, T0 + 65.0, AT)
    state, _ = look(state, ROLLOUT, *BAD, T0 + 75.0, "2026-05-01T10:00:00Z")
    data = orjson.loads(orjson.dumps(to_json(state)))
    assert {"state", "step", "canary_weight", "reason", "history", "last_check"} <= data.keys()
    assert (data["spent"], data["spent_at"]) == (1, T0 + 60.0)
    entry = data["history"][-1]
    assert {"at", "step", "weight", "verdict", "reason", "canary", "baseline", "tests"} <= set(
        entry
    )
    assert entry["at"] == "2026-05-01T10:00:00Z"
    assert {"name", "reject", "log_e", "threshold", "figures"} <= set(entry["tests"][0])
    last = data["last_check"]
    assert last["elapsed_s"] == 15.0
    assert last["tests"] == entry["tests"]
    # The latest look is not restored: a restored step starts its evidence over.
    assert from_json(data) == replace(state, last_check=None)


def test_statistic_keeps_infinite_values_as_null() -> None:
    from proxy.core.sequential import Test

    test = Test("p99_gate", False, -math.inf, 5.3, {"p99_ms": math.inf, "n": 3.0})
    got = Statistic.of(test)
    assert (got.log_e, got.threshold, got.figures) == (None, 5.3, {"p99_ms": None, "n": 3.0})
    assert got.describe() == "p99_gate: log e unknown < 5.30"


def test_from_json_is_tolerant() -> None:
    assert from_json({"state": "idle"}) == RolloutState()
    got = from_json({"state": "running", "step": 2, "canary_weight": 25, "future_key": [1]})
    assert (got.step, got.canary_weight, got.waiting) == (2, 25.0, False)
    assert isinstance(got.canary_weight, float)
    assert from_json({"state": "running", "spent_at": None}).spent_at is None


def test_from_json_reads_what_the_fixed_window_version_wrote() -> None:
    old = {
        "state": "running",
        "step": 1,
        "canary_weight": 25.0,
        "reason": "passed step 0 (5%); canary at 25%",
        "started_at": "2026-12-05T06:39:40.648Z",
        "step_started_at": 1000061.0,
        "inconclusive_in_a_row": 0,
        "history": [
            {
                "at": "2026-12-05T06:39:40.649Z",
                "step": 0,
                "weight": 5.0,
                "verdict": "pass",
                "reason": "canary errors 0.00% (0/300), p99 5.0 ms; baseline ...",
                "canary": {"requests": 300, "errors": 0, "error_rate": 0.0, "p99_ms": 4.975},
                "baseline": {"requests": 3003, "errors": 3, "error_rate": 0.000999, "p99_ms": 5},
                "z": -0.547697685332163,
                "p_value": 0.708050249128887,
            }
        ],
    }
    got = from_json(old)
    assert (got.state, got.step, got.canary_weight, got.waiting) == ("running", 1, 25.0, False)
    (entry,) = got.history
    assert (entry.verdict, entry.canary["requests"], entry.tests) == ("pass", 300, ())
    # Without `spent`, the evidence the older version may have looked at counts as spent.
    assert got.spent == 1
    state = restart_step(got, 5000.0)
    state, _ = look(state, ROLLOUT, *ALIKE, 5010.0, AT)
    assert looked_alpha(state) == pytest.approx(segment_alpha(ROLLOUT, 1))


@pytest.mark.parametrize(
    ("saved", "spent"),
    [
        pytest.param({"state": "running"}, 1, id="running"),
        pytest.param({"state": "paused"}, 1, id="paused"),
        pytest.param({"state": "running", "waiting": True}, 0, id="waiting: nothing looked at"),
        pytest.param({"state": "idle"}, 0, id="idle"),
        pytest.param({"state": "failed"}, 0, id="failed"),
        pytest.param({"state": "running", "spent": 0}, 0, id="saved 0"),
        pytest.param({"state": "paused", "spent": 7}, 7, id="saved 7"),
    ],
)
def test_from_json_spent_defaults_for_states_saved_without_it(
    saved: dict[str, object], spent: int
) -> None:
    assert from_json(saved).spent == spent


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
        ({"state": "running", "waiting": 1}, "waiting: expected true or false, got int"),
        ({"state": "running", "spent": -1}, "spent: expected an integer >= 0, got -1"),
        ({"state": "running", "spent": 1.0}, "spent: expected an integer >= 0, got 1.0"),
        ({"state": "running", "spent_at": "now"}, "spent_at: expected a finite number"),
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
            {"state": "running", "history": [{"at": "t", "verdict": "pass", "tests": {}}]},
            r"history\[0\]: tests: expected a list, got dict",
        ),
        (
            {"state": "running", "history": [{"at": "t", "verdict": "pass", "tests": [{}]}]},
            r"history\[0\].tests\[0\]: name: missing",
        ),
        (
            {
                "state": "running",
                "history": [
                    {"at": "t", "verdict": "pass", "tests": [{"name": "errors", "log_e": "x"}]}
                ],
            },
            r"history\[0\].tests\[0\]: log_e: expected a finite number",
        ),
    ],
)
def test_from_json_rejects_bad_state(obj: object, message: str) -> None:
    with pytest.raises(StateError, match=message):
        from_json(obj)
