"""Training loop: the paper's recipe by default (AdamW, lr 5e-4, batch 8,
cross-entropy, 100 epochs, Gaussian noise / rotation / scaling / flipping).

Three disjoint sets. Validation chooses the epoch (best AUC, ties by lower
loss) and the cutoff (midpoint of its Youden-optimal interval); the test set
is scored once, after training, with that checkpoint, so its AUC is not
inflated by the selection (the paper had no validation set and reported the
test set). Resumable from ``train-state.pt`` in the output folder (unless
``resumable=False``, which writes no resume state); mixed precision on CUDA.

BatchNorm: before each epoch's validation scoring the running statistics are
recomputed over the training items (`recompute_batchnorm`), so the saved
checkpoint, its cutoff and the test scores all use exact training-set
statistics, never the momentum averages that lag the weights.
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

from model.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from model.metrics import binary_metrics, delong_auc_variance, delong_ci, youden_midpoint
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
    cutoff: float | None = None  # None: chosen on the validation set at the best epoch
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
    if len(set(labels)) < 2 or not all(math.isfinite(s) for s in scores):  # non-finite: diverged, never selected
        return math.nan, scores
    return delong_auc_variance(labels, scores)[0], scores


def log_loss(labels: list[int], scores: list[float]) -> float:
    """Mean binary cross-entropy of the responder probabilities (nan without items)."""
    if not labels:
        return math.nan
    eps = 1e-7
    return float(-np.mean([y * math.log(max(p, eps)) + (1 - y) * math.log(max(1 - p, eps))
                           for y, p in zip(labels, scores)]))


def is_better(auc: float, loss: float, best_auc: float, best_loss: float) -> bool:
    """Epoch selection on validation: higher AUC wins; at equal AUC the lower loss (better calibrated)."""
    if math.isnan(auc):
        return False
    return auc > best_auc or (auc == best_auc and loss < best_loss)


def best_epoch_of(history: list[dict]) -> int:
    """The epoch `train` keeps, from its history (-1 when no epoch had a defined validation AUC)."""
    best, best_auc, best_loss = -1, -1.0, math.inf
    for record in history:
        if is_better(record["validation_auc"], record["validation_loss"], best_auc, best_loss):
            best, best_auc, best_loss = record["epoch"], record["validation_auc"], record["validation_loss"]
    return best


def validation_cutoff(labels: list[int], scores: list[float]) -> float:
    """The validation set's Youden midpoint, clipped to a probability."""
    return min(max(youden_midpoint(labels, scores), 0.0), 1.0)


def _split_fingerprint(extra_summary: dict | None) -> str | None:
    """sha256 of the saved split's rows: a resume must continue on the same data split."""
    split = (extra_summary or {}).get("split")
    if not split:
        return None
    import hashlib
    import json

    return hashlib.sha256(json.dumps(split.get("rows"), sort_keys=True).encode()).hexdigest()


def _both_classes(items: list[tuple[torch.Tensor, int]], what: str) -> None:
    if len({y for _, y in items}) < 2:
        raise ValueError(f"the {what} set needs both responders and non-responders "
                         f"({len(items)} rows, {sum(y for _, y in items)} responders)")


