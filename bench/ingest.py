"""Ingest throughput: DCMTK storescu -> migraine-node vs -> DCMTK storescp.

Sends the same synthetic 170-slice 256x256 3D T1 series three times to each
SCP (fresh data directory per run, so every run is a first-time, fsynced
ingest for us) and prints images/s. Both peers and storescu run with
TCP_NODELAY=1. Last line: ratio=<ours/DCMTK> (medians).

    .venv/bin/python bench/ingest.py [--runs 3] [--slices 170]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.synth import write_classic_series  # noqa: E402
from tests.peers import free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SCP exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("SCP did not start")


def send(series_dir: Path, called: str, port: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [STORESCU, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), "+sd", str(series_dir)],
        env=ENV,
        check=True,
    )
    return time.perf_counter() - started


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_storescp(out: Path, n: int, send_to: Callable[[str, int], float]) -> float:
    """images/s of DCMTK storescp (AE title STORESCP, writing into `out`, made empty) while
    `send_to(called, port)` sends `n` instances and returns its seconds; every one must be stored."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "--output-directory", str(out), str(port)], env=ENV)
    try:
        wait_port(port, proc)
        seconds = send_to("STORESCP", port)
    finally:
        stop(proc)
    stored = sum(1 for _ in out.iterdir())
    if stored != n:
        raise RuntimeError(f"storescp stored {stored}/{n}")
    return n / seconds


def run_storescp(work: Path, series_dir: Path, n: int) -> float:
    return time_storescp(work / "storescp-out", n, lambda called, port: send(series_dir, called, port))


def run_node(work: Path, series_dir: Path, n: int) -> float:
    data = work / "node-data"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    config = work / "node.toml"
    config.write_text(
        f'[node]\nae_title = "MIGNODE"\nhost = "127.0.0.1"\nport = {port}\nlog_level = "WARNING"\n'
        f'[storage]\ndata_dir = "{data}"\nmin_free_disk_mb = 64\n'
        "[series]\nidle_seconds = 30\n[worker]\nprocesses = 0\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=ROOT)
    try:
        wait_port(port, proc)
        seconds = send(series_dir, "MIGNODE", port)
    finally:
        stop(proc)
    stored = sum(1 for _ in (data / "spool").glob("*/*/*.dcm"))
    if stored != n:
        raise RuntimeError(f"migraine-node stored {stored}/{n}")
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=170)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        series_dir = work / "series"
        write_classic_series(series_dir, slices=args.slices)
        ours, theirs = [], []
        for i in range(args.runs):
            theirs.append(run_storescp(work, series_dir, args.slices))
            print(f"run {i + 1}: dcmtk-storescp images/s={theirs[-1]:.0f}", flush=True)
            ours.append(run_node(work, series_dir, args.slices))
            print(f"run {i + 1}: migraine-node images/s={ours[-1]:.0f}", flush=True)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"series: {args.slices} x 256x256 MR slices, {args.runs} runs each, fsync before success on our side")
        print(f"migraine-node median images/s={a:.0f}")
        print(f"dcmtk-storescp median images/s={b:.0f}")
        print(f"ratio={a / b:.2f}")


if __name__ == "__main__":
    main()
