"""`evaluate`: the paper's Table 2 for a labelled set, from a checkpoint or
from predictions made elsewhere (CSV with columns label,probability).

Honest by construction: the headline uses the cutoff stored in the
checkpoint (the one `predict` and the SR apply); the Youden cutoff of the
evaluated set is shown second and labelled optimistic. With a checkpoint
that saved its training split, a row is reported as test only if neither it
nor any scan of its patient was used for training or for choosing the epoch
and cutoff (`select_rows`). Rows are matched to the saved split by content
digest (wherever they are listed from), then by patient pseudonym; a row the
checkpoint never saw is external if it has a patient identity and unverified
(never test) if it has none.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import CheckpointError
from model.dataset import ROLES, ManifestError, ManifestRow, _LABELS, key_check, patient_key_path
from model.metrics import (
    BinaryMetrics,
    binary_metrics,
    calibration,
    format_table,
    plot_reliability,
    plot_roc,
)

TOUCHED = ("train", "validation")  # roles whose rows the model was fitted or tuned on
NOT_A_TEST_ESTIMATE = "NOT A TEST ESTIMATE"


class SplitLeakError(ValueError):
    """Rows the model trained or was tuned on were asked to be reported as test."""


def read_predictions(path: Path) -> tuple[list[int], list[float]]:
    path = Path(path)
    try:
        reader = csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines())
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    if reader.fieldnames is None or not {"label", "probability"} <= set(reader.fieldnames):
        raise ManifestError(f"{path}: the header must name the columns label,probability")
    labels, scores = [], []
    for number, row in enumerate(reader, start=2):
        label = _LABELS.get(row["label"].strip().lower())
        if label is None:
            raise ManifestError(f"{path}:{number}: label {row['label']!r} is not responder/non-responder")
        try:
            score = float(row["probability"])
        except ValueError:
            raise ManifestError(f"{path}:{number}: probability {row['probability']!r} is not a number") from None
        if not 0.0 <= score <= 1.0:
            raise ManifestError(f"{path}:{number}: probability {score} is outside 0..1")
        labels.append(label)
        scores.append(score)
    return labels, scores


_PRIORITY = {"train": 0, "validation": 1, "test": 2}  # a digest listed in several roles takes the touched one


def legacy_split(training: dict) -> bool:
    """Whether the sidecar holds a split recorded before content digests (its rows cannot be matched)."""
    split = training.get("split") if isinstance(training, dict) else None
    rows = split.get("rows") if isinstance(split, dict) else None
    return (isinstance(rows, list) and bool(rows) and "key_check" not in split
            and all(isinstance(r, dict) and "digest" not in r for r in rows))


@dataclass(frozen=True)
class SavedSplit:
    """The split a checkpoint was trained with (sidecar `training.split`)."""

    role_by_digest: dict[str, str]
    patient_by_digest: dict[str, str]
    roles_by_patient: dict[str, frozenset[str]]

    @classmethod
    def from_training(cls, training: dict) -> SavedSplit | None:
        """None without a split (or with one recorded before content digests); CheckpointError if malformed
        or recorded under another patient key."""
        if not isinstance(training, dict):
            raise CheckpointError("the checkpoint's sidecar `training` is not an object")
        split = training.get("split")
        if split is None or legacy_split(training):
            return None
        bad = "the checkpoint's saved split (sidecar training.split) is malformed"
        if not isinstance(split, dict):
            raise CheckpointError(f"{bad}: not an object")
        rows = split.get("rows")
        if rows is None or rows == []:
            return None
        if not isinstance(rows, list):
            raise CheckpointError(f"{bad}: `rows` is not a list")
        for n, r in enumerate(rows, start=1):
            if not isinstance(r, dict):
                raise CheckpointError(f"{bad}: row {n} is not an object")
            if r.get("role") not in ROLES:
                raise CheckpointError(f"{bad}: row {n} has role {r.get('role')!r}, not train/validation/test")
            for field in ("digest", "patient"):
                if not isinstance(r.get(field), str) or not r[field]:
                    raise CheckpointError(f"{bad}: row {n} has no {field}")
        check = split.get("key_check")
        if not isinstance(check, str):
            raise CheckpointError(f"{bad}: no key_check")
        if check != key_check():
            raise CheckpointError(
                f"the checkpoint's split was recorded under another patient pseudonym key than {patient_key_path()}: "
                "its patients cannot be matched. Set MIGRAINE_NODE_PATIENT_KEY_FILE to the key file the checkpoint "
                "was trained with")
        role_by_digest: dict[str, str] = {}
        patient_by_digest: dict[str, str] = {}
        by_patient: dict[str, set[str]] = {}
        for r in rows:
            by_patient.setdefault(r["patient"], set()).add(r["role"])
            old = role_by_digest.get(r["digest"])
            if old is None or _PRIORITY[r["role"]] < _PRIORITY[old]:
                role_by_digest[r["digest"]] = r["role"]
                patient_by_digest[r["digest"]] = r["patient"]
        return cls(role_by_digest, patient_by_digest, {p: frozenset(v) for p, v in by_patient.items()})


@dataclass(frozen=True)
class RowStatus:
    """What the checkpoint knows of one manifest row."""

    role: str  # train / validation / test, train-patient / validation-patient / test-patient (a scan the
    # checkpoint does not list, of a patient it does), external (unknown patient with a patient identity),
    # unverified (no saved split, or no patient identity and no content match: never test)
    touched: bool  # the row, or another scan of its patient, was trained or tuned on


def checkpoint_status(rows: Sequence[ManifestRow], saved: SavedSplit | None) -> list[RowStatus]:
    """Each row's role in the checkpoint's split, matched by content digest, then by patient.

    A scan unknown by content inherits its patient's roles; one without a
    patient identity that matches nothing is unverified.
    """
    if saved is None:
        return [RowStatus("unverified", False) for _ in rows]
    out = []
    for r in rows:
        role = saved.role_by_digest.get(r.digest) if r.digest else None
        patients = {r.patient} if r.patient else set()
        if role is not None:
            patients.add(saved.patient_by_digest[r.digest])
        patient_roles = frozenset().union(*(saved.roles_by_patient.get(p, frozenset()) for p in patients))
        touched = bool(patient_roles & set(TOUCHED))
        if role is None:
            known = [k for k in (*TOUCHED, "test") if k in patient_roles]
            role = f"{known[0]}-patient" if known else "external" if r.identified else "unverified"
        out.append(RowStatus(role, touched or role in TOUCHED))
    return out


@dataclass(frozen=True)
class Selection:
    """The rows to report and how to label the result."""

    indices: tuple[int, ...]
    label: str
    is_test_estimate: bool
    counts: dict
    set_aside: int = 0


def select_rows(
    rows: Sequence[ManifestRow], status: Sequence[RowStatus], split: str, manifest_has_split: bool
) -> Selection:
    """Rows for `--split` test/validation/train/all; raises SplitLeakError rather than call touched rows test.

    test: rows held out at training plus rows the checkpoint never saw
    (external). With a split column in the manifest, exactly its test rows
    are asked for, and any of them that the model (or its patient) trained
    or was tuned on is refused; without one, rows known to be training or
    validation rows are set aside and counted.
    """
    every = range(len(rows))
    if split == "all":
        chosen = tuple(every)
    elif split == "test":
        if manifest_has_split:
            chosen = tuple(i for i in every if rows[i].split == "test")
        else:
            chosen = tuple(i for i in every if status[i].role not in TOUCHED)
        leaked = [i for i in chosen if status[i].touched]
        if leaked:
            by_role = ", ".join(f"{n} {k}" for k, n in sorted(Counter(status[i].role for i in leaked).items()))
            patients = len({rows[i].patient for i in leaked})
            raise SplitLeakError(
                f"refusing to report {len(leaked)} of {len(chosen)} row(s) as test: the model was trained or tuned "
                f"on them or on another scan of their patient ({by_role}; {patients} patient(s); "
                f"manifest line(s) {_lines(rows, leaked)}). Remove them, or use "
                "--split all for a summary that is not a test estimate"
            )
        unverified = [i for i in chosen if status[i].role == "unverified"]
        if unverified:
            raise SplitLeakError(
                f"refusing to report {len(unverified)} of {len(chosen)} row(s) as test: they cannot be checked "
                "against the checkpoint's training data (no saved split, or no patient identity and no row of the "
                f"saved split with the same content; manifest line(s) {_lines(rows, unverified)}). Add a patient "
                "column, or use --split all for a summary that is not a test estimate"
            )
    else:
        chosen = tuple(i for i in every if status[i].role == split)
    counts = dict(sorted(Counter(status[i].role for i in chosen).items()))
    described = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no rows"
    unverified = counts.get("unverified", 0)
    if split == "test" and not unverified and chosen:
        label = f"test estimate ({described})"
        is_test = True
    elif unverified and unverified == len(chosen):
        label = (f"{described} rows: the checkpoint records no training split, so they cannot be checked against "
                 "its training data; a test estimate only if none of them was used to train or tune it")
        is_test = False
    else:
        label = f"{NOT_A_TEST_ESTIMATE}: {split} rows ({described})"
        if split == "validation":
            label += "; validation chose the epoch and the cutoff"
        if unverified:
            label += (f"; {unverified} unverified row(s) (no patient identity, no content match) cannot be checked "
                      "against the checkpoint's training data")
        is_test = False
    set_aside = len(rows) - len(chosen) if split == "test" else 0
    return Selection(chosen, label, is_test, counts, set_aside)


def _lines(rows: Sequence[ManifestRow], indices: Sequence[int], most: int = 10) -> str:
    shown = ", ".join(str(rows[i].line) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


def report(
    labels: list[int],
    scores: list[float],
    cutoff: float | None,
    out_dir: Path | None,
    title: str,
    *,
    cutoff_source: str = "checkpoint",
    evaluated: str | None = None,
    row_info: Sequence[dict] | None = None,
) -> tuple[str, dict]:
    """Metrics at the given (checkpoint) cutoff first, then at the evaluated set's Youden cutoff, then calibration.

    `row_info` adds per-row columns (manifest line, patient pseudonym, role) to predictions.csv.
    """
    sections = []
    result: dict = {"title": title, "n": len(labels), "evaluated": evaluated}
    fixed: BinaryMetrics | None = None
    if cutoff is not None:
        fixed = binary_metrics(labels, scores, cutoff=cutoff)
        what = "the checkpoint's cutoff, the one predict and the SR apply" if cutoff_source == "checkpoint" \
            else f"the {cutoff_source} cutoff"
        sections.append(format_table(fixed, f"{title}\nAt {what}: {cutoff:.3f}"))
        result["at_checkpoint_cutoff"] = {**fixed.to_json(), "source": cutoff_source}
    else:
        sections.append("No checkpoint cutoff (predictions made elsewhere; give --cutoff): the only table below uses "
                        "a cutoff chosen on the evaluated set itself.")
        result["at_checkpoint_cutoff"] = None
    youden = binary_metrics(labels, scores)
    sections.append(format_table(youden, f"{title}\nAt the Youden cutoff: optimistic (chosen on the evaluated set)"))
    result["at_youden_cutoff_optimistic"] = youden.to_json()
    cal = calibration(labels, scores)
    bins = "\n".join(f"  {b.low:.2f}-{b.high:.2f}  n={b.n:<3d} mean predicted {b.mean_probability:.2f}  "
                     f"observed {b.observed_fraction:.2f}" for b in cal.bins)
    sections.append(f"Calibration: Brier score {cal.brier:.3f} (constant prevalence {cal.prevalence:.2f} predictor: "
                    f"{cal.brier_prevalence:.3f}; lower is better)\nReliability, equal-count bins:\n{bins}")
    result["calibration"] = cal.to_json()
    text = (f"{evaluated}\n\n" if evaluated else "") + "\n\n".join(sections)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_roc(labels, scores, out_dir / "roc.png", title=title, operating_point=fixed or youden,
                 point_label=None if fixed else f"Youden cutoff {youden.cutoff:.2f} (optimistic)")
        plot_reliability(cal, out_dir / "reliability.png", title=f"Reliability: {title}")
        extra = list(row_info[0]) if row_info else []
        with open(out_dir / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([*extra, "label", "probability", *(["predicted"] if cutoff is not None else [])])
            for i, (y, p) in enumerate(zip(labels, scores)):
                predicted = (["responder" if p >= cutoff else "non-responder"] if cutoff is not None else [])
                writer.writerow([*(row_info[i][k] for k in extra), y, p, *predicted])
    return text, result
