"""TopFormer-T/S/B latency at 512×512, batch 1, 1 and 2 threads, eager vs fused (the table quoted in README).

Eager is our unfused model, which computes exactly what the official eager code computes (the parity tests prove
it), so "fused / eager" is the speed-up over the official implementation's forward on this machine. Eager and fused
are timed alternately in the same run, because on a shared machine only same-run ratios are stable.

    .venv/bin/python benchmarks/topformer.py [--rounds 15] [--size 512 512]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from edgeseg import create_model
from edgeseg.deploy.benchmark import compare_latency, count_gmacs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512])
    parser.add_argument("--models", nargs="+", default=["topformer-tiny", "topformer-small", "topformer-base"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()

    x = torch.randn(1, 3, *args.size)
    print("| model | threads | GMACs | eager ms (median) | fused ms (median) | fused / eager "
          "| max abs diff (float64) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        eager = create_model(name).eval()
        fused = eager.fuse()
        # Fusion is exact algebra; float32 rounding of an untrained model would hide that, so compare in float64.
        with torch.inference_mode():
            diff = (eager.double()(x.double()) - eager.fuse()(x.double())).abs().max().item()
        eager.float()
        gmacs = count_gmacs(eager, tuple(args.size))
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = compare_latency({"eager": lambda m=eager: m(x), "fused": lambda m=fused: m(x)}, rounds=args.rounds)
            e, f = statistics.median(times["eager"]), statistics.median(times["fused"])
            print(f"| {name} | {threads} | {gmacs:.3f} | {e:.1f} | {f:.1f} | {f / e:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
