"""Process plumbing for the benchmark harness: free ports, the nginx backend and proxy configs,
the Turnout config, readiness probes and /proc accounting (CPU time and RSS of a process tree).

Everything here listens on 127.0.0.1 only, and every process it starts lives in its own process
group so that `Proc.stop()` can take down a master together with its workers.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from proxy.runtime.tls import INTERMEDIATE_CIPHERS as TURNOUT_CIPHERS

LOOPBACK = "127.0.0.1"
ONE_MIB = 1024 * 1024
# 100 bytes: the size of a typical small JSON API answer.
SMALL_BODY = "turnout-bench " + "x" * 85 + "\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Both proxies offer the same TLS 1.2 suites (Turnout's, from proxy/runtime/tls.py); TLS 1.3
# suites are OpenSSL's defaults in both.
INTERMEDIATE_CIPHERS = TURNOUT_CIPHERS


class StartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile `q` (0..100) of `values` in any order (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the OS just handed out (bind port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def taskset_prefix(cores: frozenset[int] | None) -> list[str]:
    """The `taskset -c` prefix that pins a command to `cores`, or nothing when not pinning."""
    if cores is None:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cores))]


class Proc:
    """A child process in its own process group; `stop()` ends the whole group."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        stdout_devnull: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        stdout: IO[bytes] | int = subprocess.DEVNULL if stdout_devnull else self._log
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=self._log,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The process id of the group leader."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the group leader has not exited."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines of the process's stderr log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL whatever is left.

        Children that moved to their own session (Turnout's workers do) are not in the group;
        they are found through the process tree first and killed if they outlive the wait.
        """
        descendants = [
            (pid, start) for pid in process_tree(self.pid)[1:] if (start := _start_time(pid))
        ]
        deadline = time.monotonic() + grace
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Workers can outlive a leader that died abruptly; the group id still reaches them.
        _signal_group(self.pid, signal.SIGKILL)
        while time.monotonic() < deadline and any(_start_time(p) == s for p, s in descendants):
            time.sleep(0.05)
        for pid, start in descendants:
            # The start time guards against a recycled pid.
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _start_time(pid: int) -> int:
    """Start time of `pid` in clock ticks since boot (field 22), 0 when it is gone or a zombie."""
    try:
        fields = _stat_fields(pid)
        return 0 if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command to completion in its own process group; kill the group on timeout/Ctrl-C."""
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = popen.communicate(timeout=timeout)
    except BaseException:
        _signal_group(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    return subprocess.CompletedProcess(argv, popen.returncode, out, None)


# --- readiness -------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    """True when 127.0.0.1:`port` accepts a TCP connection."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(port: int, path: str, headers: dict[str, str] | None = None) -> int | None:
    """GET http://127.0.0.1:`port``path`; the status code, or None when nothing answered."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2.0)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_for_http(proc: Proc, port: int, path: str, deadline_s: float) -> None:
    """Wait until GET `path` on `port` answers 200; raise StartError if `proc` dies or time runs
    out. An open port alone is not enough: an nginx master listens before its workers exist.
    """
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if port_open(port) and http_status(port, path) == 200:
            return
        time.sleep(0.05)
    raise StartError(f"{proc.name}: no 200 for {path} after {deadline_s:.0f}s:\n{proc.log_tail()}")


def wait_for_turnout(
    proc: Proc, port: int, admin_port: int, probe_path: str, deadline_s: float
) -> str:
    """Wait until Turnout serves; return how readiness was established.

    Ready means the data port accepts connections and admin `/readyz` answers 200. An admin plane
    that does not answer at all (not built yet, or a stand-in command) falls back to one
    successful GET of `probe_path` through the proxy.
    """
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if port_open(port):
            readyz = http_status(admin_port, "/readyz")
            if readyz == 200:
                return "admin /readyz = 200"
            if readyz is None and http_status(port, probe_path) == 200:
                return f"admin silent; GET {probe_path} through the proxy = 200"
        time.sleep(0.1)
    raise StartError(f"{proc.name} not ready after {deadline_s:.0f}s:\n{proc.log_tail()}")


# --- nginx -----------------------------------------------------------------------------------


def nginx_common(prefix: Path, workers: int) -> str:
    # Every path nginx might write lives under the private prefix; nothing touches /var.
    return f"""
worker_processes {workers};
worker_rlimit_nofile 16384;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
"""


def nginx_http_common(prefix: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {prefix}/tmp-body;
    proxy_temp_path {prefix}/tmp-proxy;
    fastcgi_temp_path {prefix}/tmp-fastcgi;
    uwsgi_temp_path {prefix}/tmp-uwsgi;
    scgi_temp_path {prefix}/tmp-scgi;
    keepalive_timeout 75s;
    # nginx closes a client connection every 1000 requests by default; Turnout does not, so
    # both sides keep connections open for the whole run.
    keepalive_requests 1000000;
"""


def write_backend_conf(prefix: Path, port: int) -> Path:
    """Write the backend nginx config (and its 1 MiB file) under `prefix`; return the conf path.

    `/small` answers 100 bytes, `/1m` a 1 MiB static file, `/upload` reads the whole POST body
    (up to 2 MiB) before answering 200 "ok".
    """
    www = prefix / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "1m").write_bytes(os.urandom(ONE_MIB))
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_common(prefix, 1)
        + f"""
http {{
{nginx_http_common(prefix)}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        root {www};
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY.rstrip()}\\n";
        }}
        location = /1m {{ }}
        location = /upload {{
            client_max_body_size 2m;
            client_body_buffer_size 2m;
            # `return` would answer before the body is read (nginx discards it afterwards).
            # A mirror with mirror_request_body makes nginx read the whole body first, like an
            # application would; the content phase then 404s and error_page turns it into 200.
            mirror /_sink;
            mirror_request_body on;
            log_not_found off;
            error_page 404 405 =200 @ok;
        }}
        location = /_sink {{ internal; return 204; }}
        location @ok {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""
    )
    return conf


@dataclass(frozen=True)
class TlsListener:
    """A TLS listening port and the PEM certificate chain and key it serves."""

    port: int
    cert: Path
    key: Path


def _nginx_tls_lines(tls: TlsListener | None) -> str:
    if tls is None:
        return ""
    # Turnout's defaults (docs/tls.md): TLS 1.2 and 1.3, the intermediate ciphers, session
    # tickets on (nginx's default too); HTTP/1.1 only, as Turnout offers no h2 yet.
    return f"""
        listen {LOOPBACK}:{tls.port} ssl backlog=4096;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {INTERMEDIATE_CIPHERS};
        ssl_prefer_server_ciphers off;"""


def write_proxy_conf(
    prefix: Path,
    port: int,
    backend_port: int,
    workers: int,
    keepalive: int,
    tls: TlsListener | None = None,
    extra: str = "",
) -> Path:
    """Write an nginx reverse-proxy config in front of the backend; return the conf path.

    `keepalive` is the number of idle upstream connections each worker keeps. With `tls`, the
    same server also listens with TLS on `tls.port`. `extra` goes into the `http` block as it is
    (more upstreams and servers: the h2 rows, h2lib.py).
    """
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_common(prefix, workers)
        + f"""
http {{
{nginx_http_common(prefix)}
    upstream backend {{
        server {LOOPBACK}:{backend_port};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;{_nginx_tls_lines(tls)}
        # The default 1m limit is exactly the upload size; 2m leaves room, like Turnout's 64MiB.
        client_max_body_size 2m;
        # Keep request bodies in memory rather than temp files, as a tuned deployment would.
        client_body_buffer_size 2m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The same header work Turnout does (contract section 3): Host passed unchanged,
            # forwarding headers set, a request id generated and echoed.
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id;
        }}
    }}{extra}
}}
"""
    )
    return conf


def nginx_argv(nginx: str, prefix: Path, conf: Path, cores: frozenset[int] | None) -> list[str]:
    """The command line that runs the `nginx` binary in the foreground on a private prefix."""
    return [
        *taskset_prefix(cores),
        nginx,
        "-p",
        f"{prefix}/",
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
    ]


# --- Turnout ---------------------------------------------------------------------------------


def turnout_config(
    port: int, admin_port: int, workers: int, backend_port: int, features: bool
) -> dict[str, Any]:
    """The Turnout routing table (contract section 1) for one benchmark run.

    Plain: one upstream `backend`, split 100. With `features`: upstreams `blue` and `green` on the
    same backend endpoint, split 90/10, sticky by header `x-user`, override on header `x-canary`,
    so every request pays for overrides, sticky hashing and the weighted choice.
    """
    endpoint = f"{LOOPBACK}:{backend_port}"
    route: dict[str, Any] = {"name": "bench", "match": {"path_prefix": "/"}}
    upstreams: dict[str, Any]
    if features:
        upstreams = {"blue": {"endpoints": [endpoint]}, "green": {"endpoints": [endpoint]}}
        route["overrides"] = [{"header": "x-canary", "to": "green"}]
        route["split"] = {"blue": 90, "green": 10}
        route["sticky"] = {"header": "x-user"}
    else:
        upstreams = {"backend": {"endpoints": [endpoint]}}
        route["split"] = {"backend": 100}
    return {
        "listen": f"{LOOPBACK}:{port}",
        "admin": f"{LOOPBACK}:{admin_port}",
        "workers": workers,
        "upstreams": upstreams,
        "routes": [route],
    }


def write_turnout_conf(path: Path, config: dict[str, Any]) -> Path:
    """Write `config` as YAML to `path` and return it."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- /proc accounting ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may contain spaces and parentheses; split after the last ')'.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def cpu_snapshot() -> dict[int, int]:
    """utime + stime in clock ticks of every process now alive, by pid."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
            # After the ')' field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_used(before: dict[int, int], after: dict[int, int], pids: list[int]) -> float:
    """CPU seconds (all threads, user + system) that `pids` used between two snapshots."""
    return sum(after.get(pid, 0) - before.get(pid, 0) for pid in pids) / CLK_TCK


def cpu_used_by_others(before: dict[int, int], after: dict[int, int], ours: set[int]) -> float:
    """CPU seconds used between two snapshots by processes not in `ours` (background noise).

    Processes that both started and ended in between are not seen, so this is a lower bound.
    """
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items() if pid not in ours)
    return ticks / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident set size of one process in MiB (VmRSS), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class Memory:
    """RSS of a process tree: the sum and the largest single process, in MiB."""

    total_mib: float
    max_mib: float


def tree_memory(pids: list[int]) -> Memory:
    """RSS sum and per-process maximum over `pids`."""
    sizes = [rss_mib(pid) for pid in pids] or [0.0]
    return Memory(total_mib=sum(sizes), max_mib=max(sizes))


def cpu_ticks_split(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(utime, stime) in clock ticks of each of `pids` that is alive: user vs kernel CPU."""
    ticks: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            ticks[pid] = (int(fields[11]), int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return ticks


@dataclass(frozen=True)
class RssDetail:
    """One process's resident memory in MiB: the total (VmRSS) and its anonymous part (heap,
    stacks: what grows when a program leaks) and file-backed part (mapped code and libraries).
    """

    rss_mib: float
    anon_mib: float
    file_mib: float


def rss_detail(pid: int) -> RssDetail:
    """VmRSS, RssAnon and RssFile of `pid` from /proc/PID/status (zeros when it is gone)."""
    found = {"VmRSS:": 0, "RssAnon:": 0, "RssFile:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0] + ":"
            if key in found:
                found[key] = int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return RssDetail(found["VmRSS:"] / 1024, found["RssAnon:"] / 1024, found["RssFile:"] / 1024)


def open_fds(pid: int) -> int:
    """How many file descriptors `pid` has open (0 when it is gone or not readable)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (up to the hard limit).

    Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


class SyscallCounter:
    """Counts the system calls of some processes with `perf stat` (tracepoint
    raw_syscalls:sys_enter, counting only: no per-call trace, so the overhead is small).

    Start it, run the load, then `stop()` for the count. Needs perf and the right to trace the
    processes (root, or kernel.perf_event_paranoid <= 1 for one's own processes).
    """

    def __init__(self, perf: str, pids: list[int]) -> None:
        self.popen = subprocess.Popen(
            [
                perf,
                "stat",
                "-x",
                ",",
                "-e",
                "raw_syscalls:sys_enter",
                "-p",
                ",".join(map(str, pids)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # perf attaches to every thread before it counts; give it that moment.
        time.sleep(0.2)

    def stop(self) -> int | None:
        """End the count (SIGINT, as perf expects); the number of calls, None when unreadable."""
        _signal_group(self.popen.pid, signal.SIGINT)
        try:
            _, err = self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            return None
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("raw_syscalls:sys_enter"):
                return int(fields[0]) if fields[0].isdigit() else None
        return None


# --- a benchmark's session ----------------------------------------------------------------------

# Where every benchmark writes its report (gitignored).
OUT_DIR = Path(__file__).resolve().parent / "out"


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that acts like Ctrl-C: the stack unwinds through every ExitStack and
    finally block, stopping the processes, and a partial report is still written."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def session_dir(prefix: str) -> Iterator[Path]:
    """A private folder for one run's configs, logs and files, removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        # nginx started as root runs its workers as an unprivileged user, which must be able to
        # reach the served file and the body temp folders below this 0700 directory.
        os.chmod(name, 0o755)
        yield Path(name)


def timestamp() -> str:
    """The local time as report names carry it: 20261205-094443."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def write_report(name: str, text: str) -> Path:
    """Write a report to benchmarks/out/<name>.md, print it, and say where it went."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"{name}.md"
    out.write_text(text)
    print("\n" + text)
    return out
