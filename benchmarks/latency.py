"""Fixed-rate (open-loop) latency probe: the same request schedule against several targets.

A closed-loop tool like wrk sends the next request only when the previous one came back, so a
stall hides the requests that would have been sent during it (coordinated omission). Here the
send times are fixed in advance (`rate` per second, evenly spaced) and every latency is measured
from the request's *scheduled* time to the end of its response, so a slow target is charged for
the queue it causes.

Run directly:
    .venv/bin/python benchmarks/latency.py --rate 2000 --duration 10 \
        --target direct=8001 --target turnout=8080 --target nginx=8081
The first target is the baseline for the "added" columns. `benchmarks/run.py --fixed-rate RPS`
starts the backend and both proxies and calls this module for you.

Only 127.0.0.1 is ever contacted, and each run is bounded by its request count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import cast

import httptools
import orjson
import uvloop

LOOPBACK = "127.0.0.1"
# Time allowed after the last scheduled send for answers to arrive before the rest count as
# incomplete.
GRACE_S = 5.0


@dataclass(frozen=True)
class Target:
    """A named HTTP server on 127.0.0.1."""

    name: str
    port: int


@dataclass(frozen=True)
class LatencyResult:
    """Latency percentiles of one target at one fixed rate, over all repeats."""

    name: str
    rate: float
    scheduled: int
    completed: int
    achieved_rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int
    failures: int
    incomplete: int
    ticker_lag_p99_ms: float


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    ticker_lags: list[float] = field(default_factory=list)
    non_2xx: int = 0
    failures: int = 0
    scheduled: int = 0
    busy_s: float = 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, float]] | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))
            self.close()

    def on_message_complete(self) -> None:
        """httptools callback: stamp the end time here, before any task switch adds to it."""
        done = time.perf_counter()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((int(self._parser.get_status_code()), done))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc or 'closed by peer'}"))

    def _fail(self, exc: ConnectionError) -> None:
        self.broken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def exchange(self, request: bytes) -> tuple[int, float]:
        """Send `request`; return (status, perf_counter time the response ended)."""
        if self.broken or self._transport is None:
            raise ConnectionError("connection is closed")
        self._waiter = self._loop.create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        """Close the transport (idempotent)."""
        self.broken = True
        if self._transport is not None:
            self._transport.close()


async def _open(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Connection(loop), LOOPBACK, port)
    return conn


def _ticker(
    loop: asyncio.AbstractEventLoop,
    release: asyncio.Queue[float | None],
    tally: _Tally,
    due_times: list[float],
    stop: threading.Event,
) -> None:
    """Hand due times to the event loop as they come, all that are due in one call.

    A thread with time.sleep wakes within ~0.1 ms; the event loop's own timers tick in whole
    milliseconds, which would add up to 1 ms of schedule lag to every request.
    """

    def put(batch: list[float]) -> None:
        now = time.perf_counter()
        for due in batch:
            tally.ticker_lags.append(now - due)
            release.put_nowait(due)

    index = 0
    while index < len(due_times) and not stop.is_set():
        wait = due_times[index] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter()
        end = index + 1
        while end < len(due_times) and due_times[end] <= now:
            end += 1
        loop.call_soon_threadsafe(put, due_times[index:end])
        index = end


async def _drive(
    pool: list[_Connection],
    slot: int,
    port: int,
    request: bytes,
    release: asyncio.Queue[float | None],
    tally: _Tally,
) -> None:
    """Take due times off the queue and send them on connection `slot`, reconnecting if needed."""
    while True:
        due = await release.get()
        if due is None:
            return
        try:
            if pool[slot].broken:
                pool[slot] = await _open(port)
            status, done = await pool[slot].exchange(request)
        except OSError:
            tally.failures += 1
            continue
        tally.latencies.append(done - due)
        if not 200 <= status < 300:
            tally.non_2xx += 1


async def _phase(
    pool: list[_Connection], port: int, request: bytes, rate: float, seconds: float, tally: _Tally
) -> None:
    """Send `rate` x `seconds` requests on the fixed schedule, bounded by a deadline."""
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * seconds))
    start = time.perf_counter() + 0.01
    due_times = [start + i / rate for i in range(count)]
    tally.scheduled += count
    release: asyncio.Queue[float | None] = asyncio.Queue()
    stop = threading.Event()
    began = time.perf_counter()
    try:
        async with asyncio.timeout(seconds + GRACE_S):
            async with asyncio.TaskGroup() as group:
                workers = [
                    group.create_task(_drive(pool, i, port, request, release, tally))
                    for i in range(len(pool))
                ]
                await asyncio.to_thread(_ticker, loop, release, tally, due_times, stop)
                for _ in workers:
                    release.put_nowait(None)
    except TimeoutError:
        # Whatever is still in flight counts as incomplete; those connections are unusable.
        for conn in pool:
            conn.close()
    finally:
        stop.set()
        tally.busy_s += time.perf_counter() - began


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _summarise(name: str, rate: float, tally: _Tally) -> LatencyResult:
    ordered = sorted(tally.latencies)
    lags = sorted(tally.ticker_lags)
    completed = len(ordered) + tally.failures

    def ms(q: float) -> float:
        return _percentile(ordered, q) * 1000

    return LatencyResult(
        name=name,
        rate=rate,
        scheduled=tally.scheduled,
        completed=len(ordered),
        achieved_rate=len(ordered) / tally.busy_s if tally.busy_s else 0.0,
        p50_ms=ms(50),
        p90_ms=ms(90),
        p99_ms=ms(99),
        p999_ms=ms(99.9),
        max_ms=ordered[-1] * 1000 if ordered else 0.0,
        non_2xx=tally.non_2xx,
        failures=tally.failures,
        incomplete=tally.scheduled - completed,
        ticker_lag_p99_ms=_percentile(lags, 99) * 1000,
    )


async def measure(
    targets: list[Target],
    *,
    path: str,
    rate: float,
    duration: float,
    warmup: float,
    connections: int,
    repeat: int,
    headers: dict[str, str] | None = None,
) -> list[LatencyResult]:
    """Run the fixed-rate schedule against every target, interleaved `repeat` times.

    Each visit opens `connections` keep-alive connections, runs `warmup` seconds (discarded),
    then `duration` seconds measured; samples of all visits to a target are pooled.
    """
    tallies = {t.name: _Tally() for t in targets}
    for _ in range(repeat):
        for target in targets:
            head = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{target.port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = (head + "\r\n").encode()
            pool = [await _open(target.port) for _ in range(connections)]
            try:
                if warmup > 0:
                    await _phase(pool, target.port, request, rate, warmup, _Tally())
                # A collection pause in the generator would show up as latency of the target.
                gc.collect()
                gc.disable()
                try:
                    await _phase(pool, target.port, request, rate, duration, tallies[target.name])
                finally:
                    gc.enable()
            finally:
                for conn in pool:
                    conn.close()
    return [_summarise(t.name, rate, tallies[t.name]) for t in targets]


def format_table(results: list[LatencyResult]) -> list[str]:
    """Markdown table of the results; the first row is the baseline for the added columns."""
    lines = [
        "| target | rate | achieved | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| added p50 ms | added p99 ms | errors | ticker lag p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[0] if results else None
    for r in results:
        errors = r.non_2xx + r.failures + r.incomplete
        added50 = "-" if r is base or base is None else f"{r.p50_ms - base.p50_ms:+.3f}"
        added99 = "-" if r is base or base is None else f"{r.p99_ms - base.p99_ms:+.3f}"
        flag = " !" if errors else ""
        lines.append(
            f"| {r.name}{flag} | {r.rate:.0f} | {r.achieved_rate:.0f} | {r.p50_ms:.3f} "
            f"| {r.p90_ms:.3f} | {r.p99_ms:.3f} | {r.p999_ms:.3f} | {r.max_ms:.2f} "
            f"| {added50} | {added99} | {errors} | {r.ticker_lag_p99_ms:.3f} |"
        )
    return lines


def _parse_target(text: str) -> Target:
    name, sep, port = text.partition("=")
    if not sep or not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT (127.0.0.1 only), got {text!r}")
    return Target(name, int(port))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints a markdown table, or JSON with --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--target",
        type=_parse_target,
        action="append",
        required=True,
        help="NAME=PORT on 127.0.0.1; repeat; the first is the baseline",
    )
    parser.add_argument("--path", default="/small", help="request path (/small)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per visit")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds per visit")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved visits per target")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections < 1 or args.repeat < 1:
        parser.error("rate, duration, connections and repeat must be positive")
    # The ticker thread needs the GIL the moment it wakes; the default 5 ms switch interval
    # would let the event-loop thread hold it long enough to delay sends by milliseconds.
    sys.setswitchinterval(0.0001)
    headers: dict[str, str] = {}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    results = uvloop.run(
        measure(
            args.target,
            path=args.path,
            rate=args.rate,
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            repeat=args.repeat,
            headers=headers,
        )
    )
    if args.json:
        sys.stdout.write(orjson.dumps([asdict(r) for r in results]).decode() + "\n")
    else:
        print("\n".join(format_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
