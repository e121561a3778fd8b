"""Hostile and broken input (issue 11): a table-driven corpus sent to a real node.

One `migraine-node serve` subprocess (module scope: a crash shows as a dead process, its memory
in /proc/PID/status) receives every case over real associations from a pynetdicom SCU that sends
the crafted bytes exactly as built (chunked send of a Part 10 file; DCMTK's storescu refuses to
send most of these files, so it is not used here).

Instance cases (`INSTANCE_CASES`): one or more C-STOREs each, with the DIMSE status and the start
of the Error Comment the node must answer. The node's policy (node/errors.py StoreStatus, node/scp.py):

    0x0000  stored and recorded: a well-formed data set whose UIDs are valid (ingest reads the
            header it needs and does not validate the IOD: a header-only image or a wrong VR on an
            element ingest does not read is stored, and the series fails later with a reason)
    0xC210  cannot understand: unparseable, truncated (a value, item or element header runs past
            the end of what was sent, however large its declared length), sequences nested deeper
            than 64 levels, a deflated data set that does not inflate completely within
            max(64 MiB, 32 x its size)
    0xC211  a Study, Series or SOP Instance UID (of the data set, or the request's Affected SOP
            Instance UID) missing or not a UID: digits and dots, at most 64 characters; so no path
            trick ever names a file. Leading zeros are allowed (storage/uids.py: scanners emit them,
            and they are harmless in a path)
    0xC212  the data set's SOP Instance UID differs from the request's
    0x0110  processing failure, an unexpected exception in the node: never expected here

After every case the node process is alive, nothing was written outside the spool's
`<study>/<series>/<sop>.dcm` layout of valid UIDs (the path-trick targets stay empty), and nothing
is left in `.incoming`. The declared-2-GB and deflate-bomb cases also bound the node's peak RSS.

Series cases (`SERIES_CASES`): whole series whose instances are all stored, then judged: the
recorded state and reason after completion (`incomplete`), selection (`skipped`) or, for those
selection queues, a worker's assembly (`failed`; Worker.run_once in this process, against the
node's database and spool, max_attempts 1; assembly fails before any model is loaded).

Last, the node still answers C-ECHO and a valid 3D T1 series completes and is queued.
"""

from __future__ import annotations

import copy
import io
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    MRSpectroscopyStorage,
    RawDataStorage,
    RLELossless,
    generate_uid,
)

from model.synth import write_series
from node.errors import StoreStatus
from storage.spool import encode_file_meta
from storage.uids import is_valid_uid
from tests.peers import NODE_AE, NodeProcess, scu_echo, wait_until

MR = str(MRImageStorage)
EXPLICIT, IMPLICIT, DEFLATED = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian)
PROCESSING_FAILURE = 0x0110
# The node's own statuses (node/errors.py); anything else (or no status) in a response is a failure.
DOCUMENTED_STATUSES = frozenset(int(s) for s in StoreStatus) | {PROCESSING_FAILURE}


# ---- encoding helpers (shared with test_fuzz.py and test_patient_data.py) ------------------------


def encode_dataset(ds: Dataset, transfer_syntax: str = EXPLICIT) -> bytes:
    """The data set as a C-STORE carries it: the Part 10 encoding without preamble and file meta."""
    buffer = io.BytesIO()
    with quiet():
        ds = copy.deepcopy(ds)
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


_LONG = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


@dataclass(frozen=True)
class Element:
    """One top-level element of an explicit VR little endian data set: where it is, how it is encoded."""

    tag: int
    offset: int  # of the tag
    header: int  # bytes before the value (8 or 12)
    length: int  # declared value length

    @property
    def value_offset(self) -> int:
        return self.offset + self.header

    @property
    def end(self) -> int:
        return self.value_offset + self.length


def elements(data: bytes) -> list[Element]:
    """The top-level elements of explicit VR little endian `data`, as far as they can be followed
    (up to an undefined length, or an element that runs past the end: that one is the last)."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        group, element, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in _LONG:
            if pos + 12 > len(data):
                break
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        out.append(Element(group << 16 | element, pos, header, length))
        if length == 0xFFFFFFFF:
            break
        pos += header + length
    return out


def element(data: bytes, tag: int) -> Element:
    return next(e for e in elements(data) if e.tag == tag)


def explicit_element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` overrides the declared length."""
    length = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + value


def with_vr(data: bytes, tag: int, vr: bytes) -> bytes:
    """`data` with the element `tag` re-encoded under another VR, its value bytes unchanged."""
    e = element(data, tag)
    return data[: e.offset] + explicit_element(tag, vr, data[e.value_offset : e.end]) + data[e.end :]


