"""Turnout and NGINX side by side, in front of the same nginx backend, with one command.

    .venv/bin/python benchmarks/run.py              # full run (~10 minutes)
    .venv/bin/python benchmarks/run.py --quick      # one short pass (< 2 minutes)
    .venv/bin/python benchmarks/run.py --dry        # nginx in Turnout's place: shows the noise
    .venv/bin/python benchmarks/run.py --fixed-rate 2000   # open-loop latency instead of wrk
    .venv/bin/python benchmarks/run.py --fixed-rate-half-max   # ... at half Turnout's max req/s
    .venv/bin/python benchmarks/run.py --scenarios tls   # HTTPS: keep-alive and new handshakes
    .venv/bin/python benchmarks/run.py --scenarios h2    # h2c and gRPC unary (h2load, h2lib.py)

See docs/benchmarks.md for what is measured and how to read the table. All traffic stays on
127.0.0.1; every process started here is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import benchlib as bl
import h2lib as h2
import orjson
import trustme
from latency import GRACE_S, LatencyResult
from latency import format_table as format_latency_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LATENCY_SCRIPT = HERE / "latency.py"
# Both proxies see this header: with --features it makes Turnout hash a sticky key per request.
STICKY_HEADER = ("x-user", "bench-user")
WRK_THREADS = 2
# Other processes using more than this share of one core during a run make it noisy.
NOISY_BACKGROUND_PCT = 10
# --fixed-rate-half-max: Turnout's max is measured with wrk on `small` at this many connections,
# for at most this many seconds (after a 1 s warm-up), and the schedule runs at this share of it.
HALF_MAX_CONNECTIONS = 64
HALF_MAX_PROBE_S = 5
HALF_MAX_SHARE = 0.5
# The issue's bound on what the proxy adds to p99 at that rate.
ADDED_P99_BOUND_MS = 1.0
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
    """One load shape: a path, the wrk connection counts, and an optional upload body; `tls`:
    over HTTPS; `close`: `Connection: close`, so every request is a new connection (over HTTPS
    wrk resumes the previous connection's TLS session); `full_handshake`: instead of wrk,
    `connections` parallel `openssl s_time -new` clients, one full handshake per request;
    `headers`: sent with every request besides wrk's Host and the sticky header;
    `h2_streams`: instead of wrk, h2load over h2c (prior knowledge) with this many streams in
    flight per connection; `grpc`: h2load POSTs a gRPC unary call (h2lib.py).
    """

    name: str
    path: str
    connections: tuple[int, ...]
    upload_bytes: int = 0
    tls: bool = False
    close: bool = False
    full_handshake: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    h2_streams: int = 0
    grpc: bool = False


# What a browser sends on a page load (Chromium's own header set, two cookies), so that the head
# is ~400 bytes, as on real traffic, instead of wrk's ~60: every header costs the proxy a parser
# callback, a lower-casing and a copy, which the `small` scenario hardly exercises.
BROWSER_HEADERS = (
    (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
    ),
    (
        "Accept",
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    ),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Accept-Language", "en-US,en;q=0.9"),
    ("Cookie", "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"),
    ("Referer", "http://127.0.0.1/"),
)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("small", "/small", (64, 256)),
        Scenario("browser", "/small", (64,), headers=BROWSER_HEADERS),
        Scenario("1m-download", "/1m", (16,)),
        Scenario("1m-upload", "/upload", (16,), upload_bytes=bl.ONE_MIB),
        Scenario("tls-small", "/small", (64,), tls=True),
        Scenario("tls-handshake", "/small", (32,), tls=True, close=True),
        Scenario("tls-full-handshake", "/small", (8,), tls=True, full_handshake=True),
        # 8 connections x 8 streams: 64 requests in flight, as wrk's c64 on `small`.
        Scenario("h2-small", "/small", (8,), h2_streams=8),
        Scenario("grpc-unary", h2.GRPC_PATH, (8,), h2_streams=8, grpc=True),
    )
}
# What `--scenarios` runs by default, and names standing for several scenarios.
DEFAULT_SCENARIOS = ("small", "browser", "1m-download", "1m-upload")
SCENARIO_GROUPS = {
    "tls": ("tls-small", "tls-handshake", "tls-full-handshake"),
    "h2": ("h2-small", "grpc-unary"),
    "all": tuple(SCENARIOS),
}
# The issue-12 goal: Turnout's keep-alive TLS req/s at least this share of NGINX's.
TLS_GOAL_SHARE = 0.5
# The test certificate's name: wrk and the probes connect to 127.0.0.1 and send no SNI (an IP
# address), so both proxies serve their one (default) certificate.
TLS_HOSTS = ("localhost", bl.LOOPBACK)


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
    fixed_rate_half_max: bool
    syscalls: bool
    keepalive: int
    quick: bool
    tls_key: str = "ecdsa"

    @property
    def tls(self) -> bool:
        """Whether any scenario needs the proxies' TLS listeners."""
        return any(s.tls for s in self.scenarios)

    @property
    def h2(self) -> bool:
        """Whether any scenario runs h2load (the proxies' h2c ports)."""
        return any(s.h2_streams for s in self.scenarios)

    @property
    def grpc(self) -> bool:
        """Whether the gRPC backend and the proxies' gRPC routes are needed."""
        return any(s.grpc for s in self.scenarios)


@dataclass(frozen=True)
class Subject:
    """A proxy under test: its table label, data port, TLS port (None: none) and process."""

    label: str
    port: int
    proc: bl.Proc
    tls_port: int | None = None
    # What a default Python client negotiated on the TLS port: protocol and cipher.
    tls_info: str = ""
    # Where h2c (prior knowledge) is spoken: Turnout's plain port; NGINX's `listen ... http2`.
    h2_port: int | None = None


@dataclass(frozen=True)
class TestCert:
    """The certificate both proxies serve, made at run time, and the CA that issued it."""

    cert: Path
    key: Path
    ca: Path
    kind: str


@dataclass(frozen=True)
class Lab:
    """What every run needs: settings, tool paths, CPU sets, folders and the backend."""

    settings: Settings
    tools: dict[str, str]
    pinning: Pinning
    tmp: Path
    raw_dir: Path
    backend: Subject
    cert: TestCert | None = None
    # The gRPC backend (h2lib.py) and the request body file h2load posts to it.
    grpc_backend: Subject | None = None
    grpc_body: Path | None = None


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
    # The CPU per request split into user time (Python, uvloop, httptools; nginx's own code) and
    # system time (the kernel: syscalls and the loopback TCP stack).
    user_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0
    # CPU seconds per wall second: the whole tree, its root (supervisor / master) alone, and
    # each child (worker) process, largest first.
    proxy_cores: float = 0.0
    root_cores: float = 0.0
    worker_cores: tuple[float, ...] = ()
    # System calls the proxy's processes made per request (--syscalls), None when not counted.
    syscalls_per_req: float | None = None

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
    # workers -> (the fixed rate used, the max req/s it was derived from or None)
    latency_rates: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    # workers -> lines on the CPU the proxies and the background used during the visits
    latency_cpu: dict[int, list[str]] = field(default_factory=dict)
    # What the TLS scenarios served: the certificate, and what a client negotiated with each proxy.
    tls: list[str] = field(default_factory=list)
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
        choices=[*SCENARIOS, *SCENARIO_GROUPS],
        default=list(DEFAULT_SCENARIOS),
        metavar="NAME",
        help=f"any of {', '.join(SCENARIOS)}; `tls` = tls-small tls-handshake, `h2` = h2-small "
        f"grpc-unary, `all` = every one (default: {' '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--tls-key",
        choices=["ecdsa", "rsa"],
        default="ecdsa",
        help="key of the test certificate for the TLS scenarios: ECDSA P-256 (default) or RSA-2048",
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
        "--fixed-rate-half-max",
        action="store_true",
        help=f"like --fixed-rate, at half of Turnout's max req/s (measured first: wrk, "
        f"small, c{HALF_MAX_CONNECTIONS}, {HALF_MAX_PROBE_S} s)",
    )
    parser.add_argument(
        "--fixed-rate-connections",
        type=int,
        default=16,
        metavar="N",
        help="keep-alive connections for --fixed-rate (16)",
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count the proxies' system calls per request with `perf stat` (needs perf)",
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
    names = [n for arg in args.scenarios for n in SCENARIO_GROUPS.get(arg, (arg,))]
    settings = Settings(
        scenarios=[SCENARIOS[name] for name in dict.fromkeys(names)],
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
        fixed_rate_half_max=args.fixed_rate_half_max,
        syscalls=args.syscalls,
        keepalive=args.nginx_keepalive,
        quick=quick,
        tls_key=args.tls_key,
    )
    if not workers or min(workers) < 1 or settings.repeat < 1 or settings.duration < 1:
        parser.error("workers, repeat and duration must be positive")
    if settings.fixed_rate is not None and settings.fixed_rate <= 0:
        parser.error("--fixed-rate must be positive")
    fixed_half = settings.fixed_rate_half_max
    if settings.fixed_rate is not None and fixed_half:
        parser.error("--fixed-rate and --fixed-rate-half-max exclude each other")
    if settings.tls and settings.dry:
        parser.error("--dry does not cover the TLS scenarios")
    if settings.h2 and (settings.fixed_rate is not None or fixed_half):
        parser.error("the h2 scenarios run with h2load only, not with --fixed-rate*")
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


def ensure_tools(
    pin: bool, perf: bool = False, tls: bool = False, h2: bool = False
) -> dict[str, str]:
    """Find nginx and wrk (and taskset when pinning, openssl for the TLS scenarios, h2load for
    the h2 ones), installing missing ones with apt-get; with `perf`, also find perf (not
    installed: its package follows the kernel).
    """
    packages = {"nginx": "nginx", "wrk": "wrk"}
    if h2:
        packages["h2load"] = "nghttp2-client"
    if pin:
        packages["taskset"] = "util-linux"
    if tls:
        packages["openssl"] = "openssl"
    missing = sorted({pkg for tool, pkg in packages.items() if which(tool) is None})
    if missing:
        install = ["apt-get", "install", "-y", *missing]
        print(f"missing tools; running: {shlex.join(install)}", flush=True)
        if subprocess.run(install, check=False).returncode != 0:
            print("apt-get install failed; running: apt-get update, then retrying", flush=True)
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(install, check=True)
    found = {tool: which(tool) for tool in packages}
    if perf:
        found["perf"] = which("perf")
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


def start_grpc_backend(
    tmp: Path, tools: dict[str, str], pinning: Pinning, stack: contextlib.ExitStack
) -> Subject:
    """Start the gRPC backend nginx (h2lib.py) and check a real gRPC call gets its reply."""
    prefix = tmp / "grpc-backend"
    port = bl.free_port()
    conf = h2.write_grpc_backend_conf(prefix, port)
    proc = bl.Proc(
        "grpc backend nginx",
        bl.nginx_argv(tools["nginx"], prefix, conf, pinning.load),
        prefix / "error.log",
    )
    stack.callback(proc.stop)
    h2.wait_for_grpc(proc, port, 10.0)
    return Subject("backend", port, proc, h2_port=port)


def make_cert(tmp: Path, kind: str) -> TestCert:
    """Issue the test certificate (ECDSA P-256 or RSA-2048) from a fresh CA; write PEM files."""
    key_type = trustme.KeyType.ECDSA if kind == "ecdsa" else trustme.KeyType.RSA
    ca = trustme.CA(key_type=key_type)
    issued = ca.issue_cert(*TLS_HOSTS, key_type=key_type)
    folder = tmp / "certs"
    folder.mkdir()
    cert = TestCert(folder / "server.pem", folder / "server.key", folder / "ca.pem", kind)
    cert.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    cert.key.write_bytes(issued.private_key_pem.bytes())
    cert.ca.write_bytes(ca.cert_pem.bytes())
    return cert


def cert_description(cert: TestCert) -> str:
    """One line: which key the test certificate has and how it was made."""
    key = "ECDSA P-256" if cert.kind == "ecdsa" else "RSA-2048"
    return (
        f"certificate: {key} (trustme, made at run time, names {', '.join(TLS_HOSTS)}), "
        "the same files for both proxies"
    )


def client_context(cert: TestCert) -> ssl.SSLContext:
    """A client context trusting the test CA (probes; wrk itself does not verify)."""
    return ssl.create_default_context(cafile=str(cert.ca))


def wait_for_https(proc: bl.Proc, port: int, cert: TestCert, deadline_s: float) -> str:
    """Wait until GET /small over HTTPS on `port` answers 200, verifying the test certificate;
    return the protocol and cipher negotiated. StartError if `proc` dies or time runs out.
    """
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise bl.StartError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        conn = http.client.HTTPSConnection(
            bl.LOOPBACK, port, timeout=2.0, context=client_context(cert)
        )
        try:
            conn.request("GET", "/small")
            resp = conn.getresponse()
            resp.read()
            sock = conn.sock
            if resp.status == 200 and isinstance(sock, ssl.SSLSocket):
                cipher = sock.cipher()
                return f"{sock.version()}, {cipher[0] if cipher else 'unknown cipher'}"
            last = f"status {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise bl.StartError(
        f"{proc.name}: no HTTPS 200 on port {port} after {deadline_s:.0f}s ({last}):\n"
        f"{proc.log_tail()}"
    )


