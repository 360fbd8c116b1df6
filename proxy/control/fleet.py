"""Fleet mode (contract section 9): the supervisor's link to the Redis every instance shares.

Instances whose config has the same `fleet.name` keep one *shared document* in Redis: the
runtime splits and the rollout states (with the counter marks each running step's evidence is
measured from), in the state file's format (`proxy.control.state`). Every change is a
compare-and-set on the document's revision, so two instances never overwrite each other's change
unseen; a leader's change is also fenced by its lease, so a leader that lost the lease (paused,
cut off)
cannot advance or roll back anything. Each write publishes the new revision; every instance
listens, and also compares revisions once a period, so a lost message leaves it behind for
one period at most.

Keys (the `{name}` hash tag keeps them in one Redis Cluster slot, as Lua scripts need):

    turnout:{name}:rev        revision of the shared document (an integer)
    turnout:{name}:doc        the shared document (JSON, `proxy.control.state` format)
    turnout:{name}:leader     "<instance>#<boot> <epoch>", with the lease as its expiry
    turnout:{name}:epoch      the fencing epoch: one more for every new leader
    turnout:{name}:instances  hash: instance -> its heartbeat (generation, sha256, routes)
    turnout:{name}:counters   hash: "<instance>#<boot>" -> that incarnation's cumulative
                              counters of rollout routes; the leader sums them all, and a
                              restarted instance is a new field, so nothing is counted twice
    channel turnout:{name}:changes    the new revision after each write

This module is the shell around Redis: it connects with back-off, keeps the lease, heartbeats,
publishes counters and hands every new document to the supervisor (`on_document`); the
supervisor decides what a document means for its table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from proxy.control.state import SavedState, StateFileError, decode_state, encode_state
from proxy.core.config import ENV_REF_RE, SENTINEL_SCHEMES, parse_sentinel_url, redact_redis_url
from proxy.core.counters import PairCounts, read_instance_counters
from proxy.core.spec import Fleet
from proxy.runtime.tasks import TaskSet

log = logging.getLogger("turnout.fleet")

# The longest wait between two looks at Redis (heartbeat, lease, revision, counters); a short
# lease shortens it to a third of the lease so a live leader always renews in time.
PERIOD = 1.0
# Reconnect back-off: doubles from the first to the last.
BACKOFF_FIRST = 0.1
BACKOFF_LAST = 5.0
# An instance whose heartbeat is older than this many leases is left out of /admin/fleet and
# of the table-agreement check, and its heartbeat is deleted.
GONE_AFTER_LEASES = 3
# A restarted instance's old counters stay in the sum this long (they never change again).
COUNTERS_KEPT = 24 * 3600.0
# How often the leader looks for such counters to delete: reading every instance's counters
# each period on every instance would cost the fleet a full scan of the hash per second each.
COUNTERS_PRUNED_EVERY = 3600.0
# Compare-and-set attempts before a mutation gives up with a conflict.
WRITE_ATTEMPTS = 5

# KEYS: rev, doc, leader. ARGV: expected revision, document, fence ("" = none), channel.
# Returns {1, new revision}, {0, revision in force} (someone wrote first) or {-1, revision}
# (the fence is not the lease holder any more).
_WRITE = """
local rev = tonumber(redis.call('GET', KEYS[1]) or '0')
if rev ~= tonumber(ARGV[1]) then return {0, rev} end
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then return {-1, rev} end
rev = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], rev)
return {1, rev}
"""

# KEYS: leader, epoch. ARGV: who ("<instance>#<boot>"), lease in ms.
# Returns {1, holder} when `who` holds the lease (taken now or renewed), else {0, holder}.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  if string.sub(holder, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, holder}
  end
  return {0, holder}
end
local epoch = redis.call('INCR', KEYS[2])
holder = ARGV[1] .. ' ' .. epoch
redis.call('SET', KEYS[1], holder, 'PX', ARGV[2])
return {1, holder}
"""

