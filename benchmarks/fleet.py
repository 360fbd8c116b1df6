"""Fleet mode (issue 11): how fast a flip reaches every instance, and what fleet mode costs.

    .venv/bin/python benchmarks/fleet.py            # 200 flips, 6 rounds of 10 s wrk (~5 minutes)
    .venv/bin/python benchmarks/fleet.py --quick    # 30 flips, 2 rounds of 3 s (< 1 minute)
    .venv/bin/python benchmarks/fleet.py --only flips     # or: --only hotpath
    .venv/bin/python benchmarks/fleet.py --only hotpath --dry   # A/A: the noise floor

One invocation starts a `redis-server` on a free port (no persistence: `--save ''`, no
append-only file) and one nginx backend with two servers, `blue` and `green`: `/color` answers
`blue` or `green`, `/small` the 100-byte body of the other benchmarks. Then:

1. **Flip propagation.** `--instances` (3) Turnout processes, 1 worker each, their own ports,
   one fleet (`fleet: {name, redis, instance, lease: 2s}`), route `flip` split between the two
   upstreams. `--flips` (200) times: `PUT /admin/routes/flip/split {"<color>": 100}` on one
   instance (the next one each time; the color alternates green, blue, ...), and from the
   moment the PUT is sent, one thread per *other* instance polls `GET /color` through that
   instance's listener until the new color answers: the flip is in force on its data plane.
   The same thread also polls `GET /admin/routes` until `effective_split` shows the new color
   at 100 (`--no-admin-poll` leaves that out). Printed: the PUT's round trip (it answers once
   the split is stored in Redis and in force on its own instance), the time until the flip is
   in force on *both* other instances, on each one, and in their admin view; p50/p99/max.
   Each poll waits 2 ms after the previous answer, so the figures are upper bounds by about
   one poll interval plus one poll (the poll's own time is printed too).
2. **The hot path's cost of fleet mode.** One Turnout without `fleet`, one with it (a fleet of
   its own on the same Redis), and NGINX as the reference proxy, each 1 worker in front of the
   `blue` server, with the config of `run.py --features` (90/10 split, sticky, override) and the
   same runtime split put on both Turnouts through the admin API (on the fleet instance it is
   the fleet's shared split). wrk (`-t2 -c64`, `GET /small`, `x-user` sent) runs against each in
   turn for `--rounds` rounds, alternating which Turnout goes first (A B, B A, ...) so drift
   hits both alike; with `--pin` (the default) the proxies run on core 0 and the backend,
   Redis and wrk on the last core, as `run.py --pin` does. Printed: every run, the medians, and
   the fleet/plain ratios of req/s (the issue's target: within 2 %) and of CPU per request,
   per round and their medians. `--dry` puts a second Turnout *without* `fleet` in the fleet
   one's place: an A/A run that shows how much of a difference is noise.

The CPU other processes used during each run is printed (bg CPU %); over 10 % of a core means
the machine was not quiet. The report is also written to `benchmarks/out/fleet-<timestamp>.md`.
All traffic stays on 127.0.0.1; every wait is bounded; every process started here is stopped on
exit, Ctrl-C, SIGTERM or error. See docs/benchmarks.md#fleet and docs/fleet.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import benchlib as bl
import orjson
from benchlib import percentile
from run import (
    NOISY_BACKGROUND_PCT,
    WRK_DONE_LUA,
    BenchError,
    Pinning,
    choose_pinning,
    ensure_tools,
    machine_lines,
    which,
    wrk_figures,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COLORS = ("blue", "green")
ROUTE = "flip"
FLIP_FLEET = "bench-flips"
HOTPATH_FLEET = "bench-hotpath"
LEASE = "2s"
# Between two polls of one instance (after the answer): the figures' resolution.
POLL_INTERVAL = 0.002
# A flip not in force everywhere after this long is counted as missed ...
FLIP_DEADLINE = 5.0
# ... and if it is still not in force after this much more, the run stops.
CONVERGE_DEADLINE = 10.0
# A random pause between flips, so flips do not fall in step with the fleet's 1/3-lease period.
FLIP_GAP = (0.03, 0.09)
# How long the fleet may take to form (every instance connected and in /admin/fleet).
FORM_DEADLINE = 20.0
TURNOUT_START_DEADLINE = 30.0
# The targets: in force everywhere within 1 s p99; fleet req/s within 2 % of plain.
TARGET_P99_S = 1.0
TARGET_COST = 0.02
WRK_THREADS = 2
STICKY_HEADER = ("x-user", "bench-user")
# The hot-path runs put this runtime split on both Turnouts (the file's own weights).
HOTPATH_SPLIT = {"blue": 90, "green": 10}
PLAIN_LABEL = "turnout"
FLEET_LABEL = "turnout+fleet"
# --dry: a second Turnout without `fleet` in the fleet one's place (an A/A run: the noise).
DRY_LABEL = "turnout-b"


@dataclass(frozen=True)
class Settings:
    """Everything the command line decides."""

    flips: int
    instances: int
    rounds: int
    duration: int
    warmup: int
    connections: int
    pin: bool
    admin_poll: bool
    phases: tuple[str, ...]
    seed: int
    dry: bool

    @property
    def second(self) -> str:
        """The label of the Turnout compared with the plain one."""
        return DRY_LABEL if self.dry else FLEET_LABEL


def parse_args(argv: list[str] | None) -> Settings:
    """Parse the command line (quick mode shortens the defaults)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 flips, 2 rounds of 3 s")
    parser.add_argument("--flips", type=int, help="flips timed (200; quick 30)")
    parser.add_argument("--instances", type=int, default=3, help="fleet instances (3)")
    parser.add_argument("--rounds", type=int, help="wrk rounds per proxy (6; quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per measured wrk run (10; quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of discarded load first (2; quick 1)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hot path: proxies on core 0, backend, Redis and wrk on the last core (default on)",
    )
    parser.add_argument(
        "--admin-poll",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flips: also poll GET /admin/routes for the admin-visible time (default on)",
    )
    parser.add_argument(
        "--only", choices=["flips", "hotpath"], help="run one part only (default: both)"
    )
    parser.add_argument("--seed", type=int, default=11, help="seed of the pauses between flips")
    parser.add_argument(
        "--dry",
        action="store_true",
        help="hot path: a second Turnout without fleet stands in for turnout+fleet (the noise)",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        flips=args.flips or (30 if quick else 200),
        instances=args.instances,
        rounds=args.rounds or (2 if quick else 6),
        duration=args.duration or (3 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        connections=args.connections,
        pin=args.pin,
        admin_poll=args.admin_poll,
        phases=(args.only,) if args.only else ("flips", "hotpath"),
        seed=args.seed,
        dry=args.dry,
    )
    if settings.instances < 2:
        parser.error("--instances must be at least 2 (a flip must have somewhere to go)")
    if min(settings.flips, settings.rounds, settings.duration, settings.connections) < 1:
        parser.error("flips, rounds, duration and connections must be positive")
    return settings


# --- HTTP ------------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:`port`, opened again after an error.

    Not thread-safe: each thread has its own.
    """

    def __init__(self, port: int, timeout: float = FLIP_DEADLINE) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request; (status, body). A dropped keep-alive connection is retried once
        on a new one; OSError or HTTPException when that fails too."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(bl.LOOPBACK, self.port, self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """`request` with a JSON body (None: none) and a JSON answer (None when empty)."""
        status, data = self.request(method, path, None if body is None else orjson.dumps(body))
        try:
            return status, orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            return status, data.decode(errors="replace")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- processes -------------------------------------------------------------------------------


def write_backend_conf(prefix: Path, ports: dict[str, int]) -> Path:
    """nginx with one server per color: `/color` answers the color, `/small` the 100 bytes of
    benchlib's backend, anything else 404. Everything it writes stays under `prefix`."""
    prefix.mkdir(parents=True, exist_ok=True)
    servers = "".join(
        f"""
    server {{
        listen {bl.LOOPBACK}:{port} backlog=4096;
        default_type text/plain;
        location = /color {{ return 200 "{color}\\n"; }}
        location = /small {{ return 200 "{bl.SMALL_BODY.rstrip()}\\n"; }}
        location / {{ return 404; }}
    }}"""
        for color, port in ports.items()
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        bl.nginx_common(prefix, 1) + f"http {{\n{bl.nginx_http_common(prefix)}{servers}\n}}\n"
    )
    return conf


def redis_binary() -> str:
    """redis-server (or valkey-server), installed with apt-get when neither is there."""
    found = which("redis-server") or which("valkey-server")
    if found is None:
        print("missing redis-server; running: apt-get install -y redis-server", flush=True)
        if subprocess.run(["apt-get", "install", "-y", "redis-server"], check=False).returncode:
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True)
        found = which("redis-server")
    if found is None:
        raise SystemExit("redis-server is still missing after apt-get")
    return found