def start_nginx_proxy(lab: Lab, label: str, workers: int, stack: contextlib.ExitStack) -> Subject:
    """Start an nginx reverse proxy with `workers` workers in front of the backend (with a TLS
    listener too when a TLS scenario runs).
    """
    prefix = lab.tmp / f"{label}-w{workers}"
    port = bl.free_port()
    tls = None
    if lab.cert is not None:
        tls = bl.TlsListener(bl.free_port(), lab.cert.cert, lab.cert.key)
    h2_port = bl.free_port() if lab.settings.h2 else None
    extra = ""
    if h2_port is not None:
        grpc_port = lab.grpc_backend.port if lab.grpc_backend is not None else None
        extra = h2.nginx_h2_lines(h2_port, grpc_port, lab.settings.keepalive)
    conf = bl.write_proxy_conf(
        prefix, port, lab.backend.port, workers, lab.settings.keepalive, tls, extra
    )
    argv = bl.nginx_argv(lab.tools["nginx"], prefix, conf, lab.pinning.proxy)
    proc = bl.Proc(label, argv, prefix / "error.log")
    stack.callback(proc.stop)
    bl.wait_for_http(proc, port, "/small", 10.0)
    wait_for_h2_rows(lab, proc, h2_port, label)
    if tls is None or lab.cert is None:
        return Subject(label, port, proc, h2_port=h2_port)
    info = wait_for_https(proc, tls.port, lab.cert, 10.0)
    print(f"  {label} TLS ready ({info})", flush=True)
    return Subject(label, port, proc, tls.port, info, h2_port=h2_port)


