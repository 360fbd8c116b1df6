"""Consecutive-threshold health state (proxy.health): tables of check results, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.health import (
    EndpointHealth,
    carry_over,
    checked_endpoints,
    down_set,
    record,
)
from proxy.spec import ConfigSpec, Endpoint, HealthCheck, RouteSpec, UpstreamSpec

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
