"""Where a request goes: route matching, the decision, endpoint choice, and its explanation.

`decide` is the one function that chooses the upstream of a request (contract section 2). The
data plane, `/admin/explain` and the tests all call it, so they can never disagree. It reads only
what `table.compile_table` precomputed and a small `RequestView`; randomness and fresh sticky ids
come in as arguments, so the same inputs always give the same decision.

Hot path: no regex, no parsing beyond the few cookies the table asked for, no walks over data
the table could have precomputed. Pure core: no asyncio, sockets, os, time or random here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from proxy.core.spec import Override
from proxy.core.sticky import key_unit
from proxy.core.table import (
    CompiledRoute,
    PathError,
    PathGroup,
    RouteIndex,
    Table,
    normalize_path,
    path_from_text,
)

REASONS: Final = ("override", "sticky", "weight", "rollout", "no_route")

# What `explain` passes as the freshly minted sticky id: nothing random leaks into its answer.
NEW_ID_PLACEHOLDER: Final = "<new-id>"


class RequestView:
    """The few facts about a request that routing reads.

    `host` is normalised (see normalize_host), `path` has no query string, `headers` holds only
    the lower-cased names in `table.header_names` (first occurrence), `cookies` only the names
    in `table.cookie_names`. Build one with `make_view`, or directly in tests.
    """

    __slots__ = ("cookies", "headers", "host", "method", "path")

    def __init__(
        self,
        method: str,
        host: str,
        path: str,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
    ) -> None:
        self.method = method
        self.host = host
        self.path = path
        self.headers: dict[str, str] = headers if headers is not None else {}
        self.cookies: dict[str, str] = cookies if cookies is not None else {}

    def __repr__(self) -> str:
        return (
            f"RequestView({self.method!r}, {self.host!r}, {self.path!r}, "
            f"headers={self.headers!r}, cookies={self.cookies!r})"
        )


class Decision:
    """Where one request goes and why.

    `reason` is one of "override", "sticky", "weight", "rollout", or "no_route" (then route and
    upstream are None). `sticky_key` is the route's sticky key when the request carried one (or
    the minted one), whatever decided the upstream. `set_cookie` is a freshly minted id the
    response must set in the sticky cookie. `mirror` is None (no mirror, or not sampled),
    "send" (sampled, method allowed) or "skip" (sampled, method not allowed: counted skipped).
    """

    # A plain class rather than a NamedTuple: compiled, one is made natively on every request.
    __slots__ = ("mirror", "reason", "route", "set_cookie", "sticky_key", "upstream")

    def __init__(
        self,
        route: CompiledRoute | None,
        upstream: str | None,
        reason: str,
        sticky_key: str | None,
        set_cookie: str | None,
        mirror: str | None,
    ) -> None:
        self.route = route
        self.upstream = upstream
        self.reason = reason
        self.sticky_key = sticky_key
        self.set_cookie = set_cookie
        self.mirror = mirror

    def _fields(self) -> tuple[object, ...]:
        return (
            self.route,
            self.upstream,
            self.reason,
            self.sticky_key,
            self.set_cookie,
            self.mirror,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"Decision({', '.join(map(repr, self._fields()))})"


_NO_ROUTE: Final = Decision(None, None, "no_route", None, None, None)


def normalize_host(raw: str) -> str:
    """Lower-case, drop the port and a trailing dot; `[::1]:8080` becomes `::1`.

    A bare IPv6 address (several colons, no brackets) is kept whole rather than cut at its last
    colon.
    """
    host = raw.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host[1:]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def normalize_target(target: bytes) -> bytes:
    """An origin-form request target (`/path?query`) with its path in normal form.

    The path is normalised by `table.normalize_path` (dot segments removed, unreserved escapes
    decoded, other escapes upper-cased); the query is passed on byte for byte. Raises
    PathError (a ValueError; the message is fit for a 400 answer) for NUL anywhere in the
    target, a `#` anywhere, or a path that `normalize_path` refuses. An unchanged target is
    returned as the same object. `target` must start with `/` (the asterisk and absolute forms
    are split up before).
    """
    # The usual target has no '%' (37), '#' (35), NUL or "/." (only looked for after a '.'
    # (46), as file names have dots): a few byte searches, no copy. Membership of an int is a
    # plain byte search; `b"%" in target` costs several times more (buffer protocol).
    if 37 in target or 35 in target or 0 in target or (46 in target and target.find(b"/.") >= 0):
        return _normalize_target(target)
    return target


def _normalize_target(target: bytes) -> bytes:
    if 35 in target:
        raise PathError("a fragment ('#') is not allowed in a request target")
    if 0 in target:
        raise PathError("NUL in the request target")
    query = target.find(b"?")
    if query < 0:
        return normalize_path(target)
    path = target[:query]
    normal = normalize_path(path)
    return target if normal is path else normal + target[query:]


def parse_cookies(values: Iterable[str], wanted: frozenset[str]) -> dict[str, str]:
    """The wanted cookies from `Cookie` header values (`a=1; b=2`).

    Names are case-sensitive (RFC 6265); the first occurrence of a name wins; a value in double
    quotes loses them. Pairs without `=` are ignored.
    """
    found: dict[str, str] = {}
    if not wanted:
        return found
    for header in values:
        for pair in header.split(";"):
            name, eq, value = pair.partition("=")
            if not eq:
                continue
            name = name.strip()
            if name in wanted and name not in found:
                value = value.strip()
                if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                    value = value[1:-1]
                found[name] = value
    return found


def make_view(
    table: Table,
    method: str,
    raw_host: str,
    target: str,
    headers: Iterable[tuple[str, str]],
) -> RequestView:
    """Build the view of a request from its head, keeping only what `table` needs.

    `target` is the request target as text (the query string is cut off; the path is put in
    the normal form the data plane routes on, see `table.path_from_text`, PathError if it is
    refused); `headers` are (name, value) pairs in any case, in order.
    """
    wanted = table.header_names
    picked: dict[str, str] = {}
    cookie_values: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower == "cookie":
            cookie_values.append(value)
        if lower in wanted and lower not in picked:
            picked[lower] = value
    cookies = parse_cookies(cookie_values, table.cookie_names) if cookie_values else {}
    path = path_from_text(target.partition("?")[0])
    return RequestView(method, normalize_host(raw_host), path, picked, cookies)


def _first_in_group(
    group: PathGroup, segment: str, path: str, best: CompiledRoute | None
) -> CompiledRoute | None:
    """The first route of `group` matching `path` if it comes before `best`, else `best`."""
    for route in group.by_segment.get(segment, group.other):
        if best is not None and route.index > best.index:
            break
        prefix = route.prefix
        if not prefix or path == prefix or path.startswith(route.prefix_slash):
            return route
    return best


def _match_by_host(index: RouteIndex, host: str, segment: str, path: str) -> CompiledRoute | None:
    """The first route of the request's exact-host and wildcard groups, or None."""
    best: CompiledRoute | None = None
    group = index.exact.get(host)
    if group is not None:
        best = _first_in_group(group, segment, path, None)
    size = len(host)
    for length in index.suffix_lengths:
        # A `*.` suffix of this length matches when the host is longer and ends with it.
        if size > length:
            group = index.wildcard.get(host[-length:])
            if group is not None:
                best = _first_in_group(group, segment, path, best)
    return best


