"""The config's shape is written once (proxy.core.schema) and everything else follows from it.

These tests fail when the description, the spec dataclasses, the checker, the dump, the JSON
Schema file and the docs drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from proxy.core.config import ConfigError, _Checker, parse_config, spec_to_dict
from proxy.core.schema import SECTIONS, TOP, Kind, Section, json_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "turnout.schema.json"
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class _Yaml12Loader(yaml.SafeLoader):
    """Booleans as YAML 1.2 (and editors) read them: `on: rollback` has the key "on"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    loader = _Yaml12Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json_schema())


# A file that uses every key of every section (the one-of keys across two entries).
FULL: dict[str, Any] = {
    "listen": [
        {"address": "0.0.0.0:8080"},
        {
            "address": "0.0.0.0:8443",
            "tls": {
                "certificates": [{"cert": "certs/a.pem", "key": "certs/a.key"}],
                "min_version": "1.3",
                "client_ca": "certs/ca.pem",
            },
        },
    ],
    "admin": "127.0.0.1:9901",
    "workers": "auto",
    "state_file": "turnout.state.json",
    "via": "edge-1",
    "timeouts": {"connect": "1s", "response": "10s", "idle": "1m", "client_keepalive": "75s"},
    "limits": {
        "max_request_body": "1MiB",
        "max_connections": 100,
        "max_header_size": 8192,
        "max_headers": 50,
        "max_concurrent_streams": 50,
    },
    "drain": {"reload": "5s", "shutdown": "5s", "delay": 0},
    "annotations": {"grafana": "https://grafana.example.com/", "timeout": "2s"},
    "fleet": {
        "name": "checkout",
        "redis": "redis://10.0.0.5:6379/0",
        "instance": "${HOSTNAME}",
        "lease": "10s",
    },
    "upstreams": {
        "blue": {
            "endpoints": ["10.0.0.1:8000", "[fd00::1]:8000"],
            "health": {
                "path": "/healthz",
                "interval": "2s",
                "timeout": "1s",
                "unhealthy_after": 3,
                "healthy_after": 2,
            },
            "tls": {
                "ca": "ca.pem",
                "server_name": "blue.internal",
                "cert": "c.pem",
                "key": "c.key",
                "verify": True,
            },
            "protocol": "h2",
        },
        "canary": {"endpoints": ["10.0.0.2:8000"]},
        "shadow": {"endpoints": ["10.0.0.3:8000"]},
    },
    "routes": [
        {
            "name": "api",
            "match": {"host": "api.example.com", "path_prefix": "/api"},
            "overrides": [
                {"header": "x-canary", "value": "true", "to": "canary"},
                {"cookie": "release", "to": "canary"},
            ],
            "split": {"blue": 90, "canary": 10},
            "sticky": {"header": "x-user"},
            "mirror": {
                "to": "shadow",
                "percent": 5,
                "max_body": "64KiB",
                "methods": ["GET", "POST"],
                "max_in_flight": 10,
                "timeout": "2s",
                "compare_json": True,
                "ignore_fields": ["meta.request_id"],
            },
            "retries": 1,
            "rollout": {
                "baseline": "blue",
                "canary": "canary",
                "steps": [10, 50, 100],
                "interval": "1m",
                "min_requests": 20,
                "max_error_rate": 0.02,
                "max_p99": "300ms",
                "confidence": 0.95,
                "check": "10s",
                "webhooks": [
                    {"on": "rollback", "url": "https://hooks.example.com/x", "timeout": "3s"}
                ],
            },
        },
        {"name": "web", "split": {"blue": 1}, "sticky": {"cookie": "sid", "set": True}},
    ],
}


def occurrences(section: Section[Any], data: Any) -> Iterator[tuple[Section[Any], dict[str, Any]]]:
    """Every mapping of `data` with the section it is, walking by the description."""
    if not isinstance(data, dict):
        return
    yield section, data
    for key in section.keys:
        value = data.get(key.name)
        if value is None or key.section is None:
            continue
        if key.kind is Kind.UPSTREAMS:
            for body in value.values():
                yield from occurrences(key.section, body)
        elif isinstance(value, list):
            for element in value:
                yield from occurrences(key.section, element)
        else:
            yield from occurrences(key.section, value)


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


# ---- the description and the dataclasses ---------------------------------------------------


@pytest.mark.parametrize("section", SECTIONS, ids=[section.name for section in SECTIONS])
def test_every_dataclass_field_has_a_key_and_every_key_a_field(section: Section[Any]) -> None:
    names = [item.name for item in fields(section.spec)]
    filled = {key.attr for key in section.keys if key.attr in names}
    assert filled.isdisjoint(section.derived)
    assert filled | set(section.derived) == set(names)
    # A key that fills no field of its own dumps from an attribute of the same name.
    for key in section.keys:
        assert key.attr in names or hasattr(section.spec, key.attr), key.name
    assert len(section.allowed) == len(set(section.allowed))
    assert set(section.one_of) <= set(section.allowed)
    assert {r.key for r in section.requires} | {r.needs for r in section.requires} <= set(
        section.allowed
    )