def redis_ping(port: int) -> bool:
    """True when 127.0.0.1:`port` answers an inline PING with +PONG."""
    try:
        with socket.create_connection((bl.LOOPBACK, port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    binary: str, folder: Path, cores: frozenset[int] | None, stack: contextlib.ExitStack
) -> int:
    """redis-server on a free port, nothing saved to disk; its port once it answers PING."""
    folder.mkdir(parents=True, exist_ok=True)
    port = bl.free_port()
    argv = [
        *bl.taskset_prefix(cores),
        binary,
        "--port",
        str(port),
        "--bind",
        bl.LOOPBACK,
        "--dir",
        str(folder),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    proc = bl.Proc("redis-server", argv, folder / "redis.log")
    stack.callback(proc.stop)
    deadline = time.monotonic() + 10.0
    while not redis_ping(port):
        if not proc.alive() or time.monotonic() > deadline:
            raise bl.StartError(f"redis-server did not answer PING:\n{proc.log_tail()}")
        time.sleep(0.02)
    return port


@dataclass
class Turnout:
    """A started Turnout: its name, ports and process."""

    name: str
    port: int
    admin_port: int
    proc: bl.Proc


def start_turnout(
    tmp: Path,
    name: str,
    config: dict[str, Any],
    cores: frozenset[int] | None,
    stack: contextlib.ExitStack,
) -> Turnout:
    """Write `config`, run `python -m proxy run CONFIG --no-access-log`, wait until ready."""
    conf = bl.write_turnout_conf(tmp / f"{name}.yaml", config)
    argv = [
        *bl.taskset_prefix(cores),
        sys.executable,
        "-m",
        "proxy",
        "run",
        str(conf),
        "--no-access-log",
    ]
    proc = bl.Proc(name, argv, tmp / f"{name}.stderr.log", stdout_devnull=True, cwd=REPO)
    stack.callback(proc.stop)
    port = int(str(config["listen"]).rsplit(":", 1)[1])
    admin_port = int(str(config["admin"]).rsplit(":", 1)[1])
    bl.wait_for_turnout(proc, port, admin_port, "/small", TURNOUT_START_DEADLINE)
    return Turnout(name, port, admin_port, proc)


def fleet_block(name: str, redis_port: int, instance: str) -> dict[str, str]:
    return {
        "name": name,
        "redis": f"redis://{bl.LOOPBACK}:{redis_port}/0",
        "instance": instance,
        "lease": LEASE,
    }


# --- 1. flip propagation ---------------------------------------------------------------------


def flip_config(
    port: int, admin_port: int, colors: dict[str, int], redis_port: int, instance: str
) -> dict[str, Any]:
    """One route `flip` on the two colored upstreams, blue in force at first; in the fleet."""
    return {
        "listen": f"{bl.LOOPBACK}:{port}",
        "admin": f"{bl.LOOPBACK}:{admin_port}",
        "workers": 1,
        "fleet": fleet_block(FLIP_FLEET, redis_port, instance),
        "upstreams": {c: {"endpoints": [f"{bl.LOOPBACK}:{p}"]} for c, p in colors.items()},
        "routes": [
            {"name": ROUTE, "match": {"path_prefix": "/"}, "split": {"blue": 100, "green": 0}}
        ],
    }


class Member:
    """A fleet instance and its clients: `admin` and `data` for the main thread (PUTs, checks
    between flips), `watch_admin` and `watch_data` for the one thread watching it in a flip."""

    def __init__(self, turnout: Turnout) -> None:
        self.turnout = turnout
        self.name = turnout.name
        self.admin = Client(turnout.admin_port)
        self.data = Client(turnout.port)
        self.watch_admin = Client(turnout.admin_port)
        self.watch_data = Client(turnout.port)

    def close(self) -> None:
        for client in (self.admin, self.data, self.watch_admin, self.watch_data):
            client.close()


@dataclass
class Watch:
    """What one watcher saw after a PUT: seconds until the new color answered on the data
    plane and until the admin view showed it (None: not within FLIP_DEADLINE)."""

    data_s: float | None = None
    admin_s: float | None = None
    poll_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Flip:
    """One timed flip: the PUT's round trip and what each other instance's watcher saw."""

    source: str
    color: str
    put_s: float
    watches: dict[str, Watch]

    @property
    def everywhere_s(self) -> float | None:
        """Until the flip was in force on the data plane of every other instance."""
        return _slowest([w.data_s for w in self.watches.values()])

    @property
    def admin_everywhere_s(self) -> float | None:
        """Until every other instance's GET /admin/routes showed it."""
        return _slowest([w.admin_s for w in self.watches.values()])


def _slowest(times: list[float | None]) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known and len(known) == len(times) else None


def served_color(client: Client) -> str:
    """What GET /color through an instance answers: `blue`, `green`, or the odd status."""
    status, body = client.request("GET", "/color")
    return body.decode(errors="replace").strip() if status == 200 else f"status {status}"


def admin_color(client: Client) -> str | None:
    """The color at weight 100 in route `flip`'s effective split (None: neither is)."""
    status, view = client.json("GET", "/admin/routes")
    if status != 200 or not isinstance(view, dict):
        return None
    for route in view.get("routes", []):
        if route.get("name") == ROUTE:
            split = route.get("effective_split") or {}
            for color in COLORS:
                if split.get(color) == 100:
                    return color
    return None


def watch(
    member: Member, color: str, go: threading.Event, t0: list[float], admin_poll: bool, out: Watch
) -> None:
    """Thread target: from the moment `go` is set (at t0[0]), poll `member` until `color` is
    in force on its data plane (and, with `admin_poll`, in its admin view)."""
    if not go.wait(FLIP_DEADLINE):
        out.error = "never started"
        return
    start = t0[0]
    try:
        while time.perf_counter() - start < FLIP_DEADLINE:
            sent = time.perf_counter()
            seen = served_color(member.watch_data)
            answered = time.perf_counter()
            out.poll_s.append(answered - sent)
            if out.data_s is None and seen == color:
                out.data_s = answered - start
            if admin_poll and out.admin_s is None and admin_color(member.watch_admin) == color:
                out.admin_s = time.perf_counter() - start
            if out.data_s is not None and (out.admin_s is not None or not admin_poll):
                return
            time.sleep(POLL_INTERVAL)
        out.error = "deadline"
    except (OSError, http.client.HTTPException) as exc:
        out.error = f"{type(exc).__name__}: {exc}"


def one_flip(members: list[Member], index: int, admin_poll: bool) -> Flip:
    """PUT the next color on member `index % n` and time its arrival on the others."""
    source = members[index % len(members)]
    others = [m for m in members if m is not source]
    color = COLORS[(index + 1) % 2]  # blue is in force at first: green, blue, green, ...
    go = threading.Event()
    t0 = [0.0]
    watches = {m.name: Watch() for m in others}
    threads = [
        threading.Thread(
            target=watch,
            args=(m, color, go, t0, admin_poll, watches[m.name]),
            name=f"watch-{m.name}",
            daemon=True,
        )
        for m in others
    ]
    for thread in threads:
        thread.start()
    t0[0] = time.perf_counter()
    go.set()
    try:
        status, answer = source.admin.json("PUT", f"/admin/routes/{ROUTE}/split", {color: 100})
        put_s = time.perf_counter() - t0[0]
    finally:
        for thread in threads:
            thread.join(FLIP_DEADLINE + 5)
    if status != 200 or not isinstance(answer, dict):
        raise BenchError(f"PUT on {source.name}: {status} {answer}")
    split = answer.get("effective_split") or {}
    if split.get(color) != 100 or answer.get("split_source") != "fleet":
        raise BenchError(f"PUT {color} on {source.name} answered {answer}")
    return Flip(source.name, color, put_s, watches)


def wait_converged(members: list[Member], color: str, deadline_s: float) -> None:
    """Wait until every member serves `color`; BenchError naming the laggards if not."""
    deadline = time.monotonic() + deadline_s
    while True:
        seen = {m.name: served_color(m.data) for m in members}
        wrong = {name: got for name, got in seen.items() if got != color}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"not serving {color} after {deadline_s:.0f} s: {wrong}")
        time.sleep(0.05)


def wait_formed(members: list[Member]) -> dict[str, Any]:
    """Wait until every instance is connected, a leader is known, and each one sees all of
    them in GET /admin/fleet; the first instance's view."""
    deadline = time.monotonic() + FORM_DEADLINE
    names = sorted(m.name for m in members)
    while True:
        views = [m.admin.json("GET", "/admin/fleet")[1] for m in members]
        if all(
            isinstance(v, dict)
            and v.get("connected")
            and v.get("leader")
            and sorted(i["instance"] for i in v.get("instances", [])) == names
            for v in views
        ):
            view: dict[str, Any] = views[0]
            return view
        if time.monotonic() > deadline:
            raise BenchError(f"the fleet did not form in {FORM_DEADLINE:.0f} s: {views}")
        time.sleep(0.1)


@dataclass(frozen=True)
class FlipReport:
    """Everything part 1 measured."""

    flips: list[Flip]
    instances: int
    leader: str
    revisions: tuple[int, int]
    background_pct: float
    seconds: float
    missed: int


def flip_phase(
    settings: Settings, tmp: Path, colors: dict[str, int], redis_port: int
) -> FlipReport:
    """Start the fleet, time the flips, stop the fleet."""
    rng = random.Random(settings.seed)
    with contextlib.ExitStack() as stack:
        members: list[Member] = []
        for number in range(1, settings.instances + 1):
            name = f"edge-{number}"
            port, admin_port = bl.free_port(), bl.free_port()
            config = flip_config(port, admin_port, colors, redis_port, name)
            member = Member(start_turnout(tmp, name, config, None, stack))
            stack.callback(member.close)
            members.append(member)
        view = wait_formed(members)
        wait_converged(members, "blue", CONVERGE_DEADLINE)
        first_rev = int(view["revision"])
        print(
            f"fleet {FLIP_FLEET}: {len(members)} instances, leader {view['leader']}, "
            f"revision {first_rev}; timing {settings.flips} flips ...",
            flush=True,
        )
        flips: list[Flip] = []
        missed = 0
        ours = set(bl.process_tree(os.getpid()))
        began = time.monotonic()
        before = bl.cpu_snapshot()
        for index in range(settings.flips):
            for member in members:
                if not member.turnout.proc.alive():
                    raise BenchError(f"{member.name} exited:\n{member.turnout.proc.log_tail()}")
            flip = one_flip(members, index, settings.admin_poll)
            flips.append(flip)
            if flip.everywhere_s is None:
                missed += 1
                late = {n: w.error for n, w in flip.watches.items() if w.data_s is None}
                print(f"  flip {index + 1} ({flip.color}) not in force in time: {late}")
                wait_converged(members, flip.color, CONVERGE_DEADLINE)
            if (index + 1) % 50 == 0:
                done = [f.everywhere_s for f in flips if f.everywhere_s is not None]
                print(
                    f"  {index + 1} flips: in force everywhere p50 {ms(percentile(done, 50))} ms,"
                    f" max {ms(max(done, default=0.0))} ms",
                    flush=True,
                )
            time.sleep(rng.uniform(*FLIP_GAP))
        after = bl.cpu_snapshot()
        seconds = time.monotonic() - began
        ours.update(bl.process_tree(os.getpid()))
        background = bl.cpu_used_by_others(before, after, ours) / seconds * 100
        last_view = wait_formed(members)
        last_color = flips[-1].color
        for member in members:
            if admin_color(member.admin) != last_color:
                raise BenchError(
                    f"{member.name}'s admin view does not show {last_color} at the end"
                )
        return FlipReport(
            flips=flips,
            instances=len(members),
            leader=str(view["leader"]),
            revisions=(first_rev, int(last_view["revision"])),
            background_pct=background,
            seconds=seconds,
            missed=missed,
        )


def flip_lines(report: FlipReport, admin_poll: bool) -> list[str]:
    """The flip table and what to read from it."""
    flips = report.flips
    puts = [f.put_s for f in flips]
    everywhere = [t for f in flips if (t := f.everywhere_s) is not None]
    each = [w.data_s for f in flips for w in f.watches.values() if w.data_s is not None]
    admin = [t for f in flips if (t := f.admin_everywhere_s) is not None]
    polls = [p for f in flips for w in f.watches.values() for p in w.poll_s]
    others = report.instances - 1
    rows = [
        ("PUT round trip (stored in Redis, in force on its own instance)", puts),
        (f"in force on all {others} other instances (data plane)", everywhere),
        ("in force on one other instance (data plane, each counted)", each),
    ]
    if admin_poll:
        rows.append((f"shown in GET /admin/routes of all {others} others", admin))
    rows.append(("one poll: GET /color through an instance (resolution)", polls))
    lines = ["| measure | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, values in rows:
        lines.append(
            f"| {name} | {len(values)} | {ms(percentile(values, 50))} "
            f"| {ms(percentile(values, 99))} | {ms(max(values, default=0.0))} |"
        )
    early = sum(1 for f in flips if (t := f.everywhere_s) is not None and t <= f.put_s)
    p99 = percentile(everywhere, 99) if everywhere else math.inf
    met = "met" if p99 <= TARGET_P99_S and not report.missed else "NOT met"
    first, last = report.revisions
    noisy = " (not quiet)" if report.background_pct > NOISY_BACKGROUND_PCT else ""
    lines += [
        "",
        f"- {len(flips)} flips in {report.seconds:.1f} s, each a PUT of 100 % to the other "
        f"color on the next instance in turn; leader at the start: {report.leader}",
        f"- in force on every other instance before the PUT had answered: {early} of "
        f"{len(flips)}; missed ({FLIP_DEADLINE:.0f} s): {report.missed}",
        f"- the fleet's revision went from {first} to {last} ({last - first} writes for "
        f"{len(flips)} flips)",
        f"- bg CPU during the flips: {report.background_pct:.0f}% of a core{noisy}",
        f"- target (issue 11): in force everywhere within {TARGET_P99_S:.0f} s p99: "
        f"{ms(p99)} ms, {met}",
    ]
    return lines


# --- 2. the hot path's cost ------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A proxy under load: its label, data port and process."""

    label: str
    port: int
    proc: bl.Proc


@dataclass(frozen=True)
class RunResult:
    """One measured wrk run against one proxy."""

    label: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    root_cores: float
    background_pct: float
    errors: dict[str, int]


def write_lua(tmp: Path) -> Path:
    path = tmp / "fleet-small.lua"
    path.write_text(f'wrk.headers["{STICKY_HEADER[0]}"] = "{STICKY_HEADER[1]}"\n' + WRK_DONE_LUA)
    return path


def run_wrk(
    wrk: str, pinning: Pinning, url: str, connections: int, seconds: int, script: Path
) -> dict[str, float]:
    argv = [
        *bl.taskset_prefix(pinning.load),
        wrk,
        f"-t{min(WRK_THREADS, connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    return wrk_figures(bl.run_bounded(argv, timeout=seconds + 30))


def measure(
    settings: Settings, wrk: str, pinning: Pinning, subject: Subject, round_: int, script: Path
) -> RunResult:
    """Warm up, then one measured wrk run with the proxy's CPU time and the background's."""
    url = f"http://{bl.LOOPBACK}:{subject.port}/small"
    if settings.warmup:
        run_wrk(wrk, pinning, url, settings.connections, settings.warmup, script)
    pids = bl.process_tree(subject.proc.pid)
    before = bl.cpu_snapshot()
    figures = run_wrk(wrk, pinning, url, settings.connections, settings.duration, script)
    after = bl.cpu_snapshot()
    # Every process this harness started (wrk is gone by now and not in `after` either).
    ours = set(bl.process_tree(os.getpid()))
    if not subject.proc.alive():
        raise BenchError(f"{subject.label} died during the run:\n{subject.proc.log_tail()}")
    requests = int(figures["requests"])
    seconds = figures["duration_us"] / 1e6
    return RunResult(
        label=subject.label,
        round=round_,
        rps=requests / seconds,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        cpu_us_per_req=bl.cpu_used(before, after, pids) * 1e6 / requests if requests else 0.0,
        root_cores=bl.cpu_used(before, after, [subject.proc.pid]) / seconds,
        background_pct=bl.cpu_used_by_others(before, after, ours) / seconds * 100,
        errors={
            key: int(figures[key])
            for key in ("status", "connect", "read", "write", "timeout")
            if figures[key]
        },
    )


def put_split(turnout: Turnout, expected_source: str) -> None:
    """Put HOTPATH_SPLIT in force on `turnout` through its admin API."""
    client = Client(turnout.admin_port)
    try:
        status, answer = client.json("PUT", "/admin/routes/bench/split", HOTPATH_SPLIT)
    finally:
        client.close()
    if status != 200 or not isinstance(answer, dict) or answer["split_source"] != expected_source:
        raise BenchError(f"PUT split on {turnout.name}: {status} {answer}")


def hotpath_phase(
    settings: Settings,
    tools: dict[str, str],
    pinning: Pinning,
    tmp: Path,
    backend_port: int,
    redis_port: int,
) -> list[RunResult]:
    """NGINX, Turnout and Turnout with `fleet` in turn, `rounds` times; every run."""
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        prefix = tmp / "nginx-proxy"
        port = bl.free_port()
        conf = bl.write_proxy_conf(prefix, port, backend_port, 1, 64)
        proc = bl.Proc(
            "nginx",
            bl.nginx_argv(tools["nginx"], prefix, conf, pinning.proxy),
            prefix / "error.log",
        )
        stack.callback(proc.stop)
        bl.wait_for_http(proc, port, "/small", 10.0)
        nginx = Subject("nginx", port, proc)

        def turnout(label: str, fleet: bool) -> Subject:
            port, admin_port = bl.free_port(), bl.free_port()
            config = bl.turnout_config(port, admin_port, 1, backend_port, features=True)
            if fleet:
                config = {"fleet": fleet_block(HOTPATH_FLEET, redis_port, label), **config}
            started = start_turnout(tmp, label, config, pinning.proxy, stack)
            if fleet:
                # The fleet instance must have joined before its change can be stored.
                member = Member(started)
                stack.callback(member.close)
                wait_formed([member])
            put_split(started, "fleet" if fleet else "runtime")
            return Subject(label, port, started.proc)

        plain = turnout(PLAIN_LABEL, fleet=False)
        fleet = turnout(settings.second, fleet=not settings.dry)
        print(
            f"nginx, {PLAIN_LABEL} and {settings.second} ready; "
            f"{settings.rounds} round(s) of {settings.warmup} s + {settings.duration} s each",
            flush=True,
        )
        script = write_lua(tmp)
        for round_ in range(1, settings.rounds + 1):
            pair = [plain, fleet] if round_ % 2 else [fleet, plain]
            for subject in [nginx, *pair]:
                result = measure(settings, tools["wrk"], pinning, subject, round_, script)
                results.append(result)
                print(describe(result), flush=True)
    return results


def describe(r: RunResult) -> str:
    errors = f"  ERRORS {r.errors}" if r.errors else ""
    return (
        f"  round {r.round} {r.label:<14} {r.rps:>8.0f} req/s  p50 {r.p50_ms:.3f} ms  "
        f"p99 {r.p99_ms:.3f} ms  {r.cpu_us_per_req:.1f} CPU µs/req  "
        f"supervisor/master {r.root_cores:.3f} cores  bg {r.background_pct:.0f}%{errors}"
    )


def hotpath_lines(settings: Settings, pinning: Pinning, results: list[RunResult]) -> list[str]:
    """Every run, the medians, and the fleet/plain ratio per round against the target."""
    lines = [
        "| round | proxy | req/s | p50 ms | p99 ms | CPU µs/req | supervisor / master cores "
        "| bg CPU % | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {r.round} | {r.label} | {r.rps:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} "
            f"| {r.cpu_us_per_req:.1f} | {r.root_cores:.3f} | {r.background_pct:.0f} "
            f"| {errors} |"
        )
    labels = list(dict.fromkeys(r.label for r in results))
    by_label = {label: [r for r in results if r.label == label] for label in labels}
    medians = {label: statistics.median(r.rps for r in runs) for label, runs in by_label.items()}
    lines += [
        "",
        "| proxy | runs | median req/s | vs nginx | median CPU µs/req "
        "| median supervisor / master cores |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, runs in by_label.items():
        base = medians.get("nginx")
        ratio = "-" if label == "nginx" or not base else f"{medians[label] / base:.2f}x"
        lines.append(
            f"| {label} | {len(runs)} | {medians[label]:.0f} | {ratio} "
            f"| {statistics.median(r.cpu_us_per_req for r in runs):.1f} "
            f"| {statistics.median(r.root_cores for r in runs):.3f} |"
        )
    rounds = sorted({r.round for r in results})
    ratios, cpu_ratios = [], []
    for round_ in rounds:
        pair = {r.label: r for r in results if r.round == round_}
        plain, fleet = pair.get(PLAIN_LABEL), pair.get(settings.second)
        if plain is not None and fleet is not None and plain.rps and plain.cpu_us_per_req:
            ratios.append(fleet.rps / plain.rps)
            cpu_ratios.append(fleet.cpu_us_per_req / plain.cpu_us_per_req)
    noisy = [r for r in results if r.background_pct > NOISY_BACKGROUND_PCT]
    lines += [
        "",
        f"- pinning: {pinning.description}",
        f"- wrk -t{WRK_THREADS} -c{settings.connections}, GET /small with `x-user`, "
        f"{settings.warmup} s warm-up + {settings.duration} s per run; the order alternates "
        f"{PLAIN_LABEL} / {settings.second} from round to round",
    ]
    if ratios:
        median = statistics.median(ratios)
        met = "met" if median >= 1 - TARGET_COST else "NOT met"
        if noisy:
            met += " (the machine was not quiet: see the CPU ratio, and rerun)"
        if settings.dry:
            met = "not judged: --dry, both without fleet, so this is the noise"
        lines.append(
            f"- {settings.second} / {PLAIN_LABEL} req/s per round: "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + f"; median {median:.3f} ({(median - 1) * 100:+.1f} %); target (issue 11) within "
            f"{TARGET_COST:.0%}: {met}"
        )
        cpu = statistics.median(cpu_ratios)
        lines.append(
            f"- {settings.second} / {PLAIN_LABEL} CPU µs per request per round (less sensitive "
            "to other load than req/s): "
            + ", ".join(f"{x:.3f}" for x in cpu_ratios)
            + f"; median {cpu:.3f} ({(cpu - 1) * 100:+.1f} %)"
        )
    if noisy:
        lines.append(
            f"- {len(noisy)} of {len(results)} runs had other processes using more than "
            f"{NOISY_BACKGROUND_PCT}% of a core (bg CPU %): the machine was not quiet"
        )
    return lines


# --- main ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _redis_version(binary: str) -> str:
    try:
        done = bl.run_bounded([binary, "--version"], timeout=10)
    except OSError:
        return "redis-server (version unknown)"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "redis-server"


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for; print the report and write it to benchmarks/out."""
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, bl.interrupt_on_sigterm)
    tools = ensure_tools(settings.pin)
    redis = redis_binary()
    pinning = choose_pinning(settings.pin, [1])
    stamp = bl.timestamp()
    load_before = os.getloadavg()
    started = time.monotonic()
    flips: FlipReport | None = None
    runs: list[RunResult] = []
    notes: list[str] = []
    status = 1
    try:
        with bl.session_dir("turnout-fleet-bench-") as tmp, contextlib.ExitStack() as stack:
            colors = {color: bl.free_port() for color in COLORS}
            prefix = tmp / "backend"
            conf = write_backend_conf(prefix, colors)
            backend = bl.Proc(
                "backend nginx",
                bl.nginx_argv(tools["nginx"], prefix, conf, pinning.load),
                prefix / "error.log",
            )
            stack.callback(backend.stop)
            for port in colors.values():
                bl.wait_for_http(backend, port, "/small", 10.0)
            redis_port = start_redis(redis, tmp / "redis", pinning.load, stack)
            print(
                f"backend nginx blue {colors['blue']} green {colors['green']}; "
                f"redis-server on {bl.LOOPBACK}:{redis_port}",
                flush=True,
            )
            if "flips" in settings.phases:
                flips = flip_phase(settings, tmp, colors, redis_port)
            if "hotpath" in settings.phases:
                print(f"pinning: {pinning.description}", flush=True)
                runs = hotpath_phase(settings, tools, pinning, tmp, colors["blue"], redis_port)
        status = 0
    except (
        bl.StartError,
        BenchError,
        subprocess.TimeoutExpired,
        OSError,
        http.client.HTTPException,
    ) as exc:
        notes.append(f"stopped early: {str(exc).splitlines()[0]}")
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        notes.append("interrupted")
        print("interrupted; all processes stopped", file=sys.stderr)
        status = 130
    load_after = os.getloadavg()
    lines = [
        f"# Turnout fleet benchmark, {datetime.now().isoformat(timespec='seconds')}"
        + ("" if status == 0 else " (INCOMPLETE)"),
        "",
        *machine_lines(tools),
        f"- {_redis_version(redis)}; lease {LEASE}; 1 worker per Turnout",
        f"- load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end "
        f"({os.cpu_count()} CPUs); took {time.monotonic() - started:.0f} s",
        "",
    ]
    if flips is not None:
        lines += [
            f"## Flip propagation: {flips.instances} instances, {len(flips.flips)} flips",
            "",
            *flip_lines(flips, settings.admin_poll),
            "",
        ]
    if runs:
        lines += [
            "## Hot-path cost of fleet mode: 1 worker, small, "
            f"c{settings.connections}, {settings.rounds} rounds"
            + (" (--dry: no fleet on either Turnout)" if settings.dry else ""),
            "",
            *hotpath_lines(settings, pinning, runs),
            "",
        ]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    text = "\n".join(lines)
    out = bl.write_report(f"fleet-{stamp}", text)
    print(f"written: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