def match_route(table: Table, host: str, path: str) -> CompiledRoute | None:
    """The first route, in table order, whose host and path prefix both match.

    Host: exact, or `*.example.com` for any deeper name (`x.example.com`, `a.b.example.com`,
    not `example.com`). Path: whole segments, so `/api` matches `/api`, `/api/`, `/api/x`, not
    `/apix`. `host` must already be normalised, `path` in normal form (`normalize_target`).
    The route index (table.RouteIndex) gives only the routes of the request's host groups and
    first path segment, so the cost does not grow with the number of routes.
    """
    index = table.index
    if index.segmented:
        # table.first_segment, inlined: this runs for every request.
        end = path.find("/", 1)
        segment = path[1:end] if end > 0 else path[1:]
    else:
        # Only small groups (see table.PathGroup): any key finds their routes in `other`.
        segment = ""
    best = _match_by_host(index, host, segment, path) if index.by_host else None
    group = index.any_host
    if group is None:
        return best
    # _first_in_group, inlined for the group every table without hosts has alone.
    for route in group.by_segment.get(segment, group.other):
        if best is not None and route.index > best.index:
            break
        prefix = route.prefix
        if not prefix or path == prefix or path.startswith(route.prefix_slash):
            return route
    return best


def _override_index(overrides: tuple[Override, ...], view: RequestView) -> int:
    """Index of the first override that matches `view`, or -1."""
    for index, rule in enumerate(overrides):
        if rule.header is not None:
            value = view.headers.get(rule.header)
        elif rule.cookie is not None:
            value = view.cookies.get(rule.cookie)
        else:
            continue
        if value is not None and (rule.value is None or value == rule.value):
            return index
    return -1


