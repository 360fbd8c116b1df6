"""The compiled routing table: one immutable object per config generation.

`compile_table` does, once per reload, every piece of work the hot path would otherwise repeat:
host and prefix matching data, the route index (routes grouped by host and first path segment),
normalised split weights, the header and cookie names that `routing.decide` will read. The data
plane reads `holder.current` once per request and keeps that table for the request's whole life.

The normal form of a request path (`normalize_path`) lives here because prefixes are compiled
into it; `routing` applies it to requests.

Pure core: no asyncio, sockets, os, time or random here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from proxy.core.spec import (
    MAX_WEIGHT,
    ConfigSpec,
    Endpoint,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    UpstreamSpec,
)
from proxy.core.sticky import ChoiceMemo

SPLIT_SOURCES = ("file", "runtime", "fleet", "rollout")


# --- the normal form of a request path --------------------------------------------------------


class PathError(ValueError):
    """A request path that is refused (400); the message says why, without echoing the path."""


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _escape_table() -> Mapping[bytes, bytes]:
    """What each well-formed escape becomes, keyed by its two hex digits in any case.

    An unreserved character (RFC 3986 section 2.3) decodes to itself; any other byte keeps its
    escape with upper-case hex (section 6.2.2.1). `00` is left out: NUL is refused.
    """
    found: dict[bytes, bytes] = {}
    for value in range(1, 256):
        hex_digits = b"%02X" % value
        normal = bytes((value,)) if value in _UNRESERVED else b"%" + hex_digits
        for high in {hex_digits[:1], hex_digits[:1].lower()}:
            for low in {hex_digits[1:], hex_digits[1:].lower()}:
                found[high + low] = normal
    return MappingProxyType(found)


_ESCAPES = _escape_table()


def _normalize_escapes(path: bytes) -> bytes:
    head, *escaped = path.split(b"%")
    parts = [head]
    for part in escaped:
        normal = _ESCAPES.get(part[:2])
        if normal is None:
            if part[:2] == b"00":
                raise PathError("NUL (%00) in the request path")
            raise PathError("malformed percent escape in the request path")
        parts += (normal, part[2:])
    return b"".join(parts)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4 on an absolute path, refusing a `..` with nothing left to remove.

    The RFC would keep such a `..` at the root; refusing it instead means a request never
    names a place above the root, whatever the upstream does with `..`.
    """
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"..":
            if not kept:
                raise PathError("the request path climbs above the root with '..'")
            kept.pop()
        elif segment != b".":
            kept.append(segment)
    if segments[-1] in (b".", b".."):
        # A final dot segment leaves its directory: `/a/b/..` is `/a/`, not `/a`.
        kept.append(b"")
    return b"/" + b"/".join(kept)


def normalize_path(path: bytes) -> bytes:
    """`path` (no query string) in normal form; PathError for a path that must be refused.

    Normal form, as Envoy's `normalize_path`: percent escapes of unreserved characters
    (`A-Z a-z 0-9 - . _ ~`) decoded, every other escape kept with upper-case hex, then dot
    segments removed (RFC 3986 sections 6.2.2.2 and 5.2.4), so `/api/%2e%2e/admin` is `/admin`.
    `%2F` and a backslash stay as they are and are not separators; `//` is kept. Refused: a path
    not starting with `/`, NUL (raw or `%00`), `#`, a `%` not followed by two hex digits, and a
    `..` with no segment left to remove. An unchanged path is returned as the same object.
    """
    if path[:1] != b"/":
        raise PathError("the request path must start with '/'")
    # Membership of an int is a plain byte search; `b"%" in path` costs several times more.
    if 0 in path:
        raise PathError("NUL in the request path")
    if 35 in path:  # '#'
        raise PathError("a fragment ('#') is not allowed in a request target")
    if 37 in path:  # '%'
        path = _normalize_escapes(path)
    if path.find(b"/.") >= 0:
        path = _remove_dot_segments(path)
    return path


