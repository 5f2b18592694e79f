"""AdamW groups (official paramwise_cfg meaning) and the mmcv poly + linear warm-up schedule."""

from __future__ import annotations

import pytest
import torch

from edgeseg.config import OptimCfg, ScheduleCfg
from edgeseg.engine.optim import build_optimizer, lr_at, param_groups, set_lr
from edgeseg.models import create_model


def _groups_by_name(model, cfg):
    return {n: (g["lr_mult"], g["weight_decay"]) for g in param_groups(model, cfg) for n in g["names"]}


def test_topformer_groups():
    model = create_model("topformer-tiny", num_classes=4)
    groups = _groups_by_name(model, OptimCfg(lr=3e-4, weight_decay=0.01))
    assert len(groups) == sum(1 for p in model.parameters() if p.requires_grad)
    head = {n for n in groups if n.startswith("head.")}
    assert head and all(groups[n] == (10.0, 0.01) for n in head)
    # TopFormer has only BatchNorms: the official 'norm' key matched nothing, so everything else decays
    assert all(v == (1.0, 0.01) for n, v in groups.items() if n not in head)


def test_segformer_groups():
    model = create_model("segformer-b0", num_classes=4)
    groups = _groups_by_name(model, OptimCfg(lr=6e-5))
    ln = {n for m_name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
          for n in (f"{m_name}.weight", f"{m_name}.bias")}
    assert ln and all(groups[n] == (1.0, 0.0) for n in ln if not n.startswith("decode_head."))
    bn = [n for n in groups if ".bn." in n or n.endswith("bn.weight")]
    assert all(groups[n][1] == 0.01 for n in bn)  # BN keeps decay, as in the official runs
    assert all(groups[n][0] == 10.0 for n in groups if n.startswith("decode_head."))
    opt = build_optimizer(model, OptimCfg(lr=6e-5))
    set_lr(opt, 1500, 6e-5, ScheduleCfg(iters=160_000))
    lrs = sorted({round(g["lr"] / (6e-5 * (1 - 1500 / 160_000)), 9) for g in opt.param_groups})
    assert lrs == [1.0, 10.0]


def test_rules_apply_in_mmcvs_key_order():
    """mmcv tries the longest custom key first: a head parameter named like a position embedding takes the pos rule
    (no decay, no head lr), and a head LayerNorm the head rule (head lr, decay kept)."""
    model = torch.nn.Module()
    model.head = torch.nn.Module()
    model.head.pos_block = torch.nn.Parameter(torch.zeros(2))
    model.head.norm = torch.nn.LayerNorm(2)
    model.norm = torch.nn.LayerNorm(2)
    groups = _groups_by_name(model, OptimCfg(lr=1e-3, weight_decay=0.01))
    assert groups["head.pos_block"] == (1.0, 0.0)
    assert groups["head.norm.weight"] == (10.0, 0.01) and groups["norm.weight"] == (1.0, 0.0)


def test_poly_warmup_schedule_values():
    cfg = ScheduleCfg(iters=160_000, warmup_iters=1500, warmup_ratio=1e-6, power=1.0, min_lr=0.0)
    base = 6e-5
    # mmcv: warm-up multiplies the decayed (regular) lr by 1 - (1 - it/warmup)(1 - ratio)
    assert lr_at(0, base, cfg) == pytest.approx(base * 1e-6, rel=1e-12)
    assert lr_at(750, base, cfg) == pytest.approx(base * (1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)), rel=1e-12)
    assert lr_at(1500, base, cfg) == pytest.approx(base * (1 - 1500 / 160_000), rel=1e-12)
    assert lr_at(159_999, base, cfg) == pytest.approx(base / 160_000, rel=1e-9)
    cfg_min = ScheduleCfg(iters=100, warmup_iters=0, power=0.9, min_lr=1e-4)
    assert lr_at(50, 0.01, cfg_min) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4, rel=1e-12)
    assert lr_at(100, 0.01, cfg_min) == pytest.approx(1e-4)
