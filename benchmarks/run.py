"""Turnout and NGINX side by side, in front of the same nginx backend, with one command.

    .venv/bin/python benchmarks/run.py              # full run (~10 minutes)
    .venv/bin/python benchmarks/run.py --quick      # one short pass (< 2 minutes)
    .venv/bin/python benchmarks/run.py --dry        # nginx in Turnout's place: shows the noise
    .venv/bin/python benchmarks/run.py --fixed-rate 2000   # open-loop latency instead of wrk

See docs/benchmarks.md for what is measured and how to read the table. All traffic stays on
127.0.0.1; every process started here is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

import benchlib as bl
import orjson
from latency import GRACE_S, LatencyResult
from latency import format_table as format_latency_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_DIR = HERE / "out"
LATENCY_SCRIPT = HERE / "latency.py"
# Both proxies see this header: with --features it makes Turnout hash a sticky key per request.
STICKY_HEADER = ("x-user", "bench-user")
WRK_THREADS = 2
# Other processes using more than this share of one core during a run make it noisy.
NOISY_BACKGROUND_PCT = 10
RESULT_MARK = "TURNOUT_BENCH "
# wrk's done() hook prints one JSON line with exact figures (latency in microseconds from the
# same histogram `--latency` prints, rounded there to two decimals).
WRK_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '@MARK@{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%.1f,"p99_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
""".replace("@MARK@", RESULT_MARK)


class BenchError(RuntimeError):
    """A run could not be measured (a tool failed or a proxy died)."""


@dataclass(frozen=True)
class Scenario:
    """One load shape: a path, the wrk connection counts, and an optional upload body."""

    name: str
    path: str
    connections: tuple[int, ...]
    upload_bytes: int = 0


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("small", "/small", (64, 256)),
        Scenario("1m-download", "/1m", (16,)),
        Scenario("1m-upload", "/upload", (16,), upload_bytes=bl.ONE_MIB),
    )
}


@dataclass(frozen=True)
class Pinning:
    """CPU sets for the proxy under test and for the load side (backend + load generator)."""

    proxy: frozenset[int] | None
    load: frozenset[int] | None
    description: str


@dataclass(frozen=True)
class Settings:
    """Everything the command line decides."""

    scenarios: list[Scenario]
    workers: list[int]
    repeat: int
    duration: int
    warmup: int
    pin: bool
    dry: bool
    features: bool
    access_log: bool
    turnout_cmd: list[str]
    fixed_rate: float | None
    fixed_rate_connections: int
    keepalive: int
    quick: bool


@dataclass(frozen=True)
class Subject:
    """A proxy under test: its table label, data port and process."""

    label: str
    port: int
    proc: bl.Proc


@dataclass(frozen=True)
class Lab:
    """What every run needs: settings, tool paths, CPU sets, folders and the backend."""

    settings: Settings
    tools: dict[str, str]
    pinning: Pinning
    tmp: Path
    raw_dir: Path
    backend: Subject


@dataclass(frozen=True)
class RunResult:
    """The figures of one measured wrk run against one proxy."""

    scenario: str
    connections: int
    workers: int
    proxy: str
    repeat: int
    requests: int
    rps: float
    mib_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    rss_total_mib: float
    rss_max_mib: float
    background_cpu_pct: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        """Non-2xx/3xx answers plus socket errors."""
        return sum(self.errors.values())


