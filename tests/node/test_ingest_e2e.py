"""Ingest end to end: DCMTK storescu -> `migraine-node serve` (subprocess) on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
from datetime import datetime

import pytest

from tests.peers import DCMTK_ENV, ECHOSCU, STORESCU, storescu, wait_until


def db_instances(node, series_uid: str | None = None) -> set[str]:
    with sqlite3.connect(node.data_dir / "node.db") as conn:
        if series_uid is None:
            rows = conn.execute("SELECT sop_instance_uid FROM instance")
        else:
            rows = conn.execute("SELECT sop_instance_uid FROM instance WHERE series_instance_uid = ?", (series_uid,))
        return {r[0] for r in rows}


def series_row(node, series_uid: str) -> dict | None:
    return next((j for j in node.jobs() if j["series_instance_uid"] == series_uid), None)


def test_storescu_series_is_spooled_recorded_and_completed(node_factory, t1_series):
    series_dir, series = t1_series
    node = node_factory(idle_seconds=2).start()

    result = storescu(series_dir, node.port)
    assert result.returncode == 0, result.stderr

    files = node.spool_files()
    assert len(files) == 170
    assert {f.stem for f in files} == set(series.sop_instance_uids)
    assert all(f.parent.name == series.series_instance_uid for f in files)
    assert db_instances(node, series.series_instance_uid) == set(series.sop_instance_uids)

    # Complete, then selected as the 3D T1 (no worker in this node, so it waits in the queue).
    row = wait_until(lambda: (r := series_row(node, series.series_instance_uid)) and r["state"] == "queued" and r,
                     timeout=30, what="series complete and queued")
    assert row["instances"] == 170
    assert row["study_instance_uid"] == series.study_instance_uid
    assert row["series_description"] == "T1W_3D_TFE"
    for key in ("series_instance_uid", "study_instance_uid", "series_description", "instances", "state",
                "reason", "updated_at"):
        assert key in row
    assert "170/170" in row["reason"]

    # Re-sending the whole series stores nothing twice and does not reopen it.
    again = storescu(series_dir, node.port)
    assert again.returncode == 0, again.stderr
    assert len(node.spool_files()) == 170
    assert len(db_instances(node)) == 170
    row = series_row(node, series.series_instance_uid)
    assert row["instances"] == 170 and row["state"] == "queued" and row["version"] == 1

    # No patient data in the log.
    log = node.log_text()
    assert "SYNTHETIC^PHANTOM" not in log and "SYNTH-000000" not in log and "19800101" not in log


def test_series_without_expected_count_completes_after_idle(node_factory, small_series, tmp_path):
    import pydicom

    series_dir, series = small_series
    stripped = tmp_path / "no-count"
    stripped.mkdir()
    for path in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(stripped / path.name)
    node = node_factory(idle_seconds=3).start()
    assert storescu(stripped, node.port).returncode == 0
    # 48 slices: complete, then skipped by selection (the 3D T1 needs at least 100).
    row = wait_until(lambda: (r := series_row(node, series.series_instance_uid)) and r["state"] == "skipped" and r,
                     timeout=30, what="idle completion")
    assert row["reason"].endswith("complete: idle for 3 s") and row["expected_instances"] is None
    assert "need at least 100" in row["reason"]
    waited = datetime.fromisoformat(row["completed_at"]) - datetime.fromisoformat(row["last_received_at"])
    assert waited.total_seconds() >= 3


def test_calling_ae_not_in_allow_list_is_rejected(node_factory, small_series):
    series_dir, _ = small_series
    node = node_factory(allowed=["SCANNER"]).start()
    refused = storescu(series_dir, node.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert node.spool_files() == []
    assert "INTRUDER" in node.log_text() and "allowed_calling_aets" in node.log_text()

    echo = subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "MIGNODE", "127.0.0.1", str(node.port)],
                          env=DCMTK_ENV, capture_output=True, timeout=30)
    assert echo.returncode == 0
    wrong_called = subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "SOMEONE", "127.0.0.1", str(node.port)],
                                  env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert wrong_called.returncode != 0


def test_sigkill_during_transfer_loses_no_acknowledged_instance(node_factory, t1_series):
    series_dir, series = t1_series
    node = node_factory(idle_seconds=2).start()
    sender = subprocess.Popen(
        [STORESCU, "-v", "-aet", "SCANNER", "-aec", "MIGNODE", "127.0.0.1", str(node.port), "+sd", str(series_dir)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: len(node.spool_files()) >= 40, timeout=120, interval=0.01, what="40 instances")
    node.stop(signal.SIGKILL)
    output, _ = sender.communicate(timeout=120)

    # storescu -v prints "Sending file: PATH" then "Received Store Response (Success)".
    acknowledged = []
    current = None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
    # Killed mid-transfer: some instances acknowledged, not all (the 40th file on disk may
    # not have been answered yet when the SIGKILL landed).
    assert 30 <= len(acknowledged) < 170, output[-2000:]
    path_to_uid = {str(p): uid for p, uid in zip(series.paths, series.sop_instance_uids)}
    acknowledged_uids = {path_to_uid[p] for p in acknowledged}

    node.start()  # recovery runs before the SCP listens
    on_disk = {p.stem for p in node.spool_files()}
    in_db = db_instances(node)
    assert acknowledged_uids <= on_disk
    assert acknowledged_uids <= in_db
    assert on_disk == in_db  # every file has its row and every row its file
    leftovers = [p for p in (node.data_dir / "spool").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert leftovers == []

    # The scanner resends; the series completes with all 170.
    assert storescu(series_dir, node.port).returncode == 0
    row = wait_until(lambda: (r := series_row(node, series.series_instance_uid)) and r["state"] == "queued" and r,
                     timeout=30, what="series complete after resend")
    assert row["instances"] == 170


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('[node]\naet = "X"\n', "[node] aet: unknown key"),
        ("[node]\nport = 70000\n", "[node] port: Input should be less than or equal to 65535"),
        ("[storage]\nmin_free_disk_mb = -1\n", "[storage] min_free_disk_mb"),
        ("[series]\nidle_seconds = 30\nmax_wait_seconds = 10\n", "max_wait_seconds must be at least idle_seconds"),
        ("[node\nport = 1\n", "not valid TOML"),
    ],
)
def test_config_check_names_the_bad_key(tmp_path, content, needle):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    import sys

    result = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr, result.stderr
