"""Model commands through `migraine-node` main(argv)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.demo import build_demo_model
from node.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_synth_then_predict(tmp_path, capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "synth", str(tmp_path / "t1"), "--slices", "120", "--responder")
    assert code == 0 and "120 MR slices" in out
    code, out, err = run(capsys, "predict", str(tmp_path / "t1"), "--checkpoint", str(tiny_checkpoint), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"probability", "label", "cutoff", "model_id", "device", "ms"}
    assert result["device"] == "cpu" and result["model_id"].startswith("test-random@")

    code, out, _ = run(capsys, "synth", str(tmp_path / "mf"), "--slices", "110", "--enhanced", "--orientation", "obl")
    assert code == 0 and "Enhanced" in out
    code, out, err = run(capsys, "predict", str(tmp_path / "mf"), "--checkpoint", str(tiny_checkpoint))
    assert code == 0, err
    assert "probability of NSAID response" in out and "SYNTHETIC DEMO MODEL" in out


def test_predict_refuses_what_selection_refuses(tmp_path, capsys, tiny_checkpoint):
    run(capsys, "synth", str(tmp_path / "short"), "--slices", "40")
    code, _, err = run(capsys, "predict", str(tmp_path / "short"), "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and "series refused" in err and "need at least 100" in err
    code, _, err = run(capsys, "predict", str(tmp_path / "short"), "--checkpoint", str(tiny_checkpoint), "--no-select")
    assert code == 0, err
    code, _, err = run(capsys, "predict", str(tmp_path / "nowhere"), "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "predict", str(tmp_path / "short"), "--checkpoint", str(tmp_path))
    assert code == 1 and "not a checkpoint" in err


def test_evaluate_predictions_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = [1] * 13 + [0] * 10
    probs = [round(float(p), 3) for p in np.clip(np.array(labels) * 0.35 + rng.uniform(0.1, 0.6, 23), 0, 1)]
    csv = tmp_path / "p.csv"
    csv.write_text("label,probability\n" + "\n".join(f"{'responder' if y else 'non-responder'},{p}" for y, p in zip(labels, probs)))
    code, out, err = run(capsys, "evaluate", "--predictions", str(csv), "--out", str(tmp_path / "eval"))
    assert code == 0, err
    assert "AUC" in out and "PLR" in out and "NLR" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["at_youden_cutoff"]
    assert metrics["n"] == 23 and 0.5 < metrics["auc"] <= 1.0 and metrics["auc_ci_low"] < metrics["auc"]
    assert (tmp_path / "eval" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv.write_text("label,probability\nresponder,1.7\n")
    code, _, err = run(capsys, "evaluate", "--predictions", str(csv))
    assert code == 1 and "outside 0..1" in err


def test_train_and_evaluate_from_manifest(tmp_path, capsys):
    import nibabel as nib

    from model.synth import Subject, synthetic_volume_object

    rows = ["path,label"]
    for i in range(4):
        responder = i % 2 == 0
        run(capsys, "synth", str(tmp_path / f"s{i}"), "--slices", "40", "--seed", str(i),
            *(["--responder"] if responder else []))
        rows.append(f"s{i},{'responder' if responder else 'non-responder'}")
    for i in range(2):  # NIfTI rows too
        volume = synthetic_volume_object(Subject(responder=i == 0), seed=i, spacing=4.0, shape=(40, 48, 48))
        nib.save(nib.Nifti1Image(volume.array, volume.ras_affine), tmp_path / f"n{i}.nii.gz")
        rows.append(f"n{i}.nii.gz,{1 if i == 0 else 0}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    spec = "spacing=8,8,8;shape=24,32,32"
    code, out, err = run(capsys, "train", "--manifest", str(manifest), "--out", str(tmp_path / "ckpt"), "--epochs", "1",
                         "--batch-size", "2", "--input-spec", spec, "--device", "cpu")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert sidecar["synthetic"] is False and sidecar["training"]["n_train"] == 4 and sidecar["training"]["n_test"] == 2
    assert sidecar["input_spec"]["shape"] == [24, 32, 32]
    code, out, err = run(capsys, "evaluate", "--manifest", str(manifest), "--checkpoint", str(tmp_path / "ckpt"),
                         "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 6

    manifest.write_text("path,label\ns0,maybe\n")
    code, _, err = run(capsys, "train", "--manifest", str(manifest), "--out", str(tmp_path / "x"))
    assert code == 1 and "maybe" in err


def test_demo_model_is_marked_synthetic(tmp_path):
    lines = []
    info = build_demo_model(tmp_path, n_train=6, n_validation=4, n_test=4, epochs=2, report=lines.append)
    assert info.synthetic is True
    assert "synthetic" in info.training["data"] and info.name.endswith("synthetic")
    assert json.loads((tmp_path / "model.json").read_text())["synthetic"] is True
    # Validation picks the epoch and cutoff; the test AUC comes from other heads.
    assert info.training["n_validation"] == 4 and info.training["n_test"] == 4 and "test_auc" in info.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "weights.pt"]  # no resume state
    assert lines[0].startswith("building the synthetic demo model: generating 14 synthetic heads")
    assert any(line.strip().startswith("epoch 1/2: training loss") for line in lines)


@pytest.mark.parametrize("bad", ["spacing=0,1,1", "shape=1,2", "colour=red"])
def test_bad_input_spec_is_a_clear_error(tmp_path, capsys, bad):
    (tmp_path / "m.csv").write_text("path,label\n")
    code, _, err = run(capsys, "train", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                       "--input-spec", bad)
    assert code == 1 and "--input-spec" in err


def test_youden_midpoint_keeps_the_held_out_operating_point():
    from model.demo import youden_midpoint
    from model.metrics import binary_metrics

    labels, scores = [1, 1, 1, 0, 0, 0], [0.99, 0.98, 0.97, 0.84, 0.80, 0.60]
    cutoff = youden_midpoint(labels, scores)
    assert cutoff == pytest.approx((0.97 + 0.84) / 2)
    at_mid, at_youden = binary_metrics(labels, scores, cutoff=cutoff), binary_metrics(labels, scores)
    assert (at_mid.sensitivity, at_mid.specificity) == (at_youden.sensitivity, at_youden.specificity) == (1.0, 1.0)
