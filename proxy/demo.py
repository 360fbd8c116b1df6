"""`turnout demo`: a split you can watch working, with one command.

The demo starts a child process serving every endpoint of the config's upstreams (small aiohttp
apps that answer each request with JSON naming the upstream, the path and the headers they got,
and `/ready` for health checks), then runs the proxy on that config in this process and prints
curl lines to try. With `--requests N` it sends N requests itself, prints the count per upstream
and stops. Ctrl-C stops everything.

The child is `python -m proxy.demo upstreams CONFIG`; it exits when its stdin closes, so it never
outlives the demo, even when the demo is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
from collections import Counter
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from proxy.admin import json_response
from proxy.spec import ConfigSpec, RouteSpec
from proxy.supervisor import (
    ConfigLoadError,
    Supervisor,
    admin_token,
    load_config,
    startup_refusals,
)
from proxy.tasks import TaskSet

# How long the upstreams and then the proxy may take to come up before the demo gives up.
UPSTREAMS_START_TIMEOUT = 10.0
PROXY_READY_TIMEOUT = 20.0
POLL_INTERVAL = 0.05
UPSTREAMS_STOP_TIMEOUT = 5.0


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


def instructions(spec: ConfigSpec, token: str | None) -> str:
    """The block of curl lines the demo prints once the proxy is ready."""
    route = _example_route(spec)
    path, host = _example_request(route)
    proxy = f"http://{_client_host(spec.listen[0])}:{spec.listen[1]}"
    admin = f"http://{_client_host(spec.admin[0])}:{spec.admin[1]}"
    url = f"{proxy}{path}"
    base = "curl -s" + (f" -H {shlex.quote('Host: ' + host)}" if host else "")
    admin_curl = "curl -s" + (
        f" -H {shlex.quote('Authorization: Bearer ' + token)}" if token else ""
    )
    split = ", ".join(f"{name} {weight:g}" for name, weight in route.split)
    lines = [
        "",
        f"Turnout demo: proxy on {proxy}, admin on {admin}",
        "Upstreams: "
        + ", ".join(
            f"{u.name} ({', '.join(e.address for e in u.endpoints)})" for u in spec.upstreams
        ),
        "",
        "Try:",
        f"  # route '{route.name}' splits {split}: run it a few times",
        f"  {base} {url}",
    ]
    for rule in route.overrides:
        if rule.header is not None:
            header = f"{rule.header}: {rule.value if rule.value is not None else '1'}"
            lines += [
                f"  # header override: always {rule.to}",
                f"  {base} -H {shlex.quote(header)} {url}",
            ]
        elif rule.cookie is not None:
            cookie = f"{rule.cookie}={rule.value if rule.value is not None else '1'}"
            lines += [f"  # cookie override: always {rule.to}", f"  {base} --cookie {cookie} {url}"]
    if route.sticky is not None:
        if route.sticky.cookie is not None:
            sticky = f"--cookie {route.sticky.cookie}=alice"
        else:
            sticky = f"-H {shlex.quote(f'{route.sticky.header}: alice')}"
        lines += [
            "  # sticky: the same key gets the same upstream every time",
            f"  {base} {sticky} {url}",
        ]
    lines += [
        "  # the routes, their configured and effective splits",
        f"  {admin_curl} {admin}/admin/routes",
    ]
    names = [name for name, _ in route.split]
    if len(names) >= 2:
        flip = orjson.dumps({names[0]: 0, names[1]: 100}).decode()
        lines += [
            "  # flip the split at runtime, then back to the file's split",
            f"  {admin_curl} -X PUT -d {shlex.quote(flip)} {admin}/admin/routes/{route.name}/split",
            f"  {admin_curl} -X DELETE {admin}/admin/routes/{route.name}/split",
        ]
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


async def _drive(
    supervisor: Supervisor, spec: ConfigSpec, requests: int | None, token: str | None
) -> bool:
    """Wait for the proxy, then print the instructions or run the requests; False on failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROXY_READY_TIMEOUT
    while not supervisor.readiness().ready:
        if loop.time() > deadline:
            print("turnout demo: the proxy did not become ready", file=sys.stderr)
            supervisor.request_stop()
            return False
        await asyncio.sleep(POLL_INTERVAL)
    if requests is None:
        print(instructions(spec, token), flush=True)
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
    path: str, text: str, spec: ConfigSpec, requests: int | None, access_log: bool
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
        driver = tasks.spawn(_drive(supervisor, spec, requests, token), name="demo-driver")
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


def run_demo(config: str, *, requests: int | None = None, access_log: bool = True) -> int:
    """`turnout demo`: the exit status (0 after Ctrl-C or a finished --requests run)."""
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
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(path, text, spec, requests, access_log))


if __name__ == "__main__":
    raise SystemExit(upstreams_main(sys.argv[1:]))