def wait_for_h2_rows(lab: Lab, proc: bl.Proc, h2_port: int | None, label: str) -> None:
    """When h2 scenarios run: wait until `proc` answers h2c on `h2_port` (and a real gRPC call,
    when the gRPC row runs); StartError (with the log) otherwise, never a hang."""
    if h2_port is None:
        return
    h2.wait_for_h2(lab.tools["h2load"], proc, h2_port, "/small", 10.0)
    if lab.grpc_backend is not None:
        h2.wait_for_grpc(proc, h2_port, 10.0)
    print(f"  {label} h2c ready{' (gRPC call OK)' if lab.grpc_backend else ''}", flush=True)


def start_turnout(lab: Lab, workers: int, stack: contextlib.ExitStack) -> Subject:
    """Write the Turnout config, start Turnout and wait until it is ready."""
    settings = lab.settings
    port, admin_port = bl.free_port(), bl.free_port()
    config = bl.turnout_config(port, admin_port, workers, lab.backend.port, settings.features)
    if lab.grpc_backend is not None:
        h2.turnout_grpc_route(config, lab.grpc_backend.port)
    tls_port = None
    if lab.cert is not None:
        # The list form of `listen` (docs/config.md): the plain listener and a TLS one.
        tls_port = bl.free_port()
        pair = {"cert": str(lab.cert.cert), "key": str(lab.cert.key)}
        config["listen"] = [
            {"address": config["listen"]},
            {"address": f"{bl.LOOPBACK}:{tls_port}", "tls": {"certificates": [pair]}},
        ]
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
    # h2c with prior knowledge on the plain listener (contract section 11).
    h2_port = port if settings.h2 else None
    wait_for_h2_rows(lab, proc, h2_port, "turnout")
    if tls_port is None or lab.cert is None:
        return Subject("turnout", port, proc, h2_port=h2_port)
    info = wait_for_https(proc, tls_port, lab.cert, 10.0)
    print(f"  turnout TLS ready ({info})", flush=True)
    return Subject("turnout", port, proc, tls_port, info, h2_port=h2_port)


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
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in scenario.headers]
    if scenario.close:
        lines.append('wrk.headers["Connection"] = "close"')
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
    return wrk_figures(done), done.stdout


