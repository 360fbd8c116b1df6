"""Whole rollouts simulated, the old fixed-window analysis side by side with the sequential one.

Every run walks the default rollout (steps 1, 5, 25, 50, 100; interval 60 s; min_requests 50;
max_error_rate 1%; max_p99 500 ms; confidence 0.99; check 5 s) twice on the SAME random
traffic: the traffic of step s, check period j is drawn from a generator seeded by (seed, cell,
run, s), so both procedures see the same requests for as long as they are at the same step.

- OLD: the analysis before issue 14, reimplemented here in a few lines because
  proxy.rollout.judge is being rewritten: each `interval` is a fixed window judged at its end;
  fail when the canary's error ratio is above max_error_rate AND a one-sided two-proportion
  z-test at 95% says it is above the baseline's, or its p99 (histogram estimate) is above
  max_p99 while the baseline's is not; fewer than min_requests canary requests is inconclusive
  (a new window), three in a row pause.
- NEW: proxy.sequential.judge on all the evidence since the step began, every `check`, with
  the alpha of a step's first evidence segment, proxy.rollout.segment_alpha(rollout, 0): the
  budget 1 - confidence shared among the 4 judged steps (the 100% step is promotion, never
  judged), 3/4 of it to the step's first evidence (the rest pays for fresh starts after a
  pause, a restart or counters that went down; these walks have none); any rejection rolls
  back at once; the step passes at the first look after `interval` with min_requests; three
  intervals without them pause.

Traffic is drawn per check period, not per request: a fixed number of requests (rate x 5 s),
the canary's share binomial at the step's weight, errors binomial per version, the latency
histogram a multinomial over the buckets of a log-normal latency. Seeded; pure Python.

    .venv/bin/python benchmarks/rollout_sim.py            # 10,000 rollouts per cell, ~20 min
    .venv/bin/python benchmarks/rollout_sim.py --quick    # 1,000 per cell, ~2 min
    .venv/bin/python benchmarks/rollout_sim.py --runs 200 --workers 1

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

from proxy import rollout, sequential
from proxy.spec import Rollout
from proxy.stats import DURATION_BUCKETS

STEPS: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
INTERVAL = 60.0
CHECK = 5.0
MIN_REQUESTS = 50
MAX_ERROR_RATE = 0.01
MAX_P99 = 0.5
CONFIDENCE = 0.99
INCONCLUSIVE_LIMIT = 3
CHECKS_PER_INTERVAL = round(INTERVAL / CHECK)
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
    """As proxy.rollout.p99 before issue 14 (Prometheus' histogram_quantile)."""
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


def walk_old(traffic: Traffic) -> Outcome:
    seconds = 0.0
    for step in range(len(STEPS) - 1):
        inconclusive = 0
        index = 0
        while True:
            canary, baseline = [0, 0], [0, 0]
            c_buckets, b_buckets = [0] * SLOTS, [0] * SLOTS
            for _ in range(CHECKS_PER_INTERVAL):
                (cr, ce, cb), (br, be, bb) = traffic.period(step, index)
                index += 1
                canary[0] += cr
                canary[1] += ce
                baseline[0] += br
                baseline[1] += be
                add(c_buckets, cb)
                add(b_buckets, bb)
            seconds += INTERVAL
            if canary[0] < MIN_REQUESTS:
                inconclusive += 1
                if inconclusive >= INCONCLUSIVE_LIMIT:
                    return Outcome("paused", seconds, STEPS[step])
                continue
            if old_fails(canary, baseline, c_buckets, b_buckets):
                return Outcome("failed", seconds, STEPS[step])
            break
    return Outcome("succeeded", seconds, 100.0)


def walk_new(traffic: Traffic) -> Outcome:
    seconds = 0.0
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
            if index % CHECKS_PER_INTERVAL == 0:
                if canary[0] >= MIN_REQUESTS:
                    break
                if index >= INCONCLUSIVE_LIMIT * CHECKS_PER_INTERVAL:
                    return Outcome("paused", seconds, STEPS[step])
    return Outcome("succeeded", seconds, 100.0)


# --------------------------------------------------------------------------- cells


FAST = lognormal(0.040, 0.5)  # median 40 ms, p99 128 ms


def healthy(error_rate: float) -> Version:
    return Version(error_rate, FAST)


@dataclass(frozen=True)
class Cell:
    """One scenario: traffic rate and the two versions."""

    name: str
    rps: float
    canary: Version
    baseline: Version


def run_cell(args: tuple[int, Cell, int, int]) -> tuple[list[Outcome], list[Outcome]]:
    seed, cell, first, count = args
    old: list[Outcome] = []
    new: list[Outcome] = []
    for run in range(first, first + count):
        traffic = Traffic((seed * 1_000_003 + hash_name(cell.name)) * 1_000_000 + run,
                          cell.rps, cell.canary, cell.baseline)  # fmt: skip
        old.append(walk_old(traffic))
        new.append(walk_new(traffic))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000, help="rollouts per cell")
    parser.add_argument("--quick", action="store_true", help="1,000 rollouts per cell")
    parser.add_argument("--ladder-runs", type=int, default=0,
                        help="rollouts per point of the smallest-regression table "
                             "(default: a tenth of --runs, at least 200)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    runs = 1000 if args.quick else args.runs
    ladder_runs = args.ladder_runs or max(200, runs // 10)
    runner = Runner(args.seed, args.workers)
    began = time.monotonic()
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
    print(smallest(runner, ladder_runs), "\n")
    print(f"run time {time.monotonic() - began:.0f} s, {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
