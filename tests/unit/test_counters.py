"""The typed stats snapshots and their readers (proxy.core.counters).

A snapshot crosses JSON (the worker's control channel, a fleet's Redis) and is read back once,
where it arrives: what a worker (or the stats classes) builds reads back as the same value, and
anything else is refused with a ValueError that names the field.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core import grpc
from proxy.core.config import parse_config
from proxy.core.counters import (
    BUCKET_SLOTS,
    ERROR_KINDS,
    GOAWAY_REASONS,
    MIRROR_OUTCOMES,
    Counts,
    EndpointSnapshot,
    InstanceCounters,
    MirrorSnapshot,
    MirrorStats,
    PairCounts,
    PairSnapshot,
    RouteUpstreamStats,
    WorkerSnapshot,
    read_counts,
    read_endpoint_snapshot,
    read_instance_counters,
    read_mirror_snapshot,
    read_pair_counts,
    read_pair_snapshot,
    read_worker_snapshot,
)
from proxy.core.rollout import CounterSnapshot, window_between
from proxy.core.table import compile_table
from proxy.dataplane.worker import WorkerContext

# ---------------------------------------------------------------------- valid snapshots

names = st.text(max_size=12)
# Keys of a JSON object (fail_open's upstreams): plain, so that a path names one field only.
keys = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
counts = st.integers(min_value=0, max_value=2**63 - 1)
seconds = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
codes = st.dictionaries(st.integers(min_value=100, max_value=999).map(str), counts, max_size=4)
buckets = st.lists(counts, min_size=BUCKET_SLOTS, max_size=BUCKET_SLOTS)
grpc_statuses = st.dictionaries(st.integers(min_value=0, max_value=16).map(str), counts, max_size=4)


def tally(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, int]]:
    return st.fixed_dictionaries({key: counts for key in keys})


count_values: st.SearchStrategy[Counts] = st.fixed_dictionaries(
    {"codes": codes, "buckets": buckets, "grpc_errors": counts}
)  # type: ignore[assignment]
pair_counts: st.SearchStrategy[PairCounts] = st.fixed_dictionaries(
    {
        "route": names,
        "upstream": names,
        "codes": codes,
        "buckets": buckets,
        "grpc_errors": counts,
    }
)  # type: ignore[assignment]
pairs: st.SearchStrategy[PairSnapshot] = st.fixed_dictionaries(
    {
        "route": names,
        "upstream": names,
        "codes": codes,
        "buckets": buckets,
        "sum": seconds,
        "count": counts,
        "in_flight": counts,
        "errors": tally(ERROR_KINDS),
        "retries": counts,
        "grpc": grpc_statuses,
        "grpc_errors": counts,
    }
)  # type: ignore[assignment]
mirrors: st.SearchStrategy[MirrorSnapshot] = st.fixed_dictionaries(
    {
        "route": names,
        "upstream": names,
        "outcomes": tally(MIRROR_OUTCOMES),
        "mismatch": counts,
        "body_mismatch": counts,
    }
)  # type: ignore[assignment]
endpoints: st.SearchStrategy[EndpointSnapshot] = st.fixed_dictionaries(
    {
        "upstream": names,
        "endpoint": names,
        "healthy": st.booleans(),
        "active_up": st.booleans(),
        "ejected": st.booleans(),
        "in_flight": counts,
    }
)  # type: ignore[assignment]
workers: st.SearchStrategy[WorkerSnapshot] = st.fixed_dictionaries(
    {
        "generation": counts,
        "pid": counts,
        "routes": st.lists(pairs, max_size=3),
        "no_route": pairs,
        "mirror": st.lists(mirrors, max_size=2),
        "fail_open": st.dictionaries(keys, counts, max_size=3),
        "h2_goaways": tally(GOAWAY_REASONS),
        "endpoints": st.lists(endpoints, max_size=3),
        "connections": counts,
    }
)  # type: ignore[assignment]
instances: st.SearchStrategy[InstanceCounters] = st.fixed_dictionaries(
    {"at": seconds, "routes": st.lists(pair_counts, max_size=3)}
)  # type: ignore[assignment]

Reader = Callable[[object, str], object]
SHAPES: list[tuple[Reader, st.SearchStrategy[Any]]] = [
    (read_counts, count_values),
    (read_pair_counts, pair_counts),
    (read_pair_snapshot, pairs),
    (read_mirror_snapshot, mirrors),
    (read_endpoint_snapshot, endpoints),
    (read_worker_snapshot, workers),
    (read_instance_counters, instances),
]


def over_json(value: object) -> object:
    """`value` as the other end of the channel (or Redis) gets it."""
    return orjson.loads(orjson.dumps(value))


# ---------------------------------------------------------------------- what reads back


@pytest.mark.parametrize(("read", "shape"), SHAPES, ids=lambda x: getattr(x, "__name__", ""))
@given(data=st.data())
def test_every_snapshot_reads_back_as_it_was_built(
    read: Reader, shape: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    built = data.draw(shape)
    assert read(over_json(built), "") == built


def test_the_stats_classes_build_readable_snapshots() -> None:
    pair = RouteUpstreamStats("api", "blue")
    pair.observe(200, 0.002)
    pair.observe(503, 75.0)
    pair.observe_grpc(200, 14, 0.01)
    pair.errors["reset"] = 2
    pair.retries = 1
    mirror = MirrorStats("api", "shadow")
    mirror.outcomes["sent"] = 3
    mirror.body_mismatch = 1
    assert read_pair_snapshot(over_json(pair.snapshot())) == pair.snapshot()
    assert read_mirror_snapshot(over_json(mirror.snapshot())) == mirror.snapshot()
    # What a fleet instance publishes of a pair, and a rollout's mark, are parts of it.
    sent = pair.snapshot()
    published = {
        "route": sent["route"],
        "upstream": sent["upstream"],
        "codes": sent["codes"],
        "buckets": sent["buckets"],
        "grpc_errors": sent["grpc_errors"],
    }
    assert read_pair_counts(over_json(published)) == published
    mark = {"codes": {"200": 1}, "buckets": [0] * BUCKET_SLOTS, "grpc_errors": 1}
    assert read_counts(over_json(mark)) == mark


def test_counts_published_before_grpc_read_with_no_grpc_errors() -> None:
    """Marks and fleet counters written by a Turnout without gRPC lack `grpc_errors`."""
    old = {"codes": {"200": 3}, "buckets": [0] * BUCKET_SLOTS}
    assert read_counts(old) == {**old, "grpc_errors": 0}
    assert read_pair_counts({"route": "a", "upstream": "b", **old})["grpc_errors"] == 0
    with pytest.raises(ValueError, match=r"^mark\.grpc_errors: must be an integer >= 0"):
        read_counts({**old, "grpc_errors": -1}, "mark")


# One finished request: its HTTP status, and its gRPC status (None: not a gRPC call). gRPC
# statuses reach beyond 0-16 and below -1 (none): a hostile upstream sends anything.
results = st.lists(
    st.tuples(
        st.integers(min_value=100, max_value=599),
        st.none() | st.integers(min_value=-3, max_value=20) | st.integers(-(2**31), 2**31),
    ),
    max_size=60,
)


def is_error(code: int, grpc_status: int | None) -> bool:
    """What the contract calls an error: a 5xx, or a gRPC error status (one outside 0-16 is
    UNKNOWN, an error)."""
    if code >= 500:
        return True
    if grpc_status is None:
        return False
    return grpc_status in grpc.ERROR_CODES or grpc_status not in grpc.NAMES


def counted(served: list[tuple[int, int | None]]) -> RouteUpstreamStats:
    pair = RouteUpstreamStats("api", "blue")
    for index, (code, grpc_status) in enumerate(served):
        seconds = index / 1000
        if grpc_status is None:
            pair.observe(code, seconds)
        else:
            pair.observe_grpc(code, grpc_status, seconds)
    return pair


@given(served=results)
def test_a_grpc_error_counts_once_like_a_5xx(served: list[tuple[int, int | None]]) -> None:
    pair = counted(served)
    snapshot = read_pair_snapshot(over_json(pair.snapshot()))
    errors = sum(n for code, n in snapshot["codes"].items() if int(code) >= 500)
    assert errors + snapshot["grpc_errors"] == sum(is_error(*result) for result in served)
    calls = [status for _, status in served if status is not None]
    assert snapshot["count"] == len(served)
    assert sum(snapshot["grpc"].values()) == len(calls)
    # Bounded labels: only 0-16, anything else counted as UNKNOWN.
    assert set(snapshot["grpc"]) <= {str(status) for status in grpc.NAMES}
    unknown = sum(status == grpc.UNKNOWN or status not in grpc.NAMES for status in calls)
    assert snapshot["grpc"].get(str(grpc.UNKNOWN), 0) == unknown
    # And the rollout's evidence, from the snapshot as the supervisor reads it, agrees.
    window = window_between(CounterSnapshot(), CounterSnapshot.from_stats([snapshot]))
    assert (window.requests, window.errors) == (len(served), errors + snapshot["grpc_errors"])


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (200, grpc.OK, False),
        (200, grpc.NOT_FOUND, False),
        (200, grpc.CANCELLED, False),
        (200, grpc.INTERNAL, True),
        (200, grpc.UNAVAILABLE, True),
        (200, -1, True),
        (200, 99, True),
        (503, grpc.UNAVAILABLE, True),
        (503, grpc.OK, True),
        (404, grpc.UNIMPLEMENTED, True),
    ],
)
def test_one_grpc_call(code: int, status: int, error: bool) -> None:
    pair = counted([(code, status)])
    assert pair.codes == {code: 1}
    assert pair.grpc == {status if status in grpc.NAMES else grpc.UNKNOWN: 1}
    assert pair.errors_5xx + pair.grpc_errors == int(error)


CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  shadow: {endpoints: ["127.0.0.1:9301"]}
routes:
  - name: api
    split: {blue: 1}
    mirror: {to: shadow}
"""


