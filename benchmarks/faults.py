"""Fault run (issue 17): what one misbehaving peer does to everyone else, in figures.

    .venv/bin/python benchmarks/faults.py                    # every scenario, under 5 minutes
    .venv/bin/python benchmarks/faults.py --quick            # one short pass, under 1 minute
    .venv/bin/python benchmarks/faults.py --tree /tmp/before # the proxy of another checkout
    .venv/bin/python benchmarks/faults.py --only sigterm hostile

Scenarios (docs/benchmarks.md, "Faults (issue 17)", says what each measures):
  sigterm       SIGTERM under keep-alive load (50 connections), N rounds with 1 and 2 workers:
                failed requests per round (target 0)
  hostile       a hostile upstream on version `bad` while fixed-rate traffic goes to `good`:
                good's p50/p99 against a quiet run, worker RSS, what `bad`'s requests got
  fds           Turnout under `prlimit --nofile=256:256`, 400 idle client connections, then
                keep-alive clients: their statuses, ejection of the healthy endpoint, ERROR lines/s
  slow-readers  500 clients that ask for 1 MiB and read slowly or not at all: worker RSS
                before, during and after

Turnout runs as `PYTHON -m proxy run CONFIG --no-access-log` from `--tree` (cwd and PYTHONPATH);
the backend is nginx (benchlib's); hostile upstreams are faultlib.py subprocesses. Only
127.0.0.1 is used; every scenario has a deadline, a worker past --rss-cap-mib is killed, and
every process started here is stopped on exit, Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import benchlib as bl
import faultlib as fl
import run as bench
import uvloop
from latency import LatencyResult, Target
from latency import measure as fixed_rate

HERE = Path(__file__).resolve().parent
SCENARIOS = ("sigterm", "hostile", "fds", "slow-readers")
# `quiet` (no bad version) is the baseline, run first, and in a full run once more at the end:
# the mean of its p99s is what the others are compared with.
HOSTILE_ORDER = ("quiet", *fl.HOSTILE_KINDS)
CONNECT_TIMEOUT_S = 2.0
# The whole run's deadline (a scenario that would start later than that is skipped).
RUN_LIMIT_S = 290.0
RUN_LIMIT_QUICK_S = 58.0

# sigterm: keep-alive connections, each sending its next request as soon as an answer is in
# (the moment a proxy sees a connection idle is when that next request is on its way: a proxy
# closing idle connections races exactly this), load before the signal, drain.
SIGTERM_CONNECTIONS = 50
SIGTERM_RETRY_PAUSE_S = 0.01
SIGTERM_LOAD_S = 1.0
SIGTERM_DELAY_S = 1.0
SIGTERM_SHUTDOWN_S = 5.0
SIGTERM_DRAIN = {"delay": f"{SIGTERM_DELAY_S:g}s", "shutdown": f"{SIGTERM_SHUTDOWN_S:g}s"}
SIGTERM_ANSWER_TIMEOUT_S = 5.0
# hostile: the good version's fixed-rate schedule, the bad version's client (paced, so that it
# does not compete with the latency client in this process), the response timeout in force.
GOOD_RATE = 300.0
GOOD_CONNECTIONS = 16
BAD_CONCURRENCY = 4
BAD_PAUSE_S = 0.02
BAD_MAX_REQUESTS = 2000
BAD_ANSWER_TIMEOUT_S = 10.0
HOSTILE_TIMEOUTS = {"response": "3s"}
# After the good phase no new bad request starts; those in flight get this long to be answered
# (the response timeout and a second), so that a quick run sees them end too.
BAD_DRAIN_S = 4.0
# The answers the bad version's requests should get from a proxy that contains the fault
# (issue 17): 502, or 504 when timeouts.response runs out; 503 once the endpoint is ejected.
BAD_EXPECTED = {
    "endless-head": ("502",),
    "endless-value": ("502",),
    "slowloris": ("504",),
    "unsolicited-101": ("502",),
    "reset": ("502", "503"),
}
P99_BOUND = 2.0
# fds
FD_LIMIT = 256
IDLE_CONNECTIONS = 400
LIVE_CONNECTIONS = 16
LIVE_ANSWER_TIMEOUT_S = 5.0
# slow-readers
SLOW_READERS = 500
SLOW_RCVBUF = 4096
# The reading half takes one chunk (at most a receive buffer) this often.
SLOW_NUDGE_S = 0.1
OPEN_CONCURRENCY = 50
# Other scenarios stop Turnout quickly.
QUICK_DRAIN = {"delay": "0s", "shutdown": "1s"}


@dataclass(frozen=True)
class Settings:
    """Everything the command line decides."""

    tree: fl.Tree
    only: tuple[str, ...]
    quick: bool
    rounds: int
    good_seconds: float
    live_seconds: float
    hold_seconds: float
    warmup_seconds: float
    settle_seconds: float
    hostile_order: tuple[str, ...]
    rss_cap_mib: float


@dataclass
class Lab:
    """What every scenario needs: settings, processes, the temp folder and the backend."""

    settings: Settings
    procs: fl.Procs
    tmp: Path
    backend_port: int


# --- results ----------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """One SIGTERM round: how every request ended."""

    workers: int
    round: int
    ok: int = 0
    ok_after_sigterm: int = 0
    # "eof (reused conn)" -> count; a request written on a connection that then ended without
    # an answer, a non-2xx answer, or no answer in time.
    failed: Counter[str] = field(default_factory=Counter)
    failed_at: list[float] = field(default_factory=list)
    # When the last 2xx answer came, in seconds after SIGTERM.
    last_ok_at: float | None = None
    refused: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    exit_s: float | None = None
    exit_code: int | None = None

    def failures(self, where: str) -> int:
        """Failed requests on `reused` or `new` connections."""
        return sum(n for label, n in self.failed.items() if label.endswith(f"({where} conn)"))

    @property
    def total_failed(self) -> int:
        """Every failed request."""
        return sum(self.failed.values())


@dataclass
class HostileRow:
    """One hostile kind: the good version's latency, worker RSS, the bad version's answers."""

    kind: str
    good: LatencyResult | None = None
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_after: float | None = None
    killed: str | None = None
    bad: Counter[str] = field(default_factory=Counter)
    bad_seconds: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class FdResult:
    """The fd-exhaustion scenario's figures."""

    idle_opened: int = 0
    idle_failed: Counter[str] = field(default_factory=Counter)
    worker_fds: int = 0
    live: Counter[str] = field(default_factory=Counter)
    live_seconds: dict[str, list[float]] = field(default_factory=dict)
    live_duration: float = 0.0
    # "yes", "no" or "unknown", and the metric line that said yes.
    ejected: str = "unknown"
    ejected_line: str = ""
    eject_lines: int = 0
    error_lines: int = 0
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    killed: str | None = None


