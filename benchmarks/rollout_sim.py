"""Whole rollouts simulated, the old fixed-window analysis side by side with the sequential one.

Every run walks the default rollout (steps 1, 5, 25, 50, 100; interval 60 s; min_requests 50;
max_error_rate 1%; max_p99 500 ms; confidence 0.99; check 5 s) twice on the SAME random
traffic: the traffic of step s, check period j is drawn from a generator seeded by (seed, cell,
run, s), so both procedures see the same requests for as long as they are at the same step.

- OLD: the analysis before issue 14, reimplemented here in a few lines because
  proxy.core.rollout.judge is being rewritten: each `interval` is a fixed window judged at its end;
  fail when the canary's error ratio is above max_error_rate AND a one-sided two-proportion
  z-test at 95% says it is above the baseline's, or its p99 (histogram estimate) is above
  max_p99 while the baseline's is not; fewer than min_requests canary requests is inconclusive
  (a new window), three in a row pause.
- NEW: proxy.core.sequential.judge on all the evidence since the step began, every `check`, with
  the alpha of a step's first evidence segment, proxy.core.rollout.segment_alpha(rollout, 0): the
  budget 1 - confidence shared among the 4 judged steps (the 100% step is promotion, never
  judged), 3/4 of it to the step's first evidence (the rest pays for fresh starts after a
  pause, a restart or counters that went down; these walks have none); any rejection rolls
  back at once; the step passes at the first look after `interval` with min_requests; three
  intervals without them pause.

Traffic is drawn per check period, not per request: a fixed number of requests (rate x 5 s),
the canary's share binomial at the step's weight, errors binomial per version, the latency
histogram a multinomial over the buckets of a log-normal latency. Seeded; pure Python.

    .venv/bin/python benchmarks/rollout_sim.py            # 10,000 rollouts per cell, ~25 min
    .venv/bin/python benchmarks/rollout_sim.py --quick    # 1,000 per cell, ~3 min
    .venv/bin/python benchmarks/rollout_sim.py --runs 200 --workers 1
    .venv/bin/python benchmarks/rollout_sim.py --target   # only the 5x target, 5,000 per row

The last table is issue 14's target (a canary at 5x the baseline's errors at 100 req/s rolled
back before its weight passes 5% in >= 99% of runs) by the steps' interval, the new test only,
next to the power of the best possible test on the same evidence (Neyman-Pearson, exact): the
target is out of reach of any test at the default interval, and of this one below 6 minutes.

(times on 2 cores; docs/rollout-statistics.md has the tables of the default run)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.core import rollout, sequential
from proxy.core.counters import DURATION_BUCKETS
from proxy.core.spec import Rollout

STEPS: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
INTERVAL = 60.0
CHECK = 5.0
MIN_REQUESTS = 50
MAX_ERROR_RATE = 0.01
MAX_P99 = 0.5
CONFIDENCE = 0.99
INCONCLUSIVE_LIMIT = 3
SLOTS = len(DURATION_BUCKETS) + 1
ROLLOUT = Rollout(baseline="blue", canary="canary", steps=STEPS, confidence=CONFIDENCE)
ALPHA = rollout.segment_alpha(ROLLOUT, 0)
Z_99 = 2.3263478740408408  # the standard normal's 99th percentile
Z_95 = 1.6448536269514722  # one-sided 95%

# --------------------------------------------------------------------------- traffic


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A Binomial(n, p) draw: exact inversion for small means, the normal law for large ones."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    mean = n * p
    if mean >= 60.0:
        draw = round(rng.gauss(mean, math.sqrt(mean * (1.0 - p))))
        return min(n, max(0, draw))
    u = rng.random()
    pmf = (1.0 - p) ** n
    cdf = pmf
    k = 0
    odds = p / (1.0 - p)
    while u > cdf and k < n:
        pmf *= (n - k) / (k + 1) * odds
        k += 1
        cdf += pmf
        if k > mean and pmf < 1e-16:  # rounding left u above the total: the tail is exhausted
            break
    return k


def lognormal(median: float, sigma: float) -> tuple[float, ...]:
    """The share of requests in each histogram slot for a log-normal latency."""

    def below(seconds: float) -> float:
        return 0.5 * math.erfc(-(math.log(seconds / median) / sigma) / math.sqrt(2.0))

    cumulative = [below(bound) for bound in DURATION_BUCKETS] + [1.0]
    return tuple(high - low for low, high in zip([0.0, *cumulative], cumulative, strict=False))


@dataclass(frozen=True)
class Version:
    """How one upstream behaves: its error ratio and its latency histogram shares."""

    error_rate: float
    latency: tuple[float, ...]

    def conditional(self) -> tuple[tuple[int, float], ...]:
        """(slot, probability given the slots before were not drawn) for the multinomial."""
        steps: list[tuple[int, float]] = []
        mass = 1.0
        for index, share in enumerate(self.latency[:-1]):
            if share > 1e-12 and mass > 1e-12:
                steps.append((index, min(1.0, share / mass)))
            mass -= share
        return tuple(steps)


def serve(
    rng: random.Random, requests: int, version: Version, plan: tuple[tuple[int, float], ...]
) -> tuple[int, int, list[int]]:
    """(requests, errors, buckets) of `requests` served by `version`."""
    buckets = [0] * SLOTS
    left = requests
    for index, probability in plan:
        if left == 0:
            break
        drawn = binomial(rng, left, probability)
        buckets[index] = drawn
        left -= drawn
    buckets[-1] += left
    return requests, binomial(rng, requests, version.error_rate), buckets


Period = tuple[tuple[int, int, list[int]], tuple[int, int, list[int]]]


class Traffic:
    """The check periods of one run, drawn once and shared by both procedures."""

    def __init__(self, key: int, rps: float, canary: Version, baseline: Version) -> None:
        self.key = key
        self.total = round(rps * CHECK)
        self.canary, self.baseline = canary, baseline
        self.plans = (canary.conditional(), baseline.conditional())
        self.periods: dict[int, list[Period]] = {}
        self.rngs: dict[int, random.Random] = {}

    def period(self, step: int, index: int) -> Period:
        periods = self.periods.setdefault(step, [])
        rng = self.rngs.setdefault(step, random.Random(self.key * 16 + step))
        while len(periods) <= index:
            to_canary = binomial(rng, self.total, STEPS[step] / 100.0)
            periods.append(
                (
                    serve(rng, to_canary, self.canary, self.plans[0]),
                    serve(rng, self.total - to_canary, self.baseline, self.plans[1]),
                )
            )
        return periods[index]


# --------------------------------------------------------------------------- procedures


@dataclass(frozen=True)
class Outcome:
    """How a walk ended: "failed", "succeeded" or "paused"; when (s), at which weight."""

    state: str
    seconds: float
    weight: float


def add(total: list[int], part: Sequence[int]) -> None:
    for index, count in enumerate(part):
        total[index] += count


def p99(buckets: Sequence[int]) -> float | None:
    """As proxy.core.rollout.p99 before issue 14 (Prometheus' histogram_quantile)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = 0.99 * total
    below = 0
    lower = 0.0
    for upper, count in zip(DURATION_BUCKETS, buckets, strict=False):
        if count and below + count >= rank:
            return lower + (upper - lower) * (rank - below) / count
        below += count
        lower = upper
    return DURATION_BUCKETS[-1]


def old_fails(canary: Sequence[int], baseline: Sequence[int], c_buckets: list[int],
              b_buckets: list[int]) -> bool:  # fmt: skip
    """The fixed-window verdict before issue 14: threshold AND z-test; p99 gate vs baseline."""
    c_requests, c_errors = canary[0], canary[1]
    b_requests, b_errors = baseline[0], baseline[1]
    if c_errors / c_requests > MAX_ERROR_RATE:
        if not b_requests:
            return True
        pooled = (c_errors + b_errors) / (c_requests + b_requests)
        variance = pooled * (1.0 - pooled) * (1.0 / c_requests + 1.0 / b_requests)
        if variance > 0.0:
            z = (c_errors / c_requests - b_errors / b_requests) / math.sqrt(variance)
            if z > Z_95:
                return True
    canary_p99, baseline_p99 = p99(c_buckets), p99(b_buckets)
    return (
        canary_p99 is not None
        and canary_p99 > MAX_P99
        and (baseline_p99 is None or baseline_p99 <= MAX_P99)
    )


def checks_per(interval: float) -> int:
    checks = round(interval / CHECK)
    if checks < 1 or abs(checks * CHECK - interval) > 1e-9:
        raise ValueError(f"interval {interval:g} s is not a whole number of checks of {CHECK:g} s")
    return checks


def walk_old(traffic: Traffic, interval: float = INTERVAL) -> Outcome:
    seconds = 0.0
    checks = checks_per(interval)
    for step in range(len(STEPS) - 1):
        inconclusive = 0
        index = 0
        while True:
            canary, baseline = [0, 0], [0, 0]
            c_buckets, b_buckets = [0] * SLOTS, [0] * SLOTS
            for _ in range(checks):
                (cr, ce, cb), (br, be, bb) = traffic.period(step, index)
                index += 1
                canary[0] += cr
                canary[1] += ce
                baseline[0] += br
                baseline[1] += be
                add(c_buckets, cb)
                add(b_buckets, bb)
            seconds += interval
            if canary[0] < MIN_REQUESTS:
                inconclusive += 1
                if inconclusive >= INCONCLUSIVE_LIMIT:
                    return Outcome("paused", seconds, STEPS[step])
                continue
            if old_fails(canary, baseline, c_buckets, b_buckets):
                return Outcome("failed", seconds, STEPS[step])
            break
    return Outcome("succeeded", seconds, 100.0)


def walk_new(traffic: Traffic, interval: float = INTERVAL) -> Outcome:
    """As proxy.core.rollout.look: a step passes at the first look, once it has lasted `interval`,
    at which the canary has min_requests; it pauses at INCONCLUSIVE_LIMIT intervals without."""
    seconds = 0.0
    checks = checks_per(interval)
    for step in range(len(STEPS) - 1):
        canary, baseline = [0, 0], [0, 0]
        c_buckets, b_buckets = [0] * SLOTS, [0] * SLOTS
        index = 0
        while True:
            (cr, ce, cb), (br, be, bb) = traffic.period(step, index)
            index += 1
            seconds += CHECK
            canary[0] += cr
            canary[1] += ce
            baseline[0] += br
            baseline[1] += be
            add(c_buckets, cb)
            add(b_buckets, bb)
            tests = sequential.judge(
                (canary[0], canary[1], c_buckets),
                (baseline[0], baseline[1], b_buckets),
                alpha=ALPHA,
                max_error_rate=MAX_ERROR_RATE,
                max_p99=MAX_P99,
            )
            if any(test.reject for test in tests):
                return Outcome("failed", seconds, STEPS[step])
            if index >= checks:
                if canary[0] >= MIN_REQUESTS:
                    break
                if index >= INCONCLUSIVE_LIMIT * checks:
                    return Outcome("paused", seconds, STEPS[step])
    return Outcome("succeeded", seconds, 100.0)


# --------------------------------------------------------------------------- cells


FAST = lognormal(0.040, 0.5)  # median 40 ms, p99 128 ms


def healthy(error_rate: float) -> Version:
    return Version(error_rate, FAST)


@dataclass(frozen=True)
class Cell:
    """One scenario: traffic rate, the two versions, the steps' interval.

    The traffic is seeded by the name (and the run), not by the interval: cells that differ
    only in their interval serve the same requests in the same check periods.
    """

    name: str
    rps: float
    canary: Version
    baseline: Version
    interval: float = INTERVAL
    old: bool = True  # also walk the old procedure (else its list of outcomes is empty)


def run_cell(args: tuple[int, Cell, int, int]) -> tuple[list[Outcome], list[Outcome]]:
    seed, cell, first, count = args
    old: list[Outcome] = []
    new: list[Outcome] = []
    for run in range(first, first + count):
        traffic = Traffic((seed * 1_000_003 + hash_name(cell.name)) * 1_000_000 + run,
                          cell.rps, cell.canary, cell.baseline)  # fmt: skip
        if cell.old:
            old.append(walk_old(traffic, cell.interval))
        new.append(walk_new(traffic, cell.interval))
    return old, new


def hash_name(name: str) -> int:
    # A stable hash (the built-in one is salted per process).
    value = 0
    for char in name:
        value = (value * 131 + ord(char)) % 1_000_003
    return value


class Runner:
    def __init__(self, seed: int, workers: int) -> None:
        self.seed = seed
        self.pool = ProcessPoolExecutor(workers) if workers > 1 else None
        self.workers = workers

    def run(self, cell: Cell, runs: int) -> tuple[list[Outcome], list[Outcome]]:
        chunks = max(1, self.workers * 4)
        size = -(-runs // chunks)
        jobs = [(self.seed, cell, first, min(size, runs - first)) for first in range(0, runs, size)]
        results = self.pool.map(run_cell, jobs) if self.pool else map(run_cell, jobs)
        old: list[Outcome] = []
        new: list[Outcome] = []
        for part_old, part_new in results:
            old += part_old
            new += part_new
        return old, new


def share(outcomes: Sequence[Outcome], test: Callable[[Outcome], bool]) -> float:
    return sum(1 for outcome in outcomes if test(outcome)) / len(outcomes)


def failed(outcome: Outcome) -> bool:
    return outcome.state == "failed"


def percent(value: float) -> str:
    return f"{value * 100:.2f}%"


def median_seconds(outcomes: Sequence[Outcome]) -> str:
    times = [outcome.seconds for outcome in outcomes if failed(outcome)]
    return f"{statistics.median(times):.0f} s" if times else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


RATES = (10.0, 100.0, 1000.0, 10000.0)


def identical(runner: Runner, runs: int) -> str:
    rows = []
    for error_rate in (0.001, 0.01, 0.05):
        row = [percent(error_rate)]
        for rps in RATES:
            old, new = runner.run(Cell(f"same {error_rate} {rps}", rps, healthy(error_rate),
                                       healthy(error_rate)), runs)  # fmt: skip
            paused = share(new, lambda outcome: outcome.state == "paused")
            note = f" ({percent(paused)} paused)" if paused else ""
            row.append(f"{percent(share(old, failed))} / {percent(share(new, failed))}{note}")
        rows.append(row)
    header = ["errors (both)", *(f"{rps:g} req/s: old / new" for rps in RATES)]
    return table(header, rows)


def identical_latency(runner: Runner, runs: int) -> str:
    rows = []
    cases = [
        ("median 40 ms, sigma 0.5 (p99 128 ms)", FAST),
        ("p99 exactly max_p99 (500 ms), sigma 0.5", lognormal(MAX_P99 / math.exp(Z_99 * 0.5), 0.5)),
        ("median 40 ms, sigma 1.0 (p99 410 ms)", lognormal(0.040, 1.0)),
    ]  # fmt: skip
    for label, shape in cases:
        version = Version(0.005, shape)
        row = [label]
        for rps in (100.0, 1000.0):
            old, new = runner.run(Cell(f"latency {label} {rps}", rps, version, version), runs)
            row.append(f"{percent(share(old, failed))} / {percent(share(new, failed))}")
        rows.append(row)
    return table(["identical latencies, 0.5% errors", "100 req/s: old / new",
                  "1000 req/s: old / new"], rows)  # fmt: skip


def regression(runner: Runner, runs: int, label: str, canary: Version, baseline: Version) -> str:
    old, new = runner.run(Cell(label, 100.0, canary, baseline), runs)
    rows = []
    for name, outcomes in (("old", old), ("new", new)):
        early = share(outcomes, lambda o: failed(o) and o.weight <= 5.0)
        rows.append(
            [name, percent(early), percent(share(outcomes, failed)), median_seconds(outcomes)]
        )
    return table(
        ["procedure", "rolled back at 1% or 5%", "rolled back at all", "median time to rollback"],
        rows,
    )


ERROR_LADDER = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
LATENCY_LADDER = (1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0)


def smallest(runner: Runner, runs: int) -> str:
    rows = []
    for kind, ladder in (("errors x (baseline 0.5%)", ERROR_LADDER),
                         ("median latency x (40 ms)", LATENCY_LADDER)):  # fmt: skip
        row = [kind]
        for rps in RATES:
            found = {"old": "none", "new": "none"}
            for factor in ladder:
                if kind.startswith("errors"):
                    canary = Version(0.005 * factor, FAST)
                else:
                    canary = Version(0.005, lognormal(0.040 * factor, 0.5))
                old, new = runner.run(Cell(f"{kind} {factor} {rps}", rps, canary, healthy(0.005)),
                                      runs)  # fmt: skip
                for name, outcomes in (("old", old), ("new", new)):
                    if found[name] == "none" and share(outcomes, failed) >= 0.9:
                        found[name] = f"{factor:g}x"
                if "none" not in found.values():
                    break
            row.append(f"{found['old']} / {found['new']}")
        rows.append(row)
    return table(["regression", *(f"{rps:g} req/s: old / new" for rps in RATES)], rows)


# --------------------------------------------------------------------------- the 5x target

# Issue 14's target: a canary at 5x the baseline's errors (0.5% -> 2.5%) at 100 req/s rolled
# back before its weight passes 5% (at the 1% or the 5% step) in >= 99% of runs.
FIVE_X_CANARY, FIVE_X_BASELINE = healthy(0.025), healthy(0.005)
EARLY = 2  # the steps at 1% and 5%
SWEEP_INTERVALS = (60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 600.0, 900.0)
TARGET = 0.99


def early(outcome: Outcome) -> bool:
    return failed(outcome) and outcome.weight <= STEPS[EARLY - 1]


def wilson(hits: int, runs: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a share."""
    share_ = hits / runs
    centre = share_ + z * z / (2 * runs)
    spread = z * math.sqrt(share_ * (1 - share_) / runs + z * z / (4 * runs * runs))
    return (centre - spread) / (1 + z * z / runs), (centre + spread) / (1 + z * z / runs)


def binomial_law(n: int, p: float) -> tuple[int, list[float]]:
    """(first k, P(K = k) for k from it) of Binomial(n, p), cut where under 1e-20."""
    mean, sd = n * p, math.sqrt(n * p * (1.0 - p))
    low, high = max(0, math.floor(mean - 10 * sd - 10)), min(n, math.ceil(mean + 10 * sd + 10))
    log_p, log_q = math.log(p), math.log1p(-p)
    head = math.lgamma(n + 1)
    law = [
        math.exp(head - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        for k in range(low, high + 1)
    ]
    return low, law


def early_requests_law(rps: float, interval: float) -> tuple[int, list[float]]:
    """The law of the canary's requests in the 1% and 5% steps, each lasting `interval`.

    As the simulation draws them: round(rps x check) requests per check period, each the
    canary's with the step's weight. (A step short of min_requests at its interval lasts
    longer; at these rates that is the 1% step at 100 req/s and 1 minute, in about 10% of runs,
    for a few more seconds: left out.)
    """
    requests = round(rps * CHECK) * checks_per(interval)
    first, law = 0, [1.0]
    for weight in STEPS[:EARLY]:
        low, part = binomial_law(requests, weight / 100.0)
        joined = [0.0] * (len(law) + len(part) - 1)
        for i, a in enumerate(law):
            if a > 1e-22:
                for j, b in enumerate(part):
                    joined[i + j] += a * b
        first, law = first + low, joined
    return first, law


def best_test(rps: float, interval: float, alpha: float,
              healthy_rate: float = 0.005, bad_rate: float = 0.025) -> float:  # fmt: skip
    """Power of the most powerful test at level `alpha` on all the evidence before the canary's
    weight passes 5%, for the canary at `bad_rate` against one at `healthy_rate`.

    Neyman-Pearson for two simple hypotheses, the baseline's rate known (so the baseline's
    requests, the latencies and the split, whose laws are the same under both, cancel from the
    likelihood ratio): reject on the largest values of the likelihood ratio of (canary
    requests n, canary errors k), randomised at the edge, until the rejected mass under the
    healthy canary is exactly `alpha`. Exact, up to the tails cut below 1e-20. Any procedure
    that rolls back a canary no worse than its baseline with probability <= alpha and decides
    on these requests rolls back this canary before its weight passes 5% with at most this
    probability.
    """
    step = math.log(bad_rate / healthy_rate) - math.log1p(-bad_rate) + math.log1p(-healthy_rate)
    drift = math.log1p(-bad_rate) - math.log1p(-healthy_rate)
    first, law = early_requests_law(rps, interval)
    cells: list[tuple[float, float, float]] = []
    for offset, weight in enumerate(law):
        if weight < 1e-20:
            continue
        n = first + offset
        null_first, null = binomial_law(n, healthy_rate)
        bad_first, bad = binomial_law(n, bad_rate)
        for k in range(min(null_first, bad_first),
                       max(null_first + len(null), bad_first + len(bad))):  # fmt: skip
            p0 = null[k - null_first] if 0 <= k - null_first < len(null) else 0.0
            p1 = bad[k - bad_first] if 0 <= k - bad_first < len(bad) else 0.0
            if p0 * weight > 1e-24 or p1 * weight > 1e-24:
                cells.append((k * step + n * drift, weight * p0, weight * p1))
    cells.sort(key=lambda cell: -cell[0])
    size, power = 0.0, 0.0
    for _, p0, p1 in cells:
        if size + p0 > alpha:
            power += p1 * (alpha - size) / p0
            break
        size += p0
        power += p1
    return min(1.0, power)


def shortest_possible(rps: float, alpha: float, target: float = TARGET) -> float:
    """The shortest interval (whole checks) at which `best_test` reaches `target`."""
    low, high = 1, 2
    while best_test(rps, high * CHECK, alpha) < target:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if best_test(rps, middle * CHECK, alpha) >= target:
            high = middle
        else:
            low = middle
    return high * CHECK


def minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds:g} s"


def five_x_target(runner: Runner, runs: int) -> str:
    """Issue 14's 5x target by interval at 100 req/s, and at 1,000 req/s with the default."""
    rows = []
    met: str | None = None
    cases = [(100.0, interval) for interval in SWEEP_INTERVALS] + [(1000.0, INTERVAL)]
    for rps, interval in cases:
        # Named as the 5x cell of the main tables: the same traffic at every interval, and the
        # 1-minute row at 100 req/s is that cell's "new" row.
        name = "5x errors" if rps == 100.0 else f"5x errors {rps:g}"
        cell = Cell(name, rps, FIVE_X_CANARY, FIVE_X_BASELINE, interval, old=False)
        _, new = runner.run(cell, runs)
        hits = sum(1 for outcome in new if early(outcome))
        low, high = wilson(hits, runs)
        requests = rps * interval * sum(STEPS[:EARLY]) / 100.0
        rows.append([
            f"{rps:g} req/s, {minutes(interval)}",
            f"{requests:,.0f} ({requests * 0.025:.1f} / {requests * 0.005:.1f})",
            percent(best_test(rps, interval, 1.0 - CONFIDENCE)),
            f"{percent(hits / runs)} ({percent(low)}-{percent(high)})",
            percent(share(new, failed)),
            median_seconds(new),
        ])  # fmt: skip
        if rps == 100.0 and met is None and hits / runs >= TARGET:
            met = minutes(interval)
    header = ["rate, interval", "canary requests at 1% and 5% (errors: 5x / healthy)",
              "best possible test, alpha 1%", "rolled back at 1% or 5% (95% interval)",
              "rolled back at all", "median time to rollback"]  # fmt: skip
    possible = shortest_possible(100.0, 1.0 - CONFIDENCE)
    possible_steps = shortest_possible(100.0, EARLY * rollout.step_alpha(ROLLOUT))
    return "\n".join([
        table(header, rows),
        "",
        f"Shortest interval in the sweep at which the new test reaches {percent(TARGET)} at "
        f"100 req/s: {met or 'none'}.",
        f"Shortest interval at which any test can (best possible test, whole checks): "
        f"{minutes(possible)} at alpha {1.0 - CONFIDENCE:g} (the whole rollout's budget); "
        f"{minutes(possible_steps)} at alpha {EARLY * rollout.step_alpha(ROLLOUT):g} "
        f"(the two steps' shares).",
    ])  # fmt: skip


def print_target(runner: Runner, runs: int) -> None:
    print(f"Canary 5x the baseline's errors (0.5% -> 2.5%): rolled back before its weight "
          f"passes 5%, by interval ({runs} rollouts per row, the new test only; the other "
          f"settings the defaults)\n")  # fmt: skip
    print(five_x_target(runner, runs), "\n", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000, help="rollouts per cell")
    parser.add_argument("--quick", action="store_true", help="1,000 rollouts per cell")
    parser.add_argument("--ladder-runs", type=int, default=0,
                        help="rollouts per point of the smallest-regression table "
                             "(default: a tenth of --runs, at least 200)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--target", action="store_true", help="only the 5x target by interval (issue 14)"
    )
    parser.add_argument("--target-runs", type=int, default=0,
                        help="rollouts per row of the 5x target by interval "
                             "(default: half of --runs, at least 1,000)")  # fmt: skip
    args = parser.parse_args(argv)
    runs = 1000 if args.quick else args.runs
    ladder_runs = args.ladder_runs or max(200, runs // 10)
    target_runs = args.target_runs or max(1000, runs // 2)
    runner = Runner(args.seed, args.workers)
    began = time.monotonic()
    if args.target:
        print_target(runner, target_runs)
        print(f"run time {time.monotonic() - began:.0f} s, {args.workers} worker(s)")
        return 0
    print(f"rollout_sim: {runs} rollouts per cell, seed {args.seed}, alpha per step "
          f"{ALPHA:g} (a first evidence segment's; confidence {CONFIDENCE}, "
          f"{rollout.judged_steps(ROLLOUT)} judged steps)\n")  # fmt: skip
    print("Identical versions (latency log-normal, median 40 ms, sigma 0.5): share of rollouts "
          "rolled back\n")  # fmt: skip
    print(identical(runner, runs), "\n", flush=True)
    print("Identical latency distributions: share rolled back\n")
    print(identical_latency(runner, runs), "\n", flush=True)
    print("Canary 5x the baseline's errors (0.5% -> 2.5%) at 100 req/s\n")
    print(regression(runner, runs, "5x errors", healthy(0.025), healthy(0.005)), "\n", flush=True)
    print("Canary median latency +50% (40 -> 60 ms, same sigma 0.5) at 100 req/s\n")
    slow = Version(0.005, lognormal(0.060, 0.5))
    print(regression(runner, runs, "median +50%", slow, healthy(0.005)), "\n", flush=True)
    print(f"Smallest regression rolled back in >= 90% of {ladder_runs} rollouts\n")
    print(smallest(runner, ladder_runs), "\n", flush=True)
    print_target(runner, target_runs)
    print(f"run time {time.monotonic() - began:.0f} s, {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
