"""The upstream `protocol` key (contract section 11): http1 (default), h2c or h2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.config import ConfigError, parse_config, spec_to_dict
from proxy.core.spec import UPSTREAM_PROTOCOLS, UpstreamTls
from proxy.core.table import compile_table, diff_tables


def config(blue: str) -> str:
    return f"""
upstreams:
  blue: {blue}
  green: {{endpoints: [127.0.0.1:9002]}}
routes:
  - {{name: r, split: {{blue: 1, green: 1}}}}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml")
    return [str(issue) for issue in info.value.issues]


def test_default_is_http1_and_each_protocol_is_read() -> None:
    spec = parse_config(config("{endpoints: [127.0.0.1:9001]}"), "routes.yaml")
    assert spec.upstream("blue").protocol == "http1"
    for protocol in UPSTREAM_PROTOCOLS:
        text = config(f"{{endpoints: [127.0.0.1:9001], protocol: {protocol}}}")
        spec = parse_config(text, "routes.yaml")
        assert spec.upstream("blue").protocol == protocol
        upstreams = spec_to_dict(spec)["upstreams"]
        assert isinstance(upstreams, dict)
        assert upstreams["blue"]["protocol"] == protocol


@pytest.mark.parametrize("value", ["h3", "HTTP2", "http/1.1", "2", "true", "[h2]"])
def test_unknown_protocol_is_a_located_error(value: str) -> None:
    text = config(f"{{endpoints: [127.0.0.1:9001], protocol: {value}}}")
    found = errors(text)
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:3:49: upstreams.blue.protocol: "), found


@given(st.text(max_size=12).filter(lambda text: text not in UPSTREAM_PROTOCOLS))
def test_any_other_text_is_refused(value: str) -> None:
    text = config("{endpoints: [127.0.0.1:9001], protocol: " + repr(value) + "}")
    with pytest.raises(ConfigError):
        parse_config(text, "routes.yaml")


def test_h2_without_tls_uses_tls_with_the_system_trust_store() -> None:
    spec = parse_config(config("{endpoints: [127.0.0.1:9001], protocol: h2}"), "routes.yaml")
    blue = spec.upstream("blue")
    assert blue.tls is None
    assert blue.effective_tls == UpstreamTls()
    assert blue.effective_tls.verify
    h2c = parse_config(config("{endpoints: [127.0.0.1:9001], protocol: h2c}"), "routes.yaml")
    assert h2c.upstream("blue").effective_tls is None


def test_a_changed_protocol_is_a_changed_upstream() -> None:
    before = compile_table(
        parse_config(config("{endpoints: [127.0.0.1:9001]}"), "routes.yaml"),
        generation=1,
        sha256="a",
    )
    after = compile_table(
        parse_config(config("{endpoints: [127.0.0.1:9001], protocol: h2c}"), "routes.yaml"),
        generation=2,
        sha256="b",
    )
    assert diff_tables(before, after).upstreams_changed == ("blue",)