def insert_before(data: bytes, tag: int, raw: bytes) -> bytes:
    e = element(data, tag)
    return data[: e.offset] + raw + data[e.offset :]


@contextmanager
def quiet() -> Iterator[None]:
    """No warnings from pydicom/pynetdicom about the invalid values we send on purpose (pytest
    turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def lax_uid_checks() -> Iterator[None]:
    """Let our SCU put any UID on the wire: pynetdicom validates the UIDs of the requests it sends."""
    from pynetdicom import _config

    saved = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        with quiet():
            yield
    finally:
        _config.VALIDATORS["UI"] = saved


@dataclass(frozen=True)
class Raw:
    """One C-STORE of already-encoded bytes."""

    data: bytes
    sop_instance_uid: str  # the request's Affected SOP Instance UID
    sop_class_uid: str = MR


@contextmanager
def association(port: int, contexts: list[str], transfer_syntax: str | None = None,
                calling: str = "SCANNER") -> Iterator:
    """tests/peers.py's scu_association, plus TCP_NODELAY: pynetdicom writes a C-STORE's command and
    data set separately, and without it Nagle's algorithm waits for the node's delayed ACK (40 ms
    per instance instead of 10). Released on exit (an aborted one is simply closed)."""
    import socket

    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.dimse_timeout = ae.network_timeout = 30
    for uid in contexts:
        ae.add_requested_context(uid, [transfer_syntax] if transfer_syntax else None)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "association refused or aborted"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def c_store(port: int, objects: list, contexts: list[str], transfer_syntax: str | None = None,
            chunked: bool = True) -> list[Dataset]:
    """C-STORE each dataset or file over one association; the responses (an empty Dataset where
    none came: the association was aborted). Files go chunked: their bytes as they are."""
    from pynetdicom import _config

    responses = []
    with association(port, contexts, transfer_syntax) as assoc:
        saved = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        try:
            for obj in objects:
                responses.append(assoc.send_c_store(obj) if assoc.is_established else Dataset())
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = saved
    return responses


_sent = iter(range(10**9))


def send_raw(port: int, workdir: Path, items: list[Raw], transfer_syntax: str = EXPLICIT) -> list[Dataset]:
    """C-STORE each item's bytes as they are, over one association; the response datasets.

    Each goes as a Part 10 file (storage.spool.encode_file_meta: struct-built, so any UID can be
    written) sent chunked: pynetdicom sends the bytes after the file meta without parsing them.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in items:
        path = workdir / f"raw-{next(_sent)}.dcm"
        path.write_bytes(encode_file_meta(item.sop_class_uid, item.sop_instance_uid, transfer_syntax) + item.data)
        paths.append(path)
    contexts = list(dict.fromkeys(item.sop_class_uid for item in items))
    with lax_uid_checks():
        return c_store(port, paths, contexts, transfer_syntax)


def send_datasets(port: int, datasets: list[Dataset], contexts: list[str] | None = None) -> list[int]:
    """C-STORE datasets (pynetdicom encodes them) over one association; the statuses."""
    contexts = contexts or list(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
    with lax_uid_checks():
        return [r.Status for r in c_store(port, datasets, contexts, chunked=False)]


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def spool_layout_problems(node_root: Path, data_dir: Path) -> list[str]:
    """Files under the node's root other than its config, log, database and
    `spool/<study>/<series>/<sop>.dcm` of valid UIDs; anything left in `.incoming`."""
    problems = []
    allowed = {node_root / "node.toml", node_root / "node.log"} | {
        data_dir / f"node.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal")}
    spool = data_dir / "spool"
    for path in node_root.rglob("*"):
        if path.is_dir() or path in allowed:
            continue
        parts = path.relative_to(spool).parts if path.is_relative_to(spool) else ()
        if (len(parts) == 3 and parts[2].endswith(".dcm") and is_valid_uid(parts[0]) and is_valid_uid(parts[1])
                and is_valid_uid(parts[2][: -len(".dcm")])):
            continue
        problems.append(str(path.relative_to(node_root)))
    return problems


# ---- the node ------------------------------------------------------------------------------------

MAX_WAIT_SECONDS = 6  # a series short of its announced count ends `incomplete` this long after its first instance


