"""Fuzzing the C-STORE SCP (issue 11): seeded mutations of one valid instance over real associations.

A `migraine-node serve` subprocess (a crash is a dead process) receives FUZZ_CASES mutations (default
300, bounded by FUZZ_SECONDS, default 60 s; `make fuzz` runs 2,000) of one valid MR slice's encoded
data set: bit flips, byte insertion and deletion, truncation, random values of random elements,
corrupted length fields, corrupted VRs, duplicated elements, and pairs of these. The base is explicit
VR little endian (with a defined- and an undefined-length sequence), implicit VR little endian, or
deflated (mutated, then deflated). Each case is reproducible from FUZZ_SEED (default 1) and its
index: `random.Random(f"{seed}:{index}")`.

What counts: only the data set is mutated, never the command set or the PDUs (pynetdicom builds
those), so every C-STORE must be answered with one of the node's statuses for bad input: 0x0000,
0xC210, 0xC211 or 0xC212 (node/errors.py). No response (an aborted association), 0x0110 (an
unexpected exception in the node) or any other status is a failure, reported with its seed.
Afterwards the node process is alive, answers C-ECHO, stores and selects a valid series, has
nothing half-written in the spool's `.incoming`, nothing outside its spool layout, and its log
shows no traceback.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, _config

from model.synth import write_series
from storage.spool import encode_file_meta
from tests.node.test_hostile_input import (
    DEFLATED,
    EXPLICIT,
    IMPLICIT,
    elements,
    encode_dataset,
    lax_uid_checks,
    send_datasets,
    spool_layout_problems,
    vm_hwm_kib,
)
from tests.peers import NodeProcess, scu_echo, wait_until

MR = str(MRImageStorage)
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "300"))
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "60"))
FUZZ_SEED = os.environ.get("FUZZ_SEED", "1")
PER_ASSOCIATION = 50  # C-STOREs per association before a new one
EXPECTED = {0x0000, 0xC210, 0xC211, 0xC212}


# ---- the base instance ------------------------------------------------------------------------------


def _undefined_lengths(data: bytes) -> bytes:
    """Explicit VR LE `data` with its top-level defined-length sequences re-encoded with undefined
    lengths (items too), as many scanners write them."""
    out = bytearray()
    for e in elements(data):
        raw = data[e.offset : e.end]
        if raw[4:6] == b"SQ" and e.length:
            items, pos, value = [], 0, data[e.value_offset : e.end]
            while pos < len(value):
                (length,) = struct.unpack_from("<I", value, pos + 4)
                items.append(b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + value[pos + 8 : pos + 8 + length]
                             + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
                pos += 8 + length
            raw = raw[:8] + b"\xff\xff\xff\xff" + b"".join(items) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        out += raw
    return bytes(out)


def base_dataset(source: Path) -> Dataset:
    """A synthetic MR slice with a Referenced Image Sequence and a private element."""
    ds = pydicom.dcmread(source)
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MR, generate_uid()
    ds.ReferencedImageSequence = [item]
    ds.add_new(0x00090010, "LO", "FUZZ PRIVATE")
    ds.add_new(0x00091001, "OB", b"\x01\x02\x03\x04")
    return ds


# ---- mutations --------------------------------------------------------------------------------------

INTERESTING_LENGTHS = (0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0xFFFE, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x7FFFFFF0, 0xFFFFFFFE,
                       0x80000000)
INTERESTING_VALUES = (b"", b"\x00", b"../../etc/passwd", b"/etc/passwd", b"1.2.3/../4", b"1." + b"2" * 70,
                      "1.2.\u00e9".encode("latin-1"), b"\xff" * 64, b"\\" * 10, b"1.02.3", b"A" * 4096, b"%s%n%x",
                      b"\x00" * 300, "ZZPATIENT^\u00c9".encode("utf-8"))
VRS = (b"AE", b"CS", b"DS", b"FD", b"IS", b"LO", b"OB", b"OW", b"PN", b"SQ", b"UI", b"UL", b"UN", b"US", b"UT", b"ZZ",
       b"\x00\x00", b"ui")


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _insert(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]


def _delete(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(max(len(data), 1))
    return data[:at] + data[at + rng.randint(1, 16) :]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _pick(rng: random.Random, data: bytes):  # noqa: ANN202
    found = elements(data)
    return rng.choice(found) if found else None


def _value(rng: random.Random, data: bytes) -> bytes:
    """A random top-level element gets a random or an 'interesting' value (length field kept right)."""
    e = _pick(rng, data)
    if e is None:
        return data
    value = rng.choice(INTERESTING_VALUES) if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 80))
    header = bytearray(data[e.offset : e.value_offset])
    if e.header == 12:
        struct.pack_into("<I", header, 8, len(value))
    else:
        value = value[:0xFFFF]
        struct.pack_into("<H", header, 6, len(value))
    return data[: e.offset] + bytes(header) + value + data[e.end :]


def _length(rng: random.Random, data: bytes) -> bytes:
    """A random element's length field set to an 'interesting' or random value."""
    e = _pick(rng, data)
    if e is None:
        return data
    choice = rng.random()
    length = (rng.choice(INTERESTING_LENGTHS) if choice < 0.5 else
              e.length + rng.randint(-8, 8) if choice < 0.8 else rng.getrandbits(32))
    buf = bytearray(data)
    if e.header == 12:
        struct.pack_into("<I", buf, e.offset + 8, length % 2**32)
    else:
        struct.pack_into("<H", buf, e.offset + 6, length % 2**16)
    return bytes(buf)