def decide(
    table: Table,
    view: RequestView,
    rand: float,
    mirror_rand: float,
    mint: Callable[[], str],
) -> Decision:
    """Choose the route and upstream of a request (contract section 2).

    Overrides first, in order; then the split: by sticky key when the request has one (an
    empty value counts as none), by a freshly minted key with a `set: true` sticky cookie, else
    by `rand` in [0, 1) over the weights. On a route whose split the rollout controller sets,
    a split choice has reason "rollout". `mirror_rand` in [0, 1) samples the mirror when no
    sticky key is known; with a key, the key decides, so a user's session is mirrored whole or
    not at all. `mint` is called only when a new sticky id is needed.
    """
    route = match_route(table, view.host, view.path)
    if route is None:
        return _NO_ROUTE

    sticky = route.sticky
    key: str | None = None
    if sticky is not None:
        if sticky.header is not None:
            key = view.headers.get(sticky.header) or None
        elif sticky.cookie is not None:
            key = view.cookies.get(sticky.cookie) or None

    set_cookie: str | None = None
    index = _override_index(route.overrides, view) if route.overrides else -1
    if index >= 0:
        upstream = route.overrides[index].to
        reason = "override"
    else:
        split = route.split
        if key is None and sticky is not None and sticky.set and sticky.cookie is not None:
            key = set_cookie = mint()
        if key is None:
            # hi=len-1 keeps a stray rand >= 1.0 on the last upstream instead of out of range.
            upstreams = split.upstreams
            upstream = upstreams[bisect_right(split.cumulative, rand, 0, len(upstreams) - 1)]
            reason = "weight"
        else:
            upstream = split.upstreams[0] if len(split.upstreams) == 1 else split.memo.choose(key)
            reason = "sticky"
        if route.split_source == "rollout":
            reason = "rollout"

    mirror = route.mirror
    if mirror is None:
        return Decision(route, upstream, reason, key, set_cookie, None)
    percent = mirror.percent
    if percent >= 100.0:
        sampled = True
    elif percent <= 0.0:
        sampled = False
    elif key is not None:
        sampled = key_unit(key, "mirror:" + route.name) * 100.0 < percent
    else:
        sampled = mirror_rand * 100.0 < percent
    outcome: str | None = None
    if sampled:
        methods = mirror.methods
        outcome = "send" if methods is None or view.method in methods else "skip"
    return Decision(route, upstream, reason, key, set_cookie, outcome)


def pick_endpoint(
    in_flight: Sequence[int], healthy: Sequence[bool], rand: float
) -> tuple[int, bool]:
    """Index of the endpoint to use, and whether the choice failed open.

    Among the healthy endpoints, the one with the fewest requests in flight; `rand` in [0, 1)
    picks uniformly among those tied. With no healthy endpoint every endpoint is eligible by
    the same rule and the second value is True (the caller counts it). Raises ValueError when
    there is no endpoint at all (the caller answers 503 before asking).
    """
    count = len(in_flight)
    if count == 0:
        raise ValueError("no endpoints")
    if count == 1:
        return 0, not healthy[0]
    failed_open = not any(healthy)
    fewest = 0
    ties = 0
    for i in range(count):
        if failed_open or healthy[i]:
            load = in_flight[i]
            if ties == 0 or load < fewest:
                fewest = load
                ties = 1
            elif load == fewest:
                ties += 1
    nth = min(int(rand * ties), ties - 1)
    for i in range(count):
        if (failed_open or healthy[i]) and in_flight[i] == fewest:
            if nth == 0:
                return i, failed_open
            nth -= 1
    raise AssertionError("unreachable: a tied endpoint was counted above")


def _rule(rule: Override) -> dict[str, object]:
    """An override as JSON."""
    found: dict[str, object] = {"to": rule.to}
    if rule.header is not None:
        found["header"] = rule.header
    if rule.cookie is not None:
        found["cookie"] = rule.cookie
    found["value"] = rule.value
    return found


def explain(table: Table, view: RequestView) -> dict[str, object]:
    """Which route and upstream `view` gets now, and why, as JSON-able data.

    It calls `decide` with fixed numbers and a placeholder id, so nothing random leaks. When the
    upstream is drawn per request (no sticky key, or a fresh id would be minted) and the split
    has more than one upstream, `upstream` is null, `random` is true and `split` gives each
    upstream's chance in percent. `mirror.sampled` is true or false when the sticky key decides
    it, null when it is drawn per request at `percent`.
    """
    decision = decide(table, view, 0.5, 0.0, lambda: NEW_ID_PLACEHOLDER)
    route = decision.route
    answer: dict[str, object] = {
        "generation": table.generation,
        "route": None,
        "upstream": None,
        "reason": decision.reason,
        "random": False,
        "sticky_key": None,
        "set_cookie": False,
        "override": None,
        "split": None,
        "split_source": None,
        "mirror": None,
    }
    if route is None:
        return answer
    random_choice = decision.reason != "override" and (
        decision.sticky_key is None or decision.set_cookie is not None
    )
    random_choice = random_choice and len(route.split.upstreams) > 1
    answer.update(
        route=route.name,
        upstream=None if random_choice else decision.upstream,
        random=random_choice,
        sticky_key=decision.sticky_key,
        set_cookie=decision.set_cookie is not None,
        split=dict(route.split.shares),
        split_source=route.split_source,
    )
    if decision.reason == "override":
        index = _override_index(route.overrides, view)
        answer["override"] = {"index": index, **_rule(route.overrides[index])}
    mirror = route.mirror
    if mirror is not None:
        keyed = decision.sticky_key is not None and decision.set_cookie is None
        sampled: bool | None = decision.mirror is not None if keyed else None
        if mirror.percent >= 100.0 or mirror.percent <= 0.0:
            sampled = mirror.percent >= 100.0
        answer["mirror"] = {
            "to": mirror.to,
            "percent": mirror.percent,
            "method_allowed": mirror.methods is None or view.method in mirror.methods,
            "sampled": sampled,
        }
    return answer
