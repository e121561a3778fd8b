"""Spool: received instances as DICOM Part 10 files, written durably.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
directories mode 0700. A file is written to a temporary name in
``<root>/.incoming``, fdatasynced, renamed into place and the directory
fsynced, so a file with a ``.dcm`` name is always complete. Path components come only from UIDs
that passed :func:`storage.uids.is_valid_uid`.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.uids import is_valid_uid

TMP_SUFFIX = ".tmp"
DCM_SUFFIX = ".dcm"
_PREAMBLE = b"\x00" * 128 + b"DICM"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1524.1.1"
IMPLEMENTATION_VERSION_NAME = "MIGRAINE_NODE_01"


class SpoolError(Exception):
    """A file could not be placed in the spool (bad UID, disk full, I/O error)."""


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """Encode one explicit VR little endian element (group 0002 only)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _pad_uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _pad_text(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str = "",
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1).

    Built with struct rather than pydicom: on the C-STORE hot path pydicom's
    generic encoder (with value validation) cost more than the network.
    """
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _pad_uid(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _pad_uid(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _pad_uid(transfer_syntax_uid)),
            _element(0x0002, 0x0012, b"UI", _pad_uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0002, 0x0013, b"SH", _pad_text(IMPLEMENTATION_VERSION_NAME)),
        )
        + ((_element(0x0002, 0x0016, b"AE", _pad_text(source_ae_title)),) if source_ae_title else ())
    )
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body


@dataclass(frozen=True)
class SpoolKey:
    """Where one instance lives: three validated UIDs."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            if not is_valid_uid(getattr(self, name)):
                raise SpoolError(f"{name} is not a valid UID; refusing to use it in a path")

    @property
    def relative_path(self) -> str:
        return f"{self.study_instance_uid}/{self.series_instance_uid}/{self.sop_instance_uid}{DCM_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable file store for received instances."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self.incoming = self.root / ".incoming"
        self._ensure_dir(self.root)

    def _ensure_dir(self, path: Path) -> None:
        """Create `path` (0700) and make its entry durable in the parent."""
        if path in self._known_dirs:
            return
        with self._lock:
            missing = []
            p = path
            while not p.exists():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                try:
                    d.mkdir(mode=0o700)
                except FileExistsError:
                    pass
                _fsync_dir(d.parent)
            self._known_dirs.add(path)

    def path_for(self, key: SpoolKey) -> Path:
        return self.root / key.relative_path

    def stage(self, sop_instance_uid: str, chunks: tuple[bytes, ...]) -> Path:
        """Write `chunks` to a temporary file in ``.incoming`` and fdatasync it.

        Staging needs only the request's SOP Instance UID, so it can run while
        the header is parsed and the row is recorded; :meth:`commit` then
        places the file under its study/series directory.
        """
        if not is_valid_uid(sop_instance_uid):
            raise SpoolError("SOP Instance UID is not a valid UID; refusing to use it in a path")
        self._ensure_dir(self.incoming)
        tmp = self.incoming / f"{sop_instance_uid}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.discard(tmp)
            raise SpoolError(f"cannot write {tmp.name}: {exc.strerror or exc}") from exc
        return tmp

    def commit(self, staged: Path, key: SpoolKey) -> Path:
        """Rename a staged file into place and make the rename durable."""
        final = self.path_for(key)
        self._ensure_dir(final.parent)
        try:
            os.rename(staged, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            self.discard(staged)
            raise SpoolError(f"cannot place {key.relative_path}: {exc.strerror or exc}") from exc
        return final

    @staticmethod
    def discard(staged: Path) -> None:
        try:
            staged.unlink()
        except OSError:
            pass

    def write(self, key: SpoolKey, chunks: tuple[bytes, ...]) -> Path:
        """Write `chunks` as the file for `key`; returns once it is durable."""
        return self.commit(self.stage(key.sop_instance_uid, chunks), key)

    def same_content(self, key: SpoolKey, chunks: tuple[bytes, ...]) -> bool:
        """True if the spooled file for `key` already holds exactly `chunks`."""
        path = self.path_for(key)
        try:
            if path.stat().st_size != sum(len(c) for c in chunks):
                return False
            return path.read_bytes() == b"".join(chunks)
        except FileNotFoundError:
            return False

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a crash; returns how many."""
        removed = 0
        for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def iter_files(self) -> Iterator[tuple[str, Path]]:
        """Yield (relative path, path) of every complete instance file."""
        for path in self.root.glob(f"*/*/*{DCM_SUFFIX}"):
            yield path.relative_to(self.root).as_posix(), path

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
