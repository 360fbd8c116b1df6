"""/metrics through a real Turnout: counts equal what was sent, with one worker or two; counters
survive a killed worker, also one killed between two scrapes (the supervisor's background poll)
and one killed under load; series of a removed upstream disappear after a reload; gzip for
scrapers that ask for it.

Every request goes on a fresh connection, so with `workers: 2` the kernel spreads them over both
workers (the X-Request-Id prefix says which worker answered).
"""

from __future__ import annotations

import gzip
import os
import signal
import urllib.request
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until
from tests.support.load import BackgroundLoad, Load
from tests.support.rawhttp import get
from tests.support.turnout import TurnoutFactory, TurnoutProcess
from tests.support.upstreams import EchoUpstream

DEADLINE = 15.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proc: TurnoutProcess) -> Samples:
    """Every sample of GET /metrics by (name, labels)."""
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series_with(samples: Samples, label: str, value: str) -> list[str]:
    return sorted({name for name, labels in samples if (label, value) in labels})


def admin(proc: TurnoutProcess, method: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{proc.admin_url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = orjson.loads(response.read())
    assert isinstance(body, dict)
    return body


def send(proc: TurnoutProcess, path: str, count: int, expected: int) -> set[str]:
    """`count` GETs, each on a fresh connection; the worker prefixes of their request ids."""
    workers = set()
    for _ in range(count):
        response = get(proc.port, path)
        assert response.status == expected, response.body
        request_id = response.header("x-request-id")
        assert request_id is not None
        workers.add(request_id[:16])
    return workers


def config(blue: EchoUpstream, green: EchoUpstream, workers: int) -> dict[str, Any]:
    return {
        "workers": workers,
        "drain": {"delay": "0s", "shutdown": "5s"},
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 100, "green": 0},
                "overrides": [{"header": "x-green", "to": "green"}],
            }
        ],
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_request_counts_equal_what_was_sent(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream, workers: int
) -> None:
    proc = turnout_factory(config(blue, green, workers))
    answered = send(proc, "/api/ok", 30, 200)
    answered |= send(proc, "/api/status/500", 10, 500)
    answered |= send(proc, "/elsewhere", 5, 404)
    assert len(answered) == workers

    api = {"route": "api", "upstream": "blue"}
    no_route = {"route": "", "upstream": ""}

    def counted() -> bool:
        samples = scrape(proc)
        return metric(samples, "turnout_request_duration_seconds_count", **api) == 40

    wait_until(counted, timeout=DEADLINE, what="40 requests counted")
    samples = scrape(proc)
    assert metric(samples, "turnout_requests_total", code="200", **api) == 30
    assert metric(samples, "turnout_requests_total", code="500", **api) == 10
    assert metric(samples, "turnout_requests_total", code="404", **no_route) == 5
    assert metric(samples, "turnout_request_duration_seconds_count", **no_route) == 5
    assert metric(samples, "turnout_request_duration_seconds_bucket", le="+Inf", **api) == 40
    # Nothing counted where nothing was sent; the shares come from the table.
    assert series_with(samples, "code", "404") == ["turnout_requests_total"]
    # A pair that saw no request has no series but its split weight (docs/metrics.md)...
    api_green = frozenset({("route", "api"), ("upstream", "green")})
    assert sorted({name for name, labels in samples if api_green <= labels}) == [
        "turnout_split_weight"
    ]
    # ...one that did has them all, at 0 where nothing happened.
    assert metric(samples, "turnout_upstream_errors_total", kind="timeout", **api) == 0
    assert metric(samples, "turnout_retries_total", **api) == 0
    assert metric(samples, "turnout_requests_in_flight", **api) == 0
    assert metric(samples, "turnout_split_weight", **api) == 100
    assert metric(samples, "turnout_split_weight", route="api", upstream="green") == 0
    assert metric(samples, "turnout_config_generation") == 1
    assert metric(samples, "turnout_config_reloads_total", result="success") == 0


