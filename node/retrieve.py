"""`replay --from-pacs`: fetch a study from a PACS into our spool, by C-GET or C-MOVE.

Every retrieved instance goes through the same Ingest as C-STORE from a
scanner (validated UIDs, fsynced files, rows committed) before it is
acknowledged.

- C-GET (`retrieve = "get"`, the default): the PACS sends the instances back
  on our own association, as storage sub-operations; only MR image classes
  are asked for.
- C-MOVE (`retrieve = "move"`), for the many PACS that refuse C-GET: we ask
  the PACS to move the study to our own AE title, and the PACS opens a new
  association to the host and port it has registered for that AE title. So
  someone must listen there while the move runs:
  * the node itself (`migraine-node serve`) when it is running: its SCP stores
    the instances, and its tracker completes their series as for any sender;
  * otherwise a temporary storage SCP that we run on [node] host/port for the
    duration of the C-MOVE, built like the node's (same AE, same accepted
    contexts, same Ingest), then stopped. It listens in plain DICOM only, never
    on the TLS port: a PACS that moves to us over TLS needs the running node.
  Which of the two is found by trying to bind [node] host/port, not guessed.
  Whatever the PACS moves is stored, as the node would store it (not only MR).
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.config import Destination, Settings
from node.dimse_tuning import node_ae
from node.errors import ConfigError, IngestError, PeerError, StoreStatus
from node.scp import ActiveAssociations, Ingest, build_ae, event_handlers, handle_store, start_acceptor
from node.tls import failure as tls_failure
from node.tls import tls_args
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)
RETRIEVED_CLASSES = (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)

# C-MOVE statuses (PS3.4 C.4.2.1.5) that need their own message.
MOVE_DESTINATION_UNKNOWN = 0xA801
MOVE_SUCCESS, MOVE_WARNING, MOVE_CANCELLED = 0x0000, 0xB000, 0xFE00
FIND_PENDING, FIND_PENDING_WARNING = 0xFF00, 0xFF01
# A-ASSOCIATE-RJ diagnostic from the service user: called AE title not recognised.
CALLED_AE_NOT_RECOGNISED = 7
# After the final C-MOVE response, how long the temporary SCP waits for the PACS to release
# its storage association (every instance was already acknowledged by then).
RELEASE_WAIT_SECONDS = 10.0


def retrieve_study(peer: Destination, study_instance_uid: str, ingest: Ingest, calling_ae_title: str,
                   timeout: float = 60, *, settings: Settings | None = None) -> int:
    """Retrieve every instance of a study from `peer`, as its `retrieve` setting says; returns instances stored.

    C-MOVE needs `settings` (our AE title is the move destination, [node] host/port
    where the instances arrive). When the running node received them, the count is
    the PACS's completed sub-operations: the node stored them, not this process.
    """
    if peer.is_dicomweb:
        raise ConfigError(f"[[destinations]] {peer.describe()} is a DICOMweb (url) destination: replay --from-pacs "
                          "retrieves by DICOM C-GET or C-MOVE and needs a DICOM one (ae_title, host, port)")
    if not is_valid_uid(study_instance_uid):
        raise PeerError(f"{study_instance_uid!r} is not a valid Study Instance UID")
    if peer.retrieve == "move":
        if settings is None:
            raise TypeError('retrieve = "move" needs settings= (our AE title, [node] host and port)')
        return _retrieve_by_move(peer, study_instance_uid, ingest, settings, timeout)
    return _retrieve_by_get(peer, study_instance_uid, ingest, calling_ae_title, timeout)


def _where(peer: Destination) -> str:
    return f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"


def _study_query(study_instance_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    return query


def _associate(ae: AE, peer: Destination, **kwargs):  # noqa: ANN003, ANN202
    """An association to `peer`, over DICOM TLS when it has `tls` (node/tls.py); PeerError otherwise."""
    tls = tls_args(peer)  # ConfigError when its key or certificate cannot be used
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls, **kwargs)
    if assoc.is_rejected:
        raise PeerError(f"{_where(peer)} rejected the association from {ae.ae_title}")
    if not assoc.is_established:
        failed = tls_failure(tls[0]) if tls else None
        raise PeerError(f"{_where(peer)} not reachable" + (f": {failed[1]}" if failed else ""))
    return assoc


def _retrieve_by_get(peer: Destination, study_instance_uid: str, ingest: Ingest, calling_ae_title: str,
                     timeout: float) -> int:
    """C-GET: the instances come back on our own association, so nothing else has to listen."""
    stored = 0

    def on_store(event: evt.Event) -> int:
        nonlocal stored
        request = event.request
        try:
            ingest.receive(request.DataSet.getvalue(), event.context.transfer_syntax, request.AffectedSOPClassUID,
                           request.AffectedSOPInstanceUID, peer.ae_title)
        except IngestError as exc:
            log.warning("retrieved instance refused (0x%04X): %s", exc.status, exc)
            return int(exc.status)
        stored += 1
        return int(StoreStatus.SUCCESS)

    ae = node_ae(calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in RETRIEVED_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_CLASSES]
    assoc = _associate(ae, peer, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    final = None
    try:
        for status, _identifier in assoc.send_c_get(_study_query(study_instance_uid),
                                                    StudyRootQueryRetrieveInformationModelGet):
            if status:
                final = int(status.Status)
    finally:
        assoc.release()
    if final is None:
        raise PeerError(f"{_where(peer)} did not answer the C-GET")
    if final not in (MOVE_SUCCESS, MOVE_WARNING) and stored == 0:
        raise PeerError(f"{_where(peer)} answered C-GET with status 0x{final:04X} and sent nothing")
    return stored


class _TemporaryScp:
    """The node's storage SCP, for the duration of one C-MOVE, when the node is not running.

    Built by build_ae/event_handlers/start_acceptor as `serve` builds it, so the PACS meets the same AE
    title, contexts, calling-AE rules and allowed networks, and every instance the same Ingest.
    """

    def __init__(self, settings: Settings, ingest: Ingest) -> None:
        self.stored = self.connections = 0
        self._lock = threading.Lock()
        self.ae = build_ae(settings)
        self._active = ActiveAssociations()
        # The node's handlers, the C-STORE one wrapped to count; no tracker runs here (the
        # replay that follows makes the job), so an ended association completes nothing.
        handlers = [h for h in event_handlers(settings, ingest, self._active, lambda _series: None)
                    if h[0] is not evt.EVT_C_STORE]
        handlers.append((evt.EVT_C_STORE, self._store, [ingest]))
        handlers.append((evt.EVT_CONN_OPEN, self._connected))  # did the PACS reach us at all?
        # The node's acceptor, so [node] allowed_networks holds on this port too.
        self.server = start_acceptor(self.ae, (settings.node.host, settings.node.port), handlers,
                                     settings.node.allowed_networks)

    def _connected(self, event: evt.Event) -> None:
        with self._lock:
            self.connections += 1

    def _store(self, event: evt.Event, ingest: Ingest) -> int | Dataset:
        result = handle_store(event, ingest, self._active)
        if not isinstance(result, Dataset):  # success; a refusal comes back as a status dataset
            with self._lock:
                self.stored += 1
        return result

    def stop(self) -> None:
        """Let the PACS release its storage association (bounded), then stop listening."""
        deadline = time.monotonic() + RELEASE_WAIT_SECONDS
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.server.active_associations:
            assoc.abort()
        self.server.shutdown()


def _start_temporary_scp(settings: Settings, ingest: Ingest) -> _TemporaryScp | None:
    """A temporary SCP on [node] host/port, or None when the port is taken (the node is running)."""
    node = settings.node
    try:
        return _TemporaryScp(settings, ingest)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None
        raise PeerError(f"cannot listen on [node] {node.host}:{node.port} for the C-MOVE: "
                        f"{exc.strerror or exc}") from None


def _check_running_node(settings: Settings, timeout: float) -> None:
    """[node] port is taken: make sure it is our node (our AE title answers) before moving into it."""
    node = settings.node
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(node.host, node.host)
    ae = node_ae(node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = min(timeout, 10)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, node.port, ae_title=node.ae_title)
    if assoc.is_established:
        assoc.release()
        return
    if assoc.is_rejected:
        diagnostic = getattr(assoc.acceptor.primitive, "diagnostic", None)
        if diagnostic != CALLED_AE_NOT_RECOGNISED:
            return  # it answers to our AE title and only refuses our calling AE ([node] allowed_calling_aets)
        raise PeerError(f"[node] port {node.port} is in use by a DICOM application that is not AE {node.ae_title}: "
                        "the PACS would move the study there; stop it or change [node] port")
    raise PeerError(f"[node] port {node.port} is in use, but no DICOM node answers there: the PACS could not "
                    "move the study to us; stop what holds the port or start `migraine-node serve`")


def _study_held(assoc, study_instance_uid: str) -> bool | None:  # noqa: ANN001
    """Whether the PACS holds the study, by C-FIND on the move's association; None when it will not say.

    A failed C-MOVE that moved nothing does not say why: Orthanc answers 0xC000, with no
    comment, both for a study it lacks and for a move destination it does not know.
    """
    if not assoc.is_established or not any(
            cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind for cx in assoc.accepted_contexts):
        return None
    found, final = False, None
    try:
        for status, _identifier in assoc.send_c_find(_study_query(study_instance_uid),
                                                     StudyRootQueryRetrieveInformationModelFind):
            if not status:
                return None
            code = int(status.Status)
            if code in (FIND_PENDING, FIND_PENDING_WARNING):
                found = True
            else:
                final = code
    except (RuntimeError, ValueError):  # the association went away, or the context was refused
        return None
    return found if final == MOVE_SUCCESS else None


def _retrieve_by_move(peer: Destination, study_instance_uid: str, ingest: Ingest, settings: Settings,
                      timeout: float) -> int:
    """C-MOVE to our own AE title; the instances arrive on the PACS's own association to [node] host/port."""
    node = settings.node
    where = _where(peer)
    scp = _start_temporary_scp(settings, ingest)
    if scp is None:
        _check_running_node(settings, timeout)
        log.info("the node is running on port %d: it stores what %s moves", node.port, peer.name)
    else:
        log.info("the node is not running: a temporary storage SCP listens on %s:%d for the C-MOVE",
                 node.host, node.port)
    final, aborted, held = None, False, None
    try:
        ae = node_ae(node.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)  # only to explain a failure
        assoc = _associate(ae, peer)
        try:
            last_message = time.monotonic()
            for status, _identifier in assoc.send_c_move(_study_query(study_instance_uid), node.ae_title,
                                                         StudyRootQueryRetrieveInformationModelMove):
                if status:
                    final, last_message = status, time.monotonic()
            # No final response sooner than the DIMSE timeout: the PACS dropped the association.
            aborted = final is None and time.monotonic() - last_message < timeout
            if (final is not None and _suboperations(final)[:2] == (0, 0) and int(final.Status) not in (
                    MOVE_SUCCESS, MOVE_WARNING, MOVE_DESTINATION_UNKNOWN, MOVE_CANCELLED)):
                held = _study_held(assoc, study_instance_uid)
        finally:
            assoc.release()
    finally:
        if scp is not None:
            scp.stop()
    register = (f"register this node in the PACS as a DICOM modality / move destination: AE title {node.ae_title}, "
                f"this machine's address, port {node.port}")
    if final is None:
        if aborted:
            # Our calling AE title is also the move destination: a PACS that does not know it
            # may drop the association instead of answering (Orthanc does, unless DicomAlwaysAllowMove).
            raise PeerError(f"{where} aborted the association after the C-MOVE request without answering, as a PACS "
                            f"does for an AE title it does not know: {register}")
        raise PeerError(f"{where} did not answer the C-MOVE within {timeout:g} s")
    code = int(final.Status)
    completed, failed, warning = _suboperations(final)
    if code == MOVE_DESTINATION_UNKNOWN:
        raise PeerError(f"{where} refused the C-MOVE: move destination {node.ae_title} unknown (0xA801): {register}")
    if code not in (MOVE_SUCCESS, MOVE_WARNING):
        what = "cancelled" if code == MOVE_CANCELLED else f"status 0x{code:04X}"
        comment = f" ({final.ErrorComment})" if "ErrorComment" in final else ""
        prefix = f"{where} answered the C-MOVE of study {study_instance_uid} with {what}{comment}"
        if completed or failed:
            raise PeerError(f"{prefix}; {completed} instance(s) completed, {failed} failed")
        if held is False:
            raise PeerError(f"{prefix}: it holds no study with this UID")
        if held and scp is not None and scp.connections:
            raise PeerError(f"{prefix} although it holds the study: it connected to {node.ae_title} on port "
                            f"{node.port} but stored nothing; see the warnings above (is its AE title missing from "
                            "[node] allowed_calling_aets?)")
        if held and scp is not None:
            raise PeerError(f"{prefix} although it holds the study, and never connected to port {node.port}: it does "
                            f"not know the move destination {node.ae_title}, or has another address for it: {register}")
        if held:
            raise PeerError(f"{prefix} although it holds the study: it does not know the move destination "
                            f"{node.ae_title} ({register}), or the running node refused its association (see the "
                            "node's log: [node] allowed_calling_aets)")
        raise PeerError(f"{prefix} and moved nothing: either it holds no such study, or it does not know the move "
                        f"destination {node.ae_title} ({register})")
    if failed:
        raise PeerError(
            f"C-MOVE from {where}: {failed} of {completed + failed + warning} instance(s) failed to reach "
            f"{node.ae_title} ({completed + warning} stored); check that the PACS sends to {node.ae_title} at this "
            f"machine's port {node.port}, and the node's log for refused instances")
    if completed + warning == 0:
        raise PeerError(f"{where} has no instances of study {study_instance_uid} (the C-MOVE matched nothing)")
    if scp is not None:
        return scp.stored
    return completed + warning


def _suboperations(final: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) of a C-MOVE response; absent counts are 0."""
    return tuple(int(final.get(keyword) or 0) for keyword in (  # type: ignore[return-value]
        "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))
