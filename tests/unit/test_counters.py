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

from proxy.core.config import parse_config
from proxy.core.counters import (
    BUCKET_SLOTS,
    ERROR_KINDS,
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


def tally(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, int]]:
    return st.fixed_dictionaries({key: counts for key in keys})


count_values: st.SearchStrategy[Counts] = st.fixed_dictionaries(
    {"codes": codes, "buckets": buckets}
)  # type: ignore[assignment]
pair_counts: st.SearchStrategy[PairCounts] = st.fixed_dictionaries(
    {"route": names, "upstream": names, "codes": codes, "buckets": buckets}
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
    pair.errors["reset"] = 2
    pair.retries = 1
    mirror = MirrorStats("api", "shadow")
    mirror.outcomes["sent"] = 3
    mirror.body_mismatch = 1
    assert read_pair_snapshot(over_json(pair.snapshot())) == pair.snapshot()
    assert read_mirror_snapshot(over_json(mirror.snapshot())) == mirror.snapshot()
    # What a fleet instance publishes of a pair, and a rollout's mark, are parts of it.
    published = {key: pair.snapshot()[key] for key in ("route", "upstream", "codes", "buckets")}
    assert read_pair_counts(over_json(published)) == published
    mark = {"codes": {"200": 1}, "buckets": [0] * BUCKET_SLOTS}
    assert read_counts(over_json(mark)) == mark


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
            stats.in_flight = 1
    ctx.generation.no_route.observe(404, 0.0001)
    ctx.count_fail_open("blue")
    sent = ctx.stats_snapshot()
    assert sent["generation"] == 3
    assert [(p["route"], p["upstream"], p["count"]) for p in sent["routes"]] == [("api", "blue", 1)]
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
    key = data.draw(st.sampled_from(sorted(built)))
    del built[key]
    with pytest.raises(ValueError, match=f"^{key}: missing$"):
        read(built, "")


def good_worker() -> dict[str, Any]:
    pair = RouteUpstreamStats("api", "blue")
    pair.observe(200, 0.01)
    wire = over_json(
        {
            "generation": 1,
            "pid": 7,
            "routes": [pair.snapshot()],
            "no_route": RouteUpstreamStats("", "").snapshot(),
            "mirror": [MirrorStats("api", "shadow").snapshot()],
            "fail_open": {"blue": 1},
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
