"""A worker's stats answers as the supervisor takes them (`WorkerSet._read_worker`).

A snapshot is read (and checked) once, when it arrives: a malformed one is logged, rate limited,
and ignored, the worker's last good snapshot stays in /metrics, and the scrape that asked goes
on without waiting for the deadline. The supervisor is real but never started; its worker is a
real process (`sleep`) and a real channel (a socketpair), whose far end answers stats requests
with what each test lays out, over the wire as a worker would.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.supervisor import Supervisor, load_config
from proxy.control.workers import BAD_STATS_LOG_EVERY, WorkerHandle
from proxy.core.counters import GOAWAY_REASONS, RouteUpstreamStats, WorkerSnapshot
from proxy.runtime.channel import OP_STATS, ControlChannel, open_channel
from proxy.runtime.tasks import TaskSet

CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
routes:
  - name: api
    split: {blue: 1}
"""

SERVED = 'turnout_requests_total{code="200",route="api",upstream="blue"}'


def good_snapshot(served: int) -> WorkerSnapshot:
    pair = RouteUpstreamStats("api", "blue")
    for _ in range(served):
        pair.observe(200, 0.01)
    return {
        "generation": 1,
        "pid": 4242,
        "routes": [pair.snapshot()],
        "no_route": RouteUpstreamStats("", "").snapshot(),
        "mirror": [],
        "fail_open": {},
        "h2_goaways": dict.fromkeys(GOAWAY_REASONS, 0),
        "endpoints": [],
        "connections": 3,
    }


class ScriptedWorker:
    """The worker's end of a real channel: each stats request is answered with the next of
    `answers`; `reply` sends any message."""

    def __init__(self, channel: ControlChannel) -> None:
        self.channel = channel
        self.answers: list[object] = []

    async def serve(self) -> None:
        while (msg := await self.channel.recv()) is not None:
            if msg.get("op") == OP_STATS:
                self.reply({"op": OP_STATS, "id": msg["id"], "data": self.answers.pop(0)})

    def reply(self, msg: dict[str, object]) -> None:
        self.channel.send(msg)


Setup = tuple[Supervisor, WorkerHandle, ScriptedWorker, "asyncio.Task[int]"]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    path = tmp_path / "turnout.yaml"
    path.write_text(CONFIG)
    text, spec = load_config(str(path))
    supervisor = Supervisor(str(path), text, spec, access_log=False)
    ours, theirs = socket.socketpair()
    channel = await open_channel(ours)
    worker = ScriptedWorker(await open_channel(theirs))
    process = await asyncio.create_subprocess_exec("sleep", "3600")
    handle = WorkerHandle(
        index=0,
        process=process,
        channel=channel,
        started_at=0.0,
        pid=4242,
        ready=True,
        generation=1,
    )
    supervisor.workers._workers[0] = handle
    tasks = TaskSet("test")
    tasks.spawn(worker.serve(), name="scripted-worker")
    # Reads the worker's messages until the process exits (then folds its last snapshot).
    supervising = tasks.spawn(supervisor.workers._supervise(handle), name="supervise")
    yield supervisor, handle, worker, supervising
    if process.returncode is None:
        process.terminate()
    await supervising
    worker.channel.close()
    await tasks.cancel_all(1.0)


async def scrape(supervisor: Supervisor) -> str:
    return (await supervisor.metrics(gzip=False)).decode()


