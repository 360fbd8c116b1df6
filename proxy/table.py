"""The compiled routing table: one immutable object per config generation.

`compile_table` does, once per reload, every piece of work the hot path would otherwise repeat:
host and prefix matching data, normalised split weights, the header and cookie names that
`routing.decide` will read. The data plane reads `holder.current` once per request and keeps that
table for the request's whole life.

Pure core: no asyncio, sockets, os, time or random here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from proxy.spec import (
    ConfigSpec,
    Endpoint,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    UpstreamSpec,
)

SPLIT_SOURCES = ("file", "runtime", "rollout")


@dataclass(frozen=True, slots=True)
class CompiledSplit:
    """A split ready for choosing.

    `upstreams`/`weights` hold only upstreams with weight > 0, in file order; `cumulative` are
    the running sums divided by the total (last element exactly 1.0), for bisect with a uniform
    random number. `shares` has every upstream named by the split (zeros included) with its
    effective share in percent; the shares sum to 100.
    """

    upstreams: tuple[str, ...]
    weights: tuple[float, ...]
    cumulative: tuple[float, ...]
    shares: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, with its match precomputed.

    `host_exact` is the lower-cased host for an exact match, `host_suffix` is ".example.com"
    for `*.example.com`; both None: any host. `prefix` is "" when the route matches every path,
    else the prefix without trailing slash; a path matches when it equals `prefix` or starts
    with `prefix_slash`.
    `upstreams` is every upstream the route can send primary traffic to (split, overrides and
    rollout), in a stable order; the data plane binds metric children for exactly these.
    """

    index: int
    name: str
    host_exact: str | None
    host_suffix: str | None
    prefix: str
    prefix_slash: str
    overrides: tuple[Override, ...]
    split: CompiledSplit
    split_source: str
    sticky: Sticky | None
    mirror: Mirror | None
    retries: int
    rollout: Rollout | None
    upstreams: tuple[str, ...]
    spec: RouteSpec


@dataclass(frozen=True, slots=True)
class Table:
    """The compiled routing table of one config generation."""

    generation: int
    sha256: str
    spec: ConfigSpec
    routes: tuple[CompiledRoute, ...]
    upstreams: Mapping[str, UpstreamSpec]
    header_names: frozenset[str]
    cookie_names: frozenset[str]

    def route(self, name: str) -> CompiledRoute | None:
        """The route called `name`, or None."""
        for route in self.routes:
            if route.name == name:
                return route
        return None


def compile_split(
    names: tuple[str, ...], weights: Mapping[str, float], route_name: str = ""
) -> CompiledSplit:
    """Compile weights over `names` (upstreams missing from `weights` get 0).

    Raises ValueError for a negative or non-finite weight, or when no weight is > 0.
    """
    where = f"route {route_name!r}: " if route_name else ""
    values = [float(weights.get(name, 0.0)) for name in names]
    for name, value in zip(names, values, strict=True):
        # `not value >= 0` also catches NaN; inf would make every share NaN.
        if not value >= 0.0 or value == float("inf"):
            raise ValueError(f"{where}weight of {name!r} must be a finite number >= 0")
    total = sum(values)
    if total <= 0.0:
        raise ValueError(f"{where}at least one weight must be > 0")
    positive = [(name, value) for name, value in zip(names, values, strict=True) if value > 0.0]
    cumulative: list[float] = []
    running = 0.0
    for _, value in positive:
        running += value
        cumulative.append(running / total)
    # Rounding must never leave a gap above the last bound: bisect needs it to be exactly 1.0.
    cumulative[-1] = 1.0
    shares = {name: value * 100.0 / total for name, value in zip(names, values, strict=True)}
    # The largest share absorbs the rounding residue (relatively the least change) so the
    # shares add up to 100.
    largest = max(positive, key=lambda pair: pair[1])[0]
    shares[largest] = 100.0 - sum(share for name, share in shares.items() if name != largest)
    return CompiledSplit(
        upstreams=tuple(name for name, _ in positive),
        weights=tuple(value for _, value in positive),
        cumulative=tuple(cumulative),
        shares=MappingProxyType(shares),
    )


def _split_names(
    route: RouteSpec, weights: Mapping[str, float], upstream_order: tuple[str, ...]
) -> tuple[str, ...]:
    """Upstreams a split names: the file's split first, then the others in config order."""
    file_names = tuple(name for name, _ in route.split)
    extra = tuple(name for name in upstream_order if name in weights and name not in file_names)
    unknown = sorted(set(weights) - set(upstream_order))
    if unknown:
        raise ValueError(f"route {route.name!r}: unknown upstream(s) {', '.join(unknown)}")
    return file_names + extra


def _compile_route(
    index: int,
    route: RouteSpec,
    override: tuple[Mapping[str, float], str] | None,
    upstream_order: tuple[str, ...],
) -> CompiledRoute:
    """Compile one route; `override` is the runtime or rollout split in force, if any."""
    if override is None:
        weights: Mapping[str, float] = dict(route.split)
        source = "file"
    else:
        weights, source = override
        if source not in ("runtime", "rollout"):
            raise ValueError(f"route {route.name!r}: bad split source {source!r}")
    names = _split_names(route, weights, upstream_order)
    split = compile_split(names, weights, route.name)

    # A trailing dot (fully qualified form) is dropped here as normalize_host drops it.
    host = route.match.host.lower().rstrip(".") if route.match.host else None
    host_exact, host_suffix = None, None
    if host is not None and host.startswith("*."):
        host_suffix = host[1:]
    elif host is not None:
        host_exact = host
    prefix = route.match.path_prefix.rstrip("/")

    # Names are lower-cased once here so `decide` can compare without case folding.
    overrides = tuple(
        replace(rule, header=rule.header.lower()) if rule.header is not None else rule
        for rule in route.overrides
    )
    sticky = route.sticky
    if sticky is not None and sticky.header is not None:
        sticky = replace(sticky, header=sticky.header.lower())

    reachable: list[str] = list(names)
    reachable.extend(rule.to for rule in overrides)
    if route.rollout is not None:
        reachable.extend((route.rollout.baseline, route.rollout.canary))
    return CompiledRoute(
        index=index,
        name=route.name,
        host_exact=host_exact,
        host_suffix=host_suffix,
        prefix=prefix,
        prefix_slash=prefix + "/",
        overrides=overrides,
        split=split,
        split_source=source,
        sticky=sticky,
        mirror=route.mirror,
        retries=route.retries,
        rollout=route.rollout,
        upstreams=tuple(dict.fromkeys(reachable)),
        spec=route,
    )


