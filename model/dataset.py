"""Dataset manifests: `path,label[,split]` CSV -> preprocessed tensors.

path: a DICOM series folder, one multi-frame DICOM file or a NIfTI file,
relative to the manifest's folder unless absolute. label: `responder` or
`non-responder` (1/0 accepted). split: `train` or `test` (`val` is read as
test); without a split column the rows are split 4:1 (train:test) stratified
by label with the given seed, as in the paper.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.preprocess import InputSpec, build_transform, preprocess
from model.volume import load_volume

_LABELS = {"responder": 1, "1": 1, "non-responder": 0, "nonresponder": 0, "non_responder": 0, "0": 0}
_SPLITS = {"train": "train", "test": "test", "val": "test", "validation": "test"}


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the row."""


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    label: int
    split: str | None


def read_manifest(path: Path) -> list[ManifestRow]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise ManifestError(f"{path}: the header must name the columns path,label[,split]")
    rows = []
    for number, raw in enumerate(reader, start=2):
        entry = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        label = _LABELS.get(entry["label"].lower())
        if label is None:
            raise ManifestError(f"{path}:{number}: label {entry['label']!r} is not responder/non-responder")
        split = entry.get("split") or None
        if split is not None:
            if split.lower() not in _SPLITS:
                raise ManifestError(f"{path}:{number}: split {split!r} is not train/test")
            split = _SPLITS[split.lower()]
        item = Path(entry["path"])
        item = item if item.is_absolute() else path.parent / item
        if not item.exists():
            raise ManifestError(f"{path}:{number}: {item} does not exist")
        rows.append(ManifestRow(item, label, split))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def stratified_split(labels: list[int], seed: int, test_fraction: float = 0.2) -> list[str]:
    """'train'/'test' per row, 4:1 within each class (at least one test row per class)."""
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(labels)
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        n_test = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        for i in idx[:n_test]:
            splits[i] = "test"
    return splits


def assign_splits(rows: list[ManifestRow], seed: int) -> list[ManifestRow]:
    if all(r.split for r in rows):
        return rows
    if any(r.split for r in rows):
        raise ManifestError("either every row has a split or none does")
    splits = stratified_split([r.label for r in rows], seed)
    return [ManifestRow(r.path, r.label, s) for r, s in zip(rows, splits)]


def load_tensors(
    rows: list[ManifestRow], spec: InputSpec, progress: Callable[[int], None] | None = None
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
