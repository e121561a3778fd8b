"""Faults a node beside a PACS meets in months unattended, with real processes on 127.0.0.1:
SIGKILL during ingest, classification and export; a PACS that refuses connections for a while;
a full disk; a database locked by another process. Nothing acknowledged is lost, every T1 ends
delivered, the PACS holds exactly one SR per series version, and nothing is left running."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification  # type: ignore[attr-defined]

from model.synth import write_classic_series
from node.errors import StoreStatus
from tests.node.test_ingest_e2e import db_instances, series_row
from tests.node.test_supervision import _start_marked, alive, processes_marked, worker_children
from tests.peers import DCMTK_ENV, STORESCU, free_port, scu_store, storescu, wait_until

PACS_AE = "FAULTPACS"


class Pacs:
    """A storage SCP standing in for PACS: keeps the SOP Instance UIDs it stored (a PACS keeps one
    object per UID) and counts every C-STORE; `hold` makes it sit on a request until released."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.refuse = False
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(120)
            return 0xA700  # the answer never reaches a sender that died meanwhile
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def pacs():
    peer = Pacs()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def t1_small(tmp_path_factory) -> tuple[Path, object]:
    """The smallest series selection takes as a 3D T1: 100 sagittal slices at 1 mm."""
    out = tmp_path_factory.mktemp("t1-100")
    return out, write_classic_series(out, slices=100, rows=32, columns=32, spacing=1.0, seed=21)


def _acknowledged(output: str) -> list[str]:
    """Files storescu -v saw acknowledged: "Sending file: PATH" then "Received Store Response (Success)"."""
    out, current = [], None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            out.append(current)
    return out


def _kill_node(node, marker: str) -> None:  # noqa: ANN001
    """SIGKILL serve and its workers at once, as a power cut or the OOM killer would."""
    workers = worker_children(node.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    node.stop(signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in workers), timeout=20, what="the killed workers to end")


