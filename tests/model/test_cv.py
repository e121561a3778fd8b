"""Nested, patient-grouped, label-stratified cross-validation."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.cv import FoldPlanError, fold_assignment, fold_roles, plan_folds, pooled_metrics, run_cross_validation
from model.dataset import ManifestRow, key_hash, patient_hash
from model.metrics import delong_ci
from model.train import TrainConfig, predict_scores
from tests.model.test_train import SPEC, tiny_items


def _cohort(n_patients: int, two_scans_every: int = 3) -> tuple[list[str], list[int]]:
    patients, labels = [], []
    for i in range(n_patients):
        for _ in range(2 if i % two_scans_every == 0 else 1):
            patients.append(f"p{i:03d}")
            labels.append(int(i % 2 == 0))
    return patients, labels


@pytest.mark.parametrize("n_patients, k", [(40, 5), (23, 4), (111, 5)])
def test_folds_are_grouped_stratified_and_each_row_out_of_fold_once(n_patients, k):
    patients, labels = _cohort(n_patients)
    folds = fold_assignment(patients, labels, k, seed=7)
    fold_of = defaultdict(set)
    for p, f in zip(patients, folds):
        fold_of[p].add(f)
    assert all(len(f) == 1 for f in fold_of.values())  # every scan of a patient in one fold
    assert set(folds) == set(range(k))
    # Each class's patients spread evenly: per-fold counts differ by at most one.
    for cls in (0, 1):
        per_fold = Counter(next(iter(fold_of[p])) for p in {p for p, y in zip(patients, labels) if y == cls})
        assert max(per_fold.values()) - min(per_fold.get(f, 0) for f in range(k)) <= 1
    # Fold sizes in patients differ by at most one too.
    sizes = Counter(next(iter(f)) for f in fold_of.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    # Each row is test in exactly one fold; in the others it is train or validation, never with its patient split.
    tested = Counter()
    for fold in range(k):
        roles = fold_roles(patients, labels, folds, fold, seed=fold)
        for i, r in enumerate(roles):
            tested[i] += r == "test"
            assert (r == "test") == (folds[i] == fold)
        by_patient = defaultdict(set)
        for p, r in zip(patients, roles):
            by_patient[p].add(r)
        assert all(len(r) == 1 for r in by_patient.values())
        assert {y for y, r in zip(labels, roles) if r == "validation"} == {0, 1}
    assert set(tested.values()) == {1} and len(tested) == len(patients)


def test_fold_assignment_refuses_impossible_requests():
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_assignment(["a", "b"], [0, 1], 1, seed=0)
    with pytest.raises(ValueError, match="3 patients cannot fill 5 folds"):
        fold_assignment(["a", "b", "c", "c"], [0, 1, 1, 1], 5, seed=0)
    with pytest.raises(ValueError, match="conflicting labels"):
        fold_assignment(["a", "a", "b"], [0, 1, 1], 2, seed=0)


def test_pooled_metrics_label_each_row_at_its_own_fold_cutoff():
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.6, 0.7, 0.2, 0.4, 0.35, 0.8, 0.5]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    cutoffs = [0.65] * 4 + [0.3] * 4
    pooled = pooled_metrics(labels, scores, cutoffs, folds)
    m = pooled.metrics
    # Fold 0 at 0.65: TP 0.9, 0.7; TN 0.6, 0.2. Fold 1 at 0.3: TP 0.4, 0.8; FP 0.35, 0.5.
    assert (m.tp, m.fp, m.tn, m.fn) == (4, 2, 2, 0)
    assert m.sensitivity == 1.0 and m.specificity == 0.5 and m.accuracy == 0.75
    # One single cutoff could not give this: at 0.3 or at 0.65 the confusion differs.
    auc, low, high = delong_ci(labels, scores)
    assert (m.auc, m.auc_ci_low, m.auc_ci_high) == pytest.approx((auc, low, high))
    assert auc == pytest.approx(14 / 16)
    assert pooled.fold_aucs == pytest.approx((1.0, 0.75))
    assert pooled.calibration.n == 8


def test_cross_validation_end_to_end(tmp_path):
    """3 folds on 9 patients (3 with two scans), tiny tensors, 1 epoch each: files, each row once, honest scores."""
    items = tiny_items(12, seed=5)
    patients = [f"MRNZQX{i}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 3, 6)]  # distinctive: must appear nowhere
    labels = [y for _, y in items]
    label_of = {}
    for p, y in zip(patients, labels):
        label_of.setdefault(p, y)
    items = [(x, label_of[p]) for (x, _), p in zip(items, patients)]  # one label per patient
    rows = [ManifestRow(Path(f"s{i}"), y, None, patient_hash(p), f"DOE^ZEBEDIAH_{i}/s{i}", i + 2, True, f"d{i}")
            for i, ((_, y), p) in enumerate(zip(items, patients))]
    config = TrainConfig(epochs=1, batch_size=4, seed=0, device="cpu", augment=False)
    pooled, folds, summary = run_cross_validation(rows, items, SPEC, config, tmp_path, 3, name="cv", manifest="m.csv",
                                                  progress=False, say=lambda line: None)
    for fold in range(1, 4):  # no resume state: only the fold's checkpoint stays
        assert sorted(p.name for p in (tmp_path / f"fold-{fold}").iterdir()) == ["model.json", "weights.pt"]
    with open(tmp_path / "cv_predictions.csv") as fh:
        written = list(csv.DictReader(fh))
    assert sorted(int(r["line"]) for r in written) == sorted(r.line for r in rows)  # every row exactly once
    on_disk = json.loads((tmp_path / "cv.json").read_text())
    assert on_disk["n_patients"] == 9 and len(on_disk["per_fold"]) == 3
    assert {"at_own_fold_cutoff", "calibration"} <= set(on_disk["pooled"])
    assert (tmp_path / "roc.png").exists() and (tmp_path / "reliability.png").exists()
    hashes = {patient_hash(p) for p in patients}
    for fold in on_disk["per_fold"]:
        roles = fold["patients"]
        assert set(roles["train"]) | set(roles["validation"]) | set(roles["test"]) == hashes
        assert not (set(roles["train"]) | set(roles["validation"])) & set(roles["test"])
        # The fold's checkpoint: its sidecar split says test = this fold's rows, and its scores are what was pooled.
        model, info = load_checkpoint(Path(fold["checkpoint"]))
        test_keys = [r["key"] for r in info.training["split"]["rows"] if r["role"] == "test"]
        mine = [r for r in written if int(r["fold"]) == fold["fold"]]
        index = {str(r.line): i for i, r in enumerate(rows)}
        assert sorted(test_keys) == sorted(key_hash(rows[index[r["line"]]].key) for r in mine)
        assert float(mine[0]["cutoff"]) == pytest.approx(info.cutoff, abs=1e-6)
        again = predict_scores(model, [items[index[r["line"]]][0] for r in mine], torch.device("cpu"))
        assert again == pytest.approx([float(r["probability"]) for r in mine], abs=1e-5)
    assert summary["pooled"]["at_own_fold_cutoff"]["n"] == 12 == pooled.metrics.n
    # No patient identifier and no manifest path (patient names) in any output.
    outputs = [tmp_path / "cv.json", tmp_path / "cv_predictions.csv",
               *(tmp_path / f"fold-{f}" / "model.json" for f in range(1, 4))]
    for path in outputs:
        text = path.read_text()
        assert "MRNZQX" not in text and "ZEBEDIAH" not in text, path

    # --resume reuses the finished folds (same settings and split) instead of training them again.
    said: list[str] = []
    _, again_folds, _ = run_cross_validation(rows, items, SPEC, config, tmp_path, 3, name="cv", manifest="m.csv",
                                             progress=False, resume=True, say=said.append)
    assert sum("reused" in line for line in said) == 3
    assert [f.model_id for f in again_folds] == [f.model_id for f in folds]
    run_cross_validation(rows, items, SPEC, replace(config, lr=1e-3), tmp_path, 3, name="cv", manifest="m.csv",
                         progress=False, resume=True, say=said.append)
    assert sum("reused" in line for line in said) == 3  # other settings: every fold trained again


def _plan_rows(n_responders: int, n_non: int) -> list[ManifestRow]:
    labels = [1] * n_responders + [0] * n_non
    return [ManifestRow(Path(f"s{i}"), y, None, patient_hash(f"P{i}"), f"s{i}", i + 2, True, f"d{i}")
            for i, y in enumerate(labels)]


def test_every_fold_is_checked_before_any_trains(tmp_path, monkeypatch):
    """Two responders in three folds: a fold holding one of them leaves one responder outside it, which cannot
    be in both its training and its validation split. Refused up front, naming the fold, with nothing trained."""
    rows = _plan_rows(2, 7)
    with pytest.raises(FoldPlanError, match=r"fold \d of 3: its (train|validation) split needs both"):
        plan_folds(rows, 3, seed=0)
    folds = fold_assignment([r.patient for r in rows], [r.label for r in rows], 3, 0)
    assert len(set(folds)) == 3
    calls = []
    monkeypatch.setattr("model.train.train", lambda *a, **k: calls.append(a) or pytest.fail("trained"))
    items = tiny_items(9, seed=1)
    with pytest.raises(FoldPlanError, match=r"fold \d of 3"):
        run_cross_validation(rows, items, SPEC, TrainConfig(epochs=1, device="cpu"), tmp_path, 3, name="cv",
                             manifest="m.csv", progress=False, say=lambda line: None)
    assert calls == [] and not list(tmp_path.iterdir())
    folds, plans = plan_folds(_plan_rows(6, 6), 3, seed=0)  # enough of each class: every fold plans
    assert len(plans) == 3 and all({"train", "validation", "test"} <= set(p) for p in plans)
