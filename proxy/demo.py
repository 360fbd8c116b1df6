"""`turnout demo`: a split you can watch working, with one command.

The demo starts a child process serving every endpoint of the config's upstreams (small aiohttp
apps that answer each request with JSON naming the upstream, the path and the headers they got,
and `/ready` for health checks), then runs the proxy on that config in this process and prints
commands to try (`try_lines`, the README's demo block), with the access log off so that they
stay in view (`--access-log` turns it on). With `--requests N` it sends N requests itself, prints
the count per upstream and stops. With `--rollout` it starts the rollout of the first route that
has one, sends `ROLLOUT_RATE` requests a second to that route (what a person sends by hand),
prints each step and the final state, and stops. Ctrl-C stops everything.

The child is `python -m proxy.demo upstreams CONFIG`; it exits when its stdin closes, so it never
outlives the demo, even when the demo is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from proxy.client import DEFAULT_ADMIN
from proxy.control.admin import json_response
from proxy.control.supervisor import (
    ConfigLoadError,
    Supervisor,
    admin_token,
    load_config,
    startup_refusals,
)
from proxy.core.spec import ConfigSpec, Rollout, RouteSpec
from proxy.runtime.tasks import TaskSet

# How long the upstreams and then the proxy may take to come up before the demo gives up.
UPSTREAMS_START_TIMEOUT = 10.0
PROXY_READY_TIMEOUT = 20.0
POLL_INTERVAL = 0.05
UPSTREAMS_STOP_TIMEOUT = 5.0
# `--rollout`: the traffic it sends, how often it reads the rollout, and how long it may take.
ROLLOUT_RATE = 25.0
ROLLOUT_POLL = 0.2
ROLLOUT_DEADLINE = 180.0
# The hints show the example route, then at most this many others.
MAX_OTHER_ROUTES = 3


# --- the demo upstreams (child process) ----------------------------------------------------------


def upstream_app(name: str, endpoint: str) -> web.Application:
    """An app that answers every path with JSON saying which upstream and endpoint it is."""

    async def ready(request: web.Request) -> web.Response:
        return json_response({"upstream": name, "ready": True})

    async def echo(request: web.Request) -> web.Response:
        return json_response(
            {
                "upstream": name,
                "endpoint": endpoint,
                "method": request.method,
                "path": request.path_qs,
                # istr keys are a str subclass, which orjson does not take as a key.
                "headers": {str(name): value for name, value in request.headers.items()},
            }
        )

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve_upstreams(spec: ConfigSpec) -> None:
    """Serve every endpoint of every upstream until stdin reaches end of file."""
    runners: list[web.AppRunner] = []
    try:
        for upstream in spec.upstreams:
            for endpoint in upstream.endpoints:
                runner = web.AppRunner(
                    upstream_app(upstream.name, endpoint.address), access_log=None
                )
                await runner.setup()
                await web.TCPSite(runner, endpoint.host, endpoint.port, reuse_address=True).start()
                runners.append(runner)
        # The parent holds our stdin; end of file means the demo is over (or was killed).
        await asyncio.to_thread(sys.stdin.buffer.read)
    finally:
        for runner in runners:
            await runner.cleanup()


def upstreams_main(argv: list[str]) -> int:
    """`python -m proxy.demo upstreams CONFIG`: the child process of `turnout demo`."""
    parser = argparse.ArgumentParser(prog="python -m proxy.demo")
    parser.add_argument("mode", choices=["upstreams"])
    parser.add_argument("config")
    args = parser.parse_args(argv)
    try:
        _, spec = load_config(args.config)
    except ConfigLoadError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 1
    try:
        uvloop.run(serve_upstreams(spec))
    except OSError as exc:
        print(f"demo upstreams: {exc}", file=sys.stderr)
        return 1
    return 0


# --- the demo itself -----------------------------------------------------------------------------


def _client_host(host: str) -> str:
    # A wildcard listen address is reached through loopback; IPv6 needs brackets in a URL.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _example_route(spec: ConfigSpec) -> RouteSpec:
    # The first route with something to show (overrides or sticky), else the first route.
    for route in spec.routes:
        if route.overrides or route.sticky:
            return route
    return spec.routes[0]


def _example_request(route: RouteSpec) -> tuple[str, str | None]:
    """(path, Host header or None) of a request that `route` matches."""
    prefix = route.match.path_prefix.rstrip("/")
    path = f"{prefix}/hello"
    host = route.match.host
    if host is not None and host.startswith("*."):
        host = "demo" + host[1:]
    return path, host


def _weights(route: RouteSpec) -> str:
    return ", ".join(f"{name} {weight:g}" for name, weight in route.split)


def try_lines(spec: ConfigSpec, token: bool = False) -> list[str]:
    """The commands the demo suggests, with a comment line before each group.

    For config/demo.yaml this is, line for line, the demo block of the README (a test keeps
    them equal). `token`: the admin API needs TURNOUT_ADMIN_TOKEN.
    """
    route = _example_route(spec)
    path, host = _example_request(route)
    proxy = f"{_client_host(spec.listen[0])}:{spec.listen[1]}"
    admin = f"http://{_client_host(spec.admin[0])}:{spec.admin[1]}"
    url = f"{proxy}{path}"
    curl = "curl -s" + (f" -H {shlex.quote('Host: ' + host)}" if host else "")
    sticky = route.sticky
    minted = sticky is not None and sticky.cookie is not None and sticky.set
    visitor = "each curl without a cookie jar is a new visitor" if minted else "run it a few times"
    lines = [f"# route '{route.name}': {_weights(route)}; {visitor}", f"{curl} {url}"]
    if sticky is not None and sticky.cookie is not None:
        if sticky.set:
            lines += [
                f"# sticky by cookie {sticky.cookie}: keep it in a jar, keep your version",
                f"{curl} -c jar -b jar {url}",
            ]
        else:
            lines += [
                f"# sticky by cookie {sticky.cookie}: the same value, the same version",
                f"{curl} -b {sticky.cookie}=alice {url}",
            ]
    elif sticky is not None and sticky.header is not None:
        lines += [
            f"# sticky by header {sticky.header}: the same value, the same version",
            f"{curl} -H {shlex.quote(sticky.header + ': alice')} {url}",
        ]
    for rule in route.overrides:
        value = rule.value if rule.value is not None else "1"
        if rule.header is not None:
            lines += [
                f"# override by header: always {rule.to}",
                f"{curl} -H {shlex.quote(f'{rule.header}: {value}')} {url}",
            ]
        elif rule.cookie is not None:
            lines += [
                f"# override by cookie: always {rule.to}",
                f"{curl} -b {shlex.quote(f'{rule.cookie}={value}')} {url}",
            ]
    others = [other for other in spec.routes if other is not route][:MAX_OTHER_ROUTES]
    for other in others:
        _, other_host = _example_request(other)
        other_curl = "curl -s" + (f" -H {shlex.quote('Host: ' + other_host)}" if other_host else "")
        lines += [
            f"# route '{other.name}': {_weights(other)}",
            f"{other_curl} {proxy}{other.match.path_prefix}",
        ]
    query = [("path", path)] + ([("host", host)] if host else [])
    header_rule = next((rule for rule in route.overrides if rule.header is not None), None)
    if header_rule is not None:
        value = header_rule.value if header_rule.value is not None else "1"
        query.append(("header", f"{header_rule.header}:{value}"))
    explain = f"{admin.removeprefix('http://')}/admin/explain?" + urllib.parse.urlencode(
        query, safe="/:"
    )
    auth = ' -H "Authorization: Bearer $TURNOUT_ADMIN_TOKEN"' if token else ""
    lines += ["# where a request would go now, and why", f"curl -s{auth} {shlex.quote(explain)}"]
    turnout = "turnout"
    where = "" if admin == DEFAULT_ADMIN else f" --admin {admin}"
    lines += [
        "# the splits in force, their source, the rollouts",
        f"{turnout} status{where}",
    ]
    names = [name for name, _ in route.split]
    if len(names) >= 2:
        lines += [
            f"# flip '{route.name}' to {names[1]} at run time, then back to the file's split",
            f"{turnout} split {route.name} {names[0]}=0 {names[1]}=100{where}",
            f"{turnout} split {route.name} --reset{where}",
        ]
    found = _rollout_route(spec)
    if found is not None:
        rollout_route, rollout = found
        steps = ", ".join(f"{step:g}" for step in rollout.steps)
        lines += [
            f"# start the rollout of '{rollout_route.name}' ({steps} % {rollout.canary}); "
            "it steps as traffic comes",
            f"{turnout} rollout {rollout_route.name} start{where}",
        ]
    return lines


def path_note() -> str | None:
    """How to get `turnout` in another terminal, when it is not simply on PATH there."""
    here = Path(sys.executable).with_name("turnout")  # the console script beside this Python
    found = shutil.which("turnout")
    if found is not None and here.exists() and os.path.samefile(found, here):
        return None
    activate = here.with_name("activate")
    if here.exists() and activate.exists():
        return (
            f"turnout is not on your PATH: run `source {_shown(activate)}` there first "
            f"(or type {_shown(here)})."
        )
    return f"turnout is not on your PATH: type `{sys.executable} -m proxy` for it there."


def _shown(path: Path) -> str:
    # Relative when below the current folder (`./dev demo` runs in the source tree).
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def instructions(spec: ConfigSpec, token: str | None, access_log: bool = False) -> str:
    """The block the demo prints once the proxy is ready."""
    proxy = f"http://{_client_host(spec.listen[0])}:{spec.listen[1]}"
    admin = f"http://{_client_host(spec.admin[0])}:{spec.admin[1]}"
    lines = [
        "",
        f"Turnout demo: proxy on {proxy}, admin on {admin}",
        "Upstreams: "
        + ", ".join(
            f"{u.name} ({', '.join(e.address for e in u.endpoints)})" for u in spec.upstreams
        ),
    ]
    if not access_log:
        lines.append("The access log is off: turnout demo --access-log writes it here.")
    lines += ["", "Try these in another terminal."]
    note = path_note()
    if note is not None:
        lines.append(note)
    if token:
        lines.append("The admin API needs the token: export TURNOUT_ADMIN_TOKEN there too.")
    lines.append("")
    lines += [f"  {line}" for line in try_lines(spec, token=bool(token))]
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


async def _wait_for_port(host: str, port: int, child: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPSTREAMS_START_TIMEOUT
    while True:
        if child.returncode is not None:
            raise RuntimeError(f"the demo upstreams exited ({child.returncode})")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"demo upstream {host}:{port} did not start") from None
            await asyncio.sleep(POLL_INTERVAL)
        else:
            writer.close()
            return


async def send_requests(spec: ConfigSpec, count: int) -> Counter[str]:
    """Send `count` requests to the example route; the number answered by each upstream."""
    route = _example_route(spec)
    path, host = _example_request(route)
    url = f"http://{_client_host(spec.listen[0])}:{spec.listen[1]}{path}"
    headers = {"Host": host} if host else {}
    counts: Counter[str] = Counter()
    # No cookie jar: each request is a new visitor, so the split shows (not one sticky id).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(count):
            async with session.get(url, headers=headers) as response:
                body: Any = None
                with contextlib.suppress(ValueError):
                    body = orjson.loads(await response.read())
                if response.status == 200 and isinstance(body, dict) and "upstream" in body:
                    counts[str(body["upstream"])] += 1
                else:
                    counts[f"HTTP {response.status}"] += 1
    return counts


def format_counts(counts: Counter[str], url_path: str) -> str:
    """The table --requests prints."""
    total = sum(counts.values())
    lines = [f"sent {total} requests to {url_path}:"]
    for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {name:<10} {n:>6}  ({100 * n / total:.1f}%)")
    return "\n".join(lines)


def _rollout_route(spec: ConfigSpec) -> tuple[RouteSpec, Rollout] | None:
    for route in spec.routes:
        if route.rollout is not None:
            return route, route.rollout
    return None


async def _paced_traffic(url: str, headers: dict[str, str], rate: float) -> None:
    """GET `url` `rate` times a second, each as a new visitor, until cancelled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        while True:
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
            sent += 1
            # A failed request is the rollout's business (it counts errors), not the sender's.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, headers=headers) as response:
                    await response.read()


