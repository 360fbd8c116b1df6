"""Rendering /metrics from synthetic worker snapshots (proxy.control.metrics): sums, cumulation,
retired
workers, series of the table in force only (and of its pairs that saw a request), the exact text
format; the supervisor's own series (build info, config load time, process_*); and when /metrics
is gzipped (proxy.control.admin)."""

from __future__ import annotations

import os
import time
from importlib import metadata

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from proxy.control.admin import accepts_gzip
from proxy.control.dashboard import stats_answer
from proxy.control.metrics import LE_LABELS, MetricsInput, Totals, render
from proxy.core.config import parse_config
from proxy.core.counters import (
    DURATION_BUCKETS,
    ERROR_KINDS,
    GOAWAY_REASONS,
    MirrorStats,
    RouteUpstreamStats,
    WorkerSnapshot,
    read_worker_snapshot,
)
from proxy.core.table import Table, compile_table
from proxy.dataplane.stats import WorkerStats
from proxy.runtime.build import data_plane_build

CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  green: {endpoints: ["127.0.0.1:9101"]}
  shadow: {endpoints: ["127.0.0.1:9301"]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {blue: 75, green: 25}
    mirror: {to: shadow}
  - name: web
    split: {blue: 1}
"""

# The same file without green: a reload that removes an upstream.
WITHOUT_GREEN = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  shadow: {endpoints: ["127.0.0.1:9301"]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {blue: 100}
    mirror: {to: shadow}
  - name: web
    split: {blue: 1}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def table(text: str = CONFIG, generation: int = 1) -> Table:
    return compile_table(parse_config(text, "turnout.yaml"), generation=generation, sha256="x")


def worker_snapshot(
    served: list[tuple[str, str, int, float]],
    *,
    in_flight: dict[tuple[str, str], int] | None = None,
    mirror: dict[str, int] | None = None,
    fail_open: dict[str, int] | None = None,
    ejected: tuple[str, str] | None = None,
    calls: list[tuple[str, str, int, int]] | None = None,
    goaways: list[str] | None = None,
) -> WorkerSnapshot:
    """A `stats_snapshot()` as a worker sends it, counted by the real stats classes, and as
    the supervisor reads it back from the channel (JSON, then `read_worker_snapshot`)."""
    pairs: dict[tuple[str, str], RouteUpstreamStats] = {}
    no_route = RouteUpstreamStats("", "")
    for route, upstream, code, seconds in served:
        stats = (
            no_route
            if route == ""
            else pairs.setdefault((route, upstream), RouteUpstreamStats(route, upstream))
        )
        stats.observe(code, seconds)
    # gRPC calls: (route, upstream, HTTP status, grpc-status).
    for route, upstream, code, status in calls or []:
        stats = (
            no_route
            if route == ""
            else pairs.setdefault((route, upstream), RouteUpstreamStats(route, upstream))
        )
        stats.observe_grpc(code, status, 0.001)
    worker = WorkerStats()
    for reason in goaways or []:
        worker.count_h2_goaway(reason)
    for key, count in (in_flight or {}).items():
        pairs.setdefault(key, RouteUpstreamStats(*key)).in_flight = count
    shadow = MirrorStats("api", "shadow")
    for outcome, count in (mirror or {}).items():
        if outcome == "mismatch":
            shadow.mismatch = count
        else:
            shadow.outcomes[outcome] = count
    sent: WorkerSnapshot = {
        "generation": 1,
        "pid": 1,
        "routes": [stats.snapshot() for stats in pairs.values()],
        "no_route": no_route.snapshot(),
        "mirror": [shadow.snapshot()],
        "fail_open": dict(fail_open or {}),
        "h2_goaways": worker.h2_goaways,
        "endpoints": [
            {
                "upstream": ejected[0],
                "endpoint": ejected[1],
                "healthy": False,
                "active_up": True,
                "ejected": True,
                "in_flight": 0,
            }
        ]
        if ejected
        else [],
        "connections": 0,
    }
    return read_worker_snapshot(orjson.loads(orjson.dumps(sent)))


def scrape(
    view_table: Table,
    live: list[WorkerSnapshot],
    retired: Totals | None = None,
    *,
    down: frozenset[tuple[str, str]] = frozenset(),
    config_loaded_at: float | None = None,
) -> tuple[Samples, dict[str, str], str]:
    totals = Totals()
    for snapshot in live:
        totals.add_snapshot(snapshot)
    if retired is not None:
        totals.add(retired)
    text = render(
        MetricsInput(
            table=view_table,
            totals=totals,
            down=down,
            reloads={"success": 2, "failure": 1},
            generation=view_table.generation,
            config_loaded_at=config_loaded_at,
        )
    ).decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples, types, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_counters_sum_over_workers() -> None:
    one = worker_snapshot([("api", "blue", 200, 0.002)] * 3 + [("api", "blue", 500, 0.2)])
    two = worker_snapshot([("api", "blue", 200, 0.03)] * 2 + [("api", "green", 200, 0.001)])
    samples, types, _ = scrape(table(), [one, two])
    assert types["turnout_requests"] == "counter"
    assert value(samples, "turnout_requests_total", route="api", upstream="blue", code="200") == 5
    assert value(samples, "turnout_requests_total", route="api", upstream="blue", code="500") == 1
    assert value(samples, "turnout_requests_total", route="api", upstream="green", code="200") == 1
    # No invented codes.
    assert (
        "turnout_requests_total",
        frozenset({("route", "api"), ("upstream", "green"), ("code", "500")}),
    ) not in samples


def test_histogram_is_cumulated_with_sum_and_count() -> None:
    durations = [0.00005, 0.0001, 0.0003, 0.004, 0.004, 2.0, 100.0]
    one = worker_snapshot([("api", "blue", 200, s) for s in durations[:4]])
    two = worker_snapshot([("api", "blue", 200, s) for s in durations[4:]])
    samples, types, _ = scrape(table(), [one, two])
    assert types["turnout_request_duration_seconds"] == "histogram"
    labels = {"route": "api", "upstream": "blue"}
    for le, bound in zip(LE_LABELS, (*DURATION_BUCKETS, float("inf")), strict=True):
        expected = sum(1 for s in durations if s <= bound)
        assert value(samples, "turnout_request_duration_seconds_bucket", le=le, **labels) == (
            expected
        ), le
    assert value(samples, "turnout_request_duration_seconds_count", **labels) == len(durations)
    assert value(samples, "turnout_request_duration_seconds_sum", **labels) == pytest.approx(
        sum(durations)
    )
    # A bound is inclusive (le): 0.0001 falls in the first bucket.
    assert value(samples, "turnout_request_duration_seconds_bucket", le="0.0001", **labels) == 2


def test_no_route_series_has_empty_labels() -> None:
    samples, _, _ = scrape(table(), [worker_snapshot([("", "", 404, 0.0001)] * 5)])
    assert value(samples, "turnout_requests_total", route="", upstream="", code="404") == 5
    assert value(samples, "turnout_request_duration_seconds_count", route="", upstream="") == 5


def test_a_pair_has_series_from_its_first_request_on() -> None:
    samples, _, text = scrape(table(), [worker_snapshot([("api", "blue", 200, 0.002)])])
    # The pair that saw a request has every series, at 0 where nothing happened...
    labels = {"route": "api", "upstream": "blue"}
    assert value(samples, "turnout_requests_in_flight", **labels) == 0
    assert value(samples, "turnout_retries_total", **labels) == 0
    assert value(samples, "turnout_request_duration_seconds_count", **labels) == 1
    for kind in ERROR_KINDS:
        assert value(samples, "turnout_upstream_errors_total", kind=kind, **labels) == 0
    # ...the others only their split weight (and no unrouted series without a 404).
    for route, upstream in [("api", "green"), ("web", "blue"), ("", "")]:
        pair = frozenset({("route", route), ("upstream", upstream)})
        names = sorted({name for name, labels in samples if pair <= labels})
        assert names == ([] if route == "" else ["turnout_split_weight"]), (route, names)
    # Every family is still declared, with or without samples.
    assert "# TYPE turnout_retries_total counter\n" in text


def test_a_request_in_flight_or_a_failed_attempt_is_enough_for_series() -> None:
    busy = worker_snapshot([], in_flight={("api", "green"): 1})
    attempt = RouteUpstreamStats("web", "blue")
    attempt.errors["reset"] = 1
    failed = worker_snapshot([])
    failed["routes"].append(attempt.snapshot())
    samples, _, _ = scrape(table(), [busy, failed])
    assert value(samples, "turnout_requests_in_flight", route="api", upstream="green") == 1
    assert (
        value(samples, "turnout_upstream_errors_total", route="web", upstream="blue", kind="reset")
        == 1
    )
    assert (
        value(samples, "turnout_request_duration_seconds_count", route="web", upstream="blue") == 0
    )


def test_text_is_prometheus_clients_format_line_for_line() -> None:
    # The renderer writes the text itself; these are the lines prometheus_client used to write.
    snapshot = worker_snapshot([("api", "blue", 200, 0.002)] * 3, fail_open={"blue": 1_234_567})
    _, _, text = scrape(table(), [snapshot])
    lines = text.splitlines()
    for line in [
        "# HELP turnout_requests_total Requests answered, by route, upstream and status code "
        '(route="" upstream="" for requests that matched no route).',
        "# TYPE turnout_requests_total counter",
        'turnout_requests_total{code="200",route="api",upstream="blue"} 3.0',
        "# TYPE turnout_request_duration_seconds histogram",
        'turnout_request_duration_seconds_bucket{le="0.001",route="api",upstream="blue"} 0.0',
        'turnout_request_duration_seconds_bucket{le="0.0025",route="api",upstream="blue"} 3.0',
        'turnout_request_duration_seconds_bucket{le="+Inf",route="api",upstream="blue"} 3.0',
        'turnout_request_duration_seconds_count{route="api",upstream="blue"} 3.0',
        'turnout_request_duration_seconds_sum{route="api",upstream="blue"} 0.006',
        'turnout_split_weight{route="api",upstream="blue"} 75.0',
        'turnout_endpoint_healthy{endpoint="127.0.0.1:9001",upstream="blue"} 1.0',
        # Go's float format, as Prometheus writes it: an exponent from a million up.
        'turnout_endpoint_fail_open_total{upstream="blue"} 1.234567e+06',
        "turnout_config_generation 1.0",
    ]:
        assert line in lines, line
    # Buckets, then count, then sum, per pair; families never interleave.
    bucket = lines.index(
        'turnout_request_duration_seconds_bucket{le="+Inf",route="api",upstream="blue"} 3.0'
    )
    assert lines[bucket + 1].startswith("turnout_request_duration_seconds_count{")
    assert lines[bucket + 2].startswith("turnout_request_duration_seconds_sum{")
    names = [line.split(" ")[2] for line in lines if line.startswith("# TYPE ")]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("GZIP;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("", False),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=0", False),
        ("gzip;q=0.000, *", False),
        ("*;q=0", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_accept_encoding(header: str, gzip: bool) -> None:
    assert accepts_gzip(header) is gzip


def test_retired_worker_keeps_counters_but_not_gauges() -> None:
    dead = worker_snapshot(
        [("api", "blue", 200, 0.01)] * 4,
        in_flight={("api", "blue"): 3},
        fail_open={"blue": 2},
        ejected=("blue", "127.0.0.1:9001"),
    )
    retired = Totals()
    retired.add_snapshot(dead, gauges=False)
    live = worker_snapshot([("api", "blue", 200, 0.01)], in_flight={("api", "blue"): 1})
    samples, _, _ = scrape(table(), [live], retired)
    labels = {"route": "api", "upstream": "blue"}
    assert value(samples, "turnout_requests_total", code="200", **labels) == 5
    assert value(samples, "turnout_request_duration_seconds_count", **labels) == 5
    assert value(samples, "turnout_endpoint_fail_open_total", upstream="blue") == 2
    # A dead worker has nothing in flight and ejects nothing.
    assert value(samples, "turnout_requests_in_flight", **labels) == 1
    assert (
        value(samples, "turnout_endpoint_ejected", upstream="blue", endpoint="127.0.0.1:9001") == 0
    )


def test_series_of_a_removed_upstream_disappear_also_from_retired() -> None:
    snapshot = worker_snapshot([("api", "green", 200, 0.01), ("api", "blue", 200, 0.01)])
    retired = Totals()
    retired.add_snapshot(snapshot, gauges=False)
    samples, _, text = scrape(table(), [snapshot], retired)
    assert value(samples, "turnout_requests_total", route="api", upstream="green", code="200") == 2
    assert 'upstream="green"' in text

    after = table(WITHOUT_GREEN, generation=2)
    retired.prune(after)
    assert ("api", "green") not in retired.pairs
    # A worker still on the old table reports green once more: not rendered either.
    samples, _, text = scrape(after, [snapshot], retired)
    assert 'upstream="green"' not in text
    assert value(samples, "turnout_requests_total", route="api", upstream="blue", code="200") == 2


def test_split_weight_sums_to_100_per_route() -> None:
    samples, types, _ = scrape(table(), [])
    assert types["turnout_split_weight"] == "gauge"
    assert value(samples, "turnout_split_weight", route="api", upstream="blue") == 75
    assert value(samples, "turnout_split_weight", route="api", upstream="green") == 25
    assert value(samples, "turnout_split_weight", route="web", upstream="blue") == 100


def test_endpoint_health_and_ejection() -> None:
    ejected = worker_snapshot([], ejected=("blue", "127.0.0.1:9002"))
    samples, _, _ = scrape(
        table(), [worker_snapshot([]), ejected], down=frozenset({("blue", "127.0.0.1:9001")})
    )
    healthy = {
        (u, e): value(samples, "turnout_endpoint_healthy", upstream=u, endpoint=e)
        for u, e in [
            ("blue", "127.0.0.1:9001"),
            ("blue", "127.0.0.1:9002"),
            ("green", "127.0.0.1:9101"),
        ]
    }
    assert healthy == {
        ("blue", "127.0.0.1:9001"): 0,
        ("blue", "127.0.0.1:9002"): 1,
        ("green", "127.0.0.1:9101"): 1,
    }
    assert (
        value(samples, "turnout_endpoint_ejected", upstream="blue", endpoint="127.0.0.1:9002") == 1
    )
    assert (
        value(samples, "turnout_endpoint_ejected", upstream="blue", endpoint="127.0.0.1:9001") == 0
    )


def test_mirror_series() -> None:
    one = worker_snapshot([], mirror={"sent": 3, "error": 1, "mismatch": 2})
    two = worker_snapshot([], mirror={"sent": 1, "dropped": 4, "skipped": 5})
    samples, _, text = scrape(table(), [one, two])
    labels = {"route": "api", "upstream": "shadow"}
    outcomes = {
        outcome: value(samples, "turnout_mirror_requests_total", outcome=outcome, **labels)
        for outcome in ("sent", "error", "dropped", "skipped")
    }
    assert outcomes == {"sent": 4, "error": 1, "dropped": 4, "skipped": 5}
    assert value(samples, "turnout_mirror_status_mismatch_total", **labels) == 2
    assert value(samples, "turnout_mirror_body_mismatch_total", **labels) == 0
    # The route without a mirror has no mirror series; mirror copies are not requests.
    assert 'turnout_mirror_requests_total{outcome="sent",route="web"' not in text
    assert (
        "turnout_requests_total",
        frozenset({("route", "api"), ("upstream", "shadow"), ("code", "200")}),
    ) not in samples


def test_config_metrics() -> None:
    samples, types, _ = scrape(table(generation=7), [])
    assert types["turnout_config_generation"] == "gauge"
    assert value(samples, "turnout_config_generation") == 7
    assert value(samples, "turnout_config_reloads_total", result="success") == 2
    assert value(samples, "turnout_config_reloads_total", result="failure") == 1


def test_annotation_outcomes_are_counted_by_result() -> None:
    text = render(
        MetricsInput(
            table=table(),
            totals=Totals(),
            down=frozenset(),
            reloads={},
            generation=1,
            annotations={"sent": 7, "failed": 2},
        )
    ).decode()
    (family,) = [
        family
        for family in text_string_to_metric_families(text)
        if family.name == "turnout_annotations"
    ]
    assert family.type == "counter"
    # Every result from 0, so that an alert on `failed` has a series before the first failure.
    assert {sample.labels["result"]: sample.value for sample in family.samples} == {
        "sent": 7,
        "failed": 2,
        "dropped": 0,
    }


def test_config_load_time_is_rendered_when_known() -> None:
    loaded_at = 1_777_629_660.25
    samples, types, text = scrape(table(), [], config_loaded_at=loaded_at)
    name = "turnout_config_last_reload_success_timestamp_seconds"
    assert types[name] == "gauge"
    assert value(samples, name) == loaded_at
    # Go's float format, every digit kept: Grafana shows it as a date.
    assert f"{name} 1.77762966025e+09\n" in text
    # A caller that does not know it gets the family, without a sample.
    samples, _, text = scrape(table(), [])
    assert (name, frozenset()) not in samples
    assert f"# TYPE {name} gauge\n" in text


def test_build_info_carries_the_installed_version_and_build() -> None:
    samples, types, _ = scrape(table(), [])
    assert types["turnout_build_info"] == "gauge"
    build = data_plane_build()
    assert value(samples, "turnout_build_info", version=metadata.version("turnout"), build=build)
    assert [labels for name, labels in samples if name == "turnout_build_info"] == [
        frozenset({("version", metadata.version("turnout")), ("build", build)})
    ]


def test_the_build_is_the_kind_of_module_the_data_plane_imported() -> None:
    import proxy.dataplane.http1 as http1

    compiled = not http1.__file__.endswith(".py")
    assert data_plane_build() == ("compiled" if compiled else "pure")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc on this system")
def test_process_families_are_the_standard_collectors() -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    standard = generate_latest(registry).decode().splitlines()
    samples, types, text = scrape(table(), [])
    lines = text.splitlines()
    # The same HELP and TYPE lines, in the same order, and a sample for every family.
    assert [line for line in lines if line.startswith("# ") and " process_" in line] == [
        line for line in standard if line.startswith("#")
    ]
    assert {line.split(" ")[0] for line in lines if line.startswith("process_")} == {
        line.split(" ")[0] for line in standard if not line.startswith("#")
    }
    assert types["process_cpu_seconds"] == "counter"
    # Values of this very process: it started before now, holds memory and files.
    assert 0 < value(samples, "process_start_time_seconds") <= time.time()
    assert value(samples, "process_resident_memory_bytes") > 0
    assert 0 < value(samples, "process_open_fds") <= value(samples, "process_max_fds")


def test_grpc_responses_by_status_name() -> None:
    one = worker_snapshot(
        [],
        calls=[("api", "blue", 200, 0)] * 3 + [("api", "blue", 200, 14), ("api", "blue", 200, 99)],
    )
    two = worker_snapshot(
        [("api", "blue", 500, 0.01)],
        calls=[("api", "blue", 503, 14), ("api", "green", 200, 5), ("", "", 200, 12)],
    )
    samples, types, text = scrape(table(), [one, two])
    assert types["turnout_grpc_responses"] == "counter"
    grpc = {
        (dict(labels)["route"], dict(labels)["upstream"], dict(labels)["grpc_status"]): count
        for (name, labels), count in samples.items()
        if name == "turnout_grpc_responses_total"
    }
    assert grpc == {
        ("api", "blue", "OK"): 3,
        ("api", "blue", "UNAVAILABLE"): 2,
        ("api", "blue", "UNKNOWN"): 1,  # grpc-status 99 from a hostile upstream
        ("api", "green", "NOT_FOUND"): 1,
        ("", "", "UNIMPLEMENTED"): 1,
    }
    # Each call is a request too, with its HTTP status.
    assert value(samples, "turnout_requests_total", route="api", upstream="blue", code="200") == 5
    assert value(samples, "turnout_requests_total", route="api", upstream="blue", code="503") == 1
    assert (
        'turnout_grpc_responses_total{grpc_status="UNAVAILABLE",route="api",upstream="blue"} 2.0'
        in text.splitlines()
    )


def test_grpc_errors_are_counted_once_in_the_totals() -> None:
    """The admin views and the dashboard count a pair's errors as a rollout does."""
    snapshot = worker_snapshot(
        [("api", "blue", 200, 0.01), ("api", "blue", 502, 0.01)],
        calls=[
            ("api", "blue", 200, 13),  # INTERNAL: an error
            ("api", "blue", 503, 14),  # 503 and UNAVAILABLE: one error
            ("api", "blue", 200, 5),  # NOT_FOUND: the caller's
            ("api", "blue", 200, 0),
        ],
    )
    totals = Totals()
    totals.add_snapshot(snapshot)
    retired = Totals()
    retired.add_snapshot(snapshot, gauges=False)
    totals.add(retired)
    pair = totals.pairs[("api", "blue")]
    assert (pair.count, pair.error_responses, pair.grpc_errors) == (12, 6, 2)
    # GET /admin/stats, what the dashboard's error share is computed from.
    answer = stats_answer(table(), totals, 1.0, 2.0)
    (api,) = [route for route in answer["routes"] if route["name"] == "api"]
    blue = {u["name"]: u for u in api["upstreams"]}["blue"]
    assert (blue["requests"], blue["errors_5xx"], blue["errors"]) == (12, 4, 6)


def test_goaways_by_reason_from_every_worker_and_the_retired() -> None:
    one = worker_snapshot([], goaways=["rapid_reset", "drain", "drain"])
    two = worker_snapshot([], goaways=["rapid_reset", "no such reason"])
    retired = Totals()
    retired.add_snapshot(worker_snapshot([], goaways=["control_flood"]), gauges=False)
    samples, types, _ = scrape(table(), [one, two], retired)
    assert types["turnout_http2_goaways"] == "counter"
    got = {
        dict(labels)["reason"]: count
        for (name, labels), count in samples.items()
        if name == "turnout_http2_goaways_total"
    }
    # Every reason is there, from 0; an unknown one is "other".
    assert got == {
        **dict.fromkeys(GOAWAY_REASONS, 0.0),
        "rapid_reset": 2,
        "drain": 2,
        "other": 1,
        "control_flood": 1,
    }
