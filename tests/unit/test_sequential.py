"""The anytime-valid tests of proxy.core.sequential: exact numerics, hypothesis properties,
Monte Carlo.

The e-values are checked against direct computations (a product of per-trial factors, the
expectation under the null summed exactly over the binomial law), the confidence sequences on
the canary's share against a brute-force scan of their defining inequality, and the whole
thing against its promise: under the null, looked at after every batch of requests, the
rejection rate stays below alpha (seeded Monte Carlo, a few seconds).
"""

from __future__ import annotations

import ast
import itertools
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import sequential
from proxy.core.counters import DURATION_BUCKETS
from proxy.core.sequential import (
    BUCKET_SLOTS,
    ODDS_RATIOS,
    SHARE_BETS,
    SHARE_MIXTURE_SCALE,
    error_gate,
    error_test,
    judge,
    latency_test,
    log_mixture,
    p99_gate,
    segment_alpha,
    segment_share,
    segments_spent,
    share_bound,
    share_lower_bound,
    step_alpha,
)

EMPTY = (0,) * BUCKET_SLOTS


def histogram(**slots: int) -> tuple[int, ...]:
    """Counts per slot, keyed `ms50=...` for the slot whose upper bound is 50 ms."""
    counts = [0] * BUCKET_SLOTS
    for key, count in slots.items():
        if key == "inf":
            counts[-1] += count
        else:
            counts[DURATION_BUCKETS.index(float(key[2:]) / 1000.0)] += count
    return tuple(counts)


def binomial_pmf(k: int, n: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1.0 - p) ** (n - k)


# --------------------------------------------------------------------------- step_alpha


def test_step_alpha_shares_the_walks_budget_among_its_steps() -> None:
    assert step_alpha(0.99, 5) == pytest.approx(0.002)
    assert step_alpha(0.9, 1) == pytest.approx(0.1)
    for confidence, steps in [(1.0, 5), (0.0, 5), (1.5, 5), (0.99, 0)]:
        with pytest.raises(ValueError, match=r"confidence|steps"):
            step_alpha(confidence, steps)


def test_segment_shares_exact_values() -> None:
    assert sequential.RESTART_RESERVE == 0.25
    expected = [3 / 4, 1 / 8, 1 / 24, 1 / 48, 1 / 80]
    assert [segment_share(j) for j in range(5)] == pytest.approx(expected, rel=1e-12)
    assert [segments_spent(k) for k in range(4)] == pytest.approx([0.0, 3 / 4, 7 / 8, 11 / 12])
    assert segment_alpha(0.0025, 0) == pytest.approx(0.001875)
    assert segment_alpha(0.0025, 1) == pytest.approx(0.0003125)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="segment"):
            segment_share(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="segments"):
            segments_spent(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        segment_alpha(0.0, 0)


@given(st.integers(0, 2000), st.floats(1e-6, 0.5))
def test_k_segments_of_a_step_spend_less_than_its_budget(segments: int, budget: float) -> None:
    """However often a step's evidence starts over, its segments' alphas sum below its budget."""
    alphas = [segment_alpha(budget, j) for j in range(segments)]
    assert math.fsum(alphas) == pytest.approx(budget * segments_spent(segments), rel=1e-9)
    assert math.fsum(alphas) < budget
    assert all(later < earlier for earlier, later in itertools.pairwise(alphas))
    if segments:
        # The threshold after j fresh starts rises by about 2 log j nats, no more.
        rise = math.log(alphas[0] / alphas[-1])
        assert rise <= math.log(3.0 * segments * (segments + 1)) + 1e-9


# --------------------------------------------------------------------------- log_mixture


def direct_e_value(outcomes: list[int], p0: float, above: bool) -> float:
    """The mixture computed the long way: one likelihood-ratio factor per trial, per ratio."""
    total = 0.0
    for ratio in ODDS_RATIOS:
        r = ratio if above else 1.0 / ratio
        p = r * p0 / (1.0 - p0 + r * p0)
        product = 1.0
        for outcome in outcomes:
            product *= p / p0 if outcome else (1.0 - p) / (1.0 - p0)
        total += product / len(ODDS_RATIOS)
    return total


@pytest.mark.parametrize("above", [True, False])
def test_log_mixture_is_the_product_of_per_trial_likelihood_ratios(above: bool) -> None:
    rng = random.Random(1)
    for _ in range(50):
        p0 = rng.uniform(0.01, 0.9)
        outcomes = [int(rng.random() < rng.uniform(0.0, 1.0)) for _ in range(rng.randrange(40))]
        expected = direct_e_value(outcomes, p0, above)
        got = math.exp(log_mixture(sum(outcomes), len(outcomes), p0, above=above))
        assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("p0", [0.003, 0.05, 0.3, 0.7, 0.99])
def test_log_mixture_has_expectation_exactly_one_at_p0(p0: float) -> None:
    """The defining property of a test martingale at every fixed n, summed exactly."""
    for above in (True, False):
        for n in (0, 1, 2, 7, 30, 200):
            expectation = math.fsum(
                binomial_pmf(k, n, p0) * math.exp(log_mixture(k, n, p0, above=above))
                for k in range(n + 1)
            )
            assert expectation == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    p0=st.floats(0.001, 0.999),
    shrink=st.floats(0.0, 1.0),
    n=st.integers(0, 150),
    above=st.booleans(),
)
def test_log_mixture_is_a_supermartingale_on_the_null_side(
    p0: float, shrink: float, n: int, above: bool
) -> None:
    """Any success probability on the null side of p0: expectation <= 1."""
    p = p0 * shrink if above else p0 + (1.0 - p0) * (1.0 - shrink)
    expectation = math.fsum(
        binomial_pmf(k, n, p) * math.exp(log_mixture(k, n, p0, above=above)) for k in range(n + 1)
    )
    assert expectation <= 1.0 + 1e-9


