"""A dynamic student (30 % sparsity) distilled from its dense teacher, both trained on the CPU on ``scenes``.

The DynaSegFormer paper's claim in miniature: a student pruned per image keeps most of its teacher's accuracy for
fewer executed MACs. ``--student dynasegformer-b0`` (default): SegFormer-B0 → DynaSegFormer-B0;
``--student topformer-tiny-dynamic``: TopFormer-Tiny (the demo's model and recipe) → TopFormer-Tiny with a dynamic
semantics extractor. Three steps, each through the public API:

1. ``train(<teacher config>)`` — the dense teacher from scratch (demo-like data pipeline);
2. ``distill(<student config>)`` with ``distill.teacher`` = the teacher's checkpoint —
   stage 1 feature MSE + gate L1 with sparsity annealing, stage 2 CE + soft CE;
3. ``evaluate`` both on the 100 validation scenes with the same call (eval mode: the student runs its gathered
   inference path), and ``count_gmacs`` of both at 192×192 (ops actually executed).

Printed: teacher and student mIoU, their ratio (target >= 0.95), iterations and wall times, GMACs. Training time
depends on what else runs on the machine, so the 1-minute load average is printed before and after.

    .venv/bin/python benchmarks/distill_scenes.py [--student dynasegformer-b0|topformer-tiny-dynamic]
        [--work-dir DIR] [--teacher-iters N] [--stage1-iters N] [--stage2-iters N] [--teacher CKPT]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from edgeseg.config import load_config
from edgeseg.deploy.benchmark import count_gmacs
from edgeseg.engine.distill import distill
from edgeseg.engine.evaluate import build_val_dataset, evaluate
from edgeseg.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAIRS = {  # student → (teacher label, teacher config, student label, student config)
    "dynasegformer-b0": ("SegFormer-B0 teacher (dense)", "segformer_b0_scenes.yaml",
                         "DynaSegFormer-B0 student, s=0.3", "dynasegformer_b0_scenes_30.yaml"),
    "topformer-tiny-dynamic": ("TopFormer-T teacher (dense)", "demo_scenes.yaml",
                               "TopFormer-T dynamic, s=0.3", "topformer_tiny_dynamic_scenes_30.yaml"),
}
INPUT_SIZE = (192, 192)  # the scenes' own size: whole-image evaluation runs at it
TARGET_RATIO = 0.95


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=PAIRS, default="dynasegformer-b0")
    parser.add_argument("--work-dir", default=None, help="default: a new temporary folder (kept, path printed)")
    parser.add_argument("--teacher-iters", type=int, default=None, help="default: the teacher config's")
    parser.add_argument("--stage1-iters", type=int, default=None, help="default: the student config's")
    parser.add_argument("--stage2-iters", type=int, default=None, help="default: the student config's")
    parser.add_argument("--teacher", default=None, help="skip step 1: distil from this dense checkpoint")
    args = parser.parse_args()
    teacher_label, teacher_config, student_label, student_config = PAIRS[args.student]

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="edgeseg_distill_scenes_"))
    print(f"work dir {work}; torch threads {torch.get_num_threads()}; os.cpu_count {os.cpu_count()}; "
          f"load average (1 min) at start {load_avg()}")

    # 1. dense teacher
    t_overrides = [f"schedule.iters={args.teacher_iters}",
                   f"schedule.warmup_iters={max(1, args.teacher_iters // 20)}"] if args.teacher_iters else []
    t_cfg = load_config(CONFIGS / teacher_config, t_overrides)
    if args.teacher is None:
        t0 = time.perf_counter()
        teacher = train(t_cfg, work / "teacher", progress=False)["model"]
        teacher_s, teacher_iters = time.perf_counter() - t0, t_cfg.schedule.iters
        teacher_ckpt = work / "teacher" / "latest.pth"
        print(f"teacher: {teacher_iters} iterations in {teacher_s:.0f} s (load {load_avg()})")
    else:
        from edgeseg import load_model

        teacher, teacher_ckpt = load_model(args.teacher), Path(args.teacher)
        teacher_s, teacher_iters = float("nan"), None

    # 2. student, two-stage distillation from the teacher's checkpoint
    s_overrides = [f"distill.teacher={teacher_ckpt}"]
    if args.stage1_iters is not None:
        s_overrides.append(f"distill.stage1_iters={args.stage1_iters}")
    if args.stage2_iters is not None:
        s_overrides.append(f"schedule.iters={args.stage2_iters}")
    s_cfg = load_config(CONFIGS / student_config, s_overrides)
    t0 = time.perf_counter()
    student = distill(s_cfg, work / "student", progress=False)["model"]
    student_s = time.perf_counter() - t0
    stage1, stage2 = s_cfg.distill.stage1_iters, s_cfg.schedule.iters
    print(f"student: {stage1} + {stage2} iterations in {student_s:.0f} s (load {load_avg()})")

    # 3. the same evaluation for both (the student's config has the teacher's val split and test pipeline)
    val = build_val_dataset(t_cfg)
    t_metrics = evaluate(teacher.eval(), val, t_cfg.eval)
    s_metrics = evaluate(student.eval(), val, s_cfg.eval)
    ratio = s_metrics["mIoU"] / t_metrics["mIoU"]
    t_gmacs = count_gmacs(teacher, INPUT_SIZE)
    t_fused_gmacs = count_gmacs(teacher.fuse(), INPUT_SIZE)
    s_gmacs = count_gmacs(student, INPUT_SIZE)

    rows = [
        (teacher_label, t_metrics, "", f"{teacher_iters}", teacher_s, t_gmacs),
        (student_label, s_metrics, f"{ratio:.3f}", f"{stage1} + {stage2}", student_s, s_gmacs),
    ]
    print(f"\nscenes val ({t_metrics['num_images']} images, {INPUT_SIZE[0]}x{INPUT_SIZE[1]} whole), "
          f"GMACs executed per image at {INPUT_SIZE[0]}x{INPUT_SIZE[1]}")
    print(f"{'model':<33} {'mIoU':>6} {'mAcc':>6} {'/teacher':>8} {'iterations':>11} {'train s':>8} {'GMACs':>7}")
    for name, m, r, iters, secs, gmacs in rows:
        print(f"{name:<33} {m['mIoU']:6.2f} {m['mAcc']:6.2f} {r:>8} {iters:>11} {secs:8.0f} {gmacs:7.4f}")
    print(f"(teacher fused: {t_fused_gmacs:.4f} GMACs; student/teacher GMACs "
          f"{s_gmacs / t_gmacs:.3f}, /fused {s_gmacs / t_fused_gmacs:.3f})")
    verdict = "meets" if ratio >= TARGET_RATIO else "FALLS SHORT of"
    print(f"student/teacher mIoU {ratio:.3f} {verdict} the target {TARGET_RATIO}; load average (1 min) at end "
          f"{load_avg()}; artefacts in {work}")


if __name__ == "__main__":
    main()
