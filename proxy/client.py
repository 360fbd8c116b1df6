"""The client of the admin API: `turnout status | split | rollout | reload | healthcheck`.

Plain HTTP from the standard library (urllib) and orjson: these commands start in a few tens of
milliseconds and never import aiohttp, uvloop or the proxy itself, so `turnout healthcheck` is
cheap enough for a container HEALTHCHECK run every few seconds.

Where the admin API is: `--admin URL`, else the `admin` address of `--config FILE` (a wildcard
address is reached on loopback), else `DEFAULT_ADMIN`. The token, when Turnout runs with one, is
read from `TOKEN_ENV` and sent as `Authorization: Bearer ...`.

Exit status of every command: 0 done; 1 the server refused the call (its message is printed),
the admin API did not answer, or the config named by `--config` cannot be read; 2 a usage error
(argparse).
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import yaml
from yaml.nodes import MappingNode, ScalarNode

# The server reads the same variable (proxy.control.supervisor.TOKEN_ENV; a test keeps them equal).
TOKEN_ENV = "TURNOUT_ADMIN_TOKEN"
# `admin`'s default in the config (proxy.core.spec.ConfigSpec; a test keeps them equal).
DEFAULT_ADMIN = "http://127.0.0.1:9901"

_WEIGHT_RE = re.compile(r"(?P<name>[^=\s]+)=(?P<weight>[^=\s]+)\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
# A host name, an IPv4 address, or (in brackets) an IPv6 one.
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\Z")


class ClientError(Exception):
    """A failure to print as `turnout: <message>` (one line or more) with exit status 1."""


class AdminUnreachable(ClientError):
    """Nothing answered at the admin address, or not in time, or not HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer of the admin API: its status and its body (parsed JSON, or the text)."""

    status: int
    data: Any

    def message(self) -> str:
        """The server's reason, from its JSON `error` or `errors`, else the body's text."""
        if isinstance(self.data, dict):
            if isinstance(self.data.get("errors"), list):
                return "\n".join(str(line) for line in self.data["errors"])
            if "error" in self.data:
                return str(self.data["error"])
        return str(self.data).strip() or f"HTTP {self.status}"


# --- where the admin API is --------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError otherwise."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket or not _IPV6_RE.match(host):
            raise ValueError(f"{text!r}: expected [v6-address]:port, e.g. [::1]:9901")
    else:
        host, _, port = text.rpartition(":")
        if not _HOST_RE.match(host):
            raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:9901")
    if not _PORT_RE.match(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, port


def _url(host: str, port: str) -> str:
    # A wildcard address listens on every interface; this machine reaches it on loopback.
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def admin_url(text: str) -> str:
    """`--admin`: `http://host:port` (or just `host:port`) -> the base URL; ValueError if not."""
    rest = text.rstrip("/")
    scheme, sep, address = rest.partition("://")
    if not sep:
        scheme, address = "http", rest
    if scheme != "http":
        raise ValueError(f"{text!r}: the admin API speaks plain http://")
    return _url(*_host_port(address))


def admin_from_config(path: str) -> str:
    """The admin base URL from the `admin` key of the config file at `path`.

    Only that key is read, so a file being edited into something invalid while Turnout runs on
    the previous one still tells where the admin API is (`turnout validate` judges the rest).
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ClientError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ClientError(f"{path}: the config file is not UTF-8 text") from exc
    try:
        # Composed, not constructed: the scalar's text as written, no YAML 1.1 type guessing.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ClientError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(root, MappingNode):
        raise ClientError(f"{path}: not a routing table (a YAML mapping)")
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "admin":
            if not isinstance(value, ScalarNode):
                raise ClientError(f"{path}: admin: expected host:port, e.g. 127.0.0.1:9901")
            try:
                return _url(*_host_port(value.value))
            except ValueError as exc:
                raise ClientError(f"{path}: admin: {exc}") from exc
    return DEFAULT_ADMIN


def resolve_admin(args: argparse.Namespace) -> str:
    """The admin base URL a client command talks to (see the module docstring)."""
    if args.admin is not None:
        return str(args.admin)
    if args.config is not None:
        return admin_from_config(args.config)
    return DEFAULT_ADMIN


