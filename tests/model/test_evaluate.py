"""evaluate: the checkpoint's cutoff first, calibration, and no training row ever reported as test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest
import torch

from model.checkpoint import CheckpointError, save_checkpoint
from model.dataset import KEY_FILE_ENV, ManifestRow, content_digest, key_check, key_hash, patient_hash
from model.evaluate import SavedSplit, SplitLeakError, checkpoint_status, report, select_rows
from model.metrics import brier_score, calibration
from model.network import build_network
from model.preprocess import InputSpec
from model.synth import Subject, synthetic_volume_object
from node.cli import main


def test_brier_score_known_values():
    assert brier_score([1, 0], [1.0, 0.0]) == 0.0
    assert brier_score([1, 0, 1, 0], [0.5] * 4) == pytest.approx(0.25)
    assert brier_score([1, 0, 1, 0], [0.8, 0.2, 0.6, 0.4]) == pytest.approx((0.04 + 0.04 + 0.16 + 0.16) / 4)
    assert brier_score([1, 1], [0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="within 0..1"):
        brier_score([1, 0], [1.2, 0.0])


def test_calibration_reference_and_equal_count_bins():
    labels = [0, 0, 0, 1, 0, 1, 1, 1, 0, 1]
    probs = [0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.85, 0.95]
    cal = calibration(labels, probs, n_bins=2)
    assert cal.prevalence == 0.5 and cal.brier_prevalence == 0.25  # always saying 0.5 scores 0.25
    assert cal.brier == pytest.approx(brier_score(labels, probs))
    assert [b.n for b in cal.bins] == [5, 5]
    assert cal.bins[0].observed_fraction == pytest.approx(0.2) and cal.bins[1].observed_fraction == pytest.approx(0.8)
    assert cal.bins[0].mean_probability == pytest.approx(0.21) and (cal.bins[0].low, cal.bins[0].high) == (0.05, 0.4)
    assert [b.n for b in calibration(labels, probs).bins] == [5, 5]  # default: about five rows per bin
    assert [b.n for b in calibration([0, 1] * 23, [0.5] * 46).bins] == [6] + [5] * 8  # 46 // 5 bins


def test_report_headlines_the_checkpoint_cutoff_and_labels_youden_optimistic(tmp_path):
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.55, 0.4, 0.35, 0.3, 0.1]
    text, result = report(labels, scores, 0.5, tmp_path, "unit", evaluated="test estimate (6 test)",
                          row_info=[{"key": f"r{i}", "patient": f"p{i}", "role": "test"} for i in range(6)])
    fixed, youden = result["at_checkpoint_cutoff"], result["at_youden_cutoff_optimistic"]
    assert fixed["cutoff"] == 0.5 and (fixed["tp"], fixed["fn"], fixed["tn"]) == (2, 1, 3)
    assert youden["cutoff"] == 0.4 and (youden["tp"], youden["fp"]) == (3, 0)
    assert text.index("checkpoint's cutoff") < text.index("optimistic (chosen on the evaluated set)")
    assert result["calibration"]["brier"] == pytest.approx(brier_score(labels, scores), abs=1e-6)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert {"at_checkpoint_cutoff", "at_youden_cutoff_optimistic", "calibration", "n", "title"} <= set(on_disk)
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "predictions.csv") as fh:
        written = list(csv.DictReader(fh))
    assert written[1] == {"key": "r1", "patient": "p1", "role": "test", "label": "1", "probability": "0.55",
                          "predicted": "responder"}


def _row(key: str, patient: str | None, label: int = 0, split: str | None = None, line: int = 2) -> ManifestRow:
    """A row whose content digest is its key's (`digest-KEY`); patient None: no patient identity."""
    identity = patient if patient is not None else f"row:{key}"
    return ManifestRow(Path(key), label, split, patient_hash(identity), key, line, patient is not None, f"digest-{key}")


def _saved_training() -> dict:
    return {"split": {"key_check": key_check(), "rows": [
        {"key": key_hash(k), "digest": f"digest-{k}", "patient": patient_hash(p), "role": role}
        for k, p, role in (("a", "A", "train"), ("b", "B", "validation"), ("c", "C", "test"), ("d", "D", "test"))
    ]}}


def _saved() -> SavedSplit:
    return SavedSplit.from_training(_saved_training())


def test_default_test_selection_sets_known_training_rows_aside_and_labels_external():
    rows = [_row("a", "A"), _row("b", "B"), _row("c", "C"), _row("d", "D"), _row("e", "E"), _row("c2", "C")]
    status = checkpoint_status(rows, _saved())
    assert [s.role for s in status] == ["train", "validation", "test", "test", "external", "test-patient"]
    assert [s.touched for s in status] == [True, True, False, False, False, False]
    sel = select_rows(rows, status, "test", manifest_has_split=False)
    assert sel.indices == (2, 3, 4, 5) and sel.is_test_estimate and sel.set_aside == 2
    assert "1 external" in sel.label and "2 test" in sel.label


