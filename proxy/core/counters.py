"""Per-worker request counters, one object per (route, upstream) bound when a table is compiled,
and the typed snapshots that carry them out of the worker.

The data plane increments plain attributes here (no locks, no label lookups per request); the
supervisor asks each worker for a `WorkerSnapshot` over the control channel and aggregates them
for `/metrics` and the rollout controller. In a fleet, every instance publishes the `PairCounts`
its rollouts judge on in Redis (`InstanceCounters`), and the leader sums them all.

A snapshot is JSON on the way (the control channel, Redis), so it is read back, and checked,
exactly once where it enters a process that did not build it: the supervisor reads each worker
message with `read_worker_snapshot`, the fleet reads other instances' counters with
`read_instance_counters`, a rollout's marks in the fleet's document with `read_counts`. Every
reader is pure, returns a fresh typed value (unknown keys dropped) and raises ValueError naming
the field; whatever takes the typed value trusts it. Pure core: no I/O, no clock (durations
come in).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Collection, Mapping
from typing import Final, TypedDict, TypeVar, cast

from proxy.core.grpc import ERROR_CODES, NAMES, UNKNOWN

# Proxy latencies: sub-millisecond to a minute (contract section 7 histogram).
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    # Envoy's and Linkerd's users compare a 0.75 s SLO against this bound.
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

ERROR_KINDS: Final[tuple[str, ...]] = ("connect", "reset", "timeout", "protocol", "tls")
MIRROR_OUTCOMES: Final[tuple[str, ...]] = ("sent", "error", "dropped", "skipped")
# One slot per finite bucket and a final +Inf slot.
BUCKET_SLOTS: Final = len(DURATION_BUCKETS) + 1
# Why the proxy closed a downstream HTTP/2 connection with GOAWAY; any other reason counts as
# "other", so that a typo in the data plane cannot make a new series.
GOAWAY_REASONS: Final[tuple[str, ...]] = (
    "rapid_reset",
    "continuation_flood",
    "header_list_too_large",
    "control_flood",
    "frame_flood",
    "flow_control_stall",
    "protocol_error",
    "drain",
    "other",
)
# gRPC statuses as snapshot keys (JSON keys are text): "0" to "16".
GRPC_STATUS_KEYS: Final = frozenset(str(status) for status in NAMES)

T = TypeVar("T")


# --------------------------------------------------------------------------- snapshot shapes


class Counts(TypedDict):
    """What a rollout judges an upstream on: responses per status code (the code as text, as
    JSON keys are), durations per slot of `DURATION_BUCKETS` plus +Inf (not cumulative), and
    `grpc_errors`: gRPC calls that ended with an error status (`proxy.core.grpc.ERROR_CODES`)
    under an HTTP status below 500 (those of 500 or more are errors in `codes` already, and
    count once). Alone, the shape of a rollout's mark in the fleet's document."""

    codes: dict[str, int]
    buckets: list[int]
    grpc_errors: int


class PairCounts(Counts):
    """`Counts` of one (route, upstream): what a fleet instance publishes per judged pair."""

    route: str
    upstream: str


class PairSnapshot(PairCounts):
    """`RouteUpstreamStats.snapshot()`: every counter of one (route, upstream) in one worker."""

    sum: float
    count: int
    in_flight: int
    errors: dict[str, int]  # one key per ERROR_KINDS
    retries: int
    grpc: dict[str, int]  # gRPC calls by status, the status as text ("0" to "16")


class MirrorSnapshot(TypedDict):
    """`MirrorStats.snapshot()`: one route's shadow traffic in one worker."""

    route: str
    upstream: str
    outcomes: dict[str, int]  # one key per MIRROR_OUTCOMES
    mismatch: int
    body_mismatch: int


class EndpointSnapshot(TypedDict):
    """The state of one endpoint's pool in one worker."""

    upstream: str
    endpoint: str
    healthy: bool
    active_up: bool
    ejected: bool
    in_flight: int


class WorkerSnapshot(TypedDict):
    """`WorkerContext.stats_snapshot()`: one worker's counters, of its current table only.

    `routes` leaves out the pairs that never saw a request (the supervisor counts them as 0);
    `no_route` counts the requests that matched no route.
    """

    generation: int
    pid: int
    routes: list[PairSnapshot]
    no_route: PairSnapshot
    mirror: list[MirrorSnapshot]
    fail_open: dict[str, int]
    h2_goaways: dict[str, int]  # one key per GOAWAY_REASONS
    endpoints: list[EndpointSnapshot]
    connections: int


