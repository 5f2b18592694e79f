"""Two-stage knowledge distillation of a dense model (teacher) into its dynamic form (student), DynaSegFormer
paper Sec. 2.4: SegFormer → DynaSegFormer, and beyond the paper TopFormer → TopFormer with a dynamic extractor.

The student starts as the teacher (same weights, new gates with ``G ≡ 1``; DynaSegFormer's decoder folded into the
additive form) and is pruned gradually: the sparsity of every DGL layer follows ``s_t = s · min(1, t / T)`` over
the global step.

- Stage 1 aligns representations: ``Σ_i MSE(F_i^student, F_i^teacher)`` over ``forward_features`` — the four MiT
  stage outputs, or TopFormer's three injected maps (what its head reads; they carry the extractor's semantics).
- Stage 2 aligns predictions: ``CE(student, labels) + λ_s · τ² · SCE(student / τ, teacher / τ)``.
- Both add ``λ_m · Σ_layers ‖G‖₁`` on the gate logits.

A recipe is an ordinary ``Config`` with a ``distill:`` section (``config.DistillCfg``). The loop reads like
``train.py``'s and reuses its pieces (work dir, data stream, optimizer groups, poly schedule, loss on labels,
evaluation, logging, checkpoints); each stage gets a fresh AdamW and its own poly schedule. Single process; resuming
a distillation run is not supported (a stage is restarted from the last stage checkpoint by hand).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_model, save_checkpoint
from ..config import Config, DistillCfg
from ..models.dynamic import SparsitySchedule, from_segformer, gate_l1, set_sparsity
from ..models.topformer import from_topformer
from .evaluate import build_val_dataset
from .optim import build_optimizer, set_lr
from .train import (
    DistInfo,
    RunLogger,
    autocast_context,
    build_train_loader,
    build_train_set,
    evaluate_during_training,
    open_work_dir,
    progress_bar,
    resolve_device,
    seed_everything,
    seg_loss,
)


# ------------------------------------------------------------------------------------------------------ losses
def feature_mse(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Stage 1: ``Σ_i MSE(F_i^s, F_i^t)`` over the stage outputs (each MSE a mean over its elements)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student features but {len(teacher)} teacher features")
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).sum()


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``τ² · mean_pixels(−Σ_k softmax(t/τ)_k · log softmax(s/τ)_k)`` on logits (B, K, h, w).

    At the native resolution, where both models predict (no upsampling needed); every pixel counts (the teacher
    has an opinion where the labels say "ignore"). ``τ²`` keeps the gradient scale independent of ``τ`` (Hinton).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher.float() / temperature, dim=1)
    return -(q * log_p).sum(dim=1).mean() * temperature**2


def stage1_loss(student: nn.Module, teacher: nn.Module, img: Tensor, dcfg: DistillCfg) -> dict[str, Tensor]:
    """Stage 1 on images (B, 3, H, W): ``feature_mse`` to the frozen teacher's stages + ``λ_m · Σ‖G‖₁``."""
    with torch.no_grad():
        target = teacher.forward_features(img)
    mse = feature_mse(student.forward_features(img), target)
    l1 = gate_l1(student)
    return {"loss": mse + dcfg.lambda_gate * l1, "mse": mse, "l1": l1}


def stage2_loss(student: nn.Module, teacher: nn.Module, img: Tensor, gt: Tensor, dcfg: DistillCfg,
                ignore_index: int = 255) -> dict[str, Tensor]:
    """Stage 2 on images (B, 3, H, W), labels (B, H, W): ``CE + λ_s · soft CE to teacher + λ_m · Σ‖G‖₁``."""
    with torch.no_grad():
        target = teacher(img)
    logits = student(img)
    ce = seg_loss(logits, gt, ignore_index)
    soft = soft_cross_entropy(logits, target, dcfg.temperature)
    l1 = gate_l1(student)
    return {"loss": ce + dcfg.lambda_soft * soft + dcfg.lambda_gate * l1, "ce": ce, "soft": soft, "l1": l1}


# -------------------------------------------------------------------------------------------------------- loop
def build_student(cfg: Config, teacher: nn.Module, num_classes: int) -> nn.Module:
    """The dynamic student of ``teacher``'s size (DynaSegFormer of a SegFormer, dynamic TopFormer of a TopFormer),
    checked against the config's model section."""
    teacher_path = cfg.distill.teacher
    name = getattr(teacher, "model_name", "?")
    student_name = name if name.startswith("topformer-") else "dyna" + name
    if cfg.model.name and cfg.model.name != student_name:
        teacher_name = cfg.model.name.removeprefix("dyna")
        raise ValueError(f"teacher '{teacher_path}' is {name}, but the config trains {cfg.model.name}: use a "
                         f"{teacher_name} teacher or the matching config")
    if teacher.num_classes != num_classes:
        raise ValueError(f"teacher '{teacher_path}' predicts {teacher.num_classes} classes but the dataset has "
                         f"{num_classes}: distil from a teacher trained on this dataset")
    if "sparsity" in cfg.model.overrides:
        raise ValueError("set the sparsity as distill.sparsity, not model.overrides.sparsity")
    overrides = {k: v for k, v in cfg.model.overrides.items() if k not in ("num_classes", "dynamic")}
    make = from_topformer if name.startswith("topformer-") else from_segformer
    return make(teacher, cfg.distill.sparsity, **overrides)


