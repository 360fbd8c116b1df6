"""The life of one exchange (a request and its response) as an explicit state machine.

As in h11 (h11/_state.py), the two sides of an exchange have separate states: what the client
sends (the request, read by the downstream's parser) and what the client gets (the response,
and the upstream attempt behind it). Each side's transitions are data, a table keyed by
(state, event); nothing else changes a state. Pure: no I/O; `proxy/dataplane/http1.py` (the
`Exchange`) drives it.

Request side::

    state         event             next          when
    READING_HEAD  head_complete     READING_BODY  the head is parsed; a body may follow
    READING_BODY  message_complete  RECEIVED      the whole request is in

Response side::

    state      event          next       when
    IDLE       begin          WAITING    its turn came (after the requests before it): routing
    IDLE       answer         DONE       a head refused before routing (400, 431, 505...)
    IDLE       break          BROKEN     the connection closed while it waited its turn
    WAITING    response_head  STREAMING  the upstream's response head went to the client
    WAITING    answer         DONE       the proxy answered itself (404, 502, 504...)
    WAITING    break          BROKEN     the client left, or drain or shutdown cut it
    STREAMING  upgrade        TUNNEL     the 101 went out: a WebSocket byte tunnel
    STREAMING  response_end   DONE       the whole response went out
    STREAMING  break          BROKEN     cut: upstream broke, timed out, client left
    TUNNEL     response_end   DONE       the upstream closed, or both got a close frame
    TUNNEL     break          BROKEN     the client left, idle timeout, or cut

    IDLE --begin--> WAITING --response_head--> STREAMING --upgrade--> TUNNEL
      |               |                           |                    |
      +---------------+---------------------------+--------------------+--> DONE or BROKEN

Every state before DONE can end in one of the two terminal states (the rows say by which
event); no event leaves them. States are small ints ordered along the arrows, so progress is
one comparison: `state >= DONE` means the exchange is over (late notices -- a timeout sweep, a
lost client, a drain -- find it so, and the caller ignores them before applying anything);
`state >= STREAMING` means it is too late for a response of the proxy's own (an error can only
cut the connection). Facts about the request that are not lifecycle (it asks for an upgrade,
it is answered here, its route's in-flight gauge was raised) stay plain attributes.

`advance(state, event)` is the one way a state changes: the state after, or, for a state the
event has no transition from, `IllegalTransition` naming both (a bug in the data plane, never
the client's doing). The data plane inlines it on its per-request transitions, reading the same
table through the `Event`: its column (state after, indexed by state before, ILLEGAL where the
table has no row) and, for an event with one row, that row as `source` and `target`, so the
commonest transitions cost one comparison and one store. (A dict subclass with `__missing__`
would read better, but indexing one goes through a generic method call, not the dict's own.)
"""

from __future__ import annotations

from typing import Final

# Request side.
READING_HEAD: Final = 0
READING_BODY: Final = 1
RECEIVED: Final = 2
REQUEST_STATES: Final = ("READING_HEAD", "READING_BODY", "RECEIVED")

# Response side.
IDLE: Final = 0
WAITING: Final = 1
STREAMING: Final = 2
TUNNEL: Final = 3
DONE: Final = 4
BROKEN: Final = 5
RESPONSE_STATES: Final = ("IDLE", "WAITING", "STREAMING", "TUNNEL", "DONE", "BROKEN")

REQUEST_TABLE: Final[dict[tuple[int, str], int]] = {
    (READING_HEAD, "head_complete"): READING_BODY,
    (READING_BODY, "message_complete"): RECEIVED,
}

RESPONSE_TABLE: Final[dict[tuple[int, str], int]] = {
    (IDLE, "begin"): WAITING,
    (IDLE, "answer"): DONE,
    (IDLE, "break"): BROKEN,
    (WAITING, "response_head"): STREAMING,
    (WAITING, "answer"): DONE,
    (WAITING, "break"): BROKEN,
    (STREAMING, "upgrade"): TUNNEL,
    (STREAMING, "response_end"): DONE,
    (STREAMING, "break"): BROKEN,
    (TUNNEL, "response_end"): DONE,
    (TUNNEL, "break"): BROKEN,
}


class IllegalTransition(Exception):
    """An event arrived in a state its side's table has no transition from: a bug."""

    def __init__(self, side: str, state: int, event: str) -> None:
        names = REQUEST_STATES if side == "request" else RESPONSE_STATES
        name = names[state] if 0 <= state < len(names) else repr(state)
        super().__init__(f"{side} side: event {event!r} is not allowed in state {name}")
        self.side = side
        self.state = state
        self.event = event


ILLEGAL: Final = -1


class Event:
    """One event: its name, its side and its column of that side's table."""

    __slots__ = ("column", "name", "side", "source", "target")

    def __init__(self, side: str, name: str, table: dict[tuple[int, str], int]) -> None:
        states = REQUEST_STATES if side == "request" else RESPONSE_STATES
        self.side = side
        self.name = name
        # The state after this event, indexed by the state before.
        self.column: tuple[int, ...] = tuple(
            table.get((state, name), ILLEGAL) for state in range(len(states))
        )
        rows = [(state, after) for state, after in enumerate(self.column) if after != ILLEGAL]
        if not rows:
            raise ValueError(f"event {name!r} has no transition on the {side} side")
        # The one row of an event that has only one; ILLEGAL for both otherwise.
        self.source, self.target = rows[0] if len(rows) == 1 else (ILLEGAL, ILLEGAL)

    def illegal(self, state: int) -> IllegalTransition:
        """The error for this event arriving in `state` (for the caller to raise)."""
        return IllegalTransition(self.side, state, self.name)

    def __repr__(self) -> str:
        return f"<Event {self.side}:{self.name}>"


def advance(state: int, event: Event) -> int:
    """The state after `event` in `state`; IllegalTransition if the table has no such row."""
    after = event.column[state]
    if after < 0:
        raise event.illegal(state)
    return after


HEAD_COMPLETE: Final = Event("request", "head_complete", REQUEST_TABLE)
MESSAGE_COMPLETE: Final = Event("request", "message_complete", REQUEST_TABLE)
REQUEST_EVENTS: Final = (HEAD_COMPLETE, MESSAGE_COMPLETE)

BEGIN: Final = Event("response", "begin", RESPONSE_TABLE)
RESPONSE_HEAD: Final = Event("response", "response_head", RESPONSE_TABLE)
UPGRADE: Final = Event("response", "upgrade", RESPONSE_TABLE)
RESPONSE_END: Final = Event("response", "response_end", RESPONSE_TABLE)
ANSWER: Final = Event("response", "answer", RESPONSE_TABLE)
BREAK: Final = Event("response", "break", RESPONSE_TABLE)
RESPONSE_EVENTS: Final = (BEGIN, RESPONSE_HEAD, UPGRADE, RESPONSE_END, ANSWER, BREAK)