@pytest.mark.parametrize("section", SECTIONS, ids=[section.name for section in SECTIONS])
def test_required_keys_are_the_fields_without_a_default(section: Section[Any]) -> None:
    for key in section.keys:
        if key.attr in section.field_names and key.kind is not Kind.SECTION:
            has_default = section.default(key.attr) is not MISSING
            assert has_default != key.required, key.name


def test_every_section_is_reachable_from_the_top_and_listed() -> None:
    seen: set[str] = set()
    pending = [TOP]
    while pending:
        section = pending.pop()
        seen.add(section.name)
        pending.extend(k.section for k in section.keys if k.section and k.section.name not in seen)
    assert seen == {section.name for section in SECTIONS}
    assert len(SECTIONS) == len(seen)


def test_every_list_and_count_is_bounded() -> None:
    for section in SECTIONS:
        for key in section.keys:
            if key.kind in (Kind.SIZE, Kind.INT, Kind.WORKERS, Kind.SPLIT, Kind.STEPS):
                assert key.minimum is not None, key.name
                assert key.maximum is not None, key.name
            listy = key.kind in (Kind.SECTIONS, Kind.ROUTES, Kind.UPSTREAMS, Kind.LISTEN)
            if listy or key.kind in (Kind.ENDPOINTS, Kind.STEPS, Kind.METHODS, Kind.JSON_PATHS):
                assert key.max_items is not None, key.name
                assert key.noun, key.name


def test_every_kind_has_a_reader_and_a_json_schema() -> None:
    checker = _Checker("f.yaml", {})
    assert set(checker._read) == set(Kind)
    described = {key.kind for section in SECTIONS for key in section.keys}
    assert described == set(Kind), "a kind nothing uses"


# ---- the checker accepts exactly the described keys ----------------------------------------


def test_a_file_with_every_described_key_is_valid() -> None:
    used = {(s.name, name) for s, data in occurrences(TOP, FULL) for name in data}
    described = {(s.name, key.name) for s in SECTIONS for key in s.keys}
    assert used == described
    spec = parse_config(dump(FULL), "/etc/turnout/t.yaml")
    assert spec.fleet is not None
    assert spec.routes[1].sticky is not None
    assert spec.routes[1].sticky.set is True


@pytest.mark.parametrize("section", SECTIONS, ids=[section.name for section in SECTIONS])
def test_an_unknown_key_is_refused_naming_the_described_keys(section: Section[Any]) -> None:
    data = orjson.loads(orjson.dumps(FULL))
    target = next(found for s, found in occurrences(TOP, data) if s is section)
    target["zzz"] = 1
    with pytest.raises(ConfigError) as caught:
        parse_config(dump(data), "/etc/turnout/t.yaml")
    messages = [issue.message for issue in caught.value.issues]
    assert messages == [f"unknown key 'zzz' (allowed: {', '.join(section.allowed)})"]


@pytest.mark.parametrize(
    ("section", "key"),
    [(s, k.name) for s in SECTIONS for k in s.keys if k.required],
    ids=[f"{s.name}.{k.name}" for s in SECTIONS for k in s.keys if k.required],
)
def test_every_required_key_is_required(section: Section[Any], key: str) -> None:
    data = orjson.loads(orjson.dumps(FULL))
    target = next(found for s, found in occurrences(TOP, data) if s is section)
    del target[key]
    with pytest.raises(ConfigError) as caught:
        parse_config(dump(data), "/etc/turnout/t.yaml")
    assert f"missing required key '{key}'" in [issue.message for issue in caught.value.issues]


# ---- defaults and the dump ------------------------------------------------------------------


def test_the_dump_shows_the_dataclass_defaults_as_the_json_schema_does() -> None:
    minimal: dict[str, Any] = {
        "upstreams": {"blue": {"endpoints": ["127.0.0.1:2"]}},
        "routes": [FULL["routes"][1]],
    }
    out = spec_to_dict(parse_config(dump(minimal), "/etc/turnout/t.yaml"))
    properties = json_schema()["properties"]
    assert isinstance(properties, dict)
    defs = json_schema()["$defs"]
    assert isinstance(defs, dict)
    for name in ("listen", "admin", "workers"):
        assert out[name] == properties[name]["default"]
    for name in ("timeouts", "limits", "drain"):
        section = defs[name]["properties"]
        assert out[name] == {key: value["default"] for key, value in section.items()}
    route = out["routes"]
    assert isinstance(route, list)
    assert route[0]["retries"] == defs["route"]["properties"]["retries"]["default"]


