"""SegFormer latency: edgeseg fused vs Hugging Face transformers' eager SegformerForSemanticSegmentation, same weights.

One set of random weights is written as a Hugging Face folder and loaded by both sides, so both compute the same
function (transformers' LayerNorm eps convention, 1e-5 everywhere); the script prints max |Δ| of the logits next to
the times. The models are timed alternately in the same run (warm-up, then A, B, C, A, B, C, ...) and the medians
compared, because on a shared machine only same-run ratios are stable. transformers is timed with both of its
attention implementations ("eager" = explicit softmax(QKᵀ)V, "sdpa" = its default); the fused model also with its
decoder's row bands turned off (``row_band = 0``) and with its resizes in PyTorch instead of the native
resize-and-add kernel (``decode_head.native = False``).

    PYTHONPATH=src .venv/bin/python benchmarks/segformer_fused_vs_hf.py [--model segformer-b0] [--size 512 512]
        [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile

import torch

from edgeseg.deploy.benchmark import compare_latency, random_weights_
from edgeseg.models.hf_segformer import load_hf_folder, save_hf_folder
from edgeseg.models.segformer import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segformer-b0", choices=[m for m in MODELS if m.startswith("segformer")])
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    from transformers import SegformerForSemanticSegmentation  # only this script needs transformers

    torch.set_num_threads(args.threads)
    source = MODELS[args.model](ln_eps=1e-5)
    random_weights_(source)
    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(source.eval(), folder)
        ours = load_hf_folder(folder)
        hf = {impl: SegformerForSemanticSegmentation.from_pretrained(folder, attn_implementation=impl).eval()
              for impl in ("eager", "sdpa")}
    fused = ours.fuse()
    whole = copy.deepcopy(fused)
    whole.decode_head.row_band = 0  # the decoder's whole-map pass, to show what the row bands buy
    resized_in_torch = copy.deepcopy(fused)
    resized_in_torch.decode_head.native = False  # to show what the native resize-and-add buys
    x = torch.randn(args.batch, 3, *args.size, generator=torch.Generator().manual_seed(1))

    fns = {
        "transformers (attn eager)": lambda: hf["eager"](pixel_values=x).logits,
        "transformers (attn sdpa)": lambda: hf["sdpa"](pixel_values=x).logits,
        "edgeseg unfused": lambda: ours(x),
        "edgeseg fused": lambda: fused(x),
        "edgeseg fused, decoder in one pass (no row bands)": lambda: whole(x),
        "edgeseg fused, decoder resizes in PyTorch": lambda: resized_in_torch(x),
    }
    with torch.inference_mode():
        reference = fns["transformers (attn eager)"]()
        diffs = {name: (fn() - reference).abs().max().item() for name, fn in fns.items()}
    times = compare_latency(fns, rounds=args.rounds, warmup=3)
    base = statistics.median(times["transformers (attn eager)"])

    print(f"{args.model}, input {args.batch}x3x{args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| implementation | median ms | min ms | / transformers eager | max abs diff vs transformers |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.1f} | {min(ts):.1f} | {med / base:.2f} | {diffs[name]:.1e} |")


if __name__ == "__main__":
    main()
