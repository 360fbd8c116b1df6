"""The HTTP/2 and gRPC rows of the benchmark (`run.py --scenarios h2`): h2load, the gRPC backend,
NGINX's h2c listener and grpc_pass, and the checks that every proxy answers before it is loaded.

- `h2-small`: h2load over h2c (prior knowledge) to Turnout's plain listener and to an NGINX
  `listen PORT http2` server (NGINX 1.22 syntax), both proxying to the HTTP/1.1 backend nginx.
- `grpc-unary`: h2load POSTs one gRPC-framed unary request (`-d`, `content-type:
  application/grpc`, `te: trailers`) to `/turnout.test.Rig/Unary`; Turnout forwards over an h2c
  upstream (`protocol: h2c`), NGINX with `grpc_pass`, both to the same gRPC backend.

The gRPC backend is an nginx worker answering the Rig service's Unary with a fixed, valid reply
(HTTP/2, `content-type: application/grpc`, the length-prefixed EchoReply, trailer
`grpc-status: 0`); it reads no request. Not grpcio servers: on a 2-core machine a Python gRPC
server costs about as much CPU per call as the proxy under test, so it would be the bottleneck
and steal the proxy's core; nginx answers ~50k calls/s on one worker. It is measured alone in
every run (the `backend` row) to show it is far from the bottleneck, and every proxy is checked
with a real grpcio call (reply decoded, status OK) before it is measured.

h2load does not read gRPC trailers: a call that ends with a non-OK grpc-status counts as a 200
there. The grpcio check before each run is what catches a proxy that answers wrongly.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import benchlib as bl
import grpc

GRPC_SERVICE = "turnout.test.Rig"
GRPC_PATH = f"/{GRPC_SERVICE}/Unary"
GRPC_PREFIX = f"/{GRPC_SERVICE}"
H2LOAD_THREADS = 2
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))


def _pb_string(field: int, text: str) -> bytes:
    # A protobuf length-delimited field (wire type 2); the texts here are shorter than 128
    # bytes, so the length is one varint byte.
    data = text.encode()
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# tests/support/protos/turnout_test.proto: EchoRequest{text = 1}, EchoReply{version = 1, text = 2}.
REQUEST_MESSAGE = _pb_string(1, "bench")
REPLY_MESSAGE = _pb_string(1, "backend") + _pb_string(2, "bench")


def write_grpc_backend_conf(prefix: Path, port: int) -> Path:
    """The gRPC backend nginx (1 worker, h2c): Unary answers REPLY_MESSAGE with grpc-status 0.

    POST to a static file is 405 in nginx; error_page turns that into 200 and an internal GET of
    the reply file, the one way to answer a POST from a file without a module. The mirror with
    mirror_request_body makes nginx read the whole request first, as a gRPC server does: an
    answer sent before the request's end leaves frames for a closed stream behind, which NGINX's
    grpc_pass answers with 502 ("upstream sent frame for unknown stream").
    """
    www = prefix / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "reply.bin").write_bytes(grpc_frame(REPLY_MESSAGE))
    conf = prefix / "nginx.conf"
    conf.write_text(
        bl.nginx_common(prefix, 1)
        + f"""
http {{
{bl.nginx_http_common(prefix)}
    server {{
        listen {bl.LOOPBACK}:{port} http2 backlog=4096;
        root {www};
        http2_max_concurrent_streams 1024;
        location = {GRPC_PATH} {{
            mirror /_sink;
            mirror_request_body on;
            error_page 405 =200 /reply.bin;
            rewrite ^ /reply.bin break;
        }}
        location = /_sink {{ internal; return 204; }}
        location = /reply.bin {{
            internal;
            default_type application/grpc;
            add_trailer grpc-status 0;
        }}
    }}
}}
"""
    )
    return conf


def nginx_h2_lines(h2_port: int, grpc_port: int | None, keepalive: int) -> str:
    """What the NGINX proxy adds for the h2 rows: an h2c server (`listen PORT http2`) proxying
    to the HTTP/1.1 backend with the headers of the plain server, and `grpc_pass` to the gRPC
    backend under the Rig service's prefix."""
    grpc_upstream = grpc_location = ""
    if grpc_port is not None:
        grpc_upstream = f"""
    upstream grpc_backend {{
        server {bl.LOOPBACK}:{grpc_port};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}"""
        grpc_location = f"""
        location {GRPC_PREFIX}/ {{
            grpc_pass grpc://grpc_backend;
            # The forwarding headers Turnout adds to a gRPC call as to any request.
            grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            grpc_set_header X-Forwarded-Proto $scheme;
            grpc_set_header X-Forwarded-Host $http_host;
            grpc_set_header X-Request-Id $request_id;
        }}"""
    return f"""{grpc_upstream}
    server {{
        listen {bl.LOOPBACK}:{h2_port} http2 backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id;
        }}{grpc_location}
    }}"""


def turnout_grpc_route(config: dict[str, object], grpc_port: int) -> None:
    """Add an h2c upstream `grpc` and, first, a route for the Rig service's prefix to it."""
    upstreams = config["upstreams"]
    routes = config["routes"]
    assert isinstance(upstreams, dict)
    assert isinstance(routes, list)
    upstreams["grpc"] = {"endpoints": [f"{bl.LOOPBACK}:{grpc_port}"], "protocol": "h2c"}
    routes.insert(
        0, {"name": "grpc", "match": {"path_prefix": GRPC_PREFIX}, "split": {"grpc": 100}}
    )