def test_log_mixture_on_the_edges_of_p0() -> None:
    assert log_mixture(0, 10, 0.0) == 0.0
    assert log_mixture(1, 10, 0.0) == math.inf  # "never fails" refuted by one failure
    assert log_mixture(10, 10, 1.0) == 0.0  # "fails at most always": nothing refutes it
    assert log_mixture(10, 10, 1.0, above=False) == 0.0
    assert log_mixture(9, 10, 1.0, above=False) == math.inf
    assert log_mixture(0, 10, 0.0, above=False) == 0.0
    assert log_mixture(0, 0, 0.3) == 0.0
    with pytest.raises(ValueError, match="successes"):
        log_mixture(3, 2, 0.5)
    with pytest.raises(ValueError, match="p0"):
        log_mixture(1, 2, 1.5)


# --------------------------------------------------------------------------- share bounds


def upper_boundary_holds(canary: int, total: int, alpha: float, w: float) -> bool:
    """Whether w is inside the upper confidence sequence: N w - canary < the boundary."""
    variance = total * w + SHARE_MIXTURE_SCALE
    level = math.log(math.sqrt(variance / SHARE_MIXTURE_SCALE) / alpha)
    return total * w - canary < math.sqrt(2.0 * variance * level)


def lower_statistic(canary: int, total: int, w: float) -> float:
    """log of the average over SHARE_BETS of exp(bet canary - N w (e^bet - 1))."""
    values = [bet * canary - total * w * math.expm1(bet) for bet in SHARE_BETS]
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values) / len(values))


CASES = [(0, 1), (0, 100), (3, 100), (60, 6000), (300, 6000), (2900, 6000), (7, 7), (500, 50_000)]


@pytest.mark.parametrize(("canary", "total"), CASES)
@pytest.mark.parametrize("alpha", [0.05, 1e-4])
def test_share_bound_is_the_edge_of_its_confidence_sequence(
    canary: int, total: int, alpha: float
) -> None:
    bound = share_bound(canary, total, alpha)
    grid = [i / 20_000 for i in range(20_001)]
    inside = [w for w in grid if upper_boundary_holds(canary, total, alpha, w)]
    largest = max(inside)
    # Never below the brute-force edge (that would exclude the true share too often), and
    # within a small fraction of a request above it.
    assert bound >= largest
    assert bound <= min(1.0, largest + 1 / 20_000 + 1.0 / total)
    assert bound >= canary / total


@pytest.mark.parametrize(("canary", "total"), CASES)
@pytest.mark.parametrize("alpha", [0.05, 1e-4])
def test_share_lower_bound_is_the_edge_of_its_confidence_sequence(
    canary: int, total: int, alpha: float
) -> None:
    bound = share_lower_bound(canary, total, alpha)
    level = math.log(1.0 / alpha)
    grid = [i / 20_000 for i in range(20_001)]
    inside = [w for w in grid if lower_statistic(canary, total, w) < level]
    smallest = min(inside)
    assert bound <= smallest
    assert bound >= max(0.0, smallest - 1 / 20_000 - 1.0 / total)
    assert bound <= canary / total


