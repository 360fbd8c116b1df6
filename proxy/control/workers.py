"""The supervisor's worker processes: started, restarted, told, asked for stats, stopped.

One slot per worker (`workers` of the config): a slot keeps a worker running until shutdown,
restarting it with back-off when it dies. Each worker has a control channel (a socketpair,
`proxy.runtime.channel`); the set sends every control message to every live worker, reads
what they answer (ready, applied, stats) and keeps the counters of workers that died, so the
sums /metrics shows never go down.

Workers run in their own session so a Ctrl-C in a terminal reaches only the supervisor, which
forwards exactly one SIGTERM to each worker (a worker treats a second signal as "exit now").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.control.admin import Readiness
from proxy.control.metrics import Totals
from proxy.control.views import worker_counts
from proxy.core.counters import WorkerSnapshot, read_worker_snapshot
from proxy.core.spec import ConfigSpec
from proxy.core.table import Table
from proxy.runtime.channel import (
    OP_APPLIED,
    OP_READY,
    OP_STATS,
    ControlChannel,
    ControlError,
    encode,
    open_channel,
)
from proxy.runtime.tasks import TaskSet

# The supervisor's logger: worker events are its log lines, as they were before the split.
log = logging.getLogger("turnout.supervisor")

# Restart back-off for a worker that died: 0.1 s, doubling to 5 s; a worker that stayed up for
# 10 s counts as healthy again and its next crash restarts it quickly.
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
BACKOFF_RESET_AFTER = 10.0

# How long a scrape waits for the workers' counters; a worker that misses it counts with its
# last snapshot.
SCRAPE_DEADLINE = 1.0
# Every worker's counters are also polled in the background, so that a worker killed between
# two scrapes loses at most one poll period of counts (docs/metrics.md). The period grows for
# tables so large that a poll is costly: POLL_COST_FACTOR times the time the answers took,
# at most POLL_MAX, so polling keeps to about a tenth of the supervisor's time.
POLL_EVERY = 1.0
POLL_COST_FACTOR = 10.0
POLL_MAX = 10.0
# A worker whose stats snapshots cannot be read is logged at most once per this many seconds
# (with how many were dropped meanwhile); every bad snapshot is ignored, the last good one stays.
BAD_STATS_LOG_EVERY = 60.0


def resolve_workers(spec: ConfigSpec) -> int:
    """`workers: auto` (stored as 0) is the number of CPUs this process may run on."""
    return spec.workers or len(os.sched_getaffinity(0))


def describe_exit(returncode: int) -> str:
    """`exit code 3` or `killed by SIGKILL`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(slots=True)
class WorkerHandle:
    """A running worker process and the supervisor's end of its control channel."""

    index: int
    process: asyncio.subprocess.Process
    channel: ControlChannel
    started_at: float
    pid: int
    ready: bool = False
    generation: int = 0
    # Scrapes waiting for its answer, by request id; None: its answer was unreadable.
    pending_stats: dict[int, asyncio.Future[WorkerSnapshot | None]] = field(default_factory=dict)
    # The newest stats snapshot it sent (read once, when it arrived): counted in a scrape it
    # misses, and folded into the retired totals when it dies, so the summed counters never go
    # down.
    last_stats: WorkerSnapshot | None = None
    # When it arrived (loop time).
    stats_at: float = 0.0
    # Unreadable snapshots: when the last was logged (loop time), and how many since then.
    bad_stats_logged_at: float = -math.inf
    bad_stats_unlogged: int = 0


