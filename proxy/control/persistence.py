"""Where runtime splits and rollout state are kept: the state file, or the fleet's shared
document with the state file as this instance's cache of it.

Every change is stored before it is put in force, so a refused store (the file cannot be
written, the fleet changed meanwhile, Redis is away) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from proxy.control.fleetlink import FleetLink
from proxy.control.overrides import SplitOverrides, saved_splits
from proxy.control.state import SavedState, save_state

# The supervisor's logger: persistence failures are its log lines, as they were before the split.
log = logging.getLogger("turnout.supervisor")


class StateKeeper:
    """Stores the state that split overrides and rollouts make.

    `rollouts` gives the rollout state to persist (with the counter marks when `marks`: a fleet
    shares them), `state_file` the state file of the config in force (None: memory only).
    """

    def __init__(
        self,
        *,
        fleet: FleetLink | None,
        rollouts: Callable[[bool], Mapping[str, Mapping[str, object]]],
        state_file: Callable[[], str | None],
    ) -> None:
        self._fleet = fleet
        self._rollouts = rollouts
        self._state_file = state_file

    def export(self, overrides: SplitOverrides) -> SavedState:
        """The runtime splits and rollout state as the state file (or the fleet) keeps them."""
        return SavedState(
            splits=saved_splits(overrides), rollouts=self._rollouts(self._fleet is not None)
        )

    async def store(self, overrides: SplitOverrides, *, judged: bool) -> None:
        """Store the state that `overrides` and the rollouts make before it is put in force.

        Alone: the state file (OSError on failure). In a fleet: the shared document first
        (FleetUnavailable, FleetConflict; `judged` changes only while leading), then the
        state file as a cache (a failure there is logged only: the fleet has the state).
        """
        state = self.export(overrides)
        if self._fleet is not None:
            await self._fleet.write(state, judged=judged)
            await self.write_cache(state)
            return
        path = self._state_file()
        if path is not None:
            await asyncio.to_thread(save_state, path, state)

    async def write_cache(self, state: SavedState) -> None:
        """Write the fleet's state to the state file, this instance's cache of it (a failure is
        logged only)."""
        path = self._state_file()
        if path is None:
            return
        try:
            await asyncio.to_thread(save_state, path, state)
        except OSError as exc:
            log.error("cannot write the state file %s (the fleet's cache): %s", path, exc)
