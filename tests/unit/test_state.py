"""The state file (proxy.control.state): round trips, atomic writes, corrupt or missing files."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.control.state import (
    SavedState,
    StateFileError,
    decode_state,
    encode_state,
    load_state,
    save_state,
)

ROLLOUT = {"state": "running", "step": 1, "canary_weight": 5.0, "history": []}

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True)
weights = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(splits=st.dictionaries(names, st.dictionaries(names, weights, max_size=4), max_size=4))
def test_encode_decode_round_trip(splits: dict[str, dict[str, float]]) -> None:
    state = SavedState(splits=splits, rollouts={"api": ROLLOUT})
    assert decode_state(encode_state(state)) == state


def test_save_then_load(tmp_path: Path) -> None:
    path = tmp_path / "turnout.state.json"
    state = SavedState(splits={"api": {"blue": 0.0, "green": 100.0}}, rollouts={"web": ROLLOUT})
    save_state(str(path), state)
    assert load_state(str(path)) == state
    document = orjson.loads(path.read_bytes())
    assert document["version"] == 1
    assert document["splits"] == {"api": {"blue": 0.0, "green": 100.0}}
    # Only the state file is left in the folder: the temporary file was renamed over it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turnout.state.json"]


def test_save_replaces_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save_state(str(path), SavedState(splits={"api": {"blue": 1.0}}))
    old_inode = path.stat().st_ino
    save_state(str(path), SavedState(splits={"api": {"green": 1.0}}))
    assert load_state(str(path)).splits == {"api": {"green": 1.0}}
    # A rename, not a write in place: a reader holding the old file never sees half of one.
    assert path.stat().st_ino != old_inode


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    # The rename cannot replace a folder: the write fails at its last step.
    path = tmp_path / "state.json"
    path.mkdir()
    (path / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        save_state(str(path), SavedState(splits={"api": {"green": 1.0}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert (path / "keep").read_text() == "x"


def test_missing_file_is_an_empty_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "turnout.state")
    path = tmp_path / "absent.json"
    assert load_state(str(path)) == SavedState()
    assert "does not exist yet" in caplog.text
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "top level must be a JSON object"),
        (b'{"splits": {}}', "version"),
        (b'{"version": 2, "splits": {}}', "version: expected 1, got 2"),
        (b'{"version": 1, "splits": []}', "splits: expected a JSON object"),
        (b'{"version": 1, "splits": {"api": {"blue": -1}}}', "splits.api.blue"),
        (b'{"version": 1, "splits": {"api": {"blue": true}}}', "splits.api.blue"),
        (b'{"version": 1, "splits": {"api": {"blue": "100"}}}', "splits.api.blue"),
        (b'{"version": 1, "splits": {"api": 100}}', "splits.api: expected a JSON object"),
        (b'{"version": 1, "rollouts": {"api": "running"}}', "rollouts.api"),
        # Issue 17 item 8: weights the config could never hold; before, 1e308 was accepted at
        # start and its sum overflowed (effective split null, all traffic to one version).
        (
            b'{"version": 1, "splits": {"api": {"blue": 1e308, "green": 1e308}}}',
            r"splits.api.blue: expected a number from 0 to 1000000, got 1e\+308",
        ),
        (
            b'{"version": 1, "splits": {"api": {"blue": 1000001}}}',
            "splits.api.blue: expected a number from 0 to 1000000, got 1000001",
        ),
        (
            b'{"version": 1, "splits": {"API": {"blue": 1}}}',
            "splits: 'API' is not a route or upstream name",
        ),
        (
            b'{"version": 1, "splits": {"api": {"' + b"b" * 64 + b'": 1}}}',
            "splits.api: 'b{60}\\.\\.\\. is not a route or upstream name",
        ),
        (
            b'{"version": 1, "rollouts": {"a/b": {"state": "idle"}}}',
            "rollouts: 'a/b' is not a route or upstream name",
        ),
        (
            b'{"version": "' + b"9" * 10000 + b'"}',
            "version: expected 1, got '9{60}\\.\\.\\.$",
        ),
    ],
)
def test_corrupt_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    with pytest.raises(StateFileError, match=reason):
        decode_state(content)
    path = tmp_path / "turnout.state.json"
    path.write_bytes(content)
    assert load_state(str(path)) == SavedState()
    # Not deleted, not overwritten: kept under a new name, and the log says where.
    (aside,) = tmp_path.glob("turnout.state.json.corrupt-*")
    assert aside.read_bytes() == content
    assert not path.exists()
    assert "is corrupt" in caplog.text
    assert str(aside) in caplog.text


def test_two_corrupt_files_in_the_same_second_are_both_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b"first")
    load_state(str(path))
    path.write_bytes(b"second")
    load_state(str(path))
    kept = sorted(p.read_bytes() for p in tmp_path.glob("s.json.corrupt-*"))
    assert kept == [b"first", b"second"]


def test_unknown_keys_are_ignored() -> None:
    data = b'{"version": 1, "splits": {"api": {"blue": 3}}, "future": {"x": 1}}'
    assert decode_state(data) == SavedState(splits={"api": {"blue": 3.0}})


def test_weights_up_to_the_config_bound_are_kept() -> None:
    data = b'{"version": 1, "splits": {"api": {"blue": 1000000, "green": 0}}}'
    assert decode_state(data) == SavedState(splits={"api": {"blue": 1e6, "green": 0.0}})