@dataclass
class Harness:
    node: NodeProcess
    root: Path  # the node's folder (config, log, data)
    work: Path  # our files
    escape: Path  # where the absolute-path UIDs point: must stay empty
    template: list[Dataset]  # a valid 101-slice 3D T1 series, 16 x 16 (read-only: copy it)

    @property
    def port(self) -> int:
        return self.node.port

    def fresh(self, index: int = 0) -> Dataset:
        """A copy of one template slice with a new SOP Instance UID and a series of its own."""
        ds = copy.deepcopy(self.template[index])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        return ds

    def store(self):  # noqa: ANN201  storage.store.JobStore on the node's database
        from node.config import load_settings
        from storage.db import make_engine
        from storage.store import JobStore

        if not hasattr(self, "_store"):
            settings = load_settings(self.node.config)
            self._store = JobStore(make_engine(settings.storage.resolved_database_url))
        return self._store

    def alive(self) -> None:
        assert self.node.proc is not None and self.node.proc.poll() is None, (
            f"node died:\n{self.node.log_text()[-4000:]}")


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_checkpoint) -> Iterator[Harness]:
    top = tmp_path_factory.mktemp("hostile")
    root, work = top / "node", top / "work"
    for d in (root, work):
        d.mkdir()
    # Short, so that an absolute path under it still fits a UID's 64 characters (pytest's own folders,
    # /tmp/pytest-of-<user>/pytest-<n>/popen-gw<k>/..., can make it 66 and another refusal).
    escape = Path(tempfile.mkdtemp(prefix="esc-"))
    series = write_series(work / "template", slices=101, rows=16, columns=16, spacing=1.0, seed=11)
    template = sorted((pydicom.dcmread(p) for p in series.paths), key=lambda ds: float(ds.SliceLocation))
    # The tiny checkpoint only matters if a series meant to fail assembly reached the model.
    node = NodeProcess.write_config(root, idle_seconds=1, max_wait_seconds=MAX_WAIT_SECONDS, min_free_disk_mb=1,
                                    checkpoint=tiny_checkpoint)
    node.start()
    try:
        yield Harness(node, root, work, escape, template)
    finally:
        node.stop()
        shutil.rmtree(escape, ignore_errors=True)


# ---- instance cases ------------------------------------------------------------------------------

PIXEL_DATA, SERIES_UID, STUDY_UID, SOP_UID = 0x7FE00010, 0x0020000E, 0x0020000D, 0x00080018
ROWS, MODALITY, INSTANCE_NUMBER, REFERENCED_IMAGES = 0x00280010, 0x00080060, 0x00200013, 0x00081140
TWO_GB = 0x7FFFFFF0


@dataclass(frozen=True)
class InstanceCase:
    name: str
    build: Callable[[Harness], list[Raw]]
    status: int | None  # None: no response, pynetdicom aborts the association (the request itself is invalid)
    comment: str = ""  # the start of the response's Error Comment (a regex, matched at its start)
    transfer_syntax: str = EXPLICIT
    max_rss_growth_mib: int | None = None  # bound on the node's peak RSS growth during the case


def _one(h: Harness, mutate: Callable[[Dataset], None] | None = None, transfer_syntax: str = EXPLICIT,
         cut: Callable[[bytes], bytes] | None = None, request_uid: str | None = None) -> list[Raw]:
    """One slice (fresh UIDs), optionally changed before encoding and/or cut after."""
    ds = h.fresh()
    if mutate is not None:
        with quiet():
            mutate(ds)
    data = encode_dataset(ds, transfer_syntax)
    if cut is not None:
        data = cut(data)
    return [Raw(data, request_uid or str(ds.SOPInstanceUID))]


def _raw(h: Harness, change: Callable[[bytes], bytes]) -> list[Raw]:
    ds = h.fresh()
    return [Raw(change(encode_dataset(ds)), str(ds.SOPInstanceUID))]


def _with_uid(h: Harness, keyword: str, value: str) -> list[Raw]:
    """A data set whose `keyword` UID is `value`; for the SOP Instance UID the request carries it too."""
    ds = h.fresh()
    with quiet():
        setattr(ds, keyword, value)
    return [Raw(encode_dataset(ds), value if keyword == "SOPInstanceUID" else str(ds.SOPInstanceUID))]


def _rle_cut(h: Harness) -> list[Raw]:
    """RLE Lossless pixel data (encapsulated: undefined length, items) cut inside its fragment."""
    ds = h.fresh()
    ds.compress(RLELossless, generate_instance_uid=False)
    data = encode_dataset(ds, str(RLELossless))
    return [Raw(data[:-108], str(ds.SOPInstanceUID))]  # the delimiter and 100 bytes of the fragment