class InstanceCounters(TypedDict):
    """What a fleet instance publishes in Redis: when (Unix time), and its judged pairs."""

    at: float
    routes: list[PairCounts]


# --------------------------------------------------------------------------- counters


class RouteUpstreamStats:
    """Counters of one (route, upstream) pair in one worker."""

    __slots__ = (
        "buckets",
        "codes",
        "count",
        "errors",
        "errors_5xx",
        "grpc",
        "grpc_errors",
        "in_flight",
        "retries",
        "route",
        "sum",
        "upstream",
    )

    def __init__(self, route: str, upstream: str) -> None:
        self.route = route
        self.upstream = upstream
        self.codes: dict[int, int] = {}
        # One slot per bucket plus +Inf; cumulated only when exported.
        self.buckets = [0] * BUCKET_SLOTS
        self.sum = 0.0
        self.count = 0
        self.in_flight = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.errors_5xx = 0
        # gRPC calls by status; error statuses under an HTTP status below 500 (see `Counts`).
        self.grpc: dict[int, int] = {}
        self.grpc_errors = 0
        self.retries = 0

    def observe(self, code: int, seconds: float) -> None:
        """Count one finished request with its status code and duration."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if code >= 500:
            self.errors_5xx += 1

    def observe_grpc(self, code: int, grpc_status: int, seconds: float) -> None:
        """Count one finished gRPC call: as `observe`, and its gRPC status.

        An error status is an error like a 5xx, counted once when the HTTP status is one too.
        A status outside 0-16 (or none, -1) counts as UNKNOWN: what the client's stub reports,
        and an upstream cannot make label values up.
        """
        self.observe(code, seconds)
        if grpc_status not in NAMES:
            grpc_status = UNKNOWN
        grpc = self.grpc
        grpc[grpc_status] = grpc.get(grpc_status, 0) + 1
        if grpc_status in ERROR_CODES and code < 500:
            self.grpc_errors += 1

    def snapshot(self) -> PairSnapshot:
        """A JSON-able copy for the supervisor."""
        return {
            "route": self.route,
            "upstream": self.upstream,
            "codes": {str(code): n for code, n in self.codes.items()},
            "buckets": list(self.buckets),
            "sum": self.sum,
            "count": self.count,
            "in_flight": self.in_flight,
            "errors": dict(self.errors),
            "retries": self.retries,
            "grpc": {str(status): n for status, n in self.grpc.items()},
            "grpc_errors": self.grpc_errors,
        }


class MirrorStats:
    """Counters of one route's shadow traffic in one worker."""

    __slots__ = ("body_mismatch", "mismatch", "outcomes", "route", "upstream")

    def __init__(self, route: str, upstream: str) -> None:
        self.route = route
        self.upstream = upstream
        self.outcomes = dict.fromkeys(MIRROR_OUTCOMES, 0)
        # Status codes that differ; JSON bodies that differ (beyond ignored fields).
        self.mismatch = 0
        self.body_mismatch = 0

    def snapshot(self) -> MirrorSnapshot:
        """A JSON-able copy for the supervisor."""
        return {
            "route": self.route,
            "upstream": self.upstream,
            "outcomes": dict(self.outcomes),
            "mismatch": self.mismatch,
            "body_mismatch": self.body_mismatch,
        }


# --------------------------------------------------------------------------- readers
#
# One per shape. `where` is the path of the value in the message ("" at the top), so that an
# error names the field: "routes[3].buckets[7]: must be an integer >= 0, got -1". A field's path
# is only written out for the message: a worker's snapshot of a big table holds thousands of
# pairs, read about once a second.

# A check of one field: (value, where, key) -> the value, or ValueError naming `where.key`.
Check = Callable[[object, str, str | int], T]


def read_counts(value: object, where: str = "") -> Counts:
    """`value` as `Counts` (a rollout's mark); ValueError naming the field otherwise."""
    raw = _object(value, where)
    return {
        "codes": _get(raw, "codes", where, _codes),
        "buckets": _get(raw, "buckets", where, _buckets),
        "grpc_errors": _get_count_or_zero(raw, "grpc_errors", where),
    }


def read_pair_counts(value: object, where: str = "") -> PairCounts:
    """`value` as `PairCounts` (one pair another fleet instance published)."""
    raw = _object(value, where)
    return {
        "route": _get(raw, "route", where, _text),
        "upstream": _get(raw, "upstream", where, _text),
        "codes": _get(raw, "codes", where, _codes),
        "buckets": _get(raw, "buckets", where, _buckets),
        "grpc_errors": _get_count_or_zero(raw, "grpc_errors", where),
    }


