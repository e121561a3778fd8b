"""`train --folds K`: patient-grouped, label-stratified, nested K-fold cross-validation.

With ~100 patients one held-out test split of ~23 gives an AUC whose 95% CI
is about 0.36 wide (the paper's 0.64-1.00), and choosing anything on it
inflates it. Here every patient is tested exactly once, by a model that
never saw them: each fold's patients are the test set; inside the other
folds a patient-grouped validation split picks the epoch and the cutoff
(nested), so nothing about a row's own prediction was tuned on it. The
pooled out-of-fold predictions give one AUC (DeLong CI) over all patients;
the other metrics label each row at its own fold's validation cutoff.

Fold assignment and pooling are pure functions; `run_cross_validation`
trains and writes files.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from model.dataset import VALIDATION_FRACTION, ManifestRow, grouped_stratified_roles, split_record
from model.metrics import (
    BinaryMetrics,
    Calibration,
    binary_metrics_per_row_cutoff,
    calibration,
    delong_auc_variance,
    format_table,
    plot_reliability,
    plot_roc,
)


def fold_assignment(patients: Sequence[str], labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Fold (0..k-1) per row: all rows of a patient in one fold, each label spread evenly over the folds.

    Each class's patients are shuffled and dealt round-robin, the second
    class starting where the first stopped, so fold sizes differ by at most one patient.
    """
    label_of: dict[str, int] = {}
    for p, y in zip(patients, labels):
        if label_of.setdefault(p, int(y)) != int(y):
            raise ValueError(f"patient {p} has conflicting labels")
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(label_of) < k:
        raise ValueError(f"{len(label_of)} patients cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for cls in (0, 1):
        group = sorted(p for p, y in label_of.items() if y == cls)
        rng.shuffle(group)
        for i, p in enumerate(group):
            fold_of[p] = (start + i) % k
        start = (start + len(group)) % k
    return [fold_of[p] for p in patients]


def fold_roles(patients: Sequence[str], labels: Sequence[int], folds: Sequence[int], fold: int, seed: int) -> list[str]:
    """Roles for one fold: its rows are test; the others split by patient into train and validation."""
    outside = [i for i, f in enumerate(folds) if f != fold]
    inner = grouped_stratified_roles([patients[i] for i in outside], [labels[i] for i in outside], seed,
                                     test_fraction=0.0, validation_fraction=VALIDATION_FRACTION)
    roles = ["test"] * len(patients)
    for i, role in zip(outside, inner):
        roles[i] = role
    return roles


class FoldPlanError(ValueError):
    """A fold cannot be trained (a class missing from its training or validation split, or no test rows)."""


def plan_folds(rows: Sequence[ManifestRow], k: int, seed: int) -> tuple[list[int], list[list[str]]]:
    """Every fold's roles, checked before anything is preprocessed or trained.

    Returns the fold of each row and, per fold, each row's role. Raises
    FoldPlanError naming the first fold whose training or validation split
    lacks a class or which has no test rows.
    """
    patients = [r.patient for r in rows]
    labels = [r.label for r in rows]
    folds = fold_assignment(patients, labels, k, seed)
    plans = []
    for fold in range(k):
        roles = fold_roles(patients, labels, folds, fold, seed=seed * 1000 + fold)
        if "test" not in roles:
            raise FoldPlanError(f"fold {fold + 1} of {k} has no test rows")
        for role in ("train", "validation"):
            members = [y for y, r in zip(labels, roles) if r == role]
            if len(set(members)) < 2:
                raise FoldPlanError(
                    f"fold {fold + 1} of {k}: its {role} split needs both responders and non-responders "
                    f"({len(members)} rows, {sum(members)} responders); use fewer folds or more patients")
        plans.append(roles)
    return folds, plans


@dataclass(frozen=True)
class Pooled:
    """Out-of-fold metrics over all rows."""

    metrics: BinaryMetrics  # AUC of the pooled scores; the rest at each row's own fold cutoff
    calibration: Calibration
    fold_aucs: tuple[float | None, ...]  # per fold (None where a fold holds one class)


def pooled_metrics(labels: Sequence[int], scores: Sequence[float], cutoffs: Sequence[float],
                   folds: Sequence[int]) -> Pooled:
    """Pool out-of-fold predictions; each row is labelled at the cutoff its own fold's validation chose."""
    fold_aucs = []
    for f in sorted(set(folds)):
        ys = [y for y, g in zip(labels, folds) if g == f]
        ss = [s for s, g in zip(scores, folds) if g == f]
        fold_aucs.append(delong_auc_variance(ys, ss)[0] if len(set(ys)) == 2 else None)
    return Pooled(binary_metrics_per_row_cutoff(labels, scores, cutoffs), calibration(labels, scores),
                  tuple(fold_aucs))


@dataclass(frozen=True)
class FoldResult:
    fold: int  # 1-based, as in the folder name
    checkpoint: str
    model_id: str
    best_epoch: int
    validation_auc: float | None
    cutoff: float
    test_rows: tuple[int, ...]
    scores: tuple[float, ...]
    patients: dict  # role -> sorted patient hashes


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def format_cv(pooled: Pooled, folds: Sequence[FoldResult], k: int) -> str:
    """The pooled table (the paper's layout) and one line per fold."""
    m = pooled.metrics
    lines = [format_table(m, f"{k}-fold cross-validation, pooled out-of-fold predictions "
                             f"({m.n} rows, each predicted once by a model that never saw its patient)",
                          cutoff_text="each fold's own (validation)")]
    cal = pooled.calibration
    lines.append(f"Brier score {cal.brier:.3f} (constant prevalence predictor {cal.brier_prevalence:.3f})")
    defined = [a for a in pooled.fold_aucs if a is not None]
    if len(defined) > 1:
        lines.append(f"Fold AUCs: mean {np.mean(defined):.3f}, SD {np.std(defined, ddof=1):.3f}")
        if np.mean(defined) - m.auc > 0.1:
            cutoffs = [f.cutoff for f in folds]
            lines.append(f"The pooled AUC is well below the folds' mean: the fold models score on different scales "
                         f"(cutoffs {min(cutoffs):.2f}-{max(cutoffs):.2f}), so their scores rank poorly against each "
                         "other; the metrics at each fold's own cutoff above do not suffer from that.")
    lines.append("fold  test rows  best epoch  validation AUC  cutoff  fold test AUC")
    for f, auc in zip(folds, pooled.fold_aucs):
        lines.append(f"{f.fold:>4}  {len(f.test_rows):>9}  {f.best_epoch:>10}  {_fmt(f.validation_auc):>14}  "
                     f"{f.cutoff:>6.3f}  {_fmt(auc):>13}")
    return "\n".join(lines)


def run_cross_validation(
    rows: Sequence[ManifestRow],
    items: Sequence,
    spec,  # noqa: ANN001  model.preprocess.InputSpec
    config,  # noqa: ANN001  model.train.TrainConfig
    out_dir: Path,
    k: int,
    *,
    name: str,
    manifest: str,
    resume: bool = False,
    resumable: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[Pooled, list[FoldResult], dict]:
    """Train one model per fold under OUT/fold-N/ and write cv.json, cv_predictions.csv, roc.png, reliability.png.

    Each fold keeps only weights.pt and model.json: no resume state (~400 MB a
    fold at ResNet18's size) unless `resumable`. Each fold's sidecar records
    its test rows' AUC, scored once at the end; with `resume`, a fold whose
    sidecar has them, for the same settings and split, is reused and not
    trained again (an unfinished fold starts over).
    """
    from model.checkpoint import load_checkpoint
    from model.predict import resolve_device
    from model.train import predict_scores, train

    out_dir = Path(out_dir)
    patients = [r.patient for r in rows]
    labels = [r.label for r in rows]
    folds, plans = plan_folds(rows, k, config.seed)  # every fold checked before any trains
    device = resolve_device(config.device)
    results: list[FoldResult] = []
    for fold in range(k):
        roles = plans[fold]
        fold_rows = [replace(r, split=role) for r, role in zip(rows, roles)]
        method = (f"fold {fold + 1} of {k} (patient-grouped, label-stratified, seed {config.seed}): test = this "
                  f"fold's patients; validation = {VALIDATION_FRACTION:.0%} of the other patients by patient, "
                  f"stratified (seed {config.seed * 1000 + fold})")
        chosen = {role: [items[i] for i, r in enumerate(roles) if r == role] for role in ("train", "validation")}
        folder = out_dir / f"fold-{fold + 1}"
        test = tuple(i for i, f in enumerate(folds) if f == fold)
        split = split_record(fold_rows, method)
        if resume and _finished(folder, config, split):
            say(f"fold {fold + 1}/{k}: finished earlier, reused")
        else:
            train(chosen["train"], chosen["validation"], spec, config, folder, name=f"{name}-fold{fold + 1}",
                  test_items=[items[i] for i in test], synthetic=False, resume=resume and resumable,
                  progress=progress, resumable=resumable,
                  extra_summary={"manifest": manifest, "split": split, "cross_validation": {"fold": fold + 1,
                                                                                            "folds": k}})
        model, info = load_checkpoint(folder)
        scores = predict_scores(model.to(device), [items[i][0] for i in test], device)
        by_role = {role: sorted({p for p, r in zip(patients, roles) if r == role}) for role in
                   ("train", "validation", "test")}
        result = FoldResult(fold + 1, str(folder), info.model_id, int(info.training.get("best_epoch", -1)),
                            info.training.get("validation_auc"), info.cutoff, test, tuple(scores), by_role)
        results.append(result)
        say(f"fold {fold + 1}/{k}: best epoch {result.best_epoch} (validation AUC {_fmt(result.validation_auc)}), "
            f"cutoff {result.cutoff:.3f}, {len(test)} out-of-fold rows scored")
    n = len(rows)
    scores = [math.nan] * n
    cutoffs = [math.nan] * n
    for f in results:
        for i, s in zip(f.test_rows, f.scores):
            scores[i], cutoffs[i] = s, f.cutoff
    pooled = pooled_metrics(labels, scores, cutoffs, folds)
    summary = cv_summary(rows, folds, pooled, results, k, config, manifest)
    write_outputs(out_dir, rows, folds, scores, cutoffs, pooled, summary)
    return pooled, results, summary


def _finished(folder: Path, config, split: dict) -> bool:  # noqa: ANN001  model.train.TrainConfig
    """Whether `folder` holds a fold that trained to the end (its test rows scored) with these settings and split."""
    from model.checkpoint import read_info

    try:
        training = read_info(folder).training
    except (OSError, ValueError, KeyError):
        return False
    return ("test_scored" in training and all(training.get(k) == v for k, v in asdict(config).items())
            and training.get("split", {}).get("rows") == split["rows"])


def cv_summary(rows: Sequence[ManifestRow], folds: Sequence[int], pooled: Pooled, results: Sequence[FoldResult],
               k: int, config, manifest: str) -> dict:  # noqa: ANN001
    """cv.json: method, pooled and per-fold numbers, and each fold's patients (hashes) by role."""
    m = pooled.metrics
    defined = [a for a in pooled.fold_aucs if a is not None]
    return {
        "folds": k,
        "method": "patient-grouped, label-stratified K-fold; nested: inside each fold's training patients a "
                  f"patient-grouped, stratified {VALIDATION_FRACTION:.0%} validation split chooses the epoch "
                  "(best validation AUC) and the cutoff (Youden midpoint); every row is predicted once, by the "
                  "model of the fold that held its patient out",
        "manifest": manifest,
        "config": asdict(config),
        "n_rows": len(rows),
        "n_patients": len({r.patient for r in rows}),
        "pooled": {
            "at_own_fold_cutoff": {**m.to_json(), "cutoff": "each row at its own fold's validation cutoff"},
            "calibration": pooled.calibration.to_json(),
            "fold_auc_mean": round(float(np.mean(defined)), 4) if defined else None,
            "fold_auc_sd": round(float(np.std(defined, ddof=1)), 4) if len(defined) > 1 else None,
        },
        "per_fold": [
            {"fold": f.fold, "checkpoint": f.checkpoint, "model_id": f.model_id, "best_epoch": f.best_epoch,
             "validation_auc": f.validation_auc, "cutoff": f.cutoff, "test_rows": len(f.test_rows),
             "test_positives": sum(rows[i].label for i in f.test_rows),
             "test_auc": None if auc is None else round(auc, 4), "patients": f.patients}
            for f, auc in zip(results, pooled.fold_aucs)
        ],
        "fold_of_patient": {r.patient: f + 1 for r, f in sorted(zip(rows, folds), key=lambda t: t[0].patient)},
    }


def write_outputs(out_dir: Path, rows: Sequence[ManifestRow], folds: Sequence[int], scores: Sequence[float],
                  cutoffs: Sequence[float], pooled: Pooled, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out_dir / "cv_predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["line", "patient", "fold", "label", "probability", "cutoff", "predicted"])
        for r, f, s, c in zip(rows, folds, scores, cutoffs):
            writer.writerow([r.line, r.patient, f + 1, r.label, round(s, 6), round(c, 6),
                             "responder" if s >= c else "non-responder"])
    labels = [r.label for r in rows]
    plot_roc(labels, scores, out_dir / "roc.png", title=f"{summary['folds']}-fold CV, pooled out-of-fold",
             operating_point=pooled.metrics, point_label="Each fold's own cutoff")
    plot_reliability(pooled.calibration, out_dir / "reliability.png", title="Reliability, pooled out-of-fold")
