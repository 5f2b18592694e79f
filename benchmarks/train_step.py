"""Training step time (forward + loss + backward + AdamW step) with and without bf16 autocast.

    python benchmarks/train_step.py [--model topformer-tiny] [--batch 8] [--size 512 512] [--steps 3]

The step is the engine's own: ``seg_loss`` on logits upsampled to the label size, AdamW with the official
parameter groups. Inputs are random (data loading is not timed). Median of ``--steps`` after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from edgeseg.config import OptimCfg
from edgeseg.engine.optim import build_optimizer
from edgeseg.engine.train import seg_loss
from edgeseg.models import create_model


def step_times(model_name: str, batch: int, size: tuple[int, int], steps: int, amp: str) -> list[float]:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=150).train()
    optimizer = build_optimizer(model, OptimCfg(lr=3e-4))
    img = torch.randn(batch, 3, *size)
    gt = torch.randint(0, 150, (batch, *size))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext():
            loss = seg_loss(model(img), gt)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="topformer-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = args.size
    print(f"{args.model}  batch {args.batch}  {h}x{w}  CPU  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"{'precision':<10} {'median s/step':>14} {'min':>8} {'max':>8} {'images/s':>9}")
    for amp in ("fp32", "bf16"):
        t = step_times(args.model, args.batch, (h, w), args.steps, amp)
        med = statistics.median(t)
        print(f"{amp:<10} {med:>14.2f} {min(t):>8.2f} {max(t):>8.2f} {args.batch / med:>9.2f}")


if __name__ == "__main__":
    main()
