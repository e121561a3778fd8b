"""Manifests: patient identity (hashed), one label and one role per patient, patient-grouped stratified roles."""

from __future__ import annotations

from collections import Counter, defaultdict

import nibabel as nib
import numpy as np
import pytest

from model.dataset import (
    ManifestError,
    assign_roles,
    grouped_stratified_roles,
    patient_hash,
    read_manifest,
    split_record,
)
from model.synth import write_series


def _nifti(path, value: float = 1.0) -> None:
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.float32), np.diag([8.0, 8.0, 8.0, 1.0])), path)


def _cohort(n_patients: int, scans: dict[int, int] | None = None) -> tuple[list[str], list[int]]:
    """Row-level patients and labels: patient i is a responder when i is even; `scans` gives extra scans."""
    patients, labels = [], []
    for i in range(n_patients):
        for _ in range((scans or {}).get(i, 1)):
            patients.append(f"p{i:03d}")
            labels.append(int(i % 2 == 0))
    return patients, labels


def test_patient_from_column_or_dicom_header_is_only_kept_hashed(tmp_path):
    for name, pid in (("a1", "PAT-0001"), ("a2", "PAT-0001"), ("b", "PAT-0002")):
        write_series(tmp_path / name, slices=10, rows=16, columns=16, spacing=12.0, patient_id=pid)
    _nifti(tmp_path / "c.nii.gz")
    _nifti(tmp_path / "d.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient\na1,responder,\na2,responder,\nb,non-responder,\n"
                        "c.nii.gz,0,MRN 42\nd.nii.gz,1,\n")
    warnings = []
    rows = read_manifest(manifest, warn=warnings.append)
    assert [r.key for r in rows] == ["a1", "a2", "b", "c.nii.gz", "d.nii.gz"]
    # Two scans of one DICOM patient share one hash: sha256 of the PatientID, 16 hex.
    assert rows[0].patient == rows[1].patient == patient_hash("PAT-0001") != rows[2].patient
    assert len(rows[0].patient) == 16 and rows[3].patient == patient_hash("MRN 42")
    for r in rows:  # the identifiers themselves are never kept
        assert "PAT-000" not in repr(r) and "MRN" not in repr(r)
    # Only the NIfTI row without a patient is its own patient, and a warning says so.
    assert [r.identified for r in rows] == [True, True, True, True, False]
    assert len(warnings) == 1 and "1 of 5" in warnings[0] and "own patient" in warnings[0]
    assert "PAT" not in warnings[0]


def test_conflicting_labels_of_one_patient_name_the_rows(tmp_path):
    for name in ("x", "y", "z"):
        _nifti(tmp_path / f"{name}.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient\nx.nii.gz,responder,P1\ny.nii.gz,non-responder,P2\n"
                        "z.nii.gz,non-responder,P1\n")
    with pytest.raises(ManifestError, match=r"conflicting labels: line 2 \(x.nii.gz: responder\), line 4") as err:
        read_manifest(manifest)
    assert "P1" not in str(err.value).replace(patient_hash("P1"), "")


def test_grouped_stratified_roles_keep_patients_whole_and_classes_balanced():
    patients, labels = _cohort(50, scans={i: 2 for i in range(0, 50, 3)})  # 17 patients with two scans
    roles = grouped_stratified_roles(patients, labels, seed=4)
    by_patient = defaultdict(set)
    for p, r in zip(patients, roles):
        by_patient[p].add(r)
    assert all(len(r) == 1 for r in by_patient.values())  # no patient in two roles
    per_class = Counter((int(p[1:]) % 2 == 0, next(iter(r))) for p, r in by_patient.items())
    # 25 patients per class: test round(25 * .2) = 5, validation round(20 * .2) = 4, train 16.
    for responder in (True, False):
        assert (per_class[responder, "test"], per_class[responder, "validation"], per_class[responder, "train"]) == (
            5, 4, 16)
    # Depends on the set of patients, not on the row order.
    order = np.random.default_rng(0).permutation(len(patients))
    shuffled = grouped_stratified_roles([patients[i] for i in order], [labels[i] for i in order], seed=4)
    assert {patients[i]: r for i, r in zip(order, shuffled)} == dict(zip(patients, roles))
    assert grouped_stratified_roles(patients, labels, seed=5) != roles


def test_small_classes_still_get_one_patient_per_role():
    patients, labels = _cohort(6)
    roles = grouped_stratified_roles(patients, labels, seed=0)
    assert Counter(zip(labels, roles)) == {(y, r): 1 for y in (0, 1) for r in ("train", "validation", "test")}


def _rows(tmp_path, text: str):
    names = {line.split(",")[0] for line in text.strip().splitlines()[1:]}
    for name in names:
        _nifti(tmp_path / name)
    (tmp_path / "m.csv").write_text(text)
    return read_manifest(tmp_path / "m.csv")


def test_split_column_one_role_per_patient(tmp_path):
    rows = _rows(tmp_path, "path,label,patient,split\na.nii,1,P1,train\nb.nii,1,P1,test\nc.nii,0,P2,val\n")
    assert [r.split for r in rows] == ["train", "test", "validation"]  # `val` is validation now
    with pytest.raises(ManifestError, match="more than one split: line 2 .*train.*line 3 .*test"):
        assign_roles(rows, seed=0)


def test_train_and_test_without_validation_carve_validation_out_of_training_patients(tmp_path):
    lines = ["path,label,patient,split"]
    for i in range(10):
        lines.append(f"t{i}.nii,{i % 2},P{i},train")
    lines += ["u0.nii,0,Q0,test", "u1.nii,1,Q1,test"]
    rows, method = assign_roles(_rows(tmp_path, "\n".join(lines) + "\n"), seed=1)
    assert Counter(r.split for r in rows) == {"train": 8, "validation": 2, "test": 2}  # 5 per class: 1 validation
    assert {r.key for r in rows if r.split == "test"} == {"u0.nii", "u1.nii"}  # the manifest's test rows stay
    assert sorted(r.label for r in rows if r.split == "validation") == [0, 1]
    assert "validation" in method


def test_mixed_split_column_is_refused(tmp_path):
    rows = _rows(tmp_path, "path,label,split\na.nii,1,train\nb.nii,0,\n")
    with pytest.raises(ManifestError, match="every row has a split or none"):
        assign_roles(rows, seed=0)


def test_split_record_lists_every_row_with_key_patient_and_role(tmp_path):
    lines = ["path,label,patient"] + [f"s{i}.nii,{i % 2},P{i // 2 * 2 + i % 2}" for i in range(12)]
    rows, method = assign_roles(_rows(tmp_path, "\n".join(lines) + "\n"), seed=2)
    record = split_record(rows, method)
    assert [e["key"] for e in record["rows"]] == [f"s{i}.nii" for i in range(12)]
    assert {e["role"] for e in record["rows"]} == {"train", "validation", "test"}
    assert all(e["patient"] == r.patient for e, r in zip(record["rows"], rows))
    counts = record["counts"]
    assert sum(c["rows"] for c in counts.values()) == 12
    assert sum(c["patients"] for c in counts.values()) == len({r.patient for r in rows})