def read_pair_snapshot(value: object, where: str = "") -> PairSnapshot:
    """`value` as `PairSnapshot` (one pair of a worker's snapshot)."""
    raw = _object(value, where)
    return {
        "route": _get(raw, "route", where, _text),
        "upstream": _get(raw, "upstream", where, _text),
        "codes": _get(raw, "codes", where, _codes),
        "buckets": _get(raw, "buckets", where, _buckets),
        "sum": _get(raw, "sum", where, _seconds),
        "count": _get(raw, "count", where, _count),
        "in_flight": _get(raw, "in_flight", where, _count),
        "errors": _get(raw, "errors", where, _error_counts),
        "retries": _get(raw, "retries", where, _count),
        "grpc": _get(raw, "grpc", where, _grpc_counts),
        "grpc_errors": _get(raw, "grpc_errors", where, _count),
    }


def read_mirror_snapshot(value: object, where: str = "") -> MirrorSnapshot:
    """`value` as `MirrorSnapshot` (one route's shadow traffic in a worker's snapshot)."""
    raw = _object(value, where)
    return {
        "route": _get(raw, "route", where, _text),
        "upstream": _get(raw, "upstream", where, _text),
        "outcomes": _get(raw, "outcomes", where, _outcome_counts),
        "mismatch": _get(raw, "mismatch", where, _count),
        "body_mismatch": _get(raw, "body_mismatch", where, _count),
    }


def read_endpoint_snapshot(value: object, where: str = "") -> EndpointSnapshot:
    """`value` as `EndpointSnapshot` (one endpoint of a worker's snapshot)."""
    raw = _object(value, where)
    return {
        "upstream": _get(raw, "upstream", where, _text),
        "endpoint": _get(raw, "endpoint", where, _text),
        "healthy": _get(raw, "healthy", where, _flag),
        "active_up": _get(raw, "active_up", where, _flag),
        "ejected": _get(raw, "ejected", where, _flag),
        "in_flight": _get(raw, "in_flight", where, _count),
    }


def read_worker_snapshot(value: object, where: str = "") -> WorkerSnapshot:
    """`value` as `WorkerSnapshot` (the `data` of a worker's stats message)."""
    raw = _object(value, where)
    return {
        "generation": _get(raw, "generation", where, _count),
        "pid": _get(raw, "pid", where, _count),
        "routes": _get_each(raw, "routes", where, read_pair_snapshot),
        "no_route": _get(raw, "no_route", where, _pair),
        "mirror": _get_each(raw, "mirror", where, read_mirror_snapshot),
        "fail_open": _get(raw, "fail_open", where, _counts_by_name),
        "h2_goaways": _get(raw, "h2_goaways", where, _goaway_counts),
        "endpoints": _get_each(raw, "endpoints", where, read_endpoint_snapshot),
        "connections": _get(raw, "connections", where, _count),
    }


def read_instance_counters(value: object, where: str = "") -> InstanceCounters:
    """`value` as `InstanceCounters` (what another fleet instance published in Redis)."""
    raw = _object(value, where)
    return {
        "at": _get(raw, "at", where, _seconds),
        "routes": _get_each(raw, "routes", where, read_pair_counts),
    }


def _at(where: str, key: str | int) -> str:
    """The path of `key` in the value at `where`: "routes[3]", "routes[3].count", "pid"."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _show(value: object) -> str:
    """`value` for an error message: its repr, cut short (a message may hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _get(raw: Mapping[str, object], key: str, where: str, check: Check[T]) -> T:
    """`raw[key]`, checked by `check`."""
    try:
        value = raw[key]
    except KeyError:
        raise ValueError(f"{_at(where, key)}: missing") from None
    return check(value, where, key)


def _get_count_or_zero(raw: Mapping[str, object], key: str, where: str) -> int:
    """`raw[key]`, a count, or 0 when absent: a field that older instances do not publish."""
    return _count(raw[key], where, key) if key in raw else 0


def _get_each(
    raw: Mapping[str, object], key: str, where: str, read: Callable[[object, str], T]
) -> list[T]:
    """`raw[key]`, an array, with every item read by `read` (as `where.key[index]`)."""
    items = _get(raw, key, where, _array)
    path = _at(where, key)
    return [read(item, f"{path}[{index}]") for index, item in enumerate(items)]


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where or 'value'}: must be an object, got {_show(value)}")
    return value


