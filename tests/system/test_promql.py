"""Every PromQL expression Turnout ships, evaluated by a real Prometheus scraping a real Turnout.

The expressions are read from the files themselves: every `expr` and variable query of the Grafana
dashboard (deploy/grafana/turnout.json), every Flagger MetricTemplate query (deploy/flagger/) and
every Argo Rollouts AnalysisTemplate query (deploy/argo/). Template variables get concrete values
(the dashboard's twice: one route and both versions, then "All"); a variable nobody gave a value
is a failure, so a new one cannot slip through unevaluated.

The setup: Turnout (one worker) routes `api` 50/50 between two echo upstreams, blue and green,
mirrors it to a third (shadow), and runs a rollout on it (green the canary). Bounded background
traffic: plain requests, 30 ms slow ones, 500s from blue only (pinned by header), and requests
pinned to green, so green always has traffic and never a 5xx. Prometheus (the `prometheus`
binary; Debian's package) scrapes Turnout's /metrics every second, on loopback ports, with its
storage in tmp_path and nothing remote. Each query must answer without error or warning and
return at least one sample with a finite value, within a deadline (series need two scrapes
before rate() has a value).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support import wait_until
from tests.support.load import BackgroundLoad, Load
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, start_turnout
from tests.support.upstreams import EchoUpstream, UpstreamHost

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "turnout.json"
FLAGGER = PROJECT_ROOT / "deploy" / "flagger"
ARGO = PROJECT_ROOT / "deploy" / "argo"
METRICS_DOC = PROJECT_ROOT / "docs" / "metrics.md"

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not on PATH (Debian: apt-get install prometheus)",
)

JOB = "turnout"
READY_DEADLINE = 30.0  # Prometheus up and scraping Turnout
DATA_DEADLINE = 45.0  # every query of a set returns data
HTTP_TIMEOUT = 5.0
LOAD_COUNT = 6000  # the most requests one background client sends, whatever the tests do

# Grafana's variables: one route and both versions (a multi-value selection is a regex), then
# what "All" sends. $__rate_interval is at least 4 scrape intervals in Grafana.
GRAFANA_CHOSEN = {"job": JOB, "route": "api", "upstream": "blue|green"}
GRAFANA_ALL = {"job": ".+", "route": ".+", "upstream": ".+"}
GRAFANA_BUILTINS = {"__rate_interval": "10s", "__range": "1m", "__interval": "5s"}
# Flagger: the Canary's analysis interval and templateVariables; Argo: the Rollout's args.
FLAGGER_VALUES = {"interval": "1m", "variables.route": "api", "variables.canary": "green"}
ARGO_ARGS = {"route": "api", "canary": "green"}

CORE_PANELS = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "text", "state-timeline"}


# -- the expressions, read from the files -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One expression to evaluate: where it comes from and its text, variables substituted."""

    source: str
    expr: str


def _substitute(text: str, pattern: str, values: Mapping[str, str], source: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise AssertionError(f"{source}: no test value for the variable {match.group(0)!r}")
        return values[name]

    return re.sub(pattern, value, text)


def grafana_text(text: str, variables: Mapping[str, str], source: str) -> str:
    """`text` with Grafana's $name and ${name} replaced."""
    values = {**GRAFANA_BUILTINS, **variables}
    return _substitute(text, r"\$(?:\{(\w+)\}|(\w+))", values, source)


def load_dashboard() -> dict[str, Any]:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    assert isinstance(dashboard, dict)
    return dashboard


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every `expr` anywhere in the dashboard: panels, rows, annotations."""
    found: list[tuple[str, str]] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            name = node.get("title") or node.get("name")
            here = f"{where} / {name}" if isinstance(name, str) else where
            if "expr" in node:
                found.append((f"{here} [{node.get('refId', '?')}]", str(node["expr"])))
            for value in node.values():
                walk(value, here)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(dashboard, DASHBOARD.name)
    return found


def dashboard_queries(variables: Mapping[str, str]) -> list[Query]:
    return [
        Query(where, grafana_text(expr, variables, where))
        for where, expr in dashboard_exprs(load_dashboard())
    ]


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$")


def variable_queries(variables: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of every query variable of the dashboard."""
    queries = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text.strip())
        assert match is not None, f"variable {variable['name']}: not a label_values() query: {text}"
        selector = grafana_text(match["selector"], variables, f"variable {variable['name']}")
        queries.append((variable["name"], selector, match["label"]))
    return queries


