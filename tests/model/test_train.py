from __future__ import annotations

import math

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.metrics import youden_midpoint
from model.preprocess import InputSpec
from model.train import BATCHNORM_BATCH, STATE, TrainConfig, best_epoch_of, is_better, predict_scores, train

SPEC = InputSpec(spacing=(16.0, 16.0, 16.0), shape=(16, 16, 16))


def tiny_items(n: int, seed: int, signal: float = 0.6) -> list[tuple[torch.Tensor, int]]:
    """1x16x16x16 noise; responders (even i) carry a brighter cube: learnable, but not at once."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        x = torch.randn(1, 16, 16, 16, generator=g)
        if i % 2 == 0:
            x[:, 4:12, 4:12, 4:12] += signal
        items.append((x, int(i % 2 == 0)))
    return items


def test_train_writes_the_validation_choice_and_resumes(tmp_path):
    items = tiny_items(10, seed=3)
    train_items, validation_items, test_items = items[:6], items[6:8], items[8:]
    config = TrainConfig(epochs=1, batch_size=3, seed=0, device="cpu")
    info = train(train_items, validation_items, SPEC, config, tmp_path, test_items=test_items, name="unit",
                 synthetic=True, progress=False)
    assert info.synthetic and info.architecture == "resnet18"
    t = info.training
    assert (t["n_train"], t["n_validation"], t["n_test"]) == (6, 2, 2)
    assert t["lr"] == 5e-4 and t["batch_size"] == 3
    model, loaded = load_checkpoint(tmp_path)
    assert loaded.sha256 == info.sha256
    # The cutoff is the validation set's Youden midpoint for the saved weights.
    scores = predict_scores(model, [x for x, _ in validation_items], torch.device("cpu"))
    assert info.cutoff == pytest.approx(min(max(youden_midpoint([y for _, y in validation_items], scores), 0), 1))
    state = torch.load(tmp_path / STATE, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [0]

    other = TrainConfig(epochs=2, batch_size=3, lr=1e-3, seed=0, device="cpu")
    with pytest.raises(ValueError, match="other settings"):
        train(train_items, validation_items, SPEC, other, tmp_path, name="unit", synthetic=True, progress=False,
              resume=True)

    longer = TrainConfig(epochs=2, batch_size=3, seed=0, device="cpu")
    with pytest.raises(ValueError, match="another split"):
        train(train_items, validation_items, SPEC, longer, tmp_path, name="unit", synthetic=True, progress=False,
              resume=True, extra_summary={"split": {"rows": [{"key": "x", "patient": "p", "role": "train"}]}})
    train(train_items, validation_items, SPEC, longer, tmp_path, name="unit", synthetic=True, progress=False,
          resume=True)
    state = torch.load(tmp_path / STATE, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [0, 1]  # continued, not restarted


def test_selection_rule_prefers_validation_auc_then_loss():
    history = [
        {"epoch": 0, "validation_auc": 0.70, "validation_loss": 0.60, "test_auc": 0.95},
        {"epoch": 1, "validation_auc": 0.80, "validation_loss": 0.70, "test_auc": 0.60},
        {"epoch": 2, "validation_auc": 0.80, "validation_loss": 0.65, "test_auc": 0.55},
        {"epoch": 3, "validation_auc": math.nan, "validation_loss": 0.10, "test_auc": 0.99},
    ]
    assert best_epoch_of(history) == 2  # best validation AUC, tie broken by the lower validation loss
    assert max(history, key=lambda h: h["test_auc"])["epoch"] != 2  # what selecting on test would have taken
    assert not is_better(math.nan, 0.0, -1.0, math.inf)


def test_best_epoch_is_chosen_on_validation_and_test_is_scored_once_on_it(tmp_path):
    """The test set is the validation set with every label flipped: test AUC = 1 - validation AUC at every
    epoch, so selecting on test would pick the worst validation epoch. The saved checkpoint must be the best
    validation epoch, and its reported test AUC 1 - that epoch's validation AUC."""
    items = tiny_items(16, seed=3)  # validation AUC 0.31 then 0.69 (BatchNorm statistics recomputed each epoch)
    train_items, validation_items = items[:8], items[8:]
    test_items = [(x, 1 - y) for x, y in validation_items]
    config = TrainConfig(epochs=2, batch_size=4, seed=0, device="cpu", augment=False)
    history: list[dict] = []
    info = train(train_items, validation_items, SPEC, config, tmp_path, test_items=test_items, name="unit",
                 synthetic=True, progress=False, resumable=False, on_epoch=history.append)
    assert all(not any(k.startswith("test") for k in h) for h in history)
    aucs = [h["validation_auc"] for h in history]
    assert len(set(aucs)) > 1, f"validation AUC did not vary ({aucs}); the test would prove nothing"
    best = best_epoch_of(history)
    chosen_on_test = min(range(len(aucs)), key=lambda e: (aucs[e], -history[e]["validation_loss"]))
    assert info.training["best_epoch"] == best != chosen_on_test
    assert info.training["validation_auc"] == pytest.approx(aucs[best], abs=1e-4)
    assert info.training["test_auc"] == pytest.approx(1 - aucs[best], abs=1e-4)
    assert info.training["test_scored"].startswith("once")