def run_h2load(
    lab: Lab, scenario: Scenario, url: str, connections: int, seconds: int, log: Path | None
) -> tuple[dict[str, float], str]:
    """Run h2load once (h2lib.py); return figures shaped like wrk's and the full output."""
    body = lab.grpc_body if scenario.grpc else None
    argv = [
        *bl.taskset_prefix(lab.pinning.load),
        *h2.h2load_argv(
            lab.tools["h2load"], url, connections, scenario.h2_streams, seconds, body, log
        ),
    ]
    done = bl.run_bounded(argv, timeout=seconds + 30)
    try:
        return h2.h2load_figures(done.stdout, log), done.stdout
    except RuntimeError as exc:
        raise BenchError(f"h2load exited {done.returncode}: {exc}") from exc


S_TIME_COUNT = re.compile(r"^(\d+) connections in [\d.]+ real seconds", re.MULTILINE)


def s_time_request(path: str) -> str:
    """What to give `s_time -www` so that its `GET %s HTTP/1.0` request carries `Host` (both
    proxies answer 400 without it) and the sticky header; its own trailing ` HTTP/1.0` becomes
    the value of a last, ignored header.
    """
    return (
        f"{path} HTTP/1.0\r\nHost: localhost\r\n{STICKY_HEADER[0]}: {STICKY_HEADER[1]}\r\nx-s-time:"
    )


def run_s_time(lab: Lab, port: int, clients: int, seconds: int, path: str) -> dict[str, float]:
    """`clients` parallel `openssl s_time -new` for `seconds`: each does one full handshake and
    one HTTP/1.0 GET `path` per connection. Figures shaped like wrk's done() line; latency is
    not measured (0). A client that fails counts as a connect error.
    """
    request = s_time_request(path)
    argv = [
        *bl.taskset_prefix(lab.pinning.load),
        lab.tools["openssl"],
        "s_time",
        "-connect",
        f"{bl.LOOPBACK}:{port}",
        "-new",
        "-time",
        str(seconds),
        "-www",
        request,
    ]
    began = time.monotonic()
    procs = [
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(clients)
    ]
    outputs = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            outputs.append((proc.returncode, out))
    finally:
        # On Ctrl-C or SIGTERM no client outlives the harness.
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - began
    counts = [S_TIME_COUNT.findall(out) for _, out in outputs]
    failed = sum(1 for (code, _), found in zip(outputs, counts, strict=True) if code or not found)
    return {
        "requests": sum(int(found[-1]) for found in counts if found),
        "duration_us": wall * 1e6,
        "bytes": 0,
        "connect": failed,
        "read": 0,
        "write": 0,
        "status": 0,
        "timeout": 0,
        "p50_us": 0.0,
        "p99_us": 0.0,
    }