def test_the_dump_follows_the_description_order() -> None:
    out = spec_to_dict(parse_config(dump(FULL), "/etc/turnout/t.yaml"))
    assert list(out) == [name for name in TOP.allowed if name in out]
    for section, data in occurrences(TOP, out):
        assert list(data) == [name for name in section.allowed if name in data]


# ---- the JSON Schema file ------------------------------------------------------------------


def test_the_committed_json_schema_is_the_generated_one() -> None:
    generated = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n"
    assert SCHEMA_FILE.read_bytes() == generated, (
        "docs/turnout.schema.json is stale: python -m proxy.core.schema > docs/turnout.schema.json"
    )


def test_the_json_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())
    assert json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_validates_and_names_the_schema(
    path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../docs/turnout.schema.json"
    errors = [error.message for error in validator.iter_errors(load_yaml(text))]
    assert errors == []


def test_the_full_file_validates(validator: jsonschema.Draft202012Validator) -> None:
    assert [error.message for error in validator.iter_errors(FULL)] == []


def docs_configs() -> list[tuple[str, str]]:
    """Every ```yaml block in docs/ that is a whole routing table Turnout accepts."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
        for index, block in enumerate(blocks):
            try:
                data = load_yaml(block)
                parse_config(block, "/etc/turnout/routes.yaml")
            except (yaml.YAMLError, ConfigError):
                continue
            if isinstance(data, dict) and "routes" in data:
                found.append((f"{doc.name}#{index}", block))
    return found


DOCS_CONFIGS = docs_configs()


def test_the_docs_have_whole_configs() -> None:
    assert len(DOCS_CONFIGS) >= 3


@pytest.mark.parametrize(("where", "block"), DOCS_CONFIGS, ids=[w for w, _ in DOCS_CONFIGS])
def test_every_valid_config_in_the_docs_validates(
    where: str, block: str, validator: jsonschema.Draft202012Validator
) -> None:
    assert [error.message for error in validator.iter_errors(load_yaml(block))] == []


BASE = "upstreams:\n  blue: {endpoints: [127.0.0.1:9001]}\nroutes:\n  - name: web\n"


@pytest.mark.parametrize(
    "text",
    [
        BASE + "    split: {blue: 1}\n    retrys: 3\n",  # unknown key
        BASE + "    split: {blue: 1}\ntimeouts: {connect: 2}\n",  # a bare number
        BASE + "    split: {blue: 1}\ntimeouts: {connect: 2sec}\n",
        BASE + "    split: {blue: -1}\n",
        BASE + "    split: {blue: 1}\n    retries: 11\n",
        BASE + "    split: {blue: 1}\n    sticky: {header: x-user, cookie: sid}\n",
        BASE + "    split: {blue: 1}\n    sticky: {header: x-user, set: true}\n",
        BASE + "    split: {blue: 1}\n    mirror: {to: blue, methods: [get]}\n",
        BASE + "    split: {blue: 1}\n    rollout: {baseline: blue, canary: x, steps: [0, 50]}\n",
        BASE + "    split: {blue: 1}\nlimits: {max_request_body: 1MB}\n",
        BASE + "    split: {blue: 1}\nworkers: 0\n",
        BASE + "    split: {blue: 1}\nlisten: localhost\n",
        BASE.replace("name: web", "name: Web") + "    split: {blue: 1}\n",
        BASE + "    split: {blue: 1}\nupstreams2: {}\n",
        BASE.replace("routes:\n  - name: web\n", "routes: []\n"),
        "upstreams:\n  blue: {endpoints: [127.0.0.1:9001], tls: {cert: c.pem}}\n"
        "routes:\n  - {name: web, split: {blue: 1}}\n",
        BASE + "    split: {blue: 1}\n    overrides: [{to: blue}]\n",
        BASE + "    split: {blue: 1}\nfleet: {name: f, redis: 'http://x'}\n",
    ],
)
def test_known_bad_files_are_refused_by_both(
    text: str, validator: jsonschema.Draft202012Validator
) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, "f.yaml")
    assert list(validator.iter_errors(load_yaml(text))) != []


def test_the_good_base_is_accepted_by_both(validator: jsonschema.Draft202012Validator) -> None:
    text = BASE + "    split: {blue: 1}\n"
    parse_config(text, "f.yaml")
    assert list(validator.iter_errors(load_yaml(text))) == []


# ---- the docs ------------------------------------------------------------------------------


def test_docs_config_md_names_every_key() -> None:
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [
        f"{section.name}.{key.name}"
        for section in SECTIONS
        for key in section.keys
        # `key`, or `parent.key` as in `tls.certificates`
        if not re.search(rf"`(?:[a-z_]+\.)?{key.name}`", text)
    ]
    assert missing == []
    assert "turnout.schema.json" in text