def _vr(rng: random.Random, data: bytes) -> bytes:
    e = _pick(rng, data)
    if e is None:
        return data
    return data[: e.offset + 4] + rng.choice(VRS) + data[e.offset + 6 :]


def _duplicate(rng: random.Random, data: bytes) -> bytes:
    """A random element twice: right after itself, or somewhere else."""
    e = _pick(rng, data)
    if e is None:
        return data
    raw = data[e.offset : e.end]
    at = e.end if rng.random() < 0.5 else rng.choice(elements(data)).offset
    return data[:at] + raw * rng.randint(1, 3) + data[at:]


MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bit flips": _bit_flips,
    "insert bytes": _insert,
    "delete bytes": _delete,
    "truncate": _truncate,
    "random value": _value,
    "length field": _length,
    "VR": _vr,
    "duplicate element": _duplicate,
}


def fuzz_case(bases: dict[str, bytes], seed: str, index: int) -> tuple[str, str, bytes, str]:
    """(syntax, mutation name, mutated data set, request SOP Instance UID) of case `index`."""
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(("explicit", "explicit", "explicit undefined", "explicit undefined", "implicit", "deflated"))
    data = bases[base]
    names = rng.sample(sorted(MUTATORS), 2 if rng.random() < 0.25 else 1)
    # A fresh SOP Instance UID of the same length as the base's: accepted cases never collide,
    # and the mutation offsets stay those of the base.
    old = bases["sop_instance_uid"].encode()
    new = ("1.2.826.0.1.3680043.8.498." + "".join(rng.choice("123456789") for _ in range(len(old) - 26))).encode()
    data = data.replace(old, new)
    for name in names:
        # Element-aware mutations read explicit VR LE; on implicit VR they still change bytes.
        data = MUTATORS[name](rng, data)
    syntax = {"explicit": EXPLICIT, "explicit undefined": EXPLICIT, "implicit": IMPLICIT, "deflated": DEFLATED}[base]
    if base == "deflated":
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return syntax, f"{base}: {' + '.join(names)}", data, new.decode()


# ---- the run ------------------------------------------------------------------------------------------


def run_fuzz(node: NodeProcess, bases: dict[str, bytes], cases: int, seconds: float, seed: str,
             workdir: Path) -> dict:
    """Send the cases; {"counts": {outcome: n}, "by_mutation": {...}, "unexpected": [...], "sent": n, ...}."""
    counts: collections.Counter = collections.Counter()
    by_mutation: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_base: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unexpected = []
    path = workdir / "case.dcm"
    started = time.monotonic()
    index = 0

    def open_association():  # noqa: ANN202
        """PER_ASSOCIATION cases each; one MR Image Storage context per transfer syntax; TCP_NODELAY
        (see test_hostile_input.association)."""
        ae = AE(ae_title="FUZZER")
        ae.dimse_timeout = ae.network_timeout = 30
        for syntax in (EXPLICIT, IMPLICIT, DEFLATED):
            ae.add_requested_context(MR, [syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MIGNODE")
        assert assoc.is_established, "the node refused an association during the fuzz run"
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc

    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with lax_uid_checks():
            while index < cases and time.monotonic() - started < seconds:
                assoc = open_association()
                try:
                    for _ in range(PER_ASSOCIATION):
                        if index >= cases or time.monotonic() - started >= seconds:
                            break
                        syntax, name, data, uid = fuzz_case(bases, seed, index)
                        path.write_bytes(encode_file_meta(MR, uid, syntax) + data)
                        rsp = assoc.send_c_store(path)
                        status = rsp.Status if "Status" in rsp else None
                        outcome = f"0x{status:04X}" if status is not None else "no response"
                        counts[outcome] += 1
                        base, mutation = name.split(": ")
                        by_mutation[mutation][outcome] += 1
                        by_base[base][outcome] += 1
                        if status not in EXPECTED:
                            unexpected.append({"index": index, "seed": seed, "mutation": name, "outcome": outcome,
                                               "comment": str(rsp.get("ErrorComment", ""))})
                        index += 1
                        if not assoc.is_established:
                            break
                finally:
                    if assoc.is_established:
                        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    return {"sent": index, "seconds": round(time.monotonic() - started, 1), "counts": dict(counts),
            "by_base": {k: dict(v) for k, v in sorted(by_base.items())},
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())}, "unexpected": unexpected}