def wrk_figures(done: subprocess.CompletedProcess[str]) -> dict[str, float]:
    """The figures wrk's done() hook printed (see WRK_DONE_LUA); BenchError when there are none."""
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            try:
                figures: dict[str, float] = orjson.loads(line[len(RESULT_MARK) :])
            except orjson.JSONDecodeError as exc:
                raise BenchError(f"unreadable wrk result {line!r}: {exc}") from exc
            return figures
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
    if scenario.h2_streams:
        if subject.h2_port is None:
            raise BenchError(f"{subject.label} has no h2c port for {scenario.name}")
        url = f"http://{bl.LOOPBACK}:{subject.h2_port}{scenario.path}"
    elif scenario.tls:
        if subject.tls_port is None:
            raise BenchError(f"{subject.label} has no TLS listener for {scenario.name}")
        url = f"https://{bl.LOOPBACK}:{subject.tls_port}{scenario.path}"
    else:
        url = f"http://{bl.LOOPBACK}:{subject.port}{scenario.path}"
    if lab.settings.warmup:
        if scenario.full_handshake and subject.tls_port is not None:
            run_s_time(lab, subject.tls_port, connections, lab.settings.warmup, scenario.path)
        elif scenario.h2_streams:
            run_h2load(lab, scenario, url, connections, lab.settings.warmup, None)
        else:
            run_wrk(lab, url, connections, lab.settings.warmup, shape.script)
    pids = bl.process_tree(subject.proc.pid)
    # Everything this harness runs; CPU used by any other process is background noise.
    ours = {os.getpid()}
    others = (lab.grpc_backend,) if lab.grpc_backend is not None else ()
    for started in (lab.backend, *others, *subjects):
        ours.update(bl.process_tree(started.proc.pid))
    name = f"{scenario.name}-c{connections}-w{shape.workers}-{subject.label}-{shape.repeat}"
    # h2load's per-request log: the source of its latency percentiles.
    log = lab.raw_dir / f"{name}.h2load-log.tsv" if scenario.h2_streams else None
    counter = bl.SyscallCounter(lab.tools["perf"], pids) if lab.settings.syscalls else None
    split_before = bl.cpu_ticks_split(pids)
    before = bl.cpu_snapshot()
    try:
        if scenario.full_handshake and subject.tls_port is not None:
            figures = run_s_time(
                lab, subject.tls_port, connections, lab.settings.duration, scenario.path
            )
            output = orjson.dumps(figures).decode()
        elif scenario.h2_streams:
            figures, output = run_h2load(
                lab, scenario, url, connections, lab.settings.duration, log
            )
        else:
            figures, output = run_wrk(lab, url, connections, lab.settings.duration, shape.script)
    finally:
        syscalls = counter.stop() if counter is not None else None
    after = bl.cpu_snapshot()
    split_after = bl.cpu_ticks_split(pids)
    memory = bl.tree_memory(pids)
    (lab.raw_dir / f"{name}.txt").write_text(output)
    if not subject.proc.alive():
        raise BenchError(f"{subject.label} died during the run:\n{subject.proc.log_tail()}")
    requests = int(figures["requests"])
    seconds = figures["duration_us"] / 1e6
    moved = figures["bytes"] + requests * scenario.upload_bytes
    user = sum(a[0] - split_before.get(p, a)[0] for p, a in split_after.items()) / bl.CLK_TCK
    system = sum(a[1] - split_before.get(p, a)[1] for p, a in split_after.items()) / bl.CLK_TCK
    per_proc = {p: bl.cpu_used(before, after, [p]) / seconds for p in pids}
    root = subject.proc.pid
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
        user_us_per_req=user * 1e6 / requests if requests else 0.0,
        sys_us_per_req=system * 1e6 / requests if requests else 0.0,
        proxy_cores=sum(per_proc.values()),
        root_cores=per_proc.get(root, 0.0),
        worker_cores=tuple(sorted((c for p, c in per_proc.items() if p != root), reverse=True)),
        syscalls_per_req=syscalls / requests if syscalls is not None and requests else None,
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
        # The gRPC backend alone, in the same rounds: its row shows how far from the
        # bottleneck it is.
        alone = [lab.grpc_backend] if scenario.grpc and lab.grpc_backend is not None else []
        for connections in scenario.connections:
            for repeat in range(1, lab.settings.repeat + 1):
                shape = Shape(scenario, connections, workers, repeat, script)
                for subject in [*subjects, *alone]:
                    result = measure(lab, subjects, subject, shape)
                    report.runs.append(result)
                    print(describe(result), flush=True)


