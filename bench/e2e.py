"""End to end at the paper's input size: last slice acknowledged -> SR stored in Orthanc.

DCMTK storescu sends a synthetic 170-slice 256x256 3D T1 series to
`migraine-node serve` (subprocess, one worker process) whose destination is a
real Orthanc. The checkpoint is the paper's ResNet18 at the paper's input spec
(1 mm, 170x256x256) with RANDOM weights: this measures time, not accuracy.
Prints the split: completion wait, load+assemble, preprocess, inference, SR
build, send (everything else: selection, queueing, C-STORE to Orthanc), and
the share of everything but inference and the completion wait.

`--runtime` is the node's `[model] runtime` (auto, torch, onnxruntime, openvino).
Each run starts a fresh node and sends once its worker says it is ready (model
loaded, warm-up done), so start-up is never part of the measured path.

    .venv/bin/python bench/e2e.py [--runs 1] [--runtime auto]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import NodeProcess, OrthancProcess, storescu, wait_until  # noqa: E402


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def used_runtime(log: str, requested: str) -> str:
    """The runtime the worker loaded the model on (its log says "loaded on cpu (openvino)")."""
    found = re.findall(r"loaded on \S+ \((\w+)\)", log)
    return found[-1] if found else requested


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnxruntime", "openvino"),
                        help="[model] runtime of the node (default: auto)")
    args = parser.parse_args()

    import torch

    from model.checkpoint import save_checkpoint
    from model.network import build_network
    from model.preprocess import PAPER_SPEC
    from model.synth import write_series

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        ckpt = root / "ckpt"
        save_checkpoint(ckpt, build_network("resnet18"), name="bench-random-paper-size", architecture="resnet18",
                        input_spec=PAPER_SPEC, synthetic=True, training={"note": "random weights, timing only"})
        pacs = OrthancProcess.create(root / "orthanc").start()
        try:
            for run in range(args.runs):
                series = write_series(root / f"series{run}", seed=run)
                node = NodeProcess.write_config(
                    _mkdir(root / f"node{run}"), idle_seconds=10,
                    workers=1, checkpoint=ckpt, runtime=args.runtime,
                    destinations=[{"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port}],
                ).start()
                try:
                    # The worker loads the model (an ONNX export and compile for the CPU runtimes) and warms up.
                    wait_until(lambda: "worker ready" in node.log_text(), timeout=900, interval=0.2,
                               what="the worker to be ready")
                    result = storescu(root / f"series{run}", node.port)
                    acknowledged = time.time()
                    assert result.returncode == 0, result.stderr
                    wait_until(lambda: pacs.find_instances({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33",
                                                            "StudyInstanceUID": series.study_instance_uid}),
                               timeout=900, interval=0.01, what="SR in Orthanc")
                    stored = time.time()
                    row = json.loads(node.cli("show", series.series_instance_uid, "--json").stdout)
                finally:
                    node.stop()
                timings = row["timings"]
                total = (stored - acknowledged) * 1000
                completion = (iso_seconds(row["completed_at"]) - acknowledged) * 1000
                load = timings["load"] + timings["assemble"]
                report = timings["report"] + timings["write"]
                send = total - completion - load - timings["preprocess"] - timings["inference"] - report
                print(f"run {run + 1}: total_ms={total:.0f}")
                print(f"  runtime={used_runtime(node.log_text(), args.runtime)}")
                print(f"  completion_wait_ms={max(completion, 0):.0f}")
                print(f"  load_assemble_ms={load:.0f}")
                print(f"  preprocess_ms={timings['preprocess']:.0f}")
                print(f"  inference_ms={timings['inference']:.0f}")
                print(f"  sr_build_ms={report:.0f}")
                print(f"  send_ms={send:.0f} (selection, queue, C-STORE to Orthanc)")
                other = total - max(completion, 0) - timings["inference"]
                print(f"  share_outside_inference_and_wait={other / total:.3f}")
        finally:
            pacs.stop()


if __name__ == "__main__":
    main()
