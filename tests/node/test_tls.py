"""DICOM TLS (issue 11): the node's TLS port, and export, C-ECHO and retrieval to TLS destinations.

The tests make their own two CAs and certificates with the openssl CLI; the senders are real DCMTK
storescu/echoscu (+tls) and pynetdicom, the TLS-only PACS a real DCMTK storescp (+tls).
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.config import Destination, DestinationTls, ExportSection, NodeTls
from node.errors import ConfigError, PeerError
from node.scp import NodeAssociationServer
from tests.peers import DCMTK_ENV, NODE_AE, STORESCU, free_port, wait_until

STORESCP = "/usr/bin/storescp"


# ---- a small PKI: two CAs, the node's/PACS's certificate, a trusted and an untrusted client -------------------

@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from the other CA
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(root: Path, name: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(root: Path, name: str, ca: tuple[Path, Path], *extensions: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    ext_args = [arg for ext in ("basicConstraints=critical,CA:FALSE", *extensions) for arg in ("-addext", ext)]
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-CA", str(ca[0]), "-CAkey", str(ca[1]), *ext_args)
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = _make_ca(root, "test-ca"), _make_ca(root, "other-ca")
    server = _make_leaf(root, "localhost", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "extendedKeyUsage=serverAuth,clientAuth")
    client = _make_leaf(root, "scanner", ca, "extendedKeyUsage=clientAuth")
    stranger = _make_leaf(root, "stranger", other, "extendedKeyUsage=clientAuth")
    return Pki(root, ca[0], other[0], *server, *client, *stranger)


@pytest.fixture(scope="module")
def mr_file(tmp_path_factory) -> Path:
    from model.synth import write_series

    out = tmp_path_factory.mktemp("mr")
    write_series(out, slices=2, rows=16, columns=16, spacing=4.0, seed=3)
    return min(out.iterdir())


@pytest.fixture
def tls_node(in_process_node, pki):
    """The node with [node.tls] on a free port: client certificates from test-ca required unless overridden."""
    def make(**tls):
        section = {"enabled": True, "port": free_port(), "certificate": str(pki.server_cert),
                   "private_key": str(pki.server_key), "ca_bundle": str(pki.ca), "require_client_certificate": True,
                   **tls}
        return in_process_node(node={"tls": section})

    return make


@pytest.fixture
def scp_log(caplog):
    caplog.set_level(logging.DEBUG, logger="node.scp")
    return caplog


def tls_storescu(path: Path, port: int, pki: Pki, identity: str = "client") -> subprocess.CompletedProcess:
    """DCMTK storescu over TLS, verifying the node's certificate against test-ca; `identity`: client,
    stranger (a certificate of the other CA), none (anonymous TLS) or plain (no TLS)."""
    tls = {"client": ("+tls", str(pki.client_key), str(pki.client_cert)),
           "stranger": ("+tls", str(pki.stranger_key), str(pki.stranger_cert)),
           "none": ("+tla",), "plain": ()}[identity]
    ca = ("+cf", str(pki.ca)) if tls else ()
    return subprocess.run([STORESCU, *tls, *ca, "-aet", "SCANNER", "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)


def refusal_logged(caplog, reason: str) -> bool:
    return any(r.name == "node.scp" and "TLS connection from 127.0.0.1 refused" in r.getMessage()
               and reason in r.getMessage() for r in caplog.records)


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].rsplit(":", 1)[1] == f"{port:04X}" and fields[3] == "0A":
                return True
    return False


# ---- the SCP's TLS port ---------------------------------------------------------------------------------------

def test_tls_sender_with_trusted_certificate_is_stored_and_plain_port_stays_open(tls_node, pki, mr_file, scp_log):
    svc = tls_node()
    assert svc.tls_port and svc.port and svc.tls_port != svc.port
    result = tls_storescu(mr_file, svc.tls_port, pki)
    assert result.returncode == 0, result.stderr
    assert svc.store.count_instances() == 1
    # plain = true (the default): the plain port serves plain DICOM beside the TLS port.
    result = tls_storescu(mr_file, svc.port, pki, identity="plain")
    assert result.returncode == 0, result.stderr
    # Plain DICOM on the TLS port: no association, and the node says why.
    result = tls_storescu(mr_file, svc.tls_port, pki, identity="plain")
    assert result.returncode != 0
    wait_until(lambda: refusal_logged(scp_log, "not TLS"), timeout=10, what="the plain sender's refusal logged")


def test_client_without_certificate_refused_when_required(tls_node, pki, mr_file, scp_log):
    svc = tls_node()
    result = tls_storescu(mr_file, svc.tls_port, pki, identity="none")
    assert result.returncode != 0
    wait_until(lambda: refusal_logged(scp_log, "no client certificate"), timeout=10, what="refusal logged")
    assert svc.store.count_instances() == 0


def test_client_without_certificate_accepted_when_not_required(tls_node, pki, mr_file):
    svc = tls_node(require_client_certificate=False)
    result = tls_storescu(mr_file, svc.tls_port, pki, identity="none")
    assert result.returncode == 0, result.stderr
    assert svc.store.count_instances() == 1


@pytest.mark.parametrize("required", [True, False])
def test_untrusted_client_certificate_is_refused(tls_node, pki, mr_file, scp_log, required):
    """A certificate from another CA is refused, also when none is required (one that is offered is verified)."""
    svc = tls_node(require_client_certificate=required)
    result = tls_storescu(mr_file, svc.tls_port, pki, identity="stranger")
    assert result.returncode != 0
    wait_until(lambda: refusal_logged(scp_log, "certificate not trusted"), timeout=10, what="refusal logged")
    assert svc.store.count_instances() == 0


def test_tls_only_node_has_no_plain_port(tls_node, pki, mr_file):
    svc = tls_node(plain=False)
    assert svc.port is None and svc.tls_port
    plain_port = svc.settings.node.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", plain_port), timeout=5).close()
    result = tls_storescu(mr_file, svc.tls_port, pki)
    assert result.returncode == 0, result.stderr
    assert svc.store.count_instances() == 1


def test_stalled_client_on_the_tls_port_does_not_block_a_tls_sender(tls_node, pki, mr_file, scp_log, monkeypatch):
    monkeypatch.setattr(NodeAssociationServer, "handshake_seconds", 120.0)
    svc = tls_node()
    # Connects and never says a word: stock pynetdicom would wait for its handshake on the accepting thread.
    with socket.create_connection(("127.0.0.1", svc.tls_port), timeout=30) as stalled:
        result = tls_storescu(mr_file, svc.tls_port, pki)
        assert result.returncode == 0, result.stderr
        assert svc.store.count_instances() == 1
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):
            stalled.recv(1)  # still waiting for its handshake all along: the sender was served beside it
    wait_until(lambda: refusal_logged(scp_log, "closed the connection"), timeout=10, what="stalled client logged")

    # A client that stays silent is dropped after handshake_seconds.
    svc._tls_server.handshake_seconds = 0.5
    with socket.create_connection(("127.0.0.1", svc.tls_port), timeout=30) as silent:
        assert silent.recv(1) == b""  # closed by the node
    wait_until(lambda: refusal_logged(scp_log, "no TLS handshake within 0.5 s"), timeout=10, what="timeout logged")


def _handshake(port: int, pki: Pki, version: ssl.TLSVersion) -> None:
    """A TLS client of exactly `version` (no DICOM): raises ssl.SSLError when the node refuses it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs it to offer TLS 1.0/1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1 is deprecated
        context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost"):
        pass


