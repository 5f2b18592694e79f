"""Confusion-matrix accumulation speed (Mpixel/s) of edgeseg.engine.metrics.ConfusionMatrix.

    python benchmarks/metrics.py [--classes 150] [--size 512 683] [--images 20]

Inputs are what evaluation feeds it: an int64 argmax map and a label map with ~10% ignore (255).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgeseg.engine.metrics import ConfusionMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=20, help="updates per timed run")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--label-dtype", choices=["uint8", "int64"], default="uint8",
                        help="uint8 as stored in label PNGs; int64 as the data transforms return it")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    h, w = args.size
    label = torch.randint(0, args.classes, (h, w), generator=gen).to(torch.uint8)
    label[torch.rand(h, w, generator=gen) < 0.1] = 255
    label = label.to(getattr(torch, args.label_dtype))
    pred = torch.randint(0, args.classes, (h, w), generator=gen)
    rates = []
    for _ in range(args.runs + 1):  # first run is warm-up
        cm = ConfusionMatrix(args.classes)
        t0 = time.perf_counter()
        for _ in range(args.images):
            cm.update(pred, label)
        rates.append(args.images * h * w / (time.perf_counter() - t0) / 1e6)
    rates = rates[1:]
    print(f"ConfusionMatrix.update  {args.classes} classes  {h}x{w} {args.label_dtype} labels  "
          f"torch threads {torch.get_num_threads()}")
    print(f"  median {statistics.median(rates):.0f} Mpixel/s   best {max(rates):.0f} Mpixel/s   ({args.runs} runs "
          f"of {args.images} images)")


if __name__ == "__main__":
    main()
