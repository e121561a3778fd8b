"""Training loop: the paper's recipe by default (AdamW, lr 5e-4, batch 8,
cross-entropy, 100 epochs, Gaussian noise / rotation / scaling / flipping).

Keeps the checkpoint with the best test-split AUC; resumable from
``train-state.pt`` in the output folder (unless ``resumable=False``, which
writes no resume state); mixed precision on CUDA.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, RandGaussianNoise, RandRotate, RandZoom
from torch import nn

from model.checkpoint import ModelInfo, save_checkpoint
from model.metrics import delong_auc_variance
from model.network import build_network
from model.predict import autocast_dtype, resolve_device
from model.preprocess import InputSpec

STATE = "train-state.pt"


@dataclass(frozen=True)
class TrainConfig:
    architecture: str = "resnet18"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-2
    seed: int = 0
    augment: bool = True
    cutoff: float = 0.5
    device: str = "auto"


def augmentation() -> Compose:
    """The paper names the four augmentations but not their parameters; these are ours."""
    return Compose(
        [
            RandGaussianNoise(prob=0.5, std=0.1),
            RandRotate(range_x=0.17, range_y=0.17, range_z=0.17, prob=0.5, padding_mode="border"),
            RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5, padding_mode="edge"),
            RandFlip(prob=0.5, spatial_axis=0),  # left-right
        ]
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def auc_of(model: nn.Module, items: list[tuple[torch.Tensor, int]], device: torch.device) -> tuple[float, list[float]]:
    scores = predict_scores(model, [x for x, _ in items], device)
    labels = [y for _, y in items]
    if len(set(labels)) < 2:
        return math.nan, scores
    return delong_auc_variance(labels, scores)[0], scores


def log_loss(labels: list[int], scores: list[float]) -> float:
    """Mean binary cross-entropy of the responder probabilities (nan without items)."""
    if not labels:
        return math.nan
    eps = 1e-7
    return float(-np.mean([y * math.log(max(p, eps)) + (1 - y) * math.log(max(1 - p, eps))
                           for y, p in zip(labels, scores)]))


def predict_scores(model: nn.Module, tensors: list[torch.Tensor], device: torch.device) -> list[float]:
    model.eval()
    amp = autocast_dtype(device)
    scores = []
    with torch.inference_mode():
        for x in tensors:
            batch = x.unsqueeze(0).to(device)
            with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
                logits = model(batch)
            scores.append(float(torch.softmax(logits.float(), 1)[0, 1]))
    return scores


def train(
    train_items: list[tuple[torch.Tensor, int]],
    test_items: list[tuple[torch.Tensor, int]],
    spec: InputSpec,
    config: TrainConfig,
    out_dir: Path,
    *,
    name: str,
    synthetic: bool,
    resume: bool = False,
    progress: bool = True,
    extra_summary: dict | None = None,
    on_epoch: Callable[[dict], bool | None] | None = None,
    resumable: bool = True,
) -> ModelInfo:
    """Train and write the best checkpoint to `out_dir`; returns its sidecar.

    `on_epoch` gets each epoch's record (epoch, loss, test_auc, test_loss,
    seconds) plus `epochs`, the total; returning True stops training after
    that epoch (the best checkpoint so far stays). With `resumable=False` no
    ``train-state.pt`` is written (and any earlier one is removed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model = build_network(config.architecture).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    augment = augmentation() if config.augment else None
    if augment is not None:
        augment.set_random_state(seed=config.seed)

    start_epoch, best_auc, best_loss, best_epoch, history = 0, -1.0, math.inf, -1, []
    state_path = out_dir / STATE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k != "epochs"}
        if saved != {k: v for k, v in asdict(config).items() if k != "epochs"}:
            raise ValueError(
                f"{state_path} was written with other settings (only --epochs may change on resume); "
                "start a new output folder"
            )
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_epoch, best_auc, best_epoch = state["epoch"] + 1, state["best_auc"], state["best_epoch"]
        best_loss = state.get("best_loss", math.inf)
        history = state["history"]
        torch.set_rng_state(state["torch_rng"])

    from tqdm import tqdm

    bar = tqdm(range(start_epoch, config.epochs), desc="epochs", disable=not progress, file=sys.stderr,
               initial=start_epoch, total=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    info = None
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train_items), generator=generator).tolist()
        losses = []
        started = time.perf_counter()
        for i in range(0, len(order), config.batch_size):
            chunk = [train_items[j] for j in order[i : i + config.batch_size]]
            if len(chunk) < 2 and len(order) > 1:  # BatchNorm needs two samples
                continue
            xs = [augment(x) if augment is not None else x for x, _ in chunk]
            batch = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]).to(device)
            target = torch.tensor([y for _, y in chunk], device=device)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(batch), target)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            losses.append(loss.detach().item())
        test_auc, scores = auc_of(model, test_items, device)
        test_loss = log_loss([y for _, y in test_items], scores)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan, "test_auc": test_auc,
                  "test_loss": test_loss, "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", auc=f"{test_auc:.3f}")
        stop = on_epoch is not None and bool(on_epoch({**record, "epochs": config.epochs}))
        # Best by test AUC; among equal AUCs the lower test loss (better calibrated) wins.
        improved = not math.isnan(test_auc) and (
            test_auc > best_auc or (test_auc == best_auc and test_loss < best_loss)
        )
        if improved or best_epoch < 0:
            best_auc = test_auc if improved else best_auc
            best_loss = test_loss if improved else best_loss
            best_epoch = epoch
            summary = {
                **asdict(config),
                "best_epoch": best_epoch,
                "test_auc": None if math.isnan(test_auc) else round(test_auc, 4),
                "test_loss": None if math.isnan(test_loss) else round(test_loss, 4),
                "n_train": len(train_items),
                "n_test": len(test_items),
                "train_positives": sum(y for _, y in train_items),
                "test_positives": sum(y for _, y in test_items),
                **(extra_summary or {}),
            }
            info = save_checkpoint(out_dir, model, name=name, architecture=config.architecture, input_spec=spec,
                                   cutoff=config.cutoff, synthetic=synthetic, training=summary)
        if resumable:
            torch.save(
                {"config": asdict(config), "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                 "epoch": epoch, "best_auc": best_auc, "best_loss": best_loss, "best_epoch": best_epoch,
                 "history": history,
                 "torch_rng": torch.get_rng_state()},
                state_path,
            )
        if stop:
            break
    bar.close()
    if not resumable:
        state_path.unlink(missing_ok=True)
    if info is None:
        from model.checkpoint import read_info

        info = read_info(out_dir)
    return info
