"""Deployment annotations (contract section 12): what changed, posted to Grafana as it happens.

With `annotations: {grafana: URL}` in the config, the supervisor posts one annotation for every
runtime split change (`PUT`/`DELETE .../split`), every rollout event (start, each step, each
verdict, pause, resume, abort, promote, a rollback by a failed verdict, a refused step or a
config change) and every config reload (applied or rejected) to `{URL}/api/annotations`:

    {"time": <ms since the epoch>, "tags": ["turnout", "split", "route:api",
     "upstream:blue", "upstream:green"], "text": "api: runtime split set: ..."}

No `dashboardUID`: an organization annotation, which every dashboard shows through Grafana's
built-in annotation query filtered by tags. With `TURNOUT_GRAFANA_TOKEN` set (a service
account token), each POST carries `Authorization: Bearer <token>`.

Posting never blocks anything: `Annotator.post` hands the body to
`proxy.control.webhooks.Deliveries` (a bounded set of background tasks, tried again with
back-off on no answer, a 5xx, 408 or 429) and returns. What cannot be posted is counted
(`turnout_annotations_total`) and logged,
at most one line per `LOG_EVERY` seconds.

Not part of the pure core: it reads the clock and the environment.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from proxy.control.webhooks import Deliveries
from proxy.core.config import GRAFANA_ANNOTATIONS_PATH
from proxy.core.spec import Annotations
from proxy.core.table import Table

log = logging.getLogger("turnout.annotations")

TOKEN_ENV = "TURNOUT_GRAFANA_TOKEN"
USER_AGENT = "turnout-annotations"
# Annotations being posted at once; one more is dropped (and counted) rather than queued.
MAX_PENDING = 100
# At most one warning line per this many seconds; the lines left out are counted in the next.
LOG_EVERY = 60.0
# What annotations still under way get at shutdown.
SHUTDOWN_GRACE = 2.0
# Routes (and upstreams) tagged one by one; a reload that changes more says how many instead.
MAX_TAGGED = 20
# An annotation's text is cut to this many characters (a rejected reload quotes its error).
MAX_TEXT = 1000
RESULTS = ("sent", "failed", "dropped")


def grafana_token() -> str | None:
    """The Grafana token from the environment; unset and empty both mean: none."""
    return os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that changed: `kind` is `split`, `rollout` or `reload`; `labels` are extra
    tags (`verdict:pass`, `rollback`, `failed`)."""

    kind: str
    text: str
    routes: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def tags(self) -> list[str]:
        """The annotation's tags, as Grafana filters them: `turnout`, the kind, the labels,
        then `route:<name>` and `upstream:<name>` for each route and upstream concerned."""
        return [
            "turnout",
            self.kind,
            *self.labels,
            *(f"route:{name}" for name in self.routes),
            *(f"upstream:{name}" for name in self.upstreams),
        ]


def annotation_body(event: Event, time_ms: int, instance: str) -> dict[str, object]:
    """The JSON body of Grafana's `POST /api/annotations` for `event` at `time_ms`."""
    text = f"{event.text} (on {instance})"
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 3] + "..."
    return {"time": time_ms, "tags": event.tags(), "text": text}


def split_text(shares: Mapping[str, float]) -> str:
    """`blue 90%, green 10%`: a split's shares in percent, as an annotation writes them."""
    return ", ".join(f"{name} {share:.4g}%" for name, share in shares.items())


