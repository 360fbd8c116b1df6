"""What a reload costs: apply time of a 500-route table, and request latency during a reload storm.

    .venv/bin/python benchmarks/reload.py            # ~1 minute
    .venv/bin/python benchmarks/reload.py --quick    # ~30 s

One invocation starts an nginx backend and Turnout (`--workers`, default 2) on a routing table of
`--routes` routes (default 500; every third with an override, every fifth sticky), then:

1. **Apply time.** `--reloads` times: change one route's split in the file, `POST /admin/reload`,
   and poll `GET /admin/config` until the supervisor *and every worker* report the new generation
   (the `workers[].generation` field, which a worker reports after it has compiled and swapped the
   table in). Printed: the POST round trip (read, hash, parse, validate, compile, swap, send to
   the workers) and the time until every worker has it, p50/p99/max. The poll runs every 5 ms
   and costs a little itself (its p50 is printed), so the second figure is an upper bound by
   about the sum of the two.
2. **Latency during a reload storm.** `benchmarks/latency.py` (open loop, fixed rate, in its own
   process so the storm driver cannot disturb its clock) sends `GET /small` through Turnout to a
   route in the middle of the table: once on a quiet proxy, then again while this process reloads
   a changed file `--storm-rate` times per second. Printed side by side: p50/p99/p99.9/max and
   the errors (non-2xx, failures, incomplete), which must be 0.

The config file is a symlink into a folder the file watch does not look at, so every reload here
has exactly one trigger (the POST). All traffic stays on 127.0.0.1; every run is bounded; every
process started here is stopped on exit, Ctrl-C or error. See docs/zero-downtime.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl
import orjson
import yaml
from benchlib import percentile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LATENCY_SCRIPT = HERE / "latency.py"
# How long a single apply may take before the run is declared broken (bounds a hang).
APPLY_DEADLINE = 30.0
# Between two polls of GET /admin/config while timing an apply: the figure's resolution.
POLL_INTERVAL = 0.005


class BenchError(RuntimeError):
    """The proxy misbehaved (a reload failed, a generation never arrived)."""


@dataclass(frozen=True)
class Settings:
    routes: int
    workers: int
    reloads: int
    rate: float
    duration: float
    storm_rate: float
    connections: int


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=500, help="routes in the table (500)")
    parser.add_argument("--workers", type=int, default=2, help="Turnout workers (2)")
    parser.add_argument("--reloads", type=int, default=50, help="reloads timed for apply (50)")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s for latency (500)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument("--storm-rate", type=float, default=2.0, help="reloads/s in storm (2)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive conns (16)")
    parser.add_argument("--quick", action="store_true", help="20 reloads, 5 s phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.reloads, args.duration = 20, 5.0
    if min(args.routes, args.workers, args.reloads, args.connections) < 1:
        parser.error("routes, workers, reloads and connections must be at least 1")
    if args.rate <= 0 or args.duration <= 0 or args.storm_rate <= 0:
        parser.error("rate, duration and storm-rate must be positive")
    return Settings(
        routes=max(args.routes, 2),
        workers=args.workers,
        reloads=args.reloads,
        rate=args.rate,
        duration=args.duration,
        storm_rate=args.storm_rate,
        connections=args.connections,
    )


# --- the table -------------------------------------------------------------------------------


def routing_table(
    port: int, admin_port: int, workers: int, backend_port: int, routes: int, variant: int
) -> dict[str, Any]:
    """`routes` routes on two upstreams (both the backend); `variant` changes route r0's split.

    Route number routes // 2 matches `/small`, the path the latency phase requests: a request
    walks half the table before it matches, as in a real table with the hot route in the middle.
    """
    endpoint = f"{bl.LOOPBACK}:{backend_port}"
    table: list[dict[str, Any]] = []
    for index in range(routes):
        prefix = "/small" if index == routes // 2 else f"/r{index}"
        route: dict[str, Any] = {
            "name": f"r{index}",
            "match": {"path_prefix": prefix},
            "split": {"blue": 90, "green": 10},
        }
        if index % 3 == 0:
            route["overrides"] = [{"header": "x-canary", "value": "true", "to": "green"}]
        if index % 5 == 0:
            route["sticky"] = {"header": "x-user"}
        table.append(route)
    # The change a reload carries: a different split on the first route, never equal to the last.
    blue = 1 + variant % 98
    table[0]["split"] = {"blue": blue, "green": 100 - blue}
    return {
        "listen": f"{bl.LOOPBACK}:{port}",
        "admin": f"{bl.LOOPBACK}:{admin_port}",
        "workers": workers,
        "upstreams": {"blue": {"endpoints": [endpoint]}, "green": {"endpoints": [endpoint]}},
        "routes": table,
    }


class ConfigFile:
    """`turnout.yaml` -> `versions/current.yaml`; replaced atomically inside `versions/`.

    The file watch looks at `turnout.yaml`'s folder only, so it never sees these changes: the
    POST is the one trigger of every reload measured here.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "turnout.yaml"
        self.versions = folder / "versions"
        self.versions.mkdir()
        self.path.symlink_to(Path("versions") / "current.yaml")

    def write(self, config: dict[str, Any]) -> None:
        temporary = self.versions / ".next.yaml"
        temporary.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(temporary, self.versions / "current.yaml")


