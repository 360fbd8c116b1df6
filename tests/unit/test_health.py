"""Health (proxy.core.health): active-check thresholds and the back-off rule, by tables and
properties.

The back-off rule replaced two hand-written copies (passive ejection in worker.py, now in
pools.py, and resting shadow endpoints in mirror.py); `LegacyPassive` and `LegacyShadow` below
are those copies as they were, kept as the reference the shared rule must agree with on any
sequence of events.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.health import (
    CLEAR,
    Ejection,
    EjectionRule,
    EndpointHealth,
    after_expiry,
    after_failure,
    after_success,
    carry_over,
    checked_endpoints,
    down_set,
    record,
)
from proxy.core.spec import ConfigSpec, Endpoint, HealthCheck, RouteSpec, UpstreamSpec

CHECK = HealthCheck(path="/ready", interval=1.0, timeout=0.5, unhealthy_after=3, healthy_after=2)


def run(results: str, check: HealthCheck = CHECK) -> list[bool]:
    """Feed results ("P" pass, "F" fail) from the start state; `up` after each one."""
    state = EndpointHealth()
    seen = []
    for result in results:
        state = record(state, result == "P", check)
        seen.append(state.up)
    return seen


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        # Starts up, stays up while passing.
        ("PPP", "UUU"),
        # unhealthy_after=3 failures in a row take it down, not fewer.
        ("FF", "UU"),
        ("FFF", "UUD"),
        # A pass in between resets the run of failures.
        ("FFPFF", "UUUUU"),
        ("FFPFFF", "UUUUUD"),
        # healthy_after=2 passes in a row bring it back.
        ("FFFP", "UUDD"),
        ("FFFPP", "UUDDU"),
        # A failure while down resets the run of passes.
        ("FFFPFP", "UUDDDD"),
        ("FFFPFPP", "UUDDDDU"),
        # Down again after coming back needs a full run of failures again.
        ("FFFPPFF", "UUDDUUU"),
        ("FFFPPFFF", "UUDDUUUD"),
    ],
)
def test_thresholds(results: str, expected: str) -> None:
    assert "".join("U" if up else "D" for up in run(results)) == expected


@pytest.mark.parametrize(
    ("unhealthy_after", "healthy_after", "results", "expected"),
    [
        (1, 1, "FPFP", "DUDU"),
        (1, 3, "FPPP", "DDDU"),
        (2, 1, "FFP", "UDU"),
    ],
)
def test_other_thresholds(
    unhealthy_after: int, healthy_after: int, results: str, expected: str
) -> None:
    check = HealthCheck(unhealthy_after=unhealthy_after, healthy_after=healthy_after)
    assert "".join("U" if up else "D" for up in run(results, check)) == expected


def _reference(results: list[bool], check: HealthCheck) -> list[bool]:
    """Up/down from the definition: the state flips after a long enough run against it."""
    up = True
    run_length = 0
    seen = []
    for passed in results:
        if passed == up:
            run_length = 0
        else:
            run_length += 1
            if run_length >= (check.unhealthy_after if up else check.healthy_after):
                up = not up
                run_length = 0
        seen.append(up)
    return seen


@given(
    results=st.lists(st.booleans(), max_size=60),
    unhealthy_after=st.integers(1, 6),
    healthy_after=st.integers(1, 6),
)
def test_matches_the_definition(
    results: list[bool], unhealthy_after: int, healthy_after: int
) -> None:
    check = HealthCheck(unhealthy_after=unhealthy_after, healthy_after=healthy_after)
    state = EndpointHealth()
    seen = []
    for passed in results:
        state = record(state, passed, check)
        seen.append(state.up)
        # Only the run against the current state is ever counted.
        assert state.failures == 0 if not state.up else state.passes == 0
        assert state.failures < unhealthy_after
        assert state.passes < healthy_after
    assert seen == _reference(results, check)


@given(results=st.lists(st.booleans(), max_size=40))
def test_flips_need_a_full_run(results: list[bool]) -> None:
    # Whatever came before, unhealthy_after failures in a row always end down, and
    # healthy_after passes in a row always end up.
    state = EndpointHealth()
    for passed in results:
        state = record(state, passed, CHECK)
    down = state
    for _ in range(CHECK.unhealthy_after):
        down = record(down, False, CHECK)
    assert not down.up
    up = state
    for _ in range(CHECK.healthy_after):
        up = record(up, True, CHECK)
    assert up.up


def spec(upstreams: tuple[UpstreamSpec, ...]) -> ConfigSpec:
    return ConfigSpec(
        upstreams=upstreams,
        routes=(RouteSpec(name="all", split=((upstreams[0].name, 100.0),)),),
    )


def test_checked_endpoints_only_with_a_health_block() -> None:
    a, b = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)
    config = spec(
        (
            UpstreamSpec("blue", (a, b), CHECK),
            UpstreamSpec("green", (Endpoint("127.0.0.1", 3),)),
            UpstreamSpec("v6", (Endpoint("::1", 4),), HealthCheck()),
        )
    )
    assert checked_endpoints(config) == {
        ("blue", "127.0.0.1:1"): CHECK,
        ("blue", "127.0.0.1:2"): CHECK,
        ("v6", "[::1]:4"): HealthCheck(),
    }


def test_carry_over_keeps_endpoints_that_stay() -> None:
    down = EndpointHealth(up=False, passes=1)
    failing = EndpointHealth(up=True, failures=2)
    states = {("blue", "a:1"): down, ("blue", "b:1"): failing, ("gone", "c:1"): down}
    carried = carry_over(states, [("blue", "a:1"), ("blue", "b:1"), ("blue", "new:1")])
    assert carried == {
        ("blue", "a:1"): down,
        ("blue", "b:1"): failing,
        ("blue", "new:1"): EndpointHealth(),
    }
    assert down_set(carried) == {("blue", "a:1")}
    # Same address in another upstream is another endpoint: it starts up.
    assert carry_over(states, [("green", "a:1")]) == {("green", "a:1"): EndpointHealth()}


# ---- back-off after failures in a row ------------------------------------------------------

PASSIVE = EjectionRule(after=5, base=5.0, cap=60.0, again_after=5, success_ends=False)
SHADOW = EjectionRule(after=5, base=1.0, cap=30.0, again_after=1, success_ends=True)


def test_the_modules_use_these_rules() -> None:
    from proxy.dataplane import mirror, pools

    assert pools.PASSIVE_EJECTION == PASSIVE
    assert mirror.REST == SHADOW


def play(events: str, rule: EjectionRule, step: float = 1.0) -> str:
    """Feed events ("F" failure, "S" success), one per `step` seconds from t=1; after each one,
    "o" when the endpoint is out, "-" when not, and the back-off length when one began."""
    state = CLEAR
    now = 0.0
    seen = []
    for event in events:
        now += step
        before = state
        state = after_failure(state, now, rule) if event == "F" else after_success(state, rule)
        if state.until != before.until and state.until:
            seen.append(f"[{state.backoff:g}]")
        else:
            seen.append("o" if state.out(now) else "-")
    return "".join(seen)


@pytest.mark.parametrize(
    ("events", "rule", "step", "expected"),
    [
        # Five failures in a row start a 5 s ejection; fewer do not, a success in between resets.
        ("FFFF", PASSIVE, 1.0, "----"),
        ("FFFFF", PASSIVE, 1.0, "----[5]"),
        ("FFFFSFFFF", PASSIVE, 1.0, "---------"),
        # Failures while ejected (requests already on their way) change nothing...
        ("FFFFFFFFF", PASSIVE, 1.0, "----[5]oooo"),
        # ...then a full run again, and the next ejection is twice as long.
        ("FFFFFFFFFFFFFF", PASSIVE, 1.0, "----[5]oooo----[10]"),
        # A success ends the streak but not the ejection in force; the next one is 5 s again.
        ("FFFFFSFFFFFFFF", PASSIVE, 1.0, "----[5]oooo----[5]"),
        # Doubling up to the cap: 5, 10, 20, 40, 60, 60 (steps of 100 s: each has ended).
        ("F" * 30, PASSIVE, 100.0, "----[5]----[10]----[20]----[40]----[60]----[60]"),
        # A shadow endpoint rests 1 s after five failed copies...
        ("FFFFF", SHADOW, 0.5, "----[1]"),
        # ...failures during the rest change nothing, the first one after it rests it again.
        ("FFFFFFFF", SHADOW, 0.5, "----[1]o[2]o"),
        ("F" * 12, SHADOW, 100.0, "----[1][2][4][8][16][30][30][30]"),
        # An answer ends the rest at once; five failures again for the next one, of 1 s.
        ("FFFFFSFFFFF", SHADOW, 0.5, "----[1]-----[1]"),
    ],
)
def test_backoff_tables(events: str, rule: EjectionRule, step: float, expected: str) -> None:
    assert play(events, rule, step) == expected


class LegacyPassive:
    """pools.Pools.passive_result and the tick's clearing, as written before."""

    def __init__(self, after: int, base: float, cap: float) -> None:
        self.after, self.base, self.cap = after, base, cap
        self.passive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0

    def result(self, ok: bool, now: float) -> float | None:
        if ok:
            self.passive_failures = 0
            self.ejections = 0
            return None
        if self.ejected_until and now < self.ejected_until:
            return None
        self.passive_failures += 1
        if self.passive_failures >= self.after:
            self.passive_failures = 0
            backoff: float = min(self.cap, self.base * (2**self.ejections))
            self.ejections += 1
            self.ejected_until = now + backoff
            return backoff
        return None

    def tick(self, now: float) -> None:
        if self.ejected_until and now >= self.ejected_until:
            self.ejected_until = 0.0

    def out(self, now: float) -> bool:
        return bool(self.ejected_until and now < self.ejected_until)