async def test_a_workers_snapshot_reads_back_as_it_was_sent() -> None:
    ctx = WorkerContext(asyncio.get_running_loop(), 0, access_log=False)
    ctx.apply(compile_table(parse_config(CONFIG, "t.yaml"), generation=3, sha256="x"))
    for per_route in ctx.generation.stats:
        for stats in per_route.values():
            stats.observe(200, 0.01)
            stats.observe_grpc(200, 13, 0.01)
            stats.in_flight = 1
    ctx.generation.no_route.observe(404, 0.0001)
    ctx.count_fail_open("blue")
    ctx.stats.count_h2_goaway("rapid_reset")
    ctx.stats.count_h2_goaway("made-up")
    sent = ctx.stats_snapshot()
    assert sent["generation"] == 3
    assert sent["h2_goaways"] == {**dict.fromkeys(GOAWAY_REASONS, 0), "rapid_reset": 1, "other": 1}
    assert [(p["route"], p["upstream"], p["count"]) for p in sent["routes"]] == [("api", "blue", 2)]
    assert (sent["routes"][0]["grpc"], sent["routes"][0]["grpc_errors"]) == ({"13": 1}, 1)
    assert len(sent["endpoints"]) == 3
    assert read_worker_snapshot(over_json(sent)) == sent


