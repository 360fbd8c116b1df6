"""The exchange's lifecycle (proxy.core.exchange_state): the tables, their docstring, the rules
the data plane relies on (states only move forward, terminal states stay, `>= DONE` is over,
`>= STREAMING` is too late for an answer of the proxy's own), and each transition."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core import exchange_state as es
from proxy.core.exchange_state import (
    ANSWER,
    BEGIN,
    BREAK,
    BROKEN,
    DONE,
    HEAD_COMPLETE,
    IDLE,
    ILLEGAL,
    MESSAGE_COMPLETE,
    READING_BODY,
    READING_HEAD,
    RECEIVED,
    RESPONSE_END,
    RESPONSE_HEAD,
    STREAMING,
    TUNNEL,
    UPGRADE,
    WAITING,
    Event,
    IllegalTransition,
    advance,
)

Table = dict[tuple[int, str], int]

# side -> (table, state names, events, initial state)
SIDES: dict[str, tuple[Table, tuple[str, ...], tuple[Event, ...], int]] = {
    "request": (es.REQUEST_TABLE, es.REQUEST_STATES, es.REQUEST_EVENTS, READING_HEAD),
    "response": (es.RESPONSE_TABLE, es.RESPONSE_STATES, es.RESPONSE_EVENTS, IDLE),
}

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def docstring_table(side: str) -> Table:
    """The rows of the module docstring's table for `side` (`Request side::` and what follows)."""
    _, names, _, _ = SIDES[side]
    # From the source: a compiled module keeps no docstring (nor always a true __file__).
    source = (PROJECT_ROOT / "proxy" / "core" / "exchange_state.py").read_text(encoding="utf-8")
    lines = (ast.get_docstring(ast.parse(source)) or "").splitlines()
    start = lines.index(f"{side.capitalize()} side::")
    rows: Table = {}
    for line in lines[start + 1 :]:
        words = line.split()
        if not words:
            if rows:
                break
            continue
        if words[0] == "state":
            continue  # the column titles
        rows[names.index(words[0]), words[1]] = names.index(words[2])
    return rows


def terminal(side: str, state: int) -> bool:
    table, _, _, _ = SIDES[side]
    return not any(before == state for before, _ in table)


@pytest.mark.parametrize("side", SIDES)
def test_the_docstring_tables_are_the_tables(side: str) -> None:
    table, _, _, _ = SIDES[side]
    assert docstring_table(side) == table


@pytest.mark.parametrize("side", SIDES)
def test_state_constants_are_numbered_as_named(side: str) -> None:
    _, names, _, _ = SIDES[side]
    assert [getattr(es, name) for name in names] == list(range(len(names)))


@pytest.mark.parametrize("side", SIDES)
def test_each_event_carries_its_column_of_the_table(side: str) -> None:
    table, names, events, _ = SIDES[side]
    assert {event.name for event in events} == {name for _, name in table}
    for event in events:
        assert event.side == side
        assert event.column == tuple(
            table.get((state, event.name), ILLEGAL) for state in range(len(names))
        )
        rows = [(state, after) for (state, name), after in table.items() if name == event.name]
        if len(rows) == 1:
            assert (event.source, event.target) == rows[0]
        else:
            assert event.source == event.target == ILLEGAL


def test_an_event_without_a_row_is_refused() -> None:
    with pytest.raises(ValueError, match="no transition"):
        Event("response", "teleport", es.RESPONSE_TABLE)


@pytest.mark.parametrize("side", SIDES)
def test_states_only_move_forward(side: str) -> None:
    # What makes `state >= DONE` mean "over" and `state >= STREAMING` "too late to answer".
    table, _, _, _ = SIDES[side]
    assert all(after > before for (before, _), after in table.items())


@pytest.mark.parametrize("side", SIDES)
def test_every_state_is_reachable_and_every_live_state_can_end(side: str) -> None:
    table, names, _, initial = SIDES[side]
    seen = {initial}
    frontier = [initial]
    while frontier:
        state = frontier.pop()
        for (before, _), after in table.items():
            if before == state and after not in seen:
                seen.add(after)
                frontier.append(after)
    assert seen == set(range(len(names)))
    ends = {state for state in range(len(names)) if terminal(side, state)}
    for state in range(len(names)):
        # Terminal states are reached by some path from every state.
        reach = {state}
        frontier = [state]
        while frontier:
            current = frontier.pop()
            for (before, _), after in table.items():
                if before == current and after not in reach:
                    reach.add(after)
                    frontier.append(after)
        assert reach & ends


def test_the_terminal_states_are_those_from_done() -> None:
    assert [s for s in range(len(es.RESPONSE_STATES)) if terminal("response", s)] == [DONE, BROKEN]
    assert [s for s in range(len(es.REQUEST_STATES)) if terminal("request", s)] == [RECEIVED]