class LegacyShadow:
    """mirror.Mirrorer.copy_failed / answered / _pick with its `_Resting`, as written before."""

    def __init__(self, after: int, base: float, cap: float) -> None:
        self.after, self.base, self.cap = after, base, cap
        self.resting: list[float] | None = None  # [failures, until, backoff]

    def result(self, ok: bool, now: float) -> float | None:
        if ok:
            self.resting = None
            return None
        if self.resting is None:
            self.resting = [0, 0.0, self.base]
        resting = self.resting
        resting[0] += 1
        if resting[0] >= self.after and now >= resting[1]:
            resting[1] = now + resting[2]
            began = resting[2]
            resting[2] = min(self.cap, resting[2] * 2)
            return began
        return None

    def tick(self, now: float) -> None:
        pass

    def out(self, now: float) -> bool:
        return self.resting is not None and not now >= self.resting[1]


EVENTS = st.lists(
    # (success?, tick?, time since the previous event in half seconds: lands on boundaries).
    # Successes one time in four, so that runs of failures long enough to matter are common.
    st.tuples(st.integers(0, 3).map(lambda n: n == 0), st.booleans(), st.integers(0, 8)),
    max_size=120,
)


@settings(max_examples=300)
@given(
    events=EVENTS,
    after=st.integers(1, 6),
    base=st.sampled_from([0.5, 1.0, 5.0]),
    doublings=st.integers(0, 4),
    shadow=st.booleans(),
)
def test_agrees_with_the_copies_it_replaced(
    events: list[tuple[bool, bool, int]], after: int, base: float, doublings: int, shadow: bool
) -> None:
    cap = base * 2**doublings
    legacy: LegacyPassive | LegacyShadow
    if shadow:
        legacy = LegacyShadow(after, base, cap)
        rule = EjectionRule(after, base, cap, again_after=1, success_ends=True)
    else:
        legacy = LegacyPassive(after, base, cap)
        rule = EjectionRule(after, base, cap, again_after=after, success_ends=False)
    state = CLEAR
    now = 1.0
    for ok, tick, half_seconds in events:
        now += half_seconds / 2
        if tick:
            legacy.tick(now)
            state = after_expiry(state, now)
        began = legacy.result(ok, now)
        before = state
        state = after_success(state, rule) if ok else after_failure(state, now, rule)
        assert (state.backoff if state.until != before.until and state.until else None) == began
        assert state.out(now) == legacy.out(now)
        assert state.out(now + 0.25) == legacy.out(now + 0.25)
        # The hot path skips a success when the streak is 0: that must be a no-op.
        if not state.streak:
            assert after_success(state, rule) == state


