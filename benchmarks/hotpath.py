"""The data plane's Python cost per request, without sockets or the kernel.

Drives a real `ClientConnection` and a pooled `UpstreamConnection` through in-memory transports:
request bytes in, the forwarded request out, a canned response in, the relayed response out.
What it measures is exactly the interpreter work a request costs in a worker (parsing, routing,
header rewriting, counters), which wrk figures mix with syscalls and machine noise. Use it to
compare before/after a hot-path change, and with --profile to see where the time goes.

    .venv/bin/python benchmarks/hotpath.py [--requests N] [--features] [--browser] [--profile]

--browser sends run.py's browser-like head (~400 bytes, six more fields and two cookies).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any, cast

import uvloop
from run import BROWSER_HEADERS

from proxy.core.config import parse_config
from proxy.core.table import compile_table
from proxy.dataplane.http1 import ClientConnection
from proxy.dataplane.upstream import UpstreamConnection
from proxy.dataplane.worker import WorkerContext

PLAIN = """
listen: 127.0.0.1:18080
upstreams:
  backend: {endpoints: [127.0.0.1:19003]}
routes:
  - name: bench
    split: {backend: 100}
"""

FEATURES = """
listen: 127.0.0.1:18080
upstreams:
  blue: {endpoints: [127.0.0.1:19003]}
  green: {endpoints: [127.0.0.1:19003]}
routes:
  - name: bench
    overrides:
      - {header: x-canary, value: "true", to: green}
    split: {blue: 90, green: 10}
    sticky: {header: x-user}
"""

REQUEST = (
    b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nX-User: user-42\r\n\r\n"
)
# What run.py's browser scenario sends: wrk's Host, the sticky key, the browser's fields.
BROWSER_REQUEST = (
    b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nX-User: user-42\r\n"
    + b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in BROWSER_HEADERS)
    + b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n"
    b"Accept-Ranges: bytes\r\n\r\n" + b"a" * 100
)


class MemoryTransport(asyncio.Transport):
    """Collects written bytes; enough of the transport API for the data plane."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.sent += len(piece)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        # Everything "written" is gone at once: the buffer is always empty.
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


def run(requests: int, features: bool, browser: bool, profile: bool) -> None:
    """Push `requests` requests through one client connection and print ns per request."""
    loop = uvloop.new_event_loop()
    ctx = WorkerContext(loop, 0, access_log=False)
    text = FEATURES if features else PLAIN
    ctx.apply(compile_table(parse_config(text, "bench.yaml"), generation=1, sha256="x"))
    client = ClientConnection(ctx)
    client.connection_made(MemoryTransport())
    pool = next(iter(ctx.pools.endpoints.values()))
    upstream = UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport())
    pool.connections.add(upstream)
    upstream.reusable = True
    pool.release(upstream, ctx.state.now)
    for pool_member in ctx.pools.endpoints.values():
        if pool_member is not pool:
            pool_member.idle.append(upstream)

    request = BROWSER_REQUEST if browser else REQUEST

    def one() -> None:
        client.data_received(request)
        ctx.batcher.flush()
        carrier = client.current.upstream_conn if client.current is not None else None
        assert carrier is not None, "the request did not reach the pooled connection"
        conn = cast(UpstreamConnection, carrier)
        conn.data_received(RESPONSE)
        ctx.batcher.flush()
        for pool_member in ctx.pools.endpoints.values():
            if not pool_member.idle:
                pool_member.idle.append(conn)

    for _ in range(1000):
        one()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.process_time()
    for done in range(requests):
        one()
        if done % 1000 == 999:
            # The batcher schedules its flush with call_soon; flushing by hand leaves those
            # handles queued, so let the loop spin as it would between events.
            loop.run_until_complete(asyncio.sleep(0))
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    mode = "features (override, sticky 90/10)" if features else "plain (one upstream)"
    if browser:
        mode += ", browser-like head"
    print(f"{mode}: {elapsed / requests * 1e9:,.0f} ns of Python per request ({requests:,})")
    loop.close()


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--features", action="store_true")
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    run(args.requests, args.features, args.browser, args.profile)


if __name__ == "__main__":
    main()
