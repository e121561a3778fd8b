"""The synthetic demo model: the paper's ResNet18 trained on synthetic heads.

Built by our own code at a reduced input spec (4 mm, 44x64x64) so it finishes
in minutes on two CPU cores. Its checkpoint says `synthetic: true`, and every
SR it produces says so. Its held-out AUC measures only whether the network
finds the planted synthetic feature; it says nothing about migraine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.checkpoint import ModelInfo
from model.preprocess import DEMO_SPEC, InputSpec, build_transform, preprocess
from model.synth import Subject, synthetic_volume_object
from model.train import TrainConfig, train

DEMO_NAME = "migraine-node-demo-resnet18-synthetic"


def default_demo_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "demo"


def synthetic_items(n: int, seed: int, spec: InputSpec = DEMO_SPEC) -> list:
    """n preprocessed synthetic subjects, half responders, each a different head."""
    rng = np.random.default_rng(seed)
    transform = build_transform(spec)
    items = []
    for i in range(n):
        responder = i % 2 == 0
        volume = synthetic_volume_object(Subject.random(rng, responder), seed=seed * 10_000 + i)
        items.append((preprocess(volume, spec, transform), int(responder)))
    return items


def build_demo_model(
    out_dir: Path, n_train: int = 40, n_test: int = 16, epochs: int = 8, seed: int = 0, progress: bool = True
) -> ModelInfo:
    train_items = synthetic_items(n_train, seed=seed + 1)
    test_items = synthetic_items(n_test, seed=seed + 2)
    config = TrainConfig(architecture="resnet18", epochs=epochs, batch_size=8, lr=5e-4, seed=seed, device="auto")
    return train(
        train_items,
        test_items,
        DEMO_SPEC,
        config,
        out_dir,
        name=DEMO_NAME,
        synthetic=True,
        progress=progress,
        extra_summary={"data": "synthetic phantoms with a planted feature (model/synth.py); not patient data"},
    )