def path_from_text(text: str) -> str:
    """A path written as text (a `path_prefix`, `/admin/explain?path=`) as a request carries it.

    A client can only send printable ASCII in a request line, so every other character is
    percent-encoded as UTF-8 first (`/café` is `/caf%C3%A9`); then `normalize_path`. The result
    is ASCII text; PathError as for `normalize_path`.
    """
    encoded = text.encode("utf-8", "surrogatepass")
    if not all(0x21 <= byte <= 0x7E for byte in encoded):
        encoded = b"".join(
            bytes((byte,)) if 0x21 <= byte <= 0x7E else b"%%%02X" % byte for byte in encoded
        )
    return normalize_path(encoded).decode("ascii")


@dataclass(frozen=True, slots=True)
class CompiledSplit:
    """A split ready for choosing.

    `upstreams`/`weights` hold only upstreams with weight > 0, in file order; `cumulative` are
    the running sums divided by the total (last element exactly 1.0), for bisect with a uniform
    random number. `shares` has every upstream named by the split (zeros included) with its
    effective share in percent; the shares sum to 100. `memo` remembers sticky choices.
    """

    upstreams: tuple[str, ...]
    weights: tuple[float, ...]
    cumulative: tuple[float, ...]
    shares: Mapping[str, float]
    memo: ChoiceMemo = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, with its match precomputed.

    `host_exact` is the lower-cased host for an exact match, `host_suffix` is ".example.com"
    for `*.example.com`; both None: any host. `prefix` is "" when the route matches every path,
    else the prefix in the normal form of request paths (`path_from_text`) without trailing
    slash; a path matches when it equals `prefix` or starts with `prefix_slash`.
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


def first_segment(path: str) -> str:
    """The text between the first `/` and the next: "api" for `/api/users` and `/api`.

    Every path a prefix matches has the prefix's first segment (the prefix is the path itself
    or ends where a `/` follows), which is what the route index keys on.
    """
    end = path.find("/", 1)
    return path[1:end] if end > 0 else path[1:]


@dataclass(frozen=True, slots=True)
class PathGroup:
    """The routes of one host condition, looked up by the first segment of the path.

    `by_segment[s]` holds, in config order, the routes whose prefix starts with segment `s`,
    then the group's first catch-all (prefix "/") if any; `other` is that catch-all alone (or
    nothing), for segments no prefix starts with. Routes after the catch-all are left out:
    with the same host condition, any request they match it matches first.

    A group of at most SMALL_GROUP routes has no `by_segment`, and `other` holds them all:
    trying that few prefixes costs less than finding the path's first segment.
    """

    by_segment: Mapping[str, tuple[CompiledRoute, ...]]
    other: tuple[CompiledRoute, ...]


@dataclass(frozen=True, slots=True)
class RouteIndex:
    """The routes grouped by host condition, so a lookup does not walk the whole table.

    `exact` maps a host to its group, `wildcard` maps a suffix (".example.com" for
    `*.example.com`) to its group, `suffix_lengths` are the lengths of those suffixes, longest
    first, and `any_host` is the group of routes without a host. A request can match routes
    from its exact group, from the wildcard group of each suffix of its host that is in
    `wildcard` and shorter than the host, and from `any_host`; the first match in config order
    is the match with the lowest `index` among those groups' first matches. `by_host` says
    whether there is any exact or wildcard group, `segmented` whether any group has a
    `by_segment` (if not, the path's first segment need not be computed).
    """

    exact: Mapping[str, PathGroup]
    wildcard: Mapping[str, PathGroup]
    suffix_lengths: tuple[int, ...]
    any_host: PathGroup | None
    by_host: bool
    segmented: bool


# Measured: one `startswith` costs about half of finding and slicing the first segment.
SMALL_GROUP = 4


