"""Memory soak: RSS of Turnout's worker idle, with 1,000 keep-alive client connections, under a
wrk burst on top, and over a soak of several minutes; then the same for NGINX, for reference.

    .venv/bin/python benchmarks/soak.py            # 5-minute soak (about 7 minutes in all)
    .venv/bin/python benchmarks/soak.py --quick    # 45-second soak (about 2 minutes in all)

Per proxy (1 worker; Turnout with the "features" table run.py uses): start it in front of the
nginx backend, wait, record the idle RSS of the worker and of the supervisor (NGINX: master)
separately; open the connections (a client on uvloop in this process, raw asyncio sockets,
httptools) and let each send `GET /small` once per `--interval` second on its own schedule, so
the load is ~1,000 req/s spread evenly; record RSS with the connections open; run wrk (c64) on
top for a short burst, sampling RSS every 0.5 s; then soak, sampling every 5 s; close the
connections and record RSS once more. See docs/benchmarks.md ("Memory soak").

Only 127.0.0.1 is contacted. Connections, requests and time are bounded; every process started
here is stopped on exit, Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import benchlib as bl
import httptools
import run as bench
import uvloop

from proxy.runtime.tasks import TaskSet

# The bound on a worker's RSS, idle and under load.
RSS_BOUND_MIB = 60.0
# "No growth": the last third of the soak may sit at most this much above the first third.
GROWTH_BOUND_MIB = 1.0
# An answer later than this counts as a timeout; the connection is closed and reopened.
ANSWER_TIMEOUT_S = 5.0
# Connections opened at the same time (the proxies listen with backlogs of 1024 and 4096).
OPEN_CONCURRENCY = 64
BURST_CONNECTIONS = 64
SAMPLE_EVERY_S = 5.0
BURST_SAMPLE_EVERY_S = 0.5
STICKY_HEADER = bench.STICKY_HEADER


# --- the keep-alive client -------------------------------------------------------------------


@dataclass
class Traffic:
    """What the client saw. `latencies` are kept only while `recording` is on (the soak)."""

    sent: int = 0
    ok: int = 0
    non_2xx: int = 0
    timeouts: int = 0
    lost: int = 0
    connect_failures: int = 0
    late: int = 0
    incomplete: int = 0
    recording: bool = False
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))

    @property
    def errors(self) -> int:
        """Non-2xx answers, timeouts, connections lost or refused, answers missing at the end."""
        return self.non_2xx + self.timeouts + self.lost + self.connect_failures + self.incomplete


class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight, answers parsed by httptools."""

    def __init__(self, traffic: Traffic, on_lost: Callable[[_Conn], None]) -> None:
        self._traffic = traffic
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent_at: float | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()
            self._on_lost(self)

    def on_message_complete(self) -> None:
        """httptools callback: one whole answer arrived."""
        if self.sent_at is None:
            return
        elapsed = time.perf_counter() - self.sent_at
        self.sent_at = None
        if 200 <= int(self._parser.get_status_code()) < 300:
            self._traffic.ok += 1
        else:
            self._traffic.non_2xx += 1
        if self._traffic.recording:
            self._traffic.latencies.append(elapsed)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            self._on_lost(self)

    def send(self, request: bytes) -> None:
        """Write one request (the caller checked that none is in flight)."""
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self._traffic.sent += 1
        self.transport.write(request)

    def close(self) -> None:
        """Close without counting a loss (idempotent)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class _Slot:
    """One connection's place in the schedule; it survives reconnects."""

    def __init__(self, due: float) -> None:
        self.due = due
        self.conn: _Conn | None = None
        self.timer: asyncio.TimerHandle | None = None


