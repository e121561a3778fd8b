"""Manifests: patient identity (hashed), one label and one role per patient, patient-grouped stratified roles."""

from __future__ import annotations

import hashlib
import shutil
import stat
from collections import Counter, defaultdict

import nibabel as nib
import numpy as np
import pytest

from model.dataset import (
    KEY_FILE_ENV,
    ManifestError,
    assign_roles,
    content_digest,
    grouped_stratified_roles,
    key_check,
    key_hash,
    patient_hash,
    patient_key_path,
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
    # Two scans of one DICOM patient share one pseudonym: keyed hash of the PatientID, 16 hex.
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
    with pytest.raises(ManifestError, match=r"conflicting labels: line 2 \(responder\), line 4") as err:
        read_manifest(manifest)
    assert "P1" not in str(err.value) and patient_hash("P1") not in str(err.value) and "x.nii" not in str(err.value)


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
    # Keys (paths, which may name patients) only keyed-hashed; the content digest is what evaluate matches.
    assert [e["key"] for e in record["rows"]] == [key_hash(f"s{i}.nii") for i in range(12)]
    assert all(e["digest"] == content_digest(r.path) == r.digest for e, r in zip(record["rows"], rows))
    assert record["key_check"] == key_check() and "s0.nii" not in str(record)
    assert {e["role"] for e in record["rows"]} == {"train", "validation", "test"}
    assert all(e["patient"] == r.patient for e, r in zip(record["rows"], rows))
    counts = record["counts"]
    assert sum(c["rows"] for c in counts.values()) == 12
    assert sum(c["patients"] for c in counts.values()) == len({r.patient for r in rows})


def test_pseudonyms_are_keyed_by_a_private_site_key(tmp_path, monkeypatch, capsys):
    pid = "123456"  # a short hospital ID: plain sha256 would be reversed by enumerating them
    mine = patient_hash(pid)
    assert len(mine) == 16 and mine != hashlib.sha256(pid.encode()).hexdigest()[:16]
    assert mine != hashlib.sha256(f"patient:{pid}".encode()).hexdigest()[:16]
    key_file = tmp_path / "site" / "patient-key"
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    capsys.readouterr()
    other = patient_hash(pid)
    assert len(other) == 16 and other != mine and key_check() != ""
    # Created on first use: 32 random bytes, owner-only, one note on stderr.
    assert len(key_file.read_bytes()) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    err = capsys.readouterr().err
    assert str(key_file) in err and "same key" in err
    assert patient_hash(pid) == other and capsys.readouterr().err == ""  # stable, no second note
    # Default: $XDG_DATA_HOME/migraine-node/patient-key.
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert patient_key_path() == tmp_path / "xdg" / "migraine-node" / "patient-key"


def test_content_digest_follows_the_data_not_its_path(tmp_path):
    write_series(tmp_path / "a", slices=6, rows=8, columns=8, spacing=12.0, seed=1)
    write_series(tmp_path / "b", slices=6, rows=8, columns=8, spacing=12.0, seed=2)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "copy")
    assert content_digest(tmp_path / "a") == content_digest(tmp_path / "elsewhere" / "copy")
    assert content_digest(tmp_path / "a") != content_digest(tmp_path / "b")
    _nifti(tmp_path / "x.nii.gz", 1.0)
    _nifti(tmp_path / "y.nii.gz", 2.0)
    x = (tmp_path / "x.nii.gz").read_bytes()
    assert content_digest(tmp_path / "x.nii.gz") == hashlib.sha256(x).hexdigest()
    assert content_digest(tmp_path / "x.nii.gz") != content_digest(tmp_path / "y.nii.gz")