@dataclass
class SlowResult:
    """The slow-readers scenario's figures."""

    connected: int = 0
    connect_failed: Counter[str] = field(default_factory=Counter)
    received_mib: float = 0.0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_end_of_hold: float = 0.0
    rss_after: float | None = None
    fds_before: int = 0
    fds_during: int = 0
    fds_after: int = 0
    after_wait_s: float = 0.0
    killed: str | None = None


@dataclass
class Report:
    """What has been measured so far; rendered even when the run stops midway."""

    settings: Settings
    rounds: list[RoundResult] = field(default_factory=list)
    hostile: list[HostileRow] = field(default_factory=list)
    fds: FdResult | None = None
    slow: SlowResult | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # The 1-minute load average at the start: other work on the machine moves the latencies.
    load_at_start: float = field(default_factory=lambda: os.getloadavg()[0])


# --- helpers ----------------------------------------------------------------------------------


def turnout_config(
    workers: int,
    upstreams: dict[str, int],
    split: dict[str, int],
    *,
    overrides: tuple[str, ...] = (),
    timeouts: dict[str, str] | None = None,
    drain: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A routing table on fresh ports: one route `/`, upstreams on 127.0.0.1 ports, and an
    override `x-to: NAME` for each name in `overrides`.
    """
    config: dict[str, Any] = {
        "listen": f"{bl.LOOPBACK}:{bl.free_port()}",
        "admin": f"{bl.LOOPBACK}:{bl.free_port()}",
        "workers": workers,
        "drain": drain or QUICK_DRAIN,
    }
    if timeouts:
        config["timeouts"] = timeouts
    config["upstreams"] = {
        name: {"endpoints": [f"{bl.LOOPBACK}:{port}"]} for name, port in upstreams.items()
    }
    route: dict[str, Any] = {"name": "faults", "match": {"path_prefix": "/"}}
    if overrides:
        route["overrides"] = [{"header": "x-to", "value": n, "to": n} for n in overrides]
    route["split"] = split
    config["routes"] = [route]
    return config


def progress(text: str) -> None:
    """One progress line, at once."""
    print(text, flush=True)


async def wait_exit(proc: bl.Proc, limit_s: float) -> int | None:
    """Wait (in a thread, the event loop keeps serving the clients) up to `limit_s` seconds for
    `proc` to exit; its exit status, None when it did not.
    """
    try:
        return await asyncio.to_thread(proc.popen.wait, limit_s)
    except subprocess.TimeoutExpired:
        return None


async def open_many(
    count: int, opener: Callable[[], Awaitable[asyncio.BaseTransport]]
) -> tuple[list[asyncio.BaseTransport], Counter[str]]:
    """Open `count` connections, OPEN_CONCURRENCY at a time; the transports and the failures."""
    opened: list[asyncio.BaseTransport] = []
    failed: Counter[str] = Counter()

    async def one() -> None:
        try:
            opened.append(await opener())
        except (OSError, TimeoutError) as exc:
            failed[fl.exc_label(exc)] += 1

    for start in range(0, count, OPEN_CONCURRENCY):
        async with asyncio.TaskGroup() as group:
            for _ in range(min(OPEN_CONCURRENCY, count - start)):
                group.create_task(one())
    return opened, failed


async def wait_until(check: Callable[[], bool], limit_s: float, every: float = 0.1) -> float:
    """Poll `check` (a /proc figure: nothing to await) until it holds or `limit_s` seconds
    pass; the seconds waited.
    """
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        if check() or waited >= limit_s:
            return waited
        await asyncio.sleep(every)


# --- a. SIGTERM under keep-alive load ---------------------------------------------------------


class KeepAliveLoad:
    """Keep-alive clients that behave like a load balancer's connection pool: a connection is
    reused until it fails or the answer says Connection: close; a new one is opened as long as
    connects succeed; a refused connect (the listener is gone) ends that client.
    """

    def __init__(self, port: int, result: RoundResult) -> None:
        self.request = fl.request_bytes(port, "/small")
        self.port = port
        self.result = result
        self.sigterm_at: float | None = None

    async def client(self) -> None:
        """One connection's loop; it ends at a refused connect or when cancelled."""
        conn: fl.ClientConn | None = None
        try:
            while True:
                if conn is not None and conn.usable():
                    where = "reused"
                else:
                    where = "new"
                    if conn is not None:
                        conn.close()
                    try:
                        conn = await fl.open_conn(self.port, CONNECT_TIMEOUT_S)
                    except ConnectionRefusedError:
                        self.result.refused += 1
                        return
                    except (OSError, TimeoutError) as exc:
                        self.result.connect_errors[fl.exc_label(exc)] += 1
                        conn = None
                        await asyncio.sleep(SIGTERM_RETRY_PAUSE_S)
                        continue
                try:
                    answer = await conn.exchange(self.request, SIGTERM_ANSWER_TIMEOUT_S)
                except asyncio.CancelledError:
                    self._fail(f"unanswered at the round's end ({where} conn)")
                    raise
                if answer.ok:
                    self.result.ok += 1
                    if self.sigterm_at is not None:
                        self.result.ok_after_sigterm += 1
                        self.result.last_ok_at = time.monotonic() - self.sigterm_at
                else:
                    self._fail(f"{answer.label} ({where} conn)")
                if answer.close or answer.status is None:
                    conn.close()
        finally:
            if conn is not None:
                conn.close()

    def _fail(self, label: str) -> None:
        self.result.failed[label] += 1
        if self.sigterm_at is not None:
            self.result.failed_at.append(time.monotonic() - self.sigterm_at)


async def sigterm_round(lab: Lab, workers: int, number: int) -> RoundResult:
    """Start Turnout, load it, SIGTERM it mid-load and count how every request ended."""
    result = RoundResult(workers, number)
    config = turnout_config(
        workers, {"backend": lab.backend_port}, {"backend": 100}, drain=SIGTERM_DRAIN
    )
    turnout = fl.start_turnout(
        lab.procs, lab.settings.tree, config, lab.tmp, f"sigterm-w{workers}-{number}"
    )
    load = KeepAliveLoad(turnout.port, result)
    try:
        async with asyncio.TaskGroup() as group:
            clients = [group.create_task(load.client()) for _ in range(SIGTERM_CONNECTIONS)]
            await asyncio.sleep(SIGTERM_LOAD_S)
            load.sigterm_at = time.monotonic()
            turnout.proc.popen.send_signal(signal.SIGTERM)
            bound = SIGTERM_DELAY_S + SIGTERM_SHUTDOWN_S + 5.0
            result.exit_code = await wait_exit(turnout.proc, bound)
            if result.exit_code is not None:
                result.exit_s = time.monotonic() - load.sigterm_at
            # With the supervisor gone every connect is refused: the clients end by themselves.
            await asyncio.wait(clients, timeout=SIGTERM_ANSWER_TIMEOUT_S + 1.0)
            for task in clients:
                task.cancel()
    finally:
        lab.procs.stop(turnout.proc)
    return result


async def scenario_sigterm(lab: Lab, report: Report) -> None:
    """N rounds with 1 worker, then N with 2."""
    for workers in (1, 2):
        for number in range(1, lab.settings.rounds + 1):
            r = await sigterm_round(lab, workers, number)
            report.rounds.append(r)
            progress(
                f"  sigterm w{workers} #{number}: ok {r.ok}, failed {r.total_failed} "
                f"{fl.summarise(r.failed) if r.failed else ''}, refused {r.refused}, "
                f"exit {_secs(r.exit_s)}"
            )


# --- b. hostile upstream per version ----------------------------------------------------------


class BadTraffic:
    """Requests pinned to version `bad` (x-to: bad), each on a new connection, paced."""

    def __init__(self, port: int, row: HostileRow) -> None:
        self.request = fl.request_bytes(port, "/bad", {"x-to": "bad"})
        self.port = port
        self.row = row
        self.sent = 0
        self.stopped_at = 0.0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Start no new request (the first call counts for `stopped_at`)."""
        if not self._stop.is_set():
            self.stopped_at = time.monotonic()
            self._stop.set()

    async def client(self) -> None:
        """One client's loop: connect, ask, note the answer (status or error), close."""
        while not self._stop.is_set() and self.sent < BAD_MAX_REQUESTS:
            try:
                conn = await fl.open_conn(self.port, CONNECT_TIMEOUT_S, head_only=True)
            except (OSError, TimeoutError) as exc:
                self.row.bad[fl.exc_label(exc)] += 1
                await asyncio.sleep(BAD_PAUSE_S)
                continue
            self.sent += 1
            try:
                answer = await conn.exchange(self.request, BAD_ANSWER_TIMEOUT_S)
            except asyncio.CancelledError:
                self.row.bad["no answer yet at the end"] += 1
                raise
            finally:
                conn.close()
            label = (
                f"no answer in {BAD_ANSWER_TIMEOUT_S:.0f} s"
                if answer.error == "timeout"
                else answer.label
            )
            self.row.bad[label] += 1
            self.row.bad_seconds.setdefault(label, []).append(answer.seconds)
            await asyncio.sleep(BAD_PAUSE_S)


async def hostile_run(lab: Lab, kind: str) -> HostileRow:
    """One kind: start it (not for `quiet`) and Turnout, then good and bad traffic at once."""
    row = HostileRow(kind)
    quiet = kind == "quiet"
    hostile: bl.Proc | None = None
    turnout: fl.Turnout | None = None
    try:
        if quiet:
            config = turnout_config(
                1,
                {"good": lab.backend_port},
                {"good": 100},
                overrides=("good",),
                timeouts=HOSTILE_TIMEOUTS,
            )
        else:
            hostile, bad_port = fl.start_hostile(lab.procs, kind, lab.tmp)
            config = turnout_config(
                1,
                {"good": lab.backend_port, "bad": bad_port},
                {"good": 50, "bad": 50},
                overrides=("bad", "good"),
                timeouts=HOSTILE_TIMEOUTS,
            )
        turnout = fl.start_turnout(lab.procs, lab.settings.tree, config, lab.tmp, f"hostile-{kind}")
        pids = turnout.workers()
        row.rss_before = turnout.worker_rss_mib()
        watch = fl.RssWatch(turnout, lab.settings.rss_cap_mib)
        bad = BadTraffic(turnout.port, row)
        # The bad clients stop starting requests when the good schedule ends, so that waiting
        # for their last answers overlaps with the latency client's wait for its stragglers.
        schedule_s = lab.settings.warmup_seconds + lab.settings.good_seconds
        stop_bad = asyncio.get_running_loop().call_later(schedule_s, bad.stop)
        async with asyncio.TaskGroup() as group:
            group.create_task(watch.run())
            clients = (
                [] if quiet else [group.create_task(bad.client()) for _ in range(BAD_CONCURRENCY)]
            )
            try:
                results = await fixed_rate(
                    [Target("good", turnout.port)],
                    path="/small",
                    rate=GOOD_RATE,
                    duration=lab.settings.good_seconds,
                    warmup=lab.settings.warmup_seconds,
                    connections=GOOD_CONNECTIONS,
                    repeat=1,
                    headers={"x-to": "good"},
                )
                row.good = results[0]
            except OSError as exc:
                row.notes.append(f"good client could not connect: {exc}")
            finally:
                stop_bad.cancel()
                bad.stop()
                if clients:
                    await asyncio.wait(
                        clients, timeout=max(0.0, bad.stopped_at + BAD_DRAIN_S - time.monotonic())
                    )
                for task in clients:
                    task.cancel()
                watch.stop()
        row.rss_peak, row.killed = watch.peak_mib, watch.killed
        if row.killed is None:
            # The bad connections are closed now; give the worker a moment to let go of them.
            await asyncio.sleep(lab.settings.settle_seconds)
            row.rss_after = turnout.worker_rss_mib()
            if turnout.workers() != pids:
                row.notes.append(f"workers {pids} -> {turnout.workers()} (one was replaced)")
    finally:
        if turnout is not None:
            # A worker stuck in a hostile head does not drain: do not wait long for it.
            lab.procs.stop(turnout.proc, grace=2.0)
        if hostile is not None:
            lab.procs.stop(hostile)
    return row


async def scenario_hostile(lab: Lab, report: Report) -> None:
    """`quiet` first (the baseline), then each hostile kind (then `quiet` again)."""
    for kind in lab.settings.hostile_order:
        started = time.monotonic()
        row = await hostile_run(lab, kind)
        report.hostile.append(row)
        good = row.good
        progress(
            f"  hostile {kind} ({time.monotonic() - started:.1f} s): good p50 "
            f"{_ms(good, 'p50_ms')} ms, p99 {_ms(good, 'p99_ms')} ms, "
            f"RSS {row.rss_before:.0f} -> peak {row.rss_peak:.0f} MiB"
            f"{'; ' + row.killed if row.killed else ''}; bad: {fl.summarise(row.bad)}"
        )


# --- c. fd exhaustion -------------------------------------------------------------------------


async def scenario_fds(lab: Lab, report: Report) -> None:
    """Turnout under a 256-fd limit, 400 idle connections, then live keep-alive clients."""
    result = FdResult()
    report.fds = result
    config = turnout_config(1, {"backend": lab.backend_port}, {"backend": 100})
    turnout = fl.start_turnout(
        lab.procs, lab.settings.tree, config, lab.tmp, "fds", nofile=FD_LIMIT
    )
    idle: list[asyncio.BaseTransport] = []
    live: list[fl.ClientConn | None] = []
    request = fl.request_bytes(turnout.port, "/small")
    try:
        # The live connections are accepted first, the flood after them.
        for _ in range(LIVE_CONNECTIONS):
            live.append(await fl.open_conn(turnout.port, CONNECT_TIMEOUT_S))
        loop = asyncio.get_running_loop()

        async def idle_conn() -> asyncio.BaseTransport:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, bl.LOOPBACK, turnout.port
                )
            return transport

        idle, result.idle_failed = await open_many(IDLE_CONNECTIONS, idle_conn)
        result.idle_opened = len(idle)
        worker = turnout.workers()[0]
        # The worker adopts what it can; its fd table then stops growing.
        await wait_until(lambda: bl.open_fds(worker) >= FD_LIMIT - 8, 2.0)
        result.worker_fds = bl.open_fds(worker)
        offset = turnout.log_size()
        started = time.monotonic()

        async def live_client(slot: int) -> None:
            while True:
                conn = live[slot]
                if conn is None or not conn.usable():
                    try:
                        conn = live[slot] = await fl.open_conn(turnout.port, CONNECT_TIMEOUT_S)
                    except (OSError, TimeoutError) as exc:
                        result.live[fl.exc_label(exc)] += 1
                        await asyncio.sleep(0.1)
                        continue
                sent = time.monotonic()
                try:
                    answer = await conn.exchange(request, LIVE_ANSWER_TIMEOUT_S)
                except asyncio.CancelledError:
                    # The clients send back to back: one request is always just on its way.
                    if time.monotonic() - sent > 1.0:
                        result.live["no answer for > 1 s at the end"] += 1
                    raise
                result.live[answer.label] += 1
                result.live_seconds.setdefault(answer.label, []).append(answer.seconds)
                if answer.close or answer.status is None:
                    conn.close()
                    live[slot] = None

        watch = fl.RssWatch(turnout, lab.settings.rss_cap_mib)
        async with asyncio.TaskGroup() as group:
            group.create_task(watch.run())
            clients = [group.create_task(live_client(i)) for i in range(LIVE_CONNECTIONS)]
            # The phase's length: the clients run meanwhile.
            await asyncio.sleep(lab.settings.live_seconds)
            for task in clients:
                task.cancel()
            watch.stop()
        result.killed = watch.killed
        result.live_duration = time.monotonic() - started
        lines = turnout.log_lines_since(offset)
        errors = [line.split(" ERROR ", 1)[1][:100] for line in lines if " ERROR " in line]
        result.error_lines = len(errors)
        result.top_errors = Counter(errors).most_common(3)
        result.eject_lines = sum("ejected" in line for line in lines)
        result.ejected, result.ejected_line = await _ejected(turnout)
    finally:
        for transport in idle:
            transport.close()
        for conn in live:
            if conn is not None:
                conn.close()
        lab.procs.stop(turnout.proc)
    progress(
        f"  fds: idle {result.idle_opened}, worker fds {result.worker_fds}, live "
        f"{fl.summarise(result.live)}, ejected {result.ejected}, "
        f"{result.error_lines} ERROR lines"
    )


