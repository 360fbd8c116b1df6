"""The data plane of one worker, run inside the test process: no supervisor, no subprocess.

`start_inprocess(config)` validates `config` (a dict, contract section 1) with
`proxy.core.config.parse_config` as the supervisor does, wraps the result in the supervisor's
`table` message (`proxy.runtime.channel.table_message`) and hands it to the worker's own code:
the table is compiled by `proxy.dataplane.worker.table_from_message`, swapped in by
`WorkerContext.apply`, and the listeners are served by `WorkerContext.listen`, so connections
are accepted and handled by the real `proxy.dataplane.http1` protocols on real sockets. Nothing
of the data plane is re-implemented here; only the control channel and the supervisor are left
out.

The worker runs on its own uvloop event loop in a daemon thread, as a worker process runs its
loop, so a test may block its own thread (raw sockets, urllib, `wait_until`) or run its own
event loop while requests are being served. Everything that touches the worker's state goes
through `call()`, which runs on that loop.

- `listen` absent from the config: a socket is bound to 127.0.0.1 on a port the OS chooses
  (no race with another test for a "free" port) and the config says that port.
- `reload(config)` applies a new table the way a worker applies the supervisor's next `table`
  message (next generation; warm pools, counters and health carried over).
- `set_down(pairs)` is the supervisor's `health` message; `stats()` the answer to `stats`;
  `metrics_text()` renders those counters with `proxy.control.metrics.render`, as `GET /metrics`
  would with this single worker.
- `access_log()` / `wait_for_log()` read the access log (written by `proxy.dataplane.accesslog` to a
  file instead of stdout); `stderr_text()` is every log record of the `turnout.*` loggers
  emitted on the worker's thread, formatted like a worker's stderr.
- `stop()` runs the worker's drain sequence (what SIGTERM does: `proxy.dataplane.worker.shutdown`);
  `close()` (also on leaving the `with` block) cuts whatever is left at once. Both stop the
  loop and join its thread, so nothing keeps running after a test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

import uvloop
import yaml

from proxy.control.metrics import MetricsInput, Totals, render
from proxy.core.config import config_sha256, parse_config
from proxy.core.counters import WorkerSnapshot
from proxy.core.spec import Listener
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.listeners import bind_listener
from proxy.dataplane.worker import (
    WorkerContext,
    raise_fd_limit,
    shutdown,
    table_from_message,
)
from proxy.runtime.channel import table_message
from tests.support.turnout import AccessLogLines, memory_kib

T = TypeVar("T")

CALL_TIMEOUT = 30.0
LOG_FORMAT = "%(asctime)s worker[0] %(levelname)s %(name)s: %(message)s"


class _ThreadRecords(logging.Handler):
    """Collects the formatted records emitted on one thread (the worker's loop)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.thread: int | None = None
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        line = self.format(record)
        with self._guard:
            self.lines.append(line)

    def text(self) -> str:
        with self._guard:
            return "".join(line + "\n" for line in self.lines)


_info = {"users": 0, "level": logging.NOTSET}
_info_lock = threading.Lock()


def _log_at_info(change: int) -> None:
    """The `turnout` loggers log at INFO (as a worker does, proxy.dataplane.worker.main) while any
    in-process data plane runs; the level the test process had comes back after the last."""
    logger = logging.getLogger("turnout")
    with _info_lock:
        if _info["users"] == 0 and change > 0:
            _info["level"] = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        _info["users"] += change
        if _info["users"] == 0:
            logger.setLevel(_info["level"])


def _bound_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 with a port chosen by the OS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


class InProcessTurnout(AccessLogLines):
    """One worker's data plane on a background event loop; see the module docstring."""

    def __init__(
        self, config: dict[str, Any], *, access_log: bool = False, path: str = "turnout.yaml"
    ) -> None:
        config = dict(config)
        self._prebound: dict[str, socket.socket] = {}
        if "listen" not in config:
            sock = _bound_socket()
            port = int(sock.getsockname()[1])
            config["listen"] = f"127.0.0.1:{port}"
            self._prebound[config["listen"]] = sock
        self.config = config
        self.path = path
        listen = config["listen"]
        first = listen[0]["address"] if isinstance(listen, list) else listen
        host, _, port_text = str(first).rpartition(":")
        self.port = int(port_text)
        self.url = f"http://{host}:{self.port}"
        self.generation = 0
        self._log_path = ""
        self._log_fd = -1
        if access_log:
            fd, self._log_path = tempfile.mkstemp(prefix="turnout-access-", suffix=".log")
            os.close(fd)
            self._log_fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND)
        self._records = _ThreadRecords()
        self._logger = logging.getLogger("turnout")
        self._logging = False
        self.loop = uvloop.new_event_loop()
        self._ctx: WorkerContext | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="turnout-inprocess", daemon=True)

    # -- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call_soon(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        """Run `fn()` on the worker's loop and return its result (or raise its exception)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run `coro` on the worker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def ctx(self) -> WorkerContext:
        """The worker's context (touch it only from the loop: `call_soon`)."""
        assert self._ctx is not None, "not started"
        return self._ctx

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> InProcessTurnout:
        """Apply the first table and start listening; returns once connections are accepted."""
        self._thread.start()
        self._records.thread = self._thread.ident
        self._logger.addHandler(self._records)
        _log_at_info(+1)
        self._logging = True
        try:
            self.run(self._start())
        except BaseException:
            self.close()
            raise
        return self

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        # A name per instance, as default_via_name gives one per running Turnout: two
        # in-process Turnouts chained are two hops, not a loop.
        via = "turnout-" + os.urandom(6).hex()
        ctx = WorkerContext(loop, 0, self._log_fd >= 0, raise_fd_limit(), via)
        if self._log_fd >= 0:
            ctx.state.access_log = AccessLog(self._log_fd)
        self._ctx = ctx
        table = table_from_message(self._table_message(self.config))
        ctx.apply(table)
        ctx.listen(table.spec.all_listeners(), self._bind)
        self._ticker = ctx.tasks.spawn(ctx.ticker(), name="ticker")

    def _bind(self, listener: Listener) -> socket.socket:
        sock = self._prebound.pop(listener.address, None)
        return sock if sock is not None else bind_listener(listener)

    def _table_message(self, config: dict[str, Any]) -> dict[str, object]:
        text = yaml.safe_dump(config, sort_keys=False)
        spec = parse_config(text, self.path)
        self.generation += 1
        return table_message(
            generation=self.generation,
            sha256=config_sha256(text),
            path=self.path,
            spec=spec,
            split_overrides={},
        )

    def reload(
        self,
        config: dict[str, Any],
        split_overrides: dict[str, tuple[dict[str, float], str]] | None = None,
    ) -> int:
        """Apply `config` as the next generation (a worker's next `table` message).

        `listen` is that of the first config when `config` has none (a listener is bound at
        start, as in a worker). Returns the new generation once it is in force.
        """
        config = dict(config)
        config.setdefault("listen", self.config["listen"])
        msg = self._table_message(config)
        if split_overrides:
            msg["split_overrides"] = {
                route: [dict(weights), source]
                for route, (weights, source) in split_overrides.items()
            }
        table = table_from_message(msg)
        self.call_soon(lambda: self.ctx.apply(table))
        return table.generation

    def set_down(self, down: Iterable[tuple[str, str]]) -> None:
        """The supervisor's `health` message: these (upstream, "host:port") fail checks."""
        pairs = {(str(upstream), str(endpoint)) for upstream, endpoint in down}
        self.call_soon(lambda: self.ctx.set_down(pairs))

    def stats(self) -> WorkerSnapshot:
        """The worker's `stats_snapshot()` (what it answers the supervisor's `stats`)."""
        return self.call_soon(lambda: self.ctx.stats_snapshot())

    def metrics_text(self) -> str:
        """`GET /metrics` as the supervisor renders it for this one worker."""

        def scrape() -> bytes:
            ctx = self.ctx
            totals = Totals()
            totals.add_snapshot(ctx.stats_snapshot())
            table = ctx.generation.table
            return render(
                MetricsInput(
                    table=table,
                    totals=totals,
                    down=frozenset(ctx.pools.down),
                    reloads={},
                    generation=table.generation,
                )
            )

        return self.call_soon(scrape).decode()

    def stop(self, timeout: float = 30.0) -> int:
        """Drain as a worker does on SIGTERM, then stop the loop; 0 (as a clean exit)."""
        if not self._stopped and self._ctx is not None:
            self.run(self._finish(graceful=True), timeout)
        self.close()
        return 0

    async def _finish(self, *, graceful: bool) -> None:
        ctx = self.ctx
        if graceful:
            await shutdown(ctx)
        else:
            await ctx.drain(0.0, 0.0)
        if self._ticker is not None:
            self._ticker.cancel()
        await ctx.tasks.cancel_all(5.0)
        self._stopped = True

    def close(self) -> None:
        """Cut everything at once (if `stop` did not run), stop the loop and join its thread."""
        if self._thread.is_alive():
            if not self._stopped and self._ctx is not None:
                with contextlib.suppress(Exception):
                    self.run(self._finish(graceful=False), 15.0)
            with contextlib.suppress(Exception):
                self.run(self._cancel_leftovers(), 10.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        for sock in self._prebound.values():
            sock.close()
        self._prebound.clear()
        self._logger.removeHandler(self._records)
        if self._logging:
            self._logging = False
            _log_at_info(-1)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    async def _cancel_leftovers(self) -> None:
        current = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not current]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5.0)
        await self.loop.shutdown_asyncgens()

    def __enter__(self) -> InProcessTurnout:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if self._log_path:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)

    # -- output ---------------------------------------------------------------------------------

    def stdout_lines(self) -> list[str]:
        """Every access-log line written so far (a worker's stdout)."""
        if not self._log_path:
            return []
        with open(self._log_path, encoding="utf-8", errors="replace") as lines:
            return [line.rstrip("\r\n") for line in lines]

    def rss_kib(self) -> int:
        """VmRSS of the test process (which holds this data plane), KiB: for messages only."""
        return memory_kib(os.getpid()).get("VmRSS", 0)

    def stderr_text(self) -> str:
        """Every log record the worker emitted so far, one formatted line each."""
        return self._records.text()


def start_inprocess(
    config: dict[str, Any], *, access_log: bool = False, path: str = "turnout.yaml"
) -> InProcessTurnout:
    """Start one worker's data plane in this process on `config`; see the module docstring."""
    return InProcessTurnout(config, access_log=access_log, path=path).start()