def test_old_tls_versions_are_refused(tls_node, pki, scp_log):
    svc = tls_node(require_client_certificate=False)
    _handshake(svc.tls_port, pki, ssl.TLSVersion.TLSv1_2)  # the floor itself is accepted
    try:
        with pytest.raises(ssl.SSLError):
            _handshake(svc.tls_port, pki, ssl.TLSVersion.TLSv1_1)
    except ssl.SSLError as exc:  # pragma: no cover - the local OpenSSL cannot even offer TLS 1.1
        if "NO_PROTOCOLS_AVAILABLE" in str(exc):
            pytest.skip("this OpenSSL cannot make a TLS 1.1 client")
        raise
    wait_until(lambda: refusal_logged(scp_log, "TLS version below the minimum"), timeout=10, what="refusal logged")

    strict = tls_node(require_client_certificate=False, min_version="1.3")
    with pytest.raises(ssl.SSLError):
        _handshake(strict.tls_port, pki, ssl.TLSVersion.TLSv1_2)
    _handshake(strict.tls_port, pki, ssl.TLSVersion.TLSv1_3)


# ---- configuration errors name the key ------------------------------------------------------------------------

def test_unusable_key_or_certificate_is_a_config_error_naming_the_key(pki, tmp_path):
    from node.tls import client_context, server_context

    def node_tls(**files) -> NodeTls:
        return NodeTls(**{"enabled": True, "certificate": pki.server_cert, "private_key": pki.server_key, **files})

    with pytest.raises(ConfigError, match=r"\[node.tls\] private_key: .* is not the key of certificate"):
        server_context(node_tls(private_key=pki.client_key))
    with pytest.raises(ConfigError, match=r"\[node.tls\] certificate: .* holds no PEM certificate"):
        server_context(node_tls(certificate=pki.server_key))
    with pytest.raises(ConfigError, match=r"\[node.tls\] private_key: .* is not a PEM private key"):
        server_context(node_tls(private_key=pki.server_cert))
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    with pytest.raises(ConfigError, match=r"\[node.tls\] private_key: .* is encrypted"):
        server_context(node_tls(private_key=encrypted))
    with pytest.raises(ConfigError, match=r"\[node.tls\] ca_bundle: .* holds no PEM certificate"):
        server_context(node_tls(ca_bundle=pki.server_key))
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\] pacs tls private_key"):
        client_context(DestinationTls(ca_bundle=pki.ca, certificate=pki.client_cert, private_key=pki.server_key),
                       "[[destinations]] pacs tls")
    assert server_context(node_tls()).verify_mode == ssl.CERT_NONE  # no ca_bundle: no client certificates asked


