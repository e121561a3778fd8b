"""Load: concurrent DCMTK storescu senders against the running node, DCMTK storescp and Orthanc.

Each of --senders senders sends --studies studies, each a 3D T1 series (--slices slices, selected
and classified) and a non-T1 series (same size, a T2 description: received, skipped). The node runs
as `serve` with [node] acceptors (default 4) and one worker (a random-weight ResNet18 at a tiny input:
this measures the node, not the network), exporting each SR to a DCMTK storescp PACS (+uf: a duplicate
send would be a second file). Then the same senders send the same files to DCMTK storescp and to
Orthanc, in the same run. Prints aggregate images/s for each, the node's peak RSS per process, the
checks (instances lost, duplicates, SRs delivered), our single-sender rate and four-sender aggregate
(the scaling target: four >= 1.8 x one, and >= Orthanc's aggregate), and `ratio=<ours/DCMTK>` last.

    .venv/bin/python bench/load.py [--senders 10] [--studies 5] [--slices 170] [--rows 128] [--acceptors 4]
    .venv/bin/python bench/load.py --studies 15     # three times the studies: is memory flat?
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import ENV, STORESCP, STORESCU, stop, time_storescp, wait_port  # noqa: E402
from tests.peers import OrthancProcess, free_port  # noqa: E402


def make_studies(root: Path, senders: int, studies: int, slices: int, rows: int) -> list[list[Path]]:
    """Folders of files per sender: one T1 and one non-T1 series per study, all distinct UIDs."""
    from model.synth import write_classic_series

    out = []
    for s in range(senders):
        folders = []
        for k in range(studies):
            study = f"1.2.826.0.1.3680043.8.498.99.{s + 1}.{k + 1}"
            for kind, description in (("t1", "T1W_3D_TFE"), ("t2", "T2W_TSE")):
                folder = root / f"sender{s}" / f"study{k}-{kind}"
                folder.mkdir(parents=True)
                write_classic_series(folder, slices=slices, rows=rows, columns=rows, spacing=1.0,
                                     seed=1000 * s + 10 * k + (kind == "t2"), study_instance_uid=study,
                                     series_description=description, patient_id=f"LOAD-{s:02d}-{k:02d}")
                folders.append(folder)
        out.append(folders)
    return out


def send_all(per_sender: list[list[Path]], called: str, port: int) -> float:
    """Every sender at once, each one association per series (as a scanner sends); wall seconds."""
    errors: list[str] = []

    def sender(index: int, folders: list[Path]) -> None:
        for folder in folders:
            done = subprocess.run([STORESCU, "-aet", f"LOAD{index:02d}", "-aec", called, "127.0.0.1", str(port),
                                   "+sd", str(folder)], env=ENV, capture_output=True, text=True)
            if done.returncode != 0:
                errors.append(done.stderr[-500:])

    threads = [threading.Thread(target=sender, args=(i, f)) for i, f in enumerate(per_sender)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} sender run(s) failed: {errors[0]}")
    return seconds


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for q in Path("/proc").iterdir():
            if q.name.isdigit() and _status(int(q.name)).get("PPid", "").strip() == str(p):
                todo.append(int(q.name))
    return out


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) of `pid` and every descendant, by process name."""
    out = {}
    for p in tree(pid):
        status = _status(p)
        if "VmHWM" in status:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            kind = ("serve" if p == pid else "worker/acceptor" if "spawn_main" in cmd and "resource_tracker" not in cmd
                    else "resource_tracker" if "resource_tracker" in cmd else "other")
            out[f"{kind} {p}"] = int(status["VmHWM"].split()[0]) / 1024
    return out


def checkpoint(work: Path) -> Path:
    import torch

    from model.checkpoint import save_checkpoint
    from model.network import build_network
    from model.preprocess import InputSpec

    torch.manual_seed(0)
    out = work / "ckpt"
    save_checkpoint(out, build_network("resnet18"), name="bench-random", architecture="resnet18",
                    input_spec=InputSpec(spacing=(8.0, 8.0, 8.0), shape=(24, 32, 32)), cutoff=0.5, synthetic=True,
                    training={"note": "random weights, for load benchmarks"})
    return out