def test_share_bounds_without_requests_say_nothing() -> None:
    assert share_bound(0, 0, 0.01) == 1.0
    assert share_lower_bound(0, 0, 0.01) == 0.0


# --------------------------------------------------------------------------- the four tests


def test_no_evidence_is_log_e_zero_and_no_rejection() -> None:
    tests = [
        error_test(0, 0, 0, 0, 0.01),
        error_test(500, 0, 9500, 0, 0.01),  # requests but not one error
        latency_test(EMPTY, EMPTY, 0.01),
        error_gate(0, 0, 0.01, 0.01),
        error_gate(0, 0, 0.01, 0.01, below=True),
        p99_gate(EMPTY, 0.5, 0.01),
        p99_gate(EMPTY, 0.5, 0.01, below=True),
        *judge((0, 0, EMPTY), (0, 0, EMPTY), alpha=0.01, max_error_rate=0.01, max_p99=0.5),
    ]
    for test in tests:
        assert (test.log_e, test.reject) == (0.0, False), test


counts = st.integers(0, 5000)


@settings(max_examples=80, deadline=None)
@given(nc=counts, ec=counts, nb=counts, eb=counts, more=st.integers(1, 50))
def test_more_canary_errors_never_lower_the_evidence(
    nc: int, ec: int, nb: int, eb: int, more: int
) -> None:
    ec, eb = min(ec, nc), min(eb, nb)
    nc = max(nc, ec + more)
    before = error_test(nc, ec, nb, eb, 0.01).log_e
    assert error_test(nc, ec + more, nb, eb, 0.01).log_e >= before
    # And more baseline errors never raise it.
    nb = max(nb, eb + more)
    before = error_test(nc, ec, nb, eb, 0.01).log_e
    assert error_test(nc, ec, nb, eb + more, 0.01).log_e <= before


slots = st.lists(st.integers(0, 400), min_size=BUCKET_SLOTS, max_size=BUCKET_SLOTS)


@settings(max_examples=60, deadline=None)
@given(canary=slots, baseline=slots, source=st.integers(0, BUCKET_SLOTS - 2), data=st.data())
def test_a_slower_canary_request_never_lowers_the_latency_evidence(
    canary: list[int], baseline: list[int], source: int, data: st.DataObject
) -> None:
    canary[source] += 1
    before = latency_test(canary, baseline, 0.01).log_e
    target = data.draw(st.integers(source + 1, BUCKET_SLOTS - 1))
    canary[source] -= 1
    canary[target] += 1
    assert latency_test(canary, baseline, 0.01).log_e >= before - 1e-9


@settings(max_examples=60, deadline=None)
@given(requests=st.integers(0, 10_000), errors=st.integers(0, 10_000), rate=st.floats(0.0, 1.0))
def test_the_error_gate_is_monotone_in_the_errors(requests: int, errors: int, rate: float) -> None:
    errors = min(errors, requests)
    if errors < requests:
        assert (
            error_gate(requests, errors + 1, rate, 0.01).log_e
            >= error_gate(requests, errors, rate, 0.01).log_e
        )
        assert (
            error_gate(requests, errors + 1, rate, 0.01, below=True).log_e
            <= error_gate(requests, errors, rate, 0.01, below=True).log_e
        )


@pytest.mark.parametrize(("requests", "errors"), [(10, 1), (6000, 30), (10**9, 10**7)])
def test_identical_figures_are_never_evidence(requests: int, errors: int) -> None:
    assert error_test(requests, errors, requests, errors, 0.01).log_e <= 0.0
    assert error_test(requests, errors, 19 * requests, 19 * errors, 0.01).log_e <= 0.0
    shape = histogram(ms25=requests, ms50=2 * requests, ms100=errors, inf=1)
    assert latency_test(shape, shape, 0.01).log_e <= 0.0


def test_a_better_canary_is_never_rejected_however_much_traffic() -> None:
    assert error_test(10**9, 0, 10**9, 5 * 10**7, 0.01).log_e < 0.0
    fast, slow = histogram(ms10=10**9), histogram(ms500=10**9)
    assert latency_test(fast, slow, 0.01).log_e < 0.0
    tests = judge((10**9, 0, fast), (10**9, 10**7, slow), alpha=0.01, max_error_rate=0.01,
                  max_p99=0.25)  # fmt: skip
    assert not any(test.reject for test in tests)


