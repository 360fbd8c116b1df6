"""TLS in the config (contract section 10): the `listen` list form and upstream `tls`."""

from __future__ import annotations

import pytest
import yaml

from proxy.core.config import ConfigError, parse_config, spec_to_dict, summary
from proxy.core.spec import CertificateFiles, Listener, ListenerTls, UpstreamTls

TAIL = """
upstreams:
  blue: {endpoints: [127.0.0.1:9001]}
routes:
  - {name: r, split: {blue: 1}}
"""


def parse(listen: str) -> object:
    return parse_config(listen + TAIL, "/etc/turnout/routes.yaml")


def errors(listen: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(listen)
    return [str(issue) for issue in info.value.issues]


def test_string_form_is_one_plain_listener() -> None:
    spec = parse_config("listen: 127.0.0.1:8080\n" + TAIL, "/x/routes.yaml")
    assert spec.listeners == ()
    assert spec.all_listeners() == (Listener("127.0.0.1", 8080),)
    assert spec_to_dict(spec)["listen"] == "127.0.0.1:8080"


def test_list_form_with_tls_resolves_paths_against_the_config_folder() -> None:
    spec = parse_config(
        """
listen:
  - address: 0.0.0.0:8080
  - address: "[::]:8443"
    tls:
      certificates:
        - {cert: certs/api.pem, key: certs/api.key}
        - {cert: /abs/www.pem, key: /abs/www.key}
      min_version: "1.3"
      client_ca: ../ca.pem
"""
        + TAIL,
        "/etc/turnout/routes.yaml",
    )
    assert spec.listen == ("0.0.0.0", 8080)
    assert spec.listeners == (
        Listener("0.0.0.0", 8080),
        Listener(
            "::",
            8443,
            ListenerTls(
                certificates=(
                    CertificateFiles("/etc/turnout/certs/api.pem", "/etc/turnout/certs/api.key"),
                    CertificateFiles("/abs/www.pem", "/abs/www.key"),
                ),
                min_version="1.3",
                client_ca="/etc/ca.pem",
            ),
        ),
    )
    assert "[::]:8443 (TLS, 2 certificates)" in summary(spec, "routes.yaml")
    # Dumped and read back: the same spec.
    dumped = yaml.safe_dump(spec_to_dict(spec))
    assert parse_config(dumped, "/etc/turnout/routes.yaml") == spec


def test_unquoted_min_version_reads_as_written() -> None:
    spec = parse(
        "listen:\n  - address: 127.0.0.1:8443\n    tls:\n      min_version: 1.2\n"
        "      certificates: [{cert: a.pem, key: a.key}]\n"
    )
    assert spec.listeners[0].tls is not None  # type: ignore[attr-defined]
    assert spec.listeners[0].tls.min_version == "1.2"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("listen: []\n", "routes.yaml:1:9: listen: at least one listener is required"),
        (
            "listen:\n  - {address: 127.0.0.1:8443, tls: {min_version: '1.1', certificates: "
            "[{cert: a.pem, key: a.key}]}}\n",
            "listen[0].tls.min_version: bad TLS version '1.1'",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:8443, tls: {certificates: []}}\n",
            "listen[0].tls.certificates: at least one certificate is required",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:8443, tls: {}}\n",
            "listen[0].tls: missing required key 'certificates'",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:8443, tls: {certificates: [{cert: a.pem}]}}\n",
            "listen[0].tls.certificates[0]: missing required key 'key'",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:8443, tls: {certificates: [{cert: a.pem, key: "
            "b/}]}}\n",
            "listen[0].tls.certificates[0].key: 'b/' names a folder",
        ),
        (
            "listen:\n  - {address: 0.0.0.0:8443}\n  - {address: 127.0.0.1:8443}\n",
            "listen[1].address: '127.0.0.1:8443' overlaps listener '0.0.0.0:8443'",
        ),
        ("listen:\n  - {port: 8443}\n", "listen[0].port: unknown key 'port'"),
        ("listen:\n  - {address: nope}\n", "listen[0].address: bad address 'nope'"),
        (
            "admin: 127.0.0.1:8443\nlisten:\n  - {address: 127.0.0.1:8080}\n"
            "  - {address: 127.0.0.1:8443}\n",
            "admin: must not be the same address as listen",
        ),
    ],
)
def test_list_form_errors_are_located(listen: str, expected: str) -> None:
    found = errors(listen)
    assert any(expected in line for line in found), found


def upstream_tls(block: str) -> str:
    return f"""
upstreams:
  blue:
    endpoints: [10.0.0.1:8443]
    tls: {block}
routes:
  - {{name: r, split: {{blue: 1}}}}
"""


def test_upstream_tls_defaults_and_round_trip() -> None:
    spec = parse_config(upstream_tls("{}"), "/etc/turnout/routes.yaml")
    assert spec.upstreams[0].tls == UpstreamTls()
    full = parse_config(
        upstream_tls(
            "{ca: ca.pem, server_name: Blue.Internal, cert: c.pem, key: c.key, verify: false}"
        ),
        "/etc/turnout/routes.yaml",
    )
    assert full.upstreams[0].tls == UpstreamTls(
        ca="/etc/turnout/ca.pem",
        server_name="blue.internal",
        cert="/etc/turnout/c.pem",
        key="/etc/turnout/c.key",
        verify=False,
    )
    dumped = yaml.safe_dump(spec_to_dict(full))
    assert parse_config(dumped, "/etc/turnout/routes.yaml") == full


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("{cert: c.pem}", "upstreams.blue.tls.cert: needs 'key' too"),
        ("{key: c.key}", "upstreams.blue.tls.key: needs 'cert' too"),
        ("{verify: maybe}", "upstreams.blue.tls.verify:"),
        ("{server_name: 'bad name'}", "upstreams.blue.tls.server_name: bad host name"),
        ("{sni: x}", "upstreams.blue.tls.sni: unknown key 'sni'"),
    ],
)
def test_upstream_tls_errors_are_located(block: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(upstream_tls(block), "/etc/turnout/routes.yaml")
    found = [str(issue) for issue in info.value.issues]
    assert any(expected in line for line in found), found
