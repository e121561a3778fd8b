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
    assert "AUC" in out and "PLR" in out and "NLR" in out and "Brier score" in out
    assert "No checkpoint cutoff" in out and "optimistic (chosen on the evaluated set)" in out
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = result["at_youden_cutoff_optimistic"]
    assert result["at_checkpoint_cutoff"] is None
    assert metrics["n"] == 23 and 0.5 < metrics["auc"] <= 1.0 and metrics["auc_ci_low"] < metrics["auc"]
    assert (tmp_path / "eval" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "eval" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run(capsys, "evaluate", "--predictions", str(csv), "--cutoff", "0.5", "--out",
                         str(tmp_path / "eval"))
    assert code == 0, err and "At the given cutoff: 0.500" in out
    fixed = json.loads((tmp_path / "eval" / "metrics.json").read_text())["at_checkpoint_cutoff"]
    assert fixed["cutoff"] == 0.5 and fixed["source"] == "given"
    csv.write_text("label,probability\nresponder,1.7\n")
    code, _, err = run(capsys, "evaluate", "--predictions", str(csv))
    assert code == 1 and "outside 0..1" in err


def test_train_and_evaluate_from_manifest(tmp_path, capsys):
    """Six patients (two with two DICOM scans, two NIfTI rows named by the patient column): roles by patient,
    the split saved in the sidecar and reused by evaluate, which refuses another scan of a training patient."""
    import nibabel as nib

    from model.synth import Subject, synthetic_volume_object, write_series

    rows = ["path,label,patient"]
    # Distinctive patient IDs and folder names (patient names, as sites name folders): they must appear nowhere.
    scans = [("DOE^ZEBEDIAH_a1", "MRNZQXA", 1), ("DOE^ZEBEDIAH_a2", "MRNZQXA", 1), ("b1", "MRNZQXB", 0),
             ("b2", "MRNZQXB", 0), ("c", "MRNZQXC", 1), ("d", "MRNZQXD", 0)]
    for i, (name, pid, label) in enumerate(scans):
        write_series(tmp_path / name, slices=12, rows=20, columns=20, spacing=10.0, responder=bool(label), seed=i,
                     patient_id=pid)
        rows.append(f"{name},{'responder' if label else 'non-responder'},")  # patient from the DICOM header
    for i in range(2):  # NIfTI rows, named by the patient column
        volume = synthetic_volume_object(Subject(responder=i == 0), seed=i, spacing=10.0, shape=(16, 20, 20))
        nib.save(nib.Nifti1Image(volume.array, volume.ras_affine), tmp_path / f"n{i}.nii.gz")
        rows.append(f"n{i}.nii.gz,{1 if i == 0 else 0},MRNZQXN{i}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    spec = "spacing=16,16,16;shape=12,16,16"
    code, out, err = run(capsys, "train", "--manifest", str(manifest), "--out", str(tmp_path / "ckpt"), "--epochs", "1",
                         "--batch-size", "2", "--input-spec", spec, "--device", "cpu", "--seed", "3")
    assert code == 0, err
    assert "ZEBEDIAH" not in out + err and "MRNZQX" not in out + err
    assert "split by patient: train" in out and "best epoch 0 by validation AUC" in out and "test AUC" in out
    sidecar = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    training = sidecar["training"]
    assert sidecar["synthetic"] is False and sidecar["input_spec"]["shape"] == [12, 16, 16]
    split = training["split"]
    names = [n for n, _, _ in scans] + ["n0.nii.gz", "n1.nii.gz"]
    role_of = dict(zip(names, (r["role"] for r in split["rows"])))
    assert len(split["rows"]) == 8 and all(len(r["digest"]) == 64 for r in split["rows"])
    assert role_of["DOE^ZEBEDIAH_a1"] == role_of["DOE^ZEBEDIAH_a2"] and role_of["b1"] == role_of["b2"]  # together
    counts = split["counts"]
    assert all(counts[r]["patients"] == 2 and counts[r]["responder_patients"] == 1 for r in counts)  # stratified
    assert training["n_test"] == counts["test"]["rows"] and training["n_validation"] == counts["validation"]["rows"]
    assert "MRNZQX" not in json.dumps(sidecar) and "ZEBEDIAH" not in json.dumps(sidecar)

    code, out, err = run(capsys, "evaluate", "--manifest", str(manifest), "--checkpoint", str(tmp_path / "ckpt"),
                         "--out", str(tmp_path / "ev"), "--device", "cpu")
    assert code == 0, err
    assert f"test estimate ({counts['test']['rows']} test)" in out
    written = (tmp_path / "ev" / "predictions.csv").read_text() + (tmp_path / "ev" / "metrics.json").read_text()
    assert "MRNZQX" not in written + out + err and "ZEBEDIAH" not in written + out + err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == counts["test"]["rows"] and metrics["at_checkpoint_cutoff"]["cutoff"] == sidecar["cutoff"]
    assert metrics["at_checkpoint_cutoff"]["auc"] == pytest.approx(training["test_auc"], abs=1e-3)

    # A new scan of a patient the model trained on, in a manifest of its own: refused as test.
    trained = next(pid for name, pid, _ in scans if role_of[name] == "train")
    label = next(lab for _, pid, lab in scans if pid == trained)
    write_series(tmp_path / "rescan", slices=12, rows=20, columns=20, spacing=10.0, seed=9, patient_id=trained)
    volume = synthetic_volume_object(Subject(responder=True), seed=7, spacing=10.0, shape=(16, 20, 20))
    nib.save(nib.Nifti1Image(volume.array, volume.ras_affine), tmp_path / "external.nii.gz")
    (tmp_path / "new.csv").write_text(f"path,label\nrescan,{label}\nexternal.nii.gz,1\n")
    code, _, err = run(capsys, "evaluate", "--manifest", str(tmp_path / "new.csv"), "--checkpoint",
                       str(tmp_path / "ckpt"), "--device", "cpu")
    assert code == 1 and "refusing to report 1 of 2 row(s) as test" in err and "1 train-patient" in err, err
    assert "own patient" in err and trained not in err and "ZEBEDIAH" not in err and "rescan" not in err

    manifest.write_text("path,label\na1,maybe\n")
    code, _, err = run(capsys, "train", "--manifest", str(manifest), "--out", str(tmp_path / "x"))
    assert code == 1 and "maybe" in err


def test_train_folds_usage(tmp_path, capsys):
    import nibabel as nib

    for i in range(2):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / f"n{i}.nii")
    (tmp_path / "m.csv").write_text("path,label,split\nn0.nii,1,train\nn1.nii,0,test\n")
    code, _, err = run(capsys, "train", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                       "--folds", "1")
    assert code == 2 and "at least 2" in err
    code, _, err = run(capsys, "train", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                       "--folds", "5")
    assert code == 1 and "remove the manifest's split column" in err


def test_import_weights_responder_index(tmp_path, capsys):
    """The same weights imported with --responder-index 0 and 1 give p and 1 - p on the same input."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.network import build_network

    torch.manual_seed(0)
    net = build_network("resnet18")
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([0.3, -0.2]))  # break the symmetry: p must not be 0.5 by chance
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(SystemExit) as exit_:
        run(capsys, "import-weights", str(tmp_path / "w.pth"), "--arch", "resnet18", "--out", str(tmp_path / "x"))
    assert exit_.value.code == 2 and "--responder-index" in capsys.readouterr().err  # required
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    p = {}
    for index in ("0", "1"):
        code, out, err = run(capsys, "import-weights", str(tmp_path / "w.pth"), "--arch", "resnet18", "--out",
                             str(tmp_path / index), "--responder-index", index, "--input-spec", "shape=16,16,16")
        assert code == 0, err
        model, info = load_checkpoint(tmp_path / index)
        assert info.training["responder_index"] == int(index)
        with torch.no_grad():
            p[index] = float(torch.softmax(model(x), 1)[0, 1])
    with torch.no_grad():
        original = float(torch.softmax(net.eval()(x), 1)[0, 1])
    assert p["1"] == pytest.approx(original, abs=1e-6) and abs(original - 0.5) > 1e-3
    assert p["0"] == pytest.approx(1 - p["1"], abs=1e-6)


def test_demo_model_is_marked_synthetic(tmp_path):
    lines = []
    tmp_path = tmp_path / "demo"
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
