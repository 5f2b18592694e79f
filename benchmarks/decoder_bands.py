"""Fused SegFormer with its decoder in row bands vs in one pass: peak memory and latency, each in fresh processes.

In eval mode ``AdditiveMLPDecoder`` computes 16 rows of the 1/4 map at a time (``row_band``), so its upsampled
E-channel maps never exist whole. This script measures what that buys: the growth of the process's peak resident
memory over one forward pass (the weights and the input are allocated before it), and the median latency; every
measurement in a fresh process, the two forms alternating, because a process's allocator state would otherwise
carry over from one form to the other.

    .venv/bin/python benchmarks/decoder_bands.py [--model segformer-b0] [--sizes 512x512 1024x2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _child(model: str, size: tuple[int, int], row_band: int, runs: int, threads: int) -> None:
    import resource
    import time

    import torch

    from edgeseg import create_model

    torch.set_num_threads(threads)
    fused = create_model(model).eval().fuse()
    fused.decode_head.row_band = row_band
    x = torch.randn(1, 3, *size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        fused(x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the first forward: its own growth
        for _ in range(runs):
            t0 = time.perf_counter()
            fused(x)
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"peak_growth_mb": (peak - before) / 1024, "median_ms": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x2048"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per form and size")
    parser.add_argument("--runs", type=int, default=10, help="timed forwards per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, band = args.child[1], int(args.child[2])
        _child(args.child[0], tuple(int(v) for v in size.split("x")), band, args.runs, args.threads)
        return

    print(f"{args.model}, fused, batch 1, {args.threads} threads, {args.repeats} fresh processes per cell, "
          f"{args.runs} timed forwards each (load average {os.getloadavg()[0]:.1f})")
    print("| input | decoder | peak memory growth of a forward, MB | median ms |")
    print("|---|---|---|---|")
    for size in args.sizes:
        results: dict[int, list[dict]] = {0: [], 16: []}
        for _ in range(args.repeats):
            for band in results:
                out = subprocess.run([sys.executable, __file__, "--child", args.model, size, str(band),
                                      "--runs", str(args.runs), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                results[band].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for band, rows in results.items():
            label = "one pass" if band == 0 else f"row bands of {band}"
            mem = statistics.median(r["peak_growth_mb"] for r in rows)
            ms = statistics.median(r["median_ms"] for r in rows)
            print(f"| {size} | {label} | {mem:.0f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
