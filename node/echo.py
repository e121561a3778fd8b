"""Connectivity checks: `migraine-node echo AE@HOST:PORT|DESTINATION` checks a peer.

AE@HOST:PORT, or a [[destinations]] name given by ae_title/host/port, gets a C-ECHO;
a destination given by a DICOMweb url gets an authenticated QIDO-RS
`GET <url>/studies?limit=1`, which must answer 200 or 204.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination
from node.dimse_tuning import node_ae
from node.errors import PeerError
from node.tls import failure as tls_failure
from node.tls import tls_args

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


def c_echo(peer: Peer, calling_ae_title: str, timeout: float = 10.0, tls: tuple | None = None) -> float:
    """C-ECHO `peer` (over DICOM TLS with `tls`, node/tls.py's tls_args); round-trip milliseconds or PeerError."""
    ae = node_ae(calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    if assoc.is_rejected:
        raise PeerError(f"{peer} rejected the association (check the AE titles the peer accepts)")
    if not assoc.is_established:
        failed = tls_failure(tls[0]) if tls else None
        if failed:
            raise PeerError(f"{peer}: {failed[1]}")
        raise PeerError(f"{peer} not reachable (connection refused, timed out or aborted)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.get("Status") != 0:
        raise PeerError(f"{peer} answered C-ECHO with status {status.get('Status') if status else 'none'}")
    return (time.perf_counter() - started) * 1000


def dicomweb_echo(destination: Destination, timeout: float = 10.0) -> float:
    """QIDO-RS `GET <url>/studies?limit=1` with the destination's credentials; milliseconds or PeerError.

    A missing credentials variable raises dicomweb.CredentialsError (a ConfigError naming the variable).
    """
    from node import dicomweb

    where = dicomweb.where(destination)
    with dicomweb.DicomWebClient(destination, timeout) as client:
        try:
            return client.probe()
        except dicomweb.TransportError as exc:
            raise PeerError(str(exc)) from None
        except dicomweb.HttpError as exc:
            hint = ""
            if exc.status in (401, 403):
                hint = (f" (check the credentials in ${destination.credentials_env})" if destination.credentials_env
                        else " (the destination wants credentials: set auth and credentials_env)")
            raise PeerError(f"QIDO-RS to {where} answered {exc}{hint}") from None


@dataclass(frozen=True)
class EchoResult:
    what: str  # "C-ECHO ORTHANC@127.0.0.1:4242", "QIDO-RS pacs (http://pacs:8042/dicom-web)"
    ms: float
    dimse: bool  # a C-ECHO (the calling AE title matters), else an HTTP request


def echo(target: str, destinations: Sequence[Destination], calling_ae_title: str, timeout: float = 10.0) -> EchoResult:
    """Check `target`: the name of one of `destinations`, or AE@HOST:PORT."""
    destination = next((d for d in destinations if d.name == target.strip()), None)
    if destination is None and "@" not in target:
        names = ", ".join(d.name for d in destinations) or "none configured"
        raise PeerError(f"expected AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242) or a [[destinations]] name "
                        f"(known: {names}), got {target!r}")
    if destination is not None and destination.is_dicomweb:
        from node.dicomweb import where

        return EchoResult(f"QIDO-RS {where(destination)}", dicomweb_echo(destination, timeout), False)
    tls = None
    if destination is not None:
        peer = Peer(destination.ae_title or "", destination.host or "", destination.port or 0)
        tls = tls_args(destination)  # ConfigError when its key or certificate cannot be used
    else:
        peer = parse_peer(target)
    what = f"C-ECHO {peer}" + (" over TLS" if tls else "")
    return EchoResult(what, c_echo(peer, calling_ae_title, timeout=timeout, tls=tls), True)