def yaml_documents(folder: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("kind") == kind:
                documents.append((f"{path.name} / {document['metadata']['name']}", document))
    return documents


def flagger_queries(values: Mapping[str, str] = FLAGGER_VALUES) -> list[Query]:
    queries = []
    for source, template in yaml_documents(FLAGGER, "MetricTemplate"):
        assert template["spec"]["provider"]["type"] == "prometheus", source
        text = template["spec"]["query"]
        queries.append(Query(source, _substitute(text, r"\{\{\s*([\w.]+)\s*\}\}", values, source)))
    return queries


def argo_queries(args: Mapping[str, str] = ARGO_ARGS) -> list[Query]:
    queries = []
    for source, template in yaml_documents(ARGO, "AnalysisTemplate"):
        # An argument the Rollout does not pass takes the template's default.
        values = {arg["name"]: arg["value"] for arg in template["spec"]["args"] if "value" in arg}
        values.update(args)
        for metric in template["spec"]["metrics"]:
            where = f"{source} / {metric['name']}"
            text = metric["provider"]["prometheus"]["query"]
            expr = _substitute(text, r"\{\{\s*args\.([\w-]+)\s*\}\}", values, where)
            queries.append(Query(where, expr))
    return queries


# -- static checks (no Prometheus needed) -----------------------------------------------------


def test_every_file_has_queries_and_each_variable_gets_a_value() -> None:
    # Substitution raises on a variable without a test value; none may stay behind either.
    chosen = dashboard_queries(GRAFANA_CHOSEN)
    assert len(chosen) >= 20
    assert len(flagger_queries()) == 2
    assert len(argo_queries()) == 2
    for query in [*chosen, *flagger_queries(), *argo_queries()]:
        assert "$" not in query.expr, query
        assert "{{" not in query.expr, query
    assert {name for name, _, _ in variable_queries(GRAFANA_CHOSEN)} == {"job", "route", "upstream"}


def test_dashboard_uses_core_panels_and_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    assert {panel["type"] for panel in panels} <= CORE_PANELS
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        # Every query goes to the Prometheus the viewer picked, never a fixed uid.
        sources = [panel["datasource"], *(target["datasource"] for target in panel["targets"])]
        assert all(source == {"type": "prometheus", "uid": "${datasource}"} for source in sources)


def test_every_metric_queried_is_documented() -> None:
    documented = METRICS_DOC.read_text(encoding="utf-8")
    texts = [expr for _, expr in dashboard_exprs(load_dashboard())]
    texts += [selector for _, selector, _ in variable_queries(GRAFANA_CHOSEN)]
    texts += [query.expr for query in [*flagger_queries(), *argo_queries()]]
    names = set()
    for text in texts:
        for name in re.findall(r"\b(?:turnout|process)_[a-z_]+", text):
            names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    assert "turnout_request_duration_seconds" in names
    missing = sorted(name for name in names if f"`{name}`" not in documented)
    assert not missing, f"queried but not in docs/metrics.md: {missing}"


# -- Prometheus and Turnout -------------------------------------------------------------------


def http_json(url: str) -> dict[str, Any]:
    """GET `url`; the JSON body, also of an HTTP error answer (Prometheus explains them)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    value = orjson.loads(body)
    assert isinstance(value, dict)
    return value


class Prometheus:
    """A `prometheus` process scraping one target every second; stopped by `close()`."""

    def __init__(self, binary: str, target: str, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=HTTP_TIMEOUT) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def query(self, expr: str) -> dict[str, Any]:
        """The /api/v1/query answer for `expr`, evaluated now."""
        params = urllib.parse.urlencode({"query": expr})
        return http_json(f"{self.url}/api/v1/query?{params}")

    def label_values(self, selector: str, label: str) -> set[str]:
        """Values of `label` over the series `selector` matches (as Grafana's label_values)."""
        params = urllib.parse.urlencode({"match[]": selector, "start": time.time() - 300})
        answer = http_json(f"{self.url}/api/v1/series?{params}")
        assert answer["status"] == "success", answer
        return {series[label] for series in answer["data"] if label in series}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass(frozen=True, slots=True)
class Stack:
    prometheus: Prometheus
    turnout: TurnoutProcess


def turnout_config(blue: EchoUpstream, green: EchoUpstream, shadow: EchoUpstream) -> dict[str, Any]:
    return {
        "workers": 1,
        "drain": {"delay": "0s", "shutdown": "5s"},
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
            "shadow": {"endpoints": [shadow.address]},
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 50, "green": 50},
                "overrides": [
                    {"header": "x-blue", "to": "blue"},
                    {"header": "x-green", "to": "green"},
                ],
                "mirror": {"to": "shadow", "percent": 50},
                # Long steps: the rollout keeps its first step while the test runs.
                "rollout": {
                    "baseline": "blue",
                    "canary": "green",
                    "steps": [50, 100],
                    "interval": "1h",
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_host: UpstreamHost,
    blue: EchoUpstream,
    green: EchoUpstream,
) -> Iterator[Stack]:
    assert PROMETHEUS is not None
    folder = tmp_path_factory.mktemp("promql")
    shadow = upstream_host.echo("shadow")
    turnout = start_turnout(turnout_config(blue, green, shadow), folder)
    loads: list[BackgroundLoad] = []
    prometheus: Prometheus | None = None
    try:
        request = urllib.request.Request(
            f"{turnout.admin_url}/admin/routes/api/rollout/start", method="POST"
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            assert response.status == 200
        for path, headers, pause in [
            ("/api/x", (), 0.02),
            ("/api/slow?ms=30", (), 0.05),
            ("/api/status/500", (("x-blue", "1"),), 0.1),
            ("/api/x", (("x-green", "1"),), 0.1),
        ]:
            load = Load(
                turnout.port, clients=1, path=path, headers=headers, count=LOAD_COUNT, pause=pause
            )
            loads.append(BackgroundLoad(load).start())
        prometheus = Prometheus(PROMETHEUS, turnout.admin_url.removeprefix("http://"), folder)
        wait_until(prometheus.ready, timeout=READY_DEADLINE, what="prometheus ready")

        def scraping() -> bool:
            assert prometheus is not None
            result = prometheus.query(f'up{{job="{JOB}"}} == 1')["data"]["result"]
            return bool(result)

        wait_until(scraping, timeout=READY_DEADLINE, what="prometheus scraping turnout")
        yield Stack(prometheus, turnout)
    finally:
        for background in loads:
            background.stop()
        if prometheus is not None:
            prometheus.close()
        turnout.close()
        upstream_host.stop(shadow)


def _problem(answer: Mapping[str, Any]) -> str | None:
    """Why a query answer is not data yet (None when it is), or raise when it never will be."""
    if answer.get("status") != "success":
        raise AssertionError(f"{answer.get('errorType')}: {answer.get('error')}")
    if answer.get("warnings"):
        raise AssertionError(f"warnings: {answer['warnings']}")
    result = answer["data"]["result"]
    if not result:
        return "empty result"
    values = [float(sample["value"][1]) for sample in result]
    if not any(math.isfinite(value) for value in values):
        return f"no finite value: {values}"
    return None


def evaluate_all(
    prometheus: Prometheus, queries: list[Query], accept: Callable[[Query, Any], str | None]
) -> dict[Query, list[dict[str, Any]]]:
    """Poll every query until each returns data `accept`s; fail with every laggard at the end.

    A query Prometheus refuses (a syntax or type error) fails at once.
    """
    results: dict[Query, list[dict[str, Any]]] = {}
    pending: dict[Query, str] = dict.fromkeys(queries, "not evaluated")
    deadline = time.monotonic() + DATA_DEADLINE
    while pending and time.monotonic() < deadline:
        for query in list(pending):
            answer = prometheus.query(query.expr)
            try:
                problem = _problem(answer) or accept(query, answer["data"]["result"])
            except AssertionError as exc:
                raise AssertionError(f"{query.source}: {exc}\n{query.expr}") from None
            if problem is None:
                results[query] = answer["data"]["result"]
                del pending[query]
            else:
                pending[query] = problem
        if pending:
            time.sleep(0.5)  # a poll interval: the next scrape is due within a second
    report = "\n".join(f"{q.source}: {why}\n    {q.expr}" for q, why in pending.items())
    assert not pending, f"no data within {DATA_DEADLINE}s:\n{report}"
    return results


def any_data(query: Query, result: Any) -> str | None:
    return None


def one_value(query: Query, result: Any) -> str | None:
    """Flagger and Argo read one number: exactly one sample, finite."""
    if len(result) != 1:
        return f"{len(result)} samples, one expected"
    value = float(result[0]["value"][1])
    return None if math.isfinite(value) else f"value {value}"


@needs_prometheus
@pytest.mark.slow
@pytest.mark.parametrize(
    "variables", [GRAFANA_CHOSEN, GRAFANA_ALL], ids=["one-route-both-versions", "all"]
)
def test_every_dashboard_query_returns_data(stack: Stack, variables: dict[str, str]) -> None:
    queries = dashboard_queries(variables)
    results = evaluate_all(stack.prometheus, queries, any_data)
    assert len(results) == len(queries)
    # The per-version panels do show both versions.
    per_version = next(q for q in queries if q.source.endswith("/ Requests/s per version [A]"))
    assert {sample["metric"]["upstream"] for sample in results[per_version]} == {"blue", "green"}
    # Green never answered a 5xx: its error share is 0 (not absent), blue's is above 0.
    errors = next(q for q in queries if q.source.endswith("/ Error % per version [A]"))
    shares = {sample["metric"]["upstream"]: float(sample["value"][1]) for sample in results[errors]}
    assert shares["green"] == 0, shares
    assert shares["blue"] > 0, shares


@needs_prometheus
@pytest.mark.slow
@pytest.mark.parametrize(
    "variables", [GRAFANA_CHOSEN, GRAFANA_ALL], ids=["one-route-both-versions", "all"]
)
def test_every_variable_query_returns_values(stack: Stack, variables: dict[str, str]) -> None:
    found = {
        name: stack.prometheus.label_values(selector, label)
        for name, selector, label in variable_queries(variables)
    }
    assert found == {"job": {JOB}, "route": {"api"}, "upstream": {"blue", "green"}}


@needs_prometheus
@pytest.mark.slow
def test_flagger_and_argo_queries_return_one_value(stack: Stack) -> None:
    results = evaluate_all(stack.prometheus, [*flagger_queries(), *argo_queries()], one_value)
    values = {query.source: float(result[0]["value"][1]) for query, result in results.items()}
    # Green has no 5xx series at all: `or vector(0)` makes its success rate the top.
    assert values["metric-templates.yaml / turnout-success-rate"] == 100
    assert values["analysis-template.yaml / turnout-canary / success-rate"] == 1
    # Latency from the histogram, in Flagger's milliseconds and Argo's seconds.
    assert values["metric-templates.yaml / turnout-p99"] > 0
    assert values["analysis-template.yaml / turnout-canary / p99-latency"] > 0


@needs_prometheus
@pytest.mark.slow
def test_success_rate_of_a_version_with_errors_is_below_the_top(stack: Stack) -> None:
    # Blue answers some 500s and many 200s: strictly between the bottom and the top.
    queries = [
        *flagger_queries({**FLAGGER_VALUES, "variables.canary": "blue"}),
        *argo_queries({**ARGO_ARGS, "canary": "blue"}),
    ]
    results = evaluate_all(stack.prometheus, queries, one_value)
    values = {query.source: float(result[0]["value"][1]) for query, result in results.items()}
    assert 0 < values["metric-templates.yaml / turnout-success-rate"] < 100
    assert 0 < values["analysis-template.yaml / turnout-canary / success-rate"] < 1
