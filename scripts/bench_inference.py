#!/usr/bin/env python
"""Torch eager vs ONNX Runtime on the node's networks: latency, throughput, peak RSS.

Each (network, engine, batch) runs in its own subprocess so peak RSS belongs to one
engine alone, and the ONNX Runtime worker never imports torch. Both engines get the same
weights (saved once by the parent) and the same thread count.

    .venv/bin/python scripts/bench_inference.py --repeats 10 --repeats-large 3
    .venv/bin/python scripts/bench_inference.py --provider cuda --fp16

Latency is the median wall time of one call (input already in host memory, output back
in host memory, so the CUDA figures include both copies for both engines); throughput
is samples per second at that median (a sample is one slice for ResNet-50, one 16-slice
study for the CNN+BiLSTM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# name -> (architecture, input name, per-sample input shape)
NETWORKS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "resnet50-256": ("resnet50", "image", (1, 256, 256)),
    "resnet50-384": ("resnet50", "image", (1, 384, 384)),
    "cnn-bilstm-16x128": ("cnn-bilstm", "slices", (16, 128, 128)),
}


@dataclass(frozen=True)
class Measurement:
    network: str
    engine: str
    provider: str
    dtype: str
    batch: int
    repeats: int
    median_ms: float
    p90_ms: float
    throughput: float
    load_s: float
    rss_after_load_mib: float
    peak_rss_mib: float


def _status_mib(field: str) -> float:
    # /proc/self/status, not getrusage: ru_maxrss survives exec on Linux, so a worker
    # would report the parent's (torch-laden) peak as its own.
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


def _build_torch(architecture: str) -> Any:
    from dicomnode.training.architectures import CnnBiLstm, resnet50_slice_classifier

    if architecture == "resnet50":
        return resnet50_slice_classifier()
    return CnnBiLstm()  # the seed-000 scale


def _time_calls(call: Any, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def worker(args: argparse.Namespace) -> Measurement:
    """Runs in a fresh process: load one engine, time it, report peak RSS."""
    import numpy as np

    architecture, input_name, shape = NETWORKS[args.network]
    dtype = np.float16 if args.fp16 else np.float32
    batch = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(dtype)
    started = time.perf_counter()
    if args.engine == "torch":
        import torch

        torch.set_num_threads(args.threads)
        device = torch.device("cuda" if args.provider == "cuda" else "cpu")
        model = _build_torch(architecture)
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        model = model.eval().to(device)
        if args.fp16:
            model = model.half()
        provider = "torch-cuda" if device.type == "cuda" else "torch-cpu"

        def call() -> None:
            with torch.inference_mode():
                out = model(torch.from_numpy(batch).to(device))
                out.cpu()

    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if args.provider == "cuda"
            else ["CPUExecutionProvider"]
        )
        session = ort.InferenceSession(args.onnx, options, providers=providers)
        provider = session.get_providers()[0]
        feed = {input_name: batch}

        def call() -> None:
            session.run(None, feed)

    load_s = time.perf_counter() - started
    rss_after_load = _current_rss_mib()
    times = _time_calls(call, args.warmup, args.repeats)
    median = statistics.median(times)
    return Measurement(
        network=args.network,
        engine=args.engine,
        provider=provider,
        dtype="float16" if args.fp16 else "float32",
        batch=args.batch,
        repeats=args.repeats,
        median_ms=median * 1e3,
        p90_ms=sorted(times)[max(0, round(0.9 * len(times)) - 1)] * 1e3,
        throughput=args.batch / median,
        load_s=load_s,
        rss_after_load_mib=rss_after_load,
        peak_rss_mib=_peak_rss_mib(),
    )


def _prepare(network: str, directory: Path, fp16: bool) -> tuple[Path, Path]:
    """Save seeded weights and the matching ONNX export for one network."""
    import torch

    from dicomnode.training.export import export_onnx

    architecture, input_name, shape = NETWORKS[network]
    torch.manual_seed(0)
    model = _build_torch(architecture).eval()
    weights = directory / f"{network}.pt"
    torch.save(model.state_dict(), weights)
    example = torch.randn(2, *shape)
    if fp16:
        model, example = model.half(), example.half()
    onnx_path = directory / f"{network}{'-fp16' if fp16 else ''}.onnx"
    export_onnx(model, {input_name: example}, onnx_path, output_names=["logits"])
    return weights, onnx_path


def _run_worker(argv: list[str]) -> Measurement:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{completed.stderr[-2000:]}")
    return Measurement(**json.loads(completed.stdout.strip().splitlines()[-1]))


def _table(results: list[Measurement]) -> str:
    lines = [
        "| network | batch | engine | provider | median ms | p90 ms | samples/s | "
        "load s | RSS after load MiB | peak RSS MiB | ORT/torch latency | ORT/torch peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.network, r.batch, r.engine): r for r in results}
    for r in results:
        ratio_latency = ratio_rss = ""
        if r.engine == "onnxruntime":
            base = by_key.get((r.network, r.batch, "torch"))
            if base is not None:
                ratio_latency = f"{r.median_ms / base.median_ms:.2f}"
                ratio_rss = f"{r.peak_rss_mib / base.peak_rss_mib:.2f}"
        lines.append(
            f"| {r.network} | {r.batch} | {r.engine} | {r.provider} | {r.median_ms:.1f} | "
            f"{r.p90_ms:.1f} | {r.throughput:.1f} | {r.load_s:.2f} | "
            f"{r.rss_after_load_mib:.0f} | {r.peak_rss_mib:.0f} | {ratio_latency} | {ratio_rss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1")
    parser.add_argument("--repeats-large", type=int, default=5, help="timed calls at batch > 1")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA only)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--network", choices=list(NETWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(asdict(worker(args))))
        return 0
    if args.fp16 and args.provider != "cuda":
        print(
            "fp16 skipped: ONNX Runtime's CPU provider lacks fp16 kernels for most of these "
            "operators and torch's CPU half convolutions are not a fair baseline; run "
            "--fp16 with --provider cuda. Continuing in float32.",
            file=sys.stderr,
        )
        args.fp16 = False
    if args.provider == "cuda":
        import onnxruntime as ort
        import torch

        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in (
            ort.get_available_providers()
        ):
            print(
                "--provider cuda needs a CUDA build of torch and onnxruntime-gpu with a GPU",
                file=sys.stderr,
            )
            return 2

    results: list[Measurement] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        for network in args.networks:
            print(f"exporting {network} ...", file=sys.stderr, flush=True)
            weights, onnx_path = _prepare(network, Path(scratch), args.fp16)
            for batch in args.batches:
                repeats = args.repeats if batch == 1 else args.repeats_large
                for engine in ("torch", "onnxruntime"):
                    worker_args = [
                        f"--engine={engine}",
                        f"--network={network}",
                        f"--batch={batch}",
                        f"--repeats={repeats}",
                        f"--warmup={args.warmup}",
                        f"--threads={args.threads}",
                        f"--provider={args.provider}",
                        f"--weights={weights}",
                        f"--onnx={onnx_path}",
                    ]
                    if args.fp16:
                        worker_args.append("--fp16")
                    result = _run_worker(worker_args)
                    results.append(result)
                    print(
                        f"  {network} batch {batch} {engine}: {result.median_ms:.1f} ms, "
                        f"peak RSS {result.peak_rss_mib:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    print(_table(results))
    print(
        f"\nthreads={args.threads} provider={args.provider} repeats={args.repeats}/"
        f"{args.repeats_large} warmup={args.warmup}; total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