def test_unknown_keys_are_dropped_and_integral_seconds_are_floats() -> None:
    pair = RouteUpstreamStats("api", "blue").snapshot()
    wire = {**over_json(pair), "sum": 3, "added_later": [1, 2]}  # type: ignore[dict-item]
    got = read_pair_snapshot(wire)
    assert "added_later" not in got
    assert got["sum"] == 3.0
    assert type(got["sum"]) is float


# ---------------------------------------------------------------------- what is refused


def leaves(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    """(path as the readers name it, value) of every scalar in `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def replaced(value: object, path: str, new: object) -> object:
    """A copy of `value` with the scalar at `path` (one of `leaves`) replaced by `new`."""
    if isinstance(value, dict):
        return {
            key: new
            if (at := f"{key}") == path
            else replaced(item, path.removeprefix(f"{at}").removeprefix("."), new)
            if path.startswith(f"{at}.") or path.startswith(f"{at}[")
            else item
            for key, item in value.items()
        }
    assert isinstance(value, list)
    out = []
    for index, item in enumerate(value):
        at = f"[{index}]"
        if path == at:
            out.append(new)
        elif path.startswith(f"{at}.") or path.startswith(f"{at}["):
            out.append(replaced(item, path.removeprefix(at).removeprefix("."), new))
        else:
            out.append(item)
    return out


def wrong_for(leaf: object) -> list[object]:
    """Values that no field holding `leaf` accepts."""
    if isinstance(leaf, bool):
        return [None, 1, "true"]
    if isinstance(leaf, int | float):
        return [None, True, -1, "1", math.inf, [leaf]]
    return [None, 5, [leaf]]


@pytest.mark.parametrize(("read", "shape"), SHAPES, ids=lambda x: getattr(x, "__name__", ""))
@given(data=st.data())
def test_a_bad_field_is_refused_by_name(
    read: Reader, shape: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    built = over_json(data.draw(shape))
    found = list(leaves(built))
    if not found:
        return
    path, leaf = data.draw(st.sampled_from(found))
    bad = data.draw(st.sampled_from(wrong_for(leaf)))
    if isinstance(leaf, float) and type(bad) is int and bad >= 0:
        return  # an integral number of seconds is fine
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: "):
        read(replaced(built, path, bad), "")


@pytest.mark.parametrize(("read", "shape"), SHAPES, ids=lambda x: getattr(x, "__name__", ""))
@given(data=st.data())
def test_a_missing_field_is_refused_by_name(
    read: Reader, shape: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    built = over_json(data.draw(shape))
    assert isinstance(built, dict)
    # What older fleet instances publish lacks grpc_errors: it reads as 0 (test above).
    optional = {"grpc_errors"} if read in (read_counts, read_pair_counts) else set()
    key = data.draw(st.sampled_from(sorted(built.keys() - optional)))
    del built[key]
    with pytest.raises(ValueError, match=f"^{key}: missing$"):
        read(built, "")


def good_worker() -> dict[str, Any]:
    pair = RouteUpstreamStats("api", "blue")
    pair.observe(200, 0.01)
    pair.observe_grpc(200, 0, 0.01)
    wire = over_json(
        {
            "generation": 1,
            "pid": 7,
            "routes": [pair.snapshot()],
            "no_route": RouteUpstreamStats("", "").snapshot(),
            "mirror": [MirrorStats("api", "shadow").snapshot()],
            "fail_open": {"blue": 1},
            "h2_goaways": dict.fromkeys(GOAWAY_REASONS, 0),
            "endpoints": [
                {
                    "upstream": "blue",
                    "endpoint": "127.0.0.1:9001",
                    "healthy": True,
                    "active_up": True,
                    "ejected": False,
                    "in_flight": 0,
                }
            ],
            "connections": 2,
        }
    )
    assert isinstance(wire, dict)
    return wire


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.clear(), "generation: missing"),
        (lambda w: w.update(routes={}), "routes: must be an array, got {}"),
        (lambda w: w["routes"].append(None), "routes[1]: must be an object, got None"),
        (lambda w: w["routes"][0].update(buckets=[0] * 3), "routes[0].buckets: must be an array"),
        (lambda w: w["routes"][0]["codes"].update({"0200": 1}), "routes[0].codes: '0200' is not"),
        (lambda w: w["routes"][0]["codes"].update({"99": 1}), "routes[0].codes: '99' is not"),
        (lambda w: w["routes"][0]["codes"].update({"1000": 1}), "routes[0].codes: '1000' is not"),
        (lambda w: w["routes"][0]["codes"].update({"2e2": 1}), "routes[0].codes: '2e2' is not"),
        (lambda w: w["routes"][0]["codes"].update({"200": 1.0}), "routes[0].codes.200: must be"),
        (lambda w: w["routes"][0]["errors"].pop("tls"), "routes[0].errors.tls: missing"),
        (lambda w: w["routes"][0]["grpc"].update({"17": 1}), "routes[0].grpc: '17' is not a gRPC"),
        (lambda w: w["routes"][0]["grpc"].update({"-1": 1}), "routes[0].grpc: '-1' is not a gRPC"),
        (lambda w: w["routes"][0]["grpc"].update({"OK": 1}), "routes[0].grpc: 'OK' is not a gRPC"),
        (lambda w: w["routes"][0]["grpc"].update({"14": -2}), "routes[0].grpc.14: must be an"),
        (lambda w: w["routes"][0].update(grpc=[]), "routes[0].grpc: must be an object"),
        (lambda w: w["routes"][0].pop("grpc_errors"), "routes[0].grpc_errors: missing"),
        (lambda w: w["h2_goaways"].pop("drain"), "h2_goaways.drain: missing"),
        (lambda w: w["h2_goaways"].update(drain=True), "h2_goaways.drain: must be an integer"),
        (lambda w: w["no_route"].update(sum=math.nan), "no_route.sum: must be a finite number"),
        (lambda w: w["no_route"].update(sum=-0.5), "no_route.sum: must be a finite number"),
        (lambda w: w["mirror"][0]["outcomes"].pop("sent"), "mirror[0].outcomes.sent: missing"),
        (lambda w: w.update(fail_open=[]), "fail_open: must be an object"),
        (lambda w: w["fail_open"].update(blue=-1), "fail_open.blue: must be an integer >= 0"),
        (lambda w: w["endpoints"][0].update(ejected=0), "endpoints[0].ejected: must be true or"),
        (lambda w: w.update(connections=False), "connections: must be an integer >= 0, got False"),
    ],
)
def test_a_malformed_worker_snapshot_is_refused(
    change: Callable[[dict[str, Any]], object], message: str
) -> None:
    wire = good_worker()
    change(wire)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        read_worker_snapshot(wire)


@pytest.mark.parametrize("value", [None, [], "snapshot", 3])
def test_a_snapshot_that_is_not_an_object_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"^value: must be an object"):
        read_worker_snapshot(value)
    with pytest.raises(ValueError, match=r"^counters: must be an object"):
        read_instance_counters(value, "counters")


def test_long_values_are_cut_short_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^buckets: must be an array") as caught:
        read_counts({"codes": {}, "buckets": list(range(1000))})
    assert len(str(caught.value)) < 200
    assert str(caught.value).endswith("...")


def test_instance_counters_name_the_pair() -> None:
    published = {"at": 1.5, "routes": [{"route": "api", "upstream": "b", "codes": {}}]}
    with pytest.raises(ValueError, match=r"^routes\[0\]\.buckets: missing$"):
        read_instance_counters(published)
    assert read_instance_counters({"at": 2, "routes": []}) == {"at": 2.0, "routes": []}