def _verdict_line(entry: dict[str, Any]) -> str:
    """One history entry, short: the verdict, the evidence, the strongest test."""
    canary, baseline = entry["canary"], entry["baseline"]
    tests = [test for test in entry["tests"] if test["log_e"] is not None and test["threshold"]]
    strongest = max(tests, key=lambda test: test["log_e"] / test["threshold"], default=None)
    evidence = (
        f"canary {canary.get('requests', 0)} requests, {canary.get('errors', 0)} errors; "
        f"baseline {baseline.get('requests', 0)} requests, {baseline.get('errors', 0)} errors"
    )
    if strongest is not None:
        evidence += (
            f"; strongest test {strongest['name']}: log e {strongest['log_e']:.2f} "
            f"of {strongest['threshold']:.2f}"
        )
    return f"{entry['verdict']} at step {entry['step']} ({entry['weight']:g}%): {evidence}"


def _route_view(supervisor: Supervisor, name: str) -> dict[str, Any]:
    """Route `name` as GET /admin/routes shows it (its `rollout`, its `effective_split`)."""
    return next(r for r in supervisor.routes_view()["routes"] if r["name"] == name)


async def drive_rollout(supervisor: Supervisor, spec: ConfigSpec) -> bool:
    """Start the first rollout of `spec`, feed it traffic, print its walk; True if it succeeded."""
    found = _rollout_route(spec)
    if found is None:
        print("turnout demo: no route of the config has a rollout", file=sys.stderr)
        return False
    route, rollout = found
    path, host = _example_request(route)
    url = f"http://{_client_host(spec.listen[0])}:{spec.listen[1]}{path}"
    steps = ", ".join(f"{step:g}" for step in rollout.steps)
    print(
        f"Rollout of route '{route.name}': canary '{rollout.canary}' against baseline "
        f"'{rollout.baseline}', steps {steps} %; each step lasts at least {rollout.interval:g}s "
        f"and needs {rollout.min_requests} canary requests; a look every {rollout.check:g}s.\n"
        f"Sending {ROLLOUT_RATE:g} requests/s to {path}, as a person would by hand.",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    await supervisor.rollout_command(route.name, "start")
    tasks = TaskSet("demo-rollout")
    tasks.spawn(
        _paced_traffic(url, {"Host": host} if host else {}, ROLLOUT_RATE), name="demo-traffic"
    )
    shown = 0
    reason = ""
    view: dict[str, Any] = {}
    try:
        while loop.time() - began < ROLLOUT_DEADLINE:
            view = dict(_route_view(supervisor, route.name)["rollout"] or {})
            history = view.get("history", [])
            for entry in history[shown:]:
                print(f"{loop.time() - began:6.1f}s  {_verdict_line(entry)}", flush=True)
            shown = len(history)
            if view.get("reason") != reason:
                reason = str(view.get("reason"))
                print(f"{loop.time() - began:6.1f}s  {reason}", flush=True)
            if view.get("state") != "running":
                break
            await asyncio.sleep(ROLLOUT_POLL)
    finally:
        await tasks.cancel_all(1.0)
    state = view.get("state")
    split = _route_view(supervisor, route.name)
    weights = ", ".join(f"{name} {weight:g}" for name, weight in split["effective_split"].items())
    print(
        f"Final state: {state} after {loop.time() - began:.1f}s; effective split {weights}.",
        flush=True,
    )
    return state == "succeeded"


async def _drive(
    supervisor: Supervisor,
    spec: ConfigSpec,
    requests: int | None,
    token: str | None,
    rollout: bool = False,
    access_log: bool = False,
) -> bool:
    """Wait for the proxy, then print the instructions, run the requests or the rollout.

    False on failure.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROXY_READY_TIMEOUT
    while not supervisor.readiness().ready:
        if loop.time() > deadline:
            print("turnout demo: the proxy did not become ready", file=sys.stderr)
            supervisor.request_stop()
            return False
        await asyncio.sleep(POLL_INTERVAL)
    if rollout:
        done = await drive_rollout(supervisor, spec)
        supervisor.request_stop()
        return done
    if requests is None:
        print(instructions(spec, token, access_log), flush=True)
        return True
    try:
        counts = await send_requests(spec, requests)
    except aiohttp.ClientError as exc:
        print(f"turnout demo: request failed: {exc}", file=sys.stderr)
        supervisor.request_stop()
        return False
    path, _ = _example_request(_example_route(spec))
    print(format_counts(counts, path), flush=True)
    supervisor.request_stop()
    # Every answer should come from a demo upstream; anything else means the proxy misbehaved.
    return all(not name.startswith("HTTP ") for name in counts)


async def _demo(
    path: str,
    text: str,
    spec: ConfigSpec,
    requests: int | None,
    access_log: bool,
    rollout: bool = False,
) -> int:
    token = admin_token()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo",
        "upstreams",
        path,
        stdin=asyncio.subprocess.PIPE,
        # Its own session: Ctrl-C reaches the demo, which then closes the child's stdin.
        start_new_session=True,
    )
    assert child.stdin is not None
    tasks = TaskSet("demo")
    try:
        for upstream in spec.upstreams:
            for endpoint in upstream.endpoints:
                await _wait_for_port(endpoint.host, endpoint.port, child)
        supervisor = Supervisor(path, text, spec, access_log=access_log, token=token)
        driver = tasks.spawn(
            _drive(supervisor, spec, requests, token, rollout, access_log), name="demo-driver"
        )
        status = await supervisor.run()
        if driver.done() and not driver.cancelled() and not driver.result():
            status = status or 1
        return status
    except RuntimeError as exc:
        print(f"turnout demo: {exc}", file=sys.stderr)
        return 1
    finally:
        await tasks.cancel_all(1.0)
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), UPSTREAMS_STOP_TIMEOUT)
        except TimeoutError:
            child.kill()
            await child.wait()


def run_demo(
    config: str, *, requests: int | None = None, rollout: bool = False, access_log: bool = False
) -> int:
    """`turnout demo`: the exit status.

    0 after Ctrl-C, a finished --requests run, or a --rollout that succeeded.
    """
    path = os.path.abspath(config)
    try:
        text, spec = load_config(path)
    except ConfigLoadError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 1
    refusals = startup_refusals(spec, admin_token())
    if refusals:
        for reason in refusals:
            print(f"turnout: refusing to start: {reason}", file=sys.stderr)
        return 1
    if requests is not None and requests < 1:
        print("turnout demo: --requests needs a positive number", file=sys.stderr)
        return 1
    if rollout and requests is not None:
        print("turnout demo: give --requests or --rollout, not both", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(path, text, spec, requests, access_log, rollout))


if __name__ == "__main__":
    raise SystemExit(upstreams_main(sys.argv[1:]))