class WorkerSet:
    """The worker slots of one supervisor.

    `first_messages` gives what a worker that just started needs before anything else (the
    certificates, the table, the health), `table` the table in force (to forget the retired
    series it no longer has), `on_fail` is told when a worker cannot be kept running (its
    first start failed: restarting would only loop).
    """

    def __init__(
        self,
        count: int,
        *,
        argv: Sequence[str],
        access_log: bool,
        tasks: TaskSet,
        first_messages: Callable[[], list[dict[str, object]]],
        table: Callable[[], Table],
        on_fail: Callable[[str], None],
    ) -> None:
        self.count = count
        self._argv = tuple(argv)
        self._access_log = access_log
        self._tasks = tasks
        self._first_messages = first_messages
        self._table = table
        self._on_fail = on_fail
        self._workers: dict[int, WorkerHandle] = {}
        self._slot_tasks: list[asyncio.Task[None]] = []
        self._stats_seq = 0
        # Counters of workers that died (their last snapshots), see proxy.control.metrics.
        self._retired = Totals()
        # Notified whenever a worker reports the generation it applied (or exits).
        self._applied = asyncio.Condition()
        self._stopping = False
        # Cuts a restart's back-off short at shutdown.
        self._stop = asyncio.Event()

    # --- what the others see ----------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Ready when every live worker has reported ready (and at least one is live)."""
        live = list(self._workers.values())
        ready = sum(1 for handle in live if handle.ready)
        # A slot whose worker is being restarted has no live worker; at least one must serve.
        if ready == 0 or ready < len(live):
            return Readiness(False, f"waiting for workers ({ready}/{self.count} ready)")
        return Readiness(True, "ready")

    def view(self) -> list[dict[str, Any]]:
        """The `workers` of GET /admin/config."""
        return [
            {
                "index": handle.index,
                "pid": handle.pid,
                "generation": handle.generation,
                "ready": handle.ready,
                **worker_counts(handle.last_stats),
            }
            for handle in sorted(self._workers.values(), key=lambda h: h.index)
        ]

    def applied_generation(self, current: int) -> int:
        """The generation every ready worker has applied (`current` when none is ready)."""
        return min(
            [current] + [handle.generation for handle in self._workers.values() if handle.ready]
        )

    # --- control messages -------------------------------------------------------------------

    def broadcast(self, msg: dict[str, object]) -> None:
        """Send one control message to every live worker (e.g. a `health` message)."""
        # Encoded once for all workers: a table message carries the whole file.
        line = encode(msg)
        for handle in self._workers.values():
            self._send(handle, line)

    def _send(self, handle: WorkerHandle, line: bytes) -> None:
        handle.channel.send_encoded(line)
        self._tasks.spawn(self._drain_channel(handle), name=f"drain-worker-{handle.index}")

    async def _drain_channel(self, handle: WorkerHandle) -> None:
        # A worker that died mid-write is noticed (and restarted) by its slot; nothing to do here.
        with contextlib.suppress(ConnectionError):
            await handle.channel.drain()

    async def wait_applied(self, generation: int, seconds: float) -> None:
        """Wait, at most `seconds`, until every ready worker applied `generation` (logged when
        one did not)."""

        def applied() -> bool:
            return all(h.generation >= generation for h in self._workers.values() if h.ready)

        try:
            async with asyncio.timeout(seconds), self._applied:
                await self._applied.wait_for(applied)
        except TimeoutError:
            log.warning("not every worker applied generation %d within %.1fs", generation, seconds)

    async def _notify_applied(self) -> None:
        async with self._applied:
            self._applied.notify_all()

    # --- stats ------------------------------------------------------------------------------

    def prune_retired(self, table: Table) -> None:
        """Series `table` no longer has leave the retired totals with it."""
        self._retired.prune(table)

    def polled_totals(self) -> tuple[Totals, float]:
        """Every worker's newest snapshot summed with the retired totals, asking nothing new,
        and the loop time the newest snapshot arrived (0.0: none yet). No await: the live
        handles and the retired totals are one consistent picture (a worker that died
        meanwhile is in exactly one of the two)."""
        totals = Totals()
        newest = 0.0
        for handle in self._workers.values():
            if handle.last_stats is not None:
                totals.add_snapshot(handle.last_stats)
                newest = max(newest, handle.stats_at)
        totals.add(self._retired)
        return totals, newest

    async def poll_stats(self) -> None:
        """Refresh every worker's last snapshot in the background, until cancelled.

        A worker's last snapshot is what survives it when it is killed (folded into the
        retired totals), so this bounds what a kill loses to one poll period: POLL_EVERY, or
        more for a table so large that polls are costly (see POLL_COST_FACTOR).
        """
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.request_stats(SCRAPE_DEADLINE)
            # The time the answers took, not the deadline a stopped worker makes us wait for.
            answered = [
                h.stats_at - started for h in self._workers.values() if h.stats_at > started
            ]
            cost = max(answered, default=0.0)
            period = min(POLL_MAX, max(POLL_EVERY, POLL_COST_FACTOR * cost))
            await asyncio.sleep(max(0.0, started + period - loop.time()))

    # The deadline is the caller's (a scrape has its own), so it is a parameter.
    async def request_stats(self, timeout: float) -> list[WorkerSnapshot]:  # noqa: ASYNC109
        """Ask every ready worker for its stats; the readable answers that arrive within
        `timeout`."""
        self._stats_seq += 1
        request_id = self._stats_seq
        loop = asyncio.get_running_loop()
        asked: list[tuple[WorkerHandle, asyncio.Future[WorkerSnapshot | None]]] = []
        for handle in self._workers.values():
            if not handle.ready:
                continue
            future: asyncio.Future[WorkerSnapshot | None] = loop.create_future()
            handle.pending_stats[request_id] = future
            handle.channel.send({"op": OP_STATS, "id": request_id})
            asked.append((handle, future))
        if not asked:
            return []
        await asyncio.wait([future for _, future in asked], timeout=timeout)
        answers: list[WorkerSnapshot] = []
        for handle, future in sorted(asked, key=lambda pair: pair[0].index):
            handle.pending_stats.pop(request_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled() and (answer := future.result()) is not None:
                answers.append(answer)
        return answers

    def _on_stats(self, handle: WorkerHandle, msg: Mapping[str, object]) -> None:
        """A worker's stats answer: the one place its snapshot is checked (every reader of
        `last_stats` and of `request_stats` trusts it). An unreadable one is logged, rate
        limited, and ignored: the worker's last good snapshot stays, and the scrape that asked
        goes on without waiting for it."""
        request_id = msg.get("id")
        future = (
            handle.pending_stats.get(request_id)
            if type(request_id) is int  # not a bool, not a float
            else None
        )
        try:
            snapshot: WorkerSnapshot | None = read_worker_snapshot(msg.get("data"))
        except ValueError as exc:
            snapshot = None
            self._bad_stats(handle, str(exc))
        else:
            # Kept even when the scrape that asked has given up: it is newer than the last.
            handle.last_stats = snapshot
            handle.stats_at = asyncio.get_running_loop().time()
        if future is not None and not future.done():
            future.set_result(snapshot)

    def _bad_stats(self, handle: WorkerHandle, error: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - handle.bad_stats_logged_at < BAD_STATS_LOG_EVERY:
            handle.bad_stats_unlogged += 1
            return
        also = (
            f" ({handle.bad_stats_unlogged} more since the last such message)"
            if handle.bad_stats_unlogged
            else ""
        )
        log.warning(
            "worker %d (pid %d): stats snapshot ignored, its last readable one counts: %s%s",
            handle.index,
            handle.pid,
            error,
            also,
        )
        handle.bad_stats_logged_at = now
        handle.bad_stats_unlogged = 0

    # --- slots ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every slot."""
        for index in range(self.count):
            self._slot_tasks.append(self._tasks.spawn(self._run_slot(index), name=f"slot-{index}"))

    async def _run_slot(self, index: int) -> None:
        """Keep one worker running in slot `index` until shutdown, restarting it when it dies."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_START
        ever_ready = False
        while not self._stopping:
            try:
                handle = await self._spawn(index)
            except OSError as exc:
                log.error("worker %d: cannot start: %s", index, exc)
                returncode, uptime, was_ready = 1, 0.0, False
            else:
                returncode = await self._supervise(handle)
                uptime = loop.time() - handle.started_at
                was_ready = handle.ready
            if self._stopping:
                return
            if not ever_ready and not was_ready:
                # The first worker of a slot never came up (port taken, bad environment):
                # restarting would only loop; stop with an error instead.
                self._on_fail(
                    f"worker {index} exited ({describe_exit(returncode)}) before it was ready"
                )
                return
            ever_ready = True
            if uptime >= BACKOFF_RESET_AFTER:
                delay = BACKOFF_START
            log.error(
                "worker %d exited unexpectedly (%s); restarting in %.1fs",
                index,
                describe_exit(returncode),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _spawn(self, index: int) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = child_sock.fileno()
            argv = [*self._argv, "--control-fd", str(fd), "--index", str(index)]
            if not self._access_log:
                argv.append("--no-access-log")
            # stdout/stderr are inherited: stdout carries the access log, stderr the events.
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(fd,), start_new_session=True
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            # The child has its own copy; ours would keep the channel open after the child dies.
            child_sock.close()
        channel = await open_channel(parent_sock)
        handle = WorkerHandle(
            index=index,
            process=process,
            channel=channel,
            started_at=asyncio.get_running_loop().time(),
            pid=process.pid,
        )
        self._workers[index] = handle
        for msg in self._first_messages():
            self._send(handle, encode(msg))
        if self._stopping:
            # Shutdown began while this worker was starting: it drains like the others.
            self._signal(handle, signal.SIGTERM)
        return handle

    async def _supervise(self, handle: WorkerHandle) -> int:
        """Serve one worker's messages until it exits; returns its exit status."""
        reader = self._tasks.spawn(self._read_worker(handle), name=f"read-worker-{handle.index}")
        returncode = await handle.process.wait()
        reader.cancel()
        handle.channel.close()
        for future in handle.pending_stats.values():
            future.cancel()
        # Fold and forget in one step (no await): a scrape sees this worker's counters either
        # live or retired, never both, never neither.
        if handle.last_stats is not None:
            self._retired.add_snapshot(handle.last_stats, gauges=False)
            self._retired.prune(self._table())
        if self._workers.get(handle.index) is handle:
            del self._workers[handle.index]
        # A split change waiting for every worker to apply it no longer waits for this one.
        await self._notify_applied()
        return returncode

    async def _read_worker(self, handle: WorkerHandle) -> None:
        while True:
            try:
                msg = await handle.channel.recv()
            except ControlError as exc:
                # A worker that speaks garbage is broken; its slot restarts it.
                log.error("worker %d (pid %d): %s; killing it", handle.index, handle.pid, exc)
                self._signal(handle, signal.SIGKILL)
                return
            if msg is None:
                return
            op = msg.get("op")
            if op == OP_READY:
                handle.ready = True
                handle.pid = int(msg.get("pid", handle.pid))
                handle.generation = int(msg.get("generation", 0))
                log.info(
                    "worker %d ready (pid %d, generation %d)",
                    handle.index,
                    handle.pid,
                    handle.generation,
                )
                await self._notify_applied()
            elif op == OP_APPLIED:
                handle.generation = int(msg.get("generation", 0))
                await self._notify_applied()
            elif op == OP_STATS:
                self._on_stats(handle, msg)
            else:
                log.warning("worker %d: unknown control message %r", handle.index, op)

    # --- signals and shutdown ---------------------------------------------------------------

    def _signal(self, handle: WorkerHandle, signum: signal.Signals) -> None:
        # The process may have exited since we last looked; that is fine.
        with contextlib.suppress(ProcessLookupError):
            handle.process.send_signal(signum)

    def stop(self) -> None:
        """No more restarts from now on (a worker starting meanwhile is told to drain)."""
        self._stopping = True
        self._stop.set()

    def live(self) -> int:
        """How many workers are running (started and not yet exited)."""
        return len(self._workers)

    def signal_all(self, signum: signal.Signals) -> None:
        """Send `signum` to every live worker."""
        for handle in self._workers.values():
            self._signal(handle, signum)

    async def wait_exited(self, seconds: float, force: asyncio.Event | None) -> bool:
        """Wait until every slot's worker has exited: True; False at the deadline, or once
        `force` is set (None: nothing cuts the wait short)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        pending = {task for task in self._slot_tasks if not task.done()}
        force_wait = None if force is None else self._tasks.spawn(force.wait(), name="force-wait")
        try:
            while pending:
                if force is not None and force.is_set():
                    return False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                waiting: set[asyncio.Future[Any]] = set(pending)
                if force_wait is not None:
                    waiting.add(force_wait)
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
            return True
        finally:
            if force_wait is not None:
                force_wait.cancel()
