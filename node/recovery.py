"""Start-up recovery: the fsynced spool is the source of truth.

Removes temporary files a crash left behind, records every complete spool
file that has no row (for example a row lost with the WAL on power failure),
and drops rows whose file never became durable (ingest commits the row while
the file's fsync runs; the sender got no success for such an instance).
"""

from __future__ import annotations

import logging
import time

import pydicom

from node.header import header_from_dataset, instance_record
from storage.spool import Spool
from storage.store import JobStore, StoreError

log = logging.getLogger(__name__)


SHARED_GRACE_SECONDS = 300.0
"""On a database shared by several nodes (not SQLite), recovery leaves alone what is younger than
this: another node may be between its row's commit and its file's rename right now."""


def recover(spool: Spool, store: JobStore, grace_seconds: float = 0.0) -> tuple[int, int, int]:
    """Returns (partial files removed, rows rebuilt, rows dropped).

    `grace_seconds` spares rows and files younger than that (other live nodes' in-flight C-STOREs).
    """
    removed = spool.remove_partial_files(older_than_seconds=grace_seconds)
    cutoff = time.time() - grace_seconds
    known = store.instance_paths(received_before=cutoff if grace_seconds else None)
    files = dict(spool.iter_files())
    dropped = 0
    for relative, (series_uid, sop_uid) in known.items():
        if relative not in files:
            store.forget_instance(series_uid, sop_uid)
            dropped += 1
    rebuilt = 0
    all_known = known if not grace_seconds else store.instance_paths()
    for relative, path in files.items():
        if relative in all_known:
            continue
        if grace_seconds and path.stat().st_mtime > cutoff:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            header = header_from_dataset(ds)
            record = instance_record(
                header,
                str(ds.file_meta.MediaStorageSOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                path.stat().st_size,
                str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip() or None,
            )
            if record.path != relative:
                raise StoreError("file name does not match its UIDs")
            store.record_instance(record, replaced_content=False, now=path.stat().st_mtime)
            rebuilt += 1
        except Exception as exc:  # one bad file must not stop start-up
            log.error("spool file %s could not be recorded: %s", relative, exc)
    if removed or rebuilt or dropped:
        log.warning(
            "recovery: removed %d partial file(s), rebuilt %d instance row(s), dropped %d row(s) without a file",
            removed,
            rebuilt,
            dropped,
        )
    return removed, rebuilt, dropped