async def _ejected(turnout: fl.Turnout) -> tuple[str, str]:
    """turnout_endpoint_ejected from the admin /metrics: `yes` (and the line) as soon as a
    scrape in the next 3 s shows 1 (workers publish their counters periodically), else `no`.
    """
    deadline = time.monotonic() + 3.0
    answered = False
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(fl.admin_get, turnout.admin_port, "/metrics")
        if got is not None and got[0] == 200:
            answered = True
            for line in got[1].splitlines():
                if line.startswith("turnout_endpoint_ejected{") and float(line.split()[-1]) > 0:
                    return "yes", line
        await asyncio.sleep(0.5)
    return ("no", "") if answered else ("unknown", "admin /metrics did not answer")


# --- d. slow readers --------------------------------------------------------------------------


class SlowReader(asyncio.Protocol):
    """Asks for 1 MiB, then reads nothing (`reads` False) or one chunk per `nudge()`."""

    def __init__(self, request: bytes, reads: bool) -> None:
        self.request = request
        self.reads = reads
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def nudge(self) -> None:
        """Let one more chunk in (the slow half)."""
        if self.reads and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


async def scenario_slow(lab: Lab, report: Report) -> None:
    """500 slow readers of /1m, held, then closed: worker RSS and fds before, during, after."""
    result = SlowResult()
    report.slow = result
    config = turnout_config(1, {"backend": lab.backend_port}, {"backend": 100})
    turnout = fl.start_turnout(lab.procs, lab.settings.tree, config, lab.tmp, "slow-readers")
    request = fl.request_bytes(turnout.port, "/1m")
    readers: list[SlowReader] = []
    opened: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()
    try:
        worker = turnout.workers()[0]
        result.rss_before = turnout.worker_rss_mib()
        result.fds_before = bl.open_fds(worker)
        started = itertools.count()

        async def reader() -> asyncio.BaseTransport:
            # Alternate by start order (decided now: connects finish in any order).
            reads = next(started) % 2 == 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small receive window: the proxy cannot park the 1 MiB in this kernel buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.sock_connect(sock, (bl.LOOPBACK, turnout.port))
                proto = SlowReader(request, reads)
                transport, _ = await loop.create_connection(lambda: proto, sock=sock)
            except BaseException:
                sock.close()
                raise
            readers.append(proto)
            return transport

        watch = fl.RssWatch(turnout, lab.settings.rss_cap_mib)
        async with asyncio.TaskGroup() as group:
            watched = group.create_task(watch.run())
            opened, result.connect_failed = await open_many(SLOW_READERS, reader)
            result.connected = len(opened)
            hold_end = time.monotonic() + lab.settings.hold_seconds
            while time.monotonic() < hold_end and watch.killed is None:
                await asyncio.sleep(min(SLOW_NUDGE_S, max(0.0, hold_end - time.monotonic())))
                for proto in readers:
                    proto.nudge()
            result.fds_during = bl.open_fds(worker)
            result.rss_end_of_hold = turnout.worker_rss_mib()
            watch.stop()
            await watched
        result.rss_peak, result.killed = watch.peak_mib, watch.killed
        result.received_mib = sum(r.received for r in readers) / bl.ONE_MIB
        for transport in opened:
            transport.close()
        opened = []
        if result.killed is None:
            # "After": once the worker has closed the connections (its fd count is back), and
            # one second more for the frees to settle.
            result.after_wait_s = await wait_until(
                lambda: bl.open_fds(worker) <= result.fds_before + 10, 10.0
            )
            await asyncio.sleep(1.0)
            result.fds_after = bl.open_fds(worker)
            result.rss_after = turnout.worker_rss_mib()
    finally:
        for transport in opened:
            transport.close()
        lab.procs.stop(turnout.proc)
    progress(
        f"  slow-readers: {result.connected} connected, RSS {result.rss_before:.0f} -> peak "
        f"{result.rss_peak:.0f} -> after {_mib(result.rss_after)} MiB"
        f"{'; ' + result.killed if result.killed else ''}"
    )


