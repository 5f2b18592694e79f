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
``train.py``'s and reuses its pieces (processes, work dir, data stream, optimizer groups, poly schedule, loss on
labels, evaluation, logging, checkpoints), so it keeps train's guarantees: DDP under torchrun, and exact resumption.
Both stages run on one global step — the sparsity is a function of it, the data stream of the global sample
position — so a checkpoint needs only the stage, the step, the stage's optimizer and every rank's generators. Each
stage gets a fresh AdamW and its own poly schedule, so a run resumed at the end of stage 1 starts stage 2 fresh, as
an uninterrupted run does.

DDP hooks ``forward``, but stage 1 trains through ``forward_features``: :class:`StudentFeatures` presents that pass
as a forward.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_model, save_checkpoint, set_labels, set_test_recipe
from ..config import Config, DistillCfg
from ..data import SegDataset
from ..models.dynamic import SparsitySchedule, dynamic_gates, gate_l1, set_sparsity
from ..models import family_of
from ..models.dynasegformer import from_segformer
from ..models.topformer import from_topformer
from .evaluate import build_val_dataset
from .optim import build_optimizer, set_lr
from .train import (
    DistInfo,
    RunLogger,
    build_train_loader,
    build_train_set,
    check_class_count,
    check_finite_loss,
    check_labels,
    check_num_classes,
    data_parallel,
    data_summary,
    evaluate_during_training,
    find_resume,
    grad_scaler,
    init_distributed,
    leave_process_group,
    mean_over_ranks,
    open_work_dir,
    optimizer_step,
    progress_bar,
    read_training_state,
    restore_rng,
    restore_weights,
    save_training_state,
    seed_everything,
    seg_loss,
    sync_batchnorm,
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


class StudentFeatures(nn.Module):
    """The student's ``forward_features`` as ``forward``: stage 1's pass in the form DDP synchronises.

    Its gradients reach the encoder and the gates, never the head, which stage 1 does not run.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, img: Tensor) -> list[Tensor]:
        return self.student.forward_features(img)


def stage1_loss(features: nn.Module, teacher: nn.Module, img: Tensor, dcfg: DistillCfg) -> dict[str, Tensor]:
    """Stage 1 on images (B, 3, H, W): ``feature_mse`` to the frozen teacher's stages + ``λ_m · Σ‖G‖₁``.

    ``features`` is :class:`StudentFeatures` of the student, or its DDP wrapper.
    """
    with torch.no_grad():
        target = teacher.forward_features(img)
    mse = feature_mse(features(img), target)
    l1 = gate_l1(features)
    return {"loss": mse + dcfg.lambda_gate * l1, "mse": mse, "l1": l1}


def stage2_loss(student: nn.Module, teacher: nn.Module, img: Tensor, gt: Tensor, dcfg: DistillCfg,
                ignore_index: int = 255) -> dict[str, Tensor]:
    """Stage 2 on images (B, 3, H, W), labels (B, H, W): ``CE + λ_s · soft CE to teacher + λ_m · Σ‖G‖₁``.

    ``student`` is the student or its DDP wrapper.
    """
    with torch.no_grad():
        target = teacher(img)
    logits = student(img)
    ce = seg_loss(logits, gt, ignore_index)
    soft = soft_cross_entropy(logits, target, dcfg.temperature)
    l1 = gate_l1(student)
    return {"loss": ce + dcfg.lambda_soft * soft + dcfg.lambda_gate * l1, "ce": ce, "soft": soft, "l1": l1}


# -------------------------------------------------------------------------------------------------------- loop
STUDENTS = {"SegFormer": from_segformer, "TopFormer": from_topformer}  # a dense family → its dynamic student


def build_student(cfg: Config, teacher: nn.Module, train_set: SegDataset) -> nn.Module:
    """The dynamic student of ``teacher``'s size (DynaSegFormer of a SegFormer, dynamic TopFormer of a TopFormer),
    checked against the config's model section."""
    teacher_path = cfg.distill.teacher
    name = getattr(teacher, "model_name", "?")
    if next(dynamic_gates(teacher), None) is not None:
        raise ValueError(f"teacher '{teacher_path}' is a dynamic model ({name}); the teacher is the dense model the "
                         f"student is distilled from, e.g. {name.removeprefix('dyna')}")
    make = STUDENTS.get(family_of(teacher))
    if make is None:
        raise ValueError(f"teacher '{teacher_path}' is {name}: distillation makes the dynamic form of a SegFormer "
                         f"or a TopFormer segmentation model")
    check_class_count(cfg, train_set, teacher.num_classes,
                      f"teacher '{teacher_path}' predicts {teacher.num_classes} classes",
                      "distil from a teacher trained on this dataset")
    if "sparsity" in cfg.model.overrides:
        raise ValueError("set the sparsity as distill.sparsity, not model.overrides.sparsity")
    overrides = {k: v for k, v in cfg.model.overrides.items() if k not in ("num_classes", "dynamic")}
    student = make(teacher, cfg.distill.sparsity, **overrides)
    if cfg.model.name and cfg.model.name != student.model_name:
        raise ValueError(f"teacher '{teacher_path}' is {name}, but the config trains {cfg.model.name}: use a "
                         f"{cfg.model.name.removeprefix('dyna')} teacher or the matching config")
    return student


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes, bytes): the teacher's identity in a distillation's
    checkpoints, the same wherever its file moves and whatever layout it was read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_distill_state(path: Path, stages: dict[int, tuple[int, int]], teacher: str,
                        teacher_sha256: str) -> dict[str, Any]:
    """The training state in ``path``, checked to be a distillation's, to fall inside this recipe's stages and to
    have been written with the weights of ``teacher`` (where it says: checkpoints older than ``teacher_sha256``
    do not)."""
    ckpt = read_training_state(path, "resume from latest.pth or an iter_N.pth of the distillation run")
    if "stage" not in ckpt:
        raise ValueError(f"--resume {path}: a checkpoint of edgeseg train, not of a distillation; resume from "
                         f"latest.pth or an iter_N.pth written by edgeseg distill")
    stage, step = int(ckpt["stage"]), int(ckpt["iteration"])
    first, last = stages[stage]
    if not first < step <= last:
        raise ValueError(f"--resume {path}: written at step {step} of stage {stage}, which in this recipe spans steps "
                         f"{first + 1}..{last}: resume with the distill.stage1_iters and schedule.iters the run "
                         f"started with")
    written = ckpt.get("teacher_sha256", teacher_sha256)
    if written != teacher_sha256:
        was = ckpt.get("config", {}).get("distill", {}).get("teacher")
        raise ValueError(f"--resume {path}: written with the teacher {was} (weights sha256 {written[:12]}), but "
                         f"--teacher {teacher} holds other weights ({teacher_sha256[:12]}): resume with the teacher "
                         f"that run started with, or distill in a new --work-dir")
    return ckpt