class KeepAliveClient:
    """`count` keep-alive connections to 127.0.0.1:`port`, each sending `request` every
    `interval` seconds, their schedules spread evenly over the interval.
    """

    def __init__(self, port: int, count: int, interval: float, request: bytes) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.request = request
        self.traffic = Traffic()
        self._slots: list[_Slot] = []
        self._tasks = TaskSet("soak-client")
        self._stopping = False
        self._loop = asyncio.get_running_loop()

    async def _connect(self, slot: _Slot) -> bool:
        def lost(conn: _Conn) -> None:
            if conn is slot.conn and not self._stopping:
                self.traffic.lost += 1
                slot.conn = None
                self._tasks.spawn(self._reconnect(slot), name="reconnect")

        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                _, conn = await self._loop.create_connection(
                    lambda: _Conn(self.traffic, lost), bl.LOOPBACK, self.port
                )
        except OSError:
            self.traffic.connect_failures += 1
            return False
        slot.conn = conn
        return True

    async def _reconnect(self, slot: _Slot) -> None:
        while not self._stopping:
            if await self._connect(slot):
                return
            await asyncio.sleep(1.0)

    async def open(self) -> int:
        """Open every connection (OPEN_CONCURRENCY at a time); return how many are open."""
        limit = asyncio.Semaphore(OPEN_CONCURRENCY)
        start = self._loop.time() + 0.05
        self._slots = [_Slot(start + i * self.interval / self.count) for i in range(self.count)]

        async def one(slot: _Slot) -> None:
            async with limit:
                await self._connect(slot)

        async with asyncio.TaskGroup() as group:
            for slot in self._slots:
                group.create_task(one(slot))
        return self.open_count()

    def open_count(self) -> int:
        """Connections open right now."""
        return sum(1 for s in self._slots if s.conn is not None and not s.conn.closing)

    def start(self) -> None:
        """Begin the schedule: every slot ticks at its own offset, then every `interval`."""
        now = self._loop.time()
        for slot in self._slots:
            slot.due = max(slot.due, now)
            slot.timer = self._loop.call_at(slot.due, self._tick, slot)

    def _tick(self, slot: _Slot) -> None:
        if self._stopping:
            return
        now = self._loop.time()
        conn = slot.conn
        if conn is not None and not conn.closing:
            if conn.sent_at is None:
                conn.send(self.request)
            elif time.perf_counter() - conn.sent_at > ANSWER_TIMEOUT_S:
                self.traffic.timeouts += 1
                conn.close()
                slot.conn = None
                self._tasks.spawn(self._reconnect(slot), name="reconnect")
            else:
                self.traffic.late += 1
        slot.due += self.interval
        if slot.due <= now:
            slot.due += math.ceil((now - slot.due) / self.interval) * self.interval
        slot.timer = self._loop.call_at(slot.due, self._tick, slot)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop sending, give answers in flight `grace` seconds, close everything."""
        self._stopping = True
        for slot in self._slots:
            if slot.timer is not None:
                slot.timer.cancel()
        for _ in range(max(1, round(grace / 0.05))):
            if not any(s.conn is not None and s.conn.sent_at is not None for s in self._slots):
                break
            await asyncio.sleep(0.05)
        for slot in self._slots:
            if slot.conn is not None:
                if slot.conn.sent_at is not None:
                    self.traffic.incomplete += 1
                slot.conn.close()
        await self._tasks.cancel_all(5.0)


# --- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """RSS of the worker(s) and the root process at one moment, and the client's progress."""

    t: float
    worker: bl.RssDetail
    root: bl.RssDetail
    worker_fds: int
    connections: int
    ok: int


@dataclass
class SubjectReport:
    """Everything measured for one proxy."""

    label: str
    root_name: str
    connections: int = 0
    opened: int = 0
    worker_pids: list[int] = field(default_factory=list)
    idle: Sample | None = None
    loaded: Sample | None = None
    burst: list[Sample] = field(default_factory=list)
    burst_rps: float = 0.0
    burst_errors: int = 0
    soak: list[Sample] = field(default_factory=list)
    after: Sample | None = None
    traffic: Traffic = field(default_factory=Traffic)
    soak_seconds: float = 0.0
    worker_cpu_pct: float = 0.0
    background_cpu_pct: float = 0.0
    notes: list[str] = field(default_factory=list)