# --- fixed-rate latency ----------------------------------------------------------------------


def max_rps_probe(lab: Lab, subject: Subject) -> float:
    """Turnout's own max req/s here: wrk on `small`, c64, 1 s warm-up + a short measured run."""
    script = write_lua(lab.tmp, SCENARIOS["small"])
    url = f"http://{bl.LOOPBACK}:{subject.port}/small"
    seconds = min(lab.settings.duration, HALF_MAX_PROBE_S)
    run_wrk(lab, url, HALF_MAX_CONNECTIONS, 1, script)
    figures, _ = run_wrk(lab, url, HALF_MAX_CONNECTIONS, seconds, script)
    if not subject.proc.alive():
        raise BenchError(f"{subject.label} died during the max probe:\n{subject.proc.log_tail()}")
    return figures["requests"] / (figures["duration_us"] / 1e6)


def latency_session(
    lab: Lab, subjects: list[Subject], rate: float
) -> tuple[list[LatencyResult], list[str]]:
    """Run benchmarks/latency.py on direct, Turnout, NGINX; the results, and lines on the CPU
    each proxy used per request and the background CPU during the session.
    """
    settings = lab.settings
    trees = {s.label: bl.process_tree(s.proc.pid) for s in subjects}
    ours = {os.getpid(), *bl.process_tree(lab.backend.proc.pid)}
    for tree in trees.values():
        ours.update(tree)
    began = time.monotonic()
    before = bl.cpu_snapshot()
    results = _run_latency(lab, subjects, rate)
    after = bl.cpu_snapshot()
    wall = time.monotonic() - began
    # Each proxy is busy only during its own visits: warm-up and measured schedule, per repeat.
    visit_s = settings.repeat * (settings.warmup + settings.duration)
    lines = []
    for r in results:
        if r.name not in trees:
            continue
        cpu = bl.cpu_used(before, after, trees[r.name])
        requests = r.completed + round(rate * settings.warmup) * settings.repeat
        per_req = cpu * 1e6 / requests if requests else 0.0
        lines.append(
            f"- {r.name}: {per_req:.1f} CPU µs/req at this rate ({cpu / visit_s:.2f} cores "
            "during its visits)"
        )
    background = bl.cpu_used_by_others(before, after, ours) / wall * 100
    noisy = " (not quiet: figures are noisy)" if background > NOISY_BACKGROUND_PCT else ""
    lines.append(f"- bg CPU during the session: {background:.0f}% of a core{noisy}")
    return results, lines


def _run_latency(lab: Lab, subjects: list[Subject], rate: float) -> list[LatencyResult]:
    settings = lab.settings
    nginx, other = subjects
    targets = [("direct", lab.backend.port), (other.label, other.port), (nginx.label, nginx.port)]
    argv = [
        *bl.taskset_prefix(lab.pinning.load),
        sys.executable,
        str(LATENCY_SCRIPT),
        "--rate",
        f"{rate:.0f}",
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
    user_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0
    proxy_cores: float = 0.0
    root_cores: float = 0.0
    worker_cores: tuple[float, ...] = ()
    syscalls_per_req: float | None = None


def _median_cores(group: list[RunResult]) -> tuple[float, ...]:
    # Per position (busiest worker first), the median over the repeats.
    width = min(len(r.worker_cores) for r in group)
    return tuple(statistics.median(r.worker_cores[i] for r in group) for i in range(width))


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


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
                user_us_per_req=statistics.median(r.user_us_per_req for r in group),
                sys_us_per_req=statistics.median(r.sys_us_per_req for r in group),
                proxy_cores=statistics.median(r.proxy_cores for r in group),
                root_cores=statistics.median(r.root_cores for r in group),
                worker_cores=_median_cores(group),
                syscalls_per_req=_median_or_none([r.syscalls_per_req for r in group]),
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


def cpu_table(rows: list[Row]) -> list[str]:
    """Where each proxy's CPU goes: user vs kernel time per request, and cores per process."""
    lines = [
        "| scenario | conns | workers | proxy | CPU µs/req | user µs/req | system µs/req "
        "| syscalls/req | cores used (tree) | supervisor / master cores | cores per worker |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        per_worker = " / ".join(f"{c:.2f}" for c in r.worker_cores) or "-"
        calls = "-" if r.syscalls_per_req is None else f"{r.syscalls_per_req:.2f}"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.workers} | {r.proxy} "
            f"| {r.cpu_us_per_req:.1f} | {r.user_us_per_req:.1f} | {r.sys_us_per_req:.1f} "
            f"| {calls} | {r.proxy_cores:.2f} | {r.root_cores:.2f} | {per_worker} |"
        )
    return lines