@dataclass
class Report:
    """What has been measured so far; written out even when a run fails midway."""

    settings: Settings
    pinning: Pinning
    runs: list[RunResult] = field(default_factory=list)
    latency: dict[int, list[LatencyResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    """Parse the command line into Settings (quick mode shortens the defaults)."""
    parser = argparse.ArgumentParser(
        description="Benchmark Turnout against NGINX on 127.0.0.1 (see docs/benchmarks.md)."
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 s runs, 1 s warm-up")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=list(SCENARIOS),
        metavar="NAME",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts (1,2)")
    parser.add_argument("--repeat", type=int, help="interleaved runs per proxy (3; quick 1)")
    parser.add_argument("--duration", type=int, help="seconds per measured run (10; quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of discarded load first (2; quick 1)")
    parser.add_argument(
        "--pin", action="store_true", help="proxy on core 0; backend and load on the last core"
    )
    parser.add_argument(
        "--dry", action="store_true", help="a second nginx proxy stands in for Turnout"
    )
    parser.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Turnout splits blue/green 90/10 with sticky and override (default on)",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="leave Turnout's access log on (to /dev/null)"
    )
    parser.add_argument(
        "--turnout-cmd",
        default=shlex.join([sys.executable, "-m", "proxy"]),
        help="command prefix; `run CONFIG [--no-access-log]` is appended (default: %(default)s)",
    )
    parser.add_argument(
        "--fixed-rate",
        type=float,
        metavar="RPS",
        help="instead of wrk: open-loop latency at RPS through direct, Turnout and NGINX",
    )
    parser.add_argument(
        "--fixed-rate-connections",
        type=int,
        default=16,
        metavar="N",
        help="keep-alive connections for --fixed-rate (16)",
    )
    parser.add_argument(
        "--nginx-keepalive",
        type=int,
        default=64,
        metavar="N",
        help="idle upstream connections each nginx worker keeps (`keepalive N`; default 64)",
    )
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers: expected a comma list of integers, got {args.workers!r}")
    quick: bool = args.quick
    settings = Settings(
        scenarios=[SCENARIOS[name] for name in dict.fromkeys(args.scenarios)],
        workers=workers,
        repeat=args.repeat or (1 if quick else 3),
        duration=args.duration or (3 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        pin=args.pin,
        dry=args.dry,
        features=args.features,
        access_log=args.access_log,
        turnout_cmd=shlex.split(args.turnout_cmd),
        fixed_rate=args.fixed_rate,
        fixed_rate_connections=args.fixed_rate_connections,
        keepalive=args.nginx_keepalive,
        quick=quick,
    )
    if not workers or min(workers) < 1 or settings.repeat < 1 or settings.duration < 1:
        parser.error("workers, repeat and duration must be positive")
    if settings.fixed_rate is not None and settings.fixed_rate <= 0:
        parser.error("--fixed-rate must be positive")
    return settings


# --- tools and pinning -----------------------------------------------------------------------


def which(tool: str) -> str | None:
    """Path of `tool` on PATH or in the sbin directories root's PATH usually has."""
    found = shutil.which(tool)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(folder) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools(pin: bool) -> dict[str, str]:
    """Find nginx and wrk (and taskset when pinning), installing missing ones with apt-get."""
    packages = {"nginx": "nginx", "wrk": "wrk"}
    if pin:
        packages["taskset"] = "util-linux"
    missing = sorted({pkg for tool, pkg in packages.items() if which(tool) is None})
    if missing:
        install = ["apt-get", "install", "-y", *missing]
        print(f"missing tools; running: {shlex.join(install)}", flush=True)
        if subprocess.run(install, check=False).returncode != 0:
            print("apt-get install failed; running: apt-get update, then retrying", flush=True)
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(install, check=True)
    found = {tool: which(tool) for tool in packages}
    absent = [tool for tool, path in found.items() if path is None]
    if absent:
        raise SystemExit(f"still missing after apt-get: {', '.join(absent)}")
    return {tool: path for tool, path in found.items() if path is not None}


def choose_pinning(pin: bool, workers: list[int]) -> Pinning:
    """Decide the CPU sets; without --pin everything floats and the description says so."""
    cores = sorted(os.sched_getaffinity(0))
    listed = ",".join(map(str, cores))
    if not pin:
        return Pinning(
            None,
            None,
            f"off: proxy, backend and load generator float over {len(cores)} cores ({listed}); "
            "--pin puts the proxy on core 0 and the backend and load on the last core",
        )
    if len(cores) < 2:
        raise SystemExit("--pin needs at least 2 usable cores")
    proxy, load = frozenset(cores[:-1]), frozenset(cores[-1:])
    text = (
        f"on: proxy on core(s) {','.join(map(str, sorted(proxy)))}; "
        f"backend nginx and load generator on core {cores[-1]}"
    )
    if max(workers) > len(proxy):
        text += f" (runs with more than {len(proxy)} worker(s) share the proxy core(s))"
    return Pinning(proxy, load, text)


# --- servers ---------------------------------------------------------------------------------


def start_backend(
    tmp: Path, tools: dict[str, str], pinning: Pinning, stack: contextlib.ExitStack
) -> Subject:
    """Start the backend nginx (1 worker) and check it serves the scenario paths."""
    prefix = tmp / "backend"
    port = bl.free_port()
    conf = bl.write_backend_conf(prefix, port)
    proc = bl.Proc(
        "backend nginx",
        bl.nginx_argv(tools["nginx"], prefix, conf, pinning.load),
        prefix / "error.log",
    )
    stack.callback(proc.stop)
    bl.wait_for_http(proc, port, "/small", 10.0)
    if bl.http_status(port, "/1m") != 200:
        raise bl.StartError(f"backend GET /1m did not answer 200:\n{proc.log_tail()}")
    return Subject("backend", port, proc)


def start_nginx_proxy(lab: Lab, label: str, workers: int, stack: contextlib.ExitStack) -> Subject:
    """Start an nginx reverse proxy with `workers` workers in front of the backend."""
    prefix = lab.tmp / f"{label}-w{workers}"
    port = bl.free_port()
    conf = bl.write_proxy_conf(prefix, port, lab.backend.port, workers, lab.settings.keepalive)
    argv = bl.nginx_argv(lab.tools["nginx"], prefix, conf, lab.pinning.proxy)
    proc = bl.Proc(label, argv, prefix / "error.log")
    stack.callback(proc.stop)
    bl.wait_for_http(proc, port, "/small", 10.0)
    return Subject(label, port, proc)


def start_turnout(lab: Lab, workers: int, stack: contextlib.ExitStack) -> Subject:
    """Write the Turnout config, start Turnout and wait until it is ready."""
    settings = lab.settings
    port, admin_port = bl.free_port(), bl.free_port()
    config = bl.turnout_config(port, admin_port, workers, lab.backend.port, settings.features)
    conf = bl.write_turnout_conf(lab.tmp / f"turnout-w{workers}.yaml", config)
    argv = [*bl.taskset_prefix(lab.pinning.proxy), *settings.turnout_cmd, "run", str(conf)]
    if not settings.access_log:
        argv.append("--no-access-log")
    print(f"  starting: {shlex.join(argv)}", flush=True)
    # The access log is JSON lines on stdout; with --access-log it still costs what it costs
    # to format and write, but /dev/null keeps the disk out of the figures.
    log = lab.tmp / f"turnout-w{workers}.stderr.log"
    proc = bl.Proc("turnout", argv, log, stdout_devnull=True, cwd=REPO)
    stack.callback(proc.stop)
    how = bl.wait_for_turnout(proc, port, admin_port, "/small", 15.0)
    print(f"  turnout ready ({how})", flush=True)
    return Subject("turnout", port, proc)


def start_subjects(lab: Lab, workers: int, stack: contextlib.ExitStack) -> list[Subject]:
    """NGINX first, then Turnout (or, with --dry, a second nginx proxy in its place)."""
    nginx = start_nginx_proxy(lab, "nginx", workers, stack)
    if lab.settings.dry:
        other = start_nginx_proxy(lab, "nginx-b", workers, stack)
    else:
        other = start_turnout(lab, workers, stack)
    return [nginx, other]


# --- wrk runs --------------------------------------------------------------------------------


def write_lua(tmp: Path, scenario: Scenario) -> Path:
    """The wrk script of a scenario: method, body, headers and the done() reporter."""
    lines = [f'wrk.headers["{STICKY_HEADER[0]}"] = "{STICKY_HEADER[1]}"']
    if scenario.upload_bytes:
        lines += [
            'wrk.method = "POST"',
            f'wrk.body = string.rep("x", {scenario.upload_bytes})',
            'wrk.headers["Content-Type"] = "application/octet-stream"',
        ]
    path = tmp / f"{scenario.name}.lua"
    path.write_text("\n".join(lines) + "\n" + WRK_DONE_LUA)
    return path


def run_wrk(
    lab: Lab, url: str, connections: int, seconds: int, script: Path
) -> tuple[dict[str, float], str]:
    """Run wrk once; return the done() figures and the full output."""
    argv = [
        *bl.taskset_prefix(lab.pinning.load),
        lab.tools["wrk"],
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
    done = bl.run_bounded(argv, timeout=seconds + 30)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            try:
                figures: dict[str, float] = orjson.loads(line[len(RESULT_MARK) :])
            except orjson.JSONDecodeError as exc:
                raise BenchError(f"unreadable wrk result {line!r}: {exc}") from exc
            return figures, done.stdout
    raise BenchError(f"wrk exited {done.returncode} without a result:\n{done.stdout[-2000:]}")


@dataclass(frozen=True)
class Shape:
    """Which load one run applies: scenario, connections, worker count and repeat number."""

    scenario: Scenario
    connections: int
    workers: int
    repeat: int
    script: Path


def measure(lab: Lab, subjects: list[Subject], subject: Subject, shape: Shape) -> RunResult:
    """Warm up, then one measured wrk run with CPU time and RSS of the proxy around it."""
    if not subject.proc.alive():
        raise BenchError(f"{subject.label} is gone:\n{subject.proc.log_tail()}")
    scenario, connections = shape.scenario, shape.connections
    url = f"http://{bl.LOOPBACK}:{subject.port}{scenario.path}"
    if lab.settings.warmup:
        run_wrk(lab, url, connections, lab.settings.warmup, shape.script)
    pids = bl.process_tree(subject.proc.pid)
    # Everything this harness runs; CPU used by any other process is background noise.
    ours = {os.getpid()}
    for started in (lab.backend, *subjects):
        ours.update(bl.process_tree(started.proc.pid))
    before = bl.cpu_snapshot()
    figures, output = run_wrk(lab, url, connections, lab.settings.duration, shape.script)
    after = bl.cpu_snapshot()
    memory = bl.tree_memory(pids)
    name = f"{scenario.name}-c{connections}-w{shape.workers}-{subject.label}-{shape.repeat}.txt"
    (lab.raw_dir / name).write_text(output)
    if not subject.proc.alive():
        raise BenchError(f"{subject.label} died during the run:\n{subject.proc.log_tail()}")
    requests = int(figures["requests"])
    seconds = figures["duration_us"] / 1e6
    moved = figures["bytes"] + requests * scenario.upload_bytes
    return RunResult(
        scenario=scenario.name,
        connections=connections,
        workers=shape.workers,
        proxy=subject.label,
        repeat=shape.repeat,
        requests=requests,
        rps=requests / seconds,
        mib_s=moved / seconds / bl.ONE_MIB,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        cpu_us_per_req=bl.cpu_used(before, after, pids) * 1e6 / requests if requests else 0.0,
        rss_total_mib=memory.total_mib,
        rss_max_mib=memory.max_mib,
        background_cpu_pct=bl.cpu_used_by_others(before, after, ours) / seconds * 100,
        errors={
            key: int(figures[key])
            for key in ("status", "connect", "read", "write", "timeout")
            if figures[key]
        },
    )


def describe(r: RunResult) -> str:
    """One progress line for a run."""
    errors = f"  ERRORS {r.errors}" if r.errors else ""
    return (
        f"  {r.scenario:<12} c{r.connections:<4} w{r.workers} {r.proxy:<8} #{r.repeat}: "
        f"{r.rps:>9.0f} req/s {r.mib_s:>8.1f} MiB/s  p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms"
        f"  {r.cpu_us_per_req:.1f} µs/req  RSS {r.rss_total_mib:.1f} MiB"
        f"  bg {r.background_cpu_pct:.0f}%{errors}"
    )


def wrk_session(lab: Lab, subjects: list[Subject], workers: int, report: Report) -> None:
    """Every scenario, interleaving the proxies run by run."""
    lab.raw_dir.mkdir(parents=True, exist_ok=True)
    for scenario in lab.settings.scenarios:
        script = write_lua(lab.tmp, scenario)
        for connections in scenario.connections:
            for repeat in range(1, lab.settings.repeat + 1):
                shape = Shape(scenario, connections, workers, repeat, script)
                for subject in subjects:
                    result = measure(lab, subjects, subject, shape)
                    report.runs.append(result)
                    print(describe(result), flush=True)


# --- fixed-rate latency ----------------------------------------------------------------------


def latency_session(lab: Lab, subjects: list[Subject]) -> list[LatencyResult]:
    """Run benchmarks/latency.py (pinned with the load side) on direct, Turnout, NGINX."""
    settings = lab.settings
    assert settings.fixed_rate is not None
    nginx, other = subjects
    targets = [("direct", lab.backend.port), (other.label, other.port), (nginx.label, nginx.port)]
    argv = [
        *bl.taskset_prefix(lab.pinning.load),
        sys.executable,
        str(LATENCY_SCRIPT),
        "--rate",
        str(settings.fixed_rate),
        "--duration",
        str(settings.duration),
        "--warmup",
        str(settings.warmup),
        "--connections",
        str(settings.fixed_rate_connections),
        "--repeat",
        str(settings.repeat),
        "--header",
        f"{STICKY_HEADER[0]}:{STICKY_HEADER[1]}",
        "--json",
    ]
    for name, port in targets:
        argv += ["--target", f"{name}={port}"]
    per_visit = settings.duration + settings.warmup + 2 * GRACE_S + 5
    done = bl.run_bounded(argv, timeout=settings.repeat * len(targets) * per_visit + 30)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"latency.py exited {done.returncode}:\n{done.stdout[-2000:]}")
    return [LatencyResult(**item) for item in orjson.loads(lines[-1])]


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Medians over the repeats of one (scenario, connections, workers, proxy)."""

    scenario: str
    connections: int
    workers: int
    proxy: str
    runs: int
    rps: float
    mib_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    rss_total_mib: float
    rss_max_mib: float
    background_cpu_pct: float
    errors: int
    runs_with_errors: int


def median_rows(runs: list[RunResult]) -> list[Row]:
    """Group runs and take medians, keeping the order runs were made in."""
    groups: dict[tuple[str, int, int, str], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.scenario, r.connections, r.workers, r.proxy), []).append(r)
    rows = []
    for (scenario, connections, workers, proxy), group in groups.items():
        rows.append(
            Row(
                scenario=scenario,
                connections=connections,
                workers=workers,
                proxy=proxy,
                runs=len(group),
                rps=statistics.median(r.rps for r in group),
                mib_s=statistics.median(r.mib_s for r in group),
                p50_ms=statistics.median(r.p50_ms for r in group),
                p99_ms=statistics.median(r.p99_ms for r in group),
                cpu_us_per_req=statistics.median(r.cpu_us_per_req for r in group),
                rss_total_mib=statistics.median(r.rss_total_mib for r in group),
                rss_max_mib=statistics.median(r.rss_max_mib for r in group),
                background_cpu_pct=statistics.median(r.background_cpu_pct for r in group),
                errors=sum(r.error_count for r in group),
                runs_with_errors=sum(1 for r in group if r.error_count),
            )
        )
    return rows


def results_table(rows: list[Row]) -> list[str]:
    """The markdown table of medians with the candidate/NGINX req/s ratio per scenario."""
    nginx_rps = {(r.scenario, r.connections, r.workers): r.rps for r in rows if r.proxy == "nginx"}
    lines = [
        "| scenario | conns | workers | proxy | req/s | MiB/s | p50 ms | p99 ms | CPU µs/req "
        "| RSS MiB (sum / max proc) | errors | req/s vs nginx | bg CPU % |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = nginx_rps.get((r.scenario, r.connections, r.workers))
        ratio = "-" if r.proxy == "nginx" or not base else f"{r.rps / base:.2f}x"
        errors = f"{r.errors} ({r.runs_with_errors}/{r.runs} runs) !" if r.errors else "0"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.workers} | {r.proxy} | {r.rps:.0f} "
            f"| {r.mib_s:.1f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.cpu_us_per_req:.1f} "
            f"| {r.rss_total_mib:.1f} / {r.rss_max_mib:.1f} | {errors} | {ratio} "
            f"| {r.background_cpu_pct:.0f} |"
        )
    return lines


def runs_table(runs: list[RunResult]) -> list[str]:
    """Every single run, for judging the spread behind the medians."""
    lines = [
        "| scenario | conns | workers | proxy | # | req/s | p50 ms | p99 ms | CPU µs/req "
        "| RSS MiB | bg CPU % | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.workers} | {r.proxy} | {r.repeat} "
            f"| {r.rps:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.cpu_us_per_req:.1f} "
            f"| {r.rss_total_mib:.1f} | {r.background_cpu_pct:.0f} | {errors} |"
        )
    return lines


def _first_line(argv: list[str], fallback: str = "unknown", need_success: bool = False) -> str:
    # `wrk -v` prints its version and exits 1, so only some commands must succeed.
    try:
        done = bl.run_bounded(argv, timeout=10)
    except OSError:
        return fallback
    out = done.stdout.strip()
    if not out or (need_success and done.returncode != 0):
        return fallback
    return out.splitlines()[0]


def machine_lines(tools: dict[str, str]) -> list[str]:
    """Where and on what the figures were taken."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    revision = _first_line(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], "no commit", True
    )
    return [
        f"- CPU: {model}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- {_first_line([tools['nginx'], '-v'])}; {_first_line([tools['wrk'], '-v'])}",
        f"- Python {platform.python_version()}; tree at {revision}",
    ]


def render(report: Report, tools: dict[str, str], complete: bool) -> list[str]:
    """The whole markdown report."""
    s = report.settings
    candidate = "nginx-b (a second nginx, --dry)" if s.dry else shlex.join(s.turnout_cmd)
    if s.fixed_rate is None:
        load = f"wrk -t{WRK_THREADS}"
    else:
        load = f"benchmarks/latency.py at {s.fixed_rate:.0f} req/s, samples pooled"
    lines = [
        f"# Turnout benchmark, {datetime.now().isoformat(timespec='seconds')}"
        + ("" if complete else " (INCOMPLETE)"),
        "",
        *machine_lines(tools),
        f"- pinning: {report.pinning.description}",
        f"- candidate: {candidate}; features {'on' if s.features else 'off'}; "
        f"access log {'on' if s.access_log else 'off'}",
        f"- {s.repeat} interleaved run(s) of {s.duration} s after {s.warmup} s warm-up; {load}",
        "",
    ]
    if report.runs:
        lines += ["## Medians", "", *results_table(median_rows(report.runs)), ""]
        lines += ["## All runs", "", *runs_table(report.runs), ""]
    for workers, results in report.latency.items():
        lines += [
            f"## Fixed rate {s.fixed_rate:.0f} req/s, {s.fixed_rate_connections} connections, "
            f"{workers} worker(s)",
            "",
            *format_latency_table(results),
            "",
        ]
    if report.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    return lines


# --- main ------------------------------------------------------------------------------------


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Handled like Ctrl-C: the stack unwinds through every ExitStack (stopping the processes)
    # and the partial report is still written.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _session_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="turnout-bench-") as name:
        # nginx started as root runs its workers as an unprivileged user, which must be able to
        # reach the served file and the body temp folders below this 0700 directory.
        os.chmod(name, 0o755)
        yield Path(name)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and write benchmarks/out/results-<timestamp>.md."""
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    tools = ensure_tools(settings.pin)
    pinning = choose_pinning(settings.pin, settings.workers)
    report = Report(settings, pinning)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    raw_dir = OUT_DIR / f"raw-{stamp}"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"pinning: {pinning.description}", flush=True)
    complete = False
    status = 1
    started = time.monotonic()
    try:
        with _session_dir() as tmp, contextlib.ExitStack() as stack:
            backend = start_backend(tmp, tools, pinning, stack)
            print(f"backend nginx on {bl.LOOPBACK}:{backend.port}", flush=True)
            lab = Lab(settings, tools, pinning, tmp, raw_dir, backend)
            for workers in settings.workers:
                print(f"== {workers} worker(s)", flush=True)
                with contextlib.ExitStack() as per_workers:
                    subjects = start_subjects(lab, workers, per_workers)
                    if settings.fixed_rate is None:
                        wrk_session(lab, subjects, workers, report)
                    else:
                        results = latency_session(lab, subjects)
                        report.latency[workers] = results
                        print("\n".join(format_latency_table(results)), flush=True)
        complete = True
        status = 0
    except (bl.StartError, BenchError) as exc:
        report.notes.append(f"stopped early: {str(exc).splitlines()[0]}")
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        report.notes.append("interrupted")
        print("interrupted; all processes stopped", file=sys.stderr)
        status = 130
    noisy = [r for r in report.runs if r.background_cpu_pct > NOISY_BACKGROUND_PCT]
    if noisy:
        report.notes.append(
            f"{len(noisy)} of {len(report.runs)} runs had other processes using more than "
            f"{NOISY_BACKGROUND_PCT}% of a core (bg CPU %): the machine was not quiet, rerun"
        )
    churn = sorted(
        {
            f"c{r.connections} w{r.workers}"
            for r in report.runs
            if r.connections > settings.keepalive * r.workers
        }
    )
    if churn:
        report.notes.append(
            f"nginx keeps {settings.keepalive} idle upstream connections per worker "
            f"(`keepalive`); with more requests in flight than that ({', '.join(churn)}) it "
            "opens and closes a backend connection for the excess requests, which dominates "
            "its figures; Turnout's pool keeps more (POOL_MAX_IDLE in proxy/upstream.py). "
            "Rerun with --nginx-keepalive 256 to compare like with like"
        )
    flagged = [r for r in report.runs if r.error_count]
    report.notes += [
        f"run {r.scenario} c{r.connections} w{r.workers} {r.proxy} #{r.repeat} had errors: "
        f"{r.errors}"
        for r in flagged
    ]
    text = "\n".join(render(report, tools, complete))
    out = OUT_DIR / f"results-{stamp}.md"
    out.write_text(text)
    print("\n" + text)
    raw = f" (raw wrk output in {raw_dir})" if raw_dir.exists() else ""
    print(f"written: {out}{raw}; took {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