def _nested(depth: int, implicit: bool, defined: bool = False) -> bytes:
    """`depth` Referenced Image Sequences nested in one another, each holding one item."""
    if defined:
        inner = b""
        for _ in range(depth):
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = explicit_element(REFERENCED_IMAGES, b"SQ", item)
        return inner
    head = struct.pack("<HH", 0x0008, 0x1140) + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (head + item) * depth + tail * depth


def _nested_case(h: Harness, implicit: bool) -> list[Raw]:
    ds = h.fresh()
    data = encode_dataset(ds, IMPLICIT if implicit else EXPLICIT)
    if implicit:  # implicit VR: find Modality by scanning for its tag
        at = data.index(struct.pack("<HH", 0x0008, 0x0060))
        data = data[:at] + _nested(10_000, True) + data[at:]
    else:
        data = insert_before(data, MODALITY, _nested(10_000, False))
    return [Raw(data, str(ds.SOPInstanceUID))]


_BOMB: dict[str, bytes] = {}


def _deflate_bomb(h: Harness) -> list[Raw]:
    """A deflated data set whose Pixel Data inflates to 256 MiB of zeros (about 256 KB sent)."""
    if "bomb" not in _BOMB:
        ds = h.fresh()
        plain = encode_dataset(ds)  # explicit VR LE: what deflate wraps
        head = plain[: element(plain, PIXEL_DATA).offset]
        size = 256 << 20
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        chunk = b"\x00" * (1 << 20)
        parts = [deflater.compress(head + explicit_element(PIXEL_DATA, b"OW", b"", length=size))]
        parts += [deflater.compress(chunk) for _ in range(size >> 20)]
        _BOMB["bomb"], _BOMB["uid"] = b"".join(parts) + deflater.flush(), str(ds.SOPInstanceUID)
    return [Raw(_BOMB["bomb"], _BOMB["uid"])]


def _sequence_item_2gb(h: Harness) -> list[Raw]:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, TWO_GB) + b"\x00" * 16
    return _raw(h, lambda d: insert_before(d, MODALITY, explicit_element(REFERENCED_IMAGES, b"SQ", item, 0xFFFFFFFF)))


def _undefined_ob(h: Harness) -> list[Raw]:
    """A private OB element of undefined length with no delimiter anywhere after it."""
    return _raw(h, lambda d: insert_before(d, STUDY_UID, explicit_element(0x00091010, b"OB", b"", 0xFFFFFFFF)))


def _abs(h: Harness, name: str) -> str:
    path = str(h.escape / name)
    assert len(path) <= 64, f"{path} is no UID-length path: the case would test another refusal"
    return path


