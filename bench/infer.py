"""Inference cost of the paper's 3D ResNet18 at 1x1x170x256x256, per runtime.

Each measurement runs in a child process so its peak memory is its own:
  - preprocess: a synthetic 170-slice 256x256 series read from disk, assembled
    (highdicom) and preprocessed to the paper's input spec (its tensor is the
    input of every forward pass below);
  - torch on the CPU: eager (contiguous), channels-last-3d (what `Predictor`
    runs for runtime "torch": the reference), torch.compile;
  - export: the dynamo ONNX export model/runtime.py caches (once per checkpoint);
  - onnxruntime, openvino: the runtimes model/runtime.py builds from that export
    (fp32), plus knob variants given with --variants (openvino_bf16,
    openvino_throughput, onnxruntime_basic, onnxruntime_1thread);
  - CUDA (bf16/fp16 autocast), eager and channels-last, when a GPU is present.
Weights are random (seed 0), saved as a real checkpoint. Prints median
milliseconds, CPU seconds, peak memory (RSS, or CUDA max allocated) and |Δp|
against the channels-last torch probability; the last line is always
`ratio=<fastest CPU runtime median / torch channels-last median>`, or `ratio=nan`
(the reason on the line before) when the reference or every CPU runtime failed.

    .venv/bin/python bench/infer.py [--runs 2] [--rounds 3] [--variants eager,channels_last,compile,onnxruntime,openvino]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = "eager,channels_last,compile,onnxruntime,openvino"
REFERENCE = "channels_last"
CPU_RUNTIMES = ("onnxruntime", "openvino")  # the ones `Predictor` runs; the ratio's numerator is the fastest


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(forward, runs: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Wall-clock and CPU seconds (all threads) of each run after the first, which warms up (and compiles)."""
    times, cpu = [], []
    for i in range(runs + 1):
        started, started_cpu = time.perf_counter(), time.process_time()
        forward()
        if i:
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    return times, cpu


