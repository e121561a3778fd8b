"""node/dimse_tuning.py and the acceptor's context copies: the hot-path shortcuts must give exactly
what pynetdicom would, and an idle association must wait, not spin."""

from __future__ import annotations

import copy
import io
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RQ,
    C_STORE_RQ,
    C_STORE_RSP,
    N_EVENT_REPORT_RQ,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, N_EVENT_REPORT
from pynetdicom.dsutils import encode as pydicom_encode
from pynetdicom.sop_class import Verification

from node import dimse_tuning
from node.dimse_tuning import _fast_command_encoder, encode_command_set, shorten_acceptor_reactor_sleep
from node.scp import CheapCopyContexts, build_ae, handle_conn_open, start_acceptor
from tests.peers import free_port

MR = "1.2.840.10008.5.1.4.1.1.4"


def _primitives():
    """(message class, primitive) pairs covering the VRs and optional elements command sets use."""
    out = []
    for status, comment in ((0x0000, None), (0xA700, "free disk below min_free_disk_mb"), (0xC210, "odd")):
        p = C_STORE()
        p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 7, MR, "1.2.3.4.5"
        p.Status = status
        if comment:
            p.ErrorComment = comment
        out.append((C_STORE_RSP, p))
    for originator in (None, "PACS", "ODDAE"):
        p = C_STORE()
        p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Priority = 65535, MR, "1.2.826.0.1.3680043.8.498.1", 2
        if originator:
            p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = originator, 3
        p.DataSet = io.BytesIO(b"\x08\x00\x18\x00")
        out.append((C_STORE_RQ, p))
    p = C_ECHO()
    p.MessageID, p.AffectedSOPClassUID = 1, Verification
    out.append((C_ECHO_RQ, p))
    p = C_ECHO()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 1, Verification, 0
    out.append((C_ECHO_RSP, p))
    p = C_FIND()
    p.MessageID, p.AffectedSOPClassUID, p.Priority = 2, "1.2.840.10008.5.1.4.1.2.2.1", 0
    p.Identifier = io.BytesIO(b"\x08\x00\x52\x00")
    out.append((C_FIND_RQ, p))
    p = C_FIND()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 2, "1.2.840.10008.5.1.4.1.2.2.1", 0xFF00
    p.Identifier = io.BytesIO(b"\x08\x00\x52\x00")
    out.append((C_FIND_RSP, p))
    p = C_MOVE()
    p.MessageID, p.AffectedSOPClassUID, p.Priority, p.MoveDestination = 4, "1.2.840.10008.5.1.4.1.2.2.2", 0, "MIGNODE"
    p.Identifier = io.BytesIO(b"\x08\x00\x52\x00")
    out.append((C_MOVE_RQ, p))
    p = C_GET()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 5, "1.2.840.10008.5.1.4.1.2.2.3", 0xFF00
    p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations = 169, 1
    p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations = 0, 0
    out.append((C_GET_RSP, p))
    p = N_EVENT_REPORT()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.EventTypeID = 6, "1.2.840.10008.1.20.1", "1.2.3", 1
    out.append((N_EVENT_REPORT_RQ, p))
    return out


