"""Forward latency with glibc's default malloc vs ``keep_freed_memory()``, in alternating fresh processes.

The setting is process-wide and cannot be undone, so each measurement is its own Python process (same model, same
input, torch threads as given): ``default`` and ``keep`` alternate for ``--rounds`` rounds; each process reports the
median of ``--iters`` timed forwards after warm-up. Printed: median over rounds and the median same-round ratio.

    .venv/bin/python benchmarks/allocator.py [--rounds 5] [--models segformer-b0 topformer-tiny] [--fuse]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
from edgeseg import create_model
from edgeseg.deploy.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
name, fuse, iters, threads = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = create_model(name).eval()
model = model.fuse() if fuse else model
x = torch.randn(1, 3, 512, 512)
with torch.inference_mode():
    for _ in range(3):
        model(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"applied": applied, "ms": statistics.median(times)}))
"""


def run(mode: str, name: str, fuse: bool, iters: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, name, "1" if fuse else "0", str(iters), str(threads)],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["segformer-b0", "topformer-tiny"])
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    print(f"512×512, batch 1, {args.threads} threads, {'fused' if args.fuse else 'eager'} models, {args.rounds} "
          f"alternating rounds of fresh processes (load average {os.getloadavg()[0]:.1f})")
    print("| model | default malloc ms | keep_freed_memory ms | keep / default |")
    print("|---|---|---|---|")
    for name in args.models:
        times: dict[str, list[float]] = {"default": [], "keep": []}
        for _ in range(args.rounds):
            for mode in times:
                res = run(mode, name, args.fuse, args.iters, args.threads)
                if mode == "keep" and not res["applied"]:
                    sys.exit("keep_freed_memory() does not apply here (not Linux/glibc)")
                times[mode].append(res["ms"])
        d, k = statistics.median(times["default"]), statistics.median(times["keep"])
        ratio = statistics.median(b / a for a, b in zip(times["default"], times["keep"]))
        print(f"| {name} | {d:.1f} | {k:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