@pytest.mark.parametrize("state", [DONE, BROKEN])
@pytest.mark.parametrize("event", es.RESPONSE_EVENTS, ids=lambda event: event.name)
def test_terminal_states_are_absorbing(state: int, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        advance(state, event)


def test_the_proxy_can_answer_exactly_before_streaming() -> None:
    assert [s for s in range(len(es.RESPONSE_STATES)) if ANSWER.column[s] != ILLEGAL] == [
        s for s in range(STREAMING)
    ]


def test_every_live_state_can_break() -> None:
    assert [s for s in range(len(es.RESPONSE_STATES)) if BREAK.column[s] == BROKEN] == [
        s for s in range(DONE)
    ]


@given(data=st.data(), side=st.sampled_from(sorted(SIDES)))
def test_random_event_sequences_follow_the_table(data: st.DataObject, side: str) -> None:
    table, names, events, initial = SIDES[side]
    state = initial
    path = []
    for event in data.draw(st.lists(st.sampled_from(events), max_size=12)):
        expected = table.get((state, event.name))
        if expected is None:
            with pytest.raises(IllegalTransition) as caught:
                advance(state, event)
            error = caught.value
            assert (error.side, error.state, error.event) == (side, state, event.name)
            assert names[state] in str(error)
            assert repr(event.name) in str(error)
            continue  # a refused event leaves the state as it was
        after = advance(state, event)
        assert after == expected
        assert after > state
        path.append(after)
        state = after
    # Once terminal, always terminal: no later event moved the state.
    ends = [i for i, s in enumerate(path) if terminal(side, s)]
    if ends:
        assert ends[0] == len(path) - 1


# ---- the transitions, one by one --------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "state", "event", "after"),
    [
        (side, state, event, after)
        for side, (table, _, _, _) in SIDES.items()
        for (state, event), after in table.items()
    ],
)
def test_every_row_applies(side: str, state: int, event: str, after: int) -> None:
    (match,) = [e for e in SIDES[side][2] if e.name == event]
    assert advance(state, match) == after


def test_a_request_is_read_head_then_body() -> None:
    assert advance(READING_HEAD, HEAD_COMPLETE) == READING_BODY
    assert advance(READING_BODY, MESSAGE_COMPLETE) == RECEIVED
    with pytest.raises(IllegalTransition, match="'message_complete' is not allowed in state"):
        advance(READING_HEAD, MESSAGE_COMPLETE)  # llhttp never ends a message without a head
    with pytest.raises(IllegalTransition):
        advance(READING_BODY, HEAD_COMPLETE)  # one head per exchange


def test_a_plain_exchange() -> None:
    state = advance(IDLE, BEGIN)
    assert state == WAITING
    state = advance(state, RESPONSE_HEAD)
    assert state == STREAMING
    assert advance(state, RESPONSE_END) == DONE


def test_begin_happens_once() -> None:
    for state in (WAITING, STREAMING, TUNNEL, DONE, BROKEN):
        with pytest.raises(IllegalTransition):
            advance(state, BEGIN)


def test_a_refused_head_is_answered_without_beginning() -> None:
    assert advance(IDLE, ANSWER) == DONE


def test_a_queued_request_ends_broken_when_its_connection_goes() -> None:
    assert advance(IDLE, BREAK) == BROKEN


def test_a_local_error_while_streaming_is_not_an_answer() -> None:
    # The client already has the upstream's head: the proxy can only cut the connection.
    with pytest.raises(IllegalTransition):
        advance(STREAMING, ANSWER)
    assert advance(STREAMING, BREAK) == BROKEN


def test_a_tunnel_opens_only_after_the_101_went_out() -> None:
    with pytest.raises(IllegalTransition) as caught:
        advance(WAITING, UPGRADE)
    assert str(caught.value) == "response side: event 'upgrade' is not allowed in state WAITING"
    tunnel = advance(STREAMING, UPGRADE)
    assert tunnel == TUNNEL
    assert advance(tunnel, RESPONSE_END) == DONE  # closed by the upstream or a close handshake
    assert advance(tunnel, BREAK) == BROKEN  # the client left, idled out, or was cut
    with pytest.raises(IllegalTransition):
        advance(tunnel, RESPONSE_HEAD)


def test_a_response_cannot_end_before_it_began() -> None:
    for state in (IDLE, WAITING):
        with pytest.raises(IllegalTransition):
            advance(state, RESPONSE_END)


def test_an_unknown_state_is_named_by_its_number() -> None:
    error = IllegalTransition("response", 17, "begin")
    assert str(error) == "response side: event 'begin' is not allowed in state 17"
