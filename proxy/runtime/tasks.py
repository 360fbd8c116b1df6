"""A set of background tasks that keeps a strong reference to each until it is done.

The event loop holds only weak references to tasks, so a fire-and-forget `create_task` can be
garbage-collected mid-flight and its exception is never seen. Every background task in Turnout
goes through a `TaskSet`: this module is the one place allowed to call `asyncio.create_task`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("turnout.tasks")


class TaskSet:
    """Background tasks owned by one component.

    `spawn` starts a task and keeps it referenced until it finishes; an exception other than
    cancellation is logged (with traceback) the moment the task ends, because nobody awaits a
    background task. `cancel_all` is the cleanup: cancel everything and wait, bounded.
    """

    def __init__(self, name: str = "tasks") -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start `coro` as a task held by this set; returns the task (awaiting it is optional)."""
        task = asyncio.create_task(coro, name=name)  # noqa: TID251 - the one allowed call
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "%s: task %s failed: %r",
                self._name,
                task.get_name(),
                exc,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def __len__(self) -> int:
        return len(self._tasks)

    # The bound is part of the cleanup contract (callers pass their shutdown budget), so it is a
    # parameter rather than an outer asyncio.timeout that would interrupt the waiting.
    async def cancel_all(self, timeout: float) -> int:  # noqa: ASYNC109
        """Cancel every task and wait up to `timeout` seconds for them to end.

        Returns how many tasks were still running at the deadline (0 when all ended). Tasks
        spawned while waiting are not cancelled by this call.
        """
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning(
                "%s: %d task(s) did not stop within %.1fs", self._name, len(pending), timeout
            )
        return len(pending)
