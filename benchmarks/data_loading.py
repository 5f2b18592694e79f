"""Data-loader throughput of the TopFormer-Tiny ADE20K training recipe, in images/s.

Recipe (``topformer_tiny_512x512_160k_2x8_ade20k``): Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0)) →
RandomCrop(512×512, cat_max_ratio=0.75) → RandomFlip(0.5) → PhotoMetricDistortion → Normalize → Pad, 2 images
per GPU. Real ADE20K images are ~512×683, so the script first writes `scenes` images of that size as JPEG + palette
PNG to a temporary folder: the measurement includes decoding, as in training.

    python benchmarks/data_loading.py                 # 2 workers, batch 2
    python benchmarks/data_loading.py --workers 4 --batch-size 8

It prints images/s only; comparing with a training step is the engine benchmark's job.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeseg.data import TrainTransform, build_dataset, collate, write_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="TopFormer recipe: 2 images per GPU")
    parser.add_argument("--images", type=int, default=16, help="distinct images written to the temp folder")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--measure", type=int, default=240, help="images timed after warm-up")
    parser.add_argument("--warmup", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_scenes(Path(tmp) / "scenes", num_train=args.images, num_val=0, size=tuple(args.size), seed=0)
        transform = TrainTransform(crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75)
        dataset = build_dataset("folder", root, "train", transform=transform)

        # Per-stage CPU time in this process (CPU time, unlike wall time, barely depends on other load).
        rng = np.random.default_rng(0)
        n = len(dataset)
        t0 = time.process_time()
        pairs = [dataset.load_pair(i) for i in range(n)]
        t1 = time.process_time()
        for _ in range(2):
            for img, gt in pairs:
                transform(img, gt, rng)
        t2 = time.process_time()
        decode, augment = (t1 - t0) / n, (t2 - t1) / (2 * n)
        print(
            f"CPU time per image: decode {1e3 * decode:.1f} ms, transform {1e3 * augment:.1f} ms "
            f"-> at most {args.workers / (decode + augment):.1f} images/s from {args.workers} idle cores"
        )

        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate,
            persistent_workers=args.workers > 0, drop_last=True,
        )
        it = iter(loader)
        seen = 0
        while seen < args.warmup:
            seen += len(next(it)["meta"])
        seen, start = 0, time.perf_counter()
        while seen < args.measure:
            batch = next(it)
            seen += len(batch["meta"])
        elapsed = time.perf_counter() - start
        assert batch["img"].shape[1:] == (3, 512, 512) and batch["gt"].shape[1:] == (512, 512)
        del it, loader
    print(
        f"data loading, TopFormer-Tiny ADE20K recipe (512x512 crop) on {args.size[0]}x{args.size[1]} JPEG/PNG, "
        f"{args.workers} workers, batch {args.batch_size}: {seen / elapsed:.1f} images/s "
        f"({seen} images in {elapsed:.2f} s; machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
