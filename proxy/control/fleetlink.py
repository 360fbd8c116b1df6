"""The supervisor's side of a fleet: what this instance publishes, and which shared document
is in force here.

`proxy.control.fleet.FleetStore` is the shell around Redis; this link is what the supervisor
holds instead of it: the heartbeat and counters this instance publishes (from the config in
force and the workers' counters), the fleet checks of a rollout start, and the revision
guard of every write (a document the store read but this instance has not put in force yet
must be adopted before anything is written on top of it). What a document means for the
table stays the supervisor's decision (`on_document`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from proxy.control.fleet import (
    FleetConflict,
    FleetDisagreement,
    FleetStore,
    Heartbeat,
    expand_instance,
)
from proxy.control.metrics import Totals
from proxy.control.rollouts import fingerprint
from proxy.control.state import SavedState
from proxy.control.views import LoadedConfig
from proxy.core.config import spec_to_dict
from proxy.core.counters import PairCounts
from proxy.core.spec import Fleet
from proxy.core.table import Table


class FleetLink:
    """One instance's link to its fleet.

    `current` gives the config in force, `totals` this instance's counters (the workers'
    latest poll), `seed` what this instance knows for an empty store to start from;
    `on_document` puts a shared document in force, `on_leader` is told when leadership moves.
    """

    def __init__(
        self,
        spec: Fleet,
        *,
        current: Callable[[], LoadedConfig],
        totals: Callable[[], Totals],
        seed: Callable[[], SavedState],
        on_document: Callable[[SavedState], Awaitable[None]],
        on_leader: Callable[[bool], None],
    ) -> None:
        self._current = current
        self._totals = totals
        self._seed = seed
        self._on_document = on_document
        self.store = FleetStore(
            spec,
            expand_instance(spec.instance),
            on_document=on_document,
            seed=self._seeded,
            heartbeat=self._heartbeat,
            counters=self._counters,
            on_leader=on_leader,
        )
        # The shared document in force here: the last one adopted, written or seeded. One the
        # store read since (`store.document`) that is not in force yet must be adopted before
        # anything is written on top of the revision it came with (see `write`).
        self._applied: SavedState | None = None
        # (config sha256, digest of its upstreams and routes), computed once per config.
        self._table_digest = ("", "")

    # --- what the supervisor reads ------------------------------------------------------------

    @property
    def document(self) -> SavedState | None:
        """The newest shared document the store has read (None: none yet)."""
        return self.store.document

    def view(self) -> dict[str, Any]:
        """The body of GET /admin/fleet."""
        return self.store.view()

    def may_judge(self) -> bool:
        """Rollouts move here only on the leader, while it leads."""
        return self.store.may_lead()

    def metrics(self) -> tuple[bool, bool, int]:
        """(connected, leading, live members), for /metrics."""
        return self.store.connected, self.store.may_lead(), len(self.store.live_members())

    async def rollout_stats(self) -> Sequence[Sequence[PairCounts]]:
        """Every fleet instance's pairs, for rollouts to judge on."""
        return await self.store.fleet_counters()

    def check_agrees(self, table: Table, route: str) -> None:
        """FleetDisagreement when other instances have another `split`/`rollout` of `route`."""
        compiled = table.route(route)
        if compiled is None or compiled.rollout is None:
            return  # the controller says what is wrong
        others = self.store.disagreeing(route, fingerprint(compiled))
        if others:
            raise FleetDisagreement(route, others)

    async def run(self) -> None:
        """Stay connected to the fleet until cancelled (`FleetStore.run`)."""
        await self.store.run()

    async def close(self) -> None:
        """Let go of the leader lease, so another instance takes over at once."""
        await self.store.close()

    # --- the shared document ------------------------------------------------------------------

    async def refresh(self) -> None:
        """Before a change: take the newest shared state (FleetUnavailable when unreachable)."""
        if await self.store.refresh():
            await self._on_document(self.store.document or SavedState())

    def adopted(self, document: SavedState) -> None:
        """`document` is in force here now."""
        self._applied = document

    async def write(self, state: SavedState, *, judged: bool) -> None:
        """Store `state` as the shared document (FleetUnavailable, FleetConflict; `judged`
        changes only while leading)."""
        fetched = self.store.document
        if fetched is not None and fetched is not self._applied:
            if fetched != self._applied:
                # The store already read a newer revision (its document waits for the change
                # lock): a write now would pass the compare-and-set on that revision with this
                # instance's older picture, losing the newer change and leaving this instance
                # on another state than the fleet's.
                raise FleetConflict("a newer shared state arrived and is not in force here")
            self._applied = fetched
        await self.store.write(state, fenced=judged)
        self._applied = self.store.document

    # --- what this instance publishes ---------------------------------------------------------

    def _seeded(self) -> SavedState:
        """What this instance knows, for an empty store to start from (then in force here)."""
        state = self._seed()
        self._applied = state
        return state

    def _heartbeat(self) -> Heartbeat:
        current = self._current()
        if self._table_digest[0] != current.sha256:
            file = spec_to_dict(current.spec)
            routing = orjson.dumps({"upstreams": file["upstreams"], "routes": file["routes"]})
            self._table_digest = (current.sha256, hashlib.sha256(routing).hexdigest())
        return Heartbeat(
            generation=current.generation,
            sha256=current.sha256,
            table_sha256=self._table_digest[1],
            routes={r.name: fingerprint(r) for r in current.table.routes if r.rollout is not None},
        )

    def _counters(self) -> list[PairCounts]:
        """This instance's cumulative counters of every (route, upstream) a rollout judges."""
        table = self._current().table
        judged = {
            (route.name, upstream)
            for route in table.routes
            if route.rollout is not None
            for upstream in (route.rollout.canary, route.rollout.baseline)
        }
        if not judged:
            return []  # published every period: no summing of every pair for nothing
        totals = self._totals()
        return [
            {
                "route": route,
                "upstream": upstream,
                "codes": {str(code): count for code, count in pair.codes.items()},
                "buckets": list(pair.buckets),
                "grpc_errors": pair.grpc_errors,
            }
            for (route, upstream), pair in totals.pairs.items()
            if (route, upstream) in judged
        ]
