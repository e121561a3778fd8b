"""Inference cost of the paper's 3D ResNet18 at 1x1x170x256x256.

Each measurement runs in a child process so its peak memory is its own:
  - preprocess: a synthetic 170-slice 256x256 series read from disk, assembled
    (highdicom) and preprocessed to the paper's input spec;
  - forward passes (eager, channels-last-3d, torch.compile) on the CPU, and on
    CUDA (bf16/fp16 autocast) when a GPU is present.
Prints median milliseconds and peak memory (RSS, or CUDA max allocated).

    .venv/bin/python bench/infer.py [--runs 3] [--variants eager,channels_last,compile]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(variant: str, runs: int, series_dir: str | None) -> dict:
    import torch

    from model.network import build_network
    from model.predict import autocast_dtype
    from model.preprocess import PAPER_SPEC, build_transform, preprocess
    from model.volume import load_volume

    if variant == "preprocess":
        transform = build_transform(PAPER_SPEC)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            preprocess(load_volume(Path(series_dir)), PAPER_SPEC, transform)
            times.append(time.perf_counter() - started)
        return {"median_ms": statistics.median(times) * 1000, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    device = torch.device("cuda" if variant.startswith("cuda") else "cpu")
    model = build_network("resnet18").eval().to(device)
    x = torch.randn(1, 1, *PAPER_SPEC.shape, device=device)
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if "compile" in variant:
        model = torch.compile(model)
    amp = autocast_dtype(device)
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):  # first run warms up (and compiles)
            started = time.perf_counter()
            with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
    out = {"median_ms": statistics.median(times) * 1000, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default="eager,channels_last,compile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.runs, args.series)))
        return

    import torch

    variants = ["preprocess", *args.variants.split(",")]
    if torch.cuda.is_available():
        variants += ["cuda", "cuda_channels_last"]
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        from model.synth import write_series

        write_series(Path(tmp) / "series", slices=170, rows=256, columns=256)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, input 1x1x170x256x256", flush=True)
        for variant in variants:
            result = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--runs", str(args.runs), "--series", str(Path(tmp) / "series")],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                print(f"{variant}: failed: {result.stderr.strip().splitlines()[-1] if result.stderr else result.returncode}")
                continue
            data = json.loads(result.stdout.strip().splitlines()[-1])
            extra = f" cuda_peak_mb={data['cuda_peak_mb']:.0f} gpu={data['gpu']}" if "cuda_peak_mb" in data else ""
            print(f"{variant}: median_ms={data['median_ms']:.0f} peak_rss_mb={data['peak_rss_mb']:.0f}{extra}", flush=True)


if __name__ == "__main__":
    main()
