"""Rollout webhooks (contract section 5), and the background delivery they share with
deployment annotations (`proxy.control.annotations`).

A `before_step` webhook gates a step: `gate` POSTs the step's JSON body to each such URL at once
and the step begins only when every one answered 2xx within its `timeout`; otherwise `gate`
says why (the controller then fails the step). Redirects are not followed: a 3xx is a refusal.

`after_step`, `rollback` and `succeeded` webhooks are notifications: `notify` hands each one to
a background task and returns at once, so neither traffic nor the controller ever waits for a
receiver. A delivery that gets no answer, a 5xx, a 408 or a 429 is tried again after 1 s,
2 s, 4 s (`ATTEMPTS` tries in all, each bounded by the webhook's `timeout`); another 4xx is not
(sending the same body again will not change the answer). At most `MAX_PENDING` deliveries are
under way; one more is dropped with a warning rather than queued without bound.

`Deliveries` is that machinery on its own (one HTTP client, a bounded set of background
deliveries, the retries); what a retry or an outcome means (a log line, a counter) is the
caller's, through two callbacks.

The webhook body is JSON: `{"event", "route", "step", "weight", "verdict", "reason",
"figures", ...}`, built by the controller; this module only delivers it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import aiohttp
import orjson

from proxy.core.spec import Webhook
from proxy.runtime.tasks import TaskSet

log = logging.getLogger("turnout.webhooks")

USER_AGENT = "turnout-rollout-webhook"
ATTEMPTS = 4
FIRST_BACKOFF = 1.0
MAX_PENDING = 100
# What a refusal's reason quotes of the receiver's answer (a load test may say why it failed).
QUOTED_BODY = 200
RETRIED_STATUSES = frozenset({408, 429})

# Called before each new try: (what the last attempt got, seconds until the next).
OnRetry = Callable[[str, float], None]
# Called once a delivery ends: (delivered, attempts made, what the last attempt got).
OnEnd = Callable[[bool, int, str], None]


class Deliveries:
    """POSTs JSON bodies with one HTTP client (created on first use): once, or in the
    background with retries and back-off, at most `max_pending` at a time."""

    def __init__(
        self,
        name: str,
        user_agent: str,
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._user_agent = user_agent
        self._first_backoff = first_backoff
        self._max_pending = max_pending
        self._tasks = TaskSet(name)
        # The same tasks, to wait for at shutdown (a TaskSet only cancels).
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def pending(self) -> int:
        """Deliveries still under way (or waiting to be tried again)."""
        return len(self._deliveries)

    def send(
        self,
        url: str,
        data: bytes,
        timeout: float,
        *,
        headers: Mapping[str, str] | None = None,
        on_retry: OnRetry,
        on_end: OnEnd,
    ) -> bool:
        """Deliver `data` to `url` in the background; never waits.

        False when `max_pending` deliveries are under way already: this one is not started.
        """
        if len(self._deliveries) >= self._max_pending:
            return False
        task = self._tasks.spawn(
            self._deliver(url, data, timeout, headers or {}, on_retry, on_end), name="delivery"
        )
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return True

    async def close(self, grace: float) -> int:
        """Give deliveries under way up to `grace` seconds, then cancel them; close the client.

        Returns how many were cut short.
        """
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=grace)
        left = sum(1 for task in self._deliveries if not task.done())
        await self._tasks.cancel_all(1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
        return left

    async def _deliver(
        self,
        url: str,
        data: bytes,
        seconds: float,
        headers: Mapping[str, str],
        on_retry: OnRetry,
        on_end: OnEnd,
    ) -> None:
        delay = self._first_backoff
        for attempt in range(1, ATTEMPTS + 1):
            status, answer = await self.post(url, data, seconds, headers)
            if status is not None and 200 <= status < 300:
                on_end(True, attempt, answer)
                return
            retry = status is None or status >= 500 or status in RETRIED_STATUSES
            if not retry or attempt == ATTEMPTS:
                on_end(False, attempt, answer)
                return
            on_retry(answer, delay)
            await asyncio.sleep(delay)
            delay *= 2

    async def post(
        self, url: str, data: bytes, seconds: float, headers: Mapping[str, str] | None = None
    ) -> tuple[int | None, str]:
        """One POST of `data`, bounded by `seconds`: (status, what happened) or (None, why
        there was no answer)."""
        try:
            async with self._client().post(
                url,
                data=data,
                headers={"Content-Type": "application/json", **(headers or {})},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                said = (await response.content.read(QUOTED_BODY)).decode("utf-8", "replace")
                said = " ".join(said.split())
                quoted = f": {said}" if said else ""
                return response.status, f"answered {response.status}{quoted}"
        except TimeoutError:
            return None, f"did not answer within {seconds:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"failed: {str(exc) or type(exc).__name__}"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": self._user_agent},
                connector=aiohttp.TCPConnector(limit=self._max_pending),
            )
        return self._session


class Webhooks:
    """Delivers rollout webhooks: gates at once, notifications in the background."""

    def __init__(self, *, first_backoff: float = FIRST_BACKOFF) -> None:
        self._deliveries = Deliveries("webhooks", USER_AGENT, first_backoff=first_backoff)

    @property
    def pending(self) -> int:
        """Notifications still being delivered (or waiting to be tried again)."""
        return self._deliveries.pending

    async def gate(self, hooks: Sequence[Webhook], body: Mapping[str, object]) -> str | None:
        """POST `body` to every hook at once: None when all answered 2xx, else why not."""
        data = orjson.dumps(body)
        answers = await asyncio.gather(
            *(self._deliveries.post(hook.url, data, hook.timeout) for hook in hooks)
        )
        refusals = [
            f"before_step webhook {hook.url} {answer}"
            for hook, (status, answer) in zip(hooks, answers, strict=True)
            if status is None or not 200 <= status < 300
        ]
        return "; ".join(refusals) or None

    def notify(self, hooks: Sequence[Webhook], body: Mapping[str, object]) -> None:
        """Deliver `body` to every hook in the background, with retries; never waits."""
        if not hooks:
            return
        data = orjson.dumps(body)
        for hook in hooks:
            started = self._deliveries.send(
                hook.url,
                data,
                hook.timeout,
                on_retry=partial(_retrying, hook),
                on_end=partial(_ended, hook),
            )
            if not started:
                log.warning(
                    "%s webhook %s dropped: %d deliveries already under way",
                    hook.on,
                    hook.url,
                    MAX_PENDING,
                )

    async def close(self, grace: float) -> None:
        """Give deliveries under way up to `grace` seconds, then cancel them; close the client."""
        left = await self._deliveries.close(grace)
        if left:
            log.warning("%d webhook deliveries cut short by the shutdown", left)


def _retrying(hook: Webhook, answer: str, delay: float) -> None:
    log.warning("%s webhook %s: %s; trying again in %gs", hook.on, hook.url, answer, delay)


def _ended(hook: Webhook, delivered: bool, attempts: int, answer: str) -> None:
    if not delivered:
        log.error(
            "%s webhook %s not delivered after %d attempt(s): %s",
            hook.on,
            hook.url,
            attempts,
            answer,
        )