def run_node(work: Path, per_sender: list[list[Path]], acceptors: int, ckpt: Path, label: str,
             wait_for_results: bool, workers: int = 1) -> tuple[float, dict, dict]:
    data = work / f"node-{label}"
    pacs_dir = work / f"pacs-{label}"
    pacs_dir.mkdir()
    pacs_port, port = free_port(), free_port()
    pacs = subprocess.Popen([STORESCP, "+uf", "-od", str(pacs_dir), "-aet", "PACS", str(pacs_port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = work / f"node-{label}.toml"
    config.write_text(
        f'[node]\nae_title = "MIGNODE"\nhost = "127.0.0.1"\nport = {port}\nlog_level = "WARNING"\n'
        f"acceptors = {acceptors}\nmax_associations = 50\n"
        f'[storage]\ndata_dir = "{data}"\nmin_free_disk_mb = 64\n'
        f"[series]\nidle_seconds = 5\n[worker]\nprocesses = {workers}\n"
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\nruntime = "torch"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    log = (work / f"node-{label}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        wait_port(port, proc)
        time.sleep(1.0 + acceptors)  # the extra acceptors bind the port once spawned
        seconds = send_all(per_sender, "MIGNODE", port)
        total = sum(len(list(f.glob("*.dcm"))) for folders in per_sender for f in folders)
        t1 = sum(1 for folders in per_sender for f in folders if f.name.endswith("-t1"))
        checks = {"instances_sent": total}
        db = sqlite3.connect(f"file:{data / 'node.db'}?mode=ro", uri=True, timeout=30)
        if wait_for_results:
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                delivered = db.execute("select count(*) from series where state = 'delivered'").fetchone()[0]
                if delivered >= t1:
                    break
                time.sleep(1)
            time.sleep(2)
        rss = peak_rss_mb(proc.pid)
        checks["instances_stored"] = db.execute("select count(*) from instance").fetchone()[0]
        checks["spool_files"] = sum(1 for _ in (data / "spool").glob("*/*/*.dcm"))
        checks["instances_lost"] = total - checks["instances_stored"]
        if wait_for_results:
            states = dict(db.execute("select state, count(*) from series group by state").fetchall())
            checks["t1_series"] = t1
            checks["series_states"] = states
            checks["srs_at_pacs"] = sum(1 for _ in pacs_dir.iterdir())
            checks["duplicate_srs"] = checks["srs_at_pacs"] - states.get("delivered", 0)
            checks["jobs_per_series_max"] = db.execute(
                "select coalesce(max(n), 0) from (select count(*) n from job group by series_instance_uid)").fetchone()[0]
        db.close()
    finally:
        stop(proc)
        stop(pacs)
        log.close()
    return total / seconds, rss, checks


def run_storescp(work: Path, per_sender: list[list[Path]]) -> float:
    total = sum(len(list(f.glob("*.dcm"))) for folders in per_sender for f in folders)
    return time_storescp(work / "storescp", total, lambda called, port: send_all(per_sender, called, port))


def run_orthanc(work: Path, per_sender: list[list[Path]]) -> float:
    orthanc = OrthancProcess.create(work / "orthanc").start()
    try:
        seconds = send_all(per_sender, orthanc.aet, orthanc.dicom_port)
        total = sum(len(list(f.glob("*.dcm"))) for folders in per_sender for f in folders)
        stored = orthanc.get("/statistics")["CountInstances"]
        if stored != total:
            raise RuntimeError(f"Orthanc stored {stored}/{total}")
    finally:
        orthanc.stop()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--studies", type=int, default=5, help="studies per sender (a T1 and a non-T1 series each)")
    parser.add_argument("--slices", type=int, default=170)
    parser.add_argument("--rows", type=int, default=128, help="rows = columns of every slice")
    parser.add_argument("--acceptors", type=int, default=4, help="[node] acceptors for the load run")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the one-vs-four-senders measurement")
    parser.add_argument("--only-scaling", action="store_true", help="only the one-vs-four-senders measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        per_sender = make_studies(work / "studies", args.senders, args.studies, args.slices, args.rows)
        total = args.senders * args.studies * 2 * args.slices
        print(f"load: {args.senders} senders x {args.studies} studies x (T1 + non-T1) x {args.slices} slices "
              f"{args.rows}x{args.rows} = {total} instances (made in {time.perf_counter() - started:.0f} s)",
              flush=True)
        ckpt = checkpoint(work)
        if args.only_scaling:
            args.skip_scaling = False
        ours, rss, checks = (0.0, {}, {}) if args.only_scaling else run_node(work, per_sender, args.acceptors, ckpt, "load", wait_for_results=True)
        if not args.only_scaling:
            print(f"migraine-node ({args.acceptors} acceptors, 1 worker) aggregate images/s={ours:.0f}", flush=True)
            for name, mb in sorted(rss.items()):
                print(f"migraine-node peak RSS {name}: {mb:.0f} MB")
            print(f"migraine-node peak RSS total: {sum(rss.values()):.0f} MB")
            print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()), flush=True)
        dcmtk = run_storescp(work, per_sender)
        print(f"dcmtk-storescp aggregate images/s={dcmtk:.0f}", flush=True)
        if not args.only_scaling:
            orthanc = run_orthanc(work, per_sender)
            print(f"orthanc aggregate images/s={orthanc:.0f}", flush=True)
        if not args.skip_scaling:
            # Ingest alone (no worker competing for the cores): what the acceptors scale.
            one = run_node(work, per_sender[:1], args.acceptors, ckpt, "one", wait_for_results=False, workers=0)[0]
            four = run_node(work, per_sender[:4], args.acceptors, ckpt, "four", wait_for_results=False, workers=0)[0]
            four_single = run_node(work, per_sender[:4], 1, ckpt, "four-single", wait_for_results=False, workers=0)[0]
            orthanc_four = run_orthanc(work / "o4", per_sender[:4]) if len(per_sender) >= 4 else float("nan")
            print(f"scaling (ingest only, {args.acceptors} acceptors): migraine-node 1 sender images/s={one:.0f}, "
                  f"4 senders aggregate images/s={four:.0f} ({four / one:.2f}x; target >= 1.8x; with 1 acceptor "
                  f"{four_single:.0f}), orthanc 4 senders images/s={orthanc_four:.0f} "
                  f"(ours/orthanc {four / orthanc_four:.2f}; target >= 1.0)", flush=True)
        if not args.only_scaling:
            print(f"ratio={ours / dcmtk:.2f}")


if __name__ == "__main__":
    main()
