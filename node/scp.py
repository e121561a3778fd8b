"""C-STORE / C-ECHO SCP: save each instance durably, record it, then answer.

Only saving and recording happen here; completion is node/tracker.py's job and
nothing heavier runs on an association thread. Success (0x0000) is returned
only after the spool file is fsynced and renamed and its row committed.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import (
    Verification,  # type: ignore[attr-defined]
    register_uid,
    uid_to_service_class,
)
from sqlalchemy.exc import SQLAlchemyError

from node.config import Settings
from node.dimse_tuning import node_ae, set_tcp_nodelay, tune_association
from node.errors import IngestError, StoreStatus
from node.header import HeaderError, instance_record, read_header
from node.logs import log_context
from storage.spool import Spool, SpoolError, SpoolKey, encode_file_meta
from storage.store import InstanceRecord, JobStore, RecordOutcome, StoreError
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

# Only syntaxes the installed decoders read (tests/node/test_transfer_syntaxes.py sends a series
# in each and assembles it): pydicom itself (uncompressed, deflate, RLE), python-gdcm (JPEG lossless
# Process 14 and SV1, JPEG baseline, JPEG-LS, JPEG 2000), pyjpegls (JPEG-LS), Pillow (JPEG baseline,
# JPEG 2000), pylibjpeg + pylibjpeg-openjpeg (HTJ2K, JPEG 2000), pylibjpeg-rle (fast RLE). An
# acknowledged instance that cannot be decoded would only fail later, at classification.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    JPEGBaseline8Bit,
)
# Negotiated away (a sender then falls back to a syntax above): JPEG Extended (Process 2 and 4)
# carries MR's 12-bit samples, which neither GDCM nor Pillow decodes; the one decoder that does,
# pylibjpeg-libjpeg, is GPL-3.0, which this proprietary node does not take on.
NOT_ACCEPTED: tuple[UID, ...] = (JPEGExtended12Bit,)


class ActiveAssociations:
    """Which open associations have sent instances of which series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[int, set[str]] = defaultdict(set)

    def add(self, assoc_key: int, series_instance_uid: str) -> None:
        with self._lock:
            self._series[assoc_key].add(series_instance_uid)

    def end(self, assoc_key: int) -> set[str]:
        """Forget an association; returns the series it had sent."""
        with self._lock:
            return self._series.pop(assoc_key, set())

    def senders_active(self, series_instance_uid: str) -> bool:
        with self._lock:
            return any(series_instance_uid in s for s in self._series.values())


