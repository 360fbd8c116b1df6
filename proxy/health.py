"""Consecutive-threshold health state of endpoints under active checks.

An endpoint starts up (optimistic: a freshly configured endpoint gets traffic before its first
check). While up, `unhealthy_after` failed checks in a row take it down; while down,
`healthy_after` passed checks in a row bring it back. A result that goes the other way resets
the run. The prober in the supervisor feeds check results in and broadcasts the down set; this
module only counts.

Pure core: it must never import asyncio, aiohttp, sockets, os, time or random. Results come in
as booleans, the config as `HealthCheck`s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.spec import ConfigSpec, HealthCheck

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