# KEYS: leader. ARGV: the holder value. Lets go of the lease at a clean shutdown.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class FleetUnavailable(Exception):
    """Redis cannot be reached: the change was not made anywhere — unless `ambiguous`: the
    write was sent and its answer never came, so Redis may have made it."""

    def __init__(self, message: str, *, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class FleetConflict(Exception):
    """Another instance changed the shared state first, or this one is no longer the leader."""


class FleetDisagreement(Exception):
    """Instances of the fleet have different tables for a route (a rollout must not start)."""

    def __init__(self, route: str, instances: Sequence[str]) -> None:
        super().__init__(
            f"the fleet's instances disagree on route '{route}' (its split or rollout differs "
            f"on: {', '.join(instances)}); deploy the same config everywhere first"
        )
        self.route = route
        self.instances = list(instances)


def expand_instance(written: str | None) -> str:
    """The instance name: `${VAR}` references expanded; host name and pid when not given.

    ValueError names a variable that is not set.
    """
    if written is None:
        return f"{socket.gethostname()}-{os.getpid()}"

    def value(match: Any) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"fleet.instance: the environment variable {name} is not set")
        return os.environ[name]

    expanded = ENV_REF_RE.sub(value, written)
    if not expanded or any(c.isspace() or c == "#" for c in expanded):
        raise ValueError(f"fleet.instance: '{expanded}' is not usable as an instance name")
    return expanded