class Ingest:
    """Validate, spool and record one C-STORE dataset."""

    def __init__(self, spool: Spool, store: JobStore, min_free_disk_mb: int) -> None:
        self.spool = spool
        self.store = store
        self.min_free_bytes = min_free_disk_mb * 1024 * 1024

    def _prepare(
        self,
        encoded: bytes,
        transfer_syntax_uid: str,
        affected_sop_class_uid: str,
        affected_sop_instance_uid: str,
        calling_ae_title: str,
        chunks: tuple[bytes, ...],
    ) -> tuple[InstanceRecord, bool | None]:
        """Parse and validate the header; returns the record and whether it
        replaces different content (None: no file for this UID yet)."""
        try:
            header = read_header(encoded, transfer_syntax_uid)
        except HeaderError as exc:
            raise IngestError(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from None
        for keyword, value in (
            ("SOPInstanceUID", header.sop_instance_uid),
            ("SeriesInstanceUID", header.series_instance_uid),
            ("StudyInstanceUID", header.study_instance_uid),
        ):
            if value is None:
                raise IngestError(StoreStatus.MISSING_OR_INVALID_UID, f"{keyword} missing")
            if not is_valid_uid(value):
                raise IngestError(StoreStatus.MISSING_OR_INVALID_UID, f"{keyword} is not a valid UID")
        if header.sop_instance_uid != affected_sop_instance_uid:
            raise IngestError(StoreStatus.UID_MISMATCH, "SOPInstanceUID differs from the request's")
        record = instance_record(
            header, affected_sop_class_uid, str(transfer_syntax_uid), sum(len(c) for c in chunks), calling_ae_title
        )
        key = SpoolKey(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
        # The same dataset from another AE or in another syntax is a duplicate: the file meta is
        # not compared, and a different syntax is compared decoded (Spool.same_instance).
        replaced = (
            not self.spool.same_instance(key, chunks[0], encoded, str(transfer_syntax_uid))
            if self.spool.path_for(key).exists()
            else None
        )
        return record, replaced

    def receive(
        self,
        encoded: bytes,
        transfer_syntax_uid: str,
        affected_sop_class_uid: str,
        affected_sop_instance_uid: str,
        calling_ae_title: str,
        before_record: Callable[[InstanceRecord], None] | None = None,
    ) -> tuple[InstanceRecord, RecordOutcome]:
        """Store one instance durably; raises IngestError with the status to send.

        `before_record` runs once the instance is validated and before its row is
        committed (the SCP marks the series' sender active there, so the tracker
        never sees the row without its open association).

        Order: file staged and fdatasynced, row committed, file renamed into
        place and its directory fsynced, then success. A crash between the
        commit and the rename leaves a row without a file, which recovery
        drops; the sender never saw success for it.
        """
        if not is_valid_uid(affected_sop_instance_uid):
            raise IngestError(StoreStatus.MISSING_OR_INVALID_UID, "request's Affected SOP Instance UID is not valid")
        if self.spool.free_bytes() < self.min_free_bytes:
            raise IngestError(StoreStatus.OUT_OF_RESOURCES, "free disk below min_free_disk_mb")
        chunks = (
            encode_file_meta(affected_sop_class_uid, affected_sop_instance_uid, transfer_syntax_uid, calling_ae_title),
            encoded,
        )
        record, replaced = self._prepare(
            encoded, transfer_syntax_uid, affected_sop_class_uid, affected_sop_instance_uid, calling_ae_title, chunks
        )
        staged = None
        if replaced is not False:  # new, or different bytes than the spooled file
            try:
                staged = self.spool.stage(record.sop_instance_uid, chunks)
            except SpoolError as exc:
                raise IngestError(StoreStatus.OUT_OF_RESOURCES, str(exc)) from None
        try:
            if before_record is not None:
                before_record(record)
            outcome = self.store.record_instance(record, replaced_content=bool(replaced))
        except (StoreError, SQLAlchemyError) as exc:
            if staged is not None:
                self.spool.discard(staged)
            if isinstance(exc, StoreError):
                raise IngestError(StoreStatus.UID_MISMATCH, str(exc)) from None
            log.error("database error recording %s: %s", record.sop_instance_uid, type(exc).__name__)
            raise IngestError(StoreStatus.OUT_OF_RESOURCES, "database unavailable; retry later") from None
        if staged is not None:
            key = SpoolKey(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
            try:
                self.spool.commit(staged, key)
            except SpoolError as exc:
                if outcome is RecordOutcome.NEW:
                    self.store.forget_instance(record.series_instance_uid, record.sop_instance_uid)
                raise IngestError(StoreStatus.OUT_OF_RESOURCES, str(exc)) from None
        return record, outcome


# C-STORE failure "Processing failure" (PS3.7 C.4.2): an unexpected error in the node.
PROCESSING_FAILURE = 0x0110


def _status(status: StoreStatus | int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: evt.Event, ingest: Ingest, active: ActiveAssociations, observer=None) -> int | Dataset:  # noqa: ANN001
    """EVT_C_STORE: never raises; every outcome is a DIMSE status. `observer`: node/metrics.py Observer."""
    request = event.request
    calling = event.assoc.requestor.ae_title
    try:
        record, outcome = ingest.receive(
            request.DataSet.getvalue(),
            event.context.transfer_syntax,
            request.AffectedSOPClassUID,
            request.AffectedSOPInstanceUID,
            calling,
            # Bookkeeping first: the series counts as being sent before its row (and the
            # expected-count rule) can be seen, and long before 0x0000 goes back.
            before_record=lambda rec: active.add(id(event.assoc), rec.series_instance_uid),
        )
    except IngestError as exc:
        log.warning(
            "C-STORE from %s refused with 0x%04X: %s (sop_instance_uid=%s)",
            calling,
            exc.status,
            exc,
            request.AffectedSOPInstanceUID if is_valid_uid(request.AffectedSOPInstanceUID) else "<invalid>",
        )
        if observer is not None:
            observer.instance_received(event, None, "refused")
        return _status(exc.status, str(exc))
    except Exception:  # a bug must not take the association down silently
        log.exception("unexpected error storing an instance from %s", calling)
        if observer is not None:
            observer.instance_received(event, None, "error")
        # Processing failure, not 0xA700: a sender retries "out of resources" forever.
        return _status(PROCESSING_FAILURE, "internal error processing the instance")
    if log.isEnabledFor(logging.DEBUG):
        with log_context(series=record.series_instance_uid):
            log.debug("stored %s (%s)", record.sop_instance_uid, outcome)
    if observer is not None:
        observer.instance_received(event, record, str(outcome))
    return StoreStatus.SUCCESS


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def handle_conn_open(event: evt.Event) -> None:
    """Send each response at once (Nagle's algorithm costs ~40 ms per C-STORE)
    and let the association's threads wait for work instead of polling (node/dimse_tuning.py)."""
    tune_association(event.assoc)
    set_tcp_nodelay(event)


def handle_requested(event: evt.Event, own_ae_title: str, allowed: frozenset[str]) -> None:
    """Log why pynetdicom is about to reject an association (it says nothing itself)."""
    request = event.assoc.requestor.primitive  # A-ASSOCIATE-RQ, not yet negotiated
    calling = str(request.calling_ae_title).strip()
    called = str(request.called_ae_title).strip()
    if allowed and calling not in allowed:
        log.warning(
            "association from %s (%s) rejected: calling AE title not in allowed_calling_aets",
            calling,
            event.assoc.requestor.address,
        )
    elif called != own_ae_title:
        log.warning(
            "association from %s (%s) rejected: called AE title %r is not ours (%s)",
            calling,
            event.assoc.requestor.address,
            called,
            own_ae_title,
        )


def handle_assoc_end(event: evt.Event, active: ActiveAssociations, on_end: Callable[[Iterable[str]], None]) -> None:
    series = active.end(id(event.assoc))
    if series:
        log.info(
            "association from %s ended (%s); series: %s",
            event.assoc.requestor.ae_title,
            event.event.name,
            ", ".join(sorted(series)),
        )
        on_end(series)


def build_ae(settings: Settings) -> AE:
    """The acceptor: Verification, every storage SOP class and the configured private ones."""
    ae = node_ae(settings.node.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
    ae.maximum_associations = settings.node.max_associations
    ae.require_called_aet = True
    if settings.node.allowed_calling_aets:
        ae.require_calling_aet = list(settings.node.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    # Vendor-private objects sent with the images (Philips Private MR Series Data, ExamCard, spectra):
    # accepted and kept so the scanner's export succeeds; storage never counts them as slices.
    for uid in settings.node.private_sop_classes:
        register_private_storage(uid)
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    return ae


class CheapCopyContexts(list):
    """The server's supported presentation contexts. pynetdicom deep-copies them for every
    association; with ~170 storage SOP classes that generic deepcopy cost ~20 ms of CPU (holding the
    GIL) per association, more than 100 C-STOREs of ingest. A context holds only immutable values
    and one list of transfer syntax UIDs, so a shallow copy with its own list is a full copy."""

    def __deepcopy__(self, memo: dict) -> list:
        out = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)  # noqa: SLF001
            out.append(twin)
        return out


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded acceptor, plus: connections from outside `allowed_networks` are closed
    before a byte of their association request is read (logged with the address), TLS handshakes
    on each connection's own thread (with `ssl_context`), and optionally SO_REUSEPORT, so several
    acceptor processes can share one port."""

    allowed_networks: tuple = ()
    reuse_port: bool = False
    observer = None  # node/metrics.py Observer: counts and audits the refused connections

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(str(client_address[0]).split("%")[0])
        except ValueError:
            address = None
        if address is not None and address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address is not None and any(address in network for network in self.allowed_networks):
            return True
        log.warning("connection from %s refused: address not in allowed_networks", client_address[0])
        if self.observer is not None:
            self.observer.connection_refused(client_address[0])
        return False

    # TLS (node/tls.py): pynetdicom does the handshake in get_request, on the one thread that accepts
    # every connection, so a client that connected and never handshakes would stall all the others.
    # Here get_request only wraps the socket, and each connection's own thread does its handshake,
    # bounded by this many seconds; a failure is logged with the address and the connection closed.
    handshake_seconds: float = 10.0
    # The per-connection thread only handshakes and starts the association's own thread: a client
    # stalled in its handshake must not hold up the process's exit.
    daemon_threads = True

    def get_request(self):  # noqa: ANN201
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            try:
                client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True,
                                                             do_handshake_on_connect=False)
            except OSError:
                client_socket.close()
                raise
        return client_socket, address

    def finish_request(self, request, client_address) -> None:  # noqa: ANN001
        if isinstance(request, ssl.SSLSocket) and not self._tls_handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().finish_request(request, client_address)

    def _tls_handshake(self, sock: ssl.SSLSocket, client_address) -> bool:  # noqa: ANN001
        from node.tls import describe

        previous = sock.gettimeout()
        try:
            sock.settimeout(self.handshake_seconds)
            sock.do_handshake()
            sock.settimeout(previous)
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts and resets are OSErrors
            log.warning("TLS connection from %s refused: %s", client_address[0],
                        describe(exc, self.handshake_seconds))
            return False
        if log.isEnabledFor(logging.DEBUG):
            peer = sock.getpeercert() or {}
            subject = ", ".join("=".join(pair) for rdn in peer.get("subject", ()) for pair in rdn)
            log.debug("TLS connection from %s: %s %s, client certificate: %s", client_address[0], sock.version(),
                      (sock.cipher() or ("?",))[0], subject or "none")
        return True


def start_acceptor(ae: AE, address: tuple[str, int], evt_handlers: list, allowed_networks: Iterable[str] = (),
                   ssl_context=None, reuse_port: bool = False, observer=None) -> NodeAssociationServer:  # noqa: ANN001
    """Start a non-blocking acceptor on `address` (what `AE.start_server(block=False)` does, with
    NodeAssociationServer); stop it with its shutdown()."""
    networks = tuple(ipaddress.ip_network(n) for n in allowed_networks)
    server_class = type("ConfiguredAssociationServer", (NodeAssociationServer,),
                        {"allowed_networks": networks, "reuse_port": reuse_port, "observer": observer})
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers, server_class=server_class)
    server.contexts = CheapCopyContexts(server.contexts)
    thread = threading.Thread(target=server.serve_forever, name=f"acceptor-{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does, so AE.shutdown() stops it too
    return server


def register_private_storage(uid: str) -> None:
    """Route C-STORE of a private SOP class to the storage service (pynetdicom aborts the
    association for a class it has no service for). Idempotent; process-wide, as pynetdicom's table is."""
    if uid_to_service_class(uid) is not StorageServiceClass:
        register_uid(uid, "PrivateStorage_" + uid.replace(".", "_"), StorageServiceClass)


def event_handlers(
    settings: Settings,
    ingest: Ingest,
    active: ActiveAssociations,
    on_association_end: Callable[[Iterable[str]], None],
    observer=None,  # noqa: ANN001 - node/metrics.py Observer: counters and the audit trail
) -> list:
    allowed = frozenset(settings.node.allowed_calling_aets)
    observed = [] if observer is None else [
        (evt.EVT_ACCEPTED, observer.association_accepted),
        (evt.EVT_REJECTED, observer.association_rejected),
        *((event, observer.association_ended) for event in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)),
    ]
    return observed + [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_REQUESTED, handle_requested, [settings.node.ae_title, allowed]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingest, active, observer]),
        (evt.EVT_RELEASED, handle_assoc_end, [active, on_association_end]),
        (evt.EVT_ABORTED, handle_assoc_end, [active, on_association_end]),
        (evt.EVT_CONN_CLOSE, handle_assoc_end, [active, on_association_end]),
    ]