def distill(cfg: Config, work_dir: str | Path, progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Run both stages of ``cfg.distill`` in ``work_dir``; returns ``{"model", "iteration", "last_eval"}``.

    Writes ``config.yaml`` (with its ``distill`` section), ``log.jsonl``, ``stage1.pth`` after stage 1 and
    ``final.pth`` (the student at its target sparsity, loadable by ``edgeseg.load_model``).
    """
    dcfg = cfg.distill
    if dcfg is None:
        raise ValueError("the config has no distill: section: use a DynaSegFormer recipe, "
                         "e.g. configs/dynasegformer_b0_ade20k_30.yaml")
    if dcfg.teacher is None:
        raise ValueError("no teacher: pass --teacher CKPT (a dense SegFormer checkpoint of the student's size)")
    device = resolve_device(cfg.train.device)
    work_dir = open_work_dir(cfg, work_dir)
    seed_everything(cfg.train.seed)
    train_set = build_train_set(cfg)
    teacher = load_model(dcfg.teacher).to(device).eval()
    teacher.requires_grad_(False)
    student = build_student(cfg, teacher, train_set.num_classes).to(device).train()
    log(f"student {student.model_name} from teacher {teacher.model_name} ({dcfg.teacher}), target sparsity "
        f"{dcfg.sparsity}, annealed over {dcfg.anneal_iters} iterations")

    accum = cfg.train.grad_accum
    batches = iter(build_train_loader(cfg, train_set, DistInfo(device=device), start_batch=0))
    val_set = build_val_dataset(cfg) if cfg.train.eval_interval > 0 else None
    logger = RunLogger(work_dir, True)
    schedule = SparsitySchedule(dcfg.sparsity, dcfg.anneal_iters)
    stages = [(1, dcfg.stage1_iters), (2, cfg.schedule.iters)]
    bar = progress_bar(sum(n for _, n in stages), desc="distill") if progress else None
    step, last_eval, best = 0, None, -math.inf
    t_start = time.perf_counter()

    for stage, iters in stages:
        if iters == 0:
            continue
        optimizer = build_optimizer(student, cfg.optim)
        lr_schedule = dataclasses.replace(cfg.schedule, iters=iters)
        sums: dict[str, float] = {}
        count = 0
        for it in range(iters):
            lr = set_lr(optimizer, it, cfg.optim.lr, lr_schedule)
            sparsity = schedule(step)
            set_sparsity(student, sparsity)
            for _ in range(accum):
                batch = next(batches)
                img = batch["img"].to(device, non_blocking=True)
                with autocast_context(cfg.train.amp, device):
                    if stage == 1:
                        losses = stage1_loss(student, teacher, img, dcfg)
                    else:
                        gt = batch["gt"].to(device, non_blocking=True)
                        losses = stage2_loss(student, teacher, img, gt, dcfg, train_set.ignore_index)
                (losses["loss"] / accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, count = step + 1, count + 1
            if step % cfg.train.log_interval == 0 or it == iters - 1:
                row = {"mode": "train", "stage": stage, "iter": step, "lr": lr, "sparsity": sparsity,
                       **{k: v / count for k, v in sums.items()}, "time_s": round(time.perf_counter() - t_start, 3)}
                logger(row)
                if bar is not None:
                    bar.set_postfix(stage=stage, loss=f"{row['loss']:.4f}", s=f"{sparsity:.3f}")
                sums, count = {}, 0
            if bar is not None:
                bar.update(1)
            if stage == 2 and val_set is not None and ((it + 1) % cfg.train.eval_interval == 0 or it == iters - 1):
                last_eval = evaluate_during_training(student, val_set, cfg)
                logger({"mode": "val", "stage": 2, "iter": step, "sparsity": sparsity, "mIoU": last_eval["mIoU"],
                        "mAcc": last_eval["mAcc"], "aAcc": last_eval["aAcc"]})
                if last_eval["mIoU"] is not None and last_eval["mIoU"] > best:
                    best = last_eval["mIoU"]
                    save_checkpoint(work_dir / "best.pth", student, {"iteration": step, "mIoU": best})
        if stage == 1:
            save_checkpoint(work_dir / "stage1.pth", student, {"iteration": step, "sparsity": sparsity})

    if bar is not None:
        bar.close()
    logger.close()
    set_sparsity(student, dcfg.sparsity)
    student.eval()
    save_checkpoint(work_dir / "final.pth", student, {"iteration": step, "distill": dataclasses.asdict(dcfg)})
    return {"model": student, "iteration": step, "last_eval": last_eval}


__all__ = ["distill", "feature_mse", "soft_cross_entropy", "stage1_loss", "stage2_loss"]
