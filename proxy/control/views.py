"""The admin API's JSON bodies about the config in force: GET /admin/config and /admin/routes.

Plain functions over what the supervisor and its parts hold, so what an operator sees is
written in one place, apart from how the state is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.control.overrides import SplitOverrides, runtime_split
from proxy.core.config import spec_to_dict
from proxy.core.counters import WorkerSnapshot
from proxy.core.spec import ConfigSpec
from proxy.core.table import CompiledRoute, Table
from proxy.runtime.tls import LoadedCertificate


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """One generation of the config: the file's text, its spec and the compiled table."""

    generation: int
    sha256: str
    text: str
    spec: ConfigSpec
    table: Table
    loaded_at: datetime


def utc_iso(moment: datetime) -> str:
    """`2026-01-02T03:04:05.678Z`."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def worker_counts(snapshot: WorkerSnapshot | None) -> dict[str, int | None]:
    """`requests` (answered, all routes) and open `connections` of a worker's last snapshot."""
    if snapshot is None:
        return {"requests": None, "connections": None}
    requests = snapshot["no_route"]["count"] + sum(pair["count"] for pair in snapshot["routes"])
    return {"requests": requests, "connections": snapshot["connections"]}


def certificates_view(loaded: Mapping[str, list[LoadedCertificate]]) -> list[dict[str, Any]]:
    """The TLS listeners' certificates in force, for GET /admin/config."""
    return [
        {
            "listener": listener,
            "cert": cert.files.cert,
            "key": cert.files.key,
            "names": list(cert.names),
            "not_after": utc_iso(datetime.fromtimestamp(cert.not_after, UTC)),
        }
        for listener, certs in loaded.items()
        for cert in certs
    ]


def config_view(
    current: LoadedConfig,
    *,
    path: str,
    last_error: str | None,
    workers: list[dict[str, Any]],
    pending_restart: list[str],
    reloads: Mapping[str, int],
    certificates: Mapping[str, list[LoadedCertificate]],
    certificates_error: str | None,
) -> dict[str, Any]:
    """The body of GET /admin/config."""
    return {
        "generation": current.generation,
        "sha256": current.sha256,
        "loaded_at": utc_iso(current.loaded_at),
        "path": path,
        "last_error": last_error or certificates_error,
        "config": spec_to_dict(current.spec),
        "workers": workers,
        "pending_restart": list(pending_restart),
        "reloads": dict(reloads),
        "certificates": certificates_view(certificates),
        "certificates_error": certificates_error,
    }


def _route_dicts(spec: ConfigSpec) -> list[dict[str, Any]]:
    """The routes as the file has them (`spec_to_dict`): what /admin/routes shows of each."""
    routes = spec_to_dict(spec)["routes"]
    assert isinstance(routes, list)
    return routes


def routes_view(
    current: LoadedConfig,
    overrides: SplitOverrides,
    rollout: Callable[[str], dict[str, Any] | None],
) -> dict[str, Any]:
    """The body of GET /admin/routes: every route's splits, rules and rollout state
    (`rollout` gives a route's rollout view)."""
    in_file = {route["name"]: route for route in _route_dicts(current.spec)}
    return {
        "generation": current.generation,
        "routes": [
            _route_state(route, in_file[route.name], overrides, rollout)
            for route in current.table.routes
        ],
    }


def _route_state(
    route: CompiledRoute,
    in_file: Mapping[str, Any],
    overrides: SplitOverrides,
    rollout: Callable[[str], dict[str, Any] | None],
) -> dict[str, Any]:
    return {
        "name": route.name,
        "match": in_file["match"],
        "configured_split": in_file["split"],
        "effective_split": dict(route.split.shares),
        "split_source": route.split_source,
        "runtime_split": runtime_split(overrides, route.name),
        "overrides": in_file.get("overrides", []),
        "sticky": in_file.get("sticky"),
        "mirror": in_file.get("mirror"),
        "retries": route.retries,
        "rollout": rollout(route.name),
        "rollout_config": in_file.get("rollout"),
    }


def route_answer(view: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One route of a `routes_view`, with the generation: the answer to a change of it."""
    (route,) = (route for route in view["routes"] if route["name"] == name)
    return {"generation": view["generation"], **route}
