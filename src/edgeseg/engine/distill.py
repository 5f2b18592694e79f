"""Two-stage knowledge distillation of a dense SegFormer (teacher) into DynaSegFormer (student), paper Sec. 2.4.

The student starts as the teacher (same weights, decoder folded into the additive form, new gates with ``G ≡ 1``)
and is pruned gradually: the sparsity of every DGL layer follows ``s_t = s · min(1, t / T)`` over the global step.

- Stage 1 aligns representations: ``Σ_i MSE(F_i^student, F_i^teacher)`` over the outputs of the four MiT stages.
- Stage 2 aligns predictions: ``CE(student, labels) + λ_s · τ² · SCE(student / τ, teacher / τ)``.
- Both add ``λ_m · Σ_layers ‖G‖₁`` on the gate logits.

The loop reads like ``train.py``'s and reuses its pieces (data stream, optimizer groups, poly schedule, loss on
labels, evaluation, checkpoints); each stage gets a fresh AdamW and its own poly schedule. Single process; resuming
a distillation run is not supported (a stage is restarted from the last stage checkpoint by hand).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ..checkpoint import load_model, save_checkpoint
from ..config import Config, _build, _coerce, _set, validate
from ..models.dynamic import SparsitySchedule, from_segformer, gate_l1, set_sparsity
from .evaluate import build_val_dataset, evaluate
from .optim import build_optimizer, set_lr
from .train import (DistInfo, RunLogger, autocast_context, build_train_loader, build_train_set, seed_everything,
                    seg_loss)


@dataclass
class DistillCfg:
    """The ``distill:`` section of a DynaSegFormer recipe. Stage 2 runs ``schedule.iters`` iterations."""

    teacher: str | None = None  # dense SegFormer checkpoint (any layout); ``--teacher`` sets it
    sparsity: float = 0.3  # s: fraction of gated neurons pruned per image at the end of annealing
    anneal_iters: int = 8000  # T of s_t = s · min(1, t / T), counted over both stages
    stage1_iters: int = 16000  # feature-alignment iterations before the label stage
    lambda_gate: float = 1e-5  # λ_m on Σ‖G‖₁
    lambda_soft: float = 1.0  # λ_s on the soft cross-entropy to the teacher's logits
    temperature: float = 1.0  # τ of the soft cross-entropy


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
    with torch.no_grad():
        target = teacher.forward_features(img)
    mse = feature_mse(student.forward_features(img), target)
    l1 = gate_l1(student)
    return {"loss": mse + dcfg.lambda_gate * l1, "mse": mse, "l1": l1}


def stage2_loss(student: nn.Module, teacher: nn.Module, img: Tensor, gt: Tensor, dcfg: DistillCfg,
                ignore_index: int = 255) -> dict[str, Tensor]:
    with torch.no_grad():
        target = teacher(img)
    logits = student(img)
    ce = seg_loss(logits, gt, ignore_index)
    soft = soft_cross_entropy(logits, target, dcfg.temperature)
    l1 = gate_l1(student)
    return {"loss": ce + dcfg.lambda_soft * soft + dcfg.lambda_gate * l1, "ce": ce, "soft": soft, "l1": l1}


# ------------------------------------------------------------------------------------------------------ config
_FIELDS = [f.name for f in dataclasses.fields(DistillCfg)]


def _distill_key(key: str, source: str) -> str:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" — did you mean 'distill.{close[0]}'?" if close else f" (valid: {', '.join(_FIELDS)})"
        raise ValueError(f"{source}: unknown config key 'distill.{key}'{hint}")
    return key


def load_distill_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, DistillCfg]:
    """A DynaSegFormer recipe: the usual sections (model, data, optim, schedule, train, eval) plus ``distill:``.

    ``overrides`` are ``--set`` strings; ``distill.*`` ones go to :class:`DistillCfg`, the rest to the config.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config '{path}' does not exist: pass a YAML file, e.g. "
                                f"configs/dynasegformer_b0_ade20k_30.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config '{path}' must be a mapping of sections (model:, data:, distill:, ...)")
    section = data.pop("distill", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"config '{path}': 'distill' must be a mapping")
    for key in section:
        _distill_key(key, str(path))
    dcfg = _build(DistillCfg, section, str(path), "distill.")
    cfg = _build(Config, data, str(path))
    for assignment in overrides:
        key, sep, raw = assignment.partition("=")
        if sep and key.strip().startswith("distill."):
            name = _distill_key(key.strip()[len("distill."):], "--set")
            setattr(dcfg, name, _coerce(raw, typing.get_type_hints(DistillCfg)[name], f"--set {key.strip()}"))
        else:
            _set(cfg, assignment)
    return validate(cfg, str(path)), validate_distill(dcfg, str(path))