INSTANCE_CASES: list[InstanceCase] = [
    InstanceCase("valid slice", lambda h: _one(h), 0x0000),
    # -- truncated
    InstanceCase("truncated: header only (cut exactly before Pixel Data)",
                 lambda h: _one(h, cut=lambda d: d[: element(d, PIXEL_DATA).offset]), 0x0000),
    InstanceCase("truncated: cut inside Pixel Data",
                 lambda h: _one(h, cut=lambda d: d[: element(d, PIXEL_DATA).value_offset + 100]),
                 0xC210, r"truncated: \(7FE0,0010\) declares 512 bytes, 100 remain$"),
    InstanceCase("truncated: cut inside Pixel Data, implicit VR",
                 lambda h: _one(h, transfer_syntax=IMPLICIT, cut=lambda d: d[:-100]),
                 0xC210, r"truncated: \(7FE0,0010\) declares 512 bytes", IMPLICIT),
    InstanceCase("truncated: cut inside the Pixel Data element header",
                 lambda h: _one(h, cut=lambda d: d[: element(d, PIXEL_DATA).offset + 5]),
                 0xC210, "truncated: the data set ends inside an element header$"),
    InstanceCase("truncated: cut inside the Series Instance UID element header",
                 lambda h: _one(h, cut=lambda d: d[: element(d, SERIES_UID).offset + 3]),
                 0xC210, "truncated: the data set ends inside an element header$"),
    InstanceCase("truncated: RLE pixel data cut inside its fragment", _rle_cut,
                 0xC210, "truncated: an item declares", str(RLELossless)),
    InstanceCase("truncated: deflate stream cut short",
                 lambda h: _one(h, transfer_syntax=DEFLATED, cut=lambda d: d[:-20]),
                 0xC210, "deflated data set truncated or inflating beyond", DEFLATED),
    InstanceCase("truncated: not deflate at all",
                 lambda h: [Raw(b"garbage!" * 16, generate_uid())],
                 0xC210, "deflated dataset does not inflate", DEFLATED),
    InstanceCase("truncated: empty data set", lambda h: [Raw(b"", generate_uid())],
                 0xC211, "SOPInstanceUID missing"),
    InstanceCase("2 KB of bytes 00..FF (an unknown VR at once: pydicom's reading finds no UID)",
                 lambda h: [Raw(bytes(range(256)) * 8, generate_uid())], 0xC211, "SOPInstanceUID missing"),
    # -- wrong VRs
    InstanceCase("wrong VR: SOP Instance UID as US (pydicom reads numbers)",
                 lambda h: _raw(h, lambda d: with_vr(d, SOP_UID, b"US")), 0xC211, "SOPInstanceUID is not a valid UID"),
    InstanceCase("wrong VR: SOP Instance UID as LO (the value is still a UID)",
                 lambda h: _raw(h, lambda d: with_vr(d, SOP_UID, b"LO")), 0x0000),
    InstanceCase("wrong VR: Series Instance UID as OB",
                 lambda h: _raw(h, lambda d: with_vr(d, SERIES_UID, b"OB")), 0xC211,
                 "SeriesInstanceUID is not a valid UID"),
    InstanceCase("wrong VR: Series Instance UID under an unknown VR 'ZZ'",
                 lambda h: _raw(h, lambda d: with_vr(d, SERIES_UID, b"ZZ")), 0xC210, "cannot parse dataset header"),
    InstanceCase("wrong VR: Modality under a lower-case VR 'cs'",
                 lambda h: _raw(h, lambda d: with_vr(d, MODALITY, b"cs")), 0xC211, "SeriesInstanceUID missing"),
    InstanceCase("wrong VR: Instance Number as FD with 2 bytes",
                 lambda h: _raw(h, lambda d: with_vr(d, INSTANCE_NUMBER, b"FD")), 0xC210,
                 "cannot parse dataset header"),
    InstanceCase("wrong VR: Rows as UI (an element ingest does not read)",
                 lambda h: _raw(h, lambda d: with_vr(d, ROWS, b"UI")), 0x0000),
    # -- invalid UIDs and path tricks
    InstanceCase("path: SOP Instance UID ../../etc/passwd",
                 lambda h: _with_uid(h, "SOPInstanceUID", "../../etc/passwd"),
                 0xC211, "request's Affected SOP Instance UID is not valid"),
    InstanceCase("path: Series Instance UID ../../../escape-target/x",
                 lambda h: _with_uid(h, "SeriesInstanceUID", "../../../escape-target/x"),
                 0xC211, "SeriesInstanceUID is not a valid UID"),
    InstanceCase("path: Study Instance UID an absolute path",
                 lambda h: _with_uid(h, "StudyInstanceUID", _abs(h, "study")),
                 0xC211, "StudyInstanceUID is not a valid UID"),
    InstanceCase("path: SOP Instance UID an absolute path",
                 lambda h: _with_uid(h, "SOPInstanceUID", _abs(h, "sop.dcm")),
                 0xC211, "request's Affected SOP Instance UID is not valid"),
    InstanceCase("path: Series Instance UID 1.2.3/../4",
                 lambda h: _with_uid(h, "SeriesInstanceUID", "1.2.3/../4"), 0xC211,
                 "SeriesInstanceUID is not a valid UID"),
    InstanceCase("path: request UID ../x, data set UID valid",
                 lambda h: _one(h, request_uid="../x"), 0xC211, "request's Affected SOP Instance UID is not valid"),
    InstanceCase("path: request UID valid, data set SOP Instance UID ../x",
                 lambda h: [Raw(_with_uid(h, "SOPInstanceUID", "../x")[0].data, generate_uid())],
                 0xC211, "SOPInstanceUID is not a valid UID"),
    InstanceCase("invalid UID: Series Instance UID of 65 characters",
                 lambda h: _with_uid(h, "SeriesInstanceUID", "1." + "2" * 63), 0xC211,
                 "SeriesInstanceUID is not a valid UID"),
    # pynetdicom refuses to decode a command set with a UID over 64 characters: it logs "Received an
    # invalid DIMSE message" and aborts the association before our handler runs; the node lives on.
    InstanceCase("invalid UID: SOP Instance UID of 66 characters in request and data set",
                 lambda h: _with_uid(h, "SOPInstanceUID", "1.2." + "3" * 62), None),
    InstanceCase("invalid UID: Series Instance UID with a NUL inside",
                 lambda h: _with_uid(h, "SeriesInstanceUID", "1.2.3\x00.4"), 0xC211,
                 "SeriesInstanceUID is not a valid UID"),
    InstanceCase("invalid UID: two values in Series Instance UID",
                 lambda h: _with_uid(h, "SeriesInstanceUID", "1.2.3\\1.2.4"), 0xC211,
                 "SeriesInstanceUID is not a valid UID"),
    InstanceCase("invalid UID: non-ASCII Series Instance UID (ISO_IR 100)",
                 lambda h: _one(h, lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 100"),
                                               setattr(ds, "SeriesInstanceUID", "1.2.3.4.\u00e9"))),
                 0xC211, "SeriesInstanceUID is not a valid UID"),
    InstanceCase("invalid UID: empty Study Instance UID",
                 lambda h: _with_uid(h, "StudyInstanceUID", ""), 0xC211, "StudyInstanceUID missing"),
    InstanceCase("UID with leading zeros (allowed: storage/uids.py)",
                 lambda h: _with_uid(h, "SOPInstanceUID", f"1.2.0{generate_uid()[4:60]}"), 0x0000),
    InstanceCase("request and data set SOP Instance UIDs differ",
                 lambda h: _one(h, request_uid=generate_uid()), 0xC212, "SOPInstanceUID differs from the request's"),
    # -- declared 2 GB
    InstanceCase("2 GB declared: Pixel Data",
                 lambda h: _raw(h, lambda d: d[: element(d, PIXEL_DATA).offset]
                                + explicit_element(PIXEL_DATA, b"OW", b"\x00" * 512, TWO_GB)),
                 0xC210, r"truncated: \(7FE0,0010\) declares 2147483632 bytes, 512 remain$",
                 max_rss_growth_mib=32),
    InstanceCase("2 GB declared: a private OB element before the UIDs",
                 lambda h: _raw(h, lambda d: insert_before(d, STUDY_UID, explicit_element(0x00091010, b"OB",
                                                                                          b"\x00" * 64, TWO_GB))),
                 0xC210, r"truncated: \(0009,1010\) declares 2147483632 bytes, \d+ remain$",
                 max_rss_growth_mib=32),
    InstanceCase("2 GB declared: an item of an undefined-length sequence", _sequence_item_2gb,
                 0xC210, r"cannot parse dataset header: OSError|truncated: an item declares 2147483632 bytes",
                 max_rss_growth_mib=32),
    # pydicom's read_dataset (ingest's fallback) ends at the missing delimiter with nothing read.
    InstanceCase("undefined length on an OB element, no delimiter", _undefined_ob,
                 0xC211, "SOPInstanceUID missing"),
    InstanceCase("deflate bomb: 256 KB inflating to 256 MiB", _deflate_bomb,
                 0xC210, "deflated data set truncated or inflating beyond 16777216 bytes$", DEFLATED,
                 max_rss_growth_mib=48),  # the inflate is bounded at 16 MiB (32 MiB at peak); unbounded 256+
    # -- deeply nested sequences
    InstanceCase("nested: 10,000 undefined-length sequences, explicit VR",
                 lambda h: _nested_case(h, implicit=False), 0xC210, "sequences nested deeper than 64 levels"),
    InstanceCase("nested: 10,000 undefined-length sequences, implicit VR",
                 lambda h: _nested_case(h, implicit=True), 0xC210,
                 "cannot parse dataset header: sequences nested too deeply", IMPLICIT),
]


