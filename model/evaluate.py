"""`evaluate`: the paper's Table 2 for a labelled set, from a checkpoint or
from predictions made elsewhere (CSV with columns label,probability)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from model.dataset import ManifestError, _LABELS
from model.metrics import BinaryMetrics, binary_metrics, format_table, plot_roc


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


def report(
    labels: list[int], scores: list[float], model_cutoff: float | None, out_dir: Path | None, title: str
) -> tuple[str, dict]:
    """Tables at the Youden cutoff (as the paper reports) and at the model's own cutoff."""
    youden: BinaryMetrics = binary_metrics(labels, scores)
    text = format_table(youden, f"{title} - Youden cutoff")
    result = {"title": title, "n": len(labels), "at_youden_cutoff": youden.to_json()}
    if model_cutoff is not None:
        fixed = binary_metrics(labels, scores, cutoff=model_cutoff)
        text += "\n\n" + format_table(fixed, f"{title} - model cutoff {model_cutoff:.2f}")
        result["at_model_cutoff"] = fixed.to_json()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_roc(labels, scores, out_dir / "roc.png", title=title)
        with open(out_dir / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["label", "probability"])
            writer.writerows(zip(labels, scores))
    return text, result
