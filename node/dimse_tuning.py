"""Latency settings for pynetdicom on the C-STORE hot path.

Measured with DCMTK storescu sending 170 slices to a no-op pynetdicom 3.0 SCP
(bench/ingest.py reports the real figures): most per-instance time is not our
work but pynetdicom polling (its DUL loop sleeps 1 ms whenever its queue is
empty) and pydicom validating every value of every command set it encodes.
"""

from __future__ import annotations

import pydicom.config

# DUL reactor poll interval per association (pynetdicom default 1 ms). At
# 0.1 ms an idle association costs ~1% of a core; a busy one answers sooner.
DUL_RUN_LOOP_DELAY = 0.0001


def disable_pydicom_validation() -> None:
    """Skip pydicom's per-value regex validation when encoding/decoding.

    Only for the ingest process: we never edit received datasets, and the SRs
    we build are validated by highdicom and dciodvfy instead.
    """
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def tune_association(assoc) -> None:  # noqa: ANN001
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_RUN_LOOP_DELAY

# Association._run_reactor (the acceptor loop that hands DIMSE messages to our
# handlers) sleeps a hard-coded 1 ms per turn in pynetdicom 3.0. Shortening
# exactly that sleep is worth ~1 ms per C-STORE. Only for the version it was
# measured against; any other version is left untouched.
_REACTOR_SLEEP = 0.001
_PATCHED_SERIES = "3.0."


class _ShortReactorSleep:
    """Stand-in for the `time` module inside pynetdicom.association."""

    def __init__(self, real) -> None:  # noqa: ANN001
        self._real = real

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        self._real.sleep(DUL_RUN_LOOP_DELAY if seconds == _REACTOR_SLEEP else seconds)


def shorten_acceptor_reactor_sleep() -> bool:
    """Returns True when the patch applies to the installed pynetdicom."""
    import time

    import pynetdicom
    import pynetdicom.association as association

    if not pynetdicom.__version__.startswith(_PATCHED_SERIES):
        return False
    if not isinstance(association.time, _ShortReactorSleep):
        association.time = _ShortReactorSleep(time)
    return True


def node_ae(ae_title: str):  # noqa: ANN201  pynetdicom.AE
    """An AE that names itself as migraine-node in every association (Implementation Class UID and
    Version Name, PS3.7 D.3.3.2), the same identity as our files' meta header, not pynetdicom's."""
    from pynetdicom import AE

    from storage.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