@pytest.mark.parametrize("message_class, primitive", _primitives(),
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_command_sets_encode_byte_for_byte_as_pydicom_does(message_class, primitive):
    message = message_class()
    message.primitive_to_message(primitive)
    expected = pydicom_encode(message.command_set, True, True)
    assert encode_command_set(message.command_set) == expected
    assert _fast_command_encoder(pydicom_encode)(message.command_set, True, True) == expected


def test_what_the_short_encoder_does_not_cover_goes_to_pydicom():
    calls = []

    def original(ds, implicit, little, deflated=False):
        calls.append(1)
        return pydicom_encode(ds, implicit, little, deflated)

    encoder = _fast_command_encoder(original)
    not_covered = []
    ds = Dataset()
    ds.add_new(0x00001005, "AT", [0x00100010, 0x00100020])  # Attribute Identifier List (N-GET)
    not_covered.append(ds)
    ds = Dataset()
    ds.add_new(0x00000902, "LO", "Fehler: Datenträger voll")  # not ASCII
    not_covered.append(ds)
    ds = Dataset()
    ds.add_new(0x00000902, "LO", "two\\values")
    not_covered.append(ds)
    ds = Dataset()
    ds.add_new(0x00080018, "UI", "1.2.3")  # not a command element
    not_covered.append(ds)
    for ds in not_covered:
        assert encode_command_set(ds) is None
    for ds in not_covered[:4]:
        assert encoder(ds, True, True) == pydicom_encode(ds, True, True)
    assert len(calls) == 4
    ds = Dataset()
    ds.add_new(0x00000900, "US", 0)
    encoder(ds, False, True)  # explicit VR (never a command set): pydicom
    assert len(calls) == 5


def test_acceptor_context_copies_are_full_copies():
    ae = build_ae(_settings())
    contexts = CheapCopyContexts(ae.supported_contexts)
    copies = copy.deepcopy(contexts)
    reference = copy.deepcopy(list(ae.supported_contexts))
    assert len(copies) == len(reference) > 100
    for ours, theirs in zip(copies, reference, strict=True):
        assert vars(ours) == vars(theirs)
        assert ours is not theirs
    original = list(contexts[0].transfer_syntax)
    copies[0]._transfer_syntax.append("1.2.3")  # noqa: SLF001  negotiation edits its own copy only
    copies[0].context_id = 1
    assert list(contexts[0].transfer_syntax) == original
    assert contexts[0].context_id is None


def _settings():
    from node.config import load_settings

    return load_settings(None, {})


def test_an_idle_association_waits_instead_of_polling_and_still_answers_at_once():
    """The DUL thread of an open, idle association wakes about every 5 ms (it polled every 0.1 ms),
    and C-ECHOs (a request in, a response out through the woken queue) are all answered."""
    assert shorten_acceptor_reactor_sleep()
    waits: dict[int, int] = {}
    real_wait = dimse_tuning._DulWaiter.wait

    def counting_wait(self, fallback):  # noqa: ANN001
        waits[id(self)] = waits.get(id(self), 0) + 1
        return real_wait(self, fallback)

    dimse_tuning._DulWaiter.wait = counting_wait
    scp = AE("TUNED")
    scp.add_supported_context(Verification)
    port = free_port()
    server = start_acceptor(scp, ("127.0.0.1", port), [(evt.EVT_CONN_OPEN, handle_conn_open),
                                                        (evt.EVT_C_ECHO, lambda event: 0x0000)])
    try:
        scu = AE("SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="TUNED")
        assert assoc.is_established
        statuses = [assoc.send_c_echo().Status for _ in range(50)]
        assert statuses == [0] * 50
        settled = sum(waits.values())
        time.sleep(0.5)
        idle_waits = sum(waits.values()) - settled
        assoc.release()
        assert len(waits) == 1  # one association, one waiter
        # 0.5 s idle: ~100 waits of 5 ms; polling every 0.1 ms would be ~5,000 turns.
        assert 20 <= idle_waits <= 400, idle_waits
        deadline = time.monotonic() + 5
        while any(t.name.startswith("Thread") and "DUL" in type(t).__name__ for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a DUL thread outlived its association"
            time.sleep(0.05)
    finally:
        dimse_tuning._DulWaiter.wait = real_wait
        server.shutdown()


def test_the_nodes_requests_go_out_without_nagles_delay():
    """Every association the node requests (export, echo, C-GET/C-MOVE) sets TCP_NODELAY: with Nagle's
    algorithm an SR sent to Orthanc stalled 40 ms on the peer's delayed ACK one time in three."""
    import socket

    from node.dimse_tuning import node_ae

    scp = AE("PEER")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        flags = {}
        for name, ae in (("node", node_ae("MIGNODE")), ("plain pynetdicom", AE("PLAIN"))):
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
            assert assoc.is_established
            flags[name] = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        assert flags["node"] != 0 and flags["plain pynetdicom"] == 0, flags
    finally:
        server.shutdown()