def carried(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[str, ...]:
    """The upstreams that had or get a share of the traffic, in split order."""
    names = dict.fromkeys([*after, *before])
    return tuple(name for name in names if before.get(name, 0.0) > 0 or after.get(name, 0.0) > 0)


def reload_changes(old: Table, new: Table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(routes, upstreams) a reload from `old` to `new` changed, added or removed.

    A route counts when its settings or its effective split changed; an upstream when its
    endpoints or health check changed, or its share in a changed route did.
    """
    old_upstreams = {upstream.name: upstream for upstream in old.spec.upstreams}
    new_upstreams = {upstream.name: upstream for upstream in new.spec.upstreams}
    upstreams = dict.fromkeys(
        [name for name, spec in new_upstreams.items() if old_upstreams.get(name) != spec]
        + [name for name in old_upstreams if name not in new_upstreams]
    )
    routes: list[str] = []
    for route in new.routes:
        before = old.route(route.name)
        old_shares = dict(before.split.shares) if before is not None else {}
        new_shares = dict(route.split.shares)
        if before is not None and before.spec == route.spec and old_shares == new_shares:
            continue
        routes.append(route.name)
        for name in dict.fromkeys([*new_shares, *old_shares]):
            if old_shares.get(name) != new_shares.get(name):
                upstreams[name] = None
    routes.extend(route.name for route in old.routes if new.route(route.name) is None)
    return tuple(routes), tuple(upstreams)


def reload_event(trigger: str, generation: int, sha256: str, old: Table, new: Table) -> Event:
    """The annotation of a reload that put generation `generation` in force."""
    routes, upstreams = reload_changes(old, new)
    text = (
        f"config reloaded ({trigger}): generation {generation} in force, sha256 {sha256[:12]}; "
        f"{_changed('route', routes)}, {_changed('upstream', upstreams)}"
    )
    return Event(
        kind="reload",
        text=text,
        routes=routes if len(routes) <= MAX_TAGGED else (),
        upstreams=upstreams if len(upstreams) <= MAX_TAGGED else (),
    )


def reload_failed_event(trigger: str, generation: int, errors: Sequence[str]) -> Event:
    """The annotation of a rejected reload: the first error, and how many more there are."""
    first = errors[0] if errors else "unknown error"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Event(
        kind="reload",
        text=f"config reload ({trigger}) rejected; generation {generation} stays: {first}{more}",
        labels=("failed",),
    )


def split_event(old: Table, new: Table, name: str, what: str) -> Event:
    """The annotation of a runtime split change of route `name`: `what` happened, and the
    split went from `old`'s to `new`'s."""
    before_route, after_route = old.route(name), new.route(name)
    assert before_route is not None
    assert after_route is not None
    before, after = dict(before_route.split.shares), dict(after_route.split.shares)
    text = f"{name}: {what}: {split_text(after)} (was {split_text(before)})"
    return Event(kind="split", text=text, routes=(name,), upstreams=carried(before, after))


def _changed(what: str, names: Sequence[str]) -> str:
    if not names:
        return f"no {what} changed"
    shown = ", ".join(names[:MAX_TAGGED])
    if len(names) > MAX_TAGGED:
        shown += ", ..."
    plural = "s" if len(names) != 1 else ""
    return f"{len(names)} {what}{plural} changed ({shown})"


class _Throttle:
    """Warnings at most once per `every` seconds; the next line says how many were left out."""

    def __init__(self, every: float, clock: Callable[[], float]) -> None:
        self._every = every
        self._clock = clock
        self._next = 0.0
        self._skipped = 0

    def warn(self, message: str) -> None:
        now = self._clock()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} more annotation problem(s) not logged since the last)"
        log.warning("%s", message)
        self._next = now + self._every
        self._skipped = 0


class Annotator:
    """Posts annotations in the background; `counts` holds the outcomes by result."""

    def __init__(self, token: str | None) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._deliveries = Deliveries("annotations", USER_AGENT, max_pending=MAX_PENDING)
        # Every instance posts its own annotations: the text says which one.
        self._instance = socket.gethostname()
        self._throttle = _Throttle(LOG_EVERY, time.monotonic)
        self.counts = dict.fromkeys(RESULTS, 0)

    @property
    def authorized(self) -> bool:
        """Whether posts carry a token (TURNOUT_GRAFANA_TOKEN was set)."""
        return bool(self._headers)

    def post(self, settings: Annotations | None, event: Event) -> None:
        """Post `event` to the Grafana of `settings` (None: annotations are off); never waits."""
        if settings is None:
            return
        url = settings.grafana.rstrip("/") + GRAFANA_ANNOTATIONS_PATH
        body = annotation_body(event, int(time.time() * 1000), self._instance)
        started = self._deliveries.send(
            url,
            orjson.dumps(body),
            settings.timeout,
            headers=self._headers,
            on_retry=lambda answer, delay: self._retrying(url, answer, delay),
            on_end=lambda delivered, attempts, answer: self._ended(
                url, delivered, attempts, answer
            ),
        )
        if not started:
            self.counts["dropped"] += 1
            self._throttle.warn(
                f"annotation to {url} dropped: {MAX_PENDING} annotations already under way"
            )

    async def close(self) -> None:
        """Give annotations under way a short grace, then cancel them; close the client."""
        left = await self._deliveries.close(SHUTDOWN_GRACE)
        if left:
            log.warning("%d annotation(s) not posted: cut short by the shutdown", left)

    def _retrying(self, url: str, answer: str, delay: float) -> None:
        self._throttle.warn(f"annotation to {url}: Grafana {answer}; trying again in {delay:g}s")

    def _ended(self, url: str, delivered: bool, attempts: int, answer: str) -> None:
        if delivered:
            self.counts["sent"] += 1
            return
        self.counts["failed"] += 1
        refused = answer.startswith(("answered 401", "answered 403"))
        hint = f" (is {TOKEN_ENV} right?)" if refused else ""
        self._throttle.warn(
            f"annotation to {url} not posted after {attempts} attempt(s): Grafana {answer}{hint}"
        )