def test_killed_worker_does_not_make_counters_go_down(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(config(blue, green, 2))
    assert len(send(proc, "/api/ok", 40, 200)) == 2
    labels = {"route": "api", "upstream": "blue", "code": "200"}
    wait_until(
        lambda: metric(scrape(proc), "turnout_requests_total", **labels) == 40,
        timeout=DEADLINE,
        what="40 requests counted",
    )
    victim = admin(proc, "GET", "/admin/config")["workers"][0]["pid"]

    # A worker that cannot answer within the scrape's deadline counts with its last snapshot.
    os.kill(victim, signal.SIGSTOP)
    assert metric(scrape(proc), "turnout_requests_total", **labels) == 40
    os.kill(victim, signal.SIGKILL)
    # Whether the supervisor has noticed the death yet or not, the count stays.
    assert metric(scrape(proc), "turnout_requests_total", **labels) == 40

    def replaced() -> bool:
        workers = admin(proc, "GET", "/admin/config")["workers"]
        return (
            len(workers) == 2
            and all(w["ready"] for w in workers)
            and victim not in {w["pid"] for w in workers}
        )

    wait_until(replaced, timeout=DEADLINE, what="the killed worker to be replaced")
    assert metric(scrape(proc), "turnout_requests_total", **labels) == 40
    send(proc, "/api/ok", 10, 200)
    wait_until(
        lambda: metric(scrape(proc), "turnout_requests_total", **labels) == 50,
        timeout=DEADLINE,
        what="50 requests counted",
    )


def test_series_of_a_removed_upstream_disappear_after_reload(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    first = config(blue, green, 1)
    proc = turnout_factory(first)
    for _ in range(3):
        assert get(proc.port, "/api/x", [("x-green", "1")]).json()["upstream"] == "green"
    send(proc, "/api/x", 4, 200)
    wait_until(
        lambda: (
            metric(
                scrape(proc), "turnout_requests_total", route="api", upstream="green", code="200"
            )
            == 3
        ),
        timeout=DEADLINE,
        what="green's requests counted",
    )
    samples = scrape(proc)
    assert "turnout_endpoint_healthy" in series_with(samples, "upstream", "green")

    second = dict(first, upstreams={"blue": first["upstreams"]["blue"]})
    second["routes"] = [{"name": "api", "match": {"path_prefix": "/api"}, "split": {"blue": 100}}]
    second.update(listen=proc.config["listen"], admin=proc.config["admin"])
    proc.config_path.write_text(yaml.safe_dump(second, sort_keys=False), encoding="utf-8")
    # The file watch may have reloaded it already; either way generation 2 is in force.
    assert admin(proc, "POST", "/admin/reload")["generation"] == 2
    wait_until(
        lambda: metric(scrape(proc), "turnout_config_generation") == 2,
        timeout=DEADLINE,
        what="every worker at generation 2",
    )
    samples = scrape(proc)
    assert series_with(samples, "upstream", "green") == []
    # What stayed keeps its count across the reload.
    assert metric(samples, "turnout_requests_total", route="api", upstream="blue", code="200") == 4
    assert metric(samples, "turnout_config_reloads_total", result="success") == 1


def test_gzip_when_the_scraper_asks_for_it(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(config(blue, green, 1))
    send(proc, "/api/ok", 3, 200)
    labels = {"route": "api", "upstream": "blue", "code": "200"}
    wait_until(
        lambda: metric(scrape(proc), "turnout_requests_total", **labels) == 3,
        timeout=DEADLINE,
        what="3 requests counted",
    )
    # What Prometheus sends.
    request = urllib.request.Request(
        f"{proc.admin_url}/metrics", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = gzip.decompress(response.read()).decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert metric(samples, "turnout_requests_total", **labels) == 3
    # Without the header (or refused with q=0): plain text.
    for accept in (None, "gzip;q=0, identity"):
        headers = {"Accept-Encoding": accept} if accept else {}
        request = urllib.request.Request(f"{proc.admin_url}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Encoding"] is None
            assert response.read().startswith(b"# HELP ")


def workers_view(proc: TurnoutProcess) -> list[dict[str, Any]]:
    workers = admin(proc, "GET", "/admin/config")["workers"]
    assert isinstance(workers, list)
    return workers


def requests_counted(samples: Samples) -> float:
    return sum(value for (name, _), value in samples.items() if name == "turnout_requests_total")


def wait_replaced(proc: TurnoutProcess, victim: int) -> None:
    def replaced() -> bool:
        workers = workers_view(proc)
        return (
            len(workers) == 2
            and all(w["ready"] for w in workers)
            and victim not in {w["pid"] for w in workers}
        )

    wait_until(replaced, timeout=DEADLINE, what="the killed worker to be replaced")


def test_killed_worker_keeps_what_the_background_poll_saw(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    # No scrape between the requests and the kill: only the supervisor's own poll of the
    # workers' counters (about every second) can have seen them.
    proc = turnout_factory(config(blue, green, 2))
    send(proc, "/api/ok", 40, 200)
    wait_until(
        lambda: sum(w["requests"] or 0 for w in workers_view(proc)) == 40,
        timeout=DEADLINE,
        what="the poll to see the 40 requests",
    )
    victim = max(workers_view(proc), key=lambda w: int(w["requests"]))
    assert victim["requests"] > 0
    os.kill(victim["pid"], signal.SIGKILL)
    wait_replaced(proc, victim["pid"])
    labels = {"route": "api", "upstream": "blue", "code": "200"}
    assert metric(scrape(proc), "turnout_requests_total", **labels) == 40


def test_counters_never_go_down_when_a_worker_is_killed_under_load(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(config(blue, green, 2))
    # Fresh connections, so both workers serve; bounded in count and pace.
    load = Load(
        proc.port,
        clients=4,
        path="/api/ok",
        headers=[("Connection", "close")],
        count=4000,
        pause=0.005,
    )
    with BackgroundLoad(load) as running:
        running.wait_for_more(200)
        wait_until(
            lambda: all(w["requests"] for w in workers_view(proc)),
            timeout=DEADLINE,
            what="both workers polled with requests",
        )
        victim = workers_view(proc)[0]["pid"]
        seen = requests_counted(scrape(proc))
        os.kill(victim, signal.SIGKILL)
        # Whether the supervisor noticed the death yet or not, nothing counted before is lost,
        # and from then on the sum only grows.
        history = [seen]

        def replaced_while_scraping() -> bool:
            history.append(requests_counted(scrape(proc)))
            workers = workers_view(proc)
            return (
                len(workers) == 2
                and all(w["ready"] for w in workers)
                and victim not in {w["pid"] for w in workers}
            )

        wait_until(replaced_while_scraping, timeout=DEADLINE, what="the worker replaced")
        running.wait_for_more(100)
        history.append(requests_counted(scrape(proc)))
        running.stop()
    assert history == sorted(history), history
    assert history[-1] > seen