@pytest.mark.parametrize("case", INSTANCE_CASES, ids=[c.name for c in INSTANCE_CASES])
def test_instance_case(harness: Harness, case: InstanceCase):
    items = case.build(harness)
    before = vm_hwm_kib(harness.node.proc.pid)
    responses = send_raw(harness.port, harness.work / "sent", items, case.transfer_syntax)
    growth_mib = (vm_hwm_kib(harness.node.proc.pid) - before) / 1024
    harness.alive()
    assert len(responses) == len(items)
    for rsp in responses:
        if case.status is None:
            assert "Status" not in rsp, rsp
            continue
        assert "Status" in rsp, "no C-STORE response (association aborted?)"
        assert rsp.Status == case.status, (hex(rsp.Status), rsp.get("ErrorComment"))
        if case.comment:
            assert re.match(case.comment, str(rsp.get("ErrorComment", ""))), rsp.get("ErrorComment")
    if case.max_rss_growth_mib is not None:
        assert growth_mib < case.max_rss_growth_mib, f"node peak RSS grew {growth_mib:.0f} MiB"
    assert spool_layout_problems(harness.root, harness.node.data_dir) == []
    assert list(harness.escape.iterdir()) == []
    stored = {p.stem for p in harness.node.spool_files()}
    for item in items:
        assert (item.sop_instance_uid in stored) == (case.status == 0x0000)