def test_validation_needs_both_classes(tmp_path):
    items = tiny_items(6, seed=0)
    with pytest.raises(ValueError, match="validation set needs both"):
        train(items[:4], [items[4]], SPEC, TrainConfig(epochs=1, device="cpu"), tmp_path, name="u",
              synthetic=True, progress=False)


def test_saved_checkpoint_carries_exact_training_set_batchnorm_statistics(tmp_path):
    """Every BatchNorm's running mean / variance in the saved weights equal the mean / unbiased variance of
    that layer's input over all training items and voxels (network in training mode, the training items in
    batches of BATCHNORM_BATCH in order), computed here directly; not the momentum averages training leaves."""
    items = tiny_items(17, seed=4)
    train_items, validation_items, test_items = items[:11], items[11:15], items[15:]  # batches of 8 and 3
    config = TrainConfig(epochs=2, batch_size=4, seed=0, device="cpu", augment=False)
    info = train(train_items, validation_items, SPEC, config, tmp_path, test_items=test_items, name="unit",
                 synthetic=True, progress=False, resumable=False)
    assert "recomputed over the 11 training items" in info.training["batchnorm"]
    saved, _ = load_checkpoint(tmp_path)
    norms = {name: m for name, m in saved.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert len(norms) > 10
    expected = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in norms.items()}

    seen: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].double()))
             for name, m in norms.items()]
    saved.train()
    with torch.no_grad():
        for i in range(0, len(train_items), BATCHNORM_BATCH):
            saved(torch.stack([x for x, _ in train_items[i : i + BATCHNORM_BATCH]]))
    for h in hooks:
        h.remove()
    naive_gap = 0.0
    for name, chunks in seen.items():
        assert len(chunks) == 2
        per_channel = torch.cat([c.transpose(0, 1).reshape(c.shape[1], -1) for c in chunks], dim=1)
        mean, var = per_channel.mean(dim=1), per_channel.var(dim=1, unbiased=True)
        got_mean, got_var = (t.double() for t in expected[name])
        assert torch.allclose(got_mean, mean, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(got_var, var, rtol=1e-4, atol=1e-6), name
        # The plain average of the two batches' statistics (PyTorch's cumulative average) is not the same:
        naive = torch.stack([c.transpose(0, 1).reshape(c.shape[1], -1).var(dim=1) for c in chunks]).mean(0)
        naive_gap = max(naive_gap, float(((naive - var).abs() / var).max()))
    assert naive_gap > 1e-2, "batches too alike: the test would not tell exact averages from batch averages"
    # The test rows were scored with these statistics: scoring the loaded checkpoint again gives the same AUC.
    scores = predict_scores(saved, [x for x, _ in test_items], torch.device("cpu"))
    labels = [y for _, y in test_items]
    from model.metrics import delong_ci

    assert info.training["test_auc"] == pytest.approx(delong_ci(labels, scores)[0], abs=1e-4)


def test_non_finite_validation_scores_are_never_selected_and_all_diverged_is_a_clear_error(tmp_path, monkeypatch):
    import model.train as train_module
    from model.train import auc_of

    items = tiny_items(8, seed=2)
    real = train_module.predict_scores
    monkeypatch.setattr(train_module, "predict_scores", lambda model, xs, device: [math.nan] * len(xs))
    auc, _ = auc_of(torch.nn.Linear(1, 1), items[:4], torch.device("cpu"))
    assert math.isnan(auc)  # not delong's "scores must all be finite"
    with pytest.raises(ValueError, match="training diverged: no epoch of 2 gave finite validation scores"):
        train(items[:4], items[4:], SPEC, TrainConfig(epochs=2, batch_size=2, device="cpu", augment=False), tmp_path,
              name="u", synthetic=True, progress=False, resumable=False)
    assert not (tmp_path / "model.json").exists()
    # Epoch 0 diverged, epoch 1 finite: epoch 1 is kept.
    calls = []

    def first_nan(model, xs, device):
        calls.append(1)
        scores = real(model, xs, device)
        return [math.inf] * len(xs) if len(calls) == 1 else scores

    monkeypatch.setattr(train_module, "predict_scores", first_nan)
    info = train(items[:4], items[4:], SPEC, TrainConfig(epochs=2, batch_size=2, device="cpu", augment=False),
                 tmp_path / "ok", name="u", synthetic=True, progress=False, resumable=False)
    assert info.training["best_epoch"] == 1