def redis_client(spec: Fleet, timeout: float) -> aioredis.Redis:
    """A client for `spec.redis`; the password from the URL or TURNOUT_REDIS_PASSWORD.

    A `redis+sentinel://` URL asks the Sentinels for the service's primary at each connect,
    so a Sentinel failover is followed by the next reconnect.
    """
    parts = urllib.parse.urlsplit(spec.redis)
    password = parts.password
    if password is None:
        password = os.environ.get("TURNOUT_REDIS_PASSWORD") or None
    if parts.scheme in SENTINEL_SCHEMES:
        sentinels, service, database = parse_sentinel_url(spec.redis)
        sentinel = Sentinel(sentinels, socket_timeout=timeout, socket_connect_timeout=timeout)
        primary: aioredis.Redis = sentinel.master_for(
            service,
            db=database,
            password=password,
            ssl=parts.scheme.startswith("rediss"),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return primary
    client: aioredis.Redis = aioredis.Redis.from_url(
        spec.redis,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=0,
        retry_on_timeout=False,
    )
    return client


@dataclass(frozen=True, slots=True)
class Member:
    """One instance's heartbeat, as /admin/fleet shows it."""

    instance: str
    generation: int
    sha256: str
    last_seen: float
    table_sha256: str = ""
    routes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What this instance tells the fleet about itself each period."""

    generation: int
    sha256: str
    # A digest of the upstreams and routes alone: files that differ only in per-instance
    # settings (addresses, instance name, state file) have the same table.
    table_sha256: str
    # Route -> fingerprint of its split and rollout (routes with a rollout only).
    routes: Mapping[str, str]


class FleetStore:
    """Connection, lease, heartbeat and shared document of one instance; `run` until cancelled.

    `on_document(state)` is awaited with every shared document that differs from the last one
    seen (and with none at all: a fleet's first instance seeds the document with `seed()`).
    `heartbeat()` and `counters()` are called once a period for what to publish.
    """

    def __init__(
        self,
        spec: Fleet,
        instance: str,
        *,
        on_document: Callable[[SavedState], Awaitable[None]],
        seed: Callable[[], SavedState],
        heartbeat: Callable[[], Heartbeat],
        counters: Callable[[], list[PairCounts]],
        on_leader: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.instance = instance
        self.boot = secrets.token_hex(4)
        self._who = f"{instance}#{self.boot}"
        prefix = f"turnout:{{{spec.name}}}:"
        self._rev_key = prefix + "rev"
        self._doc_key = prefix + "doc"
        self._leader_key = prefix + "leader"
        self._epoch_key = prefix + "epoch"
        self._instances_key = prefix + "instances"
        self._counters_key = prefix + "counters"
        self._channel = prefix + "changes"
        self._on_document = on_document
        self._seed = seed
        self._heartbeat = heartbeat
        self._counters = counters
        self._on_leader = on_leader
        self._clock = clock
        self.period = min(PERIOD, spec.lease / 3)
        # A Redis call slower than this counts as Redis being away. Generous: a loaded machine
        # must not turn into 503s; the lease stays safe whatever it is (its time is counted
        # from before each renewal is sent).
        self._timeout = max(1.0, min(5.0, spec.lease / 2))
        self._client: aioredis.Redis | None = None
        self._tasks = TaskSet("fleet")
        self._wake = asyncio.Event()
        self._stopped = False
        # What this instance knows; kept while Redis is away (fail static).
        self.connected = False
        self.rev = 0
        self.document: SavedState | None = None
        # Entries of the counters hash found unreadable at the last look, with why (logged once).
        self._unreadable_counters: dict[str, str] = {}
        self.holder: str | None = None
        self.leading = False
        self._lease_until = 0.0
        self.members: list[Member] = []
        self._pruned_at = 0.0
        self.last_error: str | None = None

    # ---- what the supervisor reads ------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        """The lease holder's instance name (None: nobody holds it, or not known)."""
        if self.holder is None:
            return None
        return self.holder.rsplit(" ", 1)[0].rsplit("#", 1)[0]

    @property
    def epoch(self) -> int:
        if self.holder is None:
            return 0
        return int(self.holder.rsplit(" ", 1)[1])

    def may_lead(self) -> bool:
        """True while this instance holds a lease it renewed in time (rollouts may move)."""
        return self.connected and self.leading and time.monotonic() < self._lease_until

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The body of GET /admin/fleet."""
        now = self._clock() if now is None else now
        members = self.live_members(now)
        common = _most_common([m.sha256 for m in members])
        common_table = _most_common([m.table_sha256 for m in members])
        leader = self.leader
        return {
            "name": self.spec.name,
            "instance": self.instance,
            "leader": leader,
            "epoch": self.epoch,
            "connected": self.connected,
            "redis": redact_redis_url(self.spec.redis),
            "revision": self.rev,
            "last_error": self.last_error,
            "instances": [
                {
                    "instance": m.instance,
                    "generation": m.generation,
                    "sha256": m.sha256,
                    "sha256_differs": m.sha256 != common,
                    "table_sha256": m.table_sha256,
                    "table_differs": m.table_sha256 != common_table,
                    "last_seen": _iso(m.last_seen),
                    "leader": m.instance == leader,
                }
                for m in members
            ],
            "config_differs": sorted(m.instance for m in members if m.sha256 != common),
            "table_differs": sorted(m.instance for m in members if m.table_sha256 != common_table),
        }

    def live_members(self, now: float | None = None) -> list[Member]:
        now = self._clock() if now is None else now
        horizon = GONE_AFTER_LEASES * self.spec.lease
        return [m for m in self.members if now - m.last_seen <= horizon]

    def disagreeing(self, route: str, fingerprint: str) -> list[str]:
        """The live instances whose table has another split or rollout for `route`."""
        return sorted(
            m.instance
            for m in self.live_members()
            if m.instance != self.instance and m.routes.get(route) != fingerprint
        )

    # ---- changes -------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Read the shared document if its revision moved (True: `document` is new; the
        caller applies it); FleetUnavailable when Redis cannot be reached."""
        client = self._usable()
        try:
            rev = int(await client.get(self._rev_key) or 0)
            if rev != self.rev or self.document is None:
                return await self._fetch(client)
        except (RedisError, OSError) as exc:
            raise self._lost(exc) from exc
        return False

    async def write(self, state: SavedState, *, fenced: bool) -> int:
        """Store `state` as the next revision of the shared document, if nobody wrote since
        the revision this instance last saw (and, `fenced`, while it holds the lease).

        FleetConflict when someone did (`document` is then the newest, for the caller to
        apply and try again), FleetUnavailable when Redis cannot be reached.
        """
        client = self._usable()
        fence = self.holder if fenced and self.leading and self.holder else ""
        if fenced and not fence:
            raise FleetConflict("this instance does not hold the leader lease")
        body = encode_state(state)
        try:
            result = await client.eval(
                _WRITE,
                3,
                self._rev_key,
                self._doc_key,
                self._leader_key,
                str(self.rev),
                body,
                fence,
                self._channel,
            )
        except RedisTimeout as exc:
            self._lost(exc)
            raise FleetUnavailable(
                f"{_describe(exc)}; the change was sent and may have been stored",
                ambiguous=True,
            ) from exc
        except (RedisError, OSError) as exc:
            raise self._lost(exc) from exc
        outcome, rev = int(result[0]), int(result[1])
        if outcome == 1:
            self.rev = rev
            self.document = state
            return rev
        if outcome == -1:
            self._demote("the lease moved to another instance")
            raise FleetConflict("this instance no longer holds the leader lease")
        with contextlib.suppress(FleetUnavailable):
            await self.refresh()
        raise FleetConflict("another instance changed the fleet's state first")

    async def fleet_counters(self) -> list[list[PairCounts]]:
        """Every incarnation's published pairs, this instance's fresh ones included; [] when
        Redis cannot be reached.

        Other instances' counters are untrusted input: each entry is read (and checked) here,
        once, with `read_instance_counters`; an unreadable one is left out and logged (once
        per entry and error, not at every look).
        """
        client = self._client
        if client is None or not self.connected:
            return []
        try:
            await self._publish_counters(client)
            raw = await client.hgetall(self._counters_key)
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return []
        snapshots: list[list[PairCounts]] = []
        unreadable: dict[str, str] = {}
        for key, value in raw.items():
            who = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            try:
                snapshots.append(read_instance_counters(orjson.loads(value))["routes"])
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                unreadable[who] = str(exc)
                if self._unreadable_counters.get(who) != unreadable[who]:
                    log.warning(
                        "fleet %s: counters of %s left out, unreadable: %s",
                        self.spec.name,
                        who,
                        exc,
                    )
        self._unreadable_counters = unreadable
        return snapshots

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected (with back-off), keep the lease and the document, until cancelled."""
        backoff = BACKOFF_FIRST
        while not self._stopped:
            client = redis_client(self.spec, self._timeout)
            try:
                await client.ping()
                self._client = client
                self.connected = True
                self.last_error = None
                log.info(
                    "fleet %s: connected to %s as %s",
                    self.spec.name,
                    redact_redis_url(self.spec.redis),
                    self.instance,
                )
                backoff = BACKOFF_FIRST
                await self._session(client)
            except (RedisError, OSError) as exc:
                if self.connected or self.last_error is None:
                    log.warning(
                        "fleet %s: Redis unreachable (%s); serving the last known state",
                        self.spec.name,
                        _describe(exc),
                    )
                self._lost(exc)
            finally:
                self._client = None
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._stopped:
                break
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_LAST, backoff * 2)

    async def _session(self, client: aioredis.Redis) -> None:
        """One connection's life: first sync, then a look every period and on each message."""
        pubsub = client.pubsub()
        await pubsub.subscribe(self._channel)
        listener = self._tasks.spawn(self._listen(pubsub), name="fleet-listen")
        try:
            await self._sync(client)
            while not self._stopped:
                await self._look(client)
                if listener.done():
                    listener.result()  # its error ends the session
                    raise ConnectionError("the change subscription ended")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.period):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                self._wake.set()

    async def _sync(self, client: aioredis.Redis) -> None:
        """At connect: take the fleet's document, or seed it with what this instance knows
        (the first instance, or a Redis that lost its data: nothing known is reset)."""
        rev = int(await client.get(self._rev_key) or 0)
        if rev == 0 or not await client.exists(self._doc_key):
            known = self._seed()
            self.rev = 0
            try:
                await self.write(known, fenced=False)
            except FleetConflict:
                # Another instance seeded it first: take its document.
                if self.document is not None:
                    await self._on_document(self.document)
                return
            log.info(
                "fleet %s: the shared state was empty; published this instance's", self.spec.name
            )
            return
        if await self._fetch(client) or self.document is not None:
            # Also after a reconnect with no change: what this instance applied while
            # Redis was away may differ from the document.
            await self._on_document(self.document or SavedState())

    async def _look(self, client: aioredis.Redis) -> None:
        """One period (or a change message): the document if its revision moved — first, so
        a change is in force here as soon as it can be —, then heartbeat, lease, counters."""
        rev = int(await client.get(self._rev_key) or 0)
        if rev == 0 or not await client.exists(self._doc_key):
            await self._sync(client)  # Redis lost its data while we were connected
        elif rev != self.rev and await self._fetch(client):
            await self._on_document(self.document or SavedState())
        now = self._clock()
        beat = self._heartbeat()
        entry = {
            "generation": beat.generation,
            "sha256": beat.sha256,
            "table_sha256": beat.table_sha256,
            "routes": dict(beat.routes),
            "seen": now,
        }
        await client.hset(self._instances_key, self.instance, orjson.dumps(entry))
        await self._lease(client)
        await self._publish_counters(client)
        await self._read_members(client, now)

    async def _lease(self, client: aioredis.Redis) -> None:
        started = time.monotonic()
        lease_ms = str(int(self.spec.lease * 1000))
        result = await client.eval(
            _ACQUIRE, 2, self._leader_key, self._epoch_key, self._who, lease_ms
        )
        holder = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        self.holder = holder
        if int(result[0]) == 1:
            # The lease runs from before the call was sent: never trust more than Redis gave.
            self._lease_until = started + self.spec.lease
            if not self.leading:
                self.leading = True
                log.info("fleet %s: this instance leads (epoch %d)", self.spec.name, self.epoch)
                self._on_leader(True)
        elif self.leading:
            self._demote(f"{self.leader} holds the lease")

    async def _publish_counters(self, client: aioredis.Redis) -> None:
        body = orjson.dumps({"at": self._clock(), "routes": self._counters()})
        await client.hset(self._counters_key, self._who, body)

    async def _read_members(self, client: aioredis.Redis, now: float) -> None:
        raw = await client.hgetall(self._instances_key)
        members = []
        gone = []
        horizon = GONE_AFTER_LEASES * self.spec.lease
        for key, value in raw.items():
            name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            try:
                entry = orjson.loads(value)
                member = Member(
                    instance=name,
                    generation=int(entry["generation"]),
                    sha256=str(entry["sha256"]),
                    last_seen=float(entry["seen"]),
                    table_sha256=str(entry.get("table_sha256", "")),
                    routes={str(k): str(v) for k, v in dict(entry.get("routes", {})).items()},
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                gone.append(key)
                continue
            if now - member.last_seen > 2 * horizon:
                gone.append(key)
            members.append(member)
        if gone:
            await client.hdel(self._instances_key, *gone)
        self.members = sorted(members, key=lambda m: m.instance)
        if self.leading and now - self._pruned_at >= COUNTERS_PRUNED_EVERY:
            self._pruned_at = now
            await self._prune_counters(client, now)

    async def _prune_counters(self, client: aioredis.Redis, now: float) -> None:
        raw = await client.hgetall(self._counters_key)
        old = []
        for key, value in raw.items():
            try:
                at = float(orjson.loads(value)["at"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                at = 0.0
            if now - at > COUNTERS_KEPT:
                old.append(key)
        if old:
            await client.hdel(self._counters_key, *old)

    async def _fetch(self, client: aioredis.Redis) -> bool:
        """Read the document and its revision as one picture; True when it is new."""
        async with client.pipeline(transaction=True) as pipe:
            pipe.get(self._rev_key)
            pipe.get(self._doc_key)
            rev_raw, body = await pipe.execute()
        if body is None:
            return False
        try:
            state = decode_state(body)
        except StateFileError as exc:
            # Not ours to repair by guessing: keep serving what we know and say so.
            self.last_error = f"the shared state in Redis is unusable: {exc}"
            log.error("fleet %s: %s", self.spec.name, self.last_error)
            return False
        self.rev = int(rev_raw or 0)
        if state == self.document:
            return False
        self.document = state
        return True

    # ---- the end ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Let go of the lease (a successor takes over at once) and disconnect."""
        self._stopped = True
        client = self._client
        if client is not None and self.leading and self.holder is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await client.eval(_RELEASE, 1, self._leader_key, self.holder)
        self._demote("shutting down")
        await self._tasks.cancel_all(1.0)

    # ---- helpers ---------------------------------------------------------------------------------

    def _usable(self) -> aioredis.Redis:
        client = self._client
        if client is None or not self.connected:
            raise FleetUnavailable(self.last_error or "not connected to Redis yet")
        return client

    def _lost(self, exc: BaseException) -> FleetUnavailable:
        """Note that Redis went away; rollouts hold until it is back."""
        self.connected = False
        self.last_error = _describe(exc)
        self._demote("Redis is unreachable")
        return FleetUnavailable(self.last_error)

    def _demote(self, why: str) -> None:
        if self.leading:
            self.leading = False
            log.warning("fleet %s: no longer the leader: %s", self.spec.name, why)
            self._on_leader(False)


def _most_common(values: Sequence[str]) -> str:
    """The value most instances have (the first in sorted order on a tie): the reference the
    others are said to differ from."""
    return max(sorted(set(values)), key=values.count) if values else ""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text


def _iso(moment: float) -> str:
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