@pytest.mark.parametrize("make_rows, match", [
    # The evaluation manifest calls a training row and a validation row test.
    (lambda: [_row("a", "A", split="test"), _row("b", "B", split="test"), _row("c", "C", split="test")],
     r"2 of 3 row\(s\) as test.*1 train, 1 validation; 2 patient"),
    # A scan the checkpoint never listed, of a patient it trained on.
    (lambda: [_row("c", "C"), _row("a-rescan", "A", line=7)],
     r"1 of 2 row\(s\) as test.*1 train-patient.*line\(s\) 7\)"),
    # The training file itself, listed without a patient identity under another key (another manifest folder).
    (lambda: [_row("c", "C", split="test"),
              ManifestRow(Path("x"), 0, "test", patient_hash("row:../x/a"), "../x/a", 3, False, "digest-a")],
     r"1 of 2 row\(s\) as test.*1 train;.*line\(s\) 3\)"),
    # No patient identity and no content match: cannot be verified, never test.
    (lambda: [_row("c", "C"), _row("new", None, line=5)],
     r"1 of 2 row\(s\) as test: they cannot be checked.*line\(s\) 5\)"),
])
def test_rows_of_trained_or_tuned_patients_are_refused_as_test(make_rows, match):
    rows = make_rows()  # built under the test key, not at collection
    status = checkpoint_status(rows, _saved())
    with pytest.raises(SplitLeakError, match=match):
        select_rows(rows, status, "test", manifest_has_split=any(r.split for r in rows))
    # --split all is allowed, and says it is not a test estimate.
    sel = select_rows(rows, status, "all", manifest_has_split=True)
    assert not sel.is_test_estimate and sel.label.startswith("NOT A TEST ESTIMATE")


def test_without_a_saved_split_rows_are_unverified():
    rows = [_row("a", "A"), _row("b", "B")]
    status = checkpoint_status(rows, SavedSplit.from_training({}))
    sel = select_rows(rows, status, "all", manifest_has_split=False)
    assert {s.role for s in status} == {"unverified"} and not sel.is_test_estimate
    assert "records no training split" in sel.label


# Through the command line, on tiny NIfTI files and a random-weight checkpoint whose sidecar holds a split.
SPEC = InputSpec(spacing=(16.0, 16.0, 16.0), shape=(12, 16, 16))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    roles = {"P0": "train", "P1": "train", "P2": "validation", "P3": "validation", "P4": "test", "P5": "test",
             "P6": "test", "P7": "test"}
    lines, split_rows = ["path,label,patient"], []
    for i, (patient, role) in enumerate(roles.items()):
        volume = synthetic_volume_object(Subject(responder=i % 2 == 0), seed=i, spacing=8.0, shape=(20, 24, 24))
        nib.save(nib.Nifti1Image(volume.array, volume.ras_affine), root / f"s{i}.nii.gz")
        lines.append(f"s{i}.nii.gz,{i % 2 == 0:d},{patient}")
        split_rows.append({"key": key_hash(f"s{i}.nii.gz"), "digest": content_digest(root / f"s{i}.nii.gz"),
                           "patient": patient_hash(patient), "role": role})
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", build_network("resnet18"), name="split", architecture="resnet18",
                    input_spec=SPEC, cutoff=0.5, synthetic=True,
                    training={"split": {"key_check": key_check(), "rows": split_rows}})
    return root