def scaling_table(rows: list[Row]) -> list[str]:
    """More workers against 1 worker, per scenario, connections and proxy.

    "projected" is a model, not a measurement: what the ratio would be if every worker had a
    core of its own and the load side needed none, from the measured CPU per request (the
    extra workers' overhead) and how evenly the kernel spread the work over the workers (the
    busiest worker saturates first): k x (CPU/req at 1 / CPU/req at k) x (mean / max worker).
    """
    by_key = {(r.scenario, r.connections, r.workers, r.proxy): r for r in rows}
    lines = [
        "| scenario | conns | proxy | workers | req/s at 1 | req/s | measured ratio "
        "| CPU µs/req at 1 | CPU µs/req | worker balance (mean / max) | projected ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        one = by_key.get((r.scenario, r.connections, 1, r.proxy))
        if r.workers == 1 or one is None or not r.cpu_us_per_req or not r.worker_cores:
            continue
        balance = (
            statistics.fmean(r.worker_cores) / max(r.worker_cores) if any(r.worker_cores) else 0.0
        )
        projected = r.workers * one.cpu_us_per_req / r.cpu_us_per_req * balance
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.proxy} | {r.workers} | {one.rps:.0f} "
            f"| {r.rps:.0f} | {r.rps / one.rps:.2f}x | {one.cpu_us_per_req:.1f} "
            f"| {r.cpu_us_per_req:.1f} | {balance:.2f} | {projected:.2f}x |"
        )
    return lines if len(lines) > 2 else []


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
    if s.fixed_rate_half_max:
        load = (
            f"benchmarks/latency.py at {HALF_MAX_SHARE:.0%} of Turnout's max req/s (wrk, small, "
            f"c{HALF_MAX_CONNECTIONS}), samples pooled"
        )
    elif s.fixed_rate is None:
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
        rows = median_rows(report.runs)
        lines += ["## Medians", "", *results_table(rows), ""]
        if report.tls:
            lines += ["## TLS", "", *report.tls, *tls_verdicts(rows), ""]
        scaling = scaling_table(rows)
        if scaling:
            lines += [
                "## Scaling",
                "",
                f"Pinning: {report.pinning.description}. Measured ratio: req/s with k workers "
                "over req/s with 1, on the same machine. Projected: k x (CPU µs/req at 1 / at "
                "k) x worker balance, i.e. what the ratio would be if each worker had a core "
                "of its own and the load side needed none; a model, not a measurement.",
                "",
                *scaling,
                "",
            ]
        lines += ["## CPU per request", "", *cpu_table(rows), ""]
        lines += ["## All runs", "", *runs_table(report.runs), ""]
    for workers, results in report.latency.items():
        rate, probed = report.latency_rates.get(workers, (s.fixed_rate or 0.0, None))
        source = (
            ""
            if probed is None
            else (
                f" ({HALF_MAX_SHARE:.0%} of Turnout's max, {probed:.0f} req/s with wrk "
                f"c{HALF_MAX_CONNECTIONS})"
            )
        )
        lines += [
            f"## Fixed rate {rate:.0f} req/s{source}, {s.fixed_rate_connections} connections, "
            f"{workers} worker(s)",
            "",
            *format_latency_table(results),
            "",
            *added_p99_verdicts(results),
            *report.latency_cpu.get(workers, []),
            "",
        ]
    if report.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    return lines


def tls_verdicts(rows: list[Row]) -> list[str]:
    """How to read the TLS rows, and the issue-12 goal on tls-small: Turnout's req/s at least
    TLS_GOAL_SHARE of NGINX's, per connections and workers.
    """
    by_key = {(r.scenario, r.connections, r.workers, r.proxy): r for r in rows}
    lines = []
    if any(r.scenario == "tls-handshake" for r in rows):
        lines.append(
            "- tls-handshake: every request is a new connection (`Connection: close`) whose "
            "handshake wrk resumes from its previous connection's session (TLS 1.3: PSK with "
            "ECDHE, no certificate sent or signed); req/s = resumed handshakes/s"
        )
    if any(r.scenario == "tls-full-handshake" for r in rows):
        lines.append(
            "- tls-full-handshake: parallel `openssl s_time -new` clients (conns = clients), "
            "one full handshake (certificate signed and sent) and one HTTP/1.0 GET per "
            "connection; req/s = full handshakes/s, latency not measured (0.000)"
        )
    for r in rows:
        nginx = by_key.get((r.scenario, r.connections, r.workers, "nginx"))
        if r.scenario != "tls-small" or r.proxy != "turnout" or nginx is None or not nginx.rps:
            continue
        share = r.rps / nginx.rps
        verdict = "met" if share >= TLS_GOAL_SHARE and not r.errors else "NOT met"
        lines.append(
            f"- goal (issue 12) tls-small c{r.connections} w{r.workers}: Turnout "
            f"{r.rps:.0f} req/s = {share:.2f}x NGINX's {nginx.rps:.0f} "
            f"(goal >= {TLS_GOAL_SHARE}x): {verdict}"
        )
    return lines