RULES = st.builds(
    EjectionRule,
    after=st.integers(1, 8),
    base=st.floats(0.001, 100.0),
    cap=st.floats(0.001, 1000.0),
    again_after=st.integers(1, 8),
    success_ends=st.booleans(),
).filter(lambda rule: rule.base <= rule.cap)


@given(rule=RULES, backoffs=st.integers(1, 40))
def test_backoffs_double_up_to_the_cap(rule: EjectionRule, backoffs: int) -> None:
    # Failures spaced far apart, so each back-off has ended before the next failure.
    state = CLEAR
    now = 0.0
    lengths: list[float] = []
    for _ in range(backoffs):
        needed = rule.again_after if lengths else rule.after
        for index in range(needed):
            now += 2 * rule.cap
            before = state
            state = after_failure(state, now, rule)
            assert (state.until != before.until) == (index == needed - 1)
        assert state.out(now)
        assert not state.out(now + state.backoff)
        lengths.append(state.backoff)
    assert lengths == [min(rule.cap, rule.base * 2**k) for k in range(backoffs)]


@given(rule=RULES, outcomes=st.lists(st.booleans(), max_size=60), gap=st.floats(0.0, 50.0))
def test_out_only_after_enough_failures_and_never_longer_than_the_cap(
    rule: EjectionRule, outcomes: list[bool], gap: float
) -> None:
    state = CLEAR
    now = 0.0
    in_a_row = 0
    for ok in outcomes:
        now += gap
        state = after_success(state, rule) if ok else after_failure(state, now, rule)
        in_a_row = 0 if ok else in_a_row + 1
        assert state.streak == in_a_row
        if state.out(now):
            # Out needs a full first run in this streak, unless a success did not end the
            # back-off in force (then the streak may be shorter).
            assert in_a_row >= rule.after or not rule.success_ends
            assert state.backoff <= rule.cap
            assert not state.out(now + 2 * rule.cap)
        if ok and rule.success_ends:
            assert state == CLEAR


