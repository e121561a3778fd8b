"""`migraine-node demo` end to end (with the tiny test checkpoint instead of building the demo model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import node.demo
from node.cli import main
from node.report import RESEARCH_USE_TEXT


def _config(tmp_path, checkpoint) -> Path:
    config = tmp_path / "demo.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_disk_mb = 16\n'
        f'[model]\ncheckpoint = "{checkpoint}"\ndevice = "cpu"\n'
    )
    return config


@pytest.mark.parametrize("pacs", ["orthanc", "pynetdicom"])
def test_demo_ends_with_the_sr_as_text_and_where_it_is_kept(tmp_path, capsys, monkeypatch, tiny_checkpoint, pacs):
    if pacs == "pynetdicom":
        monkeypatch.setattr(node.demo, "ORTHANC", str(tmp_path / "no-orthanc-here"))
    monkeypatch.setattr(node.demo.tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    assert main(["demo", "--config", str(_config(tmp_path, tiny_checkpoint))]) == 0
    out = capsys.readouterr().out
    for number, name in enumerate(["demo model", "stand-in PACS", "node", "synthetic study", "classification",
                                   "what the radiologist sees"], start=1):
        assert re.search(rf"^{number}/6 \[ *\d+ s\] {name}", out, re.M), out
    assert ("Orthanc as DEMO_PACS" if pacs == "orthanc" else "pynetdicom storage SCP as DEMO_PACS") in out
    assert "SR delivered to the stand-in PACS DEMO_PACS" in out
    assert "stage timings (ms): load" in out
    # The SR's content as text: the label, the probability and the research-use statement.
    assert re.search(r"^ +Predicted NSAID response: NSAID (non-)?responder$", out, re.M), out
    assert re.search(r"^ +Probability: ", out, re.M) and RESEARCH_USE_TEXT in out
    sr_path = Path(re.search(r"SR kept at (\S+)", out).group(1))
    assert sr_path.is_file() and (tmp_path / "data" / "sr") in sr_path.parents
    image = Path(re.search(r"result image kept at (\S+)", out).group(1))
    assert image.is_file() and (tmp_path / "data" / "images") in image.parents
    assert "http://" not in out  # nothing that disappears when the demo exits
    assert "demo finished" in out
    assert list((tmp_path / "scratch").iterdir()) == []  # the scratch folder (PACS, study) is removed


def test_demo_viewer_without_its_prerequisites_is_one_clear_line(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(node.demo, "ORTHANC", str(tmp_path / "no-orthanc-here"))
    assert main(["demo", "--viewer", "--config", str(_config(tmp_path, tiny_checkpoint))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("migraine-node: --viewer needs Orthanc")
    assert not (tmp_path / "data").exists()  # refused before doing anything


def test_demo_viewer_without_ohif_is_one_clear_line(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    import node.viewer

    fake_orthanc = tmp_path / "Orthanc"
    fake_orthanc.touch()
    monkeypatch.setattr(node.demo, "ORTHANC", str(fake_orthanc))
    monkeypatch.setattr(node.viewer, "orthanc_dicomweb_plugin", lambda: str(tmp_path / "libOrthancDicomWeb.so"))
    monkeypatch.setattr(node.viewer, "find_ohif_dist", lambda: None)
    assert main(["demo", "--viewer", "--config", str(_config(tmp_path, tiny_checkpoint))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("migraine-node: --viewer needs the OHIF")


def test_demo_model_is_built_aside_and_moved_into_place(tmp_path, monkeypatch, capsys):
    """An interrupted build is never taken for a model; the message is plain information, not a warning."""
    import model.demo
    from node.config import load_settings
    from node.worker import model_directory

    calls = []

    def fake_build(out_dir, progress, report):  # noqa: ANN001, ANN202
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        # train() writes the sidecar after the first epoch
        (out_dir / "model.json").write_text('{"input_spec": {"centring": "head"}}')
        if len(calls) == 1:
            raise KeyboardInterrupt
        (out_dir / "weights.pt").write_bytes(b"")

    monkeypatch.setattr(model.demo, "build_demo_model", fake_build)
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path / "data")}})
    with pytest.raises(KeyboardInterrupt):
        model_directory(settings, progress=True)
    demo_dir = tmp_path / "data" / "models" / "demo"
    assert not demo_dir.exists()
    assert model_directory(settings, progress=True) == demo_dir
    assert sorted(p.name for p in demo_dir.iterdir()) == ["model.json", "weights.pt"]
    assert sorted(p.name for p in demo_dir.parent.iterdir()) == [".demo.lock", "demo"]
    assert "using the synthetic demo model, built once in" in capsys.readouterr().out
    assert model_directory(settings) == demo_dir and len(calls) == 2  # built once


def test_a_demo_model_for_older_preprocessing_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A demo model trained on field-of-view-centred grids (sidecar without `centring`) would be fed
    head-centred ones: it is rebuilt once, and the rebuilt one is kept."""
    import model.demo
    from node.config import load_settings
    from node.worker import model_directory

    demo_dir = tmp_path / "data" / "models" / "demo"
    demo_dir.mkdir(parents=True)
    legacy = {"input_spec": {"orientation": "RAS", "spacing": [6, 6, 6], "shape": [28, 36, 36]}}
    (demo_dir / "model.json").write_text(json.dumps(legacy))
    calls = []

    def fake_build(out_dir, progress, report):  # noqa: ANN001, ANN202
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "model.json").write_text('{"input_spec": {"centring": "head"}}')

    monkeypatch.setattr(model.demo, "build_demo_model", fake_build)
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path / "data")}})
    assert model_directory(settings, progress=True) == demo_dir
    assert "built for an older preprocessing and is rebuilt" in capsys.readouterr().out
    assert json.loads((demo_dir / "model.json").read_text())["input_spec"]["centring"] == "head"
    assert model_directory(settings) == demo_dir and len(calls) == 1


def test_demo_viewer_stays_up_until_ctrl_c_then_leaves_nothing_running(tmp_path, tiny_checkpoint):
    """`demo --viewer`: the printed URL serves OHIF with the study, SR and image behind it; Ctrl-C ends it all."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRAINE_NODE_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "demo", "--viewer", "--config",
                             str(_config(tmp_path, tiny_checkpoint))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := re.search(r"OHIF viewer \(loopback only\): (http://127\.0\.0\.1:\d+/viewer\?StudyInstanceUIDs=(\S+))",
                                  line):
                url, study = match.group(1), match.group(2)
        assert url, "".join(lines)
        assert b"<html" in urllib.request.urlopen(url, timeout=10).read().lower()
        base = url.split("/viewer")[0]
        series = json.loads(urllib.request.urlopen(f"{base}/dicom-web/studies/{study}/series", timeout=10).read())
        modalities = sorted(s["00080060"]["Value"][0] for s in series)
        assert modalities == ["MR", "OT", "SR"], modalities  # the study, the result image and the SR
        children = _children(proc.pid)  # Orthanc and the classification worker
        assert any("Orthanc" in cmd for _, cmd in children), children
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    def alive() -> list[tuple[int, str]]:
        out = []
        for pid, cmd in children:
            try:
                if "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
                    out.append((pid, cmd))
            except OSError:
                continue
        return out

    deadline = time.monotonic() + 15  # processes get a moment to finish exiting after the demo returns
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"still running after Ctrl-C: {alive()}"


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose parent is `pid`."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields.get("PPid", "0").strip()) == pid:
                cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append((int(status.parent.name), cmdline))
        except (OSError, ValueError):
            continue
    return out