def _path_group(routes: list[CompiledRoute]) -> PathGroup:
    """Index routes that share one host condition (given in config order)."""
    tail: tuple[CompiledRoute, ...] = ()
    for position, route in enumerate(routes):
        if not route.prefix:
            routes, tail = routes[:position], (route,)
            break
    if len(routes) + len(tail) <= SMALL_GROUP:
        return PathGroup(by_segment={}, other=(*routes, *tail))
    by_segment: dict[str, list[CompiledRoute]] = {}
    for route in routes:
        by_segment.setdefault(first_segment(route.prefix), []).append(route)
    return PathGroup(
        by_segment={segment: (*found, *tail) for segment, found in by_segment.items()},
        other=tail,
    )


def build_index(routes: tuple[CompiledRoute, ...]) -> RouteIndex:
    """Group `routes` (in config order) by host condition, then by first path segment."""
    exact: dict[str, list[CompiledRoute]] = {}
    wildcard: dict[str, list[CompiledRoute]] = {}
    any_host: list[CompiledRoute] = []
    for route in routes:
        if route.host_exact is not None:
            exact.setdefault(route.host_exact, []).append(route)
        elif route.host_suffix is not None:
            wildcard.setdefault(route.host_suffix, []).append(route)
        else:
            any_host.append(route)
    exact_groups = {host: _path_group(found) for host, found in exact.items()}
    wildcard_groups = {suffix: _path_group(found) for suffix, found in wildcard.items()}
    any_group = _path_group(any_host) if any_host else None
    groups = [*exact_groups.values(), *wildcard_groups.values()]
    if any_group is not None:
        groups.append(any_group)
    return RouteIndex(
        exact=exact_groups,
        wildcard=wildcard_groups,
        suffix_lengths=tuple(sorted({len(suffix) for suffix in wildcard}, reverse=True)),
        any_host=any_group,
        by_host=bool(exact or wildcard),
        segmented=any(group.by_segment for group in groups),
    )


@dataclass(frozen=True, slots=True)
class Table:
    """The compiled routing table of one config generation."""

    generation: int
    sha256: str
    spec: ConfigSpec
    routes: tuple[CompiledRoute, ...]
    index: RouteIndex
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

    Raises ValueError for a weight outside 0..MAX_WEIGHT (the one bound the config, the admin
    API, the state file and the fleet's shared state all meet here), or when no weight is > 0.
    """
    where = f"route {route_name!r}: " if route_name else ""
    values = [float(weights.get(name, 0.0)) for name in names]
    for name, value in zip(names, values, strict=True):
        # `not 0 <= value` also catches NaN; larger weights make sums of weights overflow.
        if not 0.0 <= value <= MAX_WEIGHT:
            raise ValueError(
                f"{where}weight of {name!r} must be a number from 0 to {MAX_WEIGHT:.0f}, "
                f"got {value!r}"
            )
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
    chosen = tuple(name for name, _ in positive)
    chosen_weights = tuple(value for _, value in positive)
    return CompiledSplit(
        upstreams=chosen,
        weights=chosen_weights,
        cumulative=tuple(cumulative),
        shares=MappingProxyType(shares),
        memo=ChoiceMemo(chosen, chosen_weights),
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
        if source not in SPLIT_SOURCES[1:]:
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
    try:
        prefix = path_from_text(route.match.path_prefix).rstrip("/")
    except PathError:
        # Kept as written, it can match no request: requests are refused or normalised first.
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
        index=build_index(routes),
        upstreams=MappingProxyType({upstream.name: upstream for upstream in spec.upstreams}),
        header_names=frozenset(header_names),
        cookie_names=frozenset(cookie_names),
    )


@dataclass(frozen=True, slots=True)
class TableDiff:
    """What a reload changed, for the reload path to act on.

    - `upstreams_removed` / `upstreams_added`: by name; removed upstreams are drained whole.
    - `upstreams_changed`: upstreams in both tables whose endpoint set, health check or
      protocol changed;
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
        if gone or came or before.health != after.health or before.protocol != after.protocol:
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