def validate_distill(dcfg: DistillCfg, source: str = "config") -> DistillCfg:
    if not 0.0 <= dcfg.sparsity < 1.0:
        raise ValueError(f"{source}: distill.sparsity must be in [0, 1), got {dcfg.sparsity}")
    if dcfg.stage1_iters < 0 or dcfg.anneal_iters < 0:
        raise ValueError(f"{source}: distill.stage1_iters and distill.anneal_iters must be >= 0")
    if dcfg.temperature <= 0:
        raise ValueError(f"{source}: distill.temperature must be > 0, got {dcfg.temperature}")
    return dcfg


# -------------------------------------------------------------------------------------------------------- loop
def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no GPU: use --set train.device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def build_student(cfg: Config, dcfg: DistillCfg, teacher: nn.Module, num_classes: int) -> nn.Module:
    """The DynaSegFormer student of ``teacher``'s size, checked against the config's model section."""
    if dcfg.teacher is None:
        raise ValueError("no teacher: pass --teacher CKPT (a dense SegFormer checkpoint of the student's size)")
    name = getattr(teacher, "model_name", "?")
    if cfg.model.name and cfg.model.name != "dyna" + name:
        raise ValueError(f"teacher '{dcfg.teacher}' is {name}, but the config trains {cfg.model.name}: use a "
                         f"{cfg.model.name.removeprefix('dyna')} teacher or the matching config")
    if teacher.num_classes != num_classes:
        raise ValueError(f"teacher '{dcfg.teacher}' predicts {teacher.num_classes} classes but the dataset has "
                         f"{num_classes}: distil from a teacher trained on this dataset")
    if "sparsity" in cfg.model.overrides:
        raise ValueError("set the sparsity as distill.sparsity, not model.overrides.sparsity")
    overrides = {k: v for k, v in cfg.model.overrides.items() if k != "num_classes"}
    return from_segformer(teacher, dcfg.sparsity, **overrides)


def distill(cfg: Config, dcfg: DistillCfg, work_dir: str | Path, progress: bool = True,
            log: Any = print) -> dict[str, Any]:
    """Run both stages in ``work_dir``; returns ``{"model", "iteration", "last_eval"}`` (student at sparsity s).

    Writes ``config.yaml`` (with its ``distill`` section), ``log.jsonl``, ``stage1.pth`` after stage 1 and
    ``final.pth`` (the student at its target sparsity, loadable by ``edgeseg.load_model``).
    """
    device = _device(cfg.train.device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "distill": dataclasses.asdict(dcfg)},
                                                         sort_keys=False))
    seed_everything(cfg.train.seed)
    train_set = build_train_set(cfg)
    if dcfg.teacher is None:
        raise ValueError("no teacher: pass --teacher CKPT (a dense SegFormer checkpoint of the student's size)")
    teacher = load_model(dcfg.teacher).to(device).eval()
    teacher.requires_grad_(False)
    student = build_student(cfg, dcfg, teacher, train_set.num_classes).to(device).train()
    log(f"student {student.model_name} from teacher {teacher.model_name} ({dcfg.teacher}), target sparsity "
        f"{dcfg.sparsity}, annealed over {dcfg.anneal_iters} iterations")

    accum = cfg.train.grad_accum
    loader = build_train_loader(cfg, train_set, DistInfo(device=device), start_batch=0)
    batches = iter(loader)
    val_set = build_val_dataset(cfg) if cfg.train.eval_interval > 0 else None
    logger = RunLogger(work_dir, True)
    schedule = SparsitySchedule(dcfg.sparsity, dcfg.anneal_iters)
    stages = [(1, dcfg.stage1_iters), (2, cfg.schedule.iters)]
    total = sum(n for _, n in stages)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="distill", dynamic_ncols=True)
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
                last_eval = evaluate(student, val_set, cfg.eval, workers=min(cfg.data.workers, 2))
                student.train()
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


__all__ = ["DistillCfg", "distill", "feature_mse", "load_distill_config", "soft_cross_entropy", "stage1_loss",
           "stage2_loss"]
