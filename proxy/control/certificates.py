"""The TLS listeners' certificates as the supervisor keeps them: read, checked, renewed.

The listeners are bound at start (static), so their set is fixed; their files are not. The
supervisor reads the files' bytes and sends them to the workers (a worker never reads a renewed
file half-written), loads them to know their names and expiry (/admin/config, /metrics, the
expiry warning), and looks for renewed files every CERT_POLL seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy.core.spec import ConfigSpec, Listener
from proxy.runtime.channel import certs_message
from proxy.runtime.tls import (
    ListenerMaterial,
    LoadedCertificate,
    TlsFileError,
    expiry_warnings,
    load_listener,
    load_material,
    material_problems,
    read_material,
)

# The supervisor's logger: certificate events are its log lines, as they were before the split.
log = logging.getLogger("turnout.supervisor")

# Certificate renewal: the TLS listeners' files are read every CERT_POLL seconds; changed bytes
# are taken once they read the same SETTLE seconds later (a renewal writes the certificate and
# the key one after the other), so a renewed pair is served within about 1 s (contract: 2 s).
CERT_POLL = 0.5
SETTLE = 0.3
# A certificate that expires within this long is logged at every load.
EXPIRY_WARNING = 14 * 86400.0


def certificate_warnings(spec: ConfigSpec) -> list[str]:
    """Listener certificates that expire within 14 days or have expired (files already checked)."""
    warnings: list[str] = []
    now = time.time()
    for listener in spec.listeners:
        if listener.tls is not None:
            try:
                loaded = load_listener(listener.address, listener.tls)
            except TlsFileError:
                continue  # changed since the check; `validate` reports what it checked
            warnings += expiry_warnings(listener.address, loaded, now, EXPIRY_WARNING)
    return warnings


class Certificates:
    """The certificates in force on the TLS listeners of `listeners`, and their renewal.

    `on_renewed` gets the `certs` message of a renewal (for every worker); `on_outcome` is
    told whether a renewal was taken (True) or refused (False): both count as reloads.
    """

    def __init__(
        self,
        listeners: tuple[Listener, ...],
        *,
        on_renewed: Callable[[dict[str, object]], None],
        on_outcome: Callable[[bool], None],
    ) -> None:
        self._listeners = [(i, x) for i, x in enumerate(listeners) if x.tls is not None]
        self._on_renewed = on_renewed
        self._on_outcome = on_outcome
        # In force: as bytes (what workers load) and loaded (names, expiry).
        self._material: tuple[ListenerMaterial, ...] = ()
        self.loaded: dict[str, list[LoadedCertificate]] = {}
        self._generation = 0
        # Why the files on disk are not in force (shown in /admin/config until they are good).
        self.error: str | None = None
        self._failed: tuple[ListenerMaterial, ...] | None = None
        if self._listeners:
            material = self._read()
            try:
                self._install(material, self._load(material))
            except TlsFileError as exc:
                # Changed since load_config checked them: the workers read the files themselves.
                log.error("TLS certificates: %s", exc)

    @property
    def watched(self) -> bool:
        """Some listener has TLS: there are files to watch."""
        return bool(self._listeners)

    def message(self) -> dict[str, object] | None:
        """The `certs` message a new worker needs before its first table (None: no material)."""
        if not self._material:
            return None
        return certs_message(self._generation, self._material)

    def expiry(self) -> dict[tuple[str, str], float]:
        """(listener, first name) -> not_after, for /metrics."""
        return {
            (listener, cert.names[0]): cert.not_after
            for listener, certs in self.loaded.items()
            for cert in certs
        }

    def _read(self) -> tuple[ListenerMaterial, ...]:
        """The bytes of every TLS listener's files (TlsFileError naming an unreadable one)."""
        return tuple(
            read_material(listener.address, listener.tls)
            for _, listener in self._listeners
            if listener.tls is not None
        )

    def _load(self, material: tuple[ListenerMaterial, ...]) -> dict[str, list[LoadedCertificate]]:
        return {
            listener.address: load_material(listener.tls, pem)
            for (_, listener), pem in zip(self._listeners, material, strict=True)
            if listener.tls is not None
        }

    def _install(
        self, material: tuple[ListenerMaterial, ...], loaded: dict[str, list[LoadedCertificate]]
    ) -> None:
        self._material = material
        self.loaded = loaded
        self.warn_expiring()

    def warn_expiring(self) -> None:
        """Log every certificate in force that expires within EXPIRY_WARNING."""
        now = time.time()
        for listener, certs in self.loaded.items():
            for line in expiry_warnings(listener, certs, now, EXPIRY_WARNING):
                log.warning("%s", line)

    async def watch(self) -> None:
        """Look for renewed certificate files every CERT_POLL seconds, until cancelled."""
        while True:
            await asyncio.sleep(CERT_POLL)
            await self.check()

    async def check(self) -> bool:
        """Take renewed certificate files into use when they pass the checks; True if taken.

        A pair that fails (unreadable, not PEM, key not matching, no names) keeps the old one
        in force: logged, counted as a reload failure, shown in /admin/config until the files
        are good again.
        """
        try:
            material = await asyncio.to_thread(self._read)
        except TlsFileError as exc:
            material = None
            error = str(exc)
        if material is not None:
            if material == self._material:
                self._failed = None
                self.error = None
                return False
            if material == self._failed:
                return False  # already reported
            # Wait for the writes of a renewal to settle: the key may lag the certificate.
            await asyncio.sleep(SETTLE)
            try:
                again = await asyncio.to_thread(self._read)
            except TlsFileError:
                return False  # still moving: the next look decides
            if again != material:
                return False
            problems = [
                problem
                for (index, listener), pem in zip(self._listeners, material, strict=True)
                if listener.tls is not None
                for problem in await asyncio.to_thread(material_problems, index, listener.tls, pem)
            ]
            if not problems:
                loaded = await asyncio.to_thread(self._load, material)
                self._failed = None
                self.error = None
                self._generation += 1
                self._install(material, loaded)
                self._on_outcome(True)
                self._on_renewed(certs_message(self._generation, material))
                log.info(
                    "certificates renewed (certificate generation %d): %s",
                    self._generation,
                    "; ".join(
                        f"{listener}: {', '.join(c.names[0] for c in certs)}"
                        for listener, certs in loaded.items()
                    ),
                )
                return True
            error = "; ".join(problems)
            self._failed = material
        elif self.error is not None:
            return False  # the same unreadable state, already reported
        self.error = f"certificate renewal refused, the old certificates stay: {error}"
        self._on_outcome(False)
        log.error("%s", self.error)
        return False
