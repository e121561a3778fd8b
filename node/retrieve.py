"""`replay --from-pacs`: fetch a study from a PACS by C-GET into our spool.

The retrieved instances go through the same Ingest as C-STORE from a scanner
(validated UIDs, fsynced files, rows committed), on the C-GET association's
own storage sub-operations.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)

from node.config import Destination
from node.errors import IngestError, PeerError, StoreStatus
from node.scp import Ingest
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)
RETRIEVED_CLASSES = (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)


def retrieve_study(peer: Destination, study_instance_uid: str, ingest: Ingest, calling_ae_title: str,
                   timeout: float = 60) -> int:
    """C-GET every MR image of a study from `peer`; returns instances stored."""
    if not is_valid_uid(study_instance_uid):
        raise PeerError(f"{study_instance_uid!r} is not a valid Study Instance UID")
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

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in RETRIEVED_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_CLASSES]
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    where = f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
    if assoc.is_rejected:
        raise PeerError(f"{where} rejected the association")
    if not assoc.is_established:
        raise PeerError(f"{where} not reachable")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    final = None
    try:
        for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status:
                final = int(status.Status)
    finally:
        assoc.release()
    if final is None:
        raise PeerError(f"{where} did not answer the C-GET")
    if final not in (0x0000, 0xB000) and stored == 0:
        raise PeerError(f"{where} answered C-GET with status 0x{final:04X} and sent nothing")
    return stored
