"""Dataset manifests: `path,label[,patient][,split]` CSV -> rows with patient identities and roles.

path: a DICOM series folder, one multi-frame DICOM file or a NIfTI file,
relative to the manifest's folder unless absolute; its path relative to that
folder is the row's stable key. label: `responder` or `non-responder` (1/0
accepted). patient: any identifier; without it a DICOM row's patient is the
PatientID of its first file. Only a hash of either is ever kept or printed
(`patient_hash`). A NIfTI row without a patient is its own patient (a warning
says so: two scans of one person could then land in different roles).

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
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

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


def patient_hash(identity: str) -> str:
    """First 16 hex of sha256: lets rows be grouped by patient without keeping the identifier.

    A pseudonym, not anonymisation: a short ID space could be enumerated.
    """
    return hashlib.sha256(identity.strip().encode("utf-8")).hexdigest()[:16]


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
            raise ManifestError(f"{path}:{number}: {item} does not exist")
        key = _row_key(item, path.parent)
        identity = entry.get("patient") or dicom_patient_id(item)
        patient = patient_hash(identity) if identity else patient_hash(f"row:{key}")
        rows.append(ManifestRow(item, label, split, patient, key, number, identity is not None))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    duplicates = [k for k, n in Counter(r.key for r in rows).items() if n > 1]
    if duplicates:
        raise ManifestError(f"{path}: {duplicates[0]} is listed more than once")
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
    for patient, group in by_patient.items():
        if len({value(r) for r in group}) > 1:
            lines = ", ".join(f"line {r.line} ({r.key}: {value(r)})" for r in group)
            raise ManifestError(f"{where}: patient {patient} {what}: {lines}")


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
    """What the sidecar keeps of a split: per row its key, patient hash and role; counts."""
    return {
        "method": method,
        "rows": [{"key": r.key, "patient": r.patient, "role": r.split} for r in rows],
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
            raise ManifestError(f"{row.path}: {exc}") from None
        if progress is not None:
            progress(1)
    return out
