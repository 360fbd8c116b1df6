"""The split-override policy: which runtime and rollout splits are in force on top of the file.

An override is a route's split that is not the file's: one set at runtime (source "runtime";
"fleet" when the fleet shares it) or a rollout's current step (source "rollout"). The supervisor
keeps the overrides in force and compiles every table with them; these functions decide what
they become when something changes: a reload (the file wins where it changed), a rollout step
(a runtime split wins over a rollout), the fleet's shared document, and what is saved. Plain
functions over data, so the policy is tested without processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from proxy.core.spec import ConfigSpec
from proxy.core.table import TableDiff, compile_table

# The supervisor's logger: these decisions are its log lines, as they were before the split.
log = logging.getLogger("turnout.supervisor")

# route -> (weights, source): the runtime ("runtime"; "fleet" when the fleet shares it) or
# rollout ("rollout") split in force.
SplitOverrides = dict[str, tuple[dict[str, float], str]]
RUNTIME_SOURCES = ("runtime", "fleet")


def runtime_source(in_fleet: bool) -> str:
    """The source of a runtime split set here: "fleet" when a fleet shares it."""
    return "fleet" if in_fleet else "runtime"


def usable(spec: ConfigSpec, overrides: SplitOverrides, where: str) -> SplitOverrides:
    """The overrides that compile against `spec`; the others are logged and dropped."""
    kept: SplitOverrides = {}
    routes = {route.name for route in spec.routes}
    for route, override in overrides.items():
        if route not in routes:
            log.warning(
                "route %s: dropping the %s split %s: the config has no such route",
                route,
                override[1],
                where,
            )
            continue
        try:
            compile_table(spec, generation=0, sha256="", split_overrides={route: override})
        except ValueError as exc:
            log.warning("route %s: dropping the %s split %s: %s", route, override[1], where, exc)
        else:
            kept[route] = override
    return kept


def from_splits(
    spec: ConfigSpec, splits: Mapping[str, Mapping[str, float]], source: str, where: str
) -> SplitOverrides:
    """Saved runtime splits (the state file's, the fleet's) as the overrides `spec` can take."""
    restored = {route: (dict(weights), source) for route, weights in splits.items()}
    return usable(spec, restored, where)


def after_reload(overrides: SplitOverrides, diff: TableDiff, spec: ConfigSpec) -> SplitOverrides:
    """The runtime overrides that survive a reload to `spec` (rollout ones are left out: the
    caller adds them back from the rollout controller with `with_rollouts`).

    The file is the authority once it changes: a runtime split of a route whose `split` the
    file changed goes, and so does any override the new file makes impossible (its route or
    one of its upstreams is gone).
    """
    kept: SplitOverrides = {}
    for route, override in overrides.items():
        if override[1] == "rollout":
            continue
        if route in diff.routes_split_changed:
            log.info(
                "route %s: the file changed its split; the runtime split %s is dropped",
                route,
                override[0],
            )
        else:
            kept[route] = override
    return usable(spec, kept, "after the reload")


def with_rollouts(overrides: SplitOverrides, rollout_splits: SplitOverrides) -> SplitOverrides:
    """The runtime splits of `overrides` with every active rollout's split added; a runtime
    split wins (it pauses the route's rollout)."""
    merged = {route: o for route, o in overrides.items() if o[1] in RUNTIME_SOURCES}
    for route, override in rollout_splits.items():
        merged.setdefault(route, override)
    return merged


def runtime_split(overrides: SplitOverrides, route: str) -> dict[str, float] | None:
    """The runtime split in force on `route` (None: the file's or a rollout's)."""
    override = overrides.get(route)
    return override[0] if override is not None and override[1] in RUNTIME_SOURCES else None


def saved_splits(overrides: SplitOverrides) -> dict[str, dict[str, float]]:
    """The runtime splits as the state file (or the fleet) keeps them; rollout ones are the
    rollout state's business."""
    return {
        route: weights
        for route, (weights, source) in overrides.items()
        if source in RUNTIME_SOURCES
    }


def changed_routes(before: SplitOverrides, after: SplitOverrides) -> list[str]:
    """The routes whose override differs between `before` and `after`, sorted."""
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
