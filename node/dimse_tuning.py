"""Latency and CPU settings for pynetdicom on the C-STORE hot path.

pynetdicom 3.0 runs two polling threads per association: the DUL reactor
(sleeps `_run_loop_delay` whenever it has nothing to do, then looks at its
socket and queues again) and the acceptor's Association reactor (sleeps a
hard-coded 1 ms, then looks for a decoded DIMSE message). At 1 ms each
C-STORE waits ~2 ms for nothing; a shorter poll answers sooner but spins. So,
for the version measured, both sleeps become waits that end as soon as there
is work: the DUL thread waits in select() on its socket and on a self-pipe
written whenever a primitive is queued for sending; the Association thread
waits on its DIMSE message queue. Both still wake at least every 5 ms, so
everything pynetdicom checks by polling (release requests, ARTIM and idle
timers, kill flags) keeps working. Measured with DCMTK storescu sending 170
slices of 128x128 to a no-op pynetdicom SCP on two cores: 306-347 -> 609-703
images/s, 1.2-1.6 -> 1.0-1.1 ms of CPU per instance. Any other pynetdicom
version gets the plain short poll and pydicom's command-set encoder.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import struct
import threading
import time

import pydicom.config

# DUL reactor poll interval per association (pynetdicom default 1 ms): the marker our wait
# replaces, and the plain poll for a pynetdicom version the wait was not written for.
DUL_RUN_LOOP_DELAY = 0.0001
# Longest wait before a reactor polls anyway (kill flags, timers, release requests).
_MAX_WAIT = 0.005

_PATCHED_SERIES = "3.0."
_REACTOR_SLEEP = 0.001  # Association._run_reactor's hard-coded per-turn sleep in 3.0


def disable_pydicom_validation() -> None:
    """Skip pydicom's per-value regex validation when encoding/decoding.

    Only for the ingest process: we never edit received datasets, and the SRs
    we build are validated by highdicom and dciodvfy instead.
    """
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _patch_applies() -> bool:
    import pynetdicom

    return pynetdicom.__version__.startswith(_PATCHED_SERIES)


class _WakingQueue(queue.Queue):
    """The DUL's to-provider queue: every put also wakes the DUL thread's select()."""

    def __init__(self, waiter: _DulWaiter) -> None:
        super().__init__()
        self._waiter = waiter

    def _put(self, item) -> None:  # noqa: ANN001
        super()._put(item)
        self._waiter.wake()


class _DulWaiter:
    """Waits in select() on the association's socket and a self-pipe instead of sleeping."""

    def __init__(self, dul) -> None:  # noqa: ANN001
        self.dul = dul
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._closed = False
        self._lock = threading.Lock()  # no write to a descriptor number after it is closed and reused

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self.write_fd, b"\0")
            except OSError:  # pipe full: the thread is awake already
                pass

    def wait(self, fallback: float) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except (BlockingIOError, OSError):
            pass
        dul = self.dul
        if dul.to_provider_queue.queue or dul.event_queue.queue or self._closed:
            return
        transport = dul.socket
        sock = getattr(transport, "socket", None) if transport is not None else None
        if sock is None or not getattr(transport, "_is_connected", False):
            time.sleep(fallback)
            return
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
        if pending is not None and pending():
            return
        try:
            select.select([sock, self.read_fd], [], [], _MAX_WAIT)
        except (OSError, ValueError):  # socket closed under us: pynetdicom's own checks notice
            time.sleep(fallback)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)


class _ReactorTime:
    """Stand-in for the `time` module inside pynetdicom.dul and pynetdicom.association:
    a reactor's idle sleep becomes a wait that ends when there is work."""

    def __init__(self, real) -> None:  # noqa: ANN001
        self._real = real

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        waiter = getattr(thread, "_node_waiter", None)
        if waiter is not None and seconds == getattr(thread, "_run_loop_delay", None):
            waiter.wait(seconds)  # a DUL reactor with nothing to do
            return
        dimse = getattr(thread, "dimse", None)
        if seconds == _REACTOR_SLEEP and dimse is not None:  # an Association's reactor turn
            messages = getattr(dimse, "msg_queue", None)
            if isinstance(messages, queue.Queue) and getattr(thread, "is_acceptor", False):
                with messages.not_empty:  # wait for a decoded DIMSE message
                    if not messages.queue:
                        messages.not_empty.wait(_MAX_WAIT)
                return
            seconds = DUL_RUN_LOOP_DELAY  # a requestor's reactor: the plain short poll
        self._real.sleep(seconds)