# --- admin calls -----------------------------------------------------------------------------


def admin(port: int, method: str, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(bl.LOOPBACK, port, timeout=APPLY_DEADLINE)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, orjson.loads(body) if body else None
    finally:
        conn.close()


def everyone_at(port: int, generation: int) -> bool:
    status, view = admin(port, "GET", "/admin/config")
    if status != 200:
        raise BenchError(f"GET /admin/config answered {status}: {view}")
    workers = view.get("workers", [])
    return (
        view["generation"] == generation
        and bool(workers)
        and all(w["generation"] == generation for w in workers)
    )


def post_reload(port: int, expected: int) -> None:
    status, body = admin(port, "POST", "/admin/reload")
    if status != 200 or body != {"generation": expected, "changed": True}:
        raise BenchError(f"POST /admin/reload: {status} {body} (expected generation {expected})")


@dataclass
class Lab:
    settings: Settings
    config: ConfigFile
    port: int
    admin_port: int
    backend_port: int
    generation: int = 1
    variant: int = 0
    storm_errors: list[str] = field(default_factory=list)

    def next_config(self) -> dict[str, Any]:
        self.variant += 1
        s = self.settings
        return routing_table(
            self.port, self.admin_port, s.workers, self.backend_port, s.routes, self.variant
        )


# --- 1. apply time ---------------------------------------------------------------------------


def measure_apply(lab: Lab) -> tuple[list[float], list[float], list[float]]:
    """(POST round trips, times until every worker has it, single /admin/config polls), in s."""
    posts: list[float] = []
    applies: list[float] = []
    polls: list[float] = []
    for _ in range(lab.settings.reloads):
        lab.config.write(lab.next_config())
        lab.generation += 1
        started = time.perf_counter()
        post_reload(lab.admin_port, lab.generation)
        posts.append(time.perf_counter() - started)
        deadline = time.monotonic() + APPLY_DEADLINE
        while True:
            poll_started = time.perf_counter()
            done = everyone_at(lab.admin_port, lab.generation)
            polls.append(time.perf_counter() - poll_started)
            if done:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"generation {lab.generation} not applied everywhere in time")
            # Polling flat out would take CPU from the workers it is timing (2 cores here).
            time.sleep(POLL_INTERVAL)
        applies.append(time.perf_counter() - started)
        # Let the workers settle (a collection, the old table freed) before the next one.
        time.sleep(0.1)
    return posts, applies, polls


# --- 2. latency, quiet and during a storm ----------------------------------------------------


def run_latency(lab: Lab) -> dict[str, Any]:
    """One open-loop latency run against Turnout (benchmarks/latency.py in its own process)."""
    s = lab.settings
    argv = [
        sys.executable,
        str(LATENCY_SCRIPT),
        "--target",
        f"turnout={lab.port}",
        "--path",
        "/small",
        "--rate",
        f"{s.rate:g}",
        "--duration",
        f"{s.duration:g}",
        "--warmup",
        "1",
        "--connections",
        str(s.connections),
        "--json",
    ]
    done = bl.run_bounded(argv, timeout=s.duration + 60)
    if done.returncode != 0:
        raise BenchError(f"latency.py failed:\n{done.stdout}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if not lines:
        raise BenchError(f"latency.py printed no result:\n{done.stdout}")
    result: dict[str, Any] = orjson.loads(lines[-1])[0]
    return result


def storm(lab: Lab, stop: threading.Event, count: list[int]) -> None:
    """Reload a changed file `storm_rate` times per second until `stop` is set."""
    period = 1.0 / lab.settings.storm_rate
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            lab.config.write(lab.next_config())
            lab.generation += 1
            post_reload(lab.admin_port, lab.generation)
            count[0] += 1
        except (BenchError, OSError) as exc:
            lab.storm_errors.append(str(exc))
            return
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))


def measure_storm(lab: Lab) -> tuple[dict[str, Any], int, float]:
    """Latency while reloading; (result, reloads done, seconds the storm lasted)."""
    stop = threading.Event()
    count = [0]
    driver = threading.Thread(target=storm, args=(lab, stop, count), daemon=True)
    started = time.monotonic()
    driver.start()
    try:
        result = run_latency(lab)
    finally:
        stop.set()
        driver.join(APPLY_DEADLINE)
    lasted = time.monotonic() - started
    if lab.storm_errors:
        raise BenchError(f"the reload storm failed: {lab.storm_errors[0]}")
    # The storm ran over the warmup second too; the last reload must have reached the workers.
    wait_until_applied(lab)
    return result, count[0], lasted