def child(variant: str, runs: int, work: Path) -> dict:
    import torch

    from model.checkpoint import load_checkpoint
    from model.preprocess import PAPER_SPEC, build_transform, preprocess
    from model.runtime import OnnxRuntimeRuntime, OpenVinoRuntime, TorchRuntime, autocast_dtype, cache_paths, exported_onnx
    from model.volume import load_volume

    if variant == "preprocess":
        transform = build_transform(PAPER_SPEC)
        times, tensor = [], None
        for _ in range(runs):
            started = time.perf_counter()
            tensor = preprocess(load_volume(work / "series"), PAPER_SPEC, transform)
            times.append(time.perf_counter() - started)
        torch.save(tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor, work / "input.pt")
        return {"times_ms": [t * 1000 for t in times], "peak_rss_mb": _peak_rss_mb()}

    x = torch.load(work / "input.pt").unsqueeze(0).float().contiguous()
    shape = tuple(x.shape)
    checkpoint = work / "checkpoint"

    if variant == "export":
        model, info = load_checkpoint(checkpoint)
        started = time.perf_counter()
        exported_onnx(model, info, shape, work / "cache")
        return {"times_ms": [(time.perf_counter() - started) * 1000], "peak_rss_mb": _peak_rss_mb()}

    out: dict = {}
    if variant.startswith(CPU_RUNTIMES):
        from model.checkpoint import read_info

        onnx_path = cache_paths(work / "cache", read_info(checkpoint), shape)[0]
        if not onnx_path.exists():
            raise SystemExit("no ONNX export (the export variant failed)")
        variants = {
            "openvino": lambda: OpenVinoRuntime(onnx_path),
            "openvino_bf16": lambda: OpenVinoRuntime(onnx_path, precision="bf16"),
            "openvino_throughput": lambda: OpenVinoRuntime(onnx_path, hint="THROUGHPUT"),
            "onnxruntime": lambda: OnnxRuntimeRuntime(onnx_path),
            "onnxruntime_1thread": lambda: OnnxRuntimeRuntime(onnx_path, threads=1),
            "onnxruntime_basic": lambda: OnnxRuntimeRuntime(onnx_path, optimization="ORT_ENABLE_BASIC"),
        }
        if variant not in variants:
            raise SystemExit(f"unknown variant {variant} (known: {', '.join(variants)})")
        started = time.perf_counter()
        runtime = variants[variant]()
        out["load_ms"] = (time.perf_counter() - started) * 1000
        forward = lambda: runtime.logits(x)  # noqa: E731
    else:
        model, _ = load_checkpoint(checkpoint)
        device = torch.device("cuda" if variant.startswith("cuda") else "cpu")
        if "channels_last" in variant:
            runtime = TorchRuntime(model, device)  # exactly Predictor's torch path (autocast on CUDA)
            forward = lambda: runtime.logits(x)  # noqa: E731
        else:
            model = model.to(device)
            if variant == "compile":
                model = torch.compile(model)
            amp = autocast_dtype(device)

            def forward() -> torch.Tensor:
                with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
                    logits = model(x.to(device)).float().cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return logits

    holder: dict = {}
    times, cpu = _timed(lambda: holder.__setitem__("logits", forward()), runs)
    probability = float(torch.softmax(holder["logits"].float(), dim=1)[0, 1])
    out.update(times_ms=[t * 1000 for t in times], cpu_s=cpu, peak_rss_mb=_peak_rss_mb(), probability=probability,
               load=[os.getloadavg()[0]])
    if variant.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    try:
        _main()
    except Exception as exc:  # the ratio line still comes last; the traceback goes to stderr
        if "--child" in sys.argv:
            raise  # a child's failure is its parent's to report
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        _no_ratio(f"bench/infer.py failed: {type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per child process")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per forward variant, interleaved")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.runs, Path(args.work))))
        return

    import torch

    requested = [v for v in args.variants.split(",") if v]
    if torch.cuda.is_available():
        requested += ["cuda", "cuda_channels_last"]
    timed = [REFERENCE, *(v for v in requested if v != REFERENCE)]
    once = ["preprocess", *(["export"] if any(v.startswith(CPU_RUNTIMES) for v in timed) else [])]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        from model.checkpoint import save_checkpoint
        from model.network import build_network
        from model.preprocess import PAPER_SPEC
        from model.synth import write_series

        work = Path(tmp)
        write_series(work / "series", slices=170, rows=256, columns=256)
        torch.manual_seed(0)
        save_checkpoint(work / "checkpoint", build_network("resnet18"), name="bench-random", architecture="resnet18",
                        input_spec=PAPER_SPEC, synthetic=True)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 1x1x170x256x256, fp32 on the CPU; "
              f"{args.rounds} rounds x {args.runs} timed runs (after one warm-up) per variant, rounds interleaved; "
              f"reference: torch channels-last-3d (Predictor's torch path)", flush=True)
        # Interleaved rounds: on a shared machine, load that comes and goes falls on every variant alike.
        for variant in once + timed * args.rounds:
            print(f"  running {variant} ...", file=sys.stderr, flush=True)
            result = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--runs", str(args.runs), "--work", str(work)],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else str(result.returncode)
                results.setdefault(variant, {})["failed"] = last
                continue
            data = json.loads(result.stdout.strip().splitlines()[-1])
            merged = results.setdefault(variant, {"times_ms": [], "cpu_s": [], "load": [], "peak_rss_mb": 0.0})
            for key in ("times_ms", "cpu_s", "load"):
                merged[key] += data.pop(key, [])
            merged["peak_rss_mb"] = max(merged["peak_rss_mb"], data.pop("peak_rss_mb"))
            merged.update(data)

    reference = results.get(REFERENCE, {}).get("probability")
    # cpu_s (CPU seconds of all threads per forward pass) and load (1-minute load average after each child) tell
    # how much a busy machine stretched the wall clock.
    print(f"{'variant':<22} {'median_ms':>10} {'cpu_s':>6} {'peak_rss_mb':>12} {'probability':>12} {'|dp| vs ref':>12}"
          f" {'load':>5}")
    medians: dict[str, float] = {}
    for variant in once + timed:
        data = results.get(variant, {})
        if "times_ms" not in data:
            print(f"{variant:<22} failed: {data.get('failed', 'no result')}")
            continue
        medians[variant] = statistics.median(data["times_ms"])
        p = data.get("probability")
        shown_p = f"{p:.6f}" if p is not None else ""
        dp = f"{abs(p - reference):.1e}" if p is not None and reference is not None else ""
        extra = f"  load_ms={data['load_ms']:.0f}" if "load_ms" in data else ""
        if "cuda_peak_mb" in data:
            extra += f"  cuda_peak_mb={data['cuda_peak_mb']:.0f} gpu={data['gpu']}"
        cpu_s = f"{statistics.median(data['cpu_s']):.1f}" if data.get("cpu_s") else ""
        load = f"{max(data['load']):.1f}" if data.get("load") else ""
        print(f"{variant:<22} {medians[variant]:>10.0f} {cpu_s:>6} {data['peak_rss_mb']:>12.0f} {shown_p:>12} {dp:>12}"
              f" {load:>5}{extra}")
    cpu = {v: medians[v] for v in CPU_RUNTIMES if v in medians}
    if cpu and REFERENCE in medians:
        fastest = min(cpu, key=cpu.get)
        print(f"fastest CPU runtime: {fastest} (fp32); ratio = its median / torch channels-last-3d median")
        print(f"ratio={cpu[fastest] / medians[REFERENCE]:.2f}")
    else:
        missing = ([f"torch reference {REFERENCE}"] if REFERENCE not in medians else []) + (
            [f"every CPU runtime ({', '.join(CPU_RUNTIMES)})"] if not cpu else [])
        _no_ratio(f"{' and '.join(missing)} failed or not run")


def _no_ratio(reason: str) -> None:
    """The last line is always `ratio=<x>` (scripts parse it): nan, with the reason on the line before."""
    print(f"ratio cannot be computed: {reason}")
    print("ratio=nan", flush=True)


if __name__ == "__main__":
    main()
