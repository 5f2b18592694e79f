"""AdamW parameter groups and the poly + linear-warm-up learning rate of the official runs (mmcv 1.x semantics)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimCfg, ScheduleCfg

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, cfg: OptimCfg) -> list[dict]:
    """Split the trainable parameters into AdamW groups by (lr multiplier, weight-decay multiplier).

    The official configs say ``custom_keys={'head': lr_mult 10, 'norm': decay_mult 0, 'pos_block'/'absolute_pos_embed':
    decay_mult 0}``, which mmcv matches as substrings of the parameter names. On the official networks that means:
    the decode head learns 10× faster, LayerNorms (named ``norm*``) get no weight decay, BatchNorms (named ``bn``)
    keep theirs, and no MiT/TopFormer parameter contains ``pos_block``. edgeseg reproduces that meaning, not the
    substrings, with the rules in the order mmcv applies them (first match wins; mmcv tries the longest key
    first, ties alphabetically: ``pos_block``, ``head``, ``norm``): a name containing ``pos_block``/``pos_embed`` →
    ``weight_decay × pos_decay_mult``; a name starting with one of ``cfg.head_prefixes`` → ``lr × head_lr_mult``; a
    LayerNorm/GroupNorm parameter → ``weight_decay × norm_decay_mult``. Each group carries ``lr_mult`` so the
    schedule can scale it.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "pos_block" in name or "pos_embed" in name:
            lr_mult, decay_mult = 1.0, cfg.pos_decay_mult
        elif name.startswith(tuple(cfg.head_prefixes)):
            lr_mult, decay_mult = cfg.head_lr_mult, 1.0
        elif id(p) in norm_params:
            lr_mult, decay_mult = 1.0, cfg.norm_decay_mult
        else:
            lr_mult, decay_mult = 1.0, 1.0
        group = groups.setdefault((lr_mult, decay_mult), {
            "params": [], "names": [], "lr": cfg.lr * lr_mult, "lr_mult": lr_mult,
            "weight_decay": cfg.weight_decay * decay_mult})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimCfg) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        del g["names"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(iteration: int, base_lr: float, cfg: ScheduleCfg) -> float:
    """Learning rate of 0-based ``iteration`` (mmcv ``PolyLrUpdaterHook`` with ``warmup='linear'``).

    ``poly = (base − min_lr)·(1 − it/iters)^power + min_lr``; during warm-up this is multiplied by
    ``1 − (1 − it/warmup_iters)·(1 − warmup_ratio)``, i.e. warm-up scales the already-decayed rate (mmcv's
    ``get_warmup_lr(regular_lr)``), it does not ramp towards ``base_lr``.
    """
    coeff = (1.0 - iteration / cfg.iters) ** cfg.power
    lr = (base_lr - cfg.min_lr) * coeff + cfg.min_lr
    if iteration < cfg.warmup_iters:
        k = (1.0 - iteration / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        lr *= 1.0 - k
    return lr


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, base_lr: float, cfg: ScheduleCfg) -> float:
    """Set every group's lr for ``iteration``; returns the rate of the groups without a multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(iteration, base_lr * group.get("lr_mult", 1.0), cfg)
    return lr_at(iteration, base_lr, cfg)
