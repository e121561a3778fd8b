"""Dataset manifests: `path,label[,patient][,split]` CSV -> rows with patient identities and roles.

path: a DICOM series folder, one multi-frame DICOM file or a NIfTI file,
relative to the manifest's folder unless absolute; its path relative to that
folder is the row's stable key. label: `responder` or `non-responder` (1/0
accepted). patient: any identifier; without it a DICOM row's patient is the
PatientID of its first file. Only a keyed hash of either is ever kept or
printed (`patient_hash`: HMAC-SHA256 under the site's patient key, which no
output holds). A NIfTI row without a patient is its own patient (a warning
says so: two scans of one person could then land in different roles).

Each row also gets a content digest (`content_digest`): what a saved split is
matched by, wherever the file is listed from. Row keys (paths, which often
hold patient names) are kept only hashed with the same key (`key_hash`).

Three roles: train (fits the weights), validation (chooses the epoch and
the cutoff), test (reported once, at the end). split: `train`,
`validation` (or `val`), `test`; without a split column every row gets a
role by patient, stratified by label: 20 % of each class's patients for
test, 20 % of the rest for validation (64/16/20 overall). Every split is by
patient: all scans of a patient share one role.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import math
import os
import secrets
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import sha256_file
from model.preprocess import InputSpec, build_transform, preprocess
from model.volume import load_volume

_LABELS = {"responder": 1, "1": 1, "non-responder": 0, "nonresponder": 0, "non_responder": 0, "0": 0}
ROLES = ("train", "validation", "test")
_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
TEST_FRACTION = 0.2  # of each class's patients
VALIDATION_FRACTION = 0.2  # of each class's remaining patients
SPLIT_METHOD = "by patient, stratified by label: 20% of patients test, 20% of the rest validation (seed {seed})"


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the row."""


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    label: int
    split: str | None  # role from the manifest (train/validation/test) or assigned; None before assignment
    patient: str = ""  # hash of the patient identity (`patient_hash`), never the identity itself
    key: str = ""  # path relative to the manifest's folder: stable across machines
    line: int = 0  # manifest line, for messages
    identified: bool = True  # False: no patient identity (the row is its own patient)
    digest: str = ""  # `content_digest` of the row's data: matches it to a saved split wherever it is listed from


KEY_FILE_ENV = "MIGRAINE_NODE_PATIENT_KEY_FILE"
_KEYS: dict[str, bytes] = {}


def patient_key_path() -> Path:
    """`$MIGRAINE_NODE_PATIENT_KEY_FILE`, else `$XDG_DATA_HOME/migraine-node/patient-key` (~/.local/share)."""
    given = os.environ.get(KEY_FILE_ENV)
    if given:
        return Path(given).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "migraine-node" / "patient-key"


