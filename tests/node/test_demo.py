"""`migraine-node demo` end to end (with the tiny test checkpoint instead of building the demo model)."""

from __future__ import annotations

import pytest

import node.demo
from node.cli import main


@pytest.mark.parametrize("pacs", ["orthanc", "pynetdicom"])
def test_demo_delivers_an_sr(tmp_path, capsys, monkeypatch, tiny_checkpoint, pacs):
    if pacs == "pynetdicom":
        monkeypatch.setattr(node.demo, "ORTHANC", str(tmp_path / "no-orthanc-here"))
    config = tmp_path / "demo.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_disk_mb = 16\n'
        f'[model]\ncheckpoint = "{tiny_checkpoint}"\ndevice = "cpu"\n'
    )
    assert main(["demo", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "5/5 prediction:" in out and "SYNTHETIC" in out
    assert ("Orthanc DEMO_PACS" if pacs == "orthanc" else "stand-in PACS DEMO_PACS") in out
    assert "stage timings (ms): load" in out and "demo finished" in out