def test_huge_counts_neither_overflow_nor_fail() -> None:
    huge = 10**15
    bad = error_test(huge, huge // 10, huge, huge // 1000, 1e-6)
    assert math.isfinite(bad.log_e)
    assert bad.reject
    slow, fast = histogram(ms250=huge), histogram(ms25=huge)
    assert latency_test(slow, fast, 1e-6).reject
    assert math.isfinite(latency_test(slow, fast, 1e-6).log_e)
    assert math.isfinite(error_gate(huge, huge // 2, 0.01, 1e-6).log_e)


def test_a_clear_regression_is_rejected() -> None:
    """5x errors at the 5% step after a few minutes of 100 req/s; latency +50% on a 60 s step."""
    assert error_test(1500, 38, 28500, 142, 0.001).reject
    baseline = histogram(ms25=1200, ms50=2700, ms100=1900, ms250=200)
    canary = histogram(ms25=10, ms50=90, ms100=150, ms250=50)  # about +50% at the median
    assert latency_test(canary, baseline, 0.001).reject


def test_small_samples_never_trip_the_gates() -> None:
    # 1 error in 3 requests is 33% against a 1% gate, and proves nothing.
    assert not error_gate(3, 1, 0.01, 0.001).reject
    # 1 of 20 requests slower than 500 ms: a p99 estimate of 500+ ms, but no evidence.
    assert not p99_gate(histogram(ms50=19, ms1000=1), 0.5, 0.001).reject
    # Many requests, many of them slow: the canary's p99 is above the gate.
    assert p99_gate(histogram(ms50=900, ms1000=100), 0.5, 0.001).reject


def test_p99_gate_uses_the_bound_at_or_above_max_p99_and_at_or_below_for_below() -> None:
    over = p99_gate(histogram(ms50=900, ms500=100), 0.3, 0.001)
    assert over.figures["bound_ms"] == 500.0
    assert not over.reject  # all within 500 ms: the p99 is not shown above 300 ms
    under = p99_gate(histogram(ms50=1000), 0.3, 0.001, below=True)
    assert under.figures["bound_ms"] == 250.0
    assert under.reject
    # Beyond the last bound nothing can be shown above it.
    assert p99_gate(histogram(inf=1000), 120.0, 0.001).log_e == 0.0


def gates(tests: tuple[sequential.Test, ...]) -> dict[str, bool]:
    return {test.name: test.reject for test in tests if test.name.endswith("_gate")}


def test_judge_fails_a_gate_only_when_the_baseline_is_below_it() -> None:
    healthy = histogram(ms50=9000)
    slow = histogram(ms50=800, ms1000=200)
    kwargs = {"alpha": 0.002, "max_error_rate": 0.01, "max_p99": 0.5}
    # The canary over both gates while the baseline is under them: both gates fail.
    tests = judge((1000, 200, slow), (9000, 9, healthy), **kwargs)
    assert gates(tests) == {"error_gate": True, "p99_gate": True}
    # The baseline over them too (an incident both see): neither gate fails.
    tests = judge((1000, 200, slow), (9000, 1800, histogram(ms50=7200, ms1000=1800)), **kwargs)
    assert gates(tests) == {"error_gate": False, "p99_gate": False}
    # No baseline traffic: the baseline cannot be shown under the gate.
    tests = judge((1000, 200, slow), (0, 0, EMPTY), **kwargs)
    assert gates(tests) == {"error_gate": False, "p99_gate": False}


def test_judge_shares_alpha_and_reports_json_numbers() -> None:
    alpha = 0.002
    tests = judge((300, 8, histogram(ms50=300)), (5700, 28, histogram(ms50=5700)), alpha=alpha,
                  max_error_rate=0.01, max_p99=0.5)  # fmt: skip
    assert [test.name for test in tests] == ["errors", "latency", "error_gate", "p99_gate"]
    comparison = math.log(1.0 / (alpha * 0.4 * (1.0 - sequential.SHARE_ALPHA_FRACTION)))
    gate = math.log(1.0 / (alpha * 0.1))
    assert [test.threshold for test in tests] == pytest.approx([comparison, comparison, gate, gate])
    shares = sequential.ERROR_SHARE + sequential.LATENCY_SHARE + 2 * sequential.GATE_SHARE
    assert shares == pytest.approx(1.0)
    for test in tests:
        assert all(isinstance(v, float) and math.isfinite(v) for v in test.figures.values())


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="canary: errors"):
        error_test(1, 2, 10, 0, 0.01)
    with pytest.raises(ValueError, match="baseline requests"):
        error_test(1, 0, -1, 0, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        error_test(1, 0, 1, 0, 1.0)
    with pytest.raises(ValueError, match=f"need {BUCKET_SLOTS} bucket counts"):
        latency_test((1, 2), EMPTY, 0.01)
    with pytest.raises(ValueError, match=r"baseline\[3\]"):
        latency_test(EMPTY, (0, 0, 0, -1, *EMPTY[4:]), 0.01)
    with pytest.raises(ValueError, match="max_error_rate"):
        error_gate(1, 0, 1.5, 0.01)
    with pytest.raises(ValueError, match="max_p99"):
        p99_gate(EMPTY, 0.0, 0.01)


def test_the_module_is_pure_core() -> None:
    source = Path(sequential.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported <= {
        "__future__",
        "math",
        "collections.abc",
        "dataclasses",
        "proxy.core.counters",
    }


# --------------------------------------------------------------------------- Monte Carlo


def naive_z_rejects(nc: int, ec: int, nb: int, eb: int, z_crit: float) -> bool:
    """A fixed-sample one-sided two-proportion z-test, misused at every look."""
    if not nc or not nb:
        return False
    pooled = (ec + eb) / (nc + nb)
    variance = pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / nb)
    return variance > 0.0 and (ec / nc - eb / nb) / math.sqrt(variance) > z_crit


def simulate(rng: random.Random, canary_factor: float, alpha: float) -> tuple[float, float]:
    """Share of runs ever rejected by `judge`, and by a z-test looked at as often.

    300 runs of 64 looks, one after every batch of 25 requests; the canary gets each request
    with probability 0.2; the baseline's error ratio is 2% but 20% during looks 20-27 (a burst
    both versions see), the canary's `canary_factor` times that; identical latencies.
    """
    runs, looks, batch, share = 300, 64, 25, 0.2
    ever_rejected = naive_rejected = 0
    for _ in range(runs):
        nc = ec = nb = eb = 0
        canary, baseline = [0] * BUCKET_SLOTS, [0] * BUCKET_SLOTS
        rejected = naive = False
        for look in range(looks):
            error_rate = 0.2 if 20 <= look < 28 else 0.02
            for _ in range(batch):
                slot = min(BUCKET_SLOTS - 1, 7 + int(rng.expovariate(1.0)))
                if rng.random() < share:
                    nc, ec = nc + 1, ec + (rng.random() < error_rate * canary_factor)
                    canary[slot] += 1
                else:
                    nb, eb = nb + 1, eb + (rng.random() < error_rate)
                    baseline[slot] += 1
            tests = judge((nc, ec, canary), (nb, eb, baseline), alpha=alpha, max_error_rate=0.05,
                          max_p99=0.05)  # fmt: skip
            rejected = rejected or any(test.reject for test in tests)
            naive = naive or naive_z_rejects(nc, ec, nb, eb, 1.2815515655446004)
            if rejected and naive:
                break
        ever_rejected += rejected
        naive_rejected += naive
    return ever_rejected / runs, naive_rejected / runs


def test_under_the_null_continuous_monitoring_stays_within_alpha() -> None:
    """Identical versions through a shared burst, looked at 64 times: at most alpha rejected.

    The z-test at 90% looked at just as often rejects far more than 10% of the same runs, so
    this simulation tells a valid test from an invalid one; and a canary with 3x the errors
    is rejected in most runs, so the bound is not met by never rejecting.
    """
    rng = random.Random(20261205)
    alpha = 0.1
    rejected, naive = simulate(rng, 1.0, alpha)
    print(f"\nnull: rejected {rejected:.1%} (alpha {alpha:.0%}); z-test at every look {naive:.1%}")
    assert naive > alpha
    assert rejected <= alpha
    rejected, _ = simulate(rng, 3.0, alpha)
    print(f"canary 3x the errors: rejected {rejected:.1%}")
    assert rejected >= 0.6