# ---- series cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSeries:
    """A series sent as crafted bytes."""

    items: list[Raw]
    series_instance_uid: str


@dataclass(frozen=True)
class SeriesCase:
    name: str
    build: Callable[[Harness], list[Dataset] | RawSeries]  # every instance is stored (0x0000)
    state: str
    reason: str  # a regex searched in the recorded reason


def _series(h: Harness, count: int = 100, images_in_acquisition: bool = True) -> list[Dataset]:
    """`count` consecutive slices of the template as a new series of a new study."""
    study, series = generate_uid(), generate_uid()
    out = []
    for ds in h.template[:count]:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if images_in_acquisition:
            ds.ImagesInAcquisition = count
        else:
            del ds.ImagesInAcquisition
        out.append(ds)
    return out


def _two_d(h: Harness) -> list[Dataset]:
    datasets = _series(h, 5)
    for ds in datasets:
        ds.MRAcquisitionType = "2D"
    return datasets


def _missing_known(h: Harness) -> list[Dataset]:
    datasets = _series(h, 5)
    del datasets[2]
    return datasets


def _missing_unknown(h: Harness) -> list[Dataset]:
    datasets = _series(h, 101, images_in_acquisition=False)
    del datasets[50]
    return datasets


def _mixed_orientations(h: Harness) -> list[Dataset]:
    datasets = _series(h)
    for ds in datasets[::2]:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # axial among sagittal slices
    return datasets


def _varying_size(h: Harness) -> list[Dataset]:
    datasets = _series(h)
    datasets[30].Rows, datasets[30].Columns = 8, 32  # the same 512 bytes of pixel data
    return datasets


def _header_only_slice(h: Harness) -> list[Dataset]:
    datasets = _series(h)
    del datasets[40].PixelData
    return datasets


def _non_image(sop_class: str, ds: Dataset, sop_instance_uid: str | None = None) -> Dataset:
    """`ds` turned into a pixel-less object of `sop_class`, same study and series."""
    ds = copy.deepcopy(ds)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "RescaleIntercept", "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    return ds


def _spectroscopy(h: Harness) -> list[Dataset]:
    return [_non_image(str(MRSpectroscopyStorage), _series(h, 1)[0])]


def _raw_data_in_image_series(h: Harness) -> list[Dataset]:
    """100 images and a Raw Data object; its UID (2.25...) sorts after theirs (1.2.826...), so the
    series' first instance, the one selection reads, is an image."""
    datasets = _series(h)
    raw = _non_image(str(RawDataStorage), datasets[0], generate_uid(prefix=None))
    del raw.ImagesInAcquisition
    return [*datasets, raw]


def _structured_report(h: Harness) -> list[Dataset]:
    """An SR such as a PACS forwards back (our own, or another's): same study, its own series."""
    src = h.template[0]
    ds = Dataset()
    ds.file_meta = copy.deepcopy(src.file_meta)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = str(ComprehensiveSRStorage)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesDescription, ds.ValueType = "SR", "T1W_3D_TFE result", "CONTAINER"
    ds.PatientName, ds.PatientID = src.PatientName, src.PatientID
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    return [ds]


def _nested_defined(h: Harness) -> RawSeries:
    """10,000 nested defined-length sequences in one slice: stored (the scan skips a defined length
    whole), and selection reads its header without recursing into them."""
    ds = _series(h, 1)[0]
    data = insert_before(encode_dataset(ds), MODALITY, _nested(10_000, False, defined=True))
    return RawSeries([Raw(data, str(ds.SOPInstanceUID))], str(ds.SeriesInstanceUID))