# --- checks -----------------------------------------------------------------------------------


def grpc_call(port: int, timeout: float = 3.0) -> bytes:
    """One real gRPC Unary call (grpcio) to 127.0.0.1:`port`; the reply's message bytes."""
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(f"{bl.LOOPBACK}:{port}", options=options) as channel:
        # No serializers: the message bytes go out and come back as they are.
        unary = channel.unary_unary(GRPC_PATH)
        reply: bytes = unary(REQUEST_MESSAGE, timeout=timeout)
        return reply


def wait_for_grpc(proc: bl.Proc, port: int, deadline_s: float) -> None:
    """Wait until a gRPC call through `port` gets the backend's reply with status OK; StartError
    naming the last failure when `proc` dies or `deadline_s` passes (never a hang: every call
    has a 3 s deadline)."""
    deadline = time.monotonic() + deadline_s
    last = "no call made"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise bl.StartError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            reply = grpc_call(port)
        except grpc.RpcError as exc:
            error: grpc.Call = exc
            last = f"{error.code()}: {error.details()}"
        else:
            if reply == REPLY_MESSAGE:
                return
            last = f"unexpected reply {reply!r}"
        time.sleep(0.2)
    raise bl.StartError(
        f"{proc.name}: no gRPC answer on port {port} after {deadline_s:.0f}s ({last}):\n"
        f"{proc.log_tail()}"
    )


def wait_for_h2(h2load: str, proc: bl.Proc, port: int, path: str, deadline_s: float) -> None:
    """Wait until one h2c GET `path` (h2load, prior knowledge) on `port` answers 2xx."""
    deadline = time.monotonic() + deadline_s
    last = "no request made"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise bl.StartError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        done = bl.run_bounded([h2load, "-n1", "-c1", f"http://{bl.LOOPBACK}:{port}{path}"], 10)
        if re.search(r"^status codes: 1 2xx", done.stdout, re.MULTILINE):
            return
        last = " / ".join(line for line in done.stdout.splitlines() if "requests:" in line)
        time.sleep(0.2)
    raise bl.StartError(
        f"{proc.name}: no h2c answer for {path} on port {port} after {deadline_s:.0f}s "
        f"({last or 'h2load failed'}):\n{proc.log_tail()}"
    )


# --- h2load -----------------------------------------------------------------------------------

_FINISHED = re.compile(r"^finished in ([\d.]+)(s|ms|us)\b", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_TRAFFIC = re.compile(r"^traffic: .*\((\d+)\) total", re.MULTILINE)
_UNIT_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def h2load_argv(
    h2load: str,
    url: str,
    connections: int,
    streams: int,
    seconds: int,
    body: Path | None,
    log_file: Path | None,
) -> list[str]:
    """h2load for `seconds` with `connections` x `streams` in flight (h2c prior knowledge);
    with `body`, a POST of that file with the gRPC headers."""
    argv = [
        h2load,
        f"-t{min(H2LOAD_THREADS, connections)}",
        f"-c{connections}",
        f"-m{streams}",
        f"-D{seconds}",
        # A connection silent for 5 s is given up (wrk's --timeout 5s); never -T, which would
        # close busy connections mid-run.
        "-N5",
    ]
    if body is not None:
        argv += ["-d", str(body)]
        for name, value in GRPC_HEADERS:
            argv += ["-H", f"{name}: {value}"]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    return [*argv, url]


def h2load_figures(output: str, log_file: Path | None) -> dict[str, float]:
    """h2load's summary in the shape of run.py's wrk figures; latency percentiles from the
    per-request log (`--log-file`: start, status, duration in µs per line)."""
    finished, counts = _FINISHED.search(output), _REQUESTS.search(output)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load printed no summary:\n{output[-2000:]}")
    seconds = float(finished[1]) * _UNIT_S[finished[2]]
    started, done, failed, errored, timeout = (int(counts[i]) for i in (2, 3, 5, 6, 7))
    if started and not done:
        # h2load counts requests still open at the end as nothing at all: a server that stopped
        # answering would show 0 req/s and no errors.
        raise RuntimeError(f"{started} requests started and none completed: no answers")
    ok = _STATUS.search(output)
    traffic = _TRAFFIC.search(output)
    durations: list[float] = []
    if log_file is not None and log_file.exists():
        for line in log_file.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[2].isdigit():
                durations.append(float(fields[2]))
    return {
        "requests": done,
        "duration_us": seconds * 1e6,
        "bytes": int(traffic[1]) if traffic else 0,
        "connect": errored,
        "read": 0,
        "write": 0,
        # Answers that were not 2xx (h2load also counts them as failed).
        "status": sum(int(ok[i]) for i in (2, 3, 4)) if ok else failed,
        "timeout": timeout,
        "p50_us": bl.percentile(durations, 50) if durations else 0.0,
        "p99_us": bl.percentile(durations, 99) if durations else 0.0,
    }