def _db(node, sql: str) -> list[tuple]:  # noqa: ANN001
    with sqlite3.connect(f"file:{node.data_dir / 'node.db'}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("phase", ["ingest", "classification", "export"])
def test_sigkill_then_restart_loses_nothing_and_delivers_once(phase, node_factory, tiny_checkpoint, t1_small, pacs):
    folder, series = t1_small
    uid = series.series_instance_uid
    marker = f"faults-{phase}-{uuid.uuid4()}"
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, idle_seconds=1, runtime="torch",
                        destinations=[{"name": "pacs", "ae_title": PACS_AE, "port": pacs.port}])
    _start_marked(node, marker)
    acknowledged: set[str] = set()
    path_to_uid = {str(p): u for p, u in zip(series.paths, series.sop_instance_uids)}

    if phase == "ingest":
        sender = subprocess.Popen([STORESCU, "-v", "-aet", "SCANNER", "-aec", "MIGNODE", "127.0.0.1", str(node.port),
                                   "+sd", str(folder)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: len(node.spool_files()) >= 30, timeout=120, interval=0.01, what="30 instances")
        _kill_node(node, marker)
        output, _ = sender.communicate(timeout=120)
        acknowledged = {path_to_uid[p] for p in _acknowledged(output)}
        assert 20 <= len(acknowledged) < 100, output[-2000:]
    else:
        if phase == "export":
            pacs.hold.set()
        sent = storescu(folder, node.port)
        assert sent.returncode == 0, sent.stderr
        acknowledged = set(series.sop_instance_uids)
        if phase == "classification":
            wait_until(lambda: _db(node, f"select 1 from job where series_instance_uid = '{uid}' and "
                                         "state = 'classifying'"), timeout=120, interval=0.01,
                       what="the worker to classify")
        else:
            wait_until(pacs.holding.is_set, timeout=120, what="the SR on its way to the PACS")
        _kill_node(node, marker)
        pacs.hold.clear()
        pacs.release.set()

    # Its workers are gone; multiprocessing's resource tracker ends once it sees serve gone.
    wait_until(lambda: not processes_marked(marker), timeout=30, what="every process of the killed node to end")
    _start_marked(node, marker)  # recovery runs before the SCP listens
    assert acknowledged <= {p.stem for p in node.spool_files()}
    assert acknowledged <= db_instances(node)
    if phase == "ingest":  # the scanner resends what it was not told was stored
        assert storescu(folder, node.port).returncode == 0
    row = wait_until(lambda: (r := series_row(node, uid)) and r["state"] == "delivered" and r, timeout=180,
                     what=f"the series delivered after the kill during {phase}")
    assert row["instances"] == 100 and row["version"] == 1
    # Exactly one SR for this series version at the PACS (a resend after the kill reuses its UID).
    assert set(pacs.received) == {row["sr_sop_instance_uid"]}
    code = node.stop()
    assert code == 0, f"serve ended with {code}:\n{node.log_text()[-4000:]}"
    wait_until(lambda: not processes_marked(marker), timeout=30, what="every process of the node to end")


def test_a_pacs_down_for_a_while_gets_the_sr_once_with_the_backoff_shown(node_factory, tiny_checkpoint, t1_small):
    folder, series = t1_small
    port = free_port()  # nothing listens there yet: connection refused
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, idle_seconds=1, export_retry_seconds=1, runtime="torch",
                        destinations=[{"name": "pacs", "ae_title": PACS_AE, "port": port}]).start()
    assert storescu(folder, node.port).returncode == 0
    uid = series.series_instance_uid

    def backing_off() -> dict | None:
        shown = node.cli("show", uid, "--json")
        view = __import__("json").loads(shown.stdout) if shown.returncode == 0 else None
        if view and view["deliveries"] and view["deliveries"][0]["attempts"] >= 2:
            return view
        return None

    view = wait_until(backing_off, timeout=180, interval=0.5, what="two refused attempts")
    (delivery,) = view["deliveries"]
    assert delivery["state"] == "pending" and "cannot connect" in delivery["last_error"]
    assert delivery["next_attempt_at"] is not None
    pacs = Pacs.__new__(Pacs)
    pacs.port, pacs.received = port, []
    pacs.hold, pacs.holding, pacs.release = threading.Event(), threading.Event(), threading.Event()
    ae = AE(ae_title=PACS_AE)
    ae.add_supported_context(ComprehensiveSRStorage)
    pacs.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, pacs._store)])
    try:
        row = wait_until(lambda: (r := series_row(node, uid)) and r["state"] == "delivered" and r, timeout=60,
                         what="delivery once the PACS is up")
        assert pacs.received == [row["sr_sop_instance_uid"]]
        assert row["deliveries"][0]["attempts"] >= 3 and row["deliveries"][0]["last_error"] is None
    finally:
        pacs.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs for the node's data: a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_with_a700_keeps_nothing_half_written_and_resumes(small_disk, tmp_path_factory):
    from node.config import load_settings
    from node.service import NodeService

    folder = tmp_path_factory.mktemp("t1-256")
    series = write_classic_series(folder, slices=60, rows=256, columns=256, seed=5)  # ~130 KB per slice
    svc = NodeService(load_settings(overrides={
        "node": {"ae_title": "MIGNODE", "host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(small_disk / "data"), "min_free_disk_mb": 16},
        "series": {"idle_seconds": 1, "max_wait_seconds": 600}, "worker": {"processes": 0}}))
    svc.start()
    try:
        filler = small_disk / "filler"
        free_mb = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 2**20
        filler.write_bytes(b"\0" * ((free_mb - 16 - 3) * 2**20))  # room for about 3 MiB above the floor
        datasets = [pydicom.dcmread(p) for p in series.paths]
        statuses = scu_store(svc.port, *datasets)
        stored = statuses.count(StoreStatus.SUCCESS)
        assert 5 <= stored < 60 and set(statuses[stored:]) == {StoreStatus.OUT_OF_RESOURCES}, statuses
        assert svc.store.count_instances() == stored == len(list(svc.spool.root.glob("*/*/*.dcm")))
        assert list(svc.spool.root.rglob("*.tmp")) == []  # nothing half-written
        filler.unlink()  # the administrator makes room; nothing to restart
        assert set(scu_store(svc.port, *datasets)) == {StoreStatus.SUCCESS}
        view = wait_until(lambda: (v := svc.store.get_series(series.series_instance_uid)) and v.state != "receiving"
                          and v, timeout=30, what="the series to complete")
        assert view.instances == 60
    finally:
        svc.stop()


def test_a_database_locked_by_another_process_delays_success_until_the_row_is_committed(in_process_node, t1_small):
    folder, series = t1_small
    svc = in_process_node()
    db = svc.settings.storage.data_dir / "node.db"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('ROLLBACK')\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        datasets = [pydicom.dcmread(p) for p in series.paths[:5]]
        responses: list[int] = []
        sender = threading.Thread(target=lambda: responses.extend(scu_store(svc.port, *datasets)))
        sender.start()
        sender.join(3)  # while another process holds the database, no instance may be acknowledged
        assert responses == [] and sender.is_alive()
        holder.communicate("\n", timeout=60)  # the other process rolls back and ends
        sender.join(60)
        assert responses == [StoreStatus.SUCCESS] * 5
        assert svc.store.count_instances() == 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