def patient_key() -> bytes:
    """The site's secret pseudonym key: read, or created on first use (32 random bytes, mode 0600)."""
    path = patient_key_path()
    cached = _KEYS.get(str(path))
    if cached is not None:
        return cached
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created meanwhile by another process
            key = path.read_bytes()
        else:
            key = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
            print(f"note: created the patient pseudonym key {path} (set {KEY_FILE_ENV} to use another); keep it "
                  "secret and out of shared outputs. Evaluating a checkpoint's saved split needs the same key.",
                  file=sys.stderr)
    except OSError as exc:
        raise ManifestError(f"cannot read the patient pseudonym key {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise ManifestError(f"the patient pseudonym key {path} is too short ({len(key)} bytes; at least 16)")
    _KEYS[str(path)] = key
    return key


def keyed_hash(text: str) -> str:
    """First 16 hex of HMAC-SHA256 under the site's patient key."""
    return hmac.new(patient_key(), text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def patient_hash(identity: str) -> str:
    """Lets rows be grouped by patient without keeping the identifier: a keyed pseudonym (16 hex).

    Keyed with the site's secret (`patient_key`), so enumerating short
    hospital IDs does not reverse it without the key file.
    """
    return keyed_hash("patient:" + identity.strip())


def key_hash(key: str) -> str:
    """A row key (manifest path, which may name the patient), keyed-hashed for the sidecar and cv.json."""
    return keyed_hash("row-key:" + key)


def key_check() -> str:
    """Identifies the patient key without revealing it: a saved split records it, evaluate compares."""
    return keyed_hash("migraine-node key check")


def content_digest(path: Path) -> str:
    """sha256 of what a row holds: a series folder's sorted SOPInstanceUIDs (headers only), else the file bytes.

    The same data gives the same digest from any folder or manifest. A folder
    without DICOM files: sha256 over its files' names and digests.
    """
    import pydicom

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    uids = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # not DICOM
            continue
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if uid:
            uids.append(uid)
    if uids:
        return hashlib.sha256("\n".join(sorted(uids)).encode("ascii", "replace")).hexdigest()
    parts = [f"{f.relative_to(path).as_posix()}:{sha256_file(f)}" for f in files]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def dicom_patient_id(path: Path) -> str | None:
    """PatientID of the first DICOM file of a series folder (or of one file); header only."""
    import pydicom

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            return None
        path = files[0]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # not DICOM (NIfTI) or unreadable: loading reports it later
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None


def _row_key(item: Path, folder: Path) -> str:
    return Path(os.path.relpath(item.resolve(), folder.resolve())).as_posix()


def read_manifest(path: Path, warn: Callable[[str], None] | None = None) -> list[ManifestRow]:
    """Rows with patient hashes; `warn` hears about rows without a patient identity."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise ManifestError(f"{path}: the header must name the columns path,label[,patient][,split]")
    rows = []
    for number, raw in enumerate(reader, start=2):
        entry = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        label = _LABELS.get(entry["label"].lower())
        if label is None:
            raise ManifestError(f"{path}:{number}: label {entry['label']!r} is not responder/non-responder")
        split = entry.get("split") or None
        if split is not None:
            if split.lower() not in _SPLITS:
                raise ManifestError(f"{path}:{number}: split {split!r} is not train/validation/test")
            split = _SPLITS[split.lower()]
        item = Path(entry["path"])
        item = item if item.is_absolute() else path.parent / item
        if not item.exists():
            raise ManifestError(f"{path}:{number}: the row's path does not exist")
        key = _row_key(item, path.parent)
        identity = entry.get("patient") or dicom_patient_id(item)
        patient = patient_hash(identity) if identity else patient_hash(f"row:{key}")
        try:
            digest = content_digest(item)
        except OSError as exc:
            raise ManifestError(f"{path}:{number}: cannot read the row's data: {exc.strerror}") from None
        rows.append(ManifestRow(item, label, split, patient, key, number, identity is not None, digest))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    first_line: dict[str, int] = {}
    for r in rows:
        if r.key in first_line:
            raise ManifestError(f"{path}: line {r.line} lists the same path as line {first_line[r.key]}")
        first_line[r.key] = r.line
    check_patient_labels(rows, path)
    anonymous = [r for r in rows if not r.identified]
    if anonymous and warn is not None:
        warn(f"{len(anonymous)} of {len(rows)} manifest rows have no patient identity (no patient column, no "
             f"DICOM PatientID; e.g. line {anonymous[0].line}): each is treated as its own patient. If one person "
             "has several scans, add a patient column, or they may land in training and test.")
    return rows


def _one_per_patient(rows: Sequence[ManifestRow], value, what: str, where: Path | str) -> None:  # noqa: ANN001
    """A ManifestError naming the rows of the first patient whose rows disagree on `value(row)`."""
    by_patient: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        by_patient[r.patient].append(r)
    for group in by_patient.values():
        if len({value(r) for r in group}) > 1:
            lines = ", ".join(f"line {r.line} ({value(r)})" for r in group)
            raise ManifestError(f"{where}: a patient {what}: {lines}")


def check_patient_labels(rows: Sequence[ManifestRow], where: Path | str = "manifest") -> None:
    """One label per patient: conflicting rows are an error that names them."""
    _one_per_patient(rows, lambda r: "responder" if r.label else "non-responder", "has conflicting labels", where)


def check_patient_roles(rows: Sequence[ManifestRow], where: Path | str = "manifest") -> None:
    """One role per patient: a patient in two roles would leak between training and evaluation."""
    _one_per_patient(rows, lambda r: r.split, "is in more than one split", where)


def _share(n: int, fraction: float) -> int:
    """round(n * fraction), at least one when the fraction is positive and n >= 2, never all n."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, math.floor(n * fraction + 0.5)), n - 1)


def grouped_stratified_roles(
    patients: Sequence[str], labels: Sequence[int], seed: int,
    test_fraction: float = TEST_FRACTION, validation_fraction: float = VALIDATION_FRACTION,
) -> list[str]:
    """A role per row such that all rows of a patient share it and each class is split alike.

    Patients (not rows) are shuffled within each label and cut: `test_fraction`
    for test, then `validation_fraction` of the rest for validation. The
    outcome depends on the set of patients and the seed, not on row order.
    """
    label_of: dict[str, int] = {}
    for p, y in zip(patients, labels):
        if label_of.setdefault(p, int(y)) != int(y):
            raise ValueError(f"patient {p} has conflicting labels")
    rng = np.random.default_rng(seed)
    role_of: dict[str, str] = {}
    for cls in (0, 1):
        group = sorted(p for p, y in label_of.items() if y == cls)
        rng.shuffle(group)
        n_test = _share(len(group), test_fraction)
        n_val = _share(len(group) - n_test, validation_fraction)
        for i, p in enumerate(group):
            role_of[p] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return [role_of[p] for p in patients]


def assign_roles(rows: Sequence[ManifestRow], seed: int) -> tuple[list[ManifestRow], str]:
    """Every row with a role, and how the roles were chosen (for the sidecar).

    The manifest's split column wins (checked: one role per patient); train
    and test rows without validation rows get a validation share of the
    training patients; no split column: `grouped_stratified_roles`.
    """
    rows = list(rows)
    given = [r.split for r in rows if r.split]
    if given and len(given) != len(rows):
        raise ManifestError("either every row has a split or none does")
    if not given:
        roles = grouped_stratified_roles([r.patient for r in rows], [r.label for r in rows], seed)
        return [replace(r, split=s) for r, s in zip(rows, roles)], SPLIT_METHOD.format(seed=seed)
    check_patient_roles(rows)
    if "validation" in given:
        return rows, "the manifest's split column"
    train = [r for r in rows if r.split == "train"]
    roles = iter(grouped_stratified_roles([r.patient for r in train], [r.label for r in train], seed,
                                          test_fraction=0.0))
    out = [replace(r, split=next(roles)) if r.split == "train" else r for r in rows]
    return out, (f"the manifest's split column; validation: 20% of the training patients by patient, "
                 f"stratified by label (seed {seed})")


def split_counts(rows: Sequence[ManifestRow]) -> dict:
    """Rows, patients and responders per role."""
    out = {}
    for role in ROLES:
        members = [r for r in rows if r.split == role]
        out[role] = {"rows": len(members), "patients": len({r.patient for r in members}),
                     "responders": sum(r.label for r in members),
                     "responder_patients": len({r.patient for r in members if r.label})}
    return out


def split_record(rows: Sequence[ManifestRow], method: str) -> dict:
    """What the sidecar keeps of a split: per row its keyed key hash, content digest, patient pseudonym and role;
    counts; and `key_check`, which tells evaluate whether it holds the same patient key."""
    return {
        "method": method,
        "key_check": key_check(),
        "rows": [{"key": key_hash(r.key), "digest": r.digest, "patient": r.patient, "role": r.split} for r in rows],
        "counts": split_counts(rows),
    }


def load_tensors(
    rows: Sequence[ManifestRow], spec: InputSpec, progress: Callable[[int], None] | None = None
) -> list[tuple[torch.Tensor, int]]:
    """Preprocess every row once (training then reuses the tensors every epoch)."""
    transform = build_transform(spec)
    out = []
    for row in rows:
        try:
            out.append((preprocess(load_volume(row.path), spec, transform), row.label))
        except ValueError as exc:
            raise ManifestError(f"manifest line {row.line}: {exc}") from None
        if progress is not None:
            progress(1)
    return out
