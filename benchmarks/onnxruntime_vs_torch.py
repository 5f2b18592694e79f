"""onnxruntime vs PyTorch on the same exported inference form: 512×512, batch 1, same thread count, same run.

For each model: ``fuse()`` in PyTorch, and the ONNX file ``export_onnx`` writes from it, run by onnxruntime's CPU
provider with the same number of intra-op threads; timed alternately by ``compare_latency`` (medians and the median
same-round ratio). Dynamic models get random gate weights (fresh gates tie; latency does not depend on which
channels are kept). The difference columns are on untrained weights, where TopFormer's default BN statistics make
float32 itself unstable (see ``export_onnx``); with trained or the reference weights it is ~1e-5.

    .venv/bin/python benchmarks/onnxruntime_vs_torch.py [--rounds 20] [--threads 2]
        [--models topformer-tiny segformer-b0 dynasegformer-b0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from edgeseg import create_model
from edgeseg.deploy.benchmark import compare_latency
from edgeseg.deploy.export import export_onnx
from edgeseg.models.dynamic import random_gates_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512])
    parser.add_argument("--models", nargs="+", default=["topformer-tiny", "segformer-b0", "dynasegformer-b0"])
    parser.add_argument("--sparsity", type=float, default=0.3, help="for dynamic models")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    # onnxruntime's workers spin after each run by default, which steals the cores from the PyTorch run timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    x = torch.randn(1, 3, *args.size)
    print(f"{args.size[0]}×{args.size[1]}, batch 1, {args.threads} threads, {args.rounds} alternating rounds, "
          f"onnxruntime {ort.__version__} (load average {os.getloadavg()[0]:.1f})")
    print("| model | PyTorch fused ms | onnxruntime ms | onnxruntime / PyTorch | max abs diff | same class |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            kwargs = {"sparsity": args.sparsity} if name.startswith("dyna") else {}
            model = random_gates_(create_model(name, **kwargs).eval())
            fused = model.fuse()
            res = export_onnx(model, Path(tmp) / f"{name}.onnx", tuple(args.size))
            session = ort.InferenceSession(str(res.path), options, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            with torch.inference_mode():
                times = compare_latency({"torch": lambda m=fused: m(x),
                                         "ort": lambda s=session, f=feed: s.run(None, f)},
                                        rounds=args.rounds)
            t, o = statistics.median(times["torch"]), statistics.median(times["ort"])
            ratio = statistics.median(b / a for a, b in zip(times["torch"], times["ort"]))
            label = f"{name} {args.sparsity:.0%}" if kwargs else name
            print(f"| {label} | {t:.1f} | {o:.1f} | {ratio:.2f} | {res.max_abs_diff:.1e} | "
                  f"{res.argmax_agreement:.2%} |")


if __name__ == "__main__":
    main()
