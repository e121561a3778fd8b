"""C-ECHO SCU: `migraine-node echo AE@HOST:PORT` checks a peer."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.errors import PeerError

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    match = _PEER.match(text.strip())
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise PeerError(f"expected AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242), got {text!r}")
    return Peer(match["ae"], match["host"].strip("[]"), int(match["port"]))


def c_echo(peer: Peer, calling_ae_title: str, timeout: float = 10.0) -> float:
    """C-ECHO `peer`; returns round-trip milliseconds or raises PeerError."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if assoc.is_rejected:
        raise PeerError(f"{peer} rejected the association (check the AE titles the peer accepts)")
    if not assoc.is_established:
        raise PeerError(f"{peer} not reachable (connection refused, timed out or aborted)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.get("Status") != 0:
        raise PeerError(f"{peer} answered C-ECHO with status {status.get('Status') if status else 'none'}")
    return (time.perf_counter() - started) * 1000
