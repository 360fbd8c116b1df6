"""Certificates made at test time with `trustme`: a CA and PEM files for Turnout to serve."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trustme


@dataclass(frozen=True)
class PemPair:
    """A certificate chain and its key, written as PEM files."""

    cert: Path
    key: Path

    def config(self) -> dict[str, str]:
        """The `{cert, key}` entry of a listener's `tls.certificates`."""
        return {"cert": str(self.cert), "key": str(self.key)}


def write_pair(
    ca: trustme.CA, folder: Path, name: str, *hosts: str, not_after: datetime | None = None
) -> PemPair:
    """Issue a certificate for `hosts` from `ca` and write `name`.pem / `name`.key in `folder`.

    `not_after`: the certificate's expiry (trustme's default, far away, when None).
    """
    issued = ca.issue_cert(*hosts, not_after=not_after)
    pair = PemPair(folder / f"{name}.pem", folder / f"{name}.key")
    pair.key.write_bytes(issued.private_key_pem.bytes())
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return pair


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as a PEM file (for clients, `client_ca` and upstream `ca`)."""
    path.write_bytes(ca.cert_pem.bytes())
    return path