def _teacher_and_student(cfg: Config, train_set: SegDataset, info: DistInfo) -> tuple[nn.Module, str, nn.Module]:
    """The frozen teacher of ``cfg.distill.teacher`` with its weights' sha256, and the student made from it (labels,
    test recipe and SyncBN as a trained model carries them), both on the run's device."""
    teacher = load_model(cfg.distill.teacher)
    teacher_sha256 = weights_sha256(teacher)
    teacher = teacher.to(info.device).eval()
    teacher.requires_grad_(False)
    student = set_labels(build_student(cfg, teacher, train_set), train_set.classes, train_set.palette)
    set_test_recipe(student, cfg)  # normalisation, test resize and window travel with the checkpoints
    return teacher, teacher_sha256, sync_batchnorm(student, cfg, info).to(info.device).train()


def _stage_loss(stage: int, net: nn.Module, teacher: nn.Module, dcfg: DistillCfg, device: torch.device,
                ignore_index: int, batch: dict[str, Any]) -> dict[str, Tensor]:
    """One batch's losses in ``stage``; ``net`` is the student as that stage trains it (features or logits), which
    predicts the teacher's classes."""
    img = batch["img"].to(device, non_blocking=True)
    if stage == 1:
        return stage1_loss(net, teacher, img, dcfg)
    check_labels(batch, teacher.num_classes, ignore_index)
    return stage2_loss(net, teacher, img, batch["gt"].to(device, non_blocking=True), dcfg, ignore_index)