def added_p99_verdicts(results: list[LatencyResult]) -> list[str]:
    """One line per proxy: its p99 minus the first (direct) target's, against the bound."""
    if len(results) < 2:
        return []
    base, lines = results[0], []
    for r in results[1:]:
        added = r.p99_ms - base.p99_ms
        errors = r.non_2xx + r.failures + r.incomplete
        verdict = "PASS" if added <= ADDED_P99_BOUND_MS and not errors else "FAIL"
        lines.append(
            f"- {r.name}: added p99 {added:+.3f} ms (bound {ADDED_P99_BOUND_MS:.0f} ms), "
            f"{errors} errors: {verdict}"
        )
    return lines


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and write benchmarks/out/results-<timestamp>.md."""
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, bl.interrupt_on_sigterm)
    tools = ensure_tools(settings.pin, settings.syscalls, settings.tls, settings.h2)
    pinning = choose_pinning(settings.pin, settings.workers)
    report = Report(settings, pinning)
    stamp = bl.timestamp()
    raw_dir = bl.OUT_DIR / f"raw-{stamp}"
    bl.OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"pinning: {pinning.description}", flush=True)
    complete = False
    status = 1
    started = time.monotonic()
    try:
        with bl.session_dir("turnout-bench-") as tmp, contextlib.ExitStack() as stack:
            backend = start_backend(tmp, tools, pinning, stack)
            print(f"backend nginx on {bl.LOOPBACK}:{backend.port}", flush=True)
            cert = make_cert(tmp, settings.tls_key) if settings.tls else None
            if cert is not None:
                report.tls.append(f"- {cert_description(cert)}")
                print(cert_description(cert), flush=True)
            grpc_backend = grpc_body = None
            if settings.grpc:
                grpc_backend = start_grpc_backend(tmp, tools, pinning, stack)
                grpc_body = tmp / "grpc-request.bin"
                grpc_body.write_bytes(h2.grpc_frame(h2.REQUEST_MESSAGE))
                print(f"gRPC backend nginx on {bl.LOOPBACK}:{grpc_backend.port}", flush=True)
            if settings.h2:
                report.notes.append(
                    "h2-small, grpc-unary: h2load over h2c with prior knowledge, conns x "
                    f"{SCENARIOS['h2-small'].h2_streams} streams in flight; NGINX on a "
                    "`listen ... http2` server (grpc_pass for gRPC), Turnout on its plain "
                    "listener; `backend` rows: the gRPC backend nginx alone (benchmarks/h2lib.py)"
                )
            lab = Lab(
                settings, tools, pinning, tmp, raw_dir, backend, cert, grpc_backend, grpc_body
            )
            for workers in settings.workers:
                print(f"== {workers} worker(s)", flush=True)
                with contextlib.ExitStack() as per_workers:
                    subjects = start_subjects(lab, workers, per_workers)
                    report.tls += [
                        f"- w{workers} {s.label}: a default client negotiates {s.tls_info}"
                        for s in subjects
                        if s.tls_info
                    ]
                    if settings.fixed_rate is None and not settings.fixed_rate_half_max:
                        wrk_session(lab, subjects, workers, report)
                    else:
                        probed: float | None = None
                        if settings.fixed_rate is not None:
                            rate = settings.fixed_rate
                        else:
                            probed = max_rps_probe(lab, subjects[1])
                            rate = probed * HALF_MAX_SHARE
                            print(
                                f"  {subjects[1].label} max {probed:.0f} req/s (wrk, small, "
                                f"c{HALF_MAX_CONNECTIONS}); fixed rate {rate:.0f} req/s",
                                flush=True,
                            )
                        results, cpu_lines = latency_session(lab, subjects, rate)
                        report.latency[workers] = results
                        report.latency_rates[workers] = (rate, probed)
                        report.latency_cpu[workers] = cpu_lines
                        print("\n".join(format_latency_table(results)), flush=True)
                        print("\n".join(added_p99_verdicts(results)), flush=True)
                        print("\n".join(cpu_lines), flush=True)
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
            "its figures; Turnout's pool keeps more (POOL_MAX_IDLE in "
            "proxy/dataplane/upstream.py). "
            "Rerun with --nginx-keepalive 256 to compare like with like"
        )
    flagged = [r for r in report.runs if r.error_count]
    report.notes += [
        f"run {r.scenario} c{r.connections} w{r.workers} {r.proxy} #{r.repeat} had errors: "
        f"{r.errors}"
        for r in flagged
    ]
    text = "\n".join(render(report, tools, complete))
    out = bl.write_report(f"results-{stamp}", text)
    raw = f" (raw wrk output in {raw_dir})" if raw_dir.exists() else ""
    print(f"written: {out}{raw}; took {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
