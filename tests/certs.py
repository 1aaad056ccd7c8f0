"""A throwaway PKI for TLS tests: a CA, a server certificate, trusted and rogue clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taskmux.devcerts import Pem, issue, pem


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the gateway does not trust
    dir: Path  # ca.pem, server.pem/.key and client.pem/.key, for settings and CLI flags


def make_pki(directory: Path) -> Pki:
    """A fresh PKI whose PEM files are written into `directory`."""
    ca = issue("taskmux test CA", None, ca=True)
    rogue_ca = issue("rogue CA", None, ca=True)
    pki = Pki(
        ca=pem(ca),
        server=pem(issue("localhost", ca, server=True)),
        client=pem(issue("client", ca, client=True)),
        rogue_client=pem(issue("rogue", rogue_ca, client=True)),
        dir=directory,
    )
    for name, data in [
        ("ca.pem", pki.ca.cert),
        ("server.pem", pki.server.cert),
        ("server.key", pki.server.key),
        ("client.pem", pki.client.cert),
        ("client.key", pki.client.key),
    ]:
        (directory / name).write_bytes(data)
    return pki