def _evaluate(student: nn.Module, val_set: SegDataset, cfg: Config, sparsity: float, step: int,
              logger: RunLogger) -> dict[str, Any]:
    """The validation scores of ``student`` at ``sparsity`` (kept there for the next step), logged; the result
    records the sparsity it was scored at."""
    set_sparsity(student, sparsity)
    scores = evaluate_during_training(student, val_set, cfg)
    logger({"mode": "val", "stage": 2, "iter": step, "sparsity": sparsity,
            "mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"]})
    return {**scores, "sparsity": sparsity}


def distill(cfg: Config, work_dir: str | Path, resume: str | None = None, progress: bool = True,
            log: Any = print) -> dict[str, Any]:
    """Run both stages of ``cfg.distill`` in ``work_dir``; ``resume`` is None, ``"auto"`` (latest.pth if present) or
    a path. Returns ``{"model", "iteration", "best_mIoU", "last_eval", "rank"}`` on every rank.

    Writes ``config.yaml`` (with its ``distill`` section), ``log.jsonl``, ``iter_N.pth`` and ``latest.pth`` (every
    ``train.checkpoint_interval`` steps and at the end of each stage), ``stage1.pth`` after stage 1, ``best.pth``
    (the best stage-2 evaluation once annealing is over) and ``final.pth`` (both at the target sparsity, loadable
    by ``edgeseg.load_model``).
    """
    dcfg = cfg.distill
    if dcfg is None:
        raise ValueError("the config has no distill: section: use a DynaSegFormer recipe, "
                         "e.g. configs/dynasegformer_b0_ade20k_30.yaml")
    if dcfg.teacher is None:
        raise ValueError("no teacher: pass --teacher CKPT (the dense model of the student's size: a SegFormer, or "
                         "the TopFormer variant of a dynamic TopFormer recipe)")
    info = init_distributed(cfg.train.device)
    work_dir = Path(work_dir)  # created once the run can start: a refused run leaves no folder behind
    log = log if info.main else (lambda *a, **k: None)

    # Identical students on every rank (new gates draw from torch's generator); then per-rank streams for dropout.
    seed_everything(cfg.train.seed)
    train_set = build_train_set(cfg)
    check_num_classes(cfg, train_set)
    teacher, teacher_sha256, student = _teacher_and_student(cfg, train_set, info)
    scaler = grad_scaler(cfg, info)
    seed_everything(cfg.train.seed + info.rank)
    log(f"student {student.model_name} from teacher {teacher.model_name} ({dcfg.teacher}), target sparsity "
        f"{dcfg.sparsity}, annealed over {dcfg.anneal_iters} iterations")

    # Each stage's global steps (first, last]; step counts the optimizer steps done so far.
    stages = {1: (0, dcfg.stage1_iters), 2: (dcfg.stage1_iters, dcfg.stage1_iters + cfg.schedule.iters)}
    step, best, resumed = 0, -math.inf, None
    ckpt_path = find_resume(resume, work_dir, "distill")
    if ckpt_path is not None:
        resumed = _read_distill_state(ckpt_path, stages, dcfg.teacher, teacher_sha256)
        restore_weights(student, resumed, ckpt_path)
        scaler.load_state_dict(resumed["scaler"])
        step, best = int(resumed["iteration"]), float(resumed["best_mIoU"])
        restore_rng(resumed["rng"], info)
        log(f"resumed from {ckpt_path} at step {step} (stage {resumed['stage']})")
    elif resume == "auto":
        log(f"no checkpoint in {work_dir}: starting from scratch")

    batches = iter(build_train_loader(cfg, train_set, info, start_batch=step * cfg.train.grad_accum))
    val_set = build_val_dataset(cfg) if cfg.train.eval_interval > 0 else None
    log(data_summary(train_set, val_set))
    if info.main:
        open_work_dir(cfg, work_dir)
    logger = RunLogger(work_dir, info.main, step)
    schedule = SparsitySchedule(dcfg.sparsity, dcfg.anneal_iters)
    bar = progress_bar(stages[2][1], step, desc="distill") if progress and info.main else None
    last_eval: dict[str, Any] | None = None
    diverged_at, t_start = None, time.perf_counter()

    for stage, (first, last) in stages.items():
        if step >= last:  # finished before the resume point, or empty
            continue
        optimizer = build_optimizer(student, cfg.optim)
        if resumed is not None and resumed["stage"] == stage:
            optimizer.load_state_dict(resumed["optimizer"])
        lr_schedule = dataclasses.replace(cfg.schedule, iters=last - first)
        # stage 1 never runs the head: DDP must find those unused parameters; stage 2 uses all, so it skips that walk
        net = data_parallel(StudentFeatures(student) if stage == 1 else student, info,
                            find_unused_parameters=stage == 1)
        loss_of = functools.partial(_stage_loss, stage, net, teacher, dcfg, info.device,
                                    train_set.ignore_index)
        sums: dict[str, float] = {}
        count = 0
        for it in range(step - first, last - first):
            lr = set_lr(optimizer, it, cfg.optim.lr, lr_schedule)
            sparsity = schedule(step)
            set_sparsity(student, sparsity)
            losses = optimizer_step(net, batches, loss_of, optimizer, scaler, cfg, info)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            step, count = step + 1, count + 1
            if diverged_at is None and not math.isfinite(losses["loss"]):
                diverged_at = step

            logs = step % cfg.train.log_interval == 0 or step == last
            evaluates = stage == 2 and val_set is not None and ((it + 1) % cfg.train.eval_interval == 0
                                                                or step == last)
            saves = (cfg.train.checkpoint_interval > 0 and step % cfg.train.checkpoint_interval == 0) or step == last
            if logs or evaluates or saves:  # nothing diverged is logged, scored or saved
                check_finite_loss(diverged_at, cfg, info)
            if logs:
                means = {k: mean_over_ranks(v / count, info) for k, v in sums.items()}
                logger({"mode": "train", "stage": stage, "iter": step, "lr": lr, "sparsity": sparsity, **means,
                        "time_s": round(time.perf_counter() - t_start, 3)})
                if bar is not None:
                    bar.set_postfix(stage=stage, loss=f"{means['loss']:.4f}", s=f"{sparsity:.3f}")
                sums, count = {}, 0
            if bar is not None:
                bar.update(1)
            if evaluates:
                # the model as it now stands, at the sparsity its next step trains with (the target once annealed)
                last_eval = _evaluate(student, val_set, cfg, schedule(step), step, logger)
                # best.pth is a model of the recipe's sparsity: scores at a lower one, mid-annealing, do not compete
                if (last_eval["sparsity"] == dcfg.sparsity and last_eval["mIoU"] is not None
                        and last_eval["mIoU"] > best):
                    best = last_eval["mIoU"]
                    if info.main:
                        save_checkpoint(work_dir / "best.pth", student, {"iteration": step, "mIoU": best})
            if stage == 1 and step == last and info.main:
                save_checkpoint(work_dir / "stage1.pth", student, {"iteration": step, "sparsity": sparsity})
            if saves:
                save_training_state(work_dir, student, {
                    "iteration": step, "stage": stage, "best_mIoU": best, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "config": cfg.to_dict(), "teacher_sha256": teacher_sha256}, info,
                    cfg.train.max_keep_checkpoints)

    if bar is not None:
        bar.close()
    logger.close()
    set_sparsity(student, dcfg.sparsity)
    student.eval()
    if info.main:
        save_checkpoint(work_dir / "final.pth", student, {"iteration": step, "distill": dataclasses.asdict(dcfg),
                                                          "teacher_sha256": teacher_sha256})
    leave_process_group(info)
    return {"model": student, "iteration": step, "best_mIoU": best if best > -math.inf else None,
            "last_eval": last_eval, "rank": info.rank}


__all__ = ["StudentFeatures", "distill", "feature_mse", "soft_cross_entropy", "stage1_loss", "stage2_loss"]