def _round(value: float, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def summarise_test(labels: list[int], scores: list[float], cutoff: float) -> dict:
    """The test set's numbers for the sidecar: AUC with DeLong CI and metrics at the checkpoint cutoff."""
    out = {"n_test": len(labels), "test_positives": int(sum(labels)), "test_loss": _round(log_loss(labels, scores)),
           "test_scored": "once, after training, with the checkpoint and cutoff chosen on validation"}
    if len(set(labels)) < 2:
        return {**out, "test_auc": None, "test_auc_ci": None,
                "test_note": "the test set holds one class only: AUC undefined"}
    auc, low, high = delong_ci(labels, scores)
    at = binary_metrics(labels, scores, cutoff=cutoff)
    return {**out, "test_auc": _round(auc), "test_auc_ci": [_round(low), _round(high)],
            "test_at_cutoff": {k: _round(getattr(at, k)) for k in
                               ("accuracy", "sensitivity", "specificity", "ppv", "npv", "recall", "precision", "f1")}}


BATCHNORM_BATCH = 8  # items per forward pass when recomputing BatchNorm statistics


def recompute_batchnorm(model: nn.Module, items: list, batch_size: int = BATCHNORM_BATCH) -> None:
    """Set every BatchNorm's running statistics to the exact mean and variance of its input over `items`.

    During training the running statistics are momentum averages (0.1) over
    the last steps, taken while the weights moved; after a few dozen steps
    they lag the weights, and in eval mode the probabilities come out squeezed
    or saturated though their ranking is right: each model (each CV fold)
    then scores on its own scale. Here the network runs over `items` (the
    training set) in training mode, in batches of `batch_size` in the given
    order, as in training; each BatchNorm's input is pooled over every item
    and voxel (batch means and variances combined exactly, in float64,
    whatever the batch sizes), and running_mean / running_var (unbiased, as
    PyTorch keeps it) are set to the result. Weights are unchanged; the
    forward passes use no randomness. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not items:
        model.eval()
        return
    device = next(model.parameters()).device
    amp = autocast_dtype(device)
    parts: dict[nn.Module, list[tuple[int, torch.Tensor, torch.Tensor]]] = {m: [] for m in norms}

    def observe(module: nn.Module, args: tuple) -> None:
        x = args[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        parts[module].append((x.numel() // x.shape[1], mean.double(), var.double()))

    hooks = [m.register_forward_pre_hook(observe) for m in norms]
    try:
        model.train()
        starts = list(range(0, len(items), batch_size))
        if len(starts) > 1 and len(items) - starts[-1] == 1:  # no batch of one: BatchNorm needs two samples
            starts.pop()
        with torch.no_grad():
            for i, end in zip(starts, [*starts[1:], len(items)]):
                batch = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items[i:end]])
                with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
                    model(batch.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    for m, chunks in parts.items():
        n = sum(k for k, _, _ in chunks)
        mean = sum(k * mu for k, mu, _ in chunks) / n
        m2 = sum(k * (v + (mu - mean) ** 2) for k, mu, v in chunks)  # within + between batches
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / max(n - 1, 1)).to(m.running_var.dtype))


def batchnorm_note(n: int) -> str:
    return (f"running statistics recomputed over the {n} training items (exact mean and variance of each "
            "BatchNorm's input, training mode) before every validation scoring; the saved weights carry them")


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
    validation_items: list[tuple[torch.Tensor, int]],
    spec: InputSpec,
    config: TrainConfig,
    out_dir: Path,
    *,
    test_items: list[tuple[torch.Tensor, int]] | None = None,
    name: str,
    synthetic: bool,
    resume: bool = False,
    progress: bool = True,
    extra_summary: dict | None = None,
    on_epoch: Callable[[dict], bool | None] | None = None,
    resumable: bool = True,
) -> ModelInfo:
    """Train and write the checkpoint chosen on validation to `out_dir`; returns its sidecar.

    `on_epoch` gets each epoch's record (epoch, loss, validation_auc,
    validation_loss, seconds) plus `epochs`, the total; returning True stops
    training after that epoch (the best checkpoint so far stays). The test
    set, if given, is scored once at the end and never seen before. With
    `resumable=False` no ``train-state.pt`` is written (and any earlier one is
    removed).

    Every epoch, the BatchNorm statistics are recomputed over the training
    items (unaugmented, as at inference) before validation scores it, so the
    epoch is chosen (AUC, ties by validation loss, which is all about
    calibration) and the cutoff set on exactly the model that is saved and
    tested. Recomputing only the chosen checkpoint would be cheaper, but the
    choice would then rest on lagging statistics, which distort the ranking
    too, and on small validation sets AUC ties are common and the loss
    tie-break picks the epoch whose lag happened to look calibrated. Measured
    (5-fold CV, 40 synthetic patients, 6 epochs): recomputed only at the end,
    pooled AUC 0.94 and fold AUCs 0.71-1.00 (one fold kept epoch 0); every
    epoch, 1.00 in every fold. The cost is one forward pass over the training
    set without gradients per epoch: 0.15 of an epoch at 16 x 24 x 24 on the
    CPU (the optimiser step dominates there); at the paper's size, where
    the convolutions dominate, about a third (a backward pass costs about
    twice a forward), i.e. roughly a quarter more training time, which we
    accept for a checkpoint whose selection and calibration agree. The
    weights are unchanged: in training mode BatchNorm normalises with batch
    statistics, and the recompute draws no random numbers.
    """
    _both_classes(train_items, "training")
    _both_classes(validation_items, "validation")
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
        if state.get("split") != _split_fingerprint(extra_summary):
            raise ValueError(f"{state_path} was written for another split of the data; start a new output folder")
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
        recompute_batchnorm(model, train_items)
        validation_labels = [y for _, y in validation_items]
        val_auc, scores = auc_of(model, validation_items, device)
        val_loss = log_loss(validation_labels, scores)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan, "validation_auc": val_auc,
                  "validation_loss": val_loss, "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_auc=f"{val_auc:.3f}")
        stop = on_epoch is not None and bool(on_epoch({**record, "epochs": config.epochs}))
        improved = is_better(val_auc, val_loss, best_auc, best_loss)
        finite = all(math.isfinite(v) for v in scores)
        if improved or (best_epoch < 0 and finite):
            best_auc = val_auc if improved else best_auc
            best_loss = val_loss if improved else best_loss
            best_epoch = epoch
            fixed = config.cutoff is not None
            cutoff = config.cutoff if fixed else validation_cutoff(validation_labels, scores)
            summary = {
                **asdict(config),
                "best_epoch": best_epoch,
                "selection": "epoch with the best validation AUC (ties: lower validation loss)",
                "cutoff_rule": "fixed (--cutoff)" if fixed else
                "midpoint of the Youden-optimal interval on the validation set, at the best epoch",
                "validation_auc": _round(val_auc),
                "validation_loss": _round(val_loss),
                "n_train": len(train_items),
                "n_validation": len(validation_items),
                "train_positives": sum(y for _, y in train_items),
                "validation_positives": sum(validation_labels),
                "batchnorm": batchnorm_note(len(train_items)),
                **(extra_summary or {}),
            }
            info = save_checkpoint(out_dir, model, name=name, architecture=config.architecture, input_spec=spec,
                                   cutoff=cutoff, synthetic=synthetic, training=summary)
        if resumable:
            torch.save(
                {"config": asdict(config), "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                 "epoch": epoch, "best_auc": best_auc, "best_loss": best_loss, "best_epoch": best_epoch,
                 "history": history, "split": _split_fingerprint(extra_summary),
                 "torch_rng": torch.get_rng_state()},
                state_path,
            )
        if stop:
            break
    bar.close()
    if not resumable:
        state_path.unlink(missing_ok=True)
    if best_epoch < 0 and history:
        raise ValueError(f"training diverged: no epoch of {len(history)} gave finite validation scores (NaN or "
                         "infinite probabilities); try a lower --lr, and start a new output folder")
    if info is None:
        from model.checkpoint import read_info

        info = read_info(out_dir)
    if test_items:
        best, info = load_checkpoint(out_dir)
        labels = [y for _, y in test_items]
        scores = predict_scores(best.to(device), [x for x, _ in test_items], device)
        info = save_checkpoint(out_dir, best, name=info.name, architecture=info.architecture,
                               input_spec=info.input_spec, cutoff=info.cutoff, synthetic=info.synthetic,
                               training={**info.training, **summarise_test(labels, scores, info.cutoff)})
    return info