@given(rule=RULES, extra=st.integers(1, 20), spacing=st.floats(0.0, 0.999))
def test_failures_during_a_backoff_change_nothing_but_the_streak(
    rule: EjectionRule, extra: int, spacing: float
) -> None:
    state = CLEAR
    for _ in range(rule.after):
        state = after_failure(state, 10.0, rule)
    began = state
    assert began.out(10.0)
    for index in range(extra):
        state = after_failure(state, 10.0 + spacing * began.backoff * index / extra, rule)
    assert state == Ejection(began.streak + extra, began.counted, began.backoff, began.until)


def test_a_long_dead_endpoint_does_not_overflow() -> None:
    # Thousands of ejections in a row (hours of a dead endpoint taking fail-open traffic).
    state = CLEAR
    now = 0.0
    for _ in range(5000 * PASSIVE.after):
        now += PASSIVE.cap
        state = after_failure(state, now, PASSIVE)
    assert state.backoff == PASSIVE.cap


def test_expiry_forgets_the_backoff_but_not_the_streak() -> None:
    state = CLEAR
    for _ in range(5):
        state = after_failure(state, 1.0, PASSIVE)
    assert after_expiry(state, 5.9) is state
    ended = after_expiry(state, 6.0)
    assert ended == Ejection(streak=5, counted=0, backoff=5.0, until=0.0)
    assert not ended.out(6.0)
