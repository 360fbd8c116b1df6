"""Anytime-valid tests of a canary against its baseline (contract section 5).

Pure core: no clock, no I/O, no random numbers, nothing but `math`. Every function takes the
CUMULATIVE evidence since the step began and keeps no state between calls, so the controller may
call it at every look (every `check`) for as long as the step lasts. Each test's `log_e` is the
logarithm of an e-process: a nonnegative process that, while the canary is no worse than the
baseline, is bounded by a nonnegative supermartingale with initial value 1 however the
evidence is looked at. By Ville's inequality the probability that it EVER reaches `1/alpha` is
at most `alpha`, so rejecting when `log_e >= log(1/alpha)` at any look keeps the false-rollback
probability of the step within `alpha`. docs/rollout-statistics.md gives the derivations, the
references (Lindon, Sanden and Shirikian, KDD 2022; Lindon and Malek, NeurIPS 2022; Howard,
Ramdas, McAuliffe and Sekhon, Ann. Statist. 2021) and the simulated power.

The building block, `log_mixture`, is a one-sided test of a Bernoulli rate `p0`: a fixed mixture
over a grid of odds ratios of likelihood ratios, a function of (successes, trials) only.

- `error_test`: among the requests that failed, is the canary's share above its share of all
  requests? Conditioned on which requests failed, each failed request is the canary's with the
  probability that any request is (the split), when the canary errs no more than the baseline.
  The canary's share of requests is observed, not configured (sticky cohorts, header overrides),
  so it is bounded from above by a confidence sequence (`share_bound`) and the test is run
  against that bound.
- `latency_test`: the same for the requests slower than each bucket bound of the histogram
  (the canary's share of them above its share of all requests) and for the others (its share
  of them below it, against a lower confidence sequence, `share_lower_bound`), averaged over
  the bounds ("canary stochastically slower").
- `error_gate`, `p99_gate`: one-sample tests that the canary's error ratio, or its share of
  requests slower than the bound at or above `max_p99` (p99 above the gate), is above the gate.
- `judge` runs the four with `alpha` shared among them, each gate requiring the baseline to be
  below the gate with the same confidence.
- `step_alpha` shares a rollout's `1 - confidence` among its judged steps, and `segment_alpha`
  a step's among its evidence segments (the evidence starts over after a pause, a restart,
  counters that went down: each fresh start is a new e-process and pays its own share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.core.counters import DURATION_BUCKETS

# The histogram layout of proxy.core.counters: one count per bucket bound, then +Inf.
BUCKET_SLOTS = len(DURATION_BUCKETS) + 1

# Odds ratios of the alternatives, log-spaced from 1.05 to about 24: the mixture is about as
# good as the best single ratio, less log(len(ODDS_RATIOS)) = 2.6 nats, whatever the size of
# the regression (a small one at high traffic, a large one on a handful of errors).
ODDS_RATIOS: tuple[float, ...] = tuple(math.exp(0.05 * 2.0 ** (j / 2.0)) for j in range(13))
# Per alternative: (log r, r - 1), for "above p0" and for "below p0" (the ratio 1/r).
_ABOVE: tuple[tuple[float, float], ...] = tuple(
    (math.log(ratio), ratio - 1.0) for ratio in ODDS_RATIOS
)
_BELOW: tuple[tuple[float, float], ...] = tuple(
    (-math.log(ratio), 1.0 / ratio - 1.0) for ratio in ODDS_RATIOS
)
_LOG_COUNT = math.log(len(ODDS_RATIOS))

# How `judge` shares its alpha (the union bound: the shares sum to 1).
ERROR_SHARE = 0.4
LATENCY_SHARE = 0.4
GATE_SHARE = 0.1
# How much of a comparison's alpha pays for the confidence sequence on the canary's share.
SHARE_ALPHA_FRACTION = 0.1
# Scale of the normal mixture behind `share_bound`, in canary requests: the bound is tightest
# for a few hundred expected canary requests and loosens only like log(requests) beyond.
SHARE_MIXTURE_SCALE = 100.0
# Bets of the lower confidence bound on the canary's share (`share_lower_bound`): log-spaced
# from 2 down to 0.002, so one fits every count from a handful of canary requests to millions.
SHARE_BETS: tuple[float, ...] = tuple(2.0 * 2.0 ** (-j / 2.0) for j in range(21))
_SHARE_BETS_GROWTH: tuple[tuple[float, float], ...] = tuple(
    (bet, math.expm1(bet)) for bet in SHARE_BETS
)
# The quantile the p99 gate is about.
P99_TAIL = 0.01
# The share of a step's alpha kept for the evidence segments after the first (`segment_share`).
RESTART_RESERVE = 0.25


@dataclass(frozen=True, slots=True)
class Test:
    """One test at one look.

    `reject` is True when the canary is worse than the baseline (or over the gate) with the
    required confidence: `log_e >= threshold`. `log_e` is the log of the e-value (0: no
    evidence either way; it may be negative, and +inf in the degenerate cases a gate of 0 or
    1 allows); `threshold` is `log(1/alpha)` for the alpha the test was given (for a
    comparison, the part of it that is left after the share's confidence sequence).
    `figures` are JSON-able numbers for the rollout history.
    """

    name: str
    reject: bool
    log_e: float
    threshold: float
    figures: dict[str, float]


def step_alpha(confidence: float, steps: int) -> float:
    """The false-rollback budget of one judged step so the whole walk stays within `1 - confidence`.

    `steps` is the number of steps a walk can judge: the steps whose evidence is looked at
    (`proxy.core.rollout.judged_steps`; a step of 100% is promotion and never judged). Each step
    spends at most its budget (`segment_alpha` shares it among the step's evidence segments),
    so by the union bound the whole walk rolls back a canary no worse than its baseline with
    probability at most `steps * budget = 1 - confidence`.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be > 0 and < 1, got {confidence!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    return (1.0 - confidence) / steps


def segment_share(segment: int) -> float:
    """The share of a step's budget that its evidence segment number `segment` (from 0) spends.

    A step's evidence starts over when the rollout is resumed after a pause, when the proxy
    restarts, or when the counters go down; each fresh start is a new e-process, another
    chance to reject by luck, so it must be paid for. The first segment gets
    `1 - RESTART_RESERVE`; segment j >= 1 gets `RESTART_RESERVE / (j (j + 1))`, so the first
    k segments spend `1 - RESTART_RESERVE / k` of the budget (`segments_spent`) and any
    number of them less than all of it. The share shrinks like 1/j^2: after j fresh starts
    the threshold is only log(3 j (j + 1)) nats above the first segment's.
    """
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 0:
        raise ValueError(f"segment must be an integer >= 0, got {segment!r}")
    if segment == 0:
        return 1.0 - RESTART_RESERVE
    return RESTART_RESERVE / (segment * (segment + 1))


def segments_spent(segments: int) -> float:
    """The share of a step's budget spent by its first `segments` evidence segments, < 1."""
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 0:
        raise ValueError(f"segments must be an integer >= 0, got {segments!r}")
    return 0.0 if segments == 0 else 1.0 - RESTART_RESERVE / segments


def segment_alpha(budget: float, segment: int) -> float:
    """The alpha of evidence segment `segment` of a step whose budget is `budget`."""
    _check_alpha(budget)
    return budget * segment_share(segment)


def log_mixture(successes: int, trials: int, p0: float, *, above: bool = True) -> float:
    """Log e-value against "each trial succeeds with probability <= p0" (>= p0 if not above).

    The mixture, with equal weights, over the odds ratios r of `ODDS_RATIOS` (their inverses
    when `above` is False) of the likelihood ratio of p_r = r p0 / (1 - p0 + r p0) to p0:

        sum_r w_r * r**k / (1 + (r - 1) p0)**n        (k successes in n trials)

    Each term is a product of one factor per trial whose expectation is at most 1 under any
    success probability on the null side of p0 (even one that changes from trial to trial),
    so the mixture is a test supermartingale in the trials. p0 on the edge (0 or 1): a
    hypothesis that one trial can refute (e-value inf) or that nothing can (e-value 1).
    """
    _check_count(trials, "trials")
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"p0 must be in [0, 1], got {p0!r}")
    return _mixture(successes, trials, p0, above)


def _mixture(successes: int, trials: int, p0: float, above: bool) -> float:
    failures = trials - successes
    if above and p0 <= 0.0:
        return math.inf if successes else 0.0
    if not above and p0 >= 1.0:
        return math.inf if failures else 0.0
    if trials == 0 or (above and p0 >= 1.0) or (not above and p0 <= 0.0):
        return 0.0
    return _mixture_at(successes, trials, _alternatives(p0, above))


def _alternatives(p0: float, above: bool) -> tuple[tuple[float, float], ...]:
    """Per odds ratio r: (log r, log(1 + (r - 1) p0)); 0 < p0 < 1, so 1 + (r - 1) p0 > 0."""
    return tuple(
        (log_ratio, math.log1p(excess * p0)) for log_ratio, excess in (_ABOVE if above else _BELOW)
    )


def _mixture_at(
    successes: int, trials: int, alternatives: tuple[tuple[float, float], ...]
) -> float:
    # log of the mean over r of r**k / (1 + (r - 1) p0)**n.
    exponents = [log_ratio * successes - trials * log_norm for log_ratio, log_norm in alternatives]
    return _logsumexp(exponents) - _LOG_COUNT


def share_bound(canary_requests: int, total_requests: int, alpha: float) -> float:
    """An upper confidence sequence for the canary's share of requests.

    Each request is the canary's with probability w (the split). For lam >= 0,
    E exp(lam (w - X)) <= exp(w lam^2 / 2) for X ~ Bernoulli(w), so with S = N w - canary and
    V = N w, exp(lam S - lam^2 V / 2) is a supermartingale; its half-normal mixture (scale
    `SHARE_MIXTURE_SCALE` = c) is >= sqrt(c / (V + c)) exp(S^2 / (2 (V + c))) when S >= 0.
    Ville: with probability >= 1 - alpha, at every N, S < sqrt(2 (V + c) log(sqrt((V + c) / c)
    / alpha)) (Howard et al. 2021, normal mixture boundary). The bound is the largest w that
    satisfies this, computed from above so that it is never too small (never anti-conservative).
    """
    _check_count(total_requests, "total requests")
    if not 0 <= canary_requests <= total_requests:
        raise ValueError(f"need 0 <= canary requests <= total, got {canary_requests}")
    _check_alpha(alpha)
    if total_requests == 0:
        return 1.0
    scale = SHARE_MIXTURE_SCALE
    log_alpha = math.log(1.0 / alpha)
    # x = N w. The boundary grows with x through the log, so solving the quadratic
    # (x - canary)^2 = 2 (x + c) L with L taken at an x above the root gives an x above the root;
    # three rounds bring it within a fraction of a request of the root.
    x = float(total_requests)
    for _ in range(3):
        level = log_alpha + 0.5 * math.log((x + scale) / scale)
        x = (
            canary_requests
            + level
            + math.sqrt(level * level + 2.0 * level * (canary_requests + scale))
        )
        if x >= total_requests:
            return 1.0
    return x / total_requests


def share_lower_bound(canary_requests: int, total_requests: int, alpha: float) -> float:
    """A lower confidence sequence for the canary's share of requests (see `share_bound`).

    For X ~ Bernoulli(w) and lam >= 0, E exp(lam (X - w)) <= exp(w (e^lam - 1 - lam)), so
    exp(lam canary - N w (e^lam - 1)) is a supermartingale for each lam; their average over
    `SHARE_BETS` too. Ville: with probability >= 1 - alpha it stays below 1/alpha at every N.
    The average is convex and decreasing in w; the bound is where it crosses 1/alpha, reached
    by Newton's method from the left, whose every step stays at or below the crossing (the
    tangent of a convex function lies under it): never too large.
    """
    _check_count(total_requests, "total requests")
    if not 0 <= canary_requests <= total_requests:
        raise ValueError(f"need 0 <= canary requests <= total, got {canary_requests}")
    _check_alpha(alpha)
    level = math.log(1.0 / alpha) + math.log(len(SHARE_BETS))
    if total_requests == 0:
        return 0.0
    # Start where the largest single term alone reaches the level: the average is at least
    # there too, so the start is at or below the crossing and Newton needs a few steps only.
    w = max(
        (bet * canary_requests - level) / (total_requests * growth)
        for bet, growth in _SHARE_BETS_GROWTH
    )
    w = max(w, 0.0)
    for _ in range(60):
        exponents = [
            bet * canary_requests - w * total_requests * growth
            for bet, growth in _SHARE_BETS_GROWTH
        ]
        top = max(exponents)
        weights = [math.exp(value - top) for value in exponents]
        mass = sum(weights)
        excess = top + math.log(mass) - level
        if excess <= 1e-9:
            break
        slope = (
            -total_requests
            * sum(
                weight * growth
                for weight, (_, growth) in zip(weights, _SHARE_BETS_GROWTH, strict=True)
            )
            / mass
        )
        w -= excess / slope
    return min(w, canary_requests / total_requests)


def error_test(
    canary_requests: int,
    canary_errors: int,
    baseline_requests: int,
    baseline_errors: int,
    alpha: float,
) -> Test:
    """Is the canary's error ratio above the baseline's? (one-sided, anytime-valid)

    Null: at every moment a canary request fails with no higher probability than a baseline
    request (the common probability may change at will: an incident both see). Then, given
    which requests failed, each failure is the canary's with probability at most w, its share
    of requests; `log_mixture` tests the canary's failures among all failures against
    `share_bound` (alpha split `SHARE_ALPHA_FRACTION` to the bound, the rest to the test).
    """
    _check_version(canary_requests, canary_errors, "canary")
    _check_version(baseline_requests, baseline_errors, "baseline")
    _check_alpha(alpha)
    errors = canary_errors + baseline_errors
    total = canary_requests + baseline_requests
    bound = share_bound(canary_requests, total, alpha * SHARE_ALPHA_FRACTION)
    log_e = _mixture(canary_errors, errors, bound, True) if errors else 0.0
    threshold = math.log(1.0 / (alpha * (1.0 - SHARE_ALPHA_FRACTION)))
    figures = {
        "canary_requests": float(canary_requests),
        "canary_errors": float(canary_errors),
        "baseline_requests": float(baseline_requests),
        "baseline_errors": float(baseline_errors),
        "canary_error_rate": _ratio(canary_errors, canary_requests),
        "baseline_error_rate": _ratio(baseline_errors, baseline_requests),
        "canary_share": _ratio(canary_requests, total),
        "share_bound": bound,
        "canary_share_of_errors": _ratio(canary_errors, errors),
    }
    return Test("errors", log_e >= threshold, log_e, threshold, figures)


def latency_test(
    canary_buckets: Sequence[int], baseline_buckets: Sequence[int], alpha: float
) -> Test:
    """Is the canary stochastically slower than the baseline? (one-sided, anytime-valid)

    For each finite bucket bound t, the requests slower than t are tested as `error_test`
    tests failures: is the canary's share of them above its share of all requests? The
    e-value is the average over the bounds of those e-values (an average of e-processes is
    one). Null: at every moment a canary request is no more likely than a baseline request to
    be slower than any t.
    """
    canary = _check_buckets(canary_buckets, "canary")
    baseline = _check_buckets(baseline_buckets, "baseline")
    _check_alpha(alpha)
    canary_total, baseline_total = sum(canary), sum(baseline)
    total = canary_total + baseline_total
    share_alpha = alpha * SHARE_ALPHA_FRACTION / 2.0
    upper = share_bound(canary_total, total, share_alpha)
    lower = share_lower_bound(canary_total, total, share_alpha)
    threshold = math.log(1.0 / (alpha * (1.0 - SHARE_ALPHA_FRACTION)))
    slower_side = _alternatives(upper, True) if upper < 1.0 else ()
    faster_side = _alternatives(lower, False) if lower > 0.0 else ()
    # Requests slower than bound i: the slots after i (slot i holds (bound i-1, bound i]).
    canary_slower = canary_total - canary[0]
    baseline_slower = baseline_total - baseline[0]
    evidence: list[float] = []
    best, best_index = -math.inf, 0
    # Bounds with the same counts on either side (empty buckets between them) give the same
    # pair of e-values: computed once.
    seen: dict[tuple[int, int], tuple[float, float]] = {}
    for index in range(len(DURATION_BUCKETS)):
        key = (canary_slower, canary_slower + baseline_slower)
        pair = seen.get(key)
        if pair is None:
            slower = key[1]
            # The canary's share of the slower requests above its share of all requests, and
            # its share of the faster ones below it: either says "slower".
            log_slower = _mixture_at(canary_slower, slower, slower_side) if slower_side else 0.0
            log_faster = (
                _mixture_at(canary_total - canary_slower, total - slower, faster_side)
                if faster_side
                else 0.0
            )
            pair = seen[key] = (log_slower, log_faster)
        evidence += pair
        if max(pair) > best:
            best, best_index = max(pair), index
        canary_slower -= canary[index + 1]
        baseline_slower -= baseline[index + 1]
    log_e = 0.0 if not any(evidence) else _logsumexp(evidence) - math.log(len(evidence))
    slower_canary = sum(canary[best_index + 1 :])
    slower_baseline = sum(baseline[best_index + 1 :])
    figures = {
        "canary_requests": float(canary_total),
        "baseline_requests": float(baseline_total),
        "canary_share": _ratio(canary_total, total),
        "share_lower_bound": lower,
        "share_bound": upper,
        "bound_ms": DURATION_BUCKETS[best_index] * 1000.0,
        "canary_slower": _ratio(slower_canary, canary_total),
        "baseline_slower": _ratio(slower_baseline, baseline_total),
    }
    return Test("latency", log_e >= threshold, log_e, threshold, figures)


def error_gate(
    canary_requests: int,
    canary_errors: int,
    max_error_rate: float,
    alpha: float,
    *,
    below: bool = False,
) -> Test:
    """Is the error ratio above `max_error_rate` with confidence? (below it, if `below`)

    `log_mixture` of the errors among the requests against `max_error_rate`: valid whatever
    the ratio does over time as long as it stays on the null side of the gate, so a few
    errors in a small sample never reject it. `judge` uses `below=True` on the baseline.
    """
    _check_version(canary_requests, canary_errors, "requests")
    if not 0.0 <= max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate!r}")
    _check_alpha(alpha)
    log_e = _mixture(canary_errors, canary_requests, max_error_rate, not below)
    threshold = math.log(1.0 / alpha)
    figures = {
        "requests": float(canary_requests),
        "errors": float(canary_errors),
        "error_rate": _ratio(canary_errors, canary_requests),
        "max_error_rate": max_error_rate,
    }
    return Test("error_gate", log_e >= threshold, log_e, threshold, figures)


def p99_gate(
    canary_buckets: Sequence[int], max_p99: float, alpha: float, *, below: bool = False
) -> Test:
    """Is the p99 above `max_p99` with confidence? (at or below it, if `below`)

    p99 > t exactly when more than 1% of requests are slower than t. The histogram knows
    "slower than a bucket bound", so "above" tests the share slower than the first bound at or
    above `max_p99` (over 1% there means a p99 above that bound, so above `max_p99`), and
    "below" the share slower than the last bound at or below it (under 1% there means a p99
    at most that bound). Without such a bound (`max_p99` beyond the last bound, 60 s, for
    "above"; under the first, 0.1 ms, for "below") nothing can be shown: log_e 0.
    """
    buckets = _check_buckets(canary_buckets, "buckets")
    if not (math.isfinite(max_p99) and max_p99 > 0.0):
        raise ValueError(f"max_p99 must be a positive number of seconds, got {max_p99!r}")
    _check_alpha(alpha)
    total = sum(buckets)
    index = _last_bound_at_most(max_p99) if below else _first_bound_at_least(max_p99)
    threshold = math.log(1.0 / alpha)
    figures = {"requests": float(total), "max_p99_ms": max_p99 * 1000.0}
    if index is None:
        log_e = 0.0
        figures["slower"] = 0.0
    else:
        slower = sum(buckets[index + 1 :])
        log_e = _mixture(slower, total, P99_TAIL, not below)
        figures["slower"] = _ratio(slower, total)
        figures["bound_ms"] = DURATION_BUCKETS[index] * 1000.0
    return Test("p99_gate", log_e >= threshold, log_e, threshold, figures)


def judge(
    canary: tuple[int, int, Sequence[int]],
    baseline: tuple[int, int, Sequence[int]],
    *,
    alpha: float,
    max_error_rate: float,
    max_p99: float,
) -> tuple[Test, ...]:
    """All four tests on (requests, errors, buckets) of each version; any reject is a fail.

    alpha is shared by the union bound: `ERROR_SHARE` to `error_test`, `LATENCY_SHARE` to
    `latency_test`, `GATE_SHARE` to each gate. A gate rejects when the canary is above it
    AND the baseline below it, each with the gate's confidence: when the canary is no worse
    than the baseline, at most one of the two can be wrong (a canary truly above the gate has
    a baseline above it too), so a gate rolls back such a canary with probability at most
    its share. Its log_e is the smaller of the two.
    """
    _check_alpha(alpha)
    canary_requests, canary_errors, canary_buckets = canary
    baseline_requests, baseline_errors, baseline_buckets = baseline
    gate_alpha = alpha * GATE_SHARE
    errors = error_test(
        canary_requests, canary_errors, baseline_requests, baseline_errors, alpha * ERROR_SHARE
    )
    latency = latency_test(canary_buckets, baseline_buckets, alpha * LATENCY_SHARE)
    over = error_gate(canary_requests, canary_errors, max_error_rate, gate_alpha)
    under = error_gate(baseline_requests, baseline_errors, max_error_rate, gate_alpha, below=True)
    slow = p99_gate(canary_buckets, max_p99, gate_alpha)
    fast = p99_gate(baseline_buckets, max_p99, gate_alpha, below=True)
    return (
        errors,
        latency,
        _both("error_gate", over, under, "error_rate"),
        _both("p99_gate", slow, fast, "slower"),
    )


def _both(name: str, canary: Test, baseline: Test, key: str) -> Test:
    figures = {f"canary_{key}": canary.figures[key], f"baseline_{key}": baseline.figures[key]}
    # JSON has no infinity: an infinite log e (a gate of 0 or 1) is left out.
    for side, test in (("canary", canary), ("baseline", baseline)):
        if math.isfinite(test.log_e):
            figures[f"{side}_log_e"] = test.log_e
        if "bound_ms" in test.figures:
            figures[f"{side}_bound_ms"] = test.figures["bound_ms"]
    for extra in ("max_error_rate", "max_p99_ms"):
        if extra in canary.figures:
            figures[extra] = canary.figures[extra]
    return Test(
        name,
        canary.reject and baseline.reject,
        min(canary.log_e, baseline.log_e),
        canary.threshold,
        figures,
    )


def _first_bound_at_least(seconds: float) -> int | None:
    for index, bound in enumerate(DURATION_BUCKETS):
        if bound >= seconds:
            return index
    return None


def _last_bound_at_most(seconds: float) -> int | None:
    found = None
    for index, bound in enumerate(DURATION_BUCKETS):
        if bound <= seconds:
            found = index
    return found


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if math.isinf(top):
        return top
    return top + math.log(sum([math.exp(value - top) for value in values]))


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")


def _check_version(requests: int, errors: int, what: str) -> None:
    _check_count(requests, f"{what} requests")
    _check_count(errors, f"{what} errors")
    if errors > requests:
        raise ValueError(f"{what}: errors ({errors}) exceed requests ({requests})")


def _check_buckets(buckets: Sequence[int], what: str) -> tuple[int, ...]:
    if len(buckets) != BUCKET_SLOTS:
        raise ValueError(f"{what}: need {BUCKET_SLOTS} bucket counts, got {len(buckets)}")
    counts = tuple(buckets)
    if not all(type(count) is int and count >= 0 for count in counts):
        for index, count in enumerate(counts):
            _check_count(count, f"{what}[{index}]")
    return counts


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be > 0 and < 1, got {alpha!r}")
