"""Scale-out on a real PostgreSQL server: two ingest nodes receive the same studies from two
senders at once, three worker processes (on a `serve --role worker`) and two exporters share one
database and one spool. Every series is classified exactly once, every SR reaches the PACS once."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from model.synth import write_classic_series
from tests.node.test_supervision import processes_marked
from tests.peers import DCMTK_ENV, NODE_AE, free_port, storescu, wait_until

STORESCP = "/usr/bin/storescp"
STUDIES = 10  # two T1 series each: twenty series
SLICES = 100  # the fewest a 3D T1 may have (node/selection.py)


def _config(root: Path, database_url: str, port: int, pacs_port: int, checkpoint: Path) -> Path:
    config = root / "node.toml"
    config.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = {port}\nlog_level = "INFO"\n'
        f'[storage]\ndata_dir = "{root / "shared"}"\ndatabase_url = "{database_url}"\nmin_free_disk_mb = 16\n'
        "[series]\nidle_seconds = 2\nmax_wait_seconds = 600\n"
        "[worker]\nprocesses = 3\nretry_seconds = 1\nlease_seconds = 20\n"
        "[export]\nretry_initial_seconds = 1\nretry_max_seconds = 2\n"
        f'[model]\ncheckpoint = "{checkpoint}"\ndevice = "cpu"\nruntime = "torch"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    return config


def _serve(config: Path, role: str, log: Path, marker: str, port: int | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRAINE_NODE_")}
    env["MIGRAINE_TEST_MARK"] = marker
    args = [sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--role", role]
    if port is not None:
        args += ["--port", str(port)]
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def _listening(proc: subprocess.Popen, port: int, log: Path) -> bool:
    import socket

    if proc.poll() is not None:
        raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _running(proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
    return "running (data_dir=" in log.read_text()


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("studies")
    folders = []
    for study in range(STUDIES):
        study_uid = f"1.2.826.0.1.3680043.8.498.77.{study + 1}"
        for number in (1, 2):
            folder = root / f"s{study:02d}-{number}"
            folder.mkdir()
            write_classic_series(folder, slices=SLICES, rows=32, columns=32, spacing=1.0, seed=100 + 2 * study + number,
                                 study_instance_uid=study_uid, patient_id=f"SCALE-{study:03d}")
            folders.append(folder)
    return folders


def test_two_ingest_nodes_three_workers_two_exporters_on_postgresql(postgres_server, studies, tiny_checkpoint,
                                                                   tmp_path):
    database_url = postgres_server.create_database("scale")
    marker = f"scale-out-{uuid.uuid4()}"
    pacs_port, port_a, port_b = free_port(), free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen([STORESCP, "+uf", "-od", str(received), "-aet", "PACS", str(pacs_port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = _config(tmp_path, database_url, port_a, pacs_port, tiny_checkpoint)
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest-a", "ingest-b", "worker", "export-1", "export-2")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        # Two ingest nodes first (one creates the schema, the other waits on its advisory lock).
        procs["ingest-a"] = _serve(config, "ingest", logs["ingest-a"], marker, port_a)
        procs["ingest-b"] = _serve(config, "ingest", logs["ingest-b"], marker, port_b)
        for name, port in (("ingest-a", port_a), ("ingest-b", port_b)):
            wait_until(lambda: _listening(procs[name], port, logs[name]), timeout=60, what=f"{name} to listen")
        procs["worker"] = _serve(config, "worker", logs["worker"], marker)
        procs["export-1"] = _serve(config, "export", logs["export-1"], marker)
        procs["export-2"] = _serve(config, "export", logs["export-2"], marker)
        for name in ("worker", "export-1", "export-2"):
            wait_until(lambda: _running(procs[name], logs[name]), timeout=60, what=f"{name} to run")

        # Two senders send every study, one to each ingest node, at the same time.
        results: dict[int, subprocess.CompletedProcess] = {}

        files = sorted(f for folder in studies for f in folder.glob("*.dcm"))

        def send(port: int) -> None:
            results[port] = storescu(files, port, calling=f"SENDER{port % 10}")

        senders = [threading.Thread(target=send, args=(port,)) for port in (port_a, port_b)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        for port, result in results.items():
            assert result.returncode == 0, f"sender to {port}: {result.stderr[-2000:]}"

        engine = create_engine(database_url)
        try:
            def delivered() -> bool:
                for name, proc in procs.items():
                    assert proc.poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
                with engine.connect() as conn:
                    states = dict(conn.execute(text("SELECT state, count(*) FROM series GROUP BY state")).all())
                assert not {"skipped", "failed", "incomplete"} & set(states), states
                return states.get("delivered") == 20

            wait_until(delivered, timeout=600, interval=0.5, what="all twenty series delivered")
            time.sleep(2)  # any duplicate send would land now
            with engine.connect() as conn:
                series = conn.execute(text("SELECT series_instance_uid, state, version, instances FROM series")).all()
                jobs = conn.execute(text(
                    "SELECT series_instance_uid, version, state, attempts, probability, queued_at, claimed_at, "
                    "lease_owner FROM job")).all()
                instances = conn.execute(text("SELECT count(*) FROM instance")).scalar()
                sent = conn.execute(text("SELECT series_instance_uid, kind, destination FROM transmission")).all()
                deliveries = conn.execute(text("SELECT state, lease_owner FROM delivery")).all()
        finally:
            engine.dispose()

        # Every instance once (both senders' copies are one row and one file), every series once.
        total = len(studies) * SLICES
        assert instances == total
        assert len(list((tmp_path / "shared" / "spool").glob("*/*/*.dcm"))) == total
        assert len(series) == 20 and {(s.state, s.version, s.instances) for s in series} == {("delivered", 1, SLICES)}
        # Classified exactly once: one job per series, one attempt, a probability.
        assert len(jobs) == 20 and len({j.series_instance_uid for j in jobs}) == 20
        assert {(j.version, j.state, j.attempts) for j in jobs} == {(1, "delivered", 1)}
        assert all(j.probability is not None and j.lease_owner is None for j in jobs)
        # Delivered exactly once: one acknowledged SR per series, twenty distinct files at the PACS
        # (storescp +uf keeps a second copy of the same instance as a second file).
        assert sorted(s.series_instance_uid for s in sent) == sorted(s.series_instance_uid for s in series)
        assert {(s.kind, s.destination) for s in sent} == {("sr", "pacs")}
        assert [d.state for d in deliveries] == ["sent"] * 20
        assert len(list(received.iterdir())) == 20

        latencies = sorted(j.claimed_at - j.queued_at for j in jobs)
        report = {"series": 20, "instances": total, "jobs": len(jobs), "duplicate_jobs": len(jobs) - 20,
                  "srs_at_pacs": len(list(received.iterdir())), "duplicate_srs": len(list(received.iterdir())) - 20,
                  "queued_to_claimed_min_s": round(latencies[0], 3),
                  "queued_to_claimed_median_s": round(statistics.median(latencies), 3),
                  "queued_to_claimed_max_s": round(latencies[-1], 3)}
        print("scale-out:", json.dumps(report))
        for name, log in logs.items():
            assert "Traceback" not in log.read_text(), f"{name}:\n{log.read_text()[-3000:]}"
    finally:
        try:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = {}
            for name, proc in procs.items():
                try:
                    codes[name] = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes[name] = proc.wait()
        finally:
            pacs.terminate()
            pacs.wait(10)
    assert set(codes.values()) == {0}, codes
    wait_until(lambda: not processes_marked(marker), timeout=30, what="every process of the five nodes to end")