def wait_until_applied(lab: Lab) -> None:
    deadline = time.monotonic() + APPLY_DEADLINE
    while not everyone_at(lab.admin_port, lab.generation):
        if time.monotonic() > deadline:
            raise BenchError(f"generation {lab.generation} never reached every worker")
        time.sleep(0.05)


# --- report ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def apply_table(posts: list[float], applies: list[float], polls: list[float]) -> list[str]:
    return [
        "| measure | n | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| POST /admin/reload round trip | {len(posts)} | {ms(percentile(posts, 50))} "
        f"| {ms(percentile(posts, 99))} | {ms(max(posts))} |",
        f"| until every worker reports the generation | {len(applies)} "
        f"| {ms(percentile(applies, 50))} | {ms(percentile(applies, 99))} | {ms(max(applies))} |",
        f"| one GET /admin/config (the poll's own cost) | {len(polls)} "
        f"| {ms(percentile(polls, 50))} | {ms(percentile(polls, 99))} | {ms(max(polls))} |",
    ]


def latency_table(rows: list[tuple[str, int, dict[str, Any]]]) -> list[str]:
    lines = [
        "| phase | reloads | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, reloads, r in rows:
        errors = int(r["non_2xx"]) + int(r["failures"]) + int(r["incomplete"])
        lines.append(
            f"| {name} | {reloads} | {r['achieved_rate']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:.2f} | {errors} |"
        )
    return lines


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    nginx = _which("nginx")
    if nginx is None:
        print("error: nginx is needed for the backend (as in benchmarks/run.py)", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    with bl.session_dir("turnout-reload-bench-") as tmp, contextlib.ExitStack() as stack:
        backend_port = bl.free_port()
        conf = bl.write_backend_conf(tmp / "backend", backend_port)
        backend = bl.Proc(
            "backend nginx",
            bl.nginx_argv(nginx, tmp / "backend", conf, None),
            tmp / "backend" / "error.log",
        )
        stack.callback(backend.stop)
        bl.wait_for_http(backend, backend_port, "/small", 10.0)

        folder = tmp / "config"
        folder.mkdir()
        lab = Lab(settings, ConfigFile(folder), bl.free_port(), bl.free_port(), backend_port)
        lab.config.write(lab.next_config())
        log = tmp / "turnout.stderr.log"
        turnout = bl.Proc(
            "turnout",
            [sys.executable, "-m", "proxy", "run", str(lab.config.path), "--no-access-log"],
            log,
            stdout_devnull=True,
            cwd=REPO,
        )
        stack.callback(turnout.stop)
        bl.wait_for_turnout(turnout, lab.port, lab.admin_port, "/small", 30.0)
        size = len((lab.config.versions / "current.yaml").read_bytes())
        print(
            f"turnout: {settings.workers} worker(s), {settings.routes} routes "
            f"({size / 1024:.0f} KiB of YAML), backend nginx on {bl.LOOPBACK}:{backend_port}",
            flush=True,
        )

        print(f"timing {settings.reloads} reloads ...", flush=True)
        posts, applies, polls = measure_apply(lab)
        print(f"latency at {settings.rate:g} req/s, quiet ...", flush=True)
        quiet = run_latency(lab)
        print(f"latency at {settings.rate:g} req/s, {settings.storm_rate:g} reloads/s ...")
        stormy, reloads, lasted = measure_storm(lab)
        if not turnout.alive():
            raise BenchError(f"turnout exited during the run:\n{turnout.log_tail()}")

    load_after = os.getloadavg()
    print()
    print(
        f"## Reload apply time: {settings.routes} routes, {settings.workers} worker(s), "
        "each reload changes one route's split"
    )
    print()
    print("\n".join(apply_table(posts, applies, polls)))
    print()
    print(
        f"## Request latency: GET /small (route {settings.routes // 2} of {settings.routes}), "
        f"{settings.rate:g} req/s open loop, {settings.connections} connections, "
        f"{settings.duration:g} s per phase"
    )
    print()
    storm_name = f"storm, {reloads / lasted:.1f} reloads/s"
    print("\n".join(latency_table([("quiet", 0, quiet), (storm_name, reloads, stormy)])))
    print()
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"on {os.cpu_count()} CPUs (other processes share this machine)"
    )
    errors = sum(int(r[k]) for r in (quiet, stormy) for k in ("non_2xx", "failures", "incomplete"))
    return 1 if errors else 0


def _which(tool: str) -> str | None:
    for folder in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"):
        candidate = Path(folder) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (bl.StartError, BenchError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
