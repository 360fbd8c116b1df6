"""Health of endpoints: active checks by consecutive thresholds, and the one back-off rule.

Active checks: an endpoint starts up (optimistic: a freshly configured endpoint gets traffic
before its first check). While up, `unhealthy_after` failed checks in a row take it down; while
down, `healthy_after` passed checks in a row bring it back. A result that goes the other way
resets the run. The prober in the supervisor feeds check results in and broadcasts the down set;
this module only counts.

Back-off (`EjectionRule`, `Ejection`): "N failures in a row take an endpoint out for a while,
doubling while the failures go on". Passive ejection of the data plane (worker.py) and resting
shadow endpoints (mirror.py) both follow it, with their own numbers.

Pure core: it must never import asyncio, aiohttp, sockets, os, time or random. Results come in
as booleans, time as a number, the config as `HealthCheck`s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from proxy.core.spec import ConfigSpec, HealthCheck

# (upstream name, endpoint address "host:port"): the identity of an endpoint across reloads, and
# the pair the health control message and the metrics labels carry.
EndpointKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """The health of one endpoint: `up`, and the length of the current run against it.

    `failures` counts consecutive failed checks while up, `passes` consecutive passed checks
    while down; the other is always 0.
    """

    up: bool = True
    failures: int = 0
    passes: int = 0


def record(state: EndpointHealth, passed: bool, check: HealthCheck) -> EndpointHealth:
    """The state after one check result, by the thresholds of `check`."""
    if state.up:
        if passed:
            return EndpointHealth(up=True) if state.failures else state
        failures = state.failures + 1
        if failures >= check.unhealthy_after:
            return EndpointHealth(up=False)
        return EndpointHealth(up=True, failures=failures)
    if not passed:
        return EndpointHealth(up=False) if state.passes else state
    passes = state.passes + 1
    if passes >= check.healthy_after:
        return EndpointHealth(up=True)
    return EndpointHealth(up=False, passes=passes)


def checked_endpoints(spec: ConfigSpec) -> dict[EndpointKey, HealthCheck]:
    """Every endpoint whose upstream has a `health` block, with that check, in config order."""
    found: dict[EndpointKey, HealthCheck] = {}
    for upstream in spec.upstreams:
        if upstream.health is None:
            continue
        for endpoint in upstream.endpoints:
            found[(upstream.name, endpoint.address)] = upstream.health
    return found


def carry_over(
    states: Mapping[EndpointKey, EndpointHealth], keys: Iterable[EndpointKey]
) -> dict[EndpointKey, EndpointHealth]:
    """States for `keys` after a reload: kept for endpoints that stay, up for new ones.

    Endpoints no longer checked (removed, or their upstream lost its `health` block) are
    dropped: without a check an endpoint counts as up.
    """
    return {key: states.get(key, EndpointHealth()) for key in keys}


def down_set(states: Mapping[EndpointKey, EndpointHealth]) -> frozenset[EndpointKey]:
    """The endpoints that are down now."""
    return frozenset(key for key, state in states.items() if not state.up)


# ---- back-off after failures in a row --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EjectionRule:
    """When failures in a row take an endpoint out, and for how long.

    `after` failures in a row start the first back-off, `base` seconds long; each further one
    in the same streak (no success in between) is twice the last, up to `cap`. Failures while
    a back-off is in force are attempts that were already on their way: they do not count.

    The two users differ on purpose in what happens after a back-off:
    - `again_after`: failures in a row, once a back-off has ended, that start the next one.
      Passive ejection asks for a full run again (`after`); a resting shadow endpoint rests
      again on its first failure (1), since a copy sent after a rest is already a probe.
    - `success_ends`: whether a success during a back-off ends it at once (a shadow's answer
      ends its rest) or only ends the streak, the back-off in force running its course
      (passive ejection: a late success from a request sent before the ejection proves less).
    """

    after: int
    base: float
    cap: float
    again_after: int
    success_ends: bool


@dataclass(frozen=True, slots=True)
class Ejection:
    """The back-off state of one endpoint. Never changed: the functions below return another.

    `streak` counts every failure since the last success (so `streak == 0` means a success has
    nothing to reset); `counted` the failures toward the next back-off; `backoff` is the length
    of the last back-off of this streak (0: none yet); `until` the end of the back-off in force
    or of the last one (0: none, or `expired` cleared it).
    """

    streak: int = 0
    counted: int = 0
    backoff: float = 0.0
    until: float = 0.0

    def out(self, now: float) -> bool:
        """Whether a back-off is in force at `now`."""
        return now < self.until


CLEAR = Ejection()


def after_failure(state: Ejection, now: float, rule: EjectionRule) -> Ejection:
    """The state after a failure at `now`. A back-off began when `until` changed."""
    streak = state.streak + 1
    if now < state.until:
        return Ejection(streak, state.counted, state.backoff, state.until)
    counted = state.counted + 1
    if counted < (rule.again_after if state.backoff else rule.after):
        return Ejection(streak, counted, state.backoff, state.until)
    # Doubling the last one rather than raising base to a power: no overflow, however long.
    backoff = min(rule.cap, state.backoff * 2.0 if state.backoff else rule.base)
    return Ejection(streak, 0, backoff, now + backoff)


def after_success(state: Ejection, rule: EjectionRule) -> Ejection:
    """The state after a success: the streak is over; the back-off too if the rule says so."""
    if rule.success_ends or not state.until:
        return CLEAR
    if not state.streak:
        return state
    return Ejection(until=state.until)


def after_expiry(state: Ejection, now: float) -> Ejection:
    """The state with a back-off that has run its course forgotten (`until` back to 0); the
    streak goes on, so the next back-off is still the doubled one."""
    if state.until and now >= state.until:
        return replace(state, until=0.0)
    return state