def _pair(value: object, where: str, key: str | int) -> PairSnapshot:
    return read_pair_snapshot(value, _at(where, key))


def _array(value: object, where: str, key: str | int) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"{_at(where, key)}: must be an array, got {_show(value)}")
    return value


def _text(value: object, where: str, key: str | int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_at(where, key)}: must be a string, got {_show(value)}")
    return value


def _flag(value: object, where: str, key: str | int) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_at(where, key)}: must be true or false, got {_show(value)}")
    return value


def _count(value: object, where: str, key: str | int) -> int:
    # type() rather than isinstance: JSON's true and false are not counts.
    if type(value) is not int or value < 0:
        raise ValueError(f"{_at(where, key)}: must be an integer >= 0, got {_show(value)}")
    return value


def _all_counts(values: Collection[object]) -> bool:
    """Whether every one of `values` is an integer >= 0 (in C loops: buckets are many)."""
    return not values or (
        set(map(type, values)) == {int} and min(cast(Collection[int], values)) >= 0
    )


def _seconds(value: object, where: str, key: str | int) -> float:
    if type(value) is float:
        seconds = value
    elif type(value) is int:
        seconds = float(value)
    else:
        raise ValueError(f"{_at(where, key)}: must be a number >= 0, got {_show(value)}")
    if not (seconds >= 0.0 and math.isfinite(seconds)):
        raise ValueError(f"{_at(where, key)}: must be a finite number >= 0, got {_show(value)}")
    return seconds


def _buckets(value: object, where: str, key: str | int) -> list[int]:
    if not isinstance(value, list) or len(value) != BUCKET_SLOTS:
        raise ValueError(
            f"{_at(where, key)}: must be an array of {BUCKET_SLOTS} counts, got {_show(value)}"
        )
    if not _all_counts(value):
        path = _at(where, key)
        for index, count in enumerate(value):
            _count(count, path, index)
    return list(value)


def _is_code(key: object) -> bool:
    """The text of a status code as str(int) writes it: "200", not "0200", "2e2" or " 200"."""
    return (
        isinstance(key, str)
        and len(key) == 3
        and "1" <= key[0] <= "9"
        and key.isascii()
        and key.isdigit()
    )


def _codes(value: object, where: str, key: str | int) -> dict[str, int]:
    """Counts by status code."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{_at(where, key)}: must be an object, got {_show(value)}")
    codes = dict(value)
    if not (all(map(_is_code, codes)) and _all_counts(codes.values())):
        path = _at(where, key)
        for code, count in codes.items():
            if not _is_code(code):
                raise ValueError(f"{path}: {_show(code)} is not a status code")
            _count(count, path, code)
    return codes


def _grpc_counts(value: object, where: str, key: str | int) -> dict[str, int]:
    """Counts by gRPC status ("0" to "16")."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{_at(where, key)}: must be an object, got {_show(value)}")
    counts = dict(value)
    path = _at(where, key)
    for status, count in counts.items():
        if status not in GRPC_STATUS_KEYS:
            raise ValueError(f"{path}: {_show(status)} is not a gRPC status")
        _count(count, path, status)
    return counts


def _tally(value: object, keys: tuple[str, ...], where: str, key: str | int) -> dict[str, int]:
    """A count for each of `keys`, all required (other keys are dropped)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{_at(where, key)}: must be an object, got {_show(value)}")
    try:
        tally = {name: value[name] for name in keys}
    except KeyError:
        tally = {}
    if len(tally) != len(keys) or not _all_counts(tally.values()):
        path = _at(where, key)
        return {name: _get(value, name, path, _count) for name in keys}
    return tally


def _error_counts(value: object, where: str, key: str | int) -> dict[str, int]:
    return _tally(value, ERROR_KINDS, where, key)


def _outcome_counts(value: object, where: str, key: str | int) -> dict[str, int]:
    return _tally(value, MIRROR_OUTCOMES, where, key)


def _goaway_counts(value: object, where: str, key: str | int) -> dict[str, int]:
    return _tally(value, GOAWAY_REASONS, where, key)


def _counts_by_name(value: object, where: str, key: str | int) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{_at(where, key)}: must be an object, got {_show(value)}")
    path = _at(where, key)
    return {_text(name, where, key): _count(count, path, name) for name, count in value.items()}