def test_evaluate_reuses_the_saved_split(cohort, capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--manifest", str(cohort / "m.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--out", str(tmp_path / "ev"), "--device", "cpu")
    assert code == 0, err
    assert "test estimate (4 test); 4 other manifest row(s) not evaluated" in out
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        written = list(csv.DictReader(fh))
    assert [r["line"] for r in written] == ["6", "7", "8", "9"]  # manifest lines, not paths
    assert "s4.nii.gz" not in (tmp_path / "ev" / "predictions.csv").read_text()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["at_checkpoint_cutoff"]["cutoff"] == 0.5

    code, out, err = run(capsys, "evaluate", "--manifest", str(cohort / "m.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--split", "all", "--device", "cpu")
    assert code == 0, err
    assert "NOT A TEST ESTIMATE: all rows (4 test, 2 train, 2 validation)" in out


def test_evaluate_refuses_training_rows_as_test(cohort, capsys):
    text = (cohort / "m.csv").read_text().splitlines()
    leaky = cohort / "leaky.csv"
    leaky.write_text("\n".join([text[0] + ",split", *(line + ",test" for line in text[1:])]) + "\n")
    code, _, err = run(capsys, "evaluate", "--manifest", str(leaky), "--checkpoint", str(cohort / "ckpt"),
                       "--device", "cpu")
    assert code == 1
    assert "refusing to report 4 of 8 row(s) as test" in err and "2 train, 2 validation" in err
    assert "P0" not in err  # patients are never named by their identifier


def test_a_training_file_listed_from_another_folder_is_refused_as_test(cohort, capsys, tmp_path):
    """The same training and validation files, listed without a patient column from a manifest in another
    folder (other keys, so other row hashes): matched by content, refused as test, not called external."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "m.csv").write_text(f"path,label\n{cohort / 's0.nii.gz'},1\n{cohort / 's3.nii.gz'},0\n"
                                 f"{cohort / 's4.nii.gz'},1\n{cohort / 's5.nii.gz'},0\n")
    # Asked for as test by a split column: refused.
    (other / "asked.csv").write_text("".join(line + (",split\n" if i == 0 else ",test\n") for i, line in
                                             enumerate((other / "m.csv").read_text().splitlines())))
    code, out, err = run(capsys, "evaluate", "--manifest", str(other / "asked.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--device", "cpu")
    assert code == 1 and "refusing to report 2 of 4 row(s) as test" in err and "1 train, 1 validation" in err, err
    assert "line(s) 2, 3)" in err and "s0.nii" not in err
    # Without one: recognised and set aside; only the held-out row is reported as test.
    code, out, err = run(capsys, "evaluate", "--manifest", str(other / "m.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--device", "cpu")
    assert code == 0 and "test estimate (2 test); 2 other manifest row(s) not evaluated" in out, err
    code, out, err = run(capsys, "evaluate", "--manifest", str(other / "m.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--split", "all", "--device", "cpu")
    assert code == 0 and "NOT A TEST ESTIMATE: all rows (2 test, 1 train, 1 validation)" in out, err

    # A new file without a patient identity: unverified, never test; with a patient identity: external.
    volume = synthetic_volume_object(Subject(responder=True), seed=99, spacing=8.0, shape=(20, 24, 24))
    nib.save(nib.Nifti1Image(volume.array, volume.ras_affine), other / "new.nii.gz")
    (other / "new.csv").write_text(f"path,label\n{cohort / 's5.nii.gz'},0\nnew.nii.gz,1\n")
    code, _, err = run(capsys, "evaluate", "--manifest", str(other / "new.csv"), "--checkpoint",
                       str(cohort / "ckpt"), "--device", "cpu")
    assert code == 1 and "1 of 2 row(s) as test: they cannot be checked" in err and "line(s) 3)" in err, err
    code, out, err = run(capsys, "evaluate", "--manifest", str(other / "new.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--split", "all", "--device", "cpu")
    assert code == 0 and "NOT A TEST ESTIMATE" in out and "1 unverified row(s)" in out, err
    (other / "named.csv").write_text(f"path,label,patient\n{cohort / 's5.nii.gz'},0,Q8\nnew.nii.gz,1,Q9\n")
    code, out, err = run(capsys, "evaluate", "--manifest", str(other / "named.csv"), "--checkpoint",
                         str(cohort / "ckpt"), "--device", "cpu")
    assert code == 0 and "test estimate (1 external, 1 test)" in out, err


@pytest.mark.parametrize("split, match", [
    ("rows", "not an object"),
    ({"rows": "a,b"}, "`rows` is not a list"),
    ({"rows": ["a"]}, "row 1 is not an object"),
    ({"rows": [{"digest": "d", "patient": "p", "role": "train"}, {"key": "b", "role": "test"}]}, "row 2 has no digest"),
    ({"rows": [{"digest": "d", "patient": "p", "role": "holdout"}]}, "role 'holdout'"),
    ({"rows": [{"digest": "d", "patient": "p", "role": "train"}]}, "no key_check"),
])
def test_malformed_saved_split_is_a_checkpoint_error(split, match):
    with pytest.raises(CheckpointError, match=match):
        SavedSplit.from_training({"split": split})
    # A split recorded before digests (plain keys, no key check) is not malformed: it cannot be matched (None).
    assert SavedSplit.from_training({"split": {"rows": [{"key": "a", "patient": "p", "role": "train"}]}}) is None


def test_malformed_sidecar_split_through_evaluate(cohort, capsys, tmp_path):
    save_checkpoint(tmp_path / "ckpt", build_network("resnet18"), name="bad", architecture="resnet18",
                    input_spec=SPEC, cutoff=0.5, synthetic=True,
                    training={"split": {"key_check": key_check(), "rows": [{"digest": "d", "role": "train"}]}})
    code, _, err = run(capsys, "evaluate", "--manifest", str(cohort / "m.csv"), "--checkpoint", str(tmp_path / "ckpt"),
                       "--device", "cpu")
    assert code == 1 and "saved split (sidecar training.split) is malformed: row 1 has no patient" in err


def test_a_split_saved_under_another_patient_key_is_refused(monkeypatch, tmp_path):
    training = _saved_training()
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "other-key"))
    with pytest.raises(CheckpointError, match="another patient pseudonym key"):
        SavedSplit.from_training(training)
