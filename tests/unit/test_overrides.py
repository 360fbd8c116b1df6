"""The split-override policy (proxy.control.overrides) and the admin views built on it
(proxy.control.views), as plain functions over configs: no supervisor, no processes."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from proxy.control.overrides import (
    SplitOverrides,
    after_reload,
    changed_routes,
    from_splits,
    runtime_source,
    runtime_split,
    saved_splits,
    usable,
    with_rollouts,
)
from proxy.control.views import LoadedConfig, route_answer, routes_view, worker_counts
from proxy.core.config import parse_config
from proxy.core.counters import GOAWAY_REASONS, RouteUpstreamStats, WorkerSnapshot
from proxy.core.spec import ConfigSpec
from proxy.core.table import compile_table, diff_tables

BASE = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
  green: {endpoints: ["127.0.0.1:9002"]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {blue: 90, green: 10}
  - name: web
    split: {blue: 100}
"""


def spec_of(text: str) -> ConfigSpec:
    return parse_config(text, "turnout.yaml")


RUNTIME: SplitOverrides = {
    "api": ({"blue": 0.0, "green": 100.0}, "runtime"),
    "web": ({"blue": 50.0, "green": 50.0}, "runtime"),
}


def test_runtime_splits_set_here_are_the_fleets_in_a_fleet() -> None:
    assert runtime_source(False) == "runtime"
    assert runtime_source(True) == "fleet"


def test_usable_drops_what_the_config_cannot_take(caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_of(BASE)
    overrides: SplitOverrides = {
        **RUNTIME,
        "gone": ({"blue": 1.0}, "runtime"),
        "web": ({"purple": 1.0}, "fleet"),
    }
    with caplog.at_level(logging.WARNING, logger="turnout.supervisor"):
        kept = usable(spec, overrides, "in the state file")
    assert kept == {"api": RUNTIME["api"]}
    messages = [record.getMessage() for record in caplog.records]
    assert any("route gone: dropping the runtime split in the state file" in m for m in messages)
    assert any(
        m.startswith("route web: dropping the fleet split in the state file") for m in messages
    )


def test_from_splits_restores_saved_weights_with_their_source() -> None:
    restored = from_splits(spec_of(BASE), {"api": {"green": 1.0}}, "fleet", "from the fleet")
    assert restored == {"api": ({"green": 1.0}, "fleet")}


def test_a_reload_keeps_runtime_splits_of_routes_whose_split_the_file_kept() -> None:
    old, new = (
        spec_of(BASE),
        spec_of(BASE.replace("{blue: 90, green: 10}", "{blue: 80, green: 20}")),
    )
    diff = diff_tables(
        compile_table(old, generation=1, sha256=""), compile_table(new, generation=2, sha256="")
    )
    overrides: SplitOverrides = {**RUNTIME, "api": ({"green": 1.0}, "rollout")}
    # The rollout's split is left for the rollout controller; api's file split changed anyway.
    assert after_reload(overrides, diff, new) == {"web": RUNTIME["web"]}
    assert after_reload(RUNTIME, diff, new) == {"web": RUNTIME["web"]}


def test_a_reload_drops_overrides_the_new_file_makes_impossible() -> None:
    old = spec_of(BASE)
    new = spec_of(
        BASE.replace('  green: {endpoints: ["127.0.0.1:9002"]}\n', "").replace(
            "{blue: 90, green: 10}", "{blue: 90}"
        )
    )
    diff = diff_tables(
        compile_table(old, generation=1, sha256=""), compile_table(new, generation=2, sha256="")
    )
    # api: its split changed; web: its runtime split names green, which is gone.
    assert after_reload(RUNTIME, diff, new) == {}


def test_a_runtime_split_wins_over_a_rollout() -> None:
    rollout: SplitOverrides = {
        "api": ({"blue": 95.0, "green": 5.0}, "rollout"),
        "web": ({"blue": 99.0, "green": 1.0}, "rollout"),
    }
    mixed: SplitOverrides = {"api": RUNTIME["api"], "web": ({"blue": 1.0}, "rollout")}
    # A stale rollout entry of `overrides` is replaced by the controller's current one.
    assert with_rollouts(mixed, rollout) == {"api": RUNTIME["api"], "web": rollout["web"]}
    assert with_rollouts({}, rollout) == rollout


def test_only_runtime_splits_are_saved_and_shown_as_runtime() -> None:
    overrides: SplitOverrides = {
        "api": ({"green": 1.0}, "fleet"),
        "web": ({"blue": 1.0}, "rollout"),
    }
    assert saved_splits(overrides) == {"api": {"green": 1.0}}
    assert runtime_split(overrides, "api") == {"green": 1.0}
    assert runtime_split(overrides, "web") is None
    assert runtime_split(overrides, "nope") is None


def test_changed_routes_names_every_route_whose_override_moved() -> None:
    after: SplitOverrides = {"api": RUNTIME["api"], "new": ({"blue": 1.0}, "fleet")}
    assert changed_routes(RUNTIME, after) == ["new", "web"]
    assert changed_routes(RUNTIME, dict(RUNTIME)) == []


def test_the_routes_view_shows_the_effective_and_the_runtime_split() -> None:
    spec = spec_of(BASE)
    overrides: SplitOverrides = {"api": RUNTIME["api"], "web": ({"blue": 1.0}, "rollout")}
    current = LoadedConfig(
        generation=3,
        sha256="abc",
        text=BASE,
        spec=spec,
        table=compile_table(spec, generation=3, sha256="abc", split_overrides=overrides),
        loaded_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    view = routes_view(
        current, overrides, lambda name: {"state": "running"} if name == "web" else None
    )
    answer = route_answer(view, "api")
    assert answer["generation"] == 3
    assert answer["runtime_split"] == {"blue": 0.0, "green": 100.0}
    assert answer["effective_split"] == {"blue": 0.0, "green": 100.0}
    assert answer["split_source"] == "runtime"
    assert answer["configured_split"] == {"blue": 90, "green": 10}
    assert answer["rollout"] is None
    web = route_answer(view, "web")
    assert web["runtime_split"] is None
    assert web["rollout"] == {"state": "running"}


def test_worker_counts_of_a_snapshot() -> None:
    assert worker_counts(None) == {"requests": None, "connections": None}
    pair = RouteUpstreamStats("api", "blue")
    pair.observe(200, 0.01)
    pair.observe(502, 0.02)
    no_route = RouteUpstreamStats("", "")
    no_route.observe(404, 0.0)
    snapshot: WorkerSnapshot = {
        "generation": 1,
        "pid": 1,
        "routes": [pair.snapshot()],
        "no_route": no_route.snapshot(),
        "mirror": [],
        "fail_open": {},
        "h2_goaways": dict.fromkeys(GOAWAY_REASONS, 0),
        "endpoints": [],
        "connections": 7,
    }
    assert worker_counts(snapshot) == {"requests": 3, "connections": 7}