# --- HTTP ---------------------------------------------------------------------------------------


class AdminClient:
    """Calls on one admin API; every call is one short connection."""

    def __init__(self, base_url: str, token: str | None, timeout: float) -> None:
        self.base_url = base_url
        self.token = token
        self.timeout = timeout
        # No proxy: http_proxy in the environment must not send admin calls (and the token)
        # through another machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: object = None, *, auth: bool = True) -> Answer:
        """Send one request; the answer whatever its status. AdminUnreachable if none."""
        headers = {"Accept": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            try:
                response = self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                response = exc  # a 4xx or 5xx: an answer like any other, with a body
            with response:
                return Answer(response.status, _decode(response.read()))
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, reason: object) -> AdminUnreachable:
        if isinstance(reason, TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        elif isinstance(reason, http.client.HTTPException):
            why = f"not an HTTP answer ({type(reason).__name__})"
        else:
            why = str(reason)
        return AdminUnreachable(
            f"cannot reach the admin API at {self.base_url}: {why} "
            "(is Turnout running? --admin URL or --config FILE says where it is)"
        )


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def client_for(args: argparse.Namespace) -> AdminClient:
    """The client of a parsed client command."""
    return AdminClient(resolve_admin(args), os.environ.get(TOKEN_ENV) or None, args.timeout)


def refused(answer: Answer) -> ClientError:
    """The error for a call the server did not accept, with its message."""
    message = answer.message()
    if answer.status == 401:
        hint = "is not set" if not os.environ.get(TOKEN_ENV) else "is not the server's token"
        message += f" ({TOKEN_ENV} {hint})"
    return ClientError(f"refused ({answer.status}): {message}")


def checked(answer: Answer) -> Any:
    """The body of a 2xx answer; ClientError for any other."""
    if not 200 <= answer.status < 300:
        raise refused(answer)
    return answer.data


def print_json(data: object) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# --- what the commands print -------------------------------------------------------------------


def format_weights(split: Mapping[str, Any]) -> str:
    """`{"blue": 80.0, "canary": 20.0}` -> `blue 80, canary 20`."""
    return ", ".join(f"{name} {round(float(weight), 1):g}" for name, weight in split.items())


def format_rollout(rollout: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> str:
    """A route's rollout in one line: state, step, last verdict (steps counted from 0, as in
    the API and the log)."""
    if rollout is None:
        return "idle" if config is not None else "-"
    text = str(rollout.get("state", "?"))
    if text in ("running", "paused"):
        text += f": step {rollout.get('step')} (canary {float(rollout.get('canary_weight', 0)):g}%)"
        steps = (config or {}).get("steps")
        if steps:
            text += " of " + "/".join(f"{float(step):g}" for step in steps)
        if rollout.get("waiting"):
            text += ", waiting for a before_step webhook"
    history = rollout.get("history") or []
    if history:
        last = history[-1]
        text += (
            f"; last verdict {last.get('verdict')} at step {last.get('step')} "
            f"({float(last.get('weight', 0)):g}%)"
        )
    return text


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def format_status(
    base_url: str,
    ready: Answer,
    routes: Mapping[str, Any],
    config: Mapping[str, Any],
    fleet: Answer | None,
) -> str:
    """`turnout status` for a person: one line about the process, then a line per route."""
    if ready.status == 200:
        state = "ready"
    else:
        reason = ready.data.get("reason") if isinstance(ready.data, dict) else None
        state = f"not ready ({reason})" if reason else f"not ready ({ready.status})"
    lines = [
        f"Turnout at {base_url}: {state}; generation {routes.get('generation')}, "
        f"config {config.get('path')}"
    ]
    if config.get("last_error"):
        first = str(config["last_error"]).splitlines()[0]
        lines.append(f"last reload failed, the config in force stays: {first}")
    if config.get("pending_restart"):
        lines.append(f"restart needed for: {', '.join(map(str, config['pending_restart']))}")
    if fleet is not None:
        lines.append(format_fleet(fleet))
    rows = [["ROUTE", "SPLIT", "SOURCE", "ROLLOUT"]]
    for route in routes.get("routes", []):
        rows.append(
            [
                str(route.get("name")),
                format_weights(route.get("effective_split") or {}),
                str(route.get("split_source")),
                format_rollout(route.get("rollout"), route.get("rollout_config")),
            ]
        )
    return "\n".join([*lines, "", *_table(rows)])


def format_fleet(fleet: Answer) -> str:
    """The fleet in one line (contract: `GET /admin/fleet`)."""
    if fleet.status != 200 or not isinstance(fleet.data, dict):
        return f"fleet: unavailable ({fleet.status}: {fleet.message()})"
    data = fleet.data
    instances = data.get("instances") or []
    text = (
        f"fleet {data.get('name')}: {len(instances)} instances, this one {data.get('instance')}, "
        f"leader {data.get('leader')} (epoch {data.get('epoch')}), "
        f"{'connected' if data.get('connected') else 'NOT connected to its store'}"
    )
    # Files differ in addresses and names per instance; what matters is the routing table.
    differ = data.get("table_differs") or []
    if differ:
        text += f"; routing table differs on: {', '.join(str(name) for name in differ)}"
    return text


def format_route(state: Mapping[str, Any]) -> str:
    """A route's state after a split or rollout call, in one line."""
    text = (
        f"{state.get('name')}: {format_weights(state.get('effective_split') or {})} "
        f"({state.get('split_source')}; generation {state.get('generation')})"
    )
    rollout = state.get("rollout")
    if rollout is not None:
        text += f"; rollout {format_rollout(rollout, state.get('rollout_config'))}"
        if rollout.get("reason"):
            text += f": {rollout['reason']}"
    return text


# --- the commands -------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    client = client_for(args)
    routes = checked(client.call("GET", "/admin/routes"))
    fleet: Answer | None = client.call("GET", "/admin/fleet")
    if fleet is not None and fleet.status == 404:
        fleet = None  # a Turnout without fleet mode (or from before it)
    if args.json:
        print_json({**routes, "fleet": fleet.data if fleet and fleet.status == 200 else None})
        return 0
    config = checked(client.call("GET", "/admin/config"))
    ready = client.call("GET", "/readyz", auth=False)
    print(format_status(client.base_url, ready, routes, config, fleet))
    return 0


def parse_weight(text: str) -> tuple[str, float]:
    """`UPSTREAM=WEIGHT` (an argparse type: its error is a usage error, exit status 2)."""
    match = _WEIGHT_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected UPSTREAM=WEIGHT, e.g. blue=90")
    try:
        weight = float(match["weight"])
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number")
    return match["name"], weight


def _print_route(state: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(state)
    else:
        print(format_route(state))


def cmd_split(args: argparse.Namespace) -> int:
    route = urllib.parse.quote(args.route, safe="")
    client = client_for(args)
    if args.reset:
        answer = client.call("DELETE", f"/admin/routes/{route}/split")
    else:
        answer = client.call("PUT", f"/admin/routes/{route}/split", dict(args.weights))
    _print_route(checked(answer), args.json)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    route = urllib.parse.quote(args.route, safe="")
    answer = client_for(args).call("POST", f"/admin/routes/{route}/rollout/{args.action}")
    _print_route(checked(answer), args.json)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    answer = client_for(args).call("POST", "/admin/reload")
    if answer.status == 400:
        raise ClientError(
            "refused (400): the file has errors; the config in force stays:\n" + answer.message()
        )
    result = checked(answer)
    if args.json:
        print_json(result)
    elif result.get("changed"):
        print(f"reloaded: generation {result.get('generation')}")
    else:
        print(f"unchanged: the file is the config in force (generation {result.get('generation')})")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    # /readyz needs no token: the probe works with none in its environment.
    answer = client_for(args).call("GET", "/readyz", auth=False)
    if answer.status == 200:
        print("ready")
        return 0
    reason = answer.data.get("reason") if isinstance(answer.data, dict) else None
    print(f"not ready: {reason or answer.message()}")
    return 1