SERIES_CASES: list[SeriesCase] = [
    SeriesCase("2D series", _two_d, "skipped", r"MRAcquisitionType is '2D', need 3D"),
    SeriesCase("single slice", lambda h: _series(h, 1), "skipped", r"only 1 slice\(s\), need at least 100"),
    SeriesCase("missing slice, count announced (4 of 5)", _missing_known, "incomplete",
               r"^4 of 5 expected instances after \d+ s"),
    SeriesCase("missing slice, no count announced", _missing_unknown, "failed",
               r"failed after 1 attempt\(s\): .*missing slices or uneven slice spacing"),
    SeriesCase("mixed orientations", _mixed_orientations, "failed",
               r"slices have 2 different orientations \(mixed planes in one series\)"),
    SeriesCase("varying rows/columns", _varying_size, "failed",
               r"slices have different rows x columns: \{\(16, 16\): 99, \(8, 32\): 1\}"),
    SeriesCase("a header-only slice in the series", _header_only_slice, "failed",
               r"1 instance\(s\) in the series are not images"),
    SeriesCase("non-image SOP class (MR Spectroscopy, modality MR)", _spectroscopy, "skipped",
               rf"SOP class {re.escape(str(MRSpectroscopyStorage))} is not an MR image storage class"),
    SeriesCase("a Raw Data object among 100 images", _raw_data_in_image_series, "failed",
               r"1 instance\(s\) in the series are not images"),
    SeriesCase("an SR sent to the node", _structured_report, "skipped", r"modality 'SR' is not MR"),
    SeriesCase("10,000 nested defined-length sequences in one slice", _nested_defined, "skipped",
               r"only 1 slice\(s\)"),
]


@pytest.fixture(scope="module")
def series_outcomes(harness: Harness) -> dict[str, tuple[list[int], object]]:
    """Send every series case, wait until each is judged, let a worker take what selection queued;
    {case name: (statuses, the series' view)}."""
    from node.config import load_settings
    from node.worker import Worker
    from storage.db import make_engine
    from storage.jobs import JobQueue

    sent: dict[str, tuple[list[int], str]] = {}
    # The one that must wait for max_wait_seconds first, so that its wait overlaps the others' sending.
    for case in sorted(SERIES_CASES, key=lambda c: c.state != "incomplete"):
        items = case.build(harness)
        if isinstance(items, RawSeries):
            statuses = [r.Status for r in send_raw(harness.port, harness.work / "series", items.items)]
            series_uid = items.series_instance_uid
        else:
            statuses = send_datasets(harness.port, items)
            series_uid = str(items[0].SeriesInstanceUID)
        sent[case.name] = (statuses, str(series_uid))
    store = harness.store()

    def judged(uid: str) -> bool:
        view = store.get_series(uid)
        return view is not None and view.state not in ("receiving", "complete")

    wait_until(lambda: all(judged(uid) for _, uid in sent.values()), timeout=MAX_WAIT_SECONDS + 30,
               what="every series case completed and selected")
    settings = load_settings(harness.node.config, {"worker": {"max_attempts": 1}})
    worker = Worker(settings, JobQueue(make_engine(settings.storage.resolved_database_url)))
    with quiet():
        for _ in range(len(SERIES_CASES) + 1):
            if not worker.run_once():
                break
    return {name: (statuses, store.get_series(uid)) for name, (statuses, uid) in sent.items()}


@pytest.mark.parametrize("case", SERIES_CASES, ids=[c.name for c in SERIES_CASES])
def test_series_case(harness: Harness, series_outcomes, case: SeriesCase):
    statuses, view = series_outcomes[case.name]
    assert set(statuses) == {0x0000}
    harness.alive()
    assert (view.state, view.reason) == (case.state, view.reason)
    assert re.search(case.reason, view.reason), view.reason


# ---- afterwards ----------------------------------------------------------------------------------


def test_node_still_serves_after_the_corpus(harness: Harness):
    """Runs last (file order): C-ECHO, a valid 3D T1 series completes and is queued, no internal error
    was ever answered or logged, nothing half-written in `.incoming`, nothing outside the spool."""
    harness.alive()
    assert scu_echo(harness.port) == 0x0000
    datasets = _series(harness, 100)
    assert set(send_datasets(harness.port, datasets)) == {0x0000}
    uid = str(datasets[0].SeriesInstanceUID)
    store = harness.store()
    view = wait_until(lambda: (v := store.get_series(uid)) and v.state not in ("receiving", "complete") and v,
                      timeout=30, what="the valid series selected")
    assert view.state == "queued", view.reason
    assert "expected instance count reached (100/100)" in view.reason and "3D T1 'T1W_3D_TFE', 100 slices" in view.reason
    harness.alive()
    log = harness.node.log_text()
    # The one traceback: pynetdicom's, for the command set it would not decode (the 66-character UID).
    assert log.count("Traceback") == log.count("Received an invalid DIMSE message") == 1, log[-4000:]
    assert "unexpected error" not in log and "0x0110" not in log
    incoming = harness.node.data_dir / "spool" / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert spool_layout_problems(harness.root, harness.node.data_dir) == []
    assert list(harness.escape.iterdir()) == []