@pytest.fixture
def fuzz_node(tmp_path) -> NodeProcess:
    root = tmp_path / "node"
    root.mkdir()
    node = NodeProcess.write_config(root, idle_seconds=1, max_wait_seconds=30, min_free_disk_mb=1)
    node.start()
    yield node
    node.stop()


def test_fuzzed_instances_get_a_documented_status_and_the_node_lives_on(fuzz_node, tmp_path):
    series = write_series(tmp_path / "series", slices=100, rows=16, columns=16, spacing=1.0, seed=21)
    base = base_dataset(series.paths[0])
    explicit = encode_dataset(base)
    bases = {"explicit": explicit, "explicit undefined": _undefined_lengths(explicit),
             "implicit": encode_dataset(base, IMPLICIT), "deflated": _undefined_lengths(explicit),
             "sop_instance_uid": str(base.SOPInstanceUID)}
    assert len(bases["explicit undefined"]) > len(explicit)  # the sequence really is re-encoded
    hwm_before = vm_hwm_kib(fuzz_node.proc.pid)

    result = run_fuzz(fuzz_node, bases, FUZZ_CASES, FUZZ_SECONDS, FUZZ_SEED, tmp_path)
    report = json.dumps({k: result[k] for k in ("sent", "seconds", "counts", "by_base", "by_mutation")}, indent=1)
    print(f"\nfuzz: {FUZZ_CASES} case(s) asked, seed {FUZZ_SEED}\n{report}")
    (tmp_path / "fuzz-report.json").write_text(json.dumps(result, indent=1))

    assert fuzz_node.proc.poll() is None, f"the node died:\n{fuzz_node.log_text()[-4000:]}"
    assert result["unexpected"] == [], json.dumps(result["unexpected"][:20], indent=1)
    assert result["sent"] >= min(FUZZ_CASES, 100), f"only {result['sent']} case(s) in {FUZZ_SECONDS:g} s"
    # A fuzzer that only ever met one status would be testing nothing.
    assert {"0x0000", "0xC210", "0xC211"} <= set(result["counts"]), result["counts"]
    growth_mib = (vm_hwm_kib(fuzz_node.proc.pid) - hwm_before) / 1024
    assert growth_mib < 200, f"node peak RSS grew {growth_mib:.0f} MiB"

    # Afterwards: C-ECHO, and a valid series is stored, completes and is queued for the model.
    assert scu_echo(fuzz_node.port) == 0x0000
    datasets = [pydicom.dcmread(p) for p in series.paths]
    for ds in datasets:  # a study of its own: the fuzz cases shared the base's
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    assert set(send_datasets(fuzz_node.port, datasets)) == {0x0000}
    from node.config import load_settings
    from storage.db import make_engine
    from storage.store import JobStore

    store = JobStore(make_engine(load_settings(fuzz_node.config).storage.resolved_database_url))
    view = wait_until(lambda: (v := store.get_series("1.2.826.0.1.3680043.8.498.2")) and v.state == "queued" and v,
                      timeout=30, what="the valid series queued after the fuzz run")
    assert "3D T1 'T1W_3D_TFE', 100 slices" in view.reason

    assert fuzz_node.proc.poll() is None
    incoming = fuzz_node.data_dir / "spool" / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert spool_layout_problems(fuzz_node.config.parent, fuzz_node.data_dir) == []
    log = fuzz_node.log_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]
