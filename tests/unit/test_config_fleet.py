"""The `fleet` block (contract section 9): defaults, the round trip, and every error located
(file:line:col and key path), with a password in the Redis URL never shown."""

from __future__ import annotations

import pytest
import yaml

from proxy.control.fleet import FleetStore, Heartbeat, expand_instance
from proxy.control.state import SavedState
from proxy.control.supervisor import startup_refusals
from proxy.core.config import ConfigError, parse_config, spec_to_dict
from proxy.core.spec import Fleet

PATH = "/etc/turnout/routes.yaml"
TAIL = """upstreams:
  blue: {endpoints: [127.0.0.1:9001]}
routes:
  - {name: r, split: {blue: 1}}
"""


def config(**fields: str) -> str:
    """A config whose `fleet` block has `fields`, one a line from line 2 (in the given order)."""
    lines = ["fleet:"] + [f"  {key}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n" + TAIL


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    return [str(issue) for issue in info.value.issues]


GOOD = {"name": "shop", "redis": "redis://10.0.0.5:6379/0"}


def test_defaults_and_the_round_trip() -> None:
    spec = parse_config(config(**GOOD), PATH)
    assert spec.fleet == Fleet(name="shop", redis="redis://10.0.0.5:6379/0")
    assert spec.fleet.lease == 10.0
    assert spec.fleet.instance is None
    full = parse_config(
        config(name="shop", redis="rediss://10.0.0.5:6380/3", instance="${POD}-x", lease="3s"),
        PATH,
    )
    assert full.fleet == Fleet(
        name="shop", redis="rediss://10.0.0.5:6380/3", instance="${POD}-x", lease=3.0
    )
    assert parse_config(yaml.safe_dump(spec_to_dict(full)), PATH) == full
    assert parse_config(TAIL, PATH).fleet is None


def test_a_password_in_the_url_is_kept_but_never_shown() -> None:
    spec = parse_config(config(name="shop", redis="redis://:s3cret@10.0.0.5:6379/0"), PATH)
    assert spec.fleet is not None
    assert spec.fleet.redis == "redis://:s3cret@10.0.0.5:6379/0"
    dumped = yaml.safe_dump(spec_to_dict(spec))
    assert "s3cret" not in dumped
    assert "***" in dumped
    found = errors(config(name="shop", redis="redis://u:s3cret@10.0.0.5:bad/0"))
    assert len(found) == 1
    assert "s3cret" not in found[0]
    assert found[0].startswith(f"{PATH}:3:")
    assert "fleet.redis: bad URL 'redis://u:***@10.0.0.5:bad/0'" in found[0]


@pytest.mark.parametrize(
    ("fields", "where", "expected"),
    [
        ({"redis": GOOD["redis"]}, "2:3", "fleet: missing required key 'name'"),
        ({"name": "shop"}, "2:3", "fleet: missing required key 'redis'"),
        ({**GOOD, "leader": "true"}, "4:3", "fleet.leader: unknown key 'leader'"),
        ({"name": "'Bad Name'", "redis": GOOD["redis"]}, "2:9", "fleet.name: 'Bad Name' is not"),
        ({"name": "shop", "redis": "http://10.0.0.5:6379/0"}, "3:10", "the scheme must be redis"),
        ({"name": "shop", "redis": "redis://10.0.0.5:6379/16"}, "3:10", "database number"),
        ({"name": "shop", "redis": "redis://10.0.0.5:0/0"}, "3:10", "port must be from 1"),
        ({"name": "shop", "redis": "redis:///0"}, "3:10", "no host"),
        ({"name": "shop", "redis": "redis://10.0.0.5/0?a=1"}, "3:10", "no query or fragment"),
        ({**GOOD, "lease": "500ms"}, "4:10", "fleet.lease: must be from 1s to 3600s"),
        ({**GOOD, "lease": "2h"}, "4:10", "fleet.lease: must be from 1s to 3600s"),
        ({**GOOD, "lease": "soon"}, "4:10", "fleet.lease: bad duration 'soon'"),
        ({**GOOD, "instance": "'a b'"}, "4:13", "fleet.instance: no spaces"),
        ({**GOOD, "instance": "$HOSTNAME"}, "4:13", "write an environment variable as ${NAME}"),
        ({**GOOD, "instance": "''"}, "4:13", "fleet.instance: expected 1 to 128 characters"),
    ],
)
def test_errors_are_located(fields: dict[str, str], where: str, expected: str) -> None:
    found = errors(config(**fields))
    assert len(found) == 1, found
    assert found[0].startswith(f"{PATH}:{where}"), found
    assert expected in found[0], found
    if where.startswith("3:"):
        assert "fleet.redis: bad URL" in found[0]


def test_a_fleet_that_is_not_a_mapping_is_located() -> None:
    found = errors("fleet: shop\n" + TAIL)
    assert found == [f"{PATH}:1:8: fleet: expected a mapping, got a string 'shop'"]


def test_the_instance_name_expands_variables_and_an_unset_one_refuses_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TURNOUT_TEST_POD", "edge-2")
    monkeypatch.delenv("TURNOUT_TEST_UNSET", raising=False)
    assert expand_instance("${TURNOUT_TEST_POD}") == "edge-2"
    assert expand_instance("x-${TURNOUT_TEST_POD}-y") == "x-edge-2-y"
    assert expand_instance(None)  # host name and pid
    with pytest.raises(ValueError, match="TURNOUT_TEST_UNSET is not set"):
        expand_instance("${TURNOUT_TEST_UNSET}")
    spec = parse_config(config(**GOOD, instance="${TURNOUT_TEST_UNSET}"), PATH)
    refusals = startup_refusals(spec, None)
    assert any("TURNOUT_TEST_UNSET is not set" in reason for reason in refusals), refusals
    spec = parse_config(config(**GOOD, instance="${TURNOUT_TEST_POD}"), PATH)
    assert startup_refusals(spec, None) == []


def test_admin_fleet_never_shows_the_password() -> None:
    """The view of a store that never connected: the URL without its password."""

    async def ignore(state: SavedState) -> None:
        return None

    store = FleetStore(
        Fleet(name="shop", redis="redis://:s3cret@10.0.0.5:6379/0", instance="a"),
        "a",
        on_document=ignore,
        seed=SavedState,
        heartbeat=lambda: Heartbeat(1, "", "", {}),
        counters=list,
    )
    view = store.view()
    assert view["redis"] == "redis://:***@10.0.0.5:6379/0"
    assert (view["connected"], view["leader"], view["epoch"], view["instances"]) == (
        False,
        None,
        0,
        [],
    )