# --- rendering --------------------------------------------------------------------------------


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ms(result: LatencyResult | None, key: str) -> str:
    return "-" if result is None or not result.completed else f"{getattr(result, key):.2f}"


def sigterm_section(report: Report) -> list[str]:
    """Table a: one row per round, and the total per worker count."""
    lines = [
        "## a. SIGTERM under keep-alive load",
        "",
        f"{SIGTERM_CONNECTIONS} keep-alive connections to nginx `/small`, each sending its "
        "next request as soon as an answer is in (a new connection after `Connection: close` "
        "or a lost one, until a connect is refused), SIGTERM after "
        f"{SIGTERM_LOAD_S:.0f} s; drain.delay {SIGTERM_DRAIN['delay']}, drain.shutdown "
        f"{SIGTERM_DRAIN['shutdown']}. Failed: a request written on a "
        "connection that then ended without an answer, a non-2xx answer, or none within "
        f"{SIGTERM_ANSWER_TIMEOUT_S:.0f} s. Refused connects (listener closed) are not requests. "
        "Target: 0 failed in every round.",
        "",
        "| workers | round | ok | ok after SIGTERM | failed | on reused conn | on new conn "
        "| failures (reason, conn) | failed at (s after SIGTERM) | last ok at "
        "| refused connects | SIGTERM -> exit |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in report.rounds:
        at = f"{min(r.failed_at):.2f}-{max(r.failed_at):.2f}" if r.failed_at else "-"
        other = f"; connect errors: {fl.summarise(r.connect_errors)}" if r.connect_errors else ""
        exit_text = _secs(r.exit_s) + ("" if r.exit_code in (0, None) else f" (rc {r.exit_code})")
        lines.append(
            f"| {r.workers} | {r.round} | {r.ok} | {r.ok_after_sigterm} | {r.total_failed} "
            f"| {r.failures('reused')} | {r.failures('new')} | {fl.summarise(r.failed)}{other} "
            f"| {at} | {_secs(r.last_ok_at)} | {r.refused} | {exit_text} |"
        )
    lines.append("")
    for workers in sorted({r.workers for r in report.rounds}):
        rounds = [r for r in report.rounds if r.workers == workers]
        failed = sum(r.total_failed for r in rounds)
        bad = sum(1 for r in rounds if r.total_failed)
        verdict = "PASS" if failed == 0 and len(rounds) else "FAIL"
        lines.append(
            f"- {workers} worker(s): {len(rounds)} rounds, {sum(r.ok for r in rounds)} ok, "
            f"{failed} failed ({bad} of {len(rounds)} rounds with failures): {verdict}"
        )
    return [*lines, ""]


def quiet_p99(report: Report) -> float | None:
    """The baseline: the mean good p99 of the quiet run(s)."""
    p99s = [r.good.p99_ms for r in report.hostile if r.kind == "quiet" and r.good]
    return sum(p99s) / len(p99s) if p99s else None


def good_pass(row: HostileRow, quiet: float | None) -> bool:
    """Good p99 within P99_BOUND of quiet, every good request answered 2xx, not killed."""
    g = row.good
    return (
        g is not None
        and quiet is not None
        and g.completed > 0
        and g.p99_ms <= P99_BOUND * quiet
        and not (g.non_2xx or g.failures or g.incomplete)
        and row.killed is None
    )


def bad_pass(row: HostileRow) -> bool:
    """Every request to the bad version got one of the expected statuses."""
    expected = BAD_EXPECTED.get(row.kind, ())
    return bool(row.bad) and all(label in expected for label in row.bad)


def hostile_section(report: Report) -> list[str]:
    """Table b: one row per run, the quiet run(s) included."""
    s = report.settings
    quiet = quiet_p99(report)
    lines = [
        "## b. Hostile upstream on version `bad`, fixed-rate traffic to `good`",
        "",
        f"1 worker; route split good 50 / bad 50 with overrides `x-to: good|bad`; "
        f"timeouts.response {HOSTILE_TIMEOUTS['response']}. `good`: {GOOD_RATE:.0f} req/s "
        f"fixed rate on {GOOD_CONNECTIONS} keep-alive connections to nginx `/small` "
        f"(benchmarks/latency.py: latency from the scheduled send; ticker lag = how late the "
        f"generator itself released requests), {s.good_seconds:.0f} s after "
        f"{s.warmup_seconds:g} s warm-up. `bad`: {BAD_CONCURRENCY} clients, a new connection "
        f"per request, {BAD_PAUSE_S * 1000:.0f} ms apart, answer (head only) awaited "
        f"{BAD_ANSWER_TIMEOUT_S:.0f} s. RSS: the worker's VmRSS, sampled every 0.1 s, Turnout "
        f"killed past {s.rss_cap_mib:.0f} MiB; after = {s.settle_seconds:g} s after the "
        f"traffic stopped. Baseline: the mean p99 of the quiet run(s), "
        f"{'-' if quiet is None else f'{quiet:.2f}'} ms. Target: good p99 within "
        f"{P99_BOUND:.0f}x of it, no good errors, RSS bounded.",
        "",
        "| bad upstream | good p50 ms | good p99 ms | good max ms | ticker lag p99 ms "
        "| p99 vs quiet | good errors (non-2xx / failed / unanswered) "
        "| worker RSS MiB before / peak / after | good & RSS verdict "
        "| `bad` requests got (median wait) | expected | `bad` verdict |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for row in report.hostile:
        g = row.good
        ratio = "-" if g is None or not g.completed or not quiet else f"{g.p99_ms / quiet:.1f}x"
        errors = "-" if g is None else f"{g.non_2xx} / {g.failures} / {g.incomplete}"
        rss = f"{row.rss_before:.0f} / {row.rss_peak:.0f} / " + (
            row.killed if row.killed else _mib(row.rss_after)
        )
        good = "-" if row.kind == "quiet" else ("PASS" if good_pass(row, quiet) else "FAIL")
        bad = "-" if row.kind == "quiet" else ("PASS" if bad_pass(row) else "FAIL")
        notes = f" ({'; '.join(row.notes)})" if row.notes else ""
        lag = "-" if g is None else f"{g.ticker_lag_p99_ms:.2f}"
        expected = " or ".join(BAD_EXPECTED.get(row.kind, ("-",)))
        lines.append(
            f"| {row.kind} | {_ms(g, 'p50_ms')} | {_ms(g, 'p99_ms')} | {_ms(g, 'max_ms')} "
            f"| {lag} | {ratio} | {errors} | {rss} | {good}{notes} "
            f"| {fl.summarise(row.bad, row.bad_seconds)} | {expected} | {bad} |"
        )
    kinds = "; ".join(f"`{k}`: {v}" for k, v in fl.HOSTILE_KINDS.items())
    return [*lines, "", f"Hostile kinds: {kinds}.", ""]


def fds_pass(result: FdResult) -> bool:
    """Only 2xx for the live clients, no ejection, at most 2 ERROR lines, nothing killed."""
    answered_ok = all(label.startswith("2") for label in result.live)
    return (
        bool(result.live)
        and answered_ok
        and result.ejected == "no"
        and result.error_lines <= 2
        and result.killed is None
    )


def fds_section(result: FdResult) -> list[str]:
    """Table c."""
    rate = result.error_lines / result.live_duration if result.live_duration else 0.0
    top = "; ".join(f"{text!r} x{n}" for text, n in result.top_errors) or "-"
    rows = [
        ("Turnout's fd limit (soft = hard)", f"{FD_LIMIT} (`prlimit --nofile`)"),
        (
            "idle client connections opened",
            f"{result.idle_opened} of {IDLE_CONNECTIONS}"
            + (f" ({fl.summarise(result.idle_failed)})" if result.idle_failed else ""),
        ),
        ("worker's open fds with them", str(result.worker_fds)),
        (
            f"live keep-alive clients ({LIVE_CONNECTIONS}, {result.live_duration:.1f} s) got",
            fl.summarise(result.live, result.live_seconds),
        ),
        (
            "healthy endpoint ejected (admin /metrics, 3 s of scrapes)",
            f"{result.ejected} (`{result.ejected_line}`)"
            if result.ejected_line
            else result.ejected,
        ),
        ("log lines saying `ejected`", str(result.eject_lines)),
        ("ERROR log lines", f"{result.error_lines} ({rate:.1f}/s)"),
        ("most frequent ERROR lines", top),
        ("verdict", "PASS" if fds_pass(result) else "FAIL"),
    ]
    if result.killed:
        rows.append(("killed", result.killed))
    return [
        "## c. File descriptors exhausted",
        "",
        f"1 worker under `prlimit --nofile={FD_LIMIT}:{FD_LIMIT}`; {LIVE_CONNECTIONS} live "
        f"connections opened first, then {IDLE_CONNECTIONS} idle ones that send nothing, then "
        "the live ones send `GET /small` back to back (a new connection when one closes). "
        "Target: only 2xx (accept paused rather than failing, no 502), endpoint not ejected, "
        "one rate-limited log line (the verdict allows 2 ERROR lines).",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]


def slow_section(result: SlowResult, hold: float) -> list[str]:
    """Table d."""
    return [
        f"## d. {SLOW_READERS} slow readers of 1 MiB",
        "",
        f"1 worker; {SLOW_READERS} clients (receive buffer {SLOW_RCVBUF} B) each `GET /1m`; "
        f"half never read, half read one chunk (at most the buffer) every "
        f"{SLOW_NUDGE_S * 1000:.0f} ms; held {hold:.0f} s, then all closed. "
        f"{result.connected} connected"
        + (f" ({fl.summarise(result.connect_failed)})" if result.connect_failed else "")
        + f", {result.received_mib:.1f} MiB read by them in all. Target: RSS back near where "
        "it started once they are gone.",
        "",
        "| phase | worker RSS MiB | worker fds |",
        "|---|---:|---:|",
        f"| before | {result.rss_before:.0f} | {result.fds_before} |",
        f"| peak while held | {result.rss_peak:.0f} | {result.fds_during} |",
        f"| end of hold | {result.rss_end_of_hold:.0f} | {result.fds_during} |",
        f"| after close (+{result.after_wait_s:.1f} s for the fds, +1 s) "
        f"| {result.killed or _mib(result.rss_after)} | {result.fds_after} |",
        "",
    ]


def all_pass(report: Report) -> bool:
    """Every verdict of the scenarios that ran is PASS (slow-readers has none)."""
    quiet = quiet_p99(report)
    hostile = [r for r in report.hostile if r.kind != "quiet"]
    return (
        not any(r.total_failed for r in report.rounds)
        and all(good_pass(r, quiet) and bad_pass(r) for r in hostile)
        and (report.fds is None or fds_pass(report.fds))
    )


def render(report: Report, complete: bool) -> list[str]:
    """The whole report."""
    s = report.settings
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    took = ", ".join(f"{name} {sec:.0f} s" for name, sec in report.seconds.items())
    lines = [
        f"# Turnout fault run (issue 17), {datetime.now().isoformat(timespec='seconds')}"
        + ("" if complete else " (INCOMPLETE)"),
        "",
        f"- tree: {s.tree.describe()}; `{s.tree.python} -m proxy`",
        f"- CPU: {model}, {os.cpu_count()} cores; kernel {platform.release()}; "
        f"Python {platform.python_version()}",
        f"- {'quick' if s.quick else 'full'} run; {s.rounds} SIGTERM round(s) per worker count; "
        f"RSS cap {s.rss_cap_mib:.0f} MiB; took: {took or '-'}",
        f"- load average (1 min): {report.load_at_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (2 cores; the run itself adds about 1)",
        "",
    ]
    if report.rounds:
        lines += sigterm_section(report)
    if report.hostile:
        lines += hostile_section(report)
    if report.fds is not None:
        lines += fds_section(report.fds)
    if report.slow is not None:
        lines += slow_section(report.slow, s.hold_seconds)
    if report.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    return lines


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    """Parse the command line (quick mode shortens every phase)."""
    parser = argparse.ArgumentParser(description="Fault run for issue 17 on 127.0.0.1.")
    parser.add_argument("--quick", action="store_true", help="one short pass (< 1 minute)")
    parser.add_argument(
        "--tree", type=Path, default=HERE.parent, help="Turnout checkout to run (this one)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter (%(default)s)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        metavar="NAME",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="SIGTERM rounds per worker count (10; quick 1)")
    parser.add_argument(
        "--rss-cap-mib", type=float, default=1536.0, help="kill Turnout past this (%(default)s)"
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    tree = args.tree.resolve()
    if not (tree / "proxy" / "__main__.py").is_file():
        parser.error(f"--tree {tree}: no proxy/__main__.py there")
    rounds = args.rounds or (1 if quick else 10)
    if rounds < 1 or args.rss_cap_mib <= 0:
        parser.error("--rounds and --rss-cap-mib must be positive")
    return Settings(
        tree=fl.Tree(tree, args.python),
        only=tuple(name for name in SCENARIOS if name in args.only),
        quick=quick,
        rounds=rounds,
        good_seconds=3.0 if quick else 6.0,
        live_seconds=2.0 if quick else 5.0,
        hold_seconds=2.0 if quick else 5.0,
        warmup_seconds=0.5 if quick else 1.0,
        settle_seconds=0.5 if quick else 1.0,
        hostile_order=HOSTILE_ORDER if quick else (*HOSTILE_ORDER, "quiet"),
        rss_cap_mib=args.rss_cap_mib,
    )


def budget(settings: Settings, name: str) -> float:
    """A scenario's deadline in seconds: about twice its planned length."""
    per_kind = (
        settings.good_seconds
        + settings.warmup_seconds
        + settings.settle_seconds
        + BAD_DRAIN_S
        + 8.0
    )
    return {
        "sigterm": 2 * settings.rounds * 6.0 + 8.0,
        "hostile": len(settings.hostile_order) * per_kind + 10.0,
        "fds": settings.live_seconds + 15.0,
        "slow-readers": settings.hold_seconds + 15.0,
    }[name]


async def session(lab: Lab, report: Report, run_deadline: float) -> None:
    """Every chosen scenario in turn, each under its deadline and all under the run's."""
    runners = {
        "sigterm": scenario_sigterm,
        "hostile": scenario_hostile,
        "fds": scenario_fds,
        "slow-readers": scenario_slow,
    }
    for name in lab.settings.only:
        started = time.monotonic()
        limit = min(budget(lab.settings, name), run_deadline - started)
        if limit < 5.0:
            report.notes.append(f"{name}: skipped, the run's time was up")
            continue
        progress(f"== {name} (deadline {limit:.0f} s)")
        try:
            async with asyncio.timeout(limit):
                await runners[name](lab, report)
        except TimeoutError:
            report.notes.append(f"{name}: cut at its deadline ({limit:.0f} s)")
        except bl.StartError as exc:
            report.notes.append(f"{name}: a server did not start: {str(exc).splitlines()[0]}")
            progress(f"error: {exc}")
        except Exception as exc:
            # A harness bug in one scenario: say so, show where, and go on with the others.
            report.notes.append(f"{name}: stopped by {type(exc).__name__}: {exc}")
            traceback.print_exc()
        report.seconds[name] = time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; print the report and write benchmarks/out/faults-<stamp>.md."""
    settings = parse_args(argv)
    run_deadline = time.monotonic() + (RUN_LIMIT_QUICK_S if settings.quick else RUN_LIMIT_S)
    signal.signal(signal.SIGTERM, bl.interrupt_on_sigterm)
    # The latency client's ticker thread must get the GIL the moment it wakes (see latency.py).
    sys.setswitchinterval(0.0001)
    bl.raise_nofile(4 * (SLOW_READERS + IDLE_CONNECTIONS))
    progress(f"tree: {settings.tree.describe()}; proxy from {fl.check_tree(settings.tree)}")
    tools = bench.ensure_tools(pin=False)
    pinning = bench.choose_pinning(False, [1])
    report = Report(settings)
    procs = fl.Procs()
    complete = False
    status = 1
    try:
        with bl.session_dir("turnout-bench-") as tmp, contextlib.ExitStack() as stack:
            backend = bench.start_backend(tmp, tools, pinning, stack)
            lab = Lab(settings, procs, tmp, backend.port)
            uvloop.run(session(lab, report, run_deadline))
            complete = not report.notes
            status = 0 if all_pass(report) else 2
    except bl.StartError as exc:
        report.notes.append(f"stopped: {str(exc).splitlines()[0]}")
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        report.notes.append("interrupted")
        status = 130
    finally:
        procs.stop_all()
    text = "\n".join(render(report, complete))
    out = bl.write_report(f"faults-{bl.timestamp()}", text)
    print(f"written: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