def take_sample(root: int, workers: list[int], t: float, client: KeepAliveClient | None) -> Sample:
    """RSS of the largest worker and of the root process now."""
    details = [bl.rss_detail(pid) for pid in workers] or [bl.RssDetail(0.0, 0.0, 0.0)]
    biggest = max(range(len(details)), key=lambda i: details[i].rss_mib)
    return Sample(
        t=t,
        worker=details[biggest],
        root=bl.rss_detail(root),
        worker_fds=bl.open_fds(workers[biggest]) if workers else 0,
        connections=client.open_count() if client is not None else 0,
        ok=client.traffic.ok if client is not None else 0,
    )


def slope_mib_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of worker RSS over time, in MiB per minute (0 with < 2 samples)."""
    if len(samples) < 2 or samples[-1].t == samples[0].t:
        return 0.0
    fit = statistics.linear_regression([s.t for s in samples], [s.worker.rss_mib for s in samples])
    return fit.slope * 60


def thirds(samples: list[Sample]) -> tuple[float, float]:
    """Mean worker RSS of the first and of the last third of the samples."""
    n = max(1, len(samples) // 3)
    first = statistics.fmean(s.worker.rss_mib for s in samples[:n])
    last = statistics.fmean(s.worker.rss_mib for s in samples[-n:])
    return first, last


# --- one proxy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Durations and sizes, from the command line."""

    connections: int
    interval: float
    idle_s: float
    settle_s: float
    burst_s: int
    soak_s: float
    reference_soak_s: float
    quick: bool


async def wrk_burst(
    lab: bench.Lab, port: int, seconds: int, sample: Callable[[], Sample]
) -> tuple[float, int, list[Sample]]:
    """wrk c64 on /small for `seconds` while sampling RSS; (req/s, errors, samples)."""
    script = bench.write_lua(lab.tmp, bench.SCENARIOS["small"])
    argv = [
        lab.tools["wrk"],
        f"-t{bench.WRK_THREADS}",
        f"-c{BURST_CONNECTIONS}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://{bl.LOOPBACK}:{port}/small",
    ]
    job = asyncio.ensure_future(asyncio.to_thread(bl.run_bounded, argv, seconds + 30))
    samples: list[Sample] = []
    while not job.done():
        samples.append(sample())
        await asyncio.wait([job], timeout=BURST_SAMPLE_EVERY_S)
    figures = bench.wrk_figures(job.result())
    errors = sum(int(figures[k]) for k in ("status", "connect", "read", "write", "timeout"))
    return figures["requests"] / (figures["duration_us"] / 1e6), errors, samples


async def soak_one(
    lab: bench.Lab, subject: bench.Subject, root_name: str, plan: Plan, soak_s: float
) -> SubjectReport:
    """Idle, connections, burst, soak and after for one running proxy."""
    report = SubjectReport(subject.label, root_name, connections=plan.connections)
    root = subject.proc.pid
    await asyncio.sleep(plan.idle_s)
    workers = bl.process_tree(root)[1:]
    report.worker_pids = workers
    if not workers:
        report.notes.append("no worker process found under the root process")
    began = time.monotonic()

    def sample(client: KeepAliveClient | None) -> Sample:
        return take_sample(root, workers, time.monotonic() - began, client)

    report.idle = sample(None)
    print(f"  idle: worker {report.idle.worker.rss_mib:.1f} MiB", flush=True)
    host = f"Host: {bl.LOOPBACK}:{subject.port}\r\n"
    request = (
        f"GET /small HTTP/1.1\r\n{host}{STICKY_HEADER[0]}: {STICKY_HEADER[1]}\r\n\r\n"
    ).encode()
    client = KeepAliveClient(subject.port, plan.connections, plan.interval, request)
    try:
        report.opened = await client.open()
        client.start()
        print(f"  {report.opened} connections open; settling {plan.settle_s:.0f} s", flush=True)
        await asyncio.sleep(plan.settle_s)
        report.loaded = sample(client)
        print(
            f"  with {report.loaded.connections} connections: worker "
            f"{report.loaded.worker.rss_mib:.1f} MiB, {report.loaded.worker_fds} fds",
            flush=True,
        )
        if plan.burst_s:
            rps, errors, burst = await wrk_burst(
                lab, subject.port, plan.burst_s, lambda: sample(client)
            )
            report.burst_rps, report.burst_errors, report.burst = rps, errors, burst
            peak = max(s.worker.rss_mib for s in burst)
            print(f"  burst: wrk c{BURST_CONNECTIONS} {rps:.0f} req/s, peak {peak:.1f} MiB")
        ours = {os.getpid(), *bl.process_tree(lab.backend.proc.pid), *bl.process_tree(root)}
        cpu_before = bl.cpu_snapshot()
        client.traffic.recording = True
        soak_began = time.monotonic()
        end = soak_began + soak_s
        while True:
            current = sample(client)
            report.soak.append(current)
            print(
                f"  soak t={current.t:6.1f}s worker {current.worker.rss_mib:6.2f} MiB "
                f"(anon {current.worker.anon_mib:6.2f})  conns {current.connections}  "
                f"ok {current.ok}  errors {client.traffic.errors}",
                flush=True,
            )
            if not subject.proc.alive():
                raise bench.BenchError(f"{subject.label} died:\n{subject.proc.log_tail()}")
            if bl.process_tree(root)[1:] != workers:
                report.notes.append("the worker process changed during the soak (restart?)")
            left = end - time.monotonic()
            if left <= 0.5:
                break
            await asyncio.sleep(min(SAMPLE_EVERY_S, left))
        client.traffic.recording = False
        report.soak_seconds = time.monotonic() - soak_began
        cpu_after = bl.cpu_snapshot()
        report.worker_cpu_pct = (
            bl.cpu_used(cpu_before, cpu_after, workers) / report.soak_seconds * 100
        )
        others = bl.cpu_used_by_others(cpu_before, cpu_after, ours)
        report.background_cpu_pct = others / report.soak_seconds * 100
    finally:
        await client.stop()
    await asyncio.sleep(min(plan.idle_s, 3.0))
    report.after = sample(None)
    report.traffic = client.traffic
    return report