def tune_association(assoc) -> None:  # noqa: ANN001
    """Called at EVT_CONN_OPEN, before the association's threads start."""
    dul = getattr(assoc, "dul", None)
    if dul is None or not hasattr(dul, "_run_loop_delay"):
        return
    dul._run_loop_delay = DUL_RUN_LOOP_DELAY
    if not _patch_applies() or getattr(dul, "_node_waiter", None) is not None or dul.to_provider_queue.queue:
        return
    waiter = _DulWaiter(dul)
    dul.to_provider_queue = _WakingQueue(waiter)
    dul._node_waiter = waiter
    _close_with_association(assoc, waiter)


def _close_with_association(assoc, waiter: _DulWaiter) -> None:  # noqa: ANN001
    """The pipe's two descriptors close when the DUL thread ends."""
    run = assoc.dul.run

    def run_then_close() -> None:
        try:
            run()
        finally:
            waiter.close()

    assoc.dul.run = run_then_close


_COMMAND_INT_VRS = {"UL": "<I", "US": "<H"}
_COMMAND_TEXT_PADDING = {"UI": b"\0", "AE": b" ", "CS": b" ", "LO": b" ", "SH": b" ", "ST": b" "}


def encode_command_set(ds) -> bytes | None:  # noqa: ANN001  pydicom Dataset
    """A DIMSE command set in Implicit VR Little Endian (PS3.7 6.3.1), or None for anything this
    short encoder does not cover (pydicom encodes those). Command sets are a handful of group-0000
    elements of a few VRs; pydicom's general writer spent ~0.3 ms per C-STORE response on them,
    twice (once more to measure the group length). tests/node/test_dimse_tuning.py checks it byte for
    byte against pydicom."""
    parts = []
    for elem in ds:
        tag, vr, value = elem.tag, elem.VR, elem.value
        if tag >> 16:
            return None
        if vr in _COMMAND_INT_VRS:
            if value is None or value == "":
                raw = b""
            elif isinstance(value, int) and not isinstance(value, bool):
                try:
                    raw = struct.pack(_COMMAND_INT_VRS[vr], value)
                except struct.error:
                    return None
            else:
                return None
        elif vr in _COMMAND_TEXT_PADDING:
            if value is None:
                raw = b""
            elif isinstance(value, str) and "\\" not in value:
                try:
                    raw = value.encode("ascii")
                except UnicodeEncodeError:
                    return None
                if len(raw) % 2:
                    raw += _COMMAND_TEXT_PADDING[vr]
            else:
                return None
        else:
            return None
        parts.append(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _fast_command_encoder(original):  # noqa: ANN001, ANN202
    def encode(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):  # noqa: ANN001, ANN202
        if is_implicit_vr and is_little_endian and not deflated:
            encoded = encode_command_set(ds)
            if encoded is not None:
                return encoded
        return original(ds, is_implicit_vr, is_little_endian, deflated)

    encode.node_fast_path = True
    return encode


def shorten_acceptor_reactor_sleep() -> bool:
    """Install the waiting reactors and the short command-set encoder; returns True when the patch
    applies to the installed pynetdicom."""
    import pynetdicom.association as association
    import pynetdicom.dimse_messages as dimse_messages
    import pynetdicom.dul as dul

    if not _patch_applies():
        return False
    for module in (association, dul):
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime(time)
    if not getattr(dimse_messages.encode, "node_fast_path", False):
        dimse_messages.encode = _fast_command_encoder(dimse_messages.encode)
    return True


def set_tcp_nodelay(event) -> None:  # noqa: ANN001  pynetdicom Event (EVT_CONN_OPEN)
    """Send each PDU at once. A DIMSE command and its data set leave as separate small writes; with
    Nagle's algorithm the second waits for the peer's delayed ACK, up to 40 ms: measured against
    Orthanc, an SR and a result image took 60-110 ms to send instead of about 20 ms, one time in three."""
    transport = event.assoc.dul.socket
    sock = getattr(transport, "socket", None) if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _node_ae_class():  # noqa: ANN202
    from pynetdicom import AE, evt

    class NodeAE(AE):
        """pynetdicom's AE whose associations (as requestor) send without Nagle's delay."""

        def associate(self, *args, evt_handlers=None, **kwargs):  # noqa: ANN002, ANN003, ANN202
            handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, set_tcp_nodelay)]
            return super().associate(*args, evt_handlers=handlers, **kwargs)

    return NodeAE


def node_ae(ae_title: str):  # noqa: ANN201  pynetdicom.AE
    """An AE that names itself as migraine-node in every association (Implementation Class UID and
    Version Name, PS3.7 D.3.3.2), the same identity as our files' meta header, not pynetdicom's,
    and whose requests go out without Nagle's delay (set_tcp_nodelay)."""
    from storage.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    ae = _node_ae_class()(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
