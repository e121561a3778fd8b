"""The synthetic demo model: the paper's ResNet18 trained on synthetic heads.

Built by our own code in about a minute on two CPU cores: a coarse input spec
(6 mm, 28 x 36 x 36: the head, cropped from the scanner's field of view; it is
written into the checkpoint's sidecar, so inference preprocesses to it too),
heads rendered at 3 mm, no augmentation, and training stops once the
validation heads are separated. Three disjoint sets of synthetic heads:
training, validation (picks the epoch and the cutoff) and test (the held-out
AUC in the sidecar, used for nothing else). Its checkpoint says
`synthetic: true`, and every SR it produces says so. The held-out AUC
measures only whether the network finds the planted synthetic feature; it
says nothing about migraine.

Heavy imports (torch, MONAI) happen inside the functions, so a caller can say
what it is doing before they load.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from model.metrics import youden_midpoint

if TYPE_CHECKING:
    from model.preprocess import InputSpec

DEMO_NAME = "migraine-node-demo-resnet18-synthetic"
DEMO_SPACING_MM = 6.0
DEMO_SHAPE = (28, 36, 36)  # 168 x 216 x 216 mm: the head, centred in the scanner's field of view
# Stop once the validation heads are separated (AUC) in two epochs running.
STOP_AUC, STOP_AFTER = 0.99, 2


def default_demo_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "demo"


def demo_input_spec() -> InputSpec:
    from model.preprocess import InputSpec

    return InputSpec(spacing=(DEMO_SPACING_MM,) * 3, shape=DEMO_SHAPE)


def synthetic_items(n: int, seed: int, spec: InputSpec | None = None, source_spacing: float = 3.0,
                    jitter: bool = False) -> list:
    """n preprocessed synthetic subjects, half responders, each a different head.

    The heads are rendered at `source_spacing` over the field of view of the
    scanner's 3D T1 (170 x 256 x 256 mm) and go through the same preprocessing
    as a received series. With `jitter` (training heads) the grid is moved off
    the head's centre by up to half a voxel per axis: every head is centred
    the same way, and without it the network learned where the voxel
    boundaries fall (a 1 mm move of the grid then changed a borderline
    probability by 0.15).
    """
    import numpy as np

    from model.preprocess import build_transform
    from model.synth import Subject, synthetic_volume_object

    spec = spec or demo_input_spec()
    rng = np.random.default_rng(seed)
    transform = build_transform(spec)
    shape = (round(170 / source_spacing), round(256 / source_spacing), round(256 / source_spacing))
    items = []
    for i in range(n):
        responder = i % 2 == 0
        volume = synthetic_volume_object(
            Subject.random(rng, responder), seed=seed * 10_000 + i, spacing=source_spacing, shape=shape
        )
        offset = rng.uniform(-0.5, 0.5, 3) * np.asarray(spec.spacing) if jitter else None
        items.append((transform(volume, centre_offset_mm=offset).tensor, int(responder)))
    return items


def _print(line: str) -> None:
    print(line, flush=True)


def build_demo_model(
    out_dir: Path, n_train: int = 48, n_validation: int = 16, n_test: int = 24, epochs: int = 14, seed: int = 0,
    progress: bool = True, source_spacing: float = 3.0, spec: InputSpec | None = None,
    report: Callable[[str], None] | None = None,
):  # noqa: ANN201  model.checkpoint.ModelInfo
    """Train on synthetic heads, pick the epoch and the cutoff on validation heads, test on others.

    Progress goes to `report` (default: printed when `progress`), one line per
    step and per epoch. Only weights.pt and model.json stay in `out_dir`:
    nothing is kept for resuming.
    """
    say = report or (_print if progress else (lambda _line: None))
    started = time.monotonic()

    def elapsed() -> str:
        return f"{time.monotonic() - started:.0f} s"

    total = n_train + n_validation + n_test
    say(f"building the synthetic demo model: generating {total} synthetic heads "
        f"({n_train} training, {n_validation} validation, {n_test} held-out test) ...")
    # OpenMP threads that sleep rather than spin while they wait: on cores shared with other work
    # (the first-run case) spinning threads took CPU from each other: with two busy processes beside
    # it the build took 100 s instead of 173 s, and alone it is no slower (50 s). Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from model.train import TrainConfig, train

    spec = spec or demo_input_spec()
    train_items = synthetic_items(n_train, seed=seed + 1, spec=spec, source_spacing=source_spacing, jitter=True)
    validation_items = synthetic_items(n_validation, seed=seed + 2, spec=spec, source_spacing=source_spacing)
    test_items = synthetic_items(n_test, seed=seed + 3, spec=spec, source_spacing=source_spacing)
    say(f"  {total} heads ready ({elapsed()}); training ResNet18 at {spec.spacing[0]:g} mm "
        f"{'x'.join(str(s) for s in spec.shape)} on {torch.get_num_threads()} CPU thread(s), at most {epochs} epochs")

    separated = []

    def on_epoch(record: dict) -> bool:
        auc = record["validation_auc"]
        separated.append(not math.isnan(auc) and auc >= STOP_AUC)
        done = len(separated) >= STOP_AFTER and all(separated[-STOP_AFTER:])
        say(f"  epoch {record['epoch'] + 1}/{record['epochs']}: training loss {record['loss']:.3f}, "
            f"validation AUC {auc:.3f} ({elapsed()})" + ("; validation heads separated, stopping" if done else ""))
        return done

    config = TrainConfig(architecture="resnet18", epochs=epochs, batch_size=8, lr=5e-4, seed=seed, augment=False,
                         device="auto")
    train(
        train_items,
        validation_items,  # train() keeps the epoch with the best AUC on this set, and its cutoff
        spec,
        config,
        out_dir,
        name=DEMO_NAME,
        synthetic=True,
        progress=False,
        on_epoch=on_epoch,
        resumable=False,
        extra_summary={"data": "synthetic phantoms with a planted feature (model/synth.py); not patient data"},
    )
    # train() already recomputed the batch-norm statistics over the training heads (model.train.recompute_batchnorm).
    say(f"  choosing the cutoff on the validation heads, testing ({elapsed()})")
    info = calibrate_cutoff(out_dir, validation_items, test_items, seconds=time.monotonic() - started)
    say(f"  done in {elapsed()}: held-out synthetic test AUC {info.training['test_auc']} on {n_test} heads "
        f"(planted synthetic feature; no clinical meaning), cutoff {info.cutoff:.3f}")
    return info


def calibrate_cutoff(out_dir: Path, validation: list, test: list | None = None, seconds: float | None = None,
                     batchnorm_items: list | None = None):  # noqa: ANN201
    """Rewrite the checkpoint with the validation set's Youden cutoff and, given `test`, its AUC on
    those held-out heads (which chose nothing). `train` has already recomputed the BatchNorm statistics
    over the training heads; given `batchnorm_items`, they are recomputed over those instead (the weights'
    sha256 then changes; otherwise it stays)."""
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.train import auc_of, recompute_batchnorm

    model, info = load_checkpoint(out_dir)
    device = torch.device("cpu")
    if batchnorm_items:
        recompute_batchnorm(model, batchnorm_items)
    validation_auc, scores = auc_of(model, validation, device)
    cutoff = min(max(youden_midpoint([y for _, y in validation], scores), 0.0), 1.0)
    training = {**info.training, "cutoff": "midpoint of the Youden-optimal interval on the validation set",
                "validation_scores": [round(s, 4) for s in scores]}
    if batchnorm_items:
        training["batchnorm"] = f"running statistics recomputed over the {len(batchnorm_items)} training heads"
    if test is not None:
        test_auc, test_scores = auc_of(model, test, device)
        training.update({
            "validation_auc_at_best_epoch": training.pop("validation_auc", None),  # as train() recorded it
            "validation_auc": None if math.isnan(validation_auc) else round(validation_auc, 4),
            "validation_loss_at_best_epoch": training.pop("validation_loss", None),
            "n_validation": len(validation),
            "validation_positives": sum(y for _, y in validation),
            "test_auc": None if math.isnan(test_auc) else round(test_auc, 4),
            "n_test": len(test),
            "test_positives": sum(y for _, y in test),
            "test_accuracy_at_cutoff": round(
                sum((s >= cutoff) == bool(y) for s, (_, y) in zip(test_scores, test)) / len(test), 4),
            "test_scores": [round(s, 4) for s in test_scores],
            "test": "held-out synthetic heads, used neither for training nor for choosing the epoch or cutoff",
        })
    if seconds is not None:
        training["build_seconds"] = round(seconds, 1)
    return save_checkpoint(out_dir, model, name=info.name, architecture=info.architecture,
                           input_spec=info.input_spec, cutoff=cutoff, synthetic=True, training=training)