# ---- C-ECHO and retrieval to a TLS destination (the node itself as the TLS peer) --------------------------------

def _to_node(svc, pki, name: str = "node-tls", **tls) -> Destination:
    settings = {"ca_bundle": pki.ca, "certificate": pki.client_cert, "private_key": pki.client_key, **tls}
    return Destination(name=name, ae_title=NODE_AE, host="127.0.0.1", port=svc.tls_port, tls=settings)


def test_echo_over_tls_by_destination_name(tls_node, pki):
    from node.echo import echo

    svc = tls_node()
    result = echo("node-tls", [_to_node(svc, pki)], "MIGRAINE_NODE", timeout=10)
    assert result.dimse and result.what.endswith("over TLS")
    # The node's certificate names localhost and 127.0.0.1; another name fails unless verify_hostname is off.
    assert echo("n", [_to_node(svc, pki, "n", server_name="localhost")], "MIGRAINE_NODE", timeout=10).dimse
    wrong = _to_node(svc, pki, "n", server_name="pacs.example.org")
    with pytest.raises(PeerError, match="not trusted.*[Hh]ostname mismatch"):
        echo("n", [wrong], "MIGRAINE_NODE", timeout=10)
    lax = _to_node(svc, pki, "n", server_name="pacs.example.org", verify_hostname=False)
    assert echo("n", [lax], "MIGRAINE_NODE", timeout=10).dimse
    # Without our certificate the node refuses us, and echo says so.
    anonymous = Destination(name="n", ae_title=NODE_AE, host="127.0.0.1", port=svc.tls_port, tls={"ca_bundle": pki.ca})
    with pytest.raises(PeerError, match="TLS"):
        echo("n", [anonymous], "MIGRAINE_NODE", timeout=10)


def test_retrieve_associates_over_tls(tls_node, pki):
    """C-GET and C-MOVE open their association with node/retrieve.py's _associate: over TLS for a TLS destination."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.dimse_tuning import node_ae
    from node.retrieve import _associate

    svc = tls_node()
    ae = node_ae("MIGRAINE_NODE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    assoc = _associate(ae, _to_node(svc, pki))
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    with pytest.raises(PeerError, match="not reachable: TLS: the peer's certificate is not trusted"):
        _associate(ae, _to_node(svc, pki, ca_bundle=pki.other_ca))


# ---- export to a TLS-only DCMTK storescp ------------------------------------------------------------------------

@contextmanager
def storescp_tls(pki: Pki, out_dir: Path, *peer_options: str) -> Iterator[int]:
    """DCMTK storescp as a TLS-only PACS (AE PACS) on a free port, stopped by its PID."""
    port = free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir.parent / f"storescp-{port}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out_dir), "+tls", str(pki.server_key),
                                 str(pki.server_cert), *peer_options, str(port)],
                                env=DCMTK_ENV, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, timeout=20, what="storescp listening")
        assert proc.poll() is None, log_path.read_text()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _tls_exporter(queue, port: int, **tls):
    from node.export import Exporter

    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=tls)
    return Exporter(queue, [destination], "MIGNODE", ExportSection(
        retry_initial_seconds=60, retry_max_seconds=60, max_attempts=5, timeout_seconds=10))


def test_export_to_tls_only_storescp(tmp_path, pki):
    from tests.node.test_worker_export import _pending_delivery

    store, queue = _pending_delivery(tmp_path)
    received = tmp_path / "pacs"
    # The PACS requires a client certificate from test-ca (DCMTK's -rc, verified against +cf).
    with storescp_tls(pki, received, "+cf", str(pki.ca), "-rc") as port:
        exporter = _tls_exporter(queue, port, ca_bundle=pki.ca, certificate=pki.client_cert,
                                 private_key=pki.client_key)
        assert exporter.run_due() == 1
    [delivery] = store.get_series("1.2.3").deliveries
    assert delivery["state"] == "sent", delivery
    [sr] = store.get_series("1.2.3").sent_objects
    assert [p.name for p in received.iterdir()] and sr["status"] == 0


@pytest.mark.parametrize("case", ["untrusted PACS certificate", "PACS refuses us without a certificate"])
def test_export_tls_failure_is_permanent_with_the_reason(tmp_path, pki, case):
    from tests.node.test_worker_export import _pending_delivery

    store, queue = _pending_delivery(tmp_path)
    received = tmp_path / "pacs"
    with storescp_tls(pki, received, "+cf", str(pki.ca), "-rc") as port:
        if case == "untrusted PACS certificate":
            exporter, reason = _tls_exporter(queue, port, ca_bundle=pki.other_ca), "certificate is not trusted"
        else:
            exporter, reason = _tls_exporter(queue, port, ca_bundle=pki.ca), "the peer requires our certificate"
        assert exporter.run_due() == 1
    [delivery] = store.get_series("1.2.3").deliveries
    assert delivery["state"] == "failed" and delivery["attempts"] == 1, delivery
    assert "cannot connect to pacs (PACS@127.0.0.1:" in delivery["last_error"]
    assert reason in delivery["last_error"]
    assert not list(received.iterdir())