# --- tables ----------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_table(reports: list[SubjectReport]) -> list[str]:
    """Idle / with connections / burst peak / soak max / after, per process."""
    lines = [
        "| proxy | process | idle MiB | with connections MiB | burst peak MiB | soak max MiB "
        "| after closing MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        for name, pick in (
            ("worker", lambda s: s.worker.rss_mib),
            (r.root_name, lambda s: s.root.rss_mib),
        ):
            get: Callable[[Sample], float] = pick
            lines.append(
                f"| {r.label} | {name} | {_mib(get(r.idle) if r.idle else None)} "
                f"| {_mib(get(r.loaded) if r.loaded else None)} "
                f"| {_mib(max(map(get, r.burst)) if r.burst else None)} "
                f"| {_mib(max(map(get, r.soak)) if r.soak else None)} "
                f"| {_mib(get(r.after) if r.after else None)} |"
            )
    return lines


def growth_table(reports: list[SubjectReport]) -> list[str]:
    """First vs last third of the soak, and the least-squares slope over all of it."""
    lines = [
        "| proxy | soak s | samples | first third MiB | last third MiB | growth MiB "
        "| slope MiB/min | slope as MiB/hour |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        if not r.soak:
            continue
        first, last = thirds(r.soak)
        slope = slope_mib_per_min(r.soak)
        lines.append(
            f"| {r.label} | {r.soak_seconds:.0f} | {len(r.soak)} | {first:.2f} | {last:.2f} "
            f"| {last - first:+.2f} | {slope:+.3f} | {slope * 60:+.1f} |"
        )
    return lines


def traffic_table(reports: list[SubjectReport]) -> list[str]:
    """What the keep-alive client and the burst saw, and the CPU it all cost."""
    lines = [
        "| proxy | connections | requests sent | 2xx | errors (non-2xx / timeout / lost / "
        "refused / unanswered) | late ticks | soak p50 ms | soak p99 ms | burst req/s "
        "| burst errors | worker CPU % (soak) | bg CPU % (soak) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        t = r.traffic
        ordered = sorted(t.latencies)

        def pct(q: float, ordered: list[float] = ordered) -> str:
            if not ordered:
                return "-"
            rank = max(1, math.ceil(q / 100 * len(ordered)))
            return f"{ordered[min(rank, len(ordered)) - 1] * 1000:.3f}"

        lines.append(
            f"| {r.label} | {r.opened}/{r.connections} | {t.sent} | {t.ok} | {t.errors} "
            f"({t.non_2xx} / {t.timeouts} / {t.lost} / {t.connect_failures} / {t.incomplete}) "
            f"| {t.late} | {pct(50)} | {pct(99)} | {r.burst_rps:.0f} | {r.burst_errors} "
            f"| {r.worker_cpu_pct:.1f} | {r.background_cpu_pct:.0f} |"
        )
    return lines


def samples_table(r: SubjectReport) -> list[str]:
    """Every soak sample of one proxy."""
    lines = [
        f"| t s | {r.label} worker RSS MiB | worker RssAnon MiB | {r.root_name} RSS MiB "
        "| worker fds | open connections | 2xx so far |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r.soak:
        lines.append(
            f"| {s.t:.0f} | {s.worker.rss_mib:.2f} | {s.worker.anon_mib:.2f} "
            f"| {s.root.rss_mib:.2f} | {s.worker_fds} | {s.connections} | {s.ok} |"
        )
    return lines


@dataclass(frozen=True)
class Outcome:
    """The figures the verdict is made of."""

    peak: float
    growth: float
    errors: int
    passed: bool


def outcome(r: SubjectReport) -> Outcome:
    """Peak worker RSS over every sample, growth over the soak, errors, and pass/fail."""
    phases = [s for s in (r.idle, r.loaded, r.after) if s is not None] + r.burst + r.soak
    peak = max((s.worker.rss_mib for s in phases), default=0.0)
    first, last = thirds(r.soak) if r.soak else (0.0, 0.0)
    errors = r.traffic.errors + r.burst_errors
    complete = r.opened == r.connections and bool(r.soak) and bool(phases)
    passed = complete and peak <= RSS_BOUND_MIB and last - first <= GROWTH_BOUND_MIB and not errors
    return Outcome(peak, last - first, errors, passed)


def verdict(r: SubjectReport) -> str:
    """The line that says whether the worker stayed within the bounds."""
    o = outcome(r)
    peak, growth, errors, ok = o.peak, o.growth, o.errors, o.passed
    return (
        f"VERDICT {r.label}: {'PASS' if ok else 'FAIL'}: worker RSS peak {peak:.1f} MiB "
        f"(bound {RSS_BOUND_MIB:.0f} MiB; idle {_mib(r.idle.worker.rss_mib if r.idle else None)}"
        f", {r.opened} connections {_mib(r.loaded.worker.rss_mib if r.loaded else None)}); "
        f"growth first->last third {growth:+.2f} MiB over {r.soak_seconds:.0f} s "
        f"(bound {GROWTH_BOUND_MIB:.0f} MiB; slope {slope_mib_per_min(r.soak):+.3f} MiB/min); "
        f"{errors} errors"
    )


def render(
    reports: list[SubjectReport], plan: Plan, tools: dict[str, str], notes: list[str]
) -> list[str]:
    """The whole markdown report."""
    lines = [
        f"# Turnout memory soak, {datetime.now().isoformat(timespec='seconds')}",
        "",
        *bench.machine_lines(tools),
        "- pinning: off (proxy, backend, client and wrk float over all cores)",
        f"- 1 worker per proxy; Turnout with the features table (blue/green 90/10, sticky, "
        f"override); {plan.connections} keep-alive connections, one GET /small each per "
        f"{plan.interval:g} s from a uvloop client in the harness; burst: wrk -t"
        f"{bench.WRK_THREADS} -c{BURST_CONNECTIONS} for {plan.burst_s} s on top; soak "
        f"{plan.soak_s:.0f} s (NGINX {plan.reference_soak_s:.0f} s), RSS every "
        f"{SAMPLE_EVERY_S:.0f} s",
        "",
        *(verdict(r) for r in reports),
        "",
        "## RSS (VmRSS, MiB)",
        "",
        *summary_table(reports),
        "",
        "## Growth over the soak (worker VmRSS)",
        "",
        *growth_table(reports),
        "",
        "## Traffic",
        "",
        *traffic_table(reports),
        "",
    ]
    for r in reports:
        lines += [f"## Soak samples: {r.label}", "", *samples_table(r), ""]
    all_notes = notes + [f"{r.label}: {n}" for r in reports for n in r.notes]
    if all_notes:
        lines += ["## Notes", "", *(f"- {n}" for n in all_notes), ""]
    return lines


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Plan:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="45 s soak, shorter phases")
    parser.add_argument("--duration", type=float, help="soak seconds for Turnout (300; quick 45)")
    parser.add_argument(
        "--reference-duration", type=float, help="soak seconds for NGINX (60; quick 20)"
    )
    parser.add_argument("--connections", type=int, default=1000, help="keep-alive connections")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between requests")
    parser.add_argument("--burst", type=int, help="seconds of wrk on top, 0 for none (10; quick 5)")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    plan = Plan(
        connections=args.connections,
        interval=args.interval,
        idle_s=2.0 if quick else 5.0,
        settle_s=5.0 if quick else 10.0,
        burst_s=args.burst if args.burst is not None else (5 if quick else 10),
        soak_s=args.duration or (45.0 if quick else 300.0),
        reference_soak_s=args.reference_duration or (20.0 if quick else 60.0),
        quick=quick,
    )
    if not 1 <= plan.connections <= 10000 or plan.interval < 0.01 or plan.soak_s < 5:
        parser.error("connections 1..10000, interval >= 0.01 s, duration >= 5 s")
    if plan.soak_s > 3600 or plan.reference_soak_s > 3600 or not 0 <= plan.burst_s <= 300:
        parser.error("durations are bounded: soak <= 3600 s, burst <= 300 s")
    return plan


async def session(plan: Plan, tools: dict[str, str], reports: list[SubjectReport]) -> None:
    """Backend, then Turnout, then NGINX, one at a time."""
    settings = bench.parse_args(["--workers", "1"])
    pinning = bench.choose_pinning(False, [1])
    with bl.session_dir("turnout-bench-") as tmp, contextlib.ExitStack() as stack:
        backend = bench.start_backend(tmp, tools, pinning, stack)
        print(f"backend nginx on {bl.LOOPBACK}:{backend.port}", flush=True)
        lab = bench.Lab(settings, tools, pinning, tmp, tmp / "raw", backend)
        for label in ("turnout", "nginx"):
            print(f"== {label}", flush=True)
            with contextlib.ExitStack() as per_subject:
                if label == "turnout":
                    subject = bench.start_turnout(lab, 1, per_subject)
                    root_name, soak_s = "supervisor", plan.soak_s
                else:
                    subject = bench.start_nginx_proxy(lab, "nginx", 1, per_subject)
                    root_name, soak_s = "master", plan.reference_soak_s
                reports.append(await soak_one(lab, subject, root_name, plan, soak_s))


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the report and write benchmarks/out/soak-<timestamp>.md."""
    plan = parse_args(argv)
    signal.signal(signal.SIGTERM, bl.interrupt_on_sigterm)
    limit = bl.raise_nofile(plan.connections + BURST_CONNECTIONS + 256)
    if limit < plan.connections + 64:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {plan.connections} connections")
    tools = bench.ensure_tools(False)
    reports: list[SubjectReport] = []
    notes: list[str] = []
    status = 1
    started = time.monotonic()
    try:
        uvloop.run(session(plan, tools, reports))
        status = 0
    except (bl.StartError, bench.BenchError) as exc:
        notes.append(f"stopped early: {str(exc).splitlines()[0]}")
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        notes.append("interrupted")
        print("interrupted; all processes stopped", file=sys.stderr)
        status = 130
    noisy = [r.label for r in reports if r.background_cpu_pct > bench.NOISY_BACKGROUND_PCT]
    if noisy:
        notes.append(
            f"other processes used more than {bench.NOISY_BACKGROUND_PCT}% of a core during the "
            f"soak of {', '.join(noisy)} (bg CPU %): latencies are noisy; RSS is not affected"
        )
    if any(not outcome(r).passed for r in reports):
        status = status or 2
    text = "\n".join(render(reports, plan, tools, notes))
    out = bl.write_report(f"soak-{bl.timestamp()}", text)
    print(f"written: {out}; took {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