def compile_table(
    spec: ConfigSpec,
    *,
    generation: int,
    sha256: str,
    split_overrides: Mapping[str, tuple[Mapping[str, float], str]] | None = None,
) -> Table:
    """Compile a validated config into the routing table.

    `split_overrides` maps a route name to `(weights, source)`, source "runtime" (a PUT on the
    admin API) or "rollout" (the rollout controller); upstreams left out of those weights get 0.
    Overrides for route names the config does not have are ignored (the route was removed);
    an override that names an unknown upstream, has a negative weight or no weight > 0 raises
    ValueError, and the caller decides whether to drop it or keep the old table.
    """
    overrides = split_overrides or {}
    upstream_order = tuple(upstream.name for upstream in spec.upstreams)
    routes = tuple(
        _compile_route(index, route, overrides.get(route.name), upstream_order)
        for index, route in enumerate(spec.routes)
    )
    header_names: set[str] = set()
    cookie_names: set[str] = set()
    for route in routes:
        for rule in route.overrides:
            if rule.header is not None:
                header_names.add(rule.header)
            if rule.cookie is not None:
                cookie_names.add(rule.cookie)
        if route.sticky is not None:
            if route.sticky.header is not None:
                header_names.add(route.sticky.header)
            if route.sticky.cookie is not None:
                cookie_names.add(route.sticky.cookie)
    return Table(
        generation=generation,
        sha256=sha256,
        spec=spec,
        routes=routes,
        upstreams=MappingProxyType({upstream.name: upstream for upstream in spec.upstreams}),
        header_names=frozenset(header_names),
        cookie_names=frozenset(cookie_names),
    )


@dataclass(frozen=True, slots=True)
class TableDiff:
    """What a reload changed, for the reload path to act on.

    - `upstreams_removed` / `upstreams_added`: by name; removed upstreams are drained whole.
    - `upstreams_changed`: upstreams in both tables whose endpoint set or health check changed;
      `endpoints_removed` / `endpoints_added` give, for each of them, the endpoints that left
      or joined (possibly empty when only the health check changed). Pools of upstreams in
      none of these lists are kept as they are.
    - `routes_removed`: route names the new table no longer has.
    - `routes_split_changed`: routes in both whose `split` in the file changed (weights compared
      by upstream, order ignored): their runtime split is dropped and a running rollout ends.
    - `routes_rollout_changed`: routes in both whose `rollout` settings changed (added and
      removed included): a running rollout ends.
    All tuples follow config order (the old config's for removals, the new one's otherwise).
    """

    upstreams_removed: tuple[str, ...]
    upstreams_added: tuple[str, ...]
    upstreams_changed: tuple[str, ...]
    endpoints_removed: Mapping[str, tuple[Endpoint, ...]]
    endpoints_added: Mapping[str, tuple[Endpoint, ...]]
    routes_removed: tuple[str, ...]
    routes_split_changed: tuple[str, ...]
    routes_rollout_changed: tuple[str, ...]


def diff_tables(old: Table, new: Table) -> TableDiff:
    """Compare two tables' configs; see TableDiff for what each field means."""
    old_upstreams = {upstream.name: upstream for upstream in old.spec.upstreams}
    new_upstreams = {upstream.name: upstream for upstream in new.spec.upstreams}
    changed: list[str] = []
    removed_endpoints: dict[str, tuple[Endpoint, ...]] = {}
    added_endpoints: dict[str, tuple[Endpoint, ...]] = {}
    for name, after in new_upstreams.items():
        before = old_upstreams.get(name)
        if before is None:
            continue
        gone = tuple(ep for ep in before.endpoints if ep not in after.endpoints)
        came = tuple(ep for ep in after.endpoints if ep not in before.endpoints)
        if gone or came or before.health != after.health:
            changed.append(name)
            removed_endpoints[name] = gone
            added_endpoints[name] = came

    old_routes = {route.name: route.spec for route in old.routes}
    new_routes = {route.name: route.spec for route in new.routes}
    split_changed: list[str] = []
    rollout_changed: list[str] = []
    for name, after_route in new_routes.items():
        before_route = old_routes.get(name)
        if before_route is None:
            continue
        if dict(before_route.split) != dict(after_route.split):
            split_changed.append(name)
        if before_route.rollout != after_route.rollout:
            rollout_changed.append(name)
    return TableDiff(
        upstreams_removed=tuple(name for name in old_upstreams if name not in new_upstreams),
        upstreams_added=tuple(name for name in new_upstreams if name not in old_upstreams),
        upstreams_changed=tuple(changed),
        endpoints_removed=MappingProxyType(removed_endpoints),
        endpoints_added=MappingProxyType(added_endpoints),
        routes_removed=tuple(name for name in old_routes if name not in new_routes),
        routes_split_changed=tuple(split_changed),
        routes_rollout_changed=tuple(rollout_changed),
    )