async def test_a_malformed_snapshot_is_ignored_and_the_last_good_one_counts(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, handle, worker, supervising = setup
    worker.answers.append(good_snapshot(2))
    assert f"{SERVED} 2.0\n" in await scrape(supervisor)
    good = handle.last_stats

    caplog.set_level(logging.WARNING, logger="turnout.supervisor")
    broken = good_snapshot(5)
    broken["routes"][0]["buckets"] = [0, 1]
    negative = good_snapshot(5)
    negative["routes"][0]["count"] = -1
    worker.answers += [{"routes": "garbage"}, None, broken, negative]
    for _ in range(2):
        assert f"{SERVED} 2.0\n" in await scrape(supervisor)
        # An unreadable answer is no answer: the scrape does not wait for the deadline.
        assert await supervisor.workers.request_stats(3600.0) == []
    assert handle.last_stats == good
    assert not supervising.done()
    # Logged once, naming the worker and the field; the others are counted for the next time.
    (record,) = [r for r in caplog.records if "stats snapshot ignored" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "worker 0 (pid 4242)" in record.getMessage()
    assert "generation: missing" in record.getMessage()
    assert handle.bad_stats_unlogged == 3

    handle.bad_stats_logged_at -= BAD_STATS_LOG_EVERY
    worker.answers.append({**good_snapshot(1), "connections": "many"})
    assert await supervisor.workers.request_stats(3600.0) == []
    last = caplog.records[-1].getMessage()
    assert "connections: must be an integer >= 0" in last
    assert "(3 more since the last such message)" in last
    assert supervisor.config_view()["workers"][0]["requests"] == 2


async def test_the_next_good_snapshot_is_taken_again(setup: Setup) -> None:
    supervisor, _, worker, _ = setup
    worker.answers += [{"pid": "x"}, good_snapshot(4), good_snapshot(4)]
    assert await supervisor.workers.request_stats(3600.0) == []
    (answer,) = await supervisor.workers.request_stats(3600.0)
    assert answer == good_snapshot(4)
    assert f"{SERVED} 4.0\n" in await scrape(supervisor)
    view = supervisor.config_view()["workers"][0]
    assert (view["requests"], view["connections"]) == (4, 3)


async def test_an_answer_with_a_strange_id_is_still_read(setup: Setup) -> None:
    supervisor, handle, worker, supervising = setup
    # Not an answer to any request, but a snapshot newer than the last: kept.
    for served, request_id in enumerate(("1", None, 1.0, True, [1]), start=1):
        worker.reply({"op": OP_STATS, "id": request_id, "data": good_snapshot(served)})
    # Messages are read in order: once this (unreadable) answer is in, so are those above.
    worker.answers.append({"pid": "x"})
    assert await supervisor.workers.request_stats(3600.0) == []
    assert handle.last_stats == good_snapshot(5)
    assert not supervising.done()
    assert supervisor.polled_totals()[0].pairs[("api", "blue")].count == 5


async def test_a_dead_workers_last_good_snapshot_is_retired(setup: Setup) -> None:
    supervisor, handle, worker, supervising = setup
    worker.answers += [good_snapshot(3), {"routes": []}]
    assert len(await supervisor.workers.request_stats(3600.0)) == 1
    assert await supervisor.workers.request_stats(3600.0) == []
    handle.process.terminate()
    assert await supervising == -signal.SIGTERM
    assert supervisor.workers._workers == {}
    assert supervisor.workers._retired.pairs[("api", "blue")].count == 3
    assert f"{SERVED} 3.0\n" in await scrape(supervisor)


async def test_grpc_statuses_and_goaways_survive_the_workers_death(setup: Setup) -> None:
    """Through the channel, the supervisor's sum and the retired totals, to the exposition."""
    supervisor, handle, worker, supervising = setup
    pair = RouteUpstreamStats("api", "blue")
    pair.observe_grpc(200, 14, 0.01)
    pair.observe_grpc(200, 0, 0.01)
    sent = {
        **good_snapshot(0),
        "routes": [pair.snapshot()],
        "h2_goaways": {**dict.fromkeys(GOAWAY_REASONS, 0), "rapid_reset": 2},
    }
    worker.answers.append(sent)
    assert len(await supervisor.workers.request_stats(3600.0)) == 1
    handle.process.terminate()
    assert await supervising == -signal.SIGTERM
    assert supervisor.workers._retired.pairs[("api", "blue")].grpc_errors == 1
    families = {
        family.name: family for family in text_string_to_metric_families(await scrape(supervisor))
    }
    grpc = {
        sample.labels["grpc_status"]: sample.value
        for sample in families["turnout_grpc_responses"].samples
    }
    assert grpc == {"OK": 1.0, "UNAVAILABLE": 1.0}
    goaways = {
        sample.labels["reason"]: sample.value
        for sample in families["turnout_http2_goaways"].samples
    }
    assert goaways == {**dict.fromkeys(GOAWAY_REASONS, 0.0), "rapid_reset": 2.0}
