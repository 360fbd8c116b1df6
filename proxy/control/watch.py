"""Watch the config file for changes, the way editors and Kubernetes actually change files.

The watch is on the file's *directory*, not on the file: an editor that saves by writing a new
file and renaming it over the old one, and a Kubernetes ConfigMap update (which swaps the
`..data` symlink to a new timestamped directory), both replace the inode a file watch would be
attached to. Events on names that can change what the path reads as (the file's own name, the
ConfigMap's `..`-names, the first hop of a symlink) call `on_change`; the caller re-reads the
file and compares hashes, so events that do not change the content do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
from collections.abc import Awaitable, Callable

from watchfiles import awatch

log = logging.getLogger("turnout.watch")

# Group a burst of events (truncate + write + close, or the ConfigMap's several renames) into one
# callback once the directory has been quiet for STEP_MS, and never wait longer than DEBOUNCE_MS:
# the contract promises a change is seen within 2 s.
STEP_MS = 50
DEBOUNCE_MS = 800

# When the directory cannot be watched (removed, permissions), try again after this long.
RETRY_SECONDS = 1.0


def relevant_names(path: str) -> set[str]:
    """Names in the directory of `path` whose change can change what `path` reads as.

    The file's own name; Kubernetes' `..data`, `..data_tmp` and `..<timestamp>` entries; and,
    when `path` is a symlink, the first component of its target (`config.yaml -> v2.yaml`).
    Other files in the folder (logs, the state file) are ignored.
    """
    names = {posixpath.basename(path)}
    with contextlib.suppress(OSError):
        target = os.readlink(path)
        if not posixpath.isabs(target):
            names.add(target.split("/", 1)[0])
    return names


def is_relevant(changed: str, names: set[str]) -> bool:
    """Whether an event on `changed` (a path in the watched directory) may matter."""
    name = posixpath.basename(changed)
    return name in names or name.startswith("..")


async def watch_file(
    path: str, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Call `on_change` after changes in the directory of `path` (absolute) until `stop` is set."""
    directory = posixpath.dirname(path)
    while not stop.is_set():
        try:
            async for changes in awatch(
                directory,
                stop_event=stop,
                watch_filter=None,
                recursive=False,
                step=STEP_MS,
                debounce=DEBOUNCE_MS,
            ):
                names = relevant_names(path)
                if any(is_relevant(changed, names) for _, changed in changes):
                    await on_change()
        except (OSError, RuntimeError) as exc:
            # watchfiles reports a vanished or unreadable directory this way; keep trying so a
            # directory that comes back (a remounted volume) is watched again.
            log.warning("cannot watch %s (%s); retrying in %.0fs", directory, exc, RETRY_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
